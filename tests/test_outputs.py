"""Output files: measurements.json, CSVs, report.html, evidence.npz; atomic landing and
versioning. Ground truth is the sample_data phantom's exact truth, turned into the
measurement objects the writers read (so every number written must equal the phantom's).

The helpers at the top (phantom -> StudyResult / evidence / DICOM series) are imported by
test_report_sr.py, test_review.py and test_review_browser.py.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline import __version__
from pipeline import outputs as outputs_mod
from pipeline.config import Criteria
from pipeline.outputs import load_evidence_index, load_figures, write_outputs
from pipeline.render import screw_cross_figure
from pipeline.report_json import find_schema, validate_measurements
from pipeline.results import (
    CageEvidence,
    CageMeasurement,
    LevelEvidence,
    LevelMeasurement,
    Plane,
    ScrewEvidence,
    ScrewMeasurement,
    StudyResult,
)
from pipeline.volume import Volume

COARSE_MM = (1.0, 1.0, 2.0)


def _patient():
    from sample_data import demo_spec
    from sample_data.dicom_writer import PATIENT_NAME as NAME
    from sample_data.dicom_writer import patient_id

    spec = demo_spec()
    return NAME, patient_id(spec.findings_seed)


PATIENT_NAME, PATIENT_ID = _patient()  # the fake patient sample_data writes into DICOM


# ------------------------------------------------------------------------------ helpers
def phantom(spacing_mm=COARSE_MM):
    """The bundled demo phantom at a coarse spacing (small, fast) and its exact truth."""
    from sample_data.phantom import demo_spec, make_phantom

    spec = demo_spec()
    spec.spacing_mm = tuple(spacing_mm)
    return make_phantom(spec)


def truth_result(truth: dict, notes=("Levels named from the sacrum upwards.",), status="draft",
                 input_info=None) -> StudyResult:
    """The phantom's exact findings as the measurement objects the writers read."""
    screws = tuple(
        ScrewMeasurement(
            id=s["id"], vertebra=s["vertebra"], side=s["side"], head_lps_mm=s["head_lps_mm"],
            tip_lps_mm=s["tip_lps_mm"], length_mm=s["length_mm"], diameter_mm=s["diameter_mm"],
            halo_mean_mm=s["halo_mean_mm"], halo_max_mm=s["halo_max_mm"],
            halo_coverage=s["halo_coverage"], loosening=s["loosening"],
            double_halo=s["double_halo"], rays_used=36 * 20, rays_excluded=3)
        for s in truth["screws"])
    cages = tuple(
        CageMeasurement(
            id=c["id"], level=c["level"], material=c["material"], centroid_lps_mm=c["centroid_lps_mm"],
            subsidence_superior_mm=c["subsidence_superior_mm"],
            subsidence_inferior_mm=c["subsidence_inferior_mm"], subsidence_grade=c["subsidence_grade"])
        for c in truth["cages"])
    levels = tuple(
        LevelMeasurement(level=lv["level"], center_lps_mm=lv["center_lps_mm"],
                         instrumented=lv["instrumented"], bridging_fraction=lv["bridging_fraction"],
                         fusion=lv["fusion"])
        for lv in truth["levels"])
    return StudyResult(screws=screws, cages=cages, levels=levels, input=dict(input_info or {}),
                       criteria=Criteria().to_json(), notes=tuple(notes), status=status)


def _perp_frame(axis):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    sup = np.array([0.0, 0.0, 1.0]) - axis[2] * axis
    sup /= np.linalg.norm(sup)
    return sup, np.cross(axis, sup)


