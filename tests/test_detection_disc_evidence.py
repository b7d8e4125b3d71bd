"""Disc detection at 0.8x0.8x1.5 mm on four studies a sweep of seeds 0-99 found wrong
(seventeenth session; 25 HU, streaks and blooming; seeds 53 and 73 also at 40 HU, 97 at 10 HU,
91 at 40 HU only).
Ground truth is the phantom's (sample_data); the detector never sees it.

* Seed 53: inside L4 and L5, at screw level, bright streaks lift the cross-section's 75th
  percentile into peaks 5-16 mm from the bodies' real endplates. Two such peaks pair up like
  the two endplates of a disc, with trabecular bone between them; four false discs outscored
  the three real ones, L3 was lost, no screw was found and the cages were measured against the
  wrong endplates (subsidence off by up to 4.7 mm, bridging by up to 0.78).
* Seed 73: three titanium cages fill more than a quarter of the column's stations, so the
  column's "body level" (upper quartile of the low-quantile profile) read 413 HU for 230 HU
  bodies; trabecular bone fell under the half-way level, the column "ended" inside S1, the
  lumbosacral disc was dropped as having no body beyond it and the vertebrae were named by
  position (V1-V3) with no sacrum.
* Seed 97: L3's top lies 5 mm inside the scan, so the column is open there, and peaks of
  trabecular texture in L3 paired up; L3's superior endplate was read 7-8 mm low.
* Seed 91 at 40 HU: two dips with no bright flank (score 0) next to each other were merged
  with a weight of 0 + 0, and the analysis stopped with ZeroDivisionError.
* Seed 242 at 0.5x0.5x1.0 mm and 40 HU (nineteenth session): a dip with almost no evidence
  near the open top of the column was kept as a disc (``MIN_DISC_EVIDENCE``).
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np
import pytest

from _detection import detected_phantom, detection_problems  # (tests/ is on sys.path under pytest)
from benchmarks.detection_sweep import ENDPLATE_TOL_MM
from pipeline.anatomy import find_disc_stations

COARSE = (0.8, 0.8, 1.5)


@pytest.mark.parametrize("seed, spacing_mm, noise_hu", [
    (53, COARSE, 25.0), (53, COARSE, 40.0), (73, COARSE, 25.0), (73, COARSE, 40.0), (97, COARSE, 25.0),
    (97, COARSE, 10.0), (91, COARSE, 40.0),
    # the nineteenth session's sweep of fresh seeds 160-259 at 0.5x0.5x1.0 mm: the scan cuts
    # L3, and a dip inside it 6 mm under its top, with evidence 0.01 against 0.58 or more for
    # every real disc of the sweeps, was kept as the disc above L3 (nothing competes with it
    # at an open end); L3's superior endplate read 3.1 mm low
    (242, (0.5, 0.5, 1.0), 40.0)])
def test_every_vertebra_found_named_and_its_endplates_placed(seed, spacing_mm, noise_hu):
    anatomy, truth = detected_phantom(seed, spacing_mm, noise_hu)
    want = [v["name"] for v in truth["vertebrae"]]
    # names in order, superior endplates within 2 mm (the sweep's own check), every screw
    # and cage found on its vertebra and level
    assert ENDPLATE_TOL_MM <= 2.0
    assert detection_problems(anatomy, truth) == []
    assert [lv.name for lv in anatomy.levels] == [f"{a}-{b}" for a, b in zip(want, want[1:])]


def _profile(high_hu, nt, low_hu=None):
    """A column profile (see pipeline.anatomy.column_profile) from its three signals."""
    n = len(high_hu)
    low = np.full(n, 230.0) if low_hu is None else np.asarray(low_hu, float)
    return dict(low_hu=low, high_hu=np.asarray(high_hu, float), valid=np.ones(n, bool),
                central_non_trabecular=np.asarray(nt, float), central_metal_fraction=np.zeros(n),
                central_cage_metal_fraction=np.zeros(n), body_hu=230.0)


def _disc(x, at, width=8, depth=150.0):
    """A disc of ``width`` stations at ``at``: low tissue, endplates either side, not trabecular."""
    high, nt, low = x
    high[at - width // 2 - 1] = high[at + width // 2 + 1] = 700.0
    nt[at - width // 2: at + width // 2 + 1] = 1.0
    low[at - width // 2: at + width // 2 + 1] -= depth


def test_an_endplate_pair_needs_something_other_than_trabecular_bone_between():
    """Two bright peaks 12 mm apart inside a body (streaks), trabecular between them, are no
    disc; the same peaks around disc tissue are."""
    n = 200
    high, nt, low = np.full(n, 250.0), np.zeros(n), np.full(n, 230.0)
    for at in (40, 100, 160):
        _disc((high, nt, low), at)
    high[64] = high[76] = 700.0  # streak peaks inside the body between the first two discs
    assert find_disc_stations(_profile(high, nt, low)) == [40, 100, 160]
    nt[65:76] = 1.0  # ... with disc, cage or bridging bone between them they would pair
    low2 = low.copy()
    assert 70 in find_disc_stations(_profile(high, nt, low2))


def test_the_detection_sweep_reports_these_studies_right(capsys):
    """benchmarks.detection_sweep (the README's seeds 0-99 sweep) on two of them."""
    from benchmarks.detection_sweep import main

    assert main(["--spacings", "coarse", "--seeds", "53", "97", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "coarse 25 HU seed 53: ok" in out and "0 of 2 studies wrong" in out
