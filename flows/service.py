"""``fusionct serve``: a department intake that analyzes each study once it has arrived.

Two ways in, one store:

- a DICOM C-STORE receiver (pynetdicom), bound to 127.0.0.1 unless told otherwise, that
  accepts only the configured calling AE titles when a list is given;
- a watched folder (``--watch DIR``): an inbox; DICOM files dropped there (any nesting, any
  names) are moved into the store once they have stopped changing. Other files are left.

Every instance is written atomically to
``OUT_ROOT/.intake/<StudyUID>/input/<SeriesUID>/<SOPInstanceUID>.dcm``; file and folder
names come only from UIDs, sanitised so they cannot leave the store, never from patient
data. A study is complete when no new instance has arrived for ``quiet_s`` seconds; the
service then freezes a hard-linked snapshot of what arrived and launches one analysis flow
run for it, writing to ``OUT_ROOT/<StudyUID>/``. Instances that arrive during a run start a
new quiet period and a fresh run afterwards. Several studies run at once, each in its own
folder; runs of the same study are serialised by a per-study lock (also across processes).
Timings and the outcome of each run go to ``OUT_ROOT/.intake/<StudyUID>/status.json``.

Logs name studies by their Study Instance UID (the output folder's name) and never carry
patient names, IDs or birth dates.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.atomic import copy_file_atomic, write_bytes_atomic

log = logging.getLogger("fusionct.service")

# (input_dir, outdir, study_uid) -> anything; raising marks the run failed.
Launcher = Callable[[Path, Path, str], object]

INTAKE = ".intake"
STATUS_OK = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000  # no usable Study/Series/SOP Instance UID
STATUS_OUT_OF_RESOURCES = 0xA700   # the disk refused the write

_UNSAFE = re.compile(r"[^0-9A-Za-z.\-]")


# ----------------------------------------------------------------------------- names
def safe_name(uid: str) -> str:
    """A file or folder name made from a DICOM UID that cannot leave its parent folder.

    A conformant UID (digits and dots, at most 64 characters) is returned unchanged, so the
    results of study ``1.2.3`` land in ``OUT_ROOT/1.2.3/``. Anything else (letters are
    kept, other characters become ``_``) gets a short hash of the original appended so two
    different bad UIDs cannot share a folder; a name is never empty, ``.``, ``..`` or hidden.

    Parameters
    ----------
    uid : str
        The UID as received (may carry padding, NULs or hostile characters).

    Returns
    -------
    str
        A single path component of ``[0-9A-Za-z._-]``.
    """
    raw = str(uid if uid is not None else "")
    text = raw.strip().strip("\x00").strip()
    clean = _UNSAFE.sub("_", text)[:64]
    if clean == text and clean and not clean.startswith((".", "-")) and len(text) <= 64:
        return clean
    digest = hashlib.blake2b(raw.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    return f"x{clean.lstrip('.-')[:40]}_{digest}"


# ----------------------------------------------------------------------------- store
def _write_atomic(path: Path, data: bytes | None = None, src: Path | None = None) -> Path:
    """Write ``data`` (or copy ``src``) to ``path`` atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if src is not None:
        return copy_file_atomic(src, path, mode=0o640)
    return write_bytes_atomic(path, data, mode=0o640)


