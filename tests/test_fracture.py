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
from pipeline.fracture import (ROD_SECTION_DIP_REL, centreline_profile, find_dips,
                                find_fractures, plateau_level, polyline_length_mm,
                                section_deficit_mm, section_dips, section_metal_hu_mm2,
                                section_offsets_mm, section_samples)
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy

SPACINGS = {"fine": (0.35, 0.35, 0.6), "standard": (0.5, 0.5, 1.0), "coarse": (0.8, 0.8, 1.5)}
FRACTURE_SETS = {
    "a": ({"rod-left": (0.5, 0.8), "rod-right": (0.4, 2.0)},
          {"L4-left": (0.5, 1.5), "L5-right": (0.6, 1.2)}),
    "b": ({"rod-left": (0.6, 3.0), "rod-right": (0.55, 1.2)},
          {"L4-right": (0.45, 2.0), "L5-left": (0.35, 2.5)}),
    # shaft gaps below a voxel: clipping at 3071 HU keeps the centre line on the plateau at
    # standard/coarse spacing; only the cross-section integral shows them
    "thin": ({}, {"L4-right": (0.45, 0.8), "L5-right": (0.6, 1.0)}),
    # rod gaps below a slice: found by the rods' cross-section channel where the centre
    # line stays on the plateau, sized by the integral deficit
    "rod_thin": ({"rod-left": (0.5, 0.6), "rod-right": (0.4, 0.8)}, {}),
    "rod_thin_coarse": ({"rod-right": (0.4, 1.0)}, {}),
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


def _check_found(spacing, which, kinds=("rod", "screw")):
    vol, truth = _phantom(spacing, which)
    found = [f for f in find_fractures(vol, truth_anatomy(truth), Config()) if f.kind in kinds]
    planted = _planted(truth)
    assert len(planted) == sum(len(x) for x in FRACTURE_SETS[which])
    planted = [p for p in planted if p[0] in kinds]
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


@pytest.mark.parametrize("spacing,which", [("standard", "a"), ("standard", "b"),
                                           ("coarse", "a"),
                                           ("coarse", "b")])
def test_planted_rod_and_shaft_fractures_found_located_and_sized(spacing, which):
    _check_found(spacing, which)


def test_coarse_set_a_shaft_gaps_found_located_and_sized():
    """The 1.2 mm L5-right shaft gap stays on the clipped centre-line plateau at 0.8 x 0.8 x
    1.5 mm; the cross-section channel finds and sizes it (and L4-left's 1.5 mm)."""
    _check_found("coarse", "a", kinds=("screw",))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a", "b"])
def test_planted_fractures_found_at_fine_spacing(which):
    _check_found("fine", which)


@pytest.mark.slow
def test_sub_millimetre_shaft_gaps_found_at_fine_spacing():
    _check_found("fine", "thin")


@pytest.mark.parametrize("spacing", ["standard", "coarse"])
def test_sub_millimetre_shaft_gaps_found_at_standard_and_coarse_spacing(spacing):
    """0.8 and 1.0 mm shaft gaps: the centre line stays clipped, the cross-section shows them."""
    _check_found(spacing, "thin")


@pytest.mark.parametrize("spacing,which", [("standard", "rod_thin"), ("coarse", "rod_thin"),
                                           ("coarse", "rod_thin_coarse"),
                                           pytest.param("fine", "rod_thin", marks=pytest.mark.slow)])
def test_sub_millimetre_rod_gaps_found_located_and_sized(spacing, which):
    """0.6 and 0.8 mm rod gaps at all three spacings and a 1.0 mm one at 0.8 x 0.8 x 1.5 mm
    that the centre line alone missed."""
    _check_found(spacing, which)


def test_clipped_rod_gap_shows_in_the_cross_section_not_on_the_centre_line():
    """The mechanism for rods: at 0.8 x 0.8 x 1.5 mm rod-right's 1.0 mm gap leaves no dip on
    the centre line; the cross-section integral dips there, and its deficit (metal missing,
    conserved under blur) reads the gap's order of width."""
    vol, truth = _phantom("coarse", "rod_thin_coarse")
    hu = np.ascontiguousarray(vol.hu, dtype=np.float32)
    rod = next(r for r in truth["rods"] if r["id"] == "rod-right")
    pts = [np.asarray(p) for p in rod["points_lps_mm"]]
    r = 0.5 * rod["diameter_mm"]
    L = polyline_length_mm(pts)
    s_gap = rod["fracture"]["position"] * L
    s = np.arange(-4.0, L + 4.0, 0.1)
    prof = centreline_profile(vol, hu, pts, r, s)
    C, noise = plateau_level(prof)
    assert not any(abs(s[(i + j) // 2] - s_gap) < 2.0
                   for i, j in find_dips(prof, C, max(12.0, 6.0 * noise), 0.1))
    s2 = np.arange(-4.0, L + 4.0, 0.2)
    sec = section_metal_hu_mm2(section_samples(vol, hu, pts, s2, section_offsets_mm(r)))
    dips = section_dips(sec, s2, L, min_rel=ROD_SECTION_DIP_REL, junction_mm=0.0)
    assert len(dips) == 1 and abs(dips[0][0] - s_gap) < 1.0, (dips, s_gap)
    assert 0.5 <= section_deficit_mm(vol, hu, pts, r, dips[0][0]) <= 1.5


SHAFT_SIZE_TOL_MM = 0.3


@pytest.mark.parametrize("spacing", ["standard", "coarse",
                                     pytest.param("fine", marks=pytest.mark.slow)])
def test_shaft_gaps_of_1_2_to_2_5_mm_sized_within_0_3_mm(spacing):
    """Shaft gaps are sized from the shaft's own tip (two ends superposed), not from the
    sides' edge response: tighter than the general tolerance (30 % for wide gaps)."""
    sized = []
    for which in ("a", "b"):
        vol, truth = _phantom(spacing, which)
        found = {f.hardware_id: f for f in find_fractures(vol, truth_anatomy(truth), Config())}
        for kind, hid, _, gap in _planted(truth):
            if kind == "screw":
                assert hid in found, hid
                sized.append((hid, gap, round(found[hid].gap_mm, 2)))
    assert len(sized) == 4
    assert all(abs(w - gap) <= SHAFT_SIZE_TOL_MM for _, gap, w in sized), sized


def test_clipped_shaft_gap_shows_in_the_cross_section_not_on_the_centre_line():
    """The mechanism: at 0.8 x 0.8 x 1.5 mm the 1.0 mm gap's centre line never leaves the
    clipped plateau, but the cross-section integral above 2000 HU dips there."""
    vol, truth = _phantom("coarse", "thin")
    hu = np.ascontiguousarray(vol.hu, dtype=np.float32)
    sc = next(s for s in truth["screws"] if s["id"] == "L5-right")
    pts = [np.asarray(sc["head_lps_mm"]), np.asarray(sc["tip_lps_mm"])]
    L = polyline_length_mm(pts)
    s_gap = sc["fracture"]["position"] * L
    s = np.arange(-4.0, L + 4.0, 0.1)
    prof = centreline_profile(vol, hu, pts, 0.5 * sc["diameter_mm"], s)
    assert prof[np.abs(s - s_gap) < 0.5].min() >= 3071.0 - 12.0   # centre line: clipped
    s2 = np.arange(-4.0, L + 4.0, 0.2)
    sec = section_metal_hu_mm2(section_samples(vol, hu, pts, s2,
                                               section_offsets_mm(0.5 * sc["diameter_mm"])))
    dips = section_dips(sec, s2, L)
    assert len(dips) == 1 and abs(dips[0][0] - s_gap) < 1.0, (dips, s_gap)


def test_section_dip_needs_a_return_on_both_sides():
    """An end (the integral falls to nothing), a tulip (adds metal) and a slow drift are not
    gaps; a sharp dip of a tenth of the plateau is."""
    step = 0.2
    s = np.arange(-4.0, 44.0, step)
    L = 40.0
    base = np.where(s < 0, 90000.0, 36000.0) * (1.0 + 0.03 * np.sin(2 * np.pi * s / 15.0))
    base = np.where(s > L, 36000.0 * np.clip(1.0 - (s - L) / 0.8, 0.0, 1.0), base)
    assert section_dips(base, s, L) == []
    dipped = base * (1.0 - 0.15 * np.exp(-0.5 * ((s - 20.0) / 0.5) ** 2))
    dips = section_dips(dipped, s, L)
    assert len(dips) == 1 and abs(dips[0][0] - 20.0) < 0.3


NO_FALSE_SEEDS = (5, 11, 17, 23, 29, 31, 37, 41)


@pytest.mark.parametrize("spacing,seed", [(sp, sd) for sp in ("standard", "coarse")
                                          for sd in NO_FALSE_SEEDS])
def test_no_false_fracture_on_intact_hardware(spacing, seed):
    """Rod ends, tulips, the rod through its tulips, screw tips and tulip/shaft junctions
    must not read as gaps (8 seeds per spacing)."""
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
