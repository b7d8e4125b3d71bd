"""The steps the plain pipeline now runs side by side give what they give one after the
other: measure_and_integrity (halo / subsidence / bridging measurement beside the breach and
fracture checks) equals measure_study followed by integrity_step, value for value, on a
detected phantom with breaching screws; and the whole plain analysis of a study with a
fractured rod still reports its four screws' breach grades and the rod's fracture."""
from __future__ import annotations

import json
import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import pytest

from pipeline.config import Config
from pipeline.detect import detect
from pipeline.measure import measure_study
from pipeline.study import (integrity_findings, integrity_step, kernels_thread_safe, measure_and_integrity,
                            with_breach)
from sample_data.phantom import PhantomSpec, make_phantom

# the breach set and seed tests/test_integrity_detected.py reads at coarse spacing
BREACHES = {"L4-left": (1.0, "lateral"), "L4-right": (3.0, "medial"),
            "L5-left": (5.0, "lateral"), "L5-right": (7.0, "medial")}


@pytest.fixture(scope="module")
def case():
    vol, truth = make_phantom(PhantomSpec(seed=3, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"),
                                          instrumented_levels=("L4-L5",), pedicle_breaches=BREACHES))
    return vol, truth, detect(vol, Config())


def test_side_by_side_equals_one_after_the_other(case):
    vol, truth, anatomy = case
    config = Config()
    screws, cages, levels, _ = measure_study(vol, anatomy, config)
    want_screws, want_fractures = integrity_step(vol, anatomy, screws, config)
    got_screws, got_cages, got_levels, evidence, got_fractures = measure_and_integrity(vol, anatomy, config)
    assert got_screws == want_screws  # every field, halo and breach, identical
    assert got_cages == cages and got_levels == levels
    assert list(got_fractures) == list(want_fractures)
    assert set(evidence) >= {s.id for s in got_screws}
    # and it is the phantom's hardware: the planted breaches are read as breaches
    by_id = {s.id: s for s in got_screws}
    assert set(by_id) == {s["id"] for s in truth["screws"]}
    for sid, (mm, direction) in BREACHES.items():
        if mm >= 2.0:  # a 1 mm breach is within the cortex's reading tolerance
            assert by_id[sid].breach_direction == direction
        assert abs(by_id[sid].breach_mm - mm) <= 0.8


def test_breaches_from_geometry_fill_only_measured_screws(case):
    vol, _, anatomy = case
    breaches, _ = integrity_findings(vol, anatomy, Config())
    assert set(breaches) == {s.id for s in anatomy.screws}
    screws, _, _, _ = measure_study(vol, anatomy, Config())
    filled = with_breach(screws, breaches)
    assert [s.id for s in filled] == [s.id for s in screws]
    assert all(s.breach_grade in "ABCDE" for s in filled)
    # a screw without an entry is left as it is
    assert with_breach(screws[:1], {}) == screws[:1]


def test_kernels_allow_two_threads_here():
    # the environment the project ships with (numba's OpenMP layer) runs both steps at once
    assert kernels_thread_safe() is True


def test_plain_analysis_writes_breaches_and_fractures(case, tmp_path):
    from pipeline.study import analyze_study
    from sample_data import write_dicom_study

    spec = PhantomSpec(seed=5, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"),
                       instrumented_levels=("L4-L5",), rod_fractures={"rod-left": (0.6, 3.0)})
    write_dicom_study(spec, tmp_path / "study", extra_series=False)
    out = analyze_study(tmp_path / "study", tmp_path / "out", Config())
    doc = json.loads((out / "measurements.json").read_text())
    assert len(doc["screws"]) == 4 and all(s["breach_grade"] in "ABCDE" for s in doc["screws"])
    assert [f["kind"] for f in doc.get("fractures", [])] == ["rod"]
    assert (out / "report_sr.dcm").exists()