class StudyStore:
    """The folders of ``OUT_ROOT``: received instances, run snapshots, results, status.

    Parameters
    ----------
    out_root : path-like
        ``OUT_ROOT``; results go to ``OUT_ROOT/<StudyUID>/``, intake to ``OUT_ROOT/.intake``.
    """

    def __init__(self, out_root: str | Path):
        self.root = Path(out_root).resolve()
        self.intake = self.root / INTAKE
        self.intake.mkdir(parents=True, exist_ok=True)
        self._status_lock = threading.Lock()

    def study_dir(self, study_uid: str) -> Path:
        return self.intake / safe_name(study_uid)

    def input_dir(self, study_uid: str) -> Path:
        return self.study_dir(study_uid) / "input"

    def outdir(self, study_uid: str) -> Path:
        return self.root / safe_name(study_uid)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where one instance is kept; always inside ``input_dir(study_uid)``."""
        path = self.input_dir(study_uid) / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"
        if self.input_dir(study_uid).resolve() not in path.resolve().parents:  # belt and braces
            raise ValueError("instance path escapes the store")
        return path

    def store_bytes(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Keep one received instance (a Part 10 file's bytes); a re-sent instance replaces it."""
        return _write_atomic(self.instance_path(study_uid, series_uid, sop_uid), data=data)

    def store_file(self, study_uid: str, series_uid: str, sop_uid: str, src: Path) -> Path:
        """Copy one DICOM file into the store atomically."""
        return _write_atomic(self.instance_path(study_uid, series_uid, sop_uid), src=src)

    def snapshot(self, study_uid: str) -> Path:
        """Freeze what has arrived so far: hard links (a copy where links fail) in a run folder.

        Later arrivals replace files in ``input/`` by rename, so the snapshot keeps the
        exact bytes the run reads. Call with the study's ``lock`` held.
        """
        src_root = self.input_dir(study_uid)
        runs = self.study_dir(study_uid) / "runs"
        if runs.exists():  # a snapshot left by a killed service (callers hold the study lock)
            for stale in runs.iterdir():
                shutil.rmtree(stale, ignore_errors=True)
        # always the same path: a re-sent identical study is a cache hit, and the cached
        # volume's source file paths (read again for the SR) must exist again
        dst_root = runs / "current"
        for src in sorted(src_root.rglob("*")):
            if not src.is_file() or src.name.startswith("."):
                continue
            dst = dst_root / src.relative_to(src_root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return dst_root

    def count_instances(self, study_uid: str) -> int:
        return sum(1 for f in self.input_dir(study_uid).rglob("*.dcm") if not f.name.startswith("."))

    def write_status(self, study_uid: str, **fields) -> dict:
        """Merge ``fields`` into ``status.json`` of the study (atomic)."""
        path = self.study_dir(study_uid) / "status.json"
        with self._status_lock:
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                status = {}
            status.update(fields, study_instance_uid=str(study_uid))
            _write_atomic(path, data=(json.dumps(status, indent=2) + "\n").encode())
        return status

    def read_status(self, study_uid: str) -> dict:
        try:
            return json.loads((self.study_dir(study_uid) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    @contextmanager
    def lock(self, study_uid: str):
        """An exclusive per-study lock (``flock``) held while a run reads and writes the study."""
        d = self.study_dir(study_uid)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- completion
@dataclass
class _StudyState:
    generation: int = 0          # instances received so far (counting re-sends)
    launched_generation: int = 0
    last_received: float = 0.0   # monotonic clock
    last_received_wall: float = 0.0
    running: bool = False


class CompletionTracker:
    """Decides when a study is complete: no new instance for ``quiet_s`` seconds.

    DICOM has no "end of study" message, so a quiet period is what PACS routers use too.
    A study is due once quiet, not already running, and holding instances no run has seen.

    Parameters
    ----------
    quiet_s : float
        Seconds without a new instance after which the study counts as complete.
    clock : callable
        Monotonic seconds (injectable for tests).
    """

    def __init__(self, quiet_s: float, clock: Callable[[], float] = time.monotonic):
        if not quiet_s >= 0:
            raise ValueError("quiet_s must be >= 0")
        self.quiet_s = float(quiet_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._studies: dict[str, _StudyState] = {}

    def received(self, study_uid: str) -> int:
        """One more instance of ``study_uid`` arrived now; returns how many no run has seen."""
        with self._lock:
            st = self._studies.setdefault(study_uid, _StudyState())
            st.generation += 1
            st.last_received = self.clock()
            st.last_received_wall = time.time()
            return st.generation - st.launched_generation

    def due(self) -> list[str]:
        """Studies that are complete and not yet analyzed in their current form."""
        now = self.clock()
        with self._lock:
            return [uid for uid, st in self._studies.items()
                    if not st.running and st.generation > st.launched_generation
                    and now - st.last_received >= self.quiet_s]

    def start(self, study_uid: str) -> tuple[int, float]:
        """Mark a run started; returns (generation it covers, wall time of the last instance)."""
        with self._lock:
            st = self._studies[study_uid]
            st.running = True
            st.launched_generation = st.generation
            return st.generation, st.last_received_wall

    def finish(self, study_uid: str) -> None:
        with self._lock:
            self._studies[study_uid].running = False

    def busy(self) -> bool:
        """True while any study is running or waiting out its quiet period."""
        with self._lock:
            return any(st.running or st.generation > st.launched_generation
                       for st in self._studies.values())


# ----------------------------------------------------------------------------- launching
def flow_launcher(config_path: str | None = None) -> Launcher:
    """Run the Prefect analysis flow in this process, one flow run per study."""

    def launch(input_dir: Path, outdir: Path, study_uid: str):
        from flows.analyze import analyze_flow

        named = analyze_flow.with_options(flow_run_name=f"study-{safe_name(study_uid)}")
        return named(input_path=str(input_dir), outdir=str(outdir), config_path=config_path)

    return launch


def deployment_launcher(deployment: str, config_path: str | None = None,
                        timeout_s: float | None = None) -> Launcher:
    """Launch a run of a served deployment (``python -m flows.deploy``) and wait for it.

    The work then happens wherever the deployment is served, and staff see the run in the
    Prefect UI beside the ones they launch themselves.
    """

    def launch(input_dir: Path, outdir: Path, study_uid: str):
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, timeout=timeout_s,
                             parameters={"input_path": str(input_dir), "outdir": str(outdir),
                                         "config_path": config_path},
                             flow_run_name=f"study-{safe_name(study_uid)}")
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"flow run {run.id} ended {run.state.name if run.state else 'unknown'}")
        return run

    return launch


def warm_up_prefect() -> None:
    """Start (or reach) the Prefect API now, so the first study does not wait for it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.hello()


# ----------------------------------------------------------------------------- service
class IntakeService:
    """The receiver, the watched folder and the completion monitor of one ``OUT_ROOT``.

    Parameters
    ----------
    out_root : path-like
        Results go to ``out_root/<StudyUID>/``.
    quiet_s : float
        Seconds without a new instance after which a study is complete.
    launch : callable, optional
        ``launch(input_dir, outdir, study_uid)`` runs the analysis; defaults to the Prefect
        flow in this process (``flow_launcher``).
    port : int or None
        C-STORE port; ``None`` or 0 runs no receiver (watch-only).
    ae_title : str
        Our AE title.
    host : str
        Address to bind; loopback unless the department network is meant.
    allowed_aes : list of str, optional
        When given, only these calling AE titles may associate.
    watch : path-like, optional
        An inbox folder to poll for DICOM files.
    max_concurrent : int
        Studies analyzed at the same time.
    poll_s : float
        How often the quiet periods and the watched folder are checked.
    settle_s : float
        A watched file is taken once unchanged for this long (it may still be copying).
    """

    def __init__(self, out_root, *, quiet_s: float = 10.0, launch: Launcher | None = None,
                 port: int | None = 11112, ae_title: str = "FUSIONCT", host: str = "127.0.0.1",
                 allowed_aes=None, watch=None, max_concurrent: int = 2, poll_s: float = 0.5,
                 settle_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.store = StudyStore(out_root)
        self.tracker = CompletionTracker(quiet_s, clock=clock)
        self.launch = launch or flow_launcher()
        self.port = port or None
        self.ae_title = ae_title
        self.host = host
        self.allowed_aes = [a.strip() for a in (allowed_aes or []) if a and a.strip()]
        self.watch = Path(watch).resolve() if watch else None
        self.poll_s = poll_s
        self.settle_s = settle_s
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(max_concurrent)),
                                        thread_name_prefix="fusionct-run")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._skipped: dict[Path, float] = {}   # watched non-DICOM files: path -> mtime seen
        self._per_assoc: dict[int, list[int]] = {}  # association -> [stored, refused]
        self._futures = []
        self.results: dict[str, dict] = {}      # study_uid -> last status (for callers/tests)

    # -------------------------------------------------------------- C-STORE
    def handle_store(self, event) -> int:
        """EVT_C_STORE handler: keep the instance, note the study's activity, return a status."""
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID", "") or "").strip()
        except Exception:  # noqa: BLE001 - a peer's malformed dataset must not kill the server
            log.warning("refused an instance whose header cannot be read")
            return self._count(event, STATUS_CANNOT_UNDERSTAND)
        if not (study_uid and series_uid and sop_uid):
            log.warning("refused an instance without Study/Series/SOP Instance UID")
            return self._count(event, STATUS_CANNOT_UNDERSTAND)
        try:
            self.store.store_bytes(study_uid, series_uid, sop_uid, event.encoded_dataset(include_meta=True))
        except OSError as exc:
            log.error("could not store an instance of study %s: %s", safe_name(study_uid), exc.strerror)
            return self._count(event, STATUS_OUT_OF_RESOURCES)
        self._received(study_uid)
        return self._count(event, STATUS_OK)

    def _count(self, event, status: int) -> int:
        counts = self._per_assoc.setdefault(id(event.assoc), [0, 0])
        counts[0 if status == STATUS_OK else 1] += 1
        return status

    def _on_closed(self, event) -> None:
        stored, refused = self._per_assoc.pop(id(event.assoc), [0, 0])
        if stored or refused:
            log.info("association from %r closed: %d instance(s) stored, %d refused",
                     event.assoc.requestor.ae_title, stored, refused)

    def _received(self, study_uid: str) -> None:
        if self.tracker.received(study_uid) == 1:
            # first instance of a new batch: leave a trace so a restarted service picks it up
            self.store.write_status(study_uid, state="receiving")
            log.info("receiving study %s", safe_name(study_uid))

    def recover(self) -> list[str]:
        """Re-queue studies a previous run of the service received but never finished."""
        requeued = []
        for status_path in sorted(self.store.intake.glob("*/status.json")):
            try:
                status = json.loads(status_path.read_text())
            except (OSError, ValueError):
                continue
            uid = status.get("study_instance_uid")
            if uid and status.get("state") in ("receiving", "running") and self.store.count_instances(uid):
                self.tracker.received(uid)
                requeued.append(uid)
        if requeued:
            log.info("re-queued %d interrupted stud%s", len(requeued), "y" if len(requeued) == 1 else "ies")
        return requeued

    def _on_rejected(self, event) -> None:
        log.warning("rejected an association from calling AE %r (not in --allow-ae)",
                    event.assoc.requestor.ae_title)

    def _start_receiver(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0  # no limit on the PDUs peers send us (fewer, larger reads)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allowed_aes:
            ae.require_calling_aet = self.allowed_aes
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed)]
        self._server = ae.start_server((self.host, int(self.port)), block=False, evt_handlers=handlers)
        log.info("listening for C-STORE on %s:%d as %s%s", self.host, self.port, self.ae_title,
                 f" (calling AEs: {', '.join(self.allowed_aes)})" if self.allowed_aes else "")

    # -------------------------------------------------------------- watched folder
    def ingest_file(self, path: Path) -> bool:
        """Move one DICOM file from the watched folder into the store; False if not DICOM."""
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM (or unreadable): leave it where it is
            return False
        study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not sop_uid and getattr(ds, "file_meta", None) is not None:
            sop_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
        if not (study_uid and series_uid and sop_uid):
            return False
        self.store.store_file(study_uid, series_uid, sop_uid, path)
        path.unlink()
        self._received(study_uid)
        return True

    def scan_watch_folder(self) -> int:
        """One pass over the inbox: take every settled file; returns how many were taken."""
        if self.watch is None or not self.watch.is_dir():
            return 0
        taken, now = 0, time.time()
        for path in sorted(self.watch.rglob("*")):
            if self._stop.is_set():
                break
            try:
                if path.is_symlink() or not path.is_file() or path.name.startswith("."):
                    continue
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if now - mtime < self.settle_s or self._skipped.get(path) == mtime:
                continue
            try:
                if self.ingest_file(path):
                    taken += 1
                else:
                    self._skipped[path] = mtime
            except OSError as exc:
                log.warning("could not take a watched file (%s); will retry", exc.strerror)
        if taken:  # tidy emptied sub-folders of the inbox (never the inbox itself)
            for d in sorted((p for p in self.watch.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
        return taken

    # -------------------------------------------------------------- runs
    def _run(self, study_uid: str, generation: int, last_wall: float, complete_wall: float) -> dict:
        outdir = self.store.outdir(study_uid)
        snap = None
        status = {"state": "running", "instances": None, "last_instance_at": last_wall,
                  "complete_at": complete_wall, "started_at": None, "finished_at": None,
                  "outdir": str(outdir), "error": None}
        try:
            with self.store.lock(study_uid):
                status["instances"] = self.store.count_instances(study_uid)
                status["started_at"] = time.time()
                self.store.write_status(study_uid, **status)
                log.info("study %s complete (%d instances, quiet %.1f s); analyzing",
                         safe_name(study_uid), status["instances"], self.tracker.quiet_s)
                snap = self.store.snapshot(study_uid)
                try:
                    self.launch(snap, outdir, study_uid)
                    status["state"] = "done"
                except Exception as exc:  # noqa: BLE001 - one failed study must not stop the service
                    status["state"] = "failed"
                    status["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                finally:
                    shutil.rmtree(snap, ignore_errors=True)
                status["finished_at"] = time.time()
                status["seconds_from_last_instance"] = round(status["finished_at"] - last_wall, 3)
                status["seconds_analysis"] = round(status["finished_at"] - status["started_at"], 3)
                self.store.write_status(study_uid, **status)
        except Exception as exc:  # noqa: BLE001
            status.update(state="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            log.error("study %s: %s", safe_name(study_uid), status["error"])
        finally:
            self.results[study_uid] = status
            self.tracker.finish(study_uid)
        if status["state"] == "done":
            log.info("study %s analyzed: results in %s, %.1f s after its last instance "
                     "(%.1f s analysis)", safe_name(study_uid), outdir,
                     status["seconds_from_last_instance"], status["seconds_analysis"])
        else:
            log.error("study %s failed: %s", safe_name(study_uid), status["error"])
        return status

    def check_complete(self) -> list[str]:
        """Launch a run for every study that has gone quiet; returns their UIDs."""
        launched = []
        for study_uid in self.tracker.due():
            generation, last_wall = self.tracker.start(study_uid)
            self._futures.append(self._pool.submit(self._run, study_uid, generation, last_wall, time.time()))
            launched.append(study_uid)
        self._futures = [f for f in self._futures if not f.done()]
        return launched

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.watch is not None:
                    self.scan_watch_folder()
                self.check_complete()
            except Exception as exc:  # noqa: BLE001 - keep the service alive, say what happened
                log.error("monitor: %s: %s", type(exc).__name__, exc)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "IntakeService":
        if self.watch is not None:
            self.watch.mkdir(parents=True, exist_ok=True)
            log.info("watching %s for DICOM files", self.watch)
        self.recover()
        if self.port:
            self._start_receiver()
        t = threading.Thread(target=self._monitor, name="fusionct-monitor", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("results go to %s/<StudyInstanceUID>/; a study is complete after %.1f s quiet",
                 self.store.root, self.tracker.quiet_s)
        return self

    def idle(self) -> bool:
        """True when nothing is running or waiting to run."""
        return not self.tracker.busy() and all(f.done() for f in self._futures)

    def stop(self, wait: bool = True) -> None:
        """Stop accepting, stop the monitor, and (by default) let running analyses finish."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(timeout=10)
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _configure_logging() -> None:
    logger = logging.getLogger("fusionct")
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("fusionct serve %(asctime)s %(levelname)s %(message)s",
                                         "%Y-%m-%dT%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(port: int = 11112, ae_title: str = "FUSIONCT", watch=None, out_root="fusionct_results",
          host: str = "127.0.0.1", allowed_aes=None, quiet_s: float = 10.0,
          launch: Launcher | None = None, max_concurrent: int = 2, config_path: str | None = None,
          stop_event: threading.Event | None = None) -> None:
    """Run the intake until SIGINT/SIGTERM (or ``stop_event``); see the module docstring.

    ``FUSIONCT_DEPLOYMENT=<flow>/<deployment>`` hands each study to a served deployment
    (``python -m flows.deploy``) instead of running the flow in this process.
    """
    _configure_logging()
    # a fresh ephemeral server migrates its database first; on a busy machine that takes
    # longer than Prefect's default wait (set before Prefect reads its settings)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if launch is None:
        deployment = os.environ.get("FUSIONCT_DEPLOYMENT")
        launch = deployment_launcher(deployment, config_path) if deployment else flow_launcher(config_path)
        try:
            warm_up_prefect()
        except Exception as exc:  # noqa: BLE001 - the first run will try again and report
            log.warning("Prefect API not reachable yet: %s", exc)
    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())
    service = IntakeService(out_root, quiet_s=quiet_s, launch=launch, port=port, ae_title=ae_title,
                            host=host, allowed_aes=allowed_aes, watch=watch,
                            max_concurrent=max_concurrent)
    service.start()
    print(f"fusionct: serving; results in {service.store.root}/<StudyInstanceUID>/ (Ctrl-C stops)",
          flush=True)
    try:
        while not stop_event.wait(0.5):
            pass
    finally:
        log.info("stopping; letting running analyses finish")
        service.stop(wait=True)


__all__ = ["CompletionTracker", "IntakeService", "StudyStore", "deployment_launcher", "flow_launcher",
           "safe_name", "serve", "warm_up_prefect"]
