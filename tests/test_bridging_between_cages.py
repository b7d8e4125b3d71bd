"""Bridging between two interbody cages side by side (issue 3): the gap between them is
read along its midline, so it stays in the fraction on detected geometry.

Ground truth is the phantom's exact bridging map (``sample_data.phantom``). Seed 9 has two
titanium cages at L3-L4 (11 mm wide, 5 mm apart) and bone bridging 0.711 of the disc,
including the gap between the cages. At 0.8x0.8x1.5 mm the detected cage boxes read
0.54 mm wide of the metal on each side (the clipped, bloomed roll-off lies outside the
true surface), so the 2 mm blooming margins of the two cages covered the whole 3.9 mm gap:
no column there was read, the gap left the fraction and L3-L4 read 0.563 (error 0.148).
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.measure import measure_level  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy  # noqa: E402

SEED = 9
LEVEL = "L3-L4"
COARSE = (0.8, 0.8, 1.5)


@pytest.fixture(scope="module")
def coarse_study():
    from pipeline.detect import detect

    spec = PhantomSpec(seed=SEED, spacing_mm=COARSE, noise_hu=25.0, streaks=True, blooming=True)
    vol, truth = make_phantom(spec)
    return vol, truth, detect(vol, Config())


def _level(anatomy, name):
    return next(lv for lv in anatomy.levels if lv.name == name)


def _truth_level(truth, name):
    return next(lv for lv in truth["levels"] if lv["level"] == name)


def _gap_cells(ev, cages):
    """Grid cells of the level's evidence lying between the two cages' footprints (inside
    both cages' AP extent, between their facing LR sides)."""
    nv, nu = ev.domain.shape
    o, u, v = (np.asarray(x) for x in (ev.origin_lps_mm, ev.axis_u, ev.axis_v))
    jv, iu = np.mgrid[0:nv, 0:nu]
    pts = o + (iu * ev.step_mm)[..., None] * u + (jv * ev.step_mm)[..., None] * v
    a, b = sorted(cages, key=lambda c: c.centroid_lps_mm[0])
    ax = np.asarray(a.axes[1])
    lr_a = (pts - np.asarray(a.centroid_lps_mm)) @ ax
    lr_b = (pts - np.asarray(b.centroid_lps_mm)) @ ax
    ap = np.abs((pts - np.asarray(a.centroid_lps_mm)) @ np.asarray(a.axes[2]))
    return (lr_a > a.half_sizes_mm[1]) & (lr_b < -b.half_sizes_mm[1]) & (ap < a.half_sizes_mm[2] - 1.0)


def test_midline_is_the_ridge_between_two_cages_and_keeps_its_distance():
    from pipeline.measure import _cage_midline

    # cells 0.5 mm apart across a 4 mm gap, distances from the cage on either side: the
    # cell midway is the ridge; on a grid offset by half a cell, the two cells beside it
    x = np.arange(9) * 0.5
    mid = _cage_midline(np.stack([x, 4.0 - x]), step_mm=0.5, min_mm=1.0)
    assert mid.tolist() == [False] * 4 + [True] + [False] * 4
    x = 0.25 + np.arange(8) * 0.5
    mid = _cage_midline(np.stack([x, 4.0 - x]), step_mm=0.5, min_mm=1.0)
    assert mid.tolist() == [False] * 3 + [True] * 2 + [False] * 3
    # a 1.5 mm gap: its midline is closer than 1 mm to both cages and is not read
    x = np.arange(4) * 0.5
    assert not _cage_midline(np.stack([x, 1.5 - x]), 0.5, 1.0).any()
    # one cage: no midline
    assert not _cage_midline(np.stack([x]), 0.5, 1.0).any()


def test_gap_between_titanium_cages_is_read_on_detected_geometry_at_coarse_spacing(coarse_study):
    vol, truth, anatomy = coarse_study
    cfg = Config()
    tl = _truth_level(truth, LEVEL)
    cages = [c for c in anatomy.cages if c.level == LEVEL]
    assert tl["fusion"] == "fused" and len(cages) == 2 and all(c.material == "titanium" for c in cages)
    m, ev = measure_level(vol, _level(anatomy, LEVEL), anatomy, cfg)
    # old code: 0.563 (error 0.148); issue 3 asks for at most 0.1
    assert abs(m.bridging_fraction - tl["bridging_fraction"]) <= 0.1, m.bridging_fraction
    assert m.fusion == "fused"
    gap = _gap_cells(ev, cages)
    assert gap.sum() > 100  # the gap lies on the grid: ~4 mm x 20 mm of 0.5 mm cells
    # old code: no gap cell in the domain; now the gap is counted, most of it from the
    # nearest read column, its midline read directly
    assert ev.domain[gap].mean() > 0.9
    assert np.any(ev.domain & gap & ~ev.estimated)
    assert not np.any(ev.bridged & ~ev.domain)


def test_true_geometry_gap_reading_is_unchanged_by_the_midline(coarse_study):
    """On the phantom's true cages (5 mm apart) the 2 mm margins leave a readable strip
    midway anyway: the fraction stays within 0.02 of the truth (0.700 for 0.711)."""
    vol, truth, _ = coarse_study
    anatomy = truth_anatomy(truth)
    m, _ = measure_level(vol, _level(anatomy, LEVEL), anatomy, Config())
    assert abs(m.bridging_fraction - _truth_level(truth, LEVEL)["bridging_fraction"]) <= 0.02
