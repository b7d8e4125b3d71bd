"""report_sr.dcm: a TID 1500 Comprehensive 3D SR that dciodvfy accepts, dsrdump reads, that
references the source CT series and carries the phantom's exact values."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from pipeline.outputs import write_outputs
from pipeline.report_sr import PRIVATE_SCHEME, build_sr, read_source_headers, sr_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers live in test_outputs.py
from test_outputs import PATIENT_ID, PATIENT_NAME, dicom_study, truth_evidence, truth_result  # noqa: E402


@pytest.fixture(scope="module")
def sr_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    vol, truth = dicom_study(tmp)
    out = write_outputs(tmp / "out", truth_result(truth), truth_evidence(truth), vol)
    return out / "report_sr.dcm", vol, truth


def _num_items(ds) -> list[tuple[str, str, float, str, str]]:
    """(group tracking identifier, concept meaning, value, unit code, concept scheme) for
    every NUM in every measurement group."""
    out = []

    def walk(items, tracking):
        for it in items:
            name = it.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in it else None
            if it.ValueType == "TEXT" and name is not None and name.CodeMeaning == "Tracking Identifier":
                tracking = it.TextValue
        for it in items:
            if it.ValueType == "NUM":
                mv = it.MeasuredValueSequence[0]
                name = it.ConceptNameCodeSequence[0]
                out.append((tracking, name.CodeMeaning, float(mv.NumericValue),
                            mv.MeasurementUnitsCodeSequence[0].CodeValue, name.CodingSchemeDesignator))
            if "ContentSequence" in it:
                walk(it.ContentSequence, tracking)

    walk(ds.ContentSequence, None)
    return out


def _code_items(ds) -> list[tuple[str, str]]:
    out = []

    def walk(items):
        for it in items:
            if it.ValueType == "CODE":
                out.append((it.ConceptNameCodeSequence[0].CodeMeaning, it.ConceptCodeSequence[0].CodeMeaning))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed")
def test_sr_passes_dciodvfy_without_errors(sr_study):
    path, _, _ = sr_study
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    assert any("Comprehensive3DSR" in ln for ln in lines), lines[:5]
    errors = [ln for ln in lines if "Error" in ln]
    assert errors == []


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dsrdump (dcmtk) not installed")
def test_dsrdump_parses_and_shows_the_measurements(sr_study):
    path, _, truth = sr_study
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "Comprehensive 3D SR" in text
    assert "Verification Flag   : UNVERIFIED" in text
    assert "Imaging Measurement Report" in text
    for s in truth["screws"]:
        assert f'"Tracking Identifier")="{s["id"]}"' in text
    loose = next(s for s in truth["screws"] if s["loosening"])
    assert "Peri-screw lucency halo mean width" in text
    assert f'="{loose["halo_mean_mm"]:g}"' in text or f'="{loose["halo_mean_mm"]}"' in text
    cage = max(truth["cages"], key=lambda c: c["subsidence_mm"])
    assert f'"Cage subsidence")="{cage["subsidence_mm"]:g}" (mm,UCUM' in text
    assert '"Cage subsidence grade")=(FCT032,99FUSIONCT,"Severe subsidence")' in text
    assert "Bridging bone fraction of disc space" in text and "({ratio},UCUM" in text


def test_sr_values_equal_the_phantom_truth(sr_study):
    path, _, truth = sr_study
    ds = pydicom.dcmread(path)
    nums = _num_items(ds)
    got = {(t, m): (v, u) for t, m, v, u, _ in nums}
    for s in truth["screws"]:
        t = s['id']
        assert got[(t, "Peri-screw lucency halo mean width")] == (pytest.approx(s["halo_mean_mm"]), "mm")
        assert got[(t, "Peri-screw lucency halo 95th percentile width")][0] == pytest.approx(s["halo_max_mm"])
        assert got[(t, "Peri-screw lucency halo coverage")] == (pytest.approx(s["halo_coverage"]), "{ratio}")
    for c in truth["cages"]:
        t = c['id']
        assert got[(t, "Cage subsidence through superior endplate")][0] == pytest.approx(c["subsidence_superior_mm"])
        assert got[(t, "Cage subsidence through inferior endplate")][0] == pytest.approx(c["subsidence_inferior_mm"])
        assert got[(t, "Cage subsidence")][0] == pytest.approx(c["subsidence_mm"])
    for lv in truth["levels"]:
        assert got[(lv['level'], "Bridging bone fraction of disc space")][0] == pytest.approx(
            lv["bridging_fraction"])
    codes = _code_items(ds)
    n_loose = sum(s["loosening"] for s in truth["screws"])
    assert sum(1 for n, v in codes if n == "Pedicle screw loosening" and v == "Present") == n_loose
    assert sum(1 for n, v in codes if n == "Interbody fusion status") == len(truth["levels"])
    assert ("Finding Site", "Level of L4/L5 intervertebral disc") in codes
    assert ("Laterality", "Left") in codes


def _tracking_uids(ds) -> dict[str, str]:
    """Tracking Identifier text -> Tracking Unique Identifier, over the whole content tree."""
    out = {}

    def walk(items):
        ident = uid = None
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if name == "Tracking Identifier":
                ident = it.TextValue
            elif name == "Tracking Unique Identifier":
                uid = it.UID
            if "ContentSequence" in it:
                walk(it.ContentSequence)
        if ident is not None and uid is not None:
            out[ident] = uid

    walk(ds.ContentSequence)
    return out


def test_tracking_uids_are_the_same_in_every_build_of_the_study(sr_study, tmp_path):
    """A finding keeps its tracking UID from the draft SR to the verified one (both are
    built from the same study), so they are derived from the study and the finding, not drawn."""
    path, vol, truth = sr_study
    first = _tracking_uids(pydicom.dcmread(path))
    again = write_outputs(tmp_path / "again", truth_result(truth), truth_evidence(truth), vol)
    second = _tracking_uids(pydicom.dcmread(again / "report_sr.dcm"))
    ids = {s["id"] for s in truth["screws"]} | {c["id"] for c in truth["cages"]}
    assert ids <= set(first)
    assert first == second
    assert len(set(first.values())) == len(first)
    for uid in first.values():
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.replace(".", "").isdigit()


def test_sr_references_source_series_and_copies_patient_study_modules(sr_study):
    path, vol, _ = sr_study
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(vol.meta["source_paths"][0], stop_before_pixels=True)
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
    assert ds.StudyDate == src.StudyDate and ds.AccessionNumber == src.AccessionNumber
    ev = ds.CurrentRequestedProcedureEvidenceSequence
    assert len(ev) == 1 and ev[0].StudyInstanceUID == src.StudyInstanceUID
    series = ev[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in series] == [src.SeriesInstanceUID]
    referenced = {r.ReferencedSOPInstanceUID for r in series[0].ReferencedSOPSequence}
    assert referenced == set(vol.meta["sop_instance_uids"])
    schemes = {it.CodingSchemeDesignator: it for it in ds.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes and schemes[PRIVATE_SCHEME].CodingSchemeName
    # every private code used is in the declared scheme
    used = {s for *_, s in _num_items(ds)}
    assert PRIVATE_SCHEME in used


def test_sr_is_partial_when_a_screw_could_not_be_measured(sr_study):
    path, vol, truth = sr_study
    from dataclasses import replace

    result = truth_result(truth)
    bad = replace(result.screws[0], rays_used=0, rays_excluded=720)
    result = replace(result, screws=(bad,) + result.screws[1:])
    headers = read_source_headers(vol.meta["source_paths"])
    ds = pydicom.dcmread(__import__("io").BytesIO(sr_bytes(build_sr(result, headers))))
    assert ds.CompletionFlag == "PARTIAL" and ds.VerificationFlag == "UNVERIFIED"


def test_no_sr_for_nifti_input(tmp_path):
    from test_outputs import nifti_like_volume, phantom

    vol, truth = phantom()
    out = write_outputs(tmp_path / "out", truth_result(truth), truth_evidence(truth), nifti_like_volume(vol))
    assert not (out / "report_sr.dcm").exists()
    assert (out / "measurements.json").exists()


def test_screw_shafts_are_located_in_the_source_frame_of_reference(sr_study):
    path, vol, truth = sr_study
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(vol.meta["source_paths"][0], stop_before_pixels=True)
    lines = []

    def walk(items):
        for it in items:
            if it.ValueType == "SCOORD3D" and it.GraphicType == "POLYLINE":
                assert it.ReferencedFrameOfReferenceUID == src.FrameOfReferenceUID
                lines.append([float(x) for x in it.GraphicData])
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    assert len(lines) == len(truth["screws"])
    for s, line in zip(truth["screws"], lines):
        assert line == pytest.approx(list(s["head_lps_mm"]) + list(s["tip_lps_mm"]), abs=1e-3)


@pytest.fixture(scope="module")
def sr_with_integrity(tmp_path_factory):
    """The same study with breach, alignment and a rod fracture filled in (issue 8 fields)."""
    from dataclasses import replace

    from pipeline.results import FractureFinding

    tmp = tmp_path_factory.mktemp("sr8")
    vol, truth = dicom_study(tmp)
    result = truth_result(truth)
    screws = tuple(replace(s, breach_mm=3.1, breach_grade="C", breach_direction="lateral") if i == 0
                   else replace(s, breach_mm=0.0, breach_grade="A") for i, s in enumerate(result.screws))
    levels = tuple(replace(lv, segmental_lordosis_deg=8.5, disc_height_mm=9.7, adjacent_to_fusion=True)
                   for lv in result.levels)
    rod = truth["rods"][0]
    frac = FractureFinding(id="rod-left-fracture1", kind="rod", hardware_id=rod["id"],
                           position_lps_mm=rod["points_lps_mm"][0], gap_mm=1.4)
    result = replace(result, screws=screws, levels=levels, fractures=(frac,))
    out = write_outputs(tmp / "out", result, truth_evidence(truth), vol)
    return out / "report_sr.dcm", result


@pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None,
                    reason="dciodvfy (dicom3tools) or dsrdump (dcmtk) not installed")
def test_sr_carries_breach_alignment_and_fracture_and_stays_valid(sr_with_integrity):
    path, result = sr_with_integrity
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    assert [ln for ln in (run.stdout + run.stderr).splitlines() if "Error" in ln] == []
    text = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=120).stdout
    assert '"Pedicle breach distance")="3.1" (mm,UCUM' in text
    assert '(FCT054,99FUSIONCT,"Gertzbein-Robbins grade C")' in text
    assert '"Segmental lordosis")="8.5" (deg,UCUM' in text
    assert '"Disc height")="9.7" (mm,UCUM' in text
    assert '"Rod fracture"' in text and '"Fracture gap width")="1.4" (mm,UCUM' in text
    assert f'"Tracking Identifier")="{result.fractures[0].id}"' in text
