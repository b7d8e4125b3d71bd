"""The analysis flow: a thin Prefect orchestration over ``pipeline.study``.

Reads like the list of steps: load study (select series, series to volume), detect hardware
and anatomy, measure each screw / cage / level (mapped tasks), write the report. Tasks pass
paths and small results, never volumes.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.progress import current
from pipeline.config import Config, load_config
from pipeline.errors import InputError
from pipeline.results import Anatomy
from pipeline.study import VolumeRef, build_result, check_input_path, detect_step, load_step


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


@task(name="load-study", retries=2, retry_delay_seconds=1, retry_condition_fn=transient_only,
      cache_policy=NO_CACHE)
def load_task(input_path: str) -> VolumeRef:
    return load_step(input_path)


@task(name="detect", cache_policy=NO_CACHE)
def detect_task(ref: VolumeRef, config: Config) -> Anatomy:
    return detect_step(ref, config)


@task(name="measure-screw", cache_policy=NO_CACHE)
def measure_screw_task(ref: VolumeRef, screw, config: Config):
    from pipeline.measure import measure_screw

    return measure_screw(ref.open(), screw, config)


@task(name="measure-cage", cache_policy=NO_CACHE)
def measure_cage_task(ref: VolumeRef, cage, anatomy: Anatomy, config: Config):
    from pipeline.measure import measure_cage

    return measure_cage(ref.open(), cage, anatomy, config)


@task(name="measure-level", cache_policy=NO_CACHE)
def measure_level_task(ref: VolumeRef, level, anatomy: Anatomy, config: Config):
    from pipeline.measure import measure_level

    return measure_level(ref.open(), level, anatomy, config)


@task(name="write-report", cache_policy=NO_CACHE)
def report_task(ref: VolumeRef, anatomy: Anatomy, screws, cages, levels, evidence, config: Config,
                outdir: str) -> str:
    from pipeline.outputs import write_outputs

    volume = ref.open()
    result = build_result(volume, anatomy, screws, cages, levels, config)
    return str(write_outputs(outdir, result, evidence, volume))


def _unzip(pairs):
    values, evidence = [], {}
    for value, ev in pairs:
        values.append(value)
        evidence[ev.id if hasattr(ev, "id") else ev.level] = ev
    return values, evidence


@flow(name="fusionct-analyze", log_prints=False)
def analyze_flow(input_path: str, outdir: str, config_path: str | None = None) -> str:
    """Analyze one study (DICOM folder or NIfTI file) and write the report files to ``outdir``."""
    progress = current()
    config = load_config(config_path)
    check_input_path(input_path)
    with progress.step("load"):
        ref = load_task(input_path)
    with progress.step("detect"):
        anatomy = detect_task(ref, config)
    with progress.step("measure", f"{len(anatomy.screws)} screws, {len(anatomy.cages)} cages, "
                                  f"{len(anatomy.levels)} levels"):
        screws, ev_s = _unzip(measure_screw_task.map(unmapped(ref), anatomy.screws, unmapped(config)).result())
        cages, ev_c = _unzip(measure_cage_task.map(unmapped(ref), anatomy.cages, unmapped(anatomy), unmapped(config)).result())
        levels, ev_l = _unzip(measure_level_task.map(unmapped(ref), anatomy.levels, unmapped(anatomy), unmapped(config)).result())
    with progress.step("report"):
        written = report_task(ref, anatomy, screws, cages, levels, {**ev_s, **ev_c, **ev_l}, config,
                              str(Path(outdir)))
    return written
