"""``fusionct bench``: every benchmark of issue 6 in one run, one table, one summary line.

Parts, in the order they run (each prints a progress line on stderr):

1. memory-copy bandwidth of this machine (the physical limit);
2. each numba kernel against its NumPy/SciPy reference on the standard study's workload,
   plus numba's compile time from an empty cache (reported separately);
3. each kernel's effective bandwidth as a share of the copy bandwidth;
4. loading the standard series: ours, SimpleITK's series reader, plain pydicom;
5. the standard study end to end in fresh processes, without and with Prefect, with time
   after start-up, start-up itself and peak memory;
6. scaling: whole-study time against the number of screws and against the voxel count.

The standard study (``benchmarks.standard``): 512 x 512 x 400 voxels of 0.5 mm, L2-S1 with
10 screws, 3 cages, 4 disc levels. ``--quick`` runs everything on 256 x 256 x 200 voxels of
1 mm with fewer repeats (targets are stated for the full size only). Generated studies are
kept in ``/tmp/fusionct_bench`` (``FUSIONCT_BENCH_DIR``) and reused.

``python -m benchmarks.run [--quick] [--write-results]``; the last option also writes
``benchmarks/RESULTS.md`` (the table, the machine, the date) for the README.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import (REPO, Row, bench_root, fmt_ratio, fmt_s, machine_info, machine_line,
                               render_table)
from benchmarks.standard import STANDARD, StudySize


@dataclass
class Plan:
    """What one benchmark run does and at which sizes."""

    name: str
    study: StudySize
    repeats: int = 5
    study_repeats: int = 5
    study_warmup: bool = True
    prefect: bool = True
    compile_fresh: bool = True
    copy_mb: int = 512
    screw_scaling: StudySize | None = None
    screw_levels: tuple = (1, 2, 3, 4)
    voxel_sizes: tuple = ()
    scaling_repeats: int = 3
    scaling_warmup: bool = True
    kernel_scale: float = 1.0
    record: bool = True
    #: settings re-measured in fresh processes beside the shipped default: OpenMP's active
    #: waiting, the default before kernels/__init__.py set OMP_WAIT_POLICY=PASSIVE
    env_variants: tuple = (("OMP_WAIT_POLICY", "ACTIVE"),)
    #: the same for the whole study; also NumPy's transparent huge pages, which
    #: pipeline.study.prefer_small_pages switches off
    study_variants: tuple = (("OMP_WAIT_POLICY", "ACTIVE"), ("NUMPY_MADVISE_HUGEPAGE", "1"))
    variant_repeats: int = 3
    check_targets: bool = True
    extra: dict = field(default_factory=dict)


#: what the shipped code does about each setting a study variant overrides
SHIPPED = {"OMP_WAIT_POLICY": "kernels/__init__.py sets OMP_WAIT_POLICY=PASSIVE unless the user set it",
           "NUMPY_MADVISE_HUGEPAGE": "pipeline.study.prefer_small_pages turns NumPy's huge pages off "
                                     "unless the user set NUMPY_MADVISE_HUGEPAGE"}


def full_plan() -> Plan:
    """The issue's sizes: 512 x 512 x 400 at 0.5 mm; scaling over 4..10 screws and 13..105 Mvoxel.

    Scaling points other than the standard study are medians of 2 runs without a warm-up
    (numba's cache is warm by then), to keep the whole run near half an hour.
    """
    return Plan("full", STANDARD, repeats=5, study_repeats=5, screw_scaling=STANDARD,
                voxel_sizes=(StudySize(256, 200, 1.0, 1.0), StudySize(362, 283, 0.7072, 0.7072),
                             STANDARD), scaling_repeats=2, scaling_warmup=False)


def quick_plan() -> Plan:
    """Everything at 256 x 256 x 200 (1 mm) with fewer repeats; no targets judged."""
    q = StudySize(256, 200, 1.0, 1.0)
    return Plan("quick", q, repeats=3, study_repeats=3, screw_scaling=q, scaling_repeats=2,
                copy_mb=256, voxel_sizes=(StudySize(128, 100, 2.0, 2.0),
                                          StudySize(192, 150, 1.3334, 1.3334), q),
                check_targets=False)


def tiny_plan() -> Plan:
    """A smoke run of the harness (used by tests): the smallest grid the pipeline is meant
    for (0.8 mm pixels, 1.5 mm slices, 128 mm field), one run of everything, no warm-ups."""
    t = StudySize(160, 124, 0.8, 1.5)
    return Plan("tiny", t, repeats=2, study_repeats=1, study_warmup=False, prefect=False,
                compile_fresh=False, copy_mb=32, screw_scaling=t, screw_levels=(1, 4),
                voxel_sizes=(StudySize(140, 124, 0.9143, 1.5), t), scaling_repeats=1,
                scaling_warmup=False, kernel_scale=0.05, check_targets=False, env_variants=(),
                study_variants=())


_T_START = time.perf_counter()


def _say(msg: str) -> None:
    print(f"fusionct bench: [{time.perf_counter() - _T_START:5.0f} s] {msg}", file=sys.stderr, flush=True)


def _checkpoint(plan: Plan, raw: dict) -> None:
    """Keep the figures so far in the bench folder (a crash late in a long run loses nothing)."""
    try:
        (bench_root() / f"results_{plan.name}.partial.json").write_text(
            json.dumps(raw, default=str, indent=1))
    except (OSError, TypeError, ValueError):
        pass


def run_all(plan: Plan) -> dict:
    """Run every part of ``plan``; returns rows, summary line, machine and raw figures."""
    from benchmarks.bandwidth import bandwidth_rows, copy_bandwidth
    from benchmarks.kernels_bench import (bench_kernels, call_overhead, compile_fresh,
                                          float64_copy_time, kernel_rows, kernel_times_child,
                                          record_pipeline_calls)
    from benchmarks.loading_bench import bench_loading, loading_rows
    from benchmarks.standard import cached_study_dicom, cached_study_volume
    from benchmarks.study_bench import (bench_screw_scaling, bench_study, bench_voxel_scaling,
                                        scaling_rows, study_rows)

    t_start = time.perf_counter()
    info = machine_info()
    raw: dict = {"plan": asdict(plan), "machine": info}
    label = plan.study.label()

    _say(f"memory copy bandwidth ({plan.copy_mb} MB)")
    copy = copy_bandwidth(plan.copy_mb * 2 ** 20, repeats=plan.repeats)
    raw["copy"] = copy

    _say(f"standard study {label} (phantom made once, then reused from {bench_root()})")
    volume, truth = cached_study_volume(plan.study)

    folder = cached_study_dicom(plan.study)
    recorded = None
    if plan.record:
        _say("one analysis in this process, recording every kernel call")
        try:
            recorded = record_pipeline_calls(folder, volume)
            raw["recorded_calls"] = {k: len(v) for k, v in recorded.items()}
        except Exception as exc:  # noqa: BLE001 - fall back to synthetic workloads, say so
            raw["recording_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            _say(f"recording failed ({raw['recording_error']}); synthetic workloads instead")
    _say("kernels vs references")
    kres = bench_kernels(volume, truth, repeats=plan.repeats, scale=plan.kernel_scale,
                         recorded=recorded)
    del recorded
    raw["kernels"] = [asdict(k) for k in kres]
    t64 = float64_copy_time(volume, plan.repeats)
    raw["float64_copy_s"] = t64
    variant = None
    for var, val in plan.env_variants:
        _say(f"kernel replays in a fresh process with {var}={val}")
        st = plan.study
        vt = kernel_times_child((st.n_inplane, st.n_slices, st.pixel_mm, st.slice_mm),
                                plan.repeats, {var: val}, plan.kernel_scale)
        raw.setdefault("kernel_variants", {})[f"{var}={val}"] = vt
        if "error" not in vt:
            variant = (f"{var}={val}", vt)
    rows: list[Row] = kernel_rows(kres, t64, variant)
    if "recording_error" in raw:
        rows.append(Row("kernel", "recording the pipeline's kernel calls FAILED",
                        note=raw["recording_error"] + "; synthetic workloads used"))
    rows.append(Row("kernel", "float64 copy of the volume (inside each reference)", ref_s=t64,
                    note=f"{volume.hu.nbytes / 2 ** 20:.0f} MB float32 -> float64; the references "
                         "convert before map_coordinates, so this is part of every reference time"))
    ovh = call_overhead()
    raw["call_overhead"] = ovh
    rows.append(Row("kernel", "one small parallel kernel call (1000 samples)", ovh["median_s"],
                    note=(f"90th percentile {ovh['p90_s'] * 1e6:.0f} us; numba threading layer "
                          f"{ovh['layer']}, {ovh['threads']} threads, OMP_WAIT_POLICY "
                          f"{ovh['omp_wait_policy']}")))
    if plan.compile_fresh:
        _say("numba compile from an empty cache")
        comp = compile_fresh()
        raw["compile_fresh_s"] = comp
        if comp:
            rows.append(Row("kernel", "numba compile, empty cache (per kernel)",
                            note=", ".join(f"{k} {v:.1f} s" for k, v in sorted(comp.items()))
                            + "; paid once per install (cache=True), not per study"))
    rows += bandwidth_rows(kres, copy)
    del volume

    _checkpoint(plan, raw)

    _say(f"loading the {label} series")
    try:
        lres = bench_loading(folder, repeats=plan.repeats)
        raw["loading"] = lres
        lrows = loading_rows(lres, label)
    except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
        raw["loading_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        lrows = [Row("loading", f"{label} series", note=f"FAILED: {raw['loading_error']}")]
    if not plan.check_targets:
        for r in lrows:
            r.target, r.met = "", None
    rows += lrows
    _checkpoint(plan, raw)

    _say(f"whole study, no Prefect ({plan.study_repeats} runs" + (" after a warm-up)" if plan.study_warmup else ")"))
    plain = bench_study(folder, "plain", plan.study_repeats, plan.study_warmup)
    prefect = None
    if plan.prefect:
        _say(f"whole study, Prefect flow ({plan.study_repeats} runs" + (" after a warm-up)" if plan.study_warmup else ")"))
        prefect = bench_study(folder, "prefect", plan.study_repeats, plan.study_warmup)
    raw["study_plain"], raw["study_prefect"] = plain, prefect
    rows += study_rows(plain, prefect, label, plan.check_targets, truth)
    for var, val in plan.study_variants:
        _say(f"whole study, no Prefect, with {var}={val}")
        v = bench_study(folder, "plain", plan.variant_repeats, False, {var: val})
        raw.setdefault("study_variants", {})[f"{var}={val}"] = v
        if v.get("ok"):
            rows.append(Row("study", f"{label}: whole study, no Prefect, {var}={val}", v["analyze_s"],
                            note=(f"for comparison, not the shipped default ({SHIPPED.get(var, var)}): "
                                  f"the shipped default runs {v['analyze_s'] / plain['analyze_s']:.2f}x as fast; "
                                  f"peak {v['maxrss_mb_max']:.0f} MiB; median of {v['n_ok']}"
                                  if plain.get("ok") else "")))

    _checkpoint(plan, raw)
    screws = voxels = None
    known = {str(folder): plain} if plain.get("ok") else {}  # the standard study is a point of both
    if plan.screw_scaling is not None:
        _say("scaling with the number of screws")
        screws = bench_screw_scaling(plan.screw_scaling, plan.scaling_repeats, plan.screw_levels,
                                     plan.scaling_warmup, known)
        raw["scaling_screws"] = screws
    if plan.voxel_sizes:
        _say("scaling with the number of voxels")
        voxels = bench_voxel_scaling(plan.voxel_sizes, plan.scaling_repeats, plan.scaling_warmup,
                                     known)
        raw["scaling_voxels"] = voxels
    rows += scaling_rows(screws, voxels)
    if not plan.check_targets:
        for r in rows:
            if r.section in ("study",):
                r.target, r.met = "", None

    raw["elapsed_s"] = time.perf_counter() - t_start
    summary = summary_line(kres, plain, prefect, rows, label)
    return {"rows": rows, "summary": summary, "machine": info, "raw": raw,
            "table": render_table(rows)}


def summary_line(kres, plain: dict, prefect: dict | None, rows, label: str) -> str:
    """The last line ``fusionct bench`` prints: smallest kernel ratio, whole-study time."""
    ratios = [(k.ratio, k.name) for k in kres if math.isfinite(k.ratio)]
    if ratios:
        r, n = min(ratios)
        kpart = f"smallest kernel ratio {r:.1f}x ({n})"
    else:
        kpart = "no kernel ratio"
    if plain.get("ok"):
        spart = (f"whole study {label} {plain['analyze_s']:.2f} s after start-up "
                 f"(peak {plain['maxrss_mb_max']:.0f} MiB)")
        if prefect and prefect.get("ok"):
            spart += (f", {prefect['analyze_s']:.2f} s in the Prefect flow "
                      f"+ {prefect['prefect_startup_s'] + prefect['import_s']:.1f} s start-up")
    else:
        spart = f"whole study {label} FAILED ({plain.get('error')})"
    judged = [r for r in rows if r.met is not None]
    tpart = (f"; targets met {sum(bool(r.met) for r in judged)}/{len(judged)}" if judged else "")
    return f"fusionct bench: {kpart}; {spart}{tpart}"


def _measured(r: Row) -> str:
    """The figure a target was judged on: the ratio, else the time, else the note's first part."""
    if math.isfinite(r.ratio):
        return fmt_ratio(r.ratio)
    if math.isfinite(r.ours_s):
        return fmt_s(r.ours_s)
    return r.note.split(";")[0]


def results_markdown(res: dict) -> str:
    """benchmarks/RESULTS.md: how it was run, the machine, the table and the summary."""
    m = res["machine"]
    plan = res["raw"]["plan"]
    return "\n".join([
        "# fusionct benchmark results",
        "",
        f"Measured {m['date_utc']} with `fusionct bench`"
        + (" --quick" if plan["name"] == "quick" else "") + f" (plan `{plan['name']}`), "
        f"{res['raw']['elapsed_s'] / 60:.0f} min in all.",
        "",
        f"Machine: {machine_line(m)}.",
        "",
        "Ratios are reference time / our time (above 1: ours is faster), medians after a "
        "warm-up; numba compile time is listed separately. Whole-study figures come from fresh "
        "processes (peak memory = the process's VmHWM, its resident high-water mark).",
        "",
        res["table"],
        "",
        "```",
        res["summary"],
        "```",
        "",
        "## Targets (issue 6)",
        "",
        *[f"- {'met' if r.met else '**missed**'}: {r.name} ({r.target}; measured {_measured(r)})"
          for r in res["rows"] if r.met is not None],
        "",
    ])


def main(quick: bool = False, plan: Plan | None = None, write_results: bool = False) -> int:
    """Run the benchmarks, print the table and, last, the summary line; 0 on success."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "fusionct" / "numba"))
    plan = plan or (quick_plan() if quick else full_plan())
    res = run_all(plan)
    out = bench_root() / f"results_{plan.name}.json"
    out.write_text(json.dumps(res["raw"], default=str, indent=1))
    print(f"Machine: {machine_line(res['machine'])}")
    print(res["table"])
    if write_results:
        (REPO / "benchmarks" / "RESULTS.md").write_text(results_markdown(res))
    print(res["summary"])
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    sys.exit(main(a.quick, tiny_plan() if a.tiny else None, a.write_results))
