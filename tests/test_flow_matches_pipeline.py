"""The Prefect flow (one task per screw) gives exactly what the plain pipeline gives: the
per-screw tasks use the study's metal tail, not one estimated from a single screw."""
import json

import pytest

from pipeline.config import Config
from pipeline.detect import detect
from pipeline.loading import load_study
from pipeline.measure import measure_study
from sample_data.dicom_writer import write_dicom_study
from sample_data.phantom import PhantomSpec


@pytest.mark.slow
def test_flow_measurements_equal_measure_study(tmp_path, prefect_harness):
    from flows.analyze import analyze_flow

    study = tmp_path / "study"
    write_dicom_study(PhantomSpec(seed=2, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"),
                                  instrumented_levels=("L4-L5", "L5-S1")), study, extra_series=False)
    out = analyze_flow(str(study), str(tmp_path / "out"))
    doc = json.loads((tmp_path / "out" / "measurements.json").read_text())
    volume = load_study(study)
    screws, cages, levels, _ = measure_study(volume, detect(volume, Config()), Config())
    assert str(tmp_path / "out") in out
    flow_screws = {s["id"]: s for s in doc["screws"]}
    assert set(flow_screws) == {s.id for s in screws} and len(screws) == 6
    for s in screws:
        got = flow_screws[s.id]
        assert got["halo_mean_mm"] == pytest.approx(s.halo_mean_mm, abs=1e-9)
        assert got["halo_coverage"] == pytest.approx(s.halo_coverage, abs=1e-9)
        assert got["loosening"] == s.loosening
    flow_cages = {c["id"]: c for c in doc["cages"]}
    for c in cages:
        assert flow_cages[c.id]["subsidence_mm"] == pytest.approx(c.subsidence_mm, abs=1e-9)
    flow_levels = {lv["level"]: lv for lv in doc["levels"]}
    for lv in levels:
        assert flow_levels[lv.level]["bridging_fraction"] == pytest.approx(lv.bridging_fraction, abs=1e-9)
