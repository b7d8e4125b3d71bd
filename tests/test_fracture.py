"""Rod and screw-shaft fractures found, located and measured on phantoms with planted gaps.

Ground truth is the phantom's (sample_data.phantom: ``rod_fractures`` / ``screw_fractures``
cut a slab of the given width across the rod or shaft at a fraction of its length). Gaps of
0.8-3 mm on rods and shafts at the three test spacings with noise, streaks and blooming;
phantoms without fractures (several seeds) must give no finding at all.
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

from functools import lru_cache

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.fracture import find_fractures, find_dips, plateau_level
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy

SPACINGS = {"fine": (0.35, 0.35, 0.6), "standard": (0.5, 0.5, 1.0), "coarse": (0.8, 0.8, 1.5)}
FRACTURE_SETS = {
    "a": ({"rod-left": (0.5, 0.8), "rod-right": (0.4, 2.0)},
          {"L4-left": (0.5, 1.5), "L5-right": (0.6, 1.2)}),
    "b": ({"rod-left": (0.6, 3.0), "rod-right": (0.55, 1.2)},
          {"L4-right": (0.45, 2.0), "L5-left": (0.35, 2.5)}),
    # shaft gaps below a voxel: clipping at 3071 HU hides them at standard/coarse spacing
    "thin": ({}, {"L4-right": (0.45, 0.8), "L5-right": (0.6, 1.0)}),
}
LOCATION_TOL_MM = 2.0


def _gap_tol_mm(gap_mm: float) -> float:
    """0.5 mm up to 1.5 mm gaps; wider gaps are read short (see the report): 30 %."""
    return max(0.5, 0.3 * gap_mm)


@lru_cache(maxsize=None)
def _phantom(spacing: str, which: str | None, seed: int = 5):
    rods, screws = FRACTURE_SETS[which] if which else ({}, {})
    spec = PhantomSpec(seed=seed, spacing_mm=SPACINGS[spacing], vertebrae=("L4", "L5"),
                       instrumented_levels=("L4-L5",), rod_fractures=rods, screw_fractures=screws)
    return make_phantom(spec)


def _planted(truth):
    out = []
    for kind, key in (("rod", "rods"), ("screw", "screws")):
        for h in truth[key]:
            if h["fracture"]:
                out.append((kind, h["id"], np.array(h["fracture"]["center_lps_mm"]),
                            h["fracture"]["gap_mm"]))
    return out


def _check_found(spacing, which):
    vol, truth = _phantom(spacing, which)
    found = find_fractures(vol, truth_anatomy(truth), Config())
    planted = _planted(truth)
    assert len(planted) == sum(len(x) for x in FRACTURE_SETS[which])
    # every planted fracture found once, on the right hardware, located and sized
    for kind, hid, centre, gap in planted:
        hits = [f for f in found if f.hardware_id == hid]
        assert len(hits) == 1, (hid, gap, hits)
        f = hits[0]
        assert f.kind == kind
        assert np.linalg.norm(np.array(f.position_lps_mm) - centre) <= LOCATION_TOL_MM, (hid, f)
        assert abs(f.gap_mm - gap) <= _gap_tol_mm(gap), (hid, f.gap_mm, gap)
    # and nothing else
    assert len(found) == len(planted), found


_MISSED = pytest.mark.xfail(strict=True, reason="the 1.2 mm L5-right shaft gap at "
                            "coarse spacing stays on the clipped plateau: missed (see report)")


@pytest.mark.parametrize("spacing,which", [("standard", "a"), ("standard", "b"),
                                           pytest.param("coarse", "a", marks=_MISSED),
                                           ("coarse", "b")])
def test_planted_rod_and_shaft_fractures_found_located_and_sized(spacing, which):
    _check_found(spacing, which)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b"])
def test_planted_fractures_found_at_fine_spacing(which):
    _check_found("fine", which)


@pytest.mark.slow
def test_sub_millimetre_shaft_gaps_found_at_fine_spacing():
    _check_found("fine", "thin")


@pytest.mark.xfail(strict=True, reason="a 0.8-1.0 mm shaft gap stays above the clipped "
                   "plateau at 0.8 x 0.8 x 1.5 mm (blooming fills it): not detectable yet")
def test_sub_millimetre_shaft_gaps_at_coarse_spacing():
    _check_found("coarse", "thin")


@pytest.mark.parametrize("spacing,seed", [("standard", 5), ("standard", 11), ("coarse", 5),
                                          ("coarse", 17), ("coarse", 23)])
def test_no_false_fracture_on_intact_hardware(spacing, seed):
    """Rod ends, tulips, the rod through its tulips, screw tips and tulip/shaft junctions
    must not read as gaps."""
    vol, truth = _phantom(spacing, None, seed)
    assert find_fractures(vol, truth_anatomy(truth), Config()) == []


def test_dip_must_return_to_plateau_on_both_sides():
    """An end (fall without return) is not a gap; a dip that returns is."""
    step = 0.1
    s = np.arange(0, 30, step)
    plateau = np.full_like(s, 3071.0)
    end = np.where(s < 20, 3071.0, 3071.0 - 2800.0 * np.clip((s - 20) / 2, 0, 1))
    assert find_dips(end, 3071.0, 12.0, step) == []
    gap = plateau - 400.0 * np.exp(-0.5 * ((s - 15) / 0.5) ** 2)
    dips = find_dips(gap, 3071.0, 12.0, step)
    assert len(dips) == 1 and dips[0][0] < 150 < dips[0][1]


def test_plateau_noise_raises_the_dip_threshold():
    rng = np.random.default_rng(0)
    p = np.concatenate([np.full(100, 40.0), 15000.0 + rng.normal(0, 40.0, 500), np.full(100, 40.0)])
    C, noise = plateau_level(p)
    assert abs(C - 15000.0) < 80 and 25 < noise < 60
