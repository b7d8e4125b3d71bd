"""Write every output file of one analyzed study, atomically, without destroying a
confirmed result.

Files (CONTRACT.md "Files written to OUTDIR"): measurements.json, levels.csv, screws.csv,
cages.csv, report.html, report_sr.dcm (DICOM input only) and evidence.npz (the arrays each
number was read from, the key images, and the source-image references the verified SR
needs later).

How a run lands
---------------
1. Every file is written and fsynced into a staging folder *beside* the destination
   (``.fusionct-staging-*``, same file system, so each move is one atomic rename; inside
   the destination instead when its parent is read-only or another file system).
2. Files move in one by one with ``os.replace``; ``measurements.json`` moves **last**, so a
   run killed at any moment never leaves a half-written measurements.json, and a folder
   whose measurements.json is present always holds that run's complete set (or, while a
   newer run is landing, the earlier complete measurements.json).
3. Output files of an earlier run that this run does not write (e.g. ``report_sr.dcm``
   when the new input is NIfTI) are removed after measurements.json landed.

Versioning rule (a confirmed result is never overwritten)
---------------------------------------------------------
When OUTDIR already holds a CONFIRMED result (``confirmation.json`` exists, or
measurements.json says ``"status": "confirmed"``), nothing in OUTDIR is touched: the new
result is written to ``OUTDIR/versions/<UTC timestamp>/`` (e.g.
``versions/20260101T120000.123456Z``; a suffix ``-2``... keeps names unique) and that path is
returned. A draft (unconfirmed) result in OUTDIR is simply replaced.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.atomic import fsync_dir, replace_into, write_bytes_atomic
from pipeline.report_csv import csv_texts
from pipeline.report_html import build_report_html, evidence_for, finding_key, make_figures
from pipeline.report_json import build_measurements, dumps, is_identifying_key, validate_measurements
from pipeline.render import Figure
from pipeline.results import CageEvidence, LevelEvidence, ScrewEvidence, StudyResult

MEASUREMENTS = "measurements.json"
CONFIRMATION = "confirmation.json"
SR_DRAFT = "report_sr.dcm"
SR_VERIFIED = "report_sr_verified.dcm"
EVIDENCE = "evidence.npz"
OUTPUT_FILES = ("levels.csv", "screws.csv", "cages.csv", "report.html", SR_DRAFT, EVIDENCE,
                MEASUREMENTS)
VERSIONS_DIR = "versions"
STAGING_PREFIX = ".fusionct-staging-"


# ------------------------------------------------------------------------- versioning
def is_confirmed(folder: str | Path) -> bool:
    """True when ``folder`` holds a confirmed result (confirmation.json, or measurements.json
    with status ``confirmed``); such a folder is never written again."""
    folder = Path(folder)
    if (folder / CONFIRMATION).exists():
        return True
    try:
        doc = json.loads((folder / MEASUREMENTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("status") == "confirmed"


def utc_stamp(now: _dt.datetime | None = None) -> str:
    """Compact UTC timestamp for a version folder name: ``20260101T120000.123456Z``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def target_folder(outdir: str | Path) -> Path:
    """Where a new result for ``outdir`` goes: ``outdir`` itself unless it holds a confirmed
    result, else a new ``outdir/versions/<UTC timestamp>`` folder (see module docstring)."""
    outdir = Path(outdir)
    if not is_confirmed(outdir):
        return outdir
    base = outdir / VERSIONS_DIR / utc_stamp()
    cand, n = base, 1
    while cand.exists():
        n += 1
        cand = base.with_name(f"{base.name}-{n}")
    return cand


# --------------------------------------------------------------------------- evidence
def _meta_json(meta: Mapping) -> str:
    """Non-identifying, JSON-able part of ``volume.meta`` (no paths, no names)."""
    keep = {}
    for k, v in dict(meta or {}).items():
        if is_identifying_key(k) or k == "source_paths":
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        keep[k] = v
    return json.dumps(keep)


