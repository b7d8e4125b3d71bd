"""The steps one study goes through, as plain functions (MONAI Deploy's vocabulary:
load study -> select series -> series to volume -> detect -> measure -> write report).

``flows/`` wraps each step in a Prefect task; ``analyze_study`` runs them in order without
Prefect (benchmarks and tests use it). Steps pass small values: a loaded volume is kept in a
cache folder as ``.npy`` + ``.json`` and referred to by a ``VolumeRef``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.atomic import write_text_atomic
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.results import Anatomy, StudyResult
from pipeline.volume import Volume


def prefer_small_pages() -> bool:
    """Stop NumPy asking for transparent huge pages for large arrays (process-wide).

    NumPy ``madvise``s every large new array for 2 MB pages. On virtual machines that hand
    free memory back to the host (virtio-balloon free page reporting, as on the project's
    2-core benchmark machine), every fresh huge page has to be faulted in from the host:
    touching a new 400 MB float32 array took 1.7-2.2 s with huge pages against 0.2-0.3 s
    with 4 KB pages, and the pipeline allocates many volume-sized temporaries. A user's own
    ``NUMPY_MADVISE_HUGEPAGE`` (read by NumPy at import) is left alone.

    Returns
    -------
    bool
        True when this call switched huge pages off.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # pragma: no cover - NumPy < 2 or a future rename: keep its default
        return False
    _set_madvise_hugepage(False)
    return True


def cache_root() -> Path:
    """Where loaded volumes are kept between steps (``FUSIONCT_CACHE_DIR`` overrides)."""
    root = os.environ.get("FUSIONCT_CACHE_DIR") or Path.home() / ".cache" / "fusionct"
    return Path(root)


@dataclass(frozen=True)
class VolumeRef:
    """A loaded volume on disk: ``<stem>.npy`` (HU, float32) beside ``<stem>.json`` (geometry, meta)."""

    stem: str

    def open(self, mmap: bool = True, input_root: str | Path | None = None) -> Volume:
        """The volume, memory-mapped by default so parallel tasks share the pages.

        Memory-mapped opens of one unchanged file in one process share one read-only mapping
        (:func:`_shared_map`): every step and task of an analysis reads the same pages, and
        they count once in the process's resident memory, not once per open.

        The cache is keyed by content, so the same study may come back from another folder:
        with ``input_root`` the source file paths are re-based onto it (the SR writer reads
        the source headers from them).
        """
        if mmap:
            text, hu = _shared_map(self.stem)
            info = json.loads(text)
        else:
            info = json.loads(Path(self.stem + ".json").read_text())
            hu = np.load(self.stem + ".npy")
        meta = rebase_source_paths(info["meta"], input_root)
        return Volume(hu=hu, origin_lps_mm=info["origin_lps_mm"], spacing_mm=info["spacing_mm"],
                      direction=info["direction"], meta=meta)


_MAPS_LOCK = threading.Lock()
_MAPS: dict[tuple, tuple[str, np.ndarray]] = {}
_MAPS_KEEP = 2  # a study and its prior


def _shared_map(stem: str) -> tuple[str, np.ndarray]:
    """(the ``.json`` text, a read-only memory map of the ``.npy``) of one cached volume,
    the same mapping for every open while the file is unchanged (same inode, time, size).

    Mapping the file once per open would count its pages once per open in this process's
    resident memory (and in the benchmark's peak) although they are the same page cache
    pages. The last ``_MAPS_KEEP`` volumes stay mapped; a replaced file gets a new mapping.
    """
    st = os.stat(stem + ".npy")
    key = (stem, st.st_ino, st.st_mtime_ns, st.st_size)
    with _MAPS_LOCK:
        hit = _MAPS.get(key)
        if hit is None:
            for old in [k for k in _MAPS if k[0] == stem]:
                del _MAPS[old]
            while len(_MAPS) >= _MAPS_KEEP:
                del _MAPS[next(iter(_MAPS))]
            hit = (Path(stem + ".json").read_text(), np.load(stem + ".npy", mmap_mode="r"))
            _MAPS[key] = hit
    return hit


