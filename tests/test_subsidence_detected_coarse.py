"""Cage subsidence on DETECTED geometry at coarse spacing (0.8 x 0.8 x 1.5 mm) recovers the
phantom's exact truth: at most 0.5 mm per endplate, grade right where the truth is at least
0.3 mm from a cut (issue 3).

On thick slices the detected endplate normals are up to 2.3 deg off and the detected cage
box follows the level normal they imply; the rim fit must correct both (the measurement
read the L5-S1 endplates of seed 2 0.64 mm deep and graded seed 9's L3-L4 cage mild at a
true 1.61 mm). Seed 15 (held out from development) has two titanium cages side by side at
L4-L5: rays grazing them once tilted L5's detected superior endplate 13.65 deg and read the
cages' inferior subsidence 1.73 and 1.02 mm against a true 0.06 mm; with the uniform set's
halo widths the same level read 7.97 mm (L5's superior endplate 23.8 deg off: an implausible
wedge, now tilted like the body's other endplate). Seed 12's two titanium cages at L3-L4 read
their superior subsidence 0.57-0.58 mm over where a face and an endplate fell on unlucky slice
phases (tests/test_subsidence_slice_phase.py). Seed 72 (a fresh seed of the eighteenth
session's sweep of seeds 60-159) has one titanium cage sunk 4.76 mm into L3: its face points
covered a fifth of a slice phase, the phase fit took a trend across the face for a 1.8 mm
harmonic and read the superior subsidence 2.43 mm short (mild for severe); the harmonic is
now bounded. Ground truth comes from ``sample_data.phantom``.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.detect import detect  # noqa: E402
from pipeline.measure import measure_cage, rim_plane_fit  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom  # noqa: E402

COARSE_MM = (0.8, 0.8, 1.5)
NOISE_HU = 25.0


@pytest.mark.parametrize("seed,halo_set", [(2, "default"), (9, "default"), (15, "default"), (15, "uniform"),
                                           (12, "default"), (12, "uniform"), (72, "default")])
def test_detected_coarse_subsidence_within_half_a_millimetre_per_endplate(seed, halo_set):
    from benchmarks.accuracy import uniform_set_overrides

    cfg = Config()
    kw = uniform_set_overrides(seed) if halo_set == "uniform" else {}
    vol, truth = make_phantom(PhantomSpec(seed=seed, spacing_mm=COARSE_MM, noise_hu=NOISE_HU,
                                          streaks=True, blooming=True, **kw))
    anatomy = detect(vol, cfg)
    cages = {c.id: c for c in anatomy.cages}
    assert truth["cages"]
    for tc in truth["cages"]:
        assert tc["id"] in cages, tc["id"]
        m, ev = measure_cage(vol, cages[tc["id"]], anatomy, cfg)
        err_sup = m.subsidence_superior_mm - tc["subsidence_superior_mm"]
        err_inf = m.subsidence_inferior_mm - tc["subsidence_inferior_mm"]
        assert abs(err_sup) <= 0.5 and abs(err_inf) <= 0.5, (tc["id"], err_sup, err_inf)
        if all(abs(tc["subsidence_mm"] - cut) >= 0.3 for cut in cfg.criteria.subsidence_grades_mm):
            assert m.subsidence_grade == tc["subsidence_grade"], (tc["id"], m.subsidence_mm, tc["subsidence_mm"])


def test_rim_plane_fit_recovers_a_tilt_the_rim_surrounds_and_ignores_stray_rays():
    # a rim ring around a cage footprint on a plane tilted 2 deg (u) and -1 deg (v), with
    # 0.2 mm scatter and a cluster of rays 1.5 mm off (a streak): the tilt comes back
    rng = np.random.default_rng(0)
    u, v = np.meshgrid(np.arange(-18, 18.1, 1.5), np.arange(-14, 14.1, 1.5))
    u, v = u.ravel(), v.ravel()
    ring = (np.abs(u) > 8) | (np.abs(v) > 12)
    u, v = u[ring], v[ring]
    gu, gv = math.tan(math.radians(2.0)), math.tan(math.radians(-1.0))
    z = 0.4 + gu * u + gv * v + rng.normal(0.0, 0.2, u.size)
    stray = (u > 12) & (v > 6)
    z[stray] -= 1.5
    coef, keep = rim_plane_fit(u, v, z)
    assert not keep[stray].any()
    assert abs(math.degrees(math.atan(coef[1])) - 2.0) < 0.3
    assert abs(math.degrees(math.atan(coef[2])) + 1.0) < 0.3
    assert abs(coef[0] - 0.4) < 0.1


def test_rim_plane_fit_keeps_the_prior_tilt_across_a_thin_strip():
    # a rim that is one row of rays (a level filled by two cages): along the row the tilt
    # is read, across it (no spread) it stays the prior's (zero)
    rng = np.random.default_rng(1)
    u = np.arange(-15, 15.1, 1.5)
    v = np.full(u.size, 13.0) + rng.normal(0.0, 0.05, u.size)
    gu = math.tan(math.radians(1.5))
    z = gu * u + rng.normal(0.0, 0.2, u.size)
    coef, keep = rim_plane_fit(u, v, z)
    assert keep.all()
    assert abs(math.degrees(math.atan(coef[1])) - 1.5) < 0.5
    assert abs(math.degrees(math.atan(coef[2]))) < 0.5