def evidence_arrays(result: StudyResult, evidence: Mapping, figures: Mapping[str, list[Figure]],
                    meta: Mapping, source_refs: list[dict] | None) -> dict[str, np.ndarray]:
    """Everything evidence.npz holds, as named arrays.

    ``index_json`` lists the findings: ``{"key", "kind", "id", "prefix", "figures": [caption]}``.
    Arrays of finding *n* are named ``f<n>__<field>``; its PNG images ``f<n>__png<m>`` (bytes
    as uint8). ``meta_json`` holds the non-identifying volume meta and ``source_refs_json``
    the source-image UIDs and geometry (DICOM input).
    """
    arrays: dict[str, np.ndarray] = {}
    index = []
    items = ([("screw", s.id, ScrewEvidence) for s in result.screws]
             + [("cage", c.id, CageEvidence) for c in result.cages]
             + [("level", lv.level, LevelEvidence) for lv in result.levels])
    for n, (kind, ident, cls) in enumerate(items):
        prefix = f"f{n}"
        key = finding_key(kind, ident)
        ev = evidence_for(evidence, kind, ident, cls)
        fields: list[str] = []
        if isinstance(ev, ScrewEvidence):
            vals = {"widths_mm": ev.widths_mm, "station_lps_mm": ev.station_lps_mm,
                    "azimuth_dirs": ev.azimuth_dirs, "true_radius_mm": ev.true_radius_mm}
        elif isinstance(ev, CageEvidence):
            vals = {"superior_plane_point_lps_mm": ev.superior_plane.point_lps_mm,
                    "superior_plane_normal": ev.superior_plane.normal,
                    "inferior_plane_point_lps_mm": ev.inferior_plane.point_lps_mm,
                    "inferior_plane_normal": ev.inferior_plane.normal,
                    "deepest_superior_lps_mm": ev.deepest_superior_lps_mm,
                    "deepest_inferior_lps_mm": ev.deepest_inferior_lps_mm,
                    "rim_points_superior_lps_mm": ev.rim_points_superior_lps_mm,
                    "rim_points_inferior_lps_mm": ev.rim_points_inferior_lps_mm}
        elif isinstance(ev, LevelEvidence):
            vals = {"origin_lps_mm": ev.origin_lps_mm, "axis_u": ev.axis_u, "axis_v": ev.axis_v,
                    "step_mm": ev.step_mm, "domain": ev.domain, "bridged": ev.bridged}
            if ev.estimated is not None:
                vals["estimated"] = ev.estimated
        else:
            vals = {}
        for name, v in vals.items():
            arrays[f"{prefix}__{name}"] = np.asarray(v)
            fields.append(name)
        figs = figures.get(key, [])
        for m, fig in enumerate(figs):
            arrays[f"{prefix}__png{m}"] = np.frombuffer(fig.png, dtype=np.uint8)
        index.append({"key": key, "kind": kind, "id": ident, "prefix": prefix,
                      "fields": fields, "figures": [f.caption for f in figs]})
    arrays["index_json"] = np.array(json.dumps(index))
    arrays["meta_json"] = np.array(_meta_json(meta))
    arrays["source_refs_json"] = np.array(json.dumps(source_refs or []))
    return arrays


def load_evidence_index(path: str | Path) -> tuple[list[dict], dict, list[dict]]:
    """``(index, meta, source_refs)`` from an evidence.npz (see ``evidence_arrays``)."""
    with np.load(path, allow_pickle=False) as z:
        index = json.loads(str(z["index_json"]))
        meta = json.loads(str(z["meta_json"])) if "meta_json" in z else {}
        refs = json.loads(str(z["source_refs_json"])) if "source_refs_json" in z else []
    return index, meta, refs