def truth_evidence(truth: dict, n_az: int = 36, station_step_mm: float = 1.0) -> dict:
    """Evidence objects built from the phantom's exact geometry (halo sector as specified)."""
    ev = {}
    for s in truth["screws"]:
        head, tip = np.asarray(s["head_lps_mm"]), np.asarray(s["tip_lps_mm"])
        axis = (tip - head) / np.linalg.norm(tip - head)
        n_st = int(s["length_mm"] // station_step_mm)
        stations = head + np.outer(np.arange(n_st) * station_step_mm + 0.5, axis)
        e_sup, e2 = _perp_frame(axis)
        theta = np.arange(n_az) * 360.0 / n_az
        dirs = np.cos(np.radians(theta))[:, None] * e_sup + np.sin(np.radians(theta))[:, None] * e2
        in_sector = ((theta - s["halo_start_deg"]) % 360.0) < s["halo_fraction"] * 360.0
        widths = np.where(in_sector, s["halo_width_mm"], 0.0)[None, :].repeat(n_st, 0)
        ev[s["id"]] = ScrewEvidence(s["id"], widths, stations, dirs, s["diameter_mm"] / 2)
    verts = {v["name"]: v for v in truth["vertebrae"]}
    levels = {lv["level"]: lv for lv in truth["levels"]}
    for c in truth["cages"]:
        lv = levels[c["level"]]
        up, low = verts[lv["upper"]], verts[lv["lower"]]
        sup_pl = Plane(up["inferior_endplate"]["point_lps_mm"], up["inferior_endplate"]["normal"])
        inf_pl = Plane(low["superior_endplate"]["point_lps_mm"], low["superior_endplate"]["normal"])
        cen = np.asarray(c["centroid_lps_mm"])
        a0 = np.asarray(c["axes"][0])
        h0 = c["half_sizes_mm"][0]
        rim_sup = np.asarray(sup_pl.point_lps_mm) + np.outer([-15, -10, 10, 15], [1.0, 0, 0])
        rim_inf = np.asarray(inf_pl.point_lps_mm) + np.outer([-15, -10, 10, 15], [1.0, 0, 0])
        ev[c["id"]] = CageEvidence(c["id"], sup_pl, inf_pl, cen + h0 * a0, cen - h0 * a0, rim_sup, rim_inf)
    for lv in truth["levels"]:
        step = 1.0
        a, b = lv["semi_axes_mm"]
        nu, nv = int(2 * a / step) + 1, int(2 * b / step) + 1
        u = -a + step * np.arange(nu)
        v = -b + step * np.arange(nv)
        domain = (u[None, :] / a) ** 2 + (v[:, None] / b) ** 2 <= 1.0
        bridged = domain & (np.linspace(0, 1, nu)[None, :] < lv["bridging_fraction"])
        origin = (np.asarray(lv["center_lps_mm"]) - a * np.asarray(lv["axis_u"])
                  - b * np.asarray(lv["axis_v"]))
        ev[lv["level"]] = LevelEvidence(lv["level"], origin, lv["axis_u"], lv["axis_v"], step,
                                        domain, bridged)
    return ev


def dicom_study(tmp: Path):
    """The phantom written as a DICOM study by sample_data (bone series plus a localizer
    and a thick soft-tissue series, nested random file names), loaded as the flow loads it:
    the Volume carries meta with source_paths and input_kind dicom. Returns (volume, truth)."""
    from sample_data import demo_spec, make_phantom
    from sample_data.dicom_writer import read_truth, write_volume_study

    from pipeline.loading import load_study

    spec = demo_spec()
    spec.spacing_mm = COARSE_MM
    vol0, truth0 = make_phantom(spec)
    write_volume_study(vol0, truth0, spec, tmp / "dicom", extra_series=True)
    vol = load_study(tmp / "dicom")
    assert vol.meta["series_instance_uid"] == read_truth(tmp / "dicom")["dicom"]["bone_series_uid"]
    return vol, read_truth(tmp / "dicom")


def nifti_like_volume(vol: Volume) -> Volume:
    """The same volume as if read from NIfTI (no DICOM sources)."""
    meta = {"input_kind": "nifti", "series_description": "phantom.nii.gz",
            "selection_reason": "NIfTI file read as the one volume."}
    return Volume(vol.hu, vol.origin_lps_mm, vol.spacing_mm, vol.direction, meta=meta)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    vol, truth = phantom()
    vol = nifti_like_volume(vol)
    return vol, truth, truth_result(truth), truth_evidence(truth)


@pytest.fixture()
def written(study, tmp_path):
    vol, truth, result, ev = study
    out = write_outputs(tmp_path / "out", result, ev, vol)
    return out, vol, truth, result


# -------------------------------------------------------------------------------- tests
def test_measurements_json_valid_and_equal_to_phantom_truth(written):
    out, vol, truth, _ = written
    assert find_schema() is not None, "shared/measurements.schema.json must be beside the repo"
    doc = json.loads((out / "measurements.json").read_text())
    validate_measurements(doc)
    assert doc["status"] == "draft"
    assert doc["software"] == {"name": "fusionct", "version": __version__}
    assert doc["criteria"] == truth["criteria"]
    assert doc["input"]["spacing_mm"] == pytest.approx(list(vol.spacing_mm))
    assert doc["input"]["shape"] == list(vol.shape_ijk)
    assert doc["input"]["selection_reason"] == vol.meta["selection_reason"]
    by_id = {s["id"]: s for s in doc["screws"]}
    assert set(by_id) == {s["id"] for s in truth["screws"]}
    for s in truth["screws"]:
        got = by_id[s["id"]]
        for key in ("halo_mean_mm", "halo_max_mm", "halo_coverage", "length_mm", "diameter_mm"):
            assert got[key] == pytest.approx(s[key]), (s["id"], key)
        assert got["loosening"] is s["loosening"]
        assert got["double_halo"] is s["double_halo"]
        assert got["head_lps_mm"] == pytest.approx(s["head_lps_mm"])
        assert got["rays_excluded"] == 3
    cages = {c["id"]: c for c in doc["cages"]}
    for c in truth["cages"]:
        for key in ("subsidence_superior_mm", "subsidence_inferior_mm", "subsidence_mm"):
            assert cages[c["id"]][key] == pytest.approx(c[key])
        assert cages[c["id"]]["subsidence_grade"] == c["subsidence_grade"]
        assert cages[c["id"]]["material"] == c["material"]
    levels = {lv["level"]: lv for lv in doc["levels"]}
    for lv in truth["levels"]:
        assert levels[lv["level"]]["bridging_fraction"] == pytest.approx(lv["bridging_fraction"])
        assert levels[lv["level"]]["fusion"] == lv["fusion"]
    assert doc["notes"] == ["Levels named from the sacrum upwards."]


def test_csv_rows_carry_units_in_names_and_match_json(written):
    out, _, truth, _ = written
    doc = json.loads((out / "measurements.json").read_text())
    screws = list(csv.DictReader(io.StringIO((out / "screws.csv").read_text())))
    cages = list(csv.DictReader(io.StringIO((out / "cages.csv").read_text())))
    levels = list(csv.DictReader(io.StringIO((out / "levels.csv").read_text())))
    assert len(screws) == len(truth["screws"]) and len(cages) == len(truth["cages"])
    assert len(levels) == len(truth["levels"])
    for col in ("halo_mean_mm", "halo_max_mm", "halo_coverage_fraction", "head_x_lps_mm",
                "tip_z_lps_mm", "length_mm", "diameter_mm", "loosening", "status"):
        assert col in screws[0], col
    for col in ("subsidence_superior_mm", "subsidence_inferior_mm", "subsidence_mm", "subsidence_grade"):
        assert col in cages[0], col
    assert {"level", "instrumented", "bridging_fraction", "fusion", "center_x_lps_mm"} <= set(levels[0])
    js = {s["id"]: s for s in doc["screws"]}
    for row in screws:
        s = js[row["id"]]
        assert float(row["halo_mean_mm"]) == pytest.approx(s["halo_mean_mm"], abs=1e-4)
        assert float(row["halo_coverage_fraction"]) == pytest.approx(s["halo_coverage"], abs=1e-4)
        assert float(row["head_y_lps_mm"]) == pytest.approx(s["head_lps_mm"][1], abs=1e-4)
        assert row["loosening"] == ("true" if s["loosening"] else "false")
        assert row["status"] == "draft"
    jc = {c["id"]: c for c in doc["cages"]}
    for row in cages:
        assert float(row["subsidence_mm"]) == pytest.approx(jc[row["id"]]["subsidence_mm"], abs=1e-4)


def _data_images(html_text: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text):
        out.append(Image.open(io.BytesIO(base64.b64decode(b64))))
    return out


def test_report_html_is_self_contained_with_one_image_set_per_finding(written):
    out, vol, truth, result = written
    page = (out / "report.html").read_text()
    # no external assets of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    imgs = _data_images(page)
    n_expected = 2 * len(truth["screws"]) + 2 * len(truth["cages"]) + len(truth["levels"])
    assert len(imgs) == n_expected
    assert all(im.format == "PNG" and min(im.size) >= 60 for im in imgs)
    # per-level table comes before the per-finding sections, every level is in it
    assert page.index('id="levels"') < page.index("<h2>Screws</h2>")
    table = page[page.index('id="levels"'):page.index("</table>", page.index('id="levels"'))]
    for lv in truth["levels"]:
        assert f"<td>{lv['level']}</td>" in table
    # every finding is marked as awaiting confirmation (table cells and sections)
    n_findings = len(truth["screws"]) + len(truth["cages"]) + len(truth["levels"])
    assert page.count("awaiting confirmation") >= 2 * n_findings
    assert html.escape(vol.meta["selection_reason"]) in page
    assert "Levels named from the sacrum upwards." in page
    assert "3 of 723 halo rays excluded" in page
    loose = [s["id"] for s in truth["screws"] if s["loosening"]]
    assert loose and all(f"({i}): halo" in page for i in loose)


def test_screw_cross_section_is_centred_on_the_shaft_and_shows_the_halo(study):
    vol, truth, _, ev = study
    s = next(s for s in truth["screws"] if s["halo_width_mm"] >= 2.0 and s["halo_fraction"] == 1.0)
    px = 0.1
    fig = screw_cross_figure(vol, s["head_lps_mm"], s["tip_lps_mm"], ev[s["id"]], px_mm=px)
    im = np.asarray(Image.open(io.BytesIO(fig.png)).convert("RGB")).astype(int)
    h, w, _ = im.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.mgrid[:h, :w]
    rr = np.hypot(yy - cy, xx - cx) * px  # mm from the axis
    grey = (im[..., 0] == im[..., 1]) & (im[..., 1] == im[..., 2])
    r0 = s["diameter_mm"] / 2
    wid = s["halo_width_mm"]
    # the plane is perpendicular to the shaft and centred on it: metal fills the true
    # radius, and beyond the halo (and the blooming) there is bone, not metal
    metal = im[..., 0][(rr < r0 - 1.0) & grey]
    outside = im[..., 0][(rr > r0 + wid + 2.0) & (rr < r0 + wid + 4.0) & grey]
    assert metal.size > 100 and metal.min() == 255
    assert outside.size > 100 and np.median(outside) < 200
    # the halo outline (yellow) sits at the true radius plus the measured width
    yellow = (im[..., 0] > 200) & (im[..., 1] > 180) & (im[..., 2] < 80)
    assert yellow.sum() > 50
    assert np.median(rr[yellow]) == pytest.approx(r0 + wid, abs=0.25)
    cyan = (im[..., 0] < 80) & (im[..., 1] > 180) & (im[..., 2] > 200)
    assert np.median(rr[cyan]) == pytest.approx(r0, abs=0.25)


def test_evidence_npz_round_trips_arrays_and_key_images(written, study):
    out, _, truth, _ = written
    _, _, _, ev = study
    index, meta, refs = load_evidence_index(out / "evidence.npz")
    assert [e["key"] for e in index][:len(truth["screws"])] == [f"screw:{s['id']}" for s in truth["screws"]]
    assert refs == [] and "source_paths" not in meta
    sid = truth["screws"][0]["id"]
    entry = next(e for e in index if e["key"] == f"screw:{sid}")
    with np.load(out / "evidence.npz") as z:
        np.testing.assert_array_equal(z[f"{entry['prefix']}__widths_mm"], ev[sid].widths_mm)
    figs = load_figures(out / "evidence.npz")
    assert len(figs[f"screw:{sid}"]) == 2
    assert figs[f"screw:{sid}"][0].png.startswith(b"\x89PNG")


def test_killed_run_leaves_earlier_complete_result(study, tmp_path, monkeypatch):
    vol, truth, result, ev = study
    out = write_outputs(tmp_path / "out", result, ev, vol)
    before = (out / "measurements.json").read_bytes()
    changed = StudyResult(result.screws, result.cages, result.levels, result.input, result.criteria,
                          notes=("second run",))
    real = outputs_mod.replace_into

    def dying(src, dst):  # the process "dies" just before measurements.json lands
        if Path(dst).name == "measurements.json":
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(outputs_mod, "replace_into", dying)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(out, changed, ev, vol)
    assert (out / "measurements.json").read_bytes() == before
    json.loads(before)  # whole, parseable
    assert not list(tmp_path.glob(".fusionct-staging-*"))
    assert not list(out.glob(".*.tmp"))


def test_failure_while_rendering_touches_nothing(study, tmp_path, monkeypatch):
    vol, _, result, ev = study
    out = write_outputs(tmp_path / "out", result, ev, vol)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(outputs_mod, "build_report_html", boom)
    with pytest.raises(RuntimeError):
        write_outputs(out, result, ev, vol)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


def test_first_run_killed_leaves_no_measurements_json(study, tmp_path, monkeypatch):
    vol, _, result, ev = study

    def dying(src, dst):
        if Path(dst).name == "measurements.json":
            raise KeyboardInterrupt("killed")
        return Path(src).replace(dst)

    monkeypatch.setattr(outputs_mod, "replace_into", dying)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "fresh", result, ev, vol)
    assert not (tmp_path / "fresh" / "measurements.json").exists()