def rebase_source_paths(meta: dict, input_root: str | Path | None) -> dict:
    """``meta`` with ``source_paths`` moved from the folder they were loaded from
    (``meta["input_root"]``) to ``input_root``; unchanged when either is unknown."""
    old_root = meta.get("input_root")
    if input_root is None or old_root is None or not Path(input_root).is_dir():
        return meta
    new_root = Path(input_root).resolve()
    if str(new_root) == old_root:
        return meta
    moved = [str(new_root / Path(p).relative_to(old_root)) for p in meta.get("source_paths", [])]
    return {**meta, "source_paths": moved, "input_root": str(new_root)}


def _file_digest(path: Path, name: str) -> bytes:
    """SHA-256 of one file's relative name and bytes."""
    h = hashlib.sha256(name.encode("utf-8", "surrogateescape") + b"\0")
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def input_fingerprint(input_path: str | Path, max_workers: int | None = None) -> str:
    """A content hash of the input (every file's relative path and bytes) for caching.

    Keyed on file contents rather than on arrays, so a re-sent identical study is a cache
    hit and any changed byte is a miss. Each file gets its own SHA-256 (fast with the CPU's
    SHA instructions, and hashlib releases the GIL, so files are hashed ``max_workers`` at a
    time; default min(4, cpu count)); the fingerprint is the SHA-256 of those digests in
    name order, as 32 hex digits.
    """
    from concurrent.futures import ThreadPoolExecutor

    p = Path(input_path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    names = [str(f.relative_to(p) if f != p else f.name) for f in files]
    workers = max_workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(files) < 4:
        digests = [_file_digest(f, n) for f, n in zip(files, names)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(_file_digest, files, names))
    h = hashlib.sha256(b"fusionct-input-v3\0")  # v3: cached source_paths are absolute
    for d in digests:
        h.update(d)
    return h.hexdigest()[:32]


def _staging_npy(stem: str) -> str:
    """This process's temporary ``.npy`` beside ``stem`` (renamed into place when complete)."""
    return f"{stem}.{os.getpid()}.tmp.npy"


def save_volume(volume: Volume, stem: str | Path) -> VolumeRef:
    """Write a volume as ``stem.npy`` + ``stem.json`` atomically and return its reference.

    A volume loaded straight into this process's staging file (``load_step``) is only
    renamed into place; any other is written out.
    """
    stem = str(stem)
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_npy(stem)
    hu = volume.hu
    if not (isinstance(hu, np.memmap) and hu.filename is not None
            and os.path.abspath(hu.filename) == os.path.abspath(tmp)):
        np.save(tmp, np.ascontiguousarray(hu, dtype=np.float32))
    os.replace(tmp, stem + ".npy")
    info = {"origin_lps_mm": volume.origin_lps_mm.tolist(), "spacing_mm": volume.spacing_mm.tolist(),
            "direction": volume.direction.tolist(), "meta": volume.meta}
    write_text_atomic(Path(stem + ".json"), json.dumps(info))
    return VolumeRef(stem)


def load_step(input_path: str | Path, fingerprint: str | None = None) -> VolumeRef:
    """Load the study (picking its bone series) into the cache; reuse it when already there.

    DICOM pixels are decoded straight into the cache file (a memory-mapped ``.npy`` staged
    under a temporary name): the volume is written once, not built in memory and then
    copied to disk, and the later steps' memory maps share those same pages.
    """
    from pipeline.loading import load_study

    fingerprint = fingerprint or input_fingerprint(input_path)
    stem = cache_root() / "volumes" / fingerprint
    ref = VolumeRef(str(stem))
    if Path(ref.stem + ".npy").exists() and Path(ref.stem + ".json").exists():
        return ref
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_npy(str(stem))

    def allocate(shape):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(shape))
        # reserve the disk blocks now: a full disk is then an OSError here, not a SIGBUS
        # while the pixels are written into the mapping
        if hasattr(os, "posix_fallocate"):
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        return out

    try:
        volume = load_study(input_path, allocate=allocate)
        if Path(input_path).is_dir():
            volume.meta["input_root"] = str(Path(input_path).resolve())
        return save_volume(volume, stem)
    finally:
        # a failed load (bad input) leaves no half-written staging file behind
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_ahead_for_report(ref: VolumeRef, input_path: str | Path) -> bool:
    """Start reading what the DICOM SR needs (its library, the source headers) in the
    background while the study is analyzed (``pipeline.outputs.prefetch_sources``); the
    report step then finds it ready. True when a read started (DICOM input only)."""
    from pipeline.outputs import prefetch_sources

    return prefetch_sources(ref.open(input_root=input_path).meta)


