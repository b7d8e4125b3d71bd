"""Segmental lordosis and disc height against phantom truth."""
import pytest

from pipeline.alignment import adjacent_levels, disc_height_mm, segmental_lordosis_deg
from sample_data.phantom import PhantomSpec, make_phantom, resolve_spec, truth_anatomy


@pytest.fixture(scope="module")
def coarse_truth():
    spec = PhantomSpec(seed=11, spacing_mm=(0.8, 0.8, 1.5), noise_hu=0.0, streaks=False)
    _, truth = make_phantom(spec)
    return truth


def test_segmental_lordosis_equals_difference_of_true_tilts(coarse_truth):
    anatomy = truth_anatomy(coarse_truth)
    by_name = {v.name: v for v in anatomy.vertebrae}
    tilt = {v["name"]: v["tilt_deg"] for v in coarse_truth["vertebrae"]}
    for lv in anatomy.levels:
        got = segmental_lordosis_deg(by_name[lv.upper], by_name[lv.lower])
        assert got == pytest.approx(tilt[lv.lower] - tilt[lv.upper], abs=1e-6)


def test_lumbosacral_segment_is_lordotic(coarse_truth):
    anatomy = truth_anatomy(coarse_truth)
    by_name = {v.name: v for v in anatomy.vertebrae}
    assert segmental_lordosis_deg(by_name["L5"], by_name["S1"]) > 0


def test_disc_height_equals_truth(coarse_truth):
    anatomy = truth_anatomy(coarse_truth)
    by_name = {v.name: v for v in anatomy.vertebrae}
    truth_h = {lv["level"]: lv["disc_height_mm"] for lv in coarse_truth["levels"]}
    for lv in anatomy.levels:
        assert disc_height_mm(lv, by_name[lv.upper], by_name[lv.lower]) == pytest.approx(
            truth_h[lv.name], abs=0.3)


def test_adjacent_levels_border_the_fusion():
    names = ["L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    assert adjacent_levels(names, {"L4-L5"}) == {"L3-L4", "L5-S1"}
    assert adjacent_levels(names, {"L4-L5", "L5-S1"}) == {"L3-L4"}
    assert adjacent_levels(names, set()) == set()


@pytest.mark.parametrize("spacing", ["standard", "coarse"])
def test_lordosis_on_detected_endplates_within_2_degrees(spacing):
    from pipeline.config import Config
    from pipeline.detect import detect
    from sample_data.phantom import spacing_specs

    vol, truth = make_phantom(spacing_specs(seed=5, noise_hu=25.0)[spacing])
    anatomy = detect(vol, Config())
    by_name = {v.name: v for v in anatomy.vertebrae}
    tilt = {v["name"]: v["tilt_deg"] for v in truth["vertebrae"]}
    assert len(anatomy.levels) == len(truth["levels"])
    for lv in anatomy.levels:
        got = segmental_lordosis_deg(by_name[lv.upper], by_name[lv.lower])
        assert got == pytest.approx(tilt[lv.lower] - tilt[lv.upper], abs=2.0), lv.name