@pytest.mark.parametrize("how", ["confirmation_json", "status_confirmed"])
def test_confirmed_result_is_never_overwritten_new_version_beside_it(study, tmp_path, how):
    vol, _, result, ev = study
    out = write_outputs(tmp_path / "out", result, ev, vol)
    if how == "confirmation_json":
        (out / "confirmation.json").write_text('{"confirmed_by": "x"}\n')
    else:
        doc = json.loads((out / "measurements.json").read_text())
        doc["status"] = "confirmed"
        (out / "measurements.json").write_text(json.dumps(doc))
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    new = write_outputs(out, result, ev, vol)
    assert new != out and new.parent == out / "versions"
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z(-\d+)?", new.name)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot
    assert json.loads((new / "measurements.json").read_text())["status"] == "draft"
    assert {"levels.csv", "screws.csv", "cages.csv", "report.html", "evidence.npz"} <= {
        p.name for p in new.iterdir()}
    again = write_outputs(out, result, ev, vol)
    assert again != new and again.parent == out / "versions"


def test_stale_sr_removed_when_new_run_has_none(study, tmp_path):
    vol, _, result, ev = study
    out = tmp_path / "out"
    out.mkdir()
    (out / "report_sr.dcm").write_bytes(b"old draft from a DICOM run")
    (out / "notes_by_user.txt").write_text("keep me")
    write_outputs(out, result, ev, vol)
    assert not (out / "report_sr.dcm").exists()
    assert (out / "notes_by_user.txt").read_text() == "keep me"


