"""Calls near their cut are flagged for the surgeon (pipeline.borderline).

A number closer to its cut than the measurement's error can fall either side of it; the
report says which calls those are. The margins are the measured 90th-percentile errors of
README "Accuracy"; the phantom test below checks, on detected geometry at 0.8x0.8x1.5 mm,
that they hold and that the wrong loosening calls are the flagged ones.
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks.accuracy import SPACINGS, uniform_set_overrides  # noqa: E402
from pipeline.borderline import (  # noqa: E402
    MEASURED_ERRORS,
    borderline_notes,
    lucent_under_threshold,
    measured_error,
    near_cut,
    no_reference_screw_note,
)
from pipeline.config import Config, Criteria  # noqa: E402
from pipeline.results import CageMeasurement, LevelMeasurement, ScrewMeasurement  # noqa: E402

COARSE = (0.8, 0.8, 1.5)
FINE = (0.35, 0.35, 0.6)


def _screw(sid, coverage, rays_used=1000, mean_mm=1.0):
    return ScrewMeasurement(id=sid, vertebra="L4", side="left", head_lps_mm=(0, 0, 0),
                            tip_lps_mm=(0, 40, 0), length_mm=40.0, diameter_mm=6.5,
                            halo_mean_mm=mean_mm, halo_max_mm=1.5 * mean_mm, halo_coverage=coverage,
                            loosening=coverage >= 0.5, rays_used=rays_used)


def _cage(cid, superior_mm, inferior_mm):
    grade = Criteria().subsidence_grade(max(superior_mm, inferior_mm))
    return CageMeasurement(id=cid, level="L4-L5", material="titanium", centroid_lps_mm=(0, 0, 0),
                           subsidence_superior_mm=superior_mm, subsidence_inferior_mm=inferior_mm,
                           subsidence_grade=grade)


def _level(name, fraction):
    return LevelMeasurement(level=name, center_lps_mm=(0, 0, 0), instrumented=True,
                            bridging_fraction=fraction, fusion=Criteria().fusion_class(fraction))


def test_spacing_classes_follow_the_coarsest_voxel_extent():
    assert measured_error(FINE) is MEASURED_ERRORS[0]
    assert measured_error((0.5, 0.5, 1.0)) is MEASURED_ERRORS[1]
    assert measured_error(COARSE) is MEASURED_ERRORS[2]
    assert measured_error((0.78, 0.78, 3.0)) is None


def test_calls_within_the_measured_error_of_their_cut_are_flagged():
    # D reads halo-free, so the study-wide note on the blooming calibration stays out
    screws = [_screw("A", 0.47), _screw("B", 0.25, mean_mm=0.3), _screw("C", 0.47, rays_used=0),
              _screw("D", 0.0, mean_mm=0.05)]
    cages = [_cage("cage1", 2.1, 0.4), _cage("cage2", 3.0, 0.2)]
    levels = [_level("L4-L5", 0.51), _level("L5-S1", 0.30)]
    notes = borderline_notes(screws, cages, levels, Criteria(), COARSE)
    assert [n.split(":")[0] for n in notes] == ["Screw A", "Cage cage1", "Level L4-L5"]
    assert "47 % against the 50 % cut" in notes[0]
    assert "superior 2.1 mm" in notes[1] and "inferior" not in notes[1]
    # the finer the voxels, the narrower the band: 0.47 still, 0.40 no longer
    # (lucencies under half the width threshold: the lucency flag stays out)
    fine = borderline_notes([_screw("A", 0.47, mean_mm=0.4), _screw("D", 0.40, mean_mm=0.3)], [], [],
                            Criteria(), FINE)
    assert [n.split(":")[0] for n in fine] == ["Screw A"]


def test_a_lucency_under_the_width_threshold_is_flagged_at_coarse_voxels():
    """At 0.8x0.8x1.5 mm a halo just over the 1 mm width threshold reads partly under it, so
    its coverage can lie far from the cut; a screw not called loose whose lucency averages
    at least 0.4 of the width threshold is flagged (0.45 at 0.5x0.5x1.0 mm, 0.5 at
    0.35x0.35x0.6 mm); not a loose screw; the width threshold is the site's."""
    lucent = _screw("E", 0.10, mean_mm=0.45)
    free = _screw("D", 0.0, mean_mm=0.05)  # keeps the study-wide no-halo-free note out
    notes = borderline_notes([lucent, _screw("F", 0.10, mean_mm=0.35), free], [], [], Criteria(),
                             COARSE)
    assert [n.split(":")[0] for n in notes] == ["Screw E"]
    assert "0.45 mm" in notes[0] and "1 mm width threshold" in notes[0]
    assert not borderline_notes([lucent, free], [], [], Criteria(), FINE)
    assert [n.split(":")[0] for n in borderline_notes([_screw("E", 0.1, mean_mm=0.52), free], [], [],
                                                       Criteria(), FINE)] == ["Screw E"]
    assert [n.split(":")[0] for n in borderline_notes([lucent, free], [], [], Criteria(),
                                                       (0.5, 0.5, 1.0))] == ["Screw E"]
    assert not borderline_notes([_screw("E", 0.1, mean_mm=0.42), free], [], [], Criteria(),
                                (0.5, 0.5, 1.0))
    assert not borderline_notes([_screw("G", 0.9, mean_mm=1.5), free], [], [], Criteria(), COARSE)
    wider = Criteria(halo_threshold_mm=1.5)
    assert not borderline_notes([lucent, free], [], [], wider, COARSE)
    assert "1.5 mm width threshold" in borderline_notes([_screw("E", 0.1, mean_mm=0.65), free], [], [],
                                                        wider, COARSE)[0]


