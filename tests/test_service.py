"""``fusionct serve``: storage by UID, completion after a quiet period, AE filtering, watch
folder, several studies at once, and (slow) storescu -> ``fusionct serve`` -> measurements.json.

The receiver's unit tests run without Prefect: the analysis is a recording launcher.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from _proc import intake_finished, stop, wait_until  # noqa: E402
from flows.service import CompletionTracker, IntakeService, StudyStore, safe_name

REPO = Path(__file__).resolve().parents[1]
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-8675309"
BIRTH_DATE = "19510203"


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ct_instance(study_uid: str, series_uid: str, index: int, sop_uid: str | None = None) -> Dataset:
    """A tiny but valid CT slice carrying patient identifiers the service must never use."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.Modality, ds.InstanceNumber = "CT", index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.full((4, 4), 1024 + index, np.uint16).tobytes()
    return ds


def c_store(port: int, datasets, calling_ae: str = "MODALITY", called_ae: str = "FUSIONCT") -> list[int]:
    """Send datasets with pynetdicom as the SCU; returns the statuses (empty if rejected)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


class Recorder:
    """A launcher that records each run and writes a marker file where results would go."""

    def __init__(self, seconds: float = 0.0):
        self.runs: list[tuple[str, list[str]]] = []
        self.seconds = seconds
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def __call__(self, input_dir: Path, outdir: Path, study_uid: str):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            files = sorted(str(p.relative_to(input_dir)) for p in input_dir.rglob("*") if p.is_file())
            time.sleep(self.seconds)
            outdir.mkdir(parents=True, exist_ok=True)
            (outdir / "measurements.json").write_text(json.dumps({"n": len(files)}))
            with self.lock:
                self.runs.append((study_uid, files))
        finally:
            with self.lock:
                self.active -= 1


def wait_for(predicate, timeout_s: float, step_s: float = 0.05) -> bool:
    return wait_until(predicate, timeout_s, step_s)


# ----------------------------------------------------------------------------- names
@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_safe_name_is_one_harmless_path_component_for_any_text(text):
    name = safe_name(text)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert (Path("/store") / name).parent == Path("/store")


def test_safe_name_keeps_a_conformant_uid_and_separates_distinct_hostile_ones():
    assert safe_name("1.2.840.113619.2.55.3.604688") == "1.2.840.113619.2.55.3.604688"
    assert safe_name("1.2.3\x00") == "1.2.3"  # DICOM's NUL padding is not part of the UID
    hostile = [safe_name("../../etc"), safe_name("..\\..\\etc"), safe_name(".."), safe_name("")]
    assert len(set(hostile)) == len(hostile)
    assert all(".." != h and "/" not in h for h in hostile)


def test_instance_paths_stay_inside_the_store(tmp_path):
    store = StudyStore(tmp_path / "out")
    path = store.instance_path("../../evil", "/abs/series", "../../../sop")
    assert store.input_dir("../../evil") in path.parents
    assert (tmp_path / "out" / ".intake") in path.resolve().parents


# ----------------------------------------------------------------------------- completion
def test_study_is_complete_only_after_the_quiet_period_and_launches_once():
    now = [100.0]
    tracker = CompletionTracker(quiet_s=5.0, clock=lambda: now[0])
    tracker.received("1.2.3")
    now[0] += 4.9
    assert tracker.due() == []
    tracker.received("1.2.3")          # a new instance restarts the quiet period
    now[0] += 4.9
    assert tracker.due() == []
    now[0] += 0.2
    assert tracker.due() == ["1.2.3"]
    tracker.start("1.2.3")
    now[0] += 60
    assert tracker.due() == []         # running: not launched twice
    tracker.finish("1.2.3")
    assert tracker.due() == []         # nothing new since the run


def test_instances_arriving_during_a_run_trigger_one_more_run_after_it():
    now = [0.0]
    tracker = CompletionTracker(quiet_s=1.0, clock=lambda: now[0])
    tracker.received("1.2.3")
    now[0] = 2.0
    tracker.start("1.2.3")
    tracker.received("1.2.3")          # late instance while analyzing
    now[0] = 10.0
    assert tracker.due() == []         # still running
    tracker.finish("1.2.3")
    assert tracker.due() == ["1.2.3"]


# ----------------------------------------------------------------------------- receiver
def test_received_instances_are_named_by_uid_and_patient_data_stays_out_of_paths_and_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fusionct")
    port, rec = free_port(), Recorder()
    study, series = generate_uid(), generate_uid()
    sent = [ct_instance(study, series, i) for i in range(3)]
    with IntakeService(tmp_path / "out", quiet_s=0.5, launch=rec, port=port, poll_s=0.1):
        assert c_store(port, sent) == [0, 0, 0]
        assert wait_for(lambda: rec.runs, 15)
    stored = sorted((tmp_path / "out" / ".intake" / study / "input" / series).iterdir())
    assert [p.name for p in stored] == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in sent)
    every_path = " ".join(str(p) for p in (tmp_path / "out").rglob("*"))
    for secret in (PATIENT_NAME, "DOE", PATIENT_ID, BIRTH_DATE):
        assert secret not in every_path
        assert secret not in caplog.text
    assert rec.runs[0][0] == study and len(rec.runs[0][1]) == 3
    assert "3 instance(s) stored, 0 refused" in caplog.text
    assert (tmp_path / "out" / study / "measurements.json").exists()
    status = json.loads((tmp_path / "out" / ".intake" / study / "status.json").read_text())
    assert status["state"] == "done" and status["instances"] == 3
    assert status["finished_at"] - status["last_instance_at"] >= 0.5  # the quiet period was waited


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_hostile_sop_uid_cannot_write_outside_the_store(tmp_path):
    port, rec = free_port(), Recorder()
    ds = ct_instance("1.2.3", "1.2.3.4", 0, sop_uid="1.2.3.4.5")
    ds.StudyInstanceUID = "../../../escaped"
    with IntakeService(tmp_path / "out", quiet_s=0.3, launch=rec, port=port, poll_s=0.1):
        assert c_store(port, [ds]) == [0]
        assert wait_for(lambda: rec.runs, 15)
    assert not list(tmp_path.glob("escaped*")) and not (tmp_path.parent / "escaped").exists()
    inside = [p for p in (tmp_path / "out").rglob("*.dcm")]
    assert len(inside) == 1 and (tmp_path / "out" / ".intake") in inside[0].parents


def test_unknown_calling_ae_is_rejected_when_a_list_is_given(tmp_path):
    port, rec = free_port(), Recorder()
    ds = ct_instance(generate_uid(), generate_uid(), 0)
    with IntakeService(tmp_path / "out", quiet_s=0.2, launch=rec, port=port, poll_s=0.1,
                       allowed_aes=["CT_SCANNER"]) as svc:
        assert c_store(port, [ds], calling_ae="INTRUDER") == []
        assert not list((tmp_path / "out" / ".intake").rglob("*.dcm"))
        assert c_store(port, [ds], calling_ae="CT_SCANNER") == [0]
        assert wait_for(lambda: rec.runs, 15)
        assert svc.idle() or wait_for(svc.idle, 5)


def test_an_instance_without_study_uid_is_refused_with_a_failure_status(tmp_path):
    port, rec = free_port(), Recorder()
    ds = ct_instance(generate_uid(), generate_uid(), 0)
    del ds.StudyInstanceUID
    with IntakeService(tmp_path / "out", quiet_s=0.2, launch=rec, port=port, poll_s=0.1):
        statuses = c_store(port, [ds])
    assert statuses and statuses[0] == 0xC000
    assert rec.runs == []


def test_two_studies_sent_together_get_their_own_folders_and_runs_at_once(tmp_path):
    port, rec = free_port(), Recorder(seconds=1.0)
    a, b = generate_uid(), generate_uid()
    sa, sb = generate_uid(), generate_uid()
    interleaved = [ct_instance(a, sa, i) if i % 2 == 0 else ct_instance(b, sb, i) for i in range(8)]
    with IntakeService(tmp_path / "out", quiet_s=0.4, launch=rec, port=port, poll_s=0.1,
                       max_concurrent=2) as svc:
        assert c_store(port, interleaved) == [0] * 8
        assert wait_for(lambda: len(rec.runs) == 2, 20)
        assert wait_for(svc.idle, 5)
    assert sorted(uid for uid, _ in rec.runs) == sorted([a, b])
    for uid, files in rec.runs:
        assert len(files) == 4 and all(f.startswith((sa if uid == a else sb) + "/") for f in files)
        assert (tmp_path / "out" / uid / "measurements.json").exists()
    assert rec.max_active == 2


def test_late_instances_after_a_run_are_analyzed_again_with_the_whole_study(tmp_path):
    port, rec = free_port(), Recorder()
    study, series = generate_uid(), generate_uid()
    with IntakeService(tmp_path / "out", quiet_s=0.3, launch=rec, port=port, poll_s=0.1) as svc:
        assert c_store(port, [ct_instance(study, series, i) for i in range(2)]) == [0, 0]
        assert wait_for(lambda: len(rec.runs) == 1, 15)
        assert c_store(port, [ct_instance(study, series, 2)]) == [0]
        assert wait_for(lambda: len(rec.runs) == 2, 15)
        assert wait_for(svc.idle, 5)
    assert [len(files) for _, files in rec.runs] == [2, 3]
    assert not list((tmp_path / "out" / ".intake" / study / "runs").iterdir())  # snapshots removed


def test_a_failing_analysis_is_recorded_and_the_service_keeps_going(tmp_path):
    port = free_port()
    calls = []

    def flaky(input_dir, outdir, study_uid):
        calls.append(study_uid)
        if len(calls) == 1:
            raise RuntimeError("analysis exploded")

    a, b = generate_uid(), generate_uid()
    with IntakeService(tmp_path / "out", quiet_s=0.2, launch=flaky, port=port, poll_s=0.1) as svc:
        assert c_store(port, [ct_instance(a, generate_uid(), 0)]) == [0]
        assert wait_for(lambda: len(calls) == 1, 15) and wait_for(svc.idle, 5)
        assert c_store(port, [ct_instance(b, generate_uid(), 0)]) == [0]
        assert wait_for(lambda: len(calls) == 2, 15) and wait_for(svc.idle, 5)
    store = StudyStore(tmp_path / "out")
    assert store.read_status(a)["state"] == "failed" and "exploded" in store.read_status(a)["error"]
    assert store.read_status(b)["state"] == "done"


# ----------------------------------------------------------------------------- watch folder
def test_watched_folder_files_are_moved_into_the_store_and_the_study_analyzed(tmp_path):
    inbox, rec = tmp_path / "inbox", Recorder()
    (inbox / "Doe_Jane_scan").mkdir(parents=True)  # a folder named after the patient
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        ct_instance(study, series, i).save_as(inbox / "Doe_Jane_scan" / f"IMG{i:04d}", enforce_file_format=True)
    (inbox / "notes.txt").write_text("not DICOM")
    with IntakeService(tmp_path / "out", quiet_s=0.3, launch=rec, port=None, watch=inbox,
                       poll_s=0.1, settle_s=0.2):
        assert wait_for(lambda: rec.runs, 15)
    assert len(rec.runs[0][1]) == 3
    assert (inbox / "notes.txt").exists()                 # non-DICOM left alone
    assert not (inbox / "Doe_Jane_scan").exists()         # taken files moved out, folder tidied
    assert not any("Doe" in str(p) for p in (tmp_path / "out").rglob("*"))


def test_a_restarted_service_finishes_a_study_received_before_it_stopped(tmp_path):
    store = StudyStore(tmp_path / "out")
    study, series = generate_uid(), generate_uid()
    ds = ct_instance(study, series, 0)
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    store.store_file(study, series, ds.SOPInstanceUID, path)
    store.write_status(study, state="receiving")
    rec = Recorder()
    with IntakeService(tmp_path / "out", quiet_s=0.2, launch=rec, port=None, poll_s=0.1):
        assert wait_for(lambda: rec.runs, 15)
    assert rec.runs[0][0] == study


# ----------------------------------------------------------------------------- end to end
def _sample_data_ready() -> bool:
    try:
        from sample_data import demo_spec, write_dicom_study  # noqa: F401
        import pipeline.detect, pipeline.measure, pipeline.outputs  # noqa: F401,E401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.slow
def test_storescu_sends_a_study_to_fusionct_serve_and_measurements_json_appears(tmp_path, prefect_harness):
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is not installed (Debian package dcmtk)")
    if not _sample_data_ready():
        pytest.skip("sample_data / pipeline modules not importable yet")
    from sample_data import demo_spec, write_dicom_study

    study_dir = tmp_path / "study"
    write_dicom_study(demo_spec(), study_dir)
    truth = json.loads((study_dir / "truth.json").read_text())
    study_uid = truth["dicom"]["study_instance_uid"]
    files = sorted(str(p) for p in study_dir.rglob("*") if p.is_file() and p.name != "truth.json")
    port, out = free_port(), tmp_path / "out"
    from prefect.settings import PREFECT_API_URL

    # the service reports to the session's test server instead of starting its own
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1",
           "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--out-root", str(out),
           "--allow-ae", "STORESCU", "--quiet-seconds", "2"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "serving" in log_path.read_text() or proc.poll() is not None, 90, 0.2), \
            log_path.read_text()[-2000:]
        assert proc.poll() is None, log_path.read_text()[-2000:]
        sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "FUSIONCT",
                               "127.0.0.1", str(port), *files],
                              capture_output=True, text=True, timeout=180)
        assert sent.returncode == 0, sent.stderr[-2000:]
        status_path = out / ".intake" / study_uid / "status.json"

        def finished():
            return intake_finished(status_path)

        assert wait_for(finished, 300, 0.5), log_path.read_text()[-3000:]
        result = out / study_uid / "measurements.json"
        assert result.exists(), log_path.read_text()[-3000:]
        doc = json.loads(result.read_text())
        assert doc["input"]["study_instance_uid"] == study_uid
        assert doc["input"]["series_instance_uid"] == truth["dicom"]["bone_series_uid"]
        status = json.loads(status_path.read_text())
        assert status["state"] == "done" and status["instances"] == truth["dicom"]["n_files"]
        print(f"\nlast instance -> result: {status['seconds_from_last_instance']:.1f} s "
              f"(quiet 2.0 s, analysis {status['seconds_analysis']:.1f} s)")

        # a PACS retry re-sends an instance: the unchanged study is analyzed again, from cache
        again = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "FUSIONCT", "127.0.0.1",
                                str(port), files[0]], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr[-2000:]
        assert wait_for(lambda: finished() and json.loads(status_path.read_text())["finished_at"]
                        > status["finished_at"], 300, 0.5), log_path.read_text()[-3000:]
        second = json.loads(status_path.read_text())
        assert second["state"] == "done", second
        assert json.loads(result.read_text())["screws"] == doc["screws"]
        print(f"re-sent, served from cache: {second['seconds_from_last_instance']:.1f} s "
              f"(analysis {second['seconds_analysis']:.1f} s)")
    finally:
        stop(proc, 60)
