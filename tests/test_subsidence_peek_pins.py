"""PEEK cage subsidence read from the cage's tantalum marker pins at coarse spacing
(0.8 x 0.8 x 1.5 mm) recovers the phantom's exact truth: at most 0.5 mm per endplate, grade
right where the truth is at least 0.3 mm from a cut (issue 3).

A marker pin is 1 mm thick, so on 1.5 mm slices the slice just beyond one of its ends can be
bright (2000-2900 HU) but not clipped, and the profile along the pin can take more than 2 mm
past the detection level to reach the clipped plateau. The measurement read the plateau
within those 2 mm, took such an end for an unclipped one (half-max) and read the pin 0.6-1.15
mm long there: seed 27's L3-L4 PEEK cage read its inferior subsidence 1.47 / 1.60 mm against
a true 0.84 mm. Ground truth (subsidence, marker pin ends) comes from ``sample_data.phantom``.
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks.accuracy import uniform_set_overrides  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.measure import marker_pin_ends, measure_cage  # noqa: E402
from sample_data.phantom import CageSpec, PhantomSpec, make_phantom, truth_anatomy  # noqa: E402

COARSE_MM = (0.8, 0.8, 1.5)
NOISE_HU = 25.0
# the inferior subsidence of one PEEK cage stepped by a tenth of a slice: its pins' lower
# ends sweep one whole slice phase (the pins run the cage's height less the inset)
SWEEP_INFERIOR_MM = tuple(round(0.3 + 0.15 * i, 2) for i in range(11))


def _assert_within_half_mm(vol, truth, cfg, material=None):
    anatomy = truth_anatomy(truth)
    cages = {c.id: c for c in anatomy.cages}
    checked = 0
    for tc in truth["cages"]:
        if material is not None and tc["material"] != material:
            continue
        m, _ = measure_cage(vol, cages[tc["id"]], anatomy, cfg)
        err_sup = m.subsidence_superior_mm - tc["subsidence_superior_mm"]
        err_inf = m.subsidence_inferior_mm - tc["subsidence_inferior_mm"]
        assert abs(err_sup) <= 0.5 and abs(err_inf) <= 0.5, (tc["id"], tc["subsidence_superior_mm"],
                                                              tc["subsidence_inferior_mm"], err_sup, err_inf)
        if all(abs(tc["subsidence_mm"] - cut) >= 0.3 for cut in cfg.criteria.subsidence_grades_mm):
            assert m.subsidence_grade == tc["subsidence_grade"], (tc["id"], m.subsidence_mm,
                                                                  tc["subsidence_mm"])
        checked += 1
    return checked


@pytest.mark.parametrize("halo_set", ["default", "uniform"])
def test_seed27_peek_cages_within_half_a_millimetre_per_endplate_at_coarse_spacing(halo_set):
    # seed 27 has one PEEK cage at L3-L4 (true 0.45 / 0.84 mm) and one at L4-L5 (0.52 / 3.57)
    cfg = Config()
    kw = uniform_set_overrides(27) if halo_set == "uniform" else {}
    vol, truth = make_phantom(PhantomSpec(seed=27, spacing_mm=COARSE_MM, noise_hu=NOISE_HU,
                                          streaks=True, blooming=True, **kw))
    assert _assert_within_half_mm(vol, truth, cfg, material="peek") == 2


def test_seed27_peek_cages_within_half_a_millimetre_on_an_extended_range_study():
    # nothing is clipped on an extended-range scanner: the pins keep their half-max ends
    # (judging the clip over the whole pin must not change them; taking the whole pin's
    # maximum as their plateau read this study's L3-L4 cage 0.55 mm off)
    cfg = Config()
    vol, truth = make_phantom(PhantomSpec(seed=27, spacing_mm=COARSE_MM, noise_hu=NOISE_HU,
                                          streaks=True, blooming=True, extended_hu=True))
    assert float(np.max(vol.hu)) > 4000.0
    assert _assert_within_half_mm(vol, truth, cfg, material="peek") == 2


@pytest.fixture(scope="module")
def pin_phase_sweep():
    """One PEEK cage at L3-L4 (0.5 mm superior subsidence), its inferior subsidence stepped
    through ``SWEEP_INFERIOR_MM``: (volume, truth) per step."""
    out = []
    for inf in SWEEP_INFERIOR_MM:
        spec = PhantomSpec(seed=0, spacing_mm=COARSE_MM, noise_hu=NOISE_HU, streaks=True, blooming=True,
                           vertebrae=("L3", "L4", "L5"), instrumented_levels=("L3-L4",),
                           cages={"L3-L4": CageSpec("peek", 0.5, inf, 1)})
        out.append(make_phantom(spec))
    return out


def test_marker_pin_ends_not_read_a_slice_long_at_any_slice_phase(pin_phase_sweep):
    # the old reading put a lower pin end up to 1.17 mm long (its centre 0.44 mm low) on this
    # sweep; what is left is the slice-phase error of a clipped thin pin's edge on 1.5 mm
    # slices (ends -0.14 to +0.56 mm here, -0.25 to +0.46 on seeds 0-35), which the pin's
    # centre halves (-0.14 to +0.22 mm)
    end_err, centre_err = [], []
    for vol, truth in pin_phase_sweep:
        anatomy = truth_anatomy(truth)
        (tc,), (cage,) = truth["cages"], anatomy.cages
        axis = np.asarray(cage.axes[0])
        pins = marker_pin_ends(vol, np.ascontiguousarray(vol.hu, dtype=np.float32), cage)
        assert len(pins) == 4
        for ends in pins:
            assert ends[1.0] is not None and ends[-1.0] is not None
            centre = 0.5 * (ends[1.0] + ends[-1.0])
            # the nearest true marker; its ends are [-axes[0] end, +axes[0] end]
            lo, hi = min((np.asarray(m, float) for m in tc["markers_lps_mm"]),
                         key=lambda m: float(np.linalg.norm(0.5 * (m[0] + m[1]) - centre)))
            end_err += [float((ends[1.0] - hi) @ axis), float((lo - ends[-1.0]) @ axis)]  # + reads long
            centre_err.append(float((centre - 0.5 * (lo + hi)) @ axis))
    assert len(centre_err) == 4 * len(SWEEP_INFERIOR_MM)
    assert np.abs(end_err).max() <= 0.6, np.round(end_err, 2)
    assert np.abs(centre_err).max() <= 0.3, np.round(centre_err, 2)


def test_peek_subsidence_within_half_a_millimetre_at_every_slice_phase_of_its_pins(pin_phase_sweep):
    cfg = Config()
    for vol, truth in pin_phase_sweep:
        assert _assert_within_half_mm(vol, truth, cfg) == 1