def test_cuts_come_from_the_site_criteria():
    crit = Criteria(halo_coverage_for_loosening=0.3)
    assert borderline_notes([_screw("B", 0.25)], [], [], crit, FINE)
    assert not borderline_notes([_screw("A", 0.47, mean_mm=0.4)], [], [], crit, FINE)


def test_voxels_coarser_than_measured_get_one_note_saying_so():
    notes = borderline_notes([_screw("A", 0.9)], [], [], Criteria(), (0.78, 0.78, 3.0))
    assert len(notes) == 1 and "3.00 mm" in notes[0] and "check every call" in notes[0]


def test_a_study_without_a_halo_free_screw_gets_a_note_at_coarse_voxels():
    """No screw reading halo-free (halo_mean under 0.3 mm and coverage under 0.25): the
    metal's blooming had no clean bone to be calibrated on. The note comes only where that
    was measured to matter (voxels coarser than 1 mm) and never for unmeasured screws."""
    loose = [_screw("A", 0.9), _screw("B", 0.6, mean_mm=0.4)]
    note = no_reference_screw_note(loose, COARSE)
    assert note and "no halo-free screw" in note and "check every screw" in note
    assert borderline_notes(loose, [], [], Criteria(), COARSE)[0] == note
    assert no_reference_screw_note(loose + [_screw("C", 0.1, mean_mm=0.2)], COARSE) is None
    assert no_reference_screw_note(loose, (0.5, 0.5, 1.0)) is None
    assert no_reference_screw_note([_screw("A", 0.9, rays_used=0)], COARSE) is None
    assert no_reference_screw_note([], COARSE) is None
    # a thin lucency round the screw is still not a reference: mean 0.3 mm or coverage 0.25
    assert no_reference_screw_note([_screw("T", 0.0, mean_mm=0.3)], COARSE)
    assert no_reference_screw_note([_screw("T", 0.25, mean_mm=0.1)], COARSE)


def test_study_wide_loosening_at_coarse_voxels_gets_the_note():
    """A 1.5 mm halo round every screw (study-wide loosening, as in infection), seed 1 at
    0.8x0.8x1.5 mm, 25 HU, true geometry: the halo-free rays that calibrate the blooming
    are haloed, and halos read narrow (1.5 mm whole halos read 0.9-1.2 mm here; with
    detected geometry 2 of 4 screws read under the loosening cut). The study says so."""
    from pipeline.measure import measure_study
    from sample_data.phantom import PhantomSpec, make_phantom, resolve_spec, truth_anatomy

    ids = list(resolve_spec(PhantomSpec(seed=1))["screws"])
    vol, truth = make_phantom(PhantomSpec(
        seed=1, spacing_mm=SPACINGS["coarse"], noise_hu=25.0, streaks=True, blooming=True,
        halo_widths_mm={i: 1.5 for i in ids}, halo_fractions={i: 1.0 for i in ids},
        double_halo={i: False for i in ids}))
    screws, _, _, _ = measure_study(vol, truth_anatomy(truth), Config())
    assert all(s.halo_mean_mm < 1.5 for s in screws)  # the under-read the note warns of
    assert no_reference_screw_note(screws, vol.spacing_mm)


