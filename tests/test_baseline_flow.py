"""`fusionct analyze FOLLOWUP --baseline PRIOR` end to end on a DICOM phantom pair: every screw
gets migration_mm, the migrated one is found, cages get subsidence_change_mm."""
import json

import numpy as np
import pytest

from sample_data.dicom_writer import write_dicom_study
from sample_data.phantom import PhantomSpec, follow_up_spec, pinned_spec

MIGRATED = {"L5-left": (0.0, 0.6, 0.4)}  # 0.72 mm


@pytest.mark.slow
def test_analyze_with_baseline_reports_change(tmp_path, prefect_harness):
    from flows.cli import main

    prior = pinned_spec(PhantomSpec(seed=31, spacing_mm=(0.5, 0.5, 1.0), vertebrae=("L4", "L5", "S1"),
                                    instrumented_levels=("L4-L5",)))
    follow = follow_up_spec(prior, vertebra_shifts_mm={"L4": (1.0, -0.5, 2.0), "L5": (0.8, -0.3, 2.0)},
                            screw_shifts_mm=MIGRATED, added_subsidence_mm={"L4-L5": (0.0, 1.5)})
    write_dicom_study(prior, tmp_path / "prior", extra_series=False)
    write_dicom_study(follow, tmp_path / "now", extra_series=False)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "now"), "-o", str(out), "--baseline", str(tmp_path / "prior")]) == 0
    doc = json.loads((out / "measurements.json").read_text())
    assert doc["baseline"]["study_instance_uid"] != doc["input"]["study_instance_uid"]
    screws = {s["id"]: s for s in doc["screws"]}
    assert set(screws) == {"L4-left", "L4-right", "L5-left", "L5-right"}
    for sid, s in screws.items():
        truth = float(np.linalg.norm(MIGRATED.get(sid, (0.0, 0.0, 0.0))))
        assert s["migration_mm"] == pytest.approx(truth, abs=0.2), sid
        assert s["halo_change_mm"] is not None
    assert doc["cages"][0]["subsidence_change_mm"] == pytest.approx(1.5, abs=0.5)
    levels = {lv["level"]: lv for lv in doc["levels"]}
    assert levels["L4-L5"]["disc_height_change_mm"] is not None
