"""A halo read from its sclerotic rim (the "double halo") where blur fills the lucency.

At 0.8x0.8x1.5 mm a 1.5 mm lucency between the bloomed shaft and a 1 mm sclerotic rim
(650 HU) is filled by blur from both sides: the profile beyond the readable distance never
drops clearly under bone, and the rim's excess cancels the lucency's deficit, so the
kernel read such screws as halo-free. ``pipeline.measure._rim_widths`` reads the width
from the rim on each azimuth's along-shaft median profile. Ground truth is the phantom's
(sample_data.phantom), development seed 10, 25 HU noise, streaks and blooming on.
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline import measure as M  # noqa: E402
from pipeline.config import Config  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy  # noqa: E402

COARSE_MM = (0.8, 0.8, 1.5)


@pytest.fixture(scope="module")
def study():
    vol, truth = make_phantom(PhantomSpec(seed=10, spacing_mm=COARSE_MM, noise_hu=25.0,
                                          streaks=True, blooming=True))
    anatomy = truth_anatomy(truth)
    screws, _, _, _ = M.measure_study(vol, anatomy, Config())
    return vol, truth, anatomy, {m.id: m for m in screws}


def test_half_double_halo_is_read_from_its_rim(study):
    """L4-left: 1.5 mm double halo on half the circumference (true mean 0.75 mm). Before
    the rim reading it read 0.08 mm, coverage 0.0, no double halo."""
    _, truth, _, got = study
    t = {s["id"]: s for s in truth["screws"]}["L4-left"]
    assert t["double_halo"] and t["halo_width_mm"] == 1.5 and t["halo_fraction"] == 0.5
    m = got["L4-left"]
    assert abs(m.halo_mean_mm - t["halo_mean_mm"]) <= 0.25
    assert abs(m.halo_coverage - t["halo_coverage"]) <= 0.25
    assert m.double_halo


def test_no_rim_read_around_screws_without_one(study):
    """Screws without a sclerotic rim (a 0.5 mm whole halo, a 0.5 mm half halo, a 2 mm
    halo on 0.75 of the circumference) show no rim on any azimuth, so the rim reading
    leaves them as the kernel read them, and none is called a double halo."""
    vol, truth, anatomy, got = study
    cfg = Config()
    rays_list, _, tail, hu = M._study_tail(vol, anatomy, cfg, M._hu(vol))
    ts = {s["id"]: s for s in truth["screws"]}
    checked = 0
    for rays in rays_list:
        t = ts[rays.screw.id]
        if t["double_halo"]:
            continue
        checked += 1
        assert not got[t["id"]].double_halo, t["id"]
        rim, contrast = M._rim_widths(M.screw_profiles(vol, rays, hu), rays, tail, tail.bone_hu)
        assert np.isnan(rim).all() and (contrast < M.HALO_RIM_MIN_HU).all(), (t["id"], rim)
    assert checked == 3


def test_rim_needs_neighbouring_azimuths():
    """A rim surrounds a track: runs shorter than HALO_RIM_MIN_AZIMUTHS do not count
    (circular: a run may wrap past azimuth 0)."""
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
    assert M._in_long_runs(mask, 3).tolist() == [True, True, False, True, True, True,
                                                  False, False, True]
    assert not M._in_long_runs(np.array([1, 1, 0, 0, 1, 0], bool), 3).any()
    assert M._in_long_runs(np.ones(5, bool), 3).all()


def test_bright_spot_beside_a_halo_free_screw_is_not_a_double_halo():
    """Seed 7 at 0.35x0.35x0.6 mm: beside the halo-free L3-right two neighbouring azimuths
    show a rim-like peak 1.2 mm from the surface (a cortex close to the shaft); read as a
    rim it made the screw a double halo."""
    vol, truth = make_phantom(PhantomSpec(seed=7, spacing_mm=(0.35, 0.35, 0.6), noise_hu=25.0,
                                          streaks=True, blooming=True))
    t = {s["id"]: s for s in truth["screws"]}["L3-right"]
    assert t["halo_width_mm"] == 0.0
    screws, _, _, _ = M.measure_study(vol, truth_anatomy(truth), Config())
    m = {s.id: s for s in screws}["L3-right"]
    assert not m.double_halo
    assert m.halo_mean_mm <= 0.25


def _two_double_halos_spec(seed: int, spacing_mm) -> PhantomSpec:
    """The generator's study of ``seed`` with its first two screws (sorted ids) given a
    1.5 mm double halo, whole and on half the circumference."""
    from sample_data.phantom import resolve_spec

    ids = sorted(resolve_spec(PhantomSpec(seed=seed, spacing_mm=spacing_mm, noise_hu=25.0))["screws"])
    return PhantomSpec(seed=seed, spacing_mm=spacing_mm, noise_hu=25.0, streaks=True, blooming=True,
                       halo_widths_mm={ids[0]: 1.5, ids[1]: 1.5},
                       halo_fractions={ids[0]: 1.0, ids[1]: 0.5},
                       double_halo={ids[0]: True, ids[1]: True})


@pytest.mark.slow
@pytest.mark.parametrize("spacing_mm", [(0.5, 0.5, 1.0), COARSE_MM])
def test_whole_double_halos_are_called_loose(spacing_mm):
    """Seeds 0-3 with a whole 1.5 mm double halo each: every one called loose; halo_mean
    error within 0.15 mm on each at 0.5x0.5x1.0 mm, mean absolute error over the four within
    the issue's 0.25 mm at 0.8x0.8x1.5 mm. Before the rim reading (61a184b) 6 of these 8
    read 0.00-0.47 mm and were not called loose (coarse 0.00 / 0.02 / 0.30 / 0.23, standard
    seeds 1 and 3: 0.01 / 0.47)."""
    errors = []
    for seed in range(4):
        vol, truth = make_phantom(_two_double_halos_spec(seed, spacing_mm))
        screws, _, _, _ = M.measure_study(vol, truth_anatomy(truth), Config())
        got = {m.id: m for m in screws}
        whole = [t for t in truth["screws"] if t["double_halo"] and t["halo_fraction"] == 1.0]
        assert len(whole) == 1
        t = whole[0]
        m = got[t["id"]]
        assert m.loosening, (seed, t["id"], m.halo_mean_mm, m.halo_coverage)
        errors.append(abs(m.halo_mean_mm - t["halo_mean_mm"]))
    if spacing_mm[2] < 1.2:
        assert max(errors) <= 0.15, errors
    else:
        assert np.mean(errors) <= 0.25, errors


def test_isolated_rim_like_peaks_leave_the_tail_references_alone():
    """Uniform-set seed 6 at 0.35x0.35x0.6 mm, 40 HU: three 1.0-1.1 mm halos (whole, whole,
    0.75). Taking every azimuth with a rim-like peak out of the halo-free references, even
    isolated ones, left the metal tail to the halo rays and these read 0.52-0.70 mm; a rim
    excludes its rays only where it is seen on HALO_RIM_MIN_AZIMUTHS neighbouring azimuths."""
    from benchmarks.accuracy import uniform_set_overrides

    spec = PhantomSpec(seed=6, spacing_mm=(0.35, 0.35, 0.6), noise_hu=40.0, streaks=True,
                       blooming=True, **uniform_set_overrides(6))
    vol, truth = make_phantom(spec)
    screws, _, _, _ = M.measure_study(vol, truth_anatomy(truth), Config())
    got = {m.id: m for m in screws}
    for sid in ("L5-right", "S1-left", "S1-right"):
        t = {s["id"]: s for s in truth["screws"]}[sid]
        assert 1.0 <= t["halo_width_mm"] <= 1.15, (sid, t["halo_width_mm"])
        assert abs(got[sid].halo_mean_mm - t["halo_mean_mm"]) <= 0.25, (sid, got[sid].halo_mean_mm)


def _sector_case():
    """Synthetic median profiles (tail removed) on 12 azimuths, 0.1 mm samples: a rim read
    on azimuths 2-4 (width 2.0 mm, 420 HU over 2.2-2.8 mm, bone 250 HU beyond), its level
    still held (330 HU) on azimuths 5-7 and 0-1, and rim-free bone (255 HU) on 8-11."""
    from types import SimpleNamespace

    A = 12
    d = np.round(np.arange(-0.5, 4.51, 0.1), 6)
    g = np.full((A, d.size), 255.0)
    win = (d >= 2.2) & (d <= 2.8)
    for a in (2, 3, 4):
        g[a, win] = 420.0
    for a in (5, 6, 7, 0, 1):
        g[a, win] = 330.0
    rim_w = np.full(A, np.nan)
    rim_w[2:5] = (2.0, 2.1, 2.0)
    beyond = np.full(A, np.nan)
    beyond[2:5] = 250.0
    return g, SimpleNamespace(d_mm=d), rim_w, beyond


def test_rim_sector_carries_the_read_width_to_azimuths_that_hold_the_rim():
    g, rays, rim_w, beyond = _sector_case()
    out = M._rim_sector(g, rays, rim_w, beyond)
    # 330 HU lies 0.47 of the way from 250 to 420: held; the walk carries the width of the
    # run's end azimuth (2.0 from azimuth 4 upwards, 2.0 from azimuth 2 downwards)
    assert np.allclose(out[[5, 6, 7, 0, 1]], 2.0)
    assert np.allclose(out[2:5], rim_w[2:5])
    assert np.isnan(out[8:12]).all()  # rim-free bone: the sector ends at azimuth 8


def test_rim_sector_stops_at_the_first_azimuth_without_the_rim():
    g, rays, rim_w, beyond = _sector_case()
    g[6] = 255.0  # a gap: the rim is not held on azimuth 6, so 7 is not reached either
    out = M._rim_sector(g, rays, rim_w, beyond)
    assert out[5] == 2.0 and np.isnan(out[6]) and np.isnan(out[7])
    # the level cut is HALO_RIM_SECTOR_FRACTION of the way from the bone to the rim
    g2, _, _, _ = _sector_case()
    cut = 250.0 + M.HALO_RIM_SECTOR_FRACTION * (420.0 - 250.0)
    g2[(5, 6, 7, 0, 1), :] = np.where((rays.d_mm >= 2.2) & (rays.d_mm <= 2.8), cut - 1.0, 255.0)
    assert np.isnan(M._rim_sector(g2, rays, rim_w, beyond)[[5, 6, 7, 0, 1]]).all()


def test_rim_sector_needs_a_read_rim():
    g, rays, rim_w, beyond = _sector_case()
    none = np.full_like(rim_w, np.nan)
    assert np.isnan(M._rim_sector(g, rays, none, beyond)).all()


@pytest.mark.parametrize("seed,sid", [(19, "L5-left"), (27, "L4-left"), (34, "L5-right")])
def test_double_halos_on_three_quarters_read_loose_at_0p8mm(seed, sid):
    """The generator's 2 mm double halos on 0.75 of the circumference at 0.8x0.8x1.5 mm, 25
    HU, true geometry: the rim was read on 3-5 sharp azimuths only and the rest read no
    halo (coverage 0.35-0.38, not loose, no double halo: halo_mean 0.84-0.96 for 1.5). The
    rim's level carried round its sector (``_rim_sector``) reads them loose and double."""
    vol, truth = make_phantom(PhantomSpec(seed=seed, spacing_mm=COARSE_MM, noise_hu=25.0,
                                          streaks=True, blooming=True))
    t = {s["id"]: s for s in truth["screws"]}[sid]
    assert t["double_halo"] and t["halo_width_mm"] == 2.0 and t["halo_fraction"] == 0.75
    screws, _, _, _ = M.measure_study(vol, truth_anatomy(truth), Config())
    m = {s.id: s for s in screws}[sid]
    assert m.loosening and m.double_halo, (m.halo_coverage, m.double_halo)
    assert abs(m.halo_coverage - 0.75) <= 0.1, m.halo_coverage
    assert abs(m.halo_mean_mm - t["halo_mean_mm"]) <= 0.25, m.halo_mean_mm