def detect_step(ref: VolumeRef, config: Config) -> Anatomy:
    """Find vertebrae, levels, screws, cages and rods."""
    from pipeline.detect import detect

    return detect(ref.open(), config)


def integrity_findings(volume: Volume, anatomy: Anatomy, config: Config):
    """Pedicle breach of every measurable screw (Gertzbein-Robbins) and the rod / screw
    fractures, from the detected geometry alone (so it can run beside the halo measurement).

    Returns
    -------
    breaches : dict
        ``(breach_mm, grade, direction)`` by screw id, for the screws ``measure_study``
        measures (non-zero diameter and length).
    fractures : list of FractureFinding
    """
    from pipeline.breach import measure_breach
    from pipeline.fracture import find_fractures

    vertebrae = {v.name: v for v in anatomy.vertebrae}
    breaches = {s.id: measure_breach(volume, s, vertebrae.get(s.vertebra), config)
                for s in anatomy.screws if s.diameter_mm > 0 and s.length_mm > 0}
    return breaches, find_fractures(volume, anatomy, config)


def with_breach(screws, breaches: dict) -> list:
    """The screw measurements with their breach fields filled from ``breaches``
    (:func:`integrity_findings`); a screw without an entry is left as it is."""
    from dataclasses import replace

    out = []
    for s in screws:
        if s.id in breaches:
            breach_mm, grade, direction = breaches[s.id]
            s = replace(s, breach_mm=round(float(breach_mm), 2), breach_grade=grade,
                        breach_direction=direction)
        out.append(s)
    return out


def integrity_step(volume: Volume, anatomy: Anatomy, screws, config: Config):
    """Hardware integrity beyond the halo, one step after the measurement: the screws with
    breach fields filled (:func:`integrity_findings`, :func:`with_breach`), and the fractures."""
    breaches, fractures = integrity_findings(volume, anatomy, config)
    return with_breach(screws, breaches), fractures


def kernels_thread_safe() -> bool:
    """Whether numba's parallel kernels may be called from two threads at once: its OpenMP
    and TBB threading layers allow it, the fallback ``workqueue`` layer does not (it aborts)."""
    import importlib

    import numba

    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:  # no parallel kernel has run yet: the layer numba will choose
        pass
    if str(numba.config.THREADING_LAYER).lower() == "workqueue":
        return False
    for name in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
        try:
            importlib.import_module(name)
            return True
        except (ImportError, OSError):
            continue
    return False


