"""The analysis flow: a thin Prefect orchestration over ``pipeline.study``.

Reads like the list of steps: fingerprint the input, load study (select series, series to
volume), detect hardware and anatomy, measure each screw / cage / level (mapped tasks, one
run per screw and per level), write the report. Tasks pass paths and small results, never
volumes.

What Prefect adds, as its users expect:

- caching of the expensive steps (load, detect, measure) keyed by the input's file hashes
  (``pipeline.study.input_fingerprint``), the selected series UID, the config and the
  code's own hash, never by hashing arrays; results persist under
  ``<FUSIONCT_CACHE_DIR>/prefect-results`` so a re-run, even from another process, is
  served from cache; concurrent runs of the same input wait for one another
  (serializable isolation with file locks) instead of computing twice;
- retries on transient faults (``OSError``: network shares, busy disks) for the steps that
  touch files; bad input (``InputError``) is never retried;
- one task run per screw, cage and level, named after it in the UI.

Tasks run ``MEASURE_WORKERS`` (two) at a time: the breach and fracture checks (the
"integrity" task, which needs only the detected geometry) run beside the per-screw, cage
and level measurements, as the plain pipeline runs them (``measure_and_integrity``). Every
task maps the one cached volume file through one shared mapping (``VolumeRef.open``), so
tasks running at once do not count its pages twice: on the standard 512x512x400 study the
flow's peak measured 0.87-0.90 GB with two at a time (before the mapping was shared: 1.26 GB
with two at a time, 0.86 GB with one, 1.7 GB with Prefect's unlimited default pool).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel

from flows.progress import current
from pipeline.config import Config, load_config
from pipeline.errors import InputError
from pipeline.results import Anatomy
from pipeline.study import (VolumeRef, baseline_summary, build_result, cache_root, check_input_path,
                            compare_step, detect_step, input_fingerprint, integrity_findings,
                            kernels_thread_safe, load_step, prefer_small_pages, read_ahead_for_report,
                            with_breach)

RESULTS_DIR = cache_root() / "prefect-results"
CACHE_DAYS = timedelta(days=30)
#: tasks running at once (the integrity checks beside the measurements; see the module
#: docstring); one where numba's threading layer cannot take two callers (workqueue)
MEASURE_WORKERS = 2 if kernels_thread_safe() else 1
_REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- cache keys
@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the pipeline and kernel sources: changed code never reuses old results."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted([*(_REPO / "pipeline").rglob("*.py"), *(_REPO / "kernels").rglob("*.py")]):
        h.update(path.relative_to(_REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def _config_key(config: Config) -> str:
    return json.dumps(config.to_json(), sort_keys=True, default=str)


def _series_uid(ref: VolumeRef) -> str:
    meta = json.loads(Path(ref.stem + ".json").read_text()).get("meta", {})
    return str(meta.get("series_instance_uid") or "")


def _volume_key(ref: VolumeRef) -> str:
    """File hashes (the volume's name is the input fingerprint) + the series it was read from."""
    return f"{Path(ref.stem).name}-{_series_uid(ref)}"


def load_key(context, parameters) -> str:
    return f"load-{parameters['fingerprint']}-{code_version()}"


def volume_on_disk(fingerprint: str) -> bool:
    """Whether the loaded volume of this input is still in the cache folder (it may be cleaned)."""
    stem = cache_root() / "volumes" / fingerprint
    return Path(f"{stem}.npy").exists() and Path(f"{stem}.json").exists()


def detect_key(context, parameters) -> str:
    return "detect-" + _digest(_volume_key(parameters["ref"]), _config_key(parameters["config"]),
                               code_version())


def measure_key(context, parameters) -> str:
    item = parameters.get("screw") or parameters.get("cage") or parameters.get("level")
    extra = parameters.get("anatomy")
    return f"{context.task.name}-" + _digest(_volume_key(parameters["ref"]), item, extra,
                                             _config_key(parameters["config"]), code_version())


def _cached(key_fn) -> CacheKeyFnPolicy:
    return CacheKeyFnPolicy(cache_key_fn=key_fn).configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=FileSystemLockManager(lock_files_directory=RESULTS_DIR / "locks"))


CACHED = dict(persist_result=True, result_storage=RESULTS_DIR, cache_expiration=CACHE_DAYS)


def transient_only(task, task_run, state) -> bool:
    """Retry on I/O hiccups (network shares, busy disks), never on bad input."""
    try:
        state.result()
    except InputError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