@pytest.fixture(scope="module")
def coarse_detected():
    """(rows, screws): rows (truth coverage, measured coverage, truth loosening, measured
    loosening) per screw and the measured screws themselves, in the same order;
    detected geometry, 0.8x0.8x1.5 mm, 25 HU, streaks and blooming, seeds 0-11 of both
    phantom sets (ground truth: sample_data)."""
    from pipeline.detect import detect
    from pipeline.measure import measure_study
    from sample_data.phantom import PhantomSpec, make_phantom

    rows, measured = [], []
    for seed in range(12):
        for kw in ({}, uniform_set_overrides(seed)):
            vol, truth = make_phantom(PhantomSpec(seed=seed, spacing_mm=SPACINGS["coarse"],
                                                  noise_hu=25.0, streaks=True, blooming=True, **kw))
            screws, _, _, _ = measure_study(vol, detect(vol, Config()), Config())
            got = {s.id: s for s in screws}
            for t in truth["screws"]:
                m = got[t["id"]]
                rows.append((t["halo_coverage"], m.halo_coverage, t["loosening"], m.loosening))
                measured.append(m)
    return np.array(rows, float), measured


def _coverage_band(screws, err) -> np.ndarray:
    """Screws whose coverage the product flags as near the loosening cut (borderline_findings)."""
    cut = Criteria().halo_coverage_for_loosening
    return np.array([near_cut(s.halo_coverage, (cut,), err.coverage) for s in screws])


def test_coverage_margin_holds_and_the_wrong_calls_gather_inside_it(coarse_detected):
    """At 0.8x0.8x1.5 mm the coverage margin (0.19) is the measured 90th percentile over
    seeds 0-47; on seeds 0-11 90 % of screws read within it (at least 80 % asserted). The
    flag must mark where the calls fail: here 14 % of flagged screws' calls are wrong
    against 3.5 % of the others (at least 2.5x asserted, and at most 5 % outside)."""
    rows, screws = coarse_detected
    cov_t, cov_m, loose_t, loose_m = rows.T
    margin = measured_error(COARSE).coverage
    assert np.mean(np.abs(cov_m - cov_t) <= margin) >= 0.80
    wrong = loose_t != loose_m
    flagged = _coverage_band(screws, measured_error(COARSE))
    assert flagged.any() and (~flagged).any()
    assert np.mean(wrong[~flagged]) <= 0.05, wrong[~flagged].sum()
    assert np.mean(wrong[flagged]) >= 2.5 * np.mean(wrong[~flagged]), (wrong[flagged].sum(), flagged.sum())


def test_the_lucency_flag_catches_wrong_calls_the_coverage_band_leaves(coarse_detected):
    """Outside the coverage band 3 of 86 calls are wrong on seeds 0-11 (halos 1.0-1.4 mm read
    coverage 0.04-0.30); a screw not called loose with a lucency of 0.4 mm or more on
    average is flagged too: 2 of those 3 are, for 7 more flagged screws, and 1 of 79 calls
    outside both flags is wrong (at most 2.5 % asserted; seeds 0-47: 4 of 323)."""
    rows, screws = coarse_detected
    _, _, loose_t, loose_m = rows.T
    err = measured_error(COARSE)
    wrong = loose_t != loose_m
    band = _coverage_band(screws, err)
    lucent = ~band & np.array([lucent_under_threshold(s, Criteria(), err) for s in screws])
    assert (wrong & lucent).sum() >= 1
    assert np.mean(wrong[lucent]) > np.mean(wrong[~band & ~lucent])
    assert np.mean(wrong[~band & ~lucent]) <= 0.025, (wrong & ~band & ~lucent).sum()


def test_report_and_review_page_badge_the_borderline_findings():
    """The badge stands beside the call where the surgeon reads and confirms it: in the
    report's per-level table and finding blocks, and on the review page."""
    from pipeline.report_html import finding_sections, level_table
    from pipeline.report_json import build_measurements
    from pipeline.results import StudyResult
    from pipeline.review import render_page

    result = StudyResult(screws=(_screw("L4-left", 0.47), _screw("L4-right", 0.25, mean_mm=0.2)),
                         cages=(),
                         levels=(_level("L4-L5", 0.51),),
                         input={"spacing_mm": list(COARSE), "shape": [64, 64, 40]},
                         criteria=Criteria().to_json())
    badge = '<span class="badge border">borderline</span>'
    for html in (level_table(result), finding_sections(result, {})):
        assert html.count(badge) == 2
        assert badge not in html.split("L4-right")[1].split("<br>")[0]
    page = render_page(build_measurements(result), {}, token="t")
    blocks = {b.split('"')[0]: b for b in page.split('data-key="')[1:]}
    assert badge in blocks["screw:L4-left"] and badge in blocks["level:L4-L5"]
    assert badge not in blocks["screw:L4-right"]
    # without a recorded spacing nothing is badged (the margins depend on it)
    assert badge not in level_table(StudyResult(result.screws, (), result.levels, input={},
                                                criteria=Criteria().to_json()))