def measure_and_integrity(volume: Volume, anatomy: Anatomy, config: Config):
    """``measure_study`` and the hardware integrity checks (:func:`integrity_findings`) of
    one study, side by side in two threads when the kernels allow it (both are mostly
    NumPy / SciPy / numba work that leaves Python free: on two cores the integrity checks
    then cost little beyond the measurement). The same values as one after the other.

    Returns
    -------
    screws, cages, levels, evidence, fractures
        As ``measure_study``, the screws with their breach fields filled.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.measure import measure_study

    if kernels_thread_safe():
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionct-integrity") as pool:
            integrity = pool.submit(integrity_findings, volume, anatomy, config)
            screws, cages, levels, evidence = measure_study(volume, anatomy, config)
            breaches, fractures = integrity.result()
    else:
        screws, cages, levels, evidence = measure_study(volume, anatomy, config)
        breaches, fractures = integrity_findings(volume, anatomy, config)
    return with_breach(screws, breaches), cages, levels, evidence, fractures


def compare_step(prior_ref: VolumeRef, prior_anatomy: Anatomy, prior_screws, prior_cages, prior_levels,
                 ref: VolumeRef, anatomy: Anatomy, screws, cages, levels, config: Config):
    """Change since the prior study (``--baseline``): screw migration relative to its own
    vertebra, halo change, subsidence change, disc height change. Returns the updated
    screws, cages, levels and notes."""
    from pipeline.alignment import annotate_levels
    from pipeline.followup import compare_with_prior

    return compare_with_prior(prior_ref.open(), prior_anatomy, prior_screws, prior_cages,
                              annotate_levels(prior_levels, prior_anatomy), ref.open(), anatomy,
                              screws, cages, annotate_levels(levels, anatomy),
                              metal_threshold_hu=config.metal_threshold_hu)


def build_result(volume: Volume, anatomy: Anatomy, screws, cages, levels, config: Config,
                 extra_notes=(), fractures=(), baseline: dict | None = None) -> StudyResult:
    """Gather measurements into the one object every writer reads; alignment (lordosis,
    disc height, adjacent segments) comes from the endplates detection fitted."""
    from pipeline.alignment import annotate_levels
    from pipeline.borderline import borderline_notes

    levels = annotate_levels(levels, anatomy)
    meta = volume.meta
    inp = {
        "study_instance_uid": meta.get("study_instance_uid") or None,
        "series_instance_uid": meta.get("series_instance_uid") or None,
        "spacing_mm": [float(s) for s in volume.spacing_mm],
        "shape": [int(n) for n in volume.shape_ijk],
        "kind": meta.get("input_kind"),
        "series_description": meta.get("series_description"),
        "selection_reason": meta.get("selection_reason"),
    }
    notes = list(anatomy.notes) + list(extra_notes)
    if not anatomy.screws and not anatomy.cages:
        notes.append("No spinal hardware found in this study.")
    else:
        notes += borderline_notes(screws, cages, levels, config.criteria, volume.spacing_mm)
    extras = {"software_version": __version__}
    if baseline is not None:
        extras["baseline"] = baseline
    return StudyResult(screws=tuple(screws), cages=tuple(cages), levels=tuple(levels), input=inp,
                       criteria=config.criteria.to_json(), notes=tuple(notes), extras=extras,
                       fractures=tuple(fractures))


def baseline_summary(prior_ref: VolumeRef) -> dict:
    """What the report says about the prior study (UIDs only, no patient data)."""
    meta = prior_ref.open().meta
    return {"study_instance_uid": meta.get("study_instance_uid") or None,
            "series_instance_uid": meta.get("series_instance_uid") or None}


def analyze_study(input_path: str | Path, outdir: str | Path, config: Config | None = None,
                  baseline_path: str | Path | None = None) -> Path:
    """Run every step in order without Prefect; returns the folder the results went to."""
    from pipeline.measure import measure_study
    from pipeline.outputs import write_outputs

    prefer_small_pages()
    config = config or Config()
    ref = load_step(input_path)
    volume = ref.open(input_root=input_path)
    read_ahead_for_report(ref, input_path)
    anatomy = detect_step(ref, config)
    screws, cages, levels, evidence, fractures = measure_and_integrity(volume, anatomy, config)
    notes, baseline = [], None
    if baseline_path is not None:
        prior_ref = load_step(baseline_path)
        prior_anatomy = detect_step(prior_ref, config)
        ps, pc, pl, _ = measure_study(prior_ref.open(), prior_anatomy, config)
        screws, cages, levels, notes = compare_step(prior_ref, prior_anatomy, ps, pc, pl, ref, anatomy,
                                                    screws, cages, levels, config)
        baseline = baseline_summary(prior_ref)
    result = build_result(volume, anatomy, screws, cages, levels, config, extra_notes=notes,
                          fractures=fractures, baseline=baseline)
    return write_outputs(outdir, result, evidence, volume)


def check_input_path(input_path: str | Path) -> Path:
    """Refuse a missing input before any work starts."""
    p = Path(input_path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    return p


__all__ = ["VolumeRef", "analyze_study", "baseline_summary", "build_result", "cache_root",
           "check_input_path", "compare_step", "detect_step", "input_fingerprint", "integrity_findings",
           "integrity_step", "kernels_thread_safe", "load_step", "measure_and_integrity",
           "prefer_small_pages", "read_ahead_for_report", "save_volume", "with_breach"]
