"""Change since a prior CT: screw migration relative to its vertebra, on phantom pairs with
known motion (patient repositioned between the scans, two screws migrated)."""
import numpy as np
import pytest

from pipeline.config import Config
from pipeline.followup import compare_with_prior, register_vertebra, to_sitk
from sample_data.phantom import PhantomSpec, follow_up_spec, make_phantom, pinned_spec, truth_anatomy

REPOSITION_MM = {"L4": (1.2, -1.5, 2.5), "L5": (0.6, -0.4, 2.0), "S1": (0.0, 0.3, 1.8)}
ROTATE_DEG = {"L4": (2.0, 0.0, 1.0), "L5": (-1.0, 0.5, 0.0)}
MIGRATE_MM = {"L4-left": (0.0, 0.45, 0.2), "L5-right": (0.5, -0.6, 0.4)}  # 0.49 mm and 0.88 mm


@pytest.fixture(scope="module")
def pair():
    prior = pinned_spec(PhantomSpec(seed=21, spacing_mm=(0.5, 0.5, 1.0), noise_hu=20.0,
                                    vertebrae=("L4", "L5", "S1"), instrumented_levels=("L4-L5",)))
    follow = follow_up_spec(prior, vertebra_shifts_mm=REPOSITION_MM, vertebra_rotations_deg=ROTATE_DEG,
                            screw_shifts_mm=MIGRATE_MM, added_subsidence_mm={"L4-L5": (0.0, 1.0)})
    return make_phantom(prior), make_phantom(follow)


def _true_migration(screw_id):
    return float(np.linalg.norm(MIGRATE_MM.get(screw_id, (0.0, 0.0, 0.0))))


def test_vertebra_registration_recovers_repositioning(pair):
    (pv, pt), (cv, ct) = pair
    pa, ca = truth_anatomy(pt), truth_anatomy(ct)
    P, C = to_sitk(pv), to_sitk(cv)
    prior_screw = {s.id: s for s in pa.screws}
    for v_prior, v_now in zip(pa.vertebrae, ca.vertebrae):
        if v_prior.name == "S1":
            continue
        tx = register_vertebra(P, C, v_prior, v_now, Config().metal_threshold_hu)
        # a screw that did not migrate moved exactly with its vertebra
        for s in ca.screws:
            if s.vertebra == v_now.name and s.id not in MIGRATE_MM:
                moved = tx.apply(np.array(prior_screw[s.id].tip_lps_mm))
                assert np.linalg.norm(moved - np.array(s.tip_lps_mm)) < 0.2


def test_migration_within_0p2mm_and_every_half_mm_move_detected(pair):
    from pipeline.measure import measure_study

    (pv, pt), (cv, ct) = pair
    pa, ca = truth_anatomy(pt), truth_anatomy(ct)
    config = Config()
    ps, pc, pl, _ = measure_study(pv, pa, config)
    cs, cc, cl, _ = measure_study(cv, ca, config)
    screws, cages, levels, notes = compare_with_prior(pv, pa, ps, pc, pl, cv, ca, cs, cc, cl,
                                                      config.metal_threshold_hu)
    assert notes == []
    for s in screws:
        truth = _true_migration(s.id)
        assert s.migration_mm is not None
        assert abs(s.migration_mm - truth) <= 0.2, (s.id, s.migration_mm, truth)
        if truth >= 0.5 - 0.02:  # the planted moves: 0.49 and 0.88 mm
            assert s.migration_mm >= 0.3, (s.id, s.migration_mm)
    change = {c.level: c.subsidence_change_mm for c in cages}
    assert change["L4-L5"] == pytest.approx(1.0, abs=0.5)