def test_dicom_meta_identifiers_never_reach_json_csv_or_html(study, tmp_path):
    vol, truth, result, ev = study
    meta = dict(vol.meta, patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                study_instance_uid="1.2.3.4", study_date="20260310")
    v2 = Volume(vol.hu, vol.origin_lps_mm, vol.spacing_mm, vol.direction, meta=meta)
    r2 = truth_result(truth, input_info={"patient_id": PATIENT_ID, "study_instance_uid": "1.2.3.4"})
    out = write_outputs(tmp_path / "out", r2, ev, v2)
    for name in ("measurements.json", "levels.csv", "screws.csv", "cages.csv", "report.html"):
        text = (out / name).read_text()
        assert PATIENT_NAME not in text and PATIENT_ID not in text, name
    page = (out / "report.html").read_text()
    assert "1.2.3.4" in page and "20260310" in page
    with np.load(out / "evidence.npz") as z:
        assert PATIENT_NAME not in str(z["meta_json"]) and PATIENT_ID not in str(z["meta_json"])


def test_dicom_input_gets_an_sr_and_source_refs(tmp_path):
    vol, truth = dicom_study(tmp_path)
    out = write_outputs(tmp_path / "out", truth_result(truth), truth_evidence(truth), vol)
    assert (out / "report_sr.dcm").exists()
    ds = pydicom.dcmread(out / "report_sr.dcm")
    assert ds.VerificationFlag == "UNVERIFIED"
    _, _, refs = load_evidence_index(out / "evidence.npz")
    assert len(refs) == vol.hu.shape[0]
    assert {r["SOPInstanceUID"] for r in refs} == set(vol.meta["sop_instance_uids"])
    assert all("PatientName" not in r and "PatientID" not in r for r in refs)
    page = (out / "report.html").read_text()
    assert PATIENT_NAME not in page and PATIENT_ID not in page
    assert html.escape(vol.meta["series_description"]) in page
    assert html.escape(vol.meta["selection_reason"]) in page  # which series and why