@contextmanager
def outdir_lock(outdir: str):
    """Serialise writers of one OUTDIR (two runs of one study must not interleave files)."""
    out = Path(outdir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- tasks
@task(name="fingerprint", retries=2, retry_delay_seconds=1, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def fingerprint_task(input_path: str) -> str:
    return input_fingerprint(input_path)


@task(name="load-study", retries=2, retry_delay_seconds=1, retry_condition_fn=transient_only,
      cache_policy=_cached(load_key), **CACHED)
def load_task(input_path: str, fingerprint: str) -> VolumeRef:
    return load_step(input_path, fingerprint)


@task(name="detect", cache_policy=_cached(detect_key), **CACHED)
def detect_task(ref: VolumeRef, config: Config) -> Anatomy:
    return detect_step(ref, config)


@task(name="metal-tail", cache_policy=_cached(measure_key), **CACHED)
def metal_tail_task(ref: VolumeRef, anatomy: Anatomy, config: Config):
    from pipeline.measure import study_metal_tail

    return study_metal_tail(ref.open(), anatomy, config)


@task(name="measure-screw", task_run_name="measure-screw-{screw.id}",
      cache_policy=_cached(measure_key), **CACHED)
def measure_screw_task(ref: VolumeRef, screw, config: Config, tail=None):
    from pipeline.measure import measure_screw

    return measure_screw(ref.open(), screw, config, tail=tail)


@task(name="measure-cage", task_run_name="measure-cage-{cage.id}",
      cache_policy=_cached(measure_key), **CACHED)
def measure_cage_task(ref: VolumeRef, cage, anatomy: Anatomy, config: Config):
    from pipeline.measure import measure_cage

    return measure_cage(ref.open(), cage, anatomy, config)


@task(name="measure-level", task_run_name="measure-level-{level.name}",
      cache_policy=_cached(measure_key), **CACHED)
def measure_level_task(ref: VolumeRef, level, anatomy: Anatomy, config: Config):
    from pipeline.measure import measure_level

    return measure_level(ref.open(), level, anatomy, config)


@task(name="integrity", cache_policy=NO_CACHE)
def integrity_task(ref: VolumeRef, anatomy: Anatomy, config: Config):
    return integrity_findings(ref.open(), anatomy, config)


@task(name="compare-with-prior", cache_policy=NO_CACHE)
def compare_task(prior: dict, ref: VolumeRef, anatomy: Anatomy, screws, cages, levels, config: Config):
    return compare_step(prior["ref"], prior["anatomy"], prior["screws"], prior["cages"], prior["levels"],
                        ref, anatomy, screws, cages, levels, config)


@task(name="write-report", retries=2, retry_delay_seconds=1, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def report_task(ref: VolumeRef, anatomy: Anatomy, screws, cages, levels, evidence, config: Config,
                outdir: str, input_path: str, fractures=(), notes=(), baseline: dict | None = None) -> str:
    from pipeline.outputs import write_outputs

    volume = ref.open(input_root=input_path)
    result = build_result(volume, anatomy, screws, cages, levels, config, extra_notes=notes,
                          fractures=fractures, baseline=baseline)
    with outdir_lock(outdir):
        return str(write_outputs(outdir, result, evidence, volume))


def _unzip(pairs):
    values, evidence = [], {}
    for value, ev in pairs:
        values.append(value)
        evidence[ev.id if hasattr(ev, "id") else ev.level] = ev
    return values, evidence


# ----------------------------------------------------------------------------- flow
def _load_detect_measure(input_path: str, config: Config, progress, label: str = ""):
    """The per-study steps: load (select series), detect, measure each screw / cage / level.

    For the study itself (no ``label``) the integrity checks start beside the measurements;
    the last value returned is their pending task (None for the prior, or when tasks run one
    at a time)."""
    with progress.step(f"{label}load"):
        fingerprint = fingerprint_task(input_path)
        # a cached reference is only good while its volume file is there
        ref = load_task.with_options(refresh_cache=not volume_on_disk(fingerprint))(input_path, fingerprint)
        if not label:  # the report's SR sources, read in the background meanwhile
            read_ahead_for_report(ref, input_path)
    with progress.step(f"{label}detect"):
        anatomy = detect_task(ref, config)
    with progress.step(f"{label}measure", f"{len(anatomy.screws)} screws, {len(anatomy.cages)} cages, "
                                          f"{len(anatomy.levels)} levels"):
        # pedicle breach and fractures need only the geometry: checked beside the measurements
        integrity = integrity_task.submit(ref, anatomy, config) if not label and MEASURE_WORKERS > 1 else None
        # the blooming tail is the study's, estimated once from every screw's halo-free rays
        tail = metal_tail_task(ref, anatomy, config)
        screws = measure_screw_task.map(unmapped(ref), anatomy.screws, unmapped(config), unmapped(tail))
        cages = measure_cage_task.map(unmapped(ref), anatomy.cages, unmapped(anatomy), unmapped(config))
        levels = measure_level_task.map(unmapped(ref), anatomy.levels, unmapped(anatomy), unmapped(config))
        screws, ev_s = _unzip(screws.result())
        cages, ev_c = _unzip(cages.result())
        levels, ev_l = _unzip(levels.result())
    return ref, anatomy, screws, cages, levels, {**ev_s, **ev_c, **ev_l}, integrity


@flow(name="fusionct-analyze", log_prints=False,
      task_runner=ThreadPoolTaskRunner(max_workers=MEASURE_WORKERS))
def analyze_flow(input_path: str, outdir: str, config_path: str | None = None,
                 baseline_path: str | None = None) -> str:
    """Analyze one study (DICOM folder or NIfTI file) and write the report files to ``outdir``;
    with ``baseline_path`` (an earlier study of the same patient) also report change since it."""
    prefer_small_pages()
    progress = current()
    config = load_config(config_path)
    check_input_path(input_path)
    if baseline_path is not None:
        check_input_path(baseline_path)
    ref, anatomy, screws, cages, levels, evidence, integrity = _load_detect_measure(input_path, config, progress)
    with progress.step("integrity", "pedicle breach, rod and screw fractures"):
        breaches, fractures = (integrity.result() if integrity is not None
                                else integrity_task(ref, anatomy, config))
        screws = with_breach(screws, breaches)
    notes, baseline = [], None
    if baseline_path is not None:
        pref, panat, ps, pc, pl, _, _ = _load_detect_measure(baseline_path, config, progress, "prior ")
        with progress.step("compare", "registering each vertebra to the prior"):
            prior = {"ref": pref, "anatomy": panat, "screws": ps, "cages": pc, "levels": pl}
            screws, cages, levels, notes = compare_task(prior, ref, anatomy, screws, cages, levels, config)
            baseline = baseline_summary(pref)
    with progress.step("report"):
        written = report_task(ref, anatomy, screws, cages, levels, evidence, config, str(Path(outdir)),
                              input_path, fractures=fractures, notes=notes, baseline=baseline)
    return written
