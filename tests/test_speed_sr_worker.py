"""The SR prepared ahead in a helper process (pipeline.outputs.prefetch_sources ->
report_sr.SRWorker) is the same document the writer builds in-process: same content tree,
same patient/study module, same evidence references; and the evidence archive's source
references are the same. When the helper cannot be used (files changed, helper gone) the
writer still lands a complete SR."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

import pipeline.outputs as outputs_mod
from pipeline.outputs import load_evidence_index, prefetch_sources, write_outputs
from pipeline.report_sr import SRWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers live in test_outputs.py
from test_outputs import dicom_study, truth_evidence, truth_result  # noqa: E402

# attributes that differ between any two SRs of one result, built in one process or not:
# new SOP instance / series UIDs, creation date and time, the contribution time (the
# findings' tracking UIDs are name-based and must match)
_PER_INSTANCE = {"00080018", "0020000E", "00080012", "00080013", "00080023", "00080033", "0018A002",
                 "00020003"}


def _comparable(ds):
    """The SR as DICOM JSON without the per-instance values above."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _PER_INSTANCE}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(ds.to_json_dict())


@pytest.fixture(autouse=True)
def a_spare_core(monkeypatch):
    """The helper starts only with a core to spare; the test machine may be busy."""
    monkeypatch.setattr(outputs_mod, "spare_core", lambda: True)
    yield
    outputs_mod._close_workers()  # none left running for the next test


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srw")
    vol, truth = dicom_study(tmp)
    return tmp, vol, truth


def test_sr_from_the_helper_equals_the_sr_built_in_process(sources, tmp_path):
    _, vol, truth = sources
    result, ev = truth_result(truth), truth_evidence(truth)
    here = write_outputs(tmp_path / "here", result, ev, vol)  # no helper: built in-process
    assert prefetch_sources(vol.meta) is True
    assert outputs_mod._WORKERS, "a helper was started for the DICOM sources"
    ahead = write_outputs(tmp_path / "ahead", result, ev, vol)
    assert not outputs_mod._WORKERS  # collected
    a = pydicom.dcmread(here / "report_sr.dcm")
    b = pydicom.dcmread(ahead / "report_sr.dcm")
    assert a.SOPInstanceUID != b.SOPInstanceUID  # two documents ...
    assert _comparable(a) == _comparable(b)  # ... with the same content, patient and references
    assert b.VerificationFlag == "UNVERIFIED" and len(b.ContentSequence) == len(a.ContentSequence)
    _, _, refs_a = load_evidence_index(here / "evidence.npz")
    _, _, refs_b = load_evidence_index(ahead / "evidence.npz")
    assert refs_a == refs_b and len(refs_b) == len(vol.meta["source_paths"])


def test_changed_source_files_are_read_again_not_taken_from_the_helper(sources, tmp_path):
    _, vol, truth = sources
    paths = vol.meta["source_paths"]
    worker = SRWorker(paths)
    try:
        st = os.stat(paths[0])
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with pytest.raises(RuntimeError):
            worker.build(truth_result(truth))
    finally:
        worker.close()
    # the writer falls back to reading the files itself
    assert prefetch_sources(vol.meta) is True
    os.utime(paths[1], ns=(os.stat(paths[1]).st_atime_ns, os.stat(paths[1]).st_mtime_ns + 1_000_000_000))
    out = write_outputs(tmp_path / "out", truth_result(truth), truth_evidence(truth), vol)
    ds = pydicom.dcmread(out / "report_sr.dcm")
    assert ds.Modality == "SR" and len(ds.ContentSequence) > 0


def test_a_dead_helper_still_gives_a_complete_sr(sources, tmp_path):
    _, vol, truth = sources
    assert prefetch_sources(vol.meta) is True
    worker = next(iter(outputs_mod._WORKERS.values()))
    worker._proc.kill()
    worker._proc.wait()
    out = write_outputs(tmp_path / "out", truth_result(truth), truth_evidence(truth), vol)
    ds = pydicom.dcmread(out / "report_sr.dcm")
    assert ds.Modality == "SR" and len(ds.ContentSequence) > 0
    assert not outputs_mod._WORKERS


def test_a_stuck_helper_is_given_up_after_its_timeout(sources):
    """A helper that is alive but never answers must not hold the report step up for ever:
    build() gives up after its timeout (the writer then builds the SR itself) and stops it."""
    import subprocess
    import time

    _, vol, _ = sources
    worker = SRWorker(vol.meta["source_paths"])
    worker._proc.kill()
    worker._proc.wait()
    # stands in for a stuck helper: reads nothing, answers nothing, never exits by itself
    worker._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    t0 = time.monotonic()
    # larger than a pipe's buffer (64 KiB): sending it alone would block on a helper that reads nothing
    with pytest.raises(RuntimeError, match="no answer"):
        worker.build(b"x" * 4_000_000, timeout_s=1.0)
    assert time.monotonic() - t0 < 30
    assert worker._proc.poll() is not None  # stopped, not left behind


def test_helper_answers_refs_only_when_there_is_nothing_to_report(sources):
    _, vol, truth = sources
    from dataclasses import replace

    empty = replace(truth_result(truth), screws=(), cages=(), levels=(), fractures=())
    data, refs = SRWorker(vol.meta["source_paths"]).build(None)
    assert data is None and len(refs) == len(vol.meta["source_paths"])
    assert all(r["SOPInstanceUID"] for r in refs)
    # and the writer lands no SR for such a result, helper or not
    prefetch_sources(vol.meta)
    assert not outputs_mod._wants_sr(empty)


def test_no_helper_on_a_busy_machine(sources, monkeypatch):
    _, vol, _ = sources
    monkeypatch.setattr(outputs_mod, "spare_core", lambda: False)
    assert prefetch_sources(vol.meta) is False
    assert not outputs_mod._WORKERS


def test_no_helper_for_nifti_input():
    assert prefetch_sources({"input_kind": "nifti", "source_paths": ["/x.nii"]}) is False
    assert prefetch_sources({"input_kind": "dicom"}) is False
    assert prefetch_sources(None) is False
    np.testing.assert_equal(len(outputs_mod._WORKERS) <= outputs_mod._WORKERS_KEEP, True)


def test_the_pipes_are_closed_only_after_the_send_has_ended(sources, monkeypatch):
    """Closing a buffered pipe while the sending thread still writes to it is a race
    (CPython raised ValueError from close() in CI): close() waits for the send first."""
    import time

    _, vol, truth = sources
    worker = SRWorker(vol.meta["source_paths"])
    worker._proc.kill()
    worker._proc.wait()
    seen = {}
    send = worker._send

    def slow_send(result):
        time.sleep(0.5)  # still sending when build() has seen the helper's end
        seen["stdin_open_during_send"] = not worker._proc.stdin.closed
        send(result)

    monkeypatch.setattr(worker, "_send", slow_send)
    with pytest.raises(RuntimeError):
        worker.build(truth_result(truth))
    assert seen == {"stdin_open_during_send": True}
    assert not worker._sender.is_alive() and worker._proc.stdin.closed
