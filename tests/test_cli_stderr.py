"""The command line's refusal is one line on stderr even when Prefect's background services
have something to say as the process exits (CONTRACT.md, "Exit status").

Prefect's queue services log under their class names, outside the ``prefect`` logger: a
refused input once printed "EventsWorker - Still processing items: 5 items remaining..."
after the error line (one run in four). Here the warning is emitted on purpose, the way the
service does at exit, in a fresh ``fusionct`` process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys
from flows.cli import main
rc = main(["analyze", sys.argv[1], "-o", sys.argv[2]])
for name in ("EventsWorker", "APILogWorker"):
    logging.getLogger(name).warning("Still processing items: 5 items remaining...")
sys.exit(rc)
"""


def _refuse_not_dicom(tmp_path, script: str) -> list[str]:
    """Run ``script`` (it calls the CLI on a folder without DICOM) in a fresh process with
    the user's environment less ``PREFECT_SERVER_LOGGING_LEVEL``; check the refusal (exit 2,
    no output folder) and return its non-empty stderr lines."""
    folder = tmp_path / "not dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a DICOM file")
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", "/tmp/numba_cache"))
    env.pop("PREFECT_SERVER_LOGGING_LEVEL", None)
    run = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr
    assert not (tmp_path / "out").exists()
    return [ln for ln in run.stderr.splitlines() if ln.strip()]


def test_refusal_is_one_stderr_line_even_when_prefect_services_warn_at_exit(tmp_path):
    lines = _refuse_not_dicom(tmp_path, SCRIPT)
    assert len(lines) == 1, lines
    assert lines[0].startswith("fusionct: cannot analyze") and "no DICOM files" in lines[0]


SERVER_SCRIPT = """
import logging, sys
from flows.cli import main
rc = main(["analyze", sys.argv[1], "-o", sys.argv[2]])
logging.getLogger("prefect.server.services.task_run_recorder").error(
    "Error flushing 1 events (1 to retry, 0 dropped)")
sys.exit(rc)
"""


def test_refusal_is_one_stderr_line_when_the_embedded_server_logs_at_shutdown(tmp_path):
    """The embedded Prefect server's services log under ``prefect.server`` at the level of
    ``PREFECT_SERVER_LOGGING_LEVEL`` (WARNING by default), not ``PREFECT_LOGGING_LEVEL``: a
    truncated DICOM file once printed the one error line and then the task-run recorder's
    60-line "Error flushing 1 events" traceback as the server shut down (one run in four)."""
    lines = _refuse_not_dicom(tmp_path, SERVER_SCRIPT)
    assert len(lines) == 1, lines
    assert lines[0].startswith("fusionct: cannot analyze")