def test_staging_left_by_a_killed_process_is_cleaned_up(study, tmp_path):
    import subprocess
    import sys

    vol, _, result, ev = study
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(proc.stdout)  # a process that has exited
    dead = tmp_path / f".fusionct-staging-out-{dead_pid}-abcd_123"
    dead.mkdir()
    (dead / "measurements.json").write_text("{half")
    other = tmp_path / f".fusionct-staging-out2-{dead_pid}-abcd_123"  # another target's
    other.mkdir()
    write_outputs(tmp_path / "out", result, ev, vol)
    assert not dead.exists()
    assert other.exists()
    assert not [p for p in tmp_path.glob(".fusionct-staging-out-*")]


CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_outputs import nifti_like_volume, phantom, truth_evidence, truth_result
import pipeline.outputs as o

real = o.replace_into
def slow(src, dst):
    print("moving", Path(dst).name, flush=True)
    if Path(dst).name == "measurements.json":
        time.sleep(120)  # the parent kills us here, before the last rename
    return real(src, dst)

o.replace_into = slow
vol, truth = phantom()
o.write_outputs(sys.argv[2], truth_result(truth, notes=("second run",)), truth_evidence(truth),
                nifti_like_volume(vol))
"""


def test_sigkill_before_the_last_rename_keeps_the_old_measurements(study, tmp_path):
    import signal
    import subprocess
    import sys

    vol, truth, result, ev = study
    out = write_outputs(tmp_path / "out", result, ev, vol)
    before = (out / "measurements.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(out)],
                            stdout=subprocess.PIPE, text=True)
    try:
        moved = []
        for line in proc.stdout:
            moved.append(line.split()[-1])
            if moved[-1] == "measurements.json":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert moved[-1] == "measurements.json" and "report.html" in moved
    assert (out / "measurements.json").read_bytes() == before  # whole, and the earlier one
    assert len(list(tmp_path.glob(".fusionct-staging-out-*"))) == 1  # a killed run can't clean up
    # the next run removes the dead run's staging folder and lands completely
    write_outputs(out, result, ev, vol)
    assert not list(tmp_path.glob(".fusionct-staging-out-*"))
    json.loads((out / "measurements.json").read_text())


def test_extra_sections_from_other_steps_reach_the_report(study, tmp_path):
    from dataclasses import replace

    vol, truth, result, ev = study
    extras = {"software_version": __version__,
              "alignment": [{"level": "L4-L5", "segmental_lordosis_deg": 12.25, "disc_height_mm": 9.5}],
              "baseline": {"prior_study_date": "20250101", "interval_days": 400}}
    out = write_outputs(tmp_path / "out", replace(result, extras=extras), ev, vol)
    page = (out / "report.html").read_text()
    sec = page[page.index('id="extra-alignment"'):]
    assert "segmental_lordosis_deg" in sec and "12.25" in sec and "9.50" in sec
    assert 'id="extra-baseline"' in page and "20250101" in page
    assert 'id="extra-software_version"' not in page
    doc = json.loads((out / "measurements.json").read_text())
    validate_measurements(doc)
    assert doc["alignment"][0]["disc_height_mm"] == 9.5
