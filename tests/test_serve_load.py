"""Load: five studies sent to ``fusionct serve`` at once are all analyzed, none lost or mixed up.

Five distinct phantom studies (sample_data: different seeds, vertebrae, instrumented levels
and so screw counts, one without any hardware; each with its bone, soft and localizer series)
are sent at the same time by five dcmtk ``storescu`` processes to the real ``fusionct serve``
(a subprocess, with a short quiet period). Within a bounded time every
``OUT_ROOT/<StudyInstanceUID>/measurements.json`` must appear and match its own study's
truth.json: the Study and bone Series Instance UIDs, the number of screws, and the number of
instances the receiver counted. The service listens on 127.0.0.1 only and its log carries no
patient identifier.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _net import listening_addresses  # noqa: E402  (tests/ is on sys.path under pytest)
from _proc import stop  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUIET_S = 3.0
DEADLINE_S = 600.0


def _ready():
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is not installed (Debian package dcmtk)")
    import importlib.util

    for mod in ("pipeline.detect", "pipeline.measure", "sample_data.dicom_writer"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not written yet; the load test needs the whole flow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def five_specs():
    """Five different studies: screw counts 4, 6, 4, 0 and 6."""
    from sample_data import PhantomSpec

    common = dict(spacing_mm=(0.6, 0.6, 1.2), noise_hu=20.0)
    return [
        PhantomSpec(seed=101, vertebrae=("L4", "L5", "S1"), instrumented_levels=("L4-L5",), **common),
        PhantomSpec(seed=102, vertebrae=("L3", "L4", "L5", "S1"), instrumented_levels=("L4-L5", "L5-S1"), **common),
        PhantomSpec(seed=103, vertebrae=("L2", "L3", "L4"), instrumented_levels=("L3-L4",), **common),
        PhantomSpec(seed=104, vertebrae=("L3", "L4", "L5"), instrumented_levels=(), cages={}, **common),
        PhantomSpec(seed=105, vertebrae=("L2", "L3", "L4", "L5"), instrumented_levels=("L2-L3", "L3-L4"), **common),
    ]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    _ready()
    from sample_data import write_dicom_study

    base = tmp_path_factory.mktemp("load")
    out = []
    for i, spec in enumerate(five_specs()):
        folder = write_dicom_study(spec, base / f"study {i}")
        truth = json.loads((folder / "truth.json").read_text())
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name != "truth.json")
        out.append((folder, truth, files))
    uids = {t["dicom"]["study_instance_uid"] for _, t, _ in out}
    assert len(uids) == 5, "the five studies must be distinct"
    return out


def test_five_studies_sent_at_once_are_all_analyzed_and_none_mixed_up(studies, prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    port, out_root = free_port(), tmp_path / "out root"
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), PYTHONUNBUFFERED="1",
               FUSIONCT_CACHE_DIR=str(tmp_path / "cache"))
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")
    exe = Path(sys.executable).with_name("fusionct")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_fh:
        serve = subprocess.Popen(head + ["serve", "--port", str(port), "--out-root", str(out_root),
                                         "--allow-ae", "SCANNER", "--quiet-seconds", str(QUIET_S)],
                                 cwd=REPO, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while "serving" not in log_path.read_text() and time.monotonic() - t0 < 180:
            assert serve.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert "serving" in log_path.read_text(), log_path.read_text()[-3000:]
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {"127.0.0.1"}, listening_addresses(port)

        # five storescu processes at once, one study each
        t_send = time.monotonic()
        senders = [subprocess.Popen(["storescu", "-aet", "SCANNER", "-aec", "FUSIONCT", "127.0.0.1", str(port),
                                     *files], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for _, _, files in studies]
        for s in senders:
            text = s.communicate(timeout=300)[0].decode(errors="replace")
            assert s.returncode == 0, text[-2000:]
        sent_s = time.monotonic() - t_send

        expected = {t["dicom"]["study_instance_uid"]: (t, files) for _, t, files in studies}

        def status(uid):
            try:
                return json.loads((out_root / ".intake" / uid / "status.json").read_text())
            except (OSError, ValueError):
                return {}

        pending = set(expected)
        while pending and time.monotonic() - t_send < DEADLINE_S:
            assert serve.poll() is None, log_path.read_text()[-3000:]
            pending = {u for u in pending if status(u).get("state") not in ("done", "failed")}
            time.sleep(0.5)
        all_done_s = time.monotonic() - t_send
        assert not pending, f"{len(pending)} of 5 studies not finished after {DEADLINE_S:.0f} s\n" \
                            + log_path.read_text()[-3000:]

        # every result is in its own study's folder and describes that study
        folders = sorted(p.name for p in out_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert folders == sorted(expected), folders
        for uid, (truth, files) in expected.items():
            st = status(uid)
            assert st.get("state") == "done", (uid, st)
            assert st.get("instances") == truth["dicom"]["n_files"] == len(files), "instances lost or mixed"
            doc = json.loads((out_root / uid / "measurements.json").read_text())
            assert doc["input"]["study_instance_uid"] == uid
            assert doc["input"]["series_instance_uid"] == truth["dicom"]["bone_series_uid"]
            assert len(doc["screws"]) == len(truth["screws"]), \
                f"{uid}: {len(doc['screws'])} screws measured, truth has {len(truth['screws'])}"
            if not truth["screws"] and not truth["cages"]:
                assert any("no spinal hardware" in n.lower() for n in doc.get("notes", [])), doc.get("notes")
        log = log_path.read_text()
        for secret in ("PHANTOM^FUSION", "PHANTOM FUSION", "19580312", "FCT-0"):
            assert secret not in log, f"patient identifier {secret!r} in the service log"
        print(f"\nload test: 5 studies ({sum(len(f) for _, _, f in studies)} instances) sent in {sent_s:.1f} s by "
              f"5 concurrent storescu; all analyzed {all_done_s:.1f} s after sending started")
    finally:
        stop(serve, 120)
