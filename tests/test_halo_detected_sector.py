"""Issue 3, loosening call on detected geometry: rays inside a wide partial halo are read, not
dropped.

On detected geometry at 0.35x0.35x0.6 mm the screw's axis and diameter are a few hundredths
of a millimetre off, so the metal's steep tail is a little under-subtracted at the closest
readable distance. Inside a 2-3 mm halo the profile could then sit just above the half-way
level there and be lucent right after it; deficit mode (made for halos thinner than the
readable distance) took the lucency beyond its window for the ray's own bone level and read
0 mm, and those rays were dropped as outliers. In-sector rays were excluded 2-3 times as
often as the others (seeds 0-11, 25 HU: 7.5 % against 2.9 %), which alone lowered the
coverage of half-circumference halos by about 0.01, under the 0.5 loosening cut (detected
fine loosening right 93 % default set, 84 % uniform set).

Ground truth: the phantom's halo sector (CONTRACT: "halo lies in a contiguous sector of
fraction halo_fraction starting at halo_start_deg from the superior direction
(perpendicular to the axis), turning towards axis x superior").
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks.accuracy import SPACINGS, uniform_set_overrides  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.detect import detect  # noqa: E402
from pipeline.measure import _along_shaft_width, measure_study  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom  # noqa: E402

SEED = 10  # uniform set: L4-left carries a 2.87 mm halo on half its circumference


def _in_sector(truth_screw: dict, dirs_lps: np.ndarray) -> np.ndarray:
    """Which ray directions lie in the screw's true halo sector (phantom truth notes)."""
    head = np.asarray(truth_screw["head_lps_mm"], float)
    tip = np.asarray(truth_screw["tip_lps_mm"], float)
    ax = (tip - head) / np.linalg.norm(tip - head)
    sup = np.array([0.0, 0.0, 1.0])
    e1 = sup - (sup @ ax) * ax
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(ax, e1)
    phi = np.degrees(np.arctan2(dirs_lps @ e2, dirs_lps @ e1))
    rel = np.mod(phi - truth_screw["halo_start_deg"], 360.0)
    return rel <= 360.0 * truth_screw["halo_fraction"]


@pytest.fixture(scope="module")
def detected_study():
    spec = PhantomSpec(seed=SEED, spacing_mm=SPACINGS["fine"], noise_hu=25.0, streaks=True,
                       blooming=True, **uniform_set_overrides(SEED))
    vol, truth = make_phantom(spec)
    config = Config()
    anatomy = detect(vol, config)
    screws, _, _, evidence = measure_study(vol, anatomy, config)
    return truth, {m.id: m for m in screws}, evidence


def test_rays_inside_a_wide_partial_halo_are_read_on_detected_geometry(detected_study):
    # L4-left: before, 72 of its 666 in-sector rays were dropped (none of the others)
    truth, measured, evidence = detected_study
    wide = [t for t in truth["screws"] if t["id"] == "L4-left"]
    assert wide[0]["halo_width_mm"] >= 2.0 and wide[0]["halo_fraction"] == 0.5
    for t in wide:
        ev = evidence[t["id"]]
        ins = _in_sector(t, np.asarray(ev.azimuth_dirs, float))
        W = np.asarray(ev.widths_mm, float)
        excluded = ~np.isfinite(W)
        in_excl = excluded[:, ins].mean()
        out_excl = excluded[:, ~ins].mean()
        # rays inside the halo are not dropped more often than the rays outside it
        assert in_excl <= out_excl + 0.02, (t["id"], in_excl, out_excl)
        # and the sector's rays read the halo (the coverage decision's along-shaft width)
        med = _along_shaft_width(W.ravel(), W.shape).reshape(W.shape)
        used_in = np.isfinite(W) & ins[None, :]
        assert np.mean(med[used_in] >= 1.0) >= 0.95, (t["id"], np.mean(med[used_in] >= 1.0))


def test_half_halo_coverage_not_read_under_its_truth_on_detected_geometry(detected_study):
    # L4-left: 2.87 mm on half the circumference, true coverage 0.5 (loose). Its rays'
    # exclusions put the measured coverage at 0.47 (called not loose)
    truth, measured, _ = detected_study
    t = next(t for t in truth["screws"] if t["id"] == "L4-left")
    assert t["halo_coverage"] == 0.5 and t["loosening"]
    m = measured["L4-left"]
    assert m.halo_coverage == pytest.approx(0.5, abs=0.04)
    assert m.halo_coverage >= 0.49