def load_figures(path: str | Path) -> dict[str, list[Figure]]:
    """Key images per finding key, read back from an evidence.npz."""
    out: dict[str, list[Figure]] = {}
    with np.load(path, allow_pickle=False) as z:
        index = json.loads(str(z["index_json"]))
        for entry in index:
            out[entry["key"]] = [Figure(cap, z[f"{entry['prefix']}__png{m}"].tobytes())
                                 for m, cap in enumerate(entry["figures"])]
    return out


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------ the SR, prepared ahead
# What the SR needs besides the result - the SR library (highdicom: ~0.5 s to import, and
# its DICOM standard tables on first use), the source images' headers and their references -
# depends only on the loaded volume. ``prefetch_sources`` starts a helper process on it
# (``report_sr.SRWorker``) as soon as the volume is loaded, so that work runs on the other
# core while this process detects and measures; ``render_files`` hands the helper the
# result and gets the SR file back. Without a helper (or when it fails) the SR is built here,
# as before: the file's content is the same either way.
_WORKERS_LOCK = threading.Lock()
_WORKERS: dict[tuple, object] = {}
_WORKERS_KEEP = 2  # studies prepared ahead at most (a failed analysis never collects its own)


def spare_core() -> bool:
    """Whether the machine has a core to spare for the SR helper: its 1-minute load average
    is below its core count. On a machine already busy with other work the helper's own
    start-up (an interpreter, its imports: ~0.5 s of CPU) would only compete with the
    analysis for the same cores, so the SR is then built in-process, as before."""
    try:
        return os.getloadavg()[0] < (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average on this platform
        return True


def prefetch_sources(meta: Mapping | None) -> bool:
    """Start preparing the SR of a volume with ``meta`` in a helper process.

    Only for DICOM input with ``source_paths``, and only with a core to spare
    (:func:`spare_core`). Returns True when a helper started.
    """
    meta = dict(meta or {})
    paths = tuple(str(p) for p in (meta.get("source_paths") or ()))
    if meta.get("input_kind") != "dicom" or not paths or not spare_core():
        return False
    from pipeline.report_sr import SRWorker

    with _WORKERS_LOCK:
        old = _WORKERS.pop(paths, None)
        while len(_WORKERS) >= _WORKERS_KEEP:
            _WORKERS.pop(next(iter(_WORKERS))).close()
    if old is not None:
        old.close()
    try:
        worker = SRWorker(paths)
    except OSError:  # no helper (e.g. no processes left): the SR is built here later
        return False
    with _WORKERS_LOCK:
        _WORKERS[paths] = worker
    return True


def _take_worker(paths) -> object | None:
    with _WORKERS_LOCK:
        return _WORKERS.pop(tuple(str(p) for p in paths), None)


def _close_workers() -> None:
    with _WORKERS_LOCK:
        workers = list(_WORKERS.values())
        _WORKERS.clear()
    for w in workers:
        w.close()


atexit.register(_close_workers)


# ------------------------------------------------------------------------------ writing
def _wants_sr(result: StudyResult) -> bool:
    """TID 1500 needs at least one measurement group: a study where nothing could be
    measured (no hardware, no spine in view) gets no SR; the report says why."""
    return bool(result.screws or result.cages or result.levels or getattr(result, "fractures", ()))


def _source_paths(meta: Mapping) -> list:
    paths = meta.get("source_paths") or []
    if not paths:
        raise ValueError("DICOM input without source_paths: cannot reference the source series")
    return paths


def _sr_here(result: StudyResult, paths) -> tuple[bytes | None, list[dict]]:
    """(report_sr.dcm bytes or None, source refs), built in this process."""
    from pipeline import report_sr

    headers = report_sr.read_source_headers(paths)
    refs = report_sr.source_refs(headers)
    return (report_sr.sr_bytes(report_sr.build_sr(result, headers)) if _wants_sr(result) else None), refs


def _sr_from_worker(worker, result: StudyResult, paths) -> tuple[bytes | None, list[dict]]:
    """The same from the helper :func:`prefetch_sources` started; built here if it failed."""
    try:
        return worker.build(result if _wants_sr(result) else None)
    except RuntimeError:
        return _sr_here(result, paths)


def render_files(result: StudyResult, evidence: Mapping, volume) -> dict[str, bytes]:
    """Every output file's content, in memory, keyed by file name (nothing written yet).

    With an SR helper at work (:func:`prefetch_sources`) the SR is collected from it while
    this process renders the key images, the HTML and the evidence archive.
    """
    meta = dict(getattr(volume, "meta", {}) or {})
    dicom = meta.get("input_kind") == "dicom"
    paths = _source_paths(meta) if dicom else None
    worker = _take_worker(paths) if dicom else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionct-sr") as pool:
        pending = pool.submit(_sr_from_worker, worker, result, paths) if worker else None
        doc = build_measurements(result, volume)
        validate_measurements(doc)  # never land a measurements.json that breaks the contract
        figures = make_figures(result, evidence, volume)
        files: dict[str, bytes] = {}
        for name, text in csv_texts(result).items():
            files[name] = text.encode("utf-8")
        files["report.html"] = build_report_html(result, meta, figures, doc["input"]).encode("utf-8")
        if pending is not None:
            sr_data, refs = pending.result()
        elif dicom:
            sr_data, refs = _sr_here(result, paths)
        else:
            sr_data, refs = None, None
    if sr_data is not None:
        files[SR_DRAFT] = sr_data
    files[EVIDENCE] = npz_bytes(evidence_arrays(result, evidence, figures, meta, refs))
    files[MEASUREMENTS] = dumps(doc).encode("utf-8")
    return files


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_parent(target: Path) -> Path:
    """Where the staging folder goes: beside ``target`` when that folder is writable and on
    the same file system (so every move is one rename), else inside ``target`` itself
    (e.g. OUTDIR is a mount point or its parent is read-only)."""
    parent = target.parent
    try:
        if os.access(parent, os.W_OK) and os.stat(parent).st_dev == os.stat(target).st_dev:
            return parent
    except OSError:
        pass
    return target


def remove_dead_staging(target: Path) -> list[Path]:
    """Delete staging folders a killed earlier run left for ``target`` (their process id,
    part of the name, is no longer running). Returns what was removed."""
    removed = []
    pat = re.compile(re.escape(f"{STAGING_PREFIX}{target.name}-") + r"(\d+)-[a-z0-9_]{8}$")  # mkdtemp's suffix
    for folder in {target.parent, target}:
        for p in folder.glob(f"{STAGING_PREFIX}{target.name}-*"):
            m = pat.match(p.name)
            if m and p.is_dir() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def land_files(files: Mapping[str, bytes], target: str | Path) -> Path:
    """Stage ``files`` beside ``target`` and move them in, measurements.json last.

    Also removes this project's output files an earlier run left in ``target`` that this
    run did not produce, once measurements.json has landed.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-{os.getpid()}-",
                                    dir=staging_parent(target)))
    try:
        for name, data in files.items():
            write_bytes_atomic(staging / name, data)
        fsync_dir(staging)
        order = [n for n in files if n != MEASUREMENTS] + ([MEASUREMENTS] if MEASUREMENTS in files else [])
        for name in order:
            replace_into(staging / name, target / name)
        for name in OUTPUT_FILES:
            if name not in files and (target / name).exists() and name != MEASUREMENTS:
                os.unlink(target / name)
        fsync_dir(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_outputs(outdir: str | Path, result: StudyResult, evidence: Mapping, volume) -> Path:
    """Write all output files of one study and return the folder written.

    Parameters
    ----------
    outdir : path-like
        The study's output folder (created if missing).
    result : StudyResult
        What every writer reads (JSON, CSV, HTML, SR all come from it).
    evidence : dict
        ``ScrewEvidence`` / ``CageEvidence`` / ``LevelEvidence`` by finding id (or
        ``kind:id``); used for the key images and saved to evidence.npz.
    volume : Volume
        The analyzed CT; ``meta["input_kind"] == "dicom"`` with ``meta["source_paths"]``
        adds report_sr.dcm.

    Returns
    -------
    Path
        ``outdir``, or ``outdir/versions/<UTC timestamp>`` when ``outdir`` already holds a
        confirmed result (which is never overwritten).
    """
    files = render_files(result, evidence, volume)  # all content built before touching disk
    target = target_folder(outdir)
    return land_files(files, target)
