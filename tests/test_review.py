"""The review server: every finding shown with its images, signing validated, confirmation
written once (409 after), the VERIFIED SR succeeds the draft with corrections applied."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest

from pipeline import review as review_mod
from pipeline.outputs import write_outputs
from pipeline.report_json import validate_measurements
from pipeline.review import list_findings, make_server, person_name

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers live in test_outputs.py
from test_outputs import PATIENT_ID, PATIENT_NAME, dicom_study, truth_evidence, truth_result  # noqa: E402


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """One analyzed DICOM phantom study; each test copies the output folder."""
    tmp = tmp_path_factory.mktemp("review")
    vol, truth = dicom_study(tmp)
    out = write_outputs(tmp / "out", truth_result(truth), truth_evidence(truth), vol)
    return out, truth


@pytest.fixture()
def outdir(analyzed, tmp_path):
    src, truth = analyzed
    dst = tmp_path / "study"
    shutil.copytree(src, dst)
    return dst, truth


class Running:
    def __init__(self, outdir):
        self.server = make_server(outdir, port=0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.base = f"http://{host}:{port}"

    def get(self, path="/"):
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, form: dict):
        data = urllib.parse.urlencode(form).encode()
        try:
            with urllib.request.urlopen(self.base + "/sign", data, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def token(self):
        _, page = self.get("/")
        return re.search(r'name="token" value="([^"]+)"', page).group(1)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def server(outdir):
    run = Running(outdir[0])
    yield run, outdir[0], outdir[1]
    run.close()


def full_form(findings, token, corrected_index=None, value="3.1"):
    form = {"token": token, "name": "Dr Ada Example", "organization": "Spine Unit"}
    for n, _ in enumerate(findings):
        form[f"d{n}"] = "accepted"
        form[f"m{n}"] = ""
    if corrected_index is not None:
        form[f"d{corrected_index}"] = "corrected"
        form[f"v{corrected_index}"] = value
        form[f"m{corrected_index}"] = "deeper on the sagittal view"
    return form


def test_server_binds_loopback_by_default(outdir):
    srv = make_server(outdir[0], port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_page_shows_every_finding_with_value_and_images(server):
    run, out, truth = server
    status, page = run.get("/")
    assert status == 200
    doc = json.loads((out / "measurements.json").read_text())
    findings = list_findings(doc)
    assert len(findings) == len(truth["screws"]) + len(truth["cages"]) + len(truth["levels"])
    blocks = page.split('<div class="finding" id="finding-')[1:]
    assert len(blocks) == len(findings)
    for n, (f, block) in enumerate(zip(findings, blocks)):
        assert block.startswith(f'{n}"')
        assert f["title"] in block
        assert block.count("data:image/png;base64,") >= 1
        for d in ("accepted", "rejected", "corrected"):
            assert f'id="d{n}-{d}"' in block
    loose = next(s for s in truth["screws"] if s["loosening"])
    assert f"max {loose['halo_max_mm']:.2f} mm" in page
    assert PATIENT_ID not in page and PATIENT_NAME not in page
    assert "awaiting confirmation" in page


def test_incomplete_form_is_refused_and_nothing_written(server):
    run, out, _ = server
    before = (out / "measurements.json").read_bytes()
    findings = list_findings(json.loads(before))
    form = full_form(findings, run.token())
    del form["d1"]
    form["name"] = "  "
    form["d2"] = "corrected"  # corrected without a value
    status, page = run.post(form)
    assert status == 400
    assert "Type your name" in page and "choose accept, reject or correct" in page
    assert "corrected" in page and "is needed" in page
    assert not (out / "confirmation.json").exists()
    assert not (out / "report_sr_verified.dcm").exists()
    assert (out / "measurements.json").read_bytes() == before
    # the surgeon's entries are kept on the re-shown form
    assert 'value="Spine Unit"' in page


def test_stale_or_foreign_form_is_refused(server):
    run, out, _ = server
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    status, _ = run.post(full_form(findings, "not-the-token"))
    assert status == 403
    assert not (out / "confirmation.json").exists()


def test_signing_writes_confirmation_verified_sr_and_confirms_measurements(server):
    run, out, truth = server
    draft_bytes = (out / "report_sr.dcm").read_bytes()
    doc = json.loads((out / "measurements.json").read_text())
    findings = list_findings(doc)
    ci = next(n for n, f in enumerate(findings) if f["kind"] == "cage")
    cage = next(c for c in truth["cages"] if c["id"] == findings[ci]["id"])
    ri = next(n for n, f in enumerate(findings) if f["kind"] == "level")
    form = full_form(findings, run.token(), corrected_index=ci, value="3.1")
    form[f"d{ri}"] = "rejected"
    form[f"m{ri}"] = "cannot judge through the cage"
    status, page = run.post(form)
    assert status == 200, page[:2000]
    assert 'id="signed"' in page

    conf = json.loads((out / "confirmation.json").read_text())
    assert conf["confirmed_by"] == "Dr Ada Example"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", conf["confirmed_at_utc"])
    assert len(conf["findings"]) == len(findings)
    by = {(f["kind"], f["id"]): f for f in conf["findings"]}
    c = by[("cage", cage["id"])]
    assert c["decision"] == "corrected" and c["corrected_value"] == 3.1
    assert c["original_value"] == pytest.approx(cage["subsidence_mm"])
    assert c["comment"] == "deeper on the sagittal view"
    assert by[("level", findings[ri]["id"])]["decision"] == "rejected"
    assert sum(f["decision"] == "accepted" for f in conf["findings"]) == len(findings) - 2

    new_doc = json.loads((out / "measurements.json").read_text())
    validate_measurements(new_doc)
    assert new_doc["status"] == "confirmed"
    mc = next(x for x in new_doc["cages"] if x["id"] == cage["id"])
    assert mc["subsidence_mm"] == pytest.approx(cage["subsidence_mm"])  # as measured
    assert mc["review"]["corrected_value"] == 3.1
    assert (out / "report_sr.dcm").read_bytes() == draft_bytes  # the draft is kept

    draft = pydicom.dcmread(out / "report_sr.dcm")
    ver = pydicom.dcmread(out / "report_sr_verified.dcm")
    assert ver.VerificationFlag == "VERIFIED" and ver.CompletionFlag == "COMPLETE"
    assert ver.PreliminaryFlag == "FINAL"
    assert str(ver.VerifyingObserverSequence[0].VerifyingObserverName) == "Example^Ada^^Dr"
    assert ver.VerifyingObserverSequence[0].VerifyingOrganization == "Spine Unit"
    pred = ver.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == draft.SOPInstanceUID
    assert ver.SOPInstanceUID == conf["verified_sr_sop_instance_uid"] != draft.SOPInstanceUID
    assert ver.SeriesInstanceUID == draft.SeriesInstanceUID
    assert ver.StudyInstanceUID == draft.StudyInstanceUID and ver.PatientID == draft.PatientID
    dump = subprocess.run(["dsrdump", str(out / "report_sr_verified.dcm")], capture_output=True,
                          text=True, timeout=60) if shutil.which("dsrdump") else None
    if dump is not None:
        assert dump.returncode == 0
        text = dump.stdout
        assert f'"Tracking Identifier")="{cage["id"]}"' in text
        assert '"Cage subsidence")="3.1" (mm,UCUM' in text
        assert '(FCT031,99FUSIONCT,"Mild subsidence")' in text  # 3.1 mm -> mild by the criteria
        assert f'"Tracking Identifier")="{findings[ri]["id"]}"' not in text  # rejected: not reported as verified
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(out / "report_sr_verified.dcm")], capture_output=True,
                           text=True, timeout=60)
        assert [ln for ln in (v.stdout + v.stderr).splitlines() if "Error" in ln] == []


def test_confirmed_study_cannot_be_signed_again(server):
    run, out, _ = server
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    token = run.token()
    assert run.post(full_form(findings, token))[0] == 200
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    status, page = run.post(full_form(findings, token, corrected_index=0, value="0.2"))
    assert status == 409 and "Already confirmed" in page
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == digest
    status, page = run.get("/")
    assert status == 200 and 'id="signed"' in page and "<form" not in page


def test_analysis_after_confirmation_goes_to_a_new_version(server, analyzed):
    run, out, truth = server
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    assert run.post(full_form(findings, run.token()))[0] == 200
    from test_outputs import nifti_like_volume, phantom

    vol, _ = phantom()
    new = write_outputs(out, truth_result(truth), truth_evidence(truth), nifti_like_volume(vol))
    assert new.parent == out / "versions"
    assert json.loads((out / "measurements.json").read_text())["status"] == "confirmed"


def test_interrupted_signing_is_finished_when_served_again(outdir, monkeypatch):
    out, _ = outdir
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    form = full_form(findings, "t")

    def killed(*a, **k):
        raise KeyboardInterrupt("killed after confirmation.json")

    monkeypatch.setattr(review_mod, "write_bytes_exclusive",
                        _after_first(review_mod.write_bytes_exclusive, killed))
    with pytest.raises(KeyboardInterrupt):
        review_mod.sign(out, form)
    assert (out / "confirmation.json").exists()
    assert json.loads((out / "measurements.json").read_text())["status"] == "draft"
    monkeypatch.undo()
    srv = make_server(out, port=0)
    srv.server_close()
    assert json.loads((out / "measurements.json").read_text())["status"] == "confirmed"
    ver = pydicom.dcmread(out / "report_sr_verified.dcm")
    conf = json.loads((out / "confirmation.json").read_text())
    assert ver.SOPInstanceUID == conf["verified_sr_sop_instance_uid"]


def _after_first(real, then):
    calls = {"n": 0}

    def f(*a, **k):
        calls["n"] += 1
        return real(*a, **k) if calls["n"] == 1 else then(*a, **k)

    return f


def test_logs_carry_no_patient_or_surgeon_identifiers(server, caplog):
    run, out, _ = server
    caplog.set_level(logging.DEBUG)
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    run.get("/")
    assert run.post(full_form(findings, run.token()))[0] == 200
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert PATIENT_NAME not in text and PATIENT_ID not in text and "Ada" not in text


@pytest.mark.parametrize("typed,pn", [
    ("Dr Jane Smith", "Smith^Jane^^Dr"),
    ("Smith, Jane", "Smith^Jane"),
    ("Smith^Jane", "Smith^Jane"),
    ("Madonna", "Madonna^"),
])
def test_typed_names_become_dicom_person_names(typed, pn):
    assert person_name(typed) == pn


def test_served_folder_without_results_is_refused(tmp_path):
    from pipeline.errors import InputError

    with pytest.raises(InputError):
        make_server(tmp_path, port=0)


def test_requests_for_another_host_name_are_refused(server):
    run, out, _ = server
    port = run.server.server_address[1]
    req = urllib.request.Request(run.base + "/", headers={"Host": f"evil.example:{port}"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 421
    req = urllib.request.Request(run.base + "/", headers={"Host": f"localhost:{port}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def test_nifti_study_is_confirmed_without_an_sr(tmp_path):
    from test_outputs import nifti_like_volume, phantom

    vol, truth = phantom()
    out = write_outputs(tmp_path / "out", truth_result(truth), truth_evidence(truth), nifti_like_volume(vol))
    run = Running(out)
    try:
        findings = list_findings(json.loads((out / "measurements.json").read_text()))
        assert run.post(full_form(findings, run.token()))[0] == 200
    finally:
        run.close()
    conf = json.loads((out / "confirmation.json").read_text())
    assert conf["verified_sr"] is None and len(conf["findings"]) == len(findings)
    assert not (out / "report_sr_verified.dcm").exists()
    assert json.loads((out / "measurements.json").read_text())["status"] == "confirmed"


def test_a_page_older_than_the_results_cannot_sign(server):
    run, out, truth = server
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    _, page = run.get("/")
    token = re.search(r'name="token" value="([^"]+)"', page).group(1)
    results = re.search(r'name="results" value="([^"]+)"', page).group(1)
    # the study is analyzed again while the page is open (one screw fewer)
    from dataclasses import replace

    from test_outputs import nifti_like_volume, phantom

    vol, _ = phantom()
    res = truth_result(truth)
    write_outputs(out, replace(res, screws=res.screws[1:]), truth_evidence(truth), nifti_like_volume(vol))
    form = full_form(findings, token)
    form["results"] = results
    status, body = run.post(form)
    assert status == 409 and "reload the page" in body
    assert not (out / "confirmation.json").exists()
    assert json.loads((out / "measurements.json").read_text())["status"] == "draft"
    # the fresh page lists the new findings and signs
    _, page = run.get("/")
    assert page.count('<div class="finding"') == len(findings) - 1


def test_exclusive_create_never_replaces_an_existing_file(tmp_path, monkeypatch):
    from pipeline.atomic import write_bytes_exclusive

    write_bytes_exclusive(tmp_path / "confirmation.json", b"first")
    with pytest.raises(FileExistsError):
        write_bytes_exclusive(tmp_path / "confirmation.json", b"second")
    assert (tmp_path / "confirmation.json").read_bytes() == b"first"

    def no_links(*a, **k):
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr("os.link", no_links)
    write_bytes_exclusive(tmp_path / "other.json", b"x")
    with pytest.raises(FileExistsError):
        write_bytes_exclusive(tmp_path / "other.json", b"y")
    assert (tmp_path / "other.json").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confirmation.json", "other.json"]


def test_reviewer_name_outside_latin1_survives_in_the_verified_sr(outdir):
    out, _ = outdir
    findings = list_findings(json.loads((out / "measurements.json").read_text()))
    form = {f"d{n}": "accepted" for n in range(len(findings))}
    form.update(name="Prof. Jürgen Müller-Łukasz", organization="Klinik Süd")
    review_mod.sign(out, form)
    ver = pydicom.dcmread(out / "report_sr_verified.dcm")
    assert ver.SpecificCharacterSet == "ISO_IR 192"
    obs = ver.VerifyingObserverSequence[0]
    assert str(obs.VerifyingObserverName) == "Müller-Łukasz^Jürgen^^Prof."
    assert obs.VerifyingOrganization == "Klinik Süd"
    assert json.loads((out / "confirmation.json").read_text(encoding="utf-8"))["confirmed_by"] == \
        "Prof. Jürgen Müller-Łukasz"
