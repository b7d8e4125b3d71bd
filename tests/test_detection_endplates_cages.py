"""Endplates found beside interbody cages: a cage's titanium never passes for an endplate.

Two titanium cages side by side leave a level's endplates visible only in a narrow strip
between them and at the sides. Each endplate ray is the mean of a bundle of five rays
1.5 mm apart; a bundle with one ray in a cage averaged that ray's titanium into a
cortex-bright plateau (~1000 HU, under the metal test) and read the cage's far face as the
endplate. On phantom seed 15 at coarse spacing (0.8 x 0.8 x 1.5 mm) those points tilted
L5's superior endplate 13.65 deg off the truth, turned the L4-L5 cage box with it and read
its inferior subsidence 1.73 mm against a true 0.06 mm. On seed 124 at that spacing the
two cages' blooming hid L4's superior endplate from all of L4's own rays: L4 was left out and
the names above it counted one short (L3 called L4, with its screws and cages). The cause was
the disc station, put on the top of the cages' metal plateau (on L3's inferior endplate); it
is now the plateau's middle (``anatomy.cage_run_middle``). The mends written first (the
endplate read across the disc from L3, ``anatomy._superior_across_disc``, and the refit short
of the body above) stay as safety nets, tested with the station put back on the plateau's
top. Ground truth comes from ``sample_data.phantom`` (and, for the synthetic level, from how
it is built).
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage  # noqa: E402

from _detection import detected_phantom, detection_problems  # noqa: E402  (tests/ is on sys.path under pytest)
from benchmarks.detection_sweep import vertebra_problems  # noqa: E402
from pipeline.anatomy import endplate_points  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.volume import Volume  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy  # noqa: E402

COARSE_MM = (0.8, 0.8, 1.5)


def _level_with_two_cages(step_mm=0.5):
    """A flat disc level (lower endplate's surface at z = 0, disc 8 mm) with two titanium
    cages in it at x = +-10 mm (3.7 mm half width), blurred as a coarse scan blurs it."""
    x = np.arange(-30, 30, step_mm)
    y = np.arange(-25, 25, step_mm)
    z = np.arange(-20, 20, step_mm)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    hu = np.full(zz.shape, 250.0, np.float32)           # cancellous bone
    hu[(zz > 0) & (zz < 8)] = 80.0                      # disc
    hu[(zz > -1) & (zz <= 0)] = 700.0                   # cortical endplates, 1 mm
    hu[(zz >= 8) & (zz < 9)] = 700.0
    for cx in (-10.0, 10.0):
        hu[(np.abs(xx - cx) <= 3.7) & (np.abs(yy) <= 11) & (zz > 0) & (zz < 8)] = 3000.0
    # point-spread of a 0.8 x 0.8 x 1.5 mm scan (sigma about half a voxel extent)
    hu = ndimage.gaussian_filter(hu, (0.77 / step_mm, 0.41 / step_mm, 0.41 / step_mm)).astype(np.float32)
    return Volume(hu=hu, origin_lps_mm=np.array([x[0], y[0], z[0]]), spacing_mm=np.full(3, step_mm))


def test_endplate_rays_grazing_a_cage_never_read_the_cage_as_the_endplate():
    vol = _level_with_two_cages()
    pts = endplate_points(vol, np.array([0.0, 0.0, -12.0]), np.array([0.0, 0.0, 1.0]),
                          np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), 22.0, 16.0, +1,
                          16.0, 2200.0)
    # the rays between and beside the cages still read the endplate ...
    assert len(pts) >= 20
    assert (np.abs(pts[:, 0]) < 5).sum() >= 10 and (np.abs(pts[:, 0]) > 15).sum() >= 2
    # ... and every point lies on it: none on the cages' upper faces 7-8 mm above
    z = pts[:, 2]
    assert np.all(np.abs(z - np.median(z)) < 0.5), np.round(pts, 2)
    assert abs(float(np.median(z))) < 1.0


def test_endplates_beside_two_titanium_cages_found_within_three_degrees_at_coarse_spacing():
    anatomy, truth = detected_phantom(15, COARSE_MM, 25.0)
    assert any(c["id"].startswith("L4-L5") for c in truth["cages"])  # the two-cage level
    found = {v.name: v for v in anatomy.vertebrae}
    assert [v["name"] for v in truth["vertebrae"]] == [v.name for v in anatomy.vertebrae]
    for tv in truth["vertebrae"]:
        dv = found[tv["name"]]
        for side in ("superior_endplate", "inferior_endplate"):
            if tv["is_sacrum"] and side == "inferior_endplate":
                continue  # fused below S1: no endplate to find
            t_n = np.asarray(tv[side]["normal"], float)
            d_n = np.asarray(getattr(dv, side).normal, float)
            angle = np.degrees(np.arccos(np.clip(t_n @ d_n, -1.0, 1.0)))
            assert angle < 3.0, (tv["name"], side, round(float(angle), 2))
            off = float((np.asarray(getattr(dv, side).point_lps_mm) - tv[side]["point_lps_mm"]) @ t_n)
            assert abs(off) < 1.0, (tv["name"], side, round(off, 2))


def test_a_cage_runs_disc_station_is_the_middle_of_its_metal_plateau():
    from pipeline.anatomy import cage_run_middle

    # a cage filling stations 40-60 (ramps 3 stations long), its top lifted at 43 by a
    # screw's blooming: the middle is 50, not the top
    x = np.zeros(100)
    x[40:61] = 0.77
    x[37:40] = [0.2, 0.4, 0.6]
    x[61:64] = [0.6, 0.4, 0.2]
    x[43] = 0.79
    assert abs(cage_run_middle(x, 44, 3) - 50.0) < 0.6
    # a symmetric run: its centre, to a fraction of a station
    y = np.exp(-0.5 * ((np.arange(60) - 31.3) / 4.0) ** 2)
    assert abs(cage_run_middle(y, 30, 3) - 31.3) < 0.1


@pytest.mark.parametrize("seed, noise_hu", [(148, 10.0), (148, 25.0), (148, 40.0), (124, 10.0), (124, 25.0),
                                            (124, 40.0), (47, 40.0)])
def test_vertebrae_around_a_disc_with_two_sunk_titanium_cages_are_found_and_named(seed, noise_hu):
    # seeds 124 and 148 at 0.8x0.8x1.5 mm: two titanium cages sunk into both bodies fill the
    # L3-L4 disc's centre, a plateau of metal whose top (lifted by blooming) sat on L3's
    # inferior endplate; the disc station put there made L4's rays read L3's endplate as L4's
    # own (11 mm high) or find none (L4 left out, L3 named L4). The station is now the
    # middle of the cage's metal run. Seed 47 at 40 HU (L3's superior endplate 9 mm low) was
    # the same fault one level up. The eighteenth session's sweep: 5 of 480 coarse studies
    # wrong; the nineteenth's, with this: 0 of 480.
    anatomy, truth = detected_phantom(seed, COARSE_MM, noise_hu)
    # names, endplates, and the hardware on its levels
    assert detection_problems(anatomy, truth) == []
    assert list(anatomy.notes) == []


# The safety nets below no longer act on any sweep study (0.8x0.8x1.5 mm, seeds 0-159 at 10,
# 25 and 40 HU: the same endplates with them switched off). They are kept for a disc station
# that lands on an endplate anyway, and tested by putting the station back where the
# plateau's top was (the eighteenth session's finder).
@pytest.fixture
def station_on_plateau_top(monkeypatch):
    from pipeline import anatomy

    monkeypatch.setattr(anatomy, "cage_run_middle", lambda cage_fraction, peak, reach: float(peak))
    return monkeypatch


@pytest.mark.parametrize("noise_hu", [25.0, 40.0])
def test_a_superior_endplate_hidden_by_two_cages_is_read_across_the_disc(noise_hu, station_on_plateau_top):
    anatomy, truth = detected_phantom(124, COARSE_MM, noise_hu)
    assert [c["id"] for c in truth["cages"]] == ["L3-L4-cage1", "L3-L4-cage2"]
    # names and endplates right, and the hardware keeps its levels: L3's screws are L3's,
    # the cages L3-L4's
    assert detection_problems(anatomy, truth) == []


def test_a_middle_vertebra_left_out_says_the_names_above_may_be_one_level_low(station_on_plateau_top):
    # without the mended superior endplate either, seed 124 loses L4 and names L3 "L4": the
    # report must at least say the names above the gap may be one level low
    from pipeline import anatomy

    station_on_plateau_top.setattr(anatomy, "_superior_below_disc", lambda volume, fit, rough, above, tol, thr: fit)
    vol, _ = make_phantom(PhantomSpec(seed=124, spacing_mm=COARSE_MM, noise_hu=25.0, streaks=True, blooming=True))
    vertebrae, _, _, notes = anatomy.find_vertebrae(vol, Config())
    assert [v.name for v in vertebrae] == ["L4", "L5", "S1"]  # L3 named one level low ...
    assert any("named one level too low" in n for n in notes)  # ... and said so


def test_a_superior_endplate_read_on_the_body_above_is_refitted_short_of_it(station_on_plateau_top):
    # seed 148 with the station on L3's inferior endplate: L4's rays took that endplate as
    # L4's superior, 11 mm high; L3, 4.6 mm inside the top of the scan, is then left out
    # (the edge) and cannot be read across
    anatomy, truth = detected_phantom(148, COARSE_MM, 25.0)
    assert vertebra_problems(anatomy.vertebrae, truth_anatomy(truth).vertebrae) == [
        "names L4,L5,S1 for L3,L4,L5,S1"]  # L3 left out at the edge; L4's endplates right
    assert not any("tall against" in n for n in anatomy.notes)


def test_a_body_that_took_a_neighbours_endplate_is_noted_as_too_tall_or_too_short(station_on_plateau_top):
    # seed 148 at 40 HU with the station on L3's inferior endplate: L3 finds no endplate at
    # all, so L4's superior endplate can be checked against nothing and is read on L3's
    # inferior one, 11 mm high
    from pipeline.anatomy import body_height_notes

    anatomy, _ = detected_phantom(148, COARSE_MM, 40.0)
    assert [v.name for v in anatomy.vertebrae] == ["L4", "L5", "S1"]
    assert any(n.startswith("L4 reads 37 mm tall against 26 mm") for n in anatomy.notes), anatomy.notes
    # a normal study (seed 2, whose tallest body is the sweep's most uneven: 1.08x) has no such note
    assert body_height_notes(list(detected_phantom(2, COARSE_MM, 25.0)[0].vertebrae)) == []
    # seed 47 at 40 HU: L3's superior endplate is read 9 mm low
    notes = detected_phantom(47, COARSE_MM, 40.0)[0].notes
    assert any(n.startswith("L3 reads 18 mm tall against 25 mm") for n in notes), notes
