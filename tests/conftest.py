"""Shared test fixtures: the real-data folder, Prefect's test harness, writable caches."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REALDATA = SHARED / "realdata" / "totalseg_example_ct"

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fusionct_numba_cache"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FUSIONCT_CACHE_DIR", tempfile.mkdtemp(prefix="fusionct_cache_"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real TotalSegmentator example CT in ../shared (skips, with the reason, when absent)."""
    if not (REALDATA / "example_ct.nii.gz").exists():
        pytest.skip(f"real CT not available: {REALDATA} is absent (it lives in the workplace's shared/ folder)")
    return REALDATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
