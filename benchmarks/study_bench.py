"""Whole-study time and peak memory, with and without Prefect, and scaling (items 3 and 4).

Each measurement runs in a fresh interpreter (``python -m benchmarks.study_bench child``),
so peak memory is that process's own high-water mark of resident memory (tracemalloc would
miss NumPy's and numba's buffers) and nothing is shared between runs:
every child gets an empty ``FUSIONCT_CACHE_DIR`` (no cached volume, no cached Prefect
results) and an empty output folder. What the child reports:

* ``import_s``: importing the pipeline (and, with Prefect, the flow) - part of start-up;
* ``prefect_startup_s`` (Prefect only): running a trivial flow first, which starts
  Prefect's temporary API server and its database - the rest of start-up;
* ``analyze_s``: the study itself, from DICOM folder to written report, i.e. "after
  start-up"; plain runs call :func:`pipeline.study.analyze_study`, Prefect runs
  :func:`flows.cli.run_analysis` (the ``fusionct analyze`` path);
* per-step seconds for plain runs (load, detect, measure, write), taken by timing the
  functions ``analyze_study`` calls, so the steps are not re-implemented here;
* ``maxrss_mb``: the child's peak resident memory (MiB) over its whole life (``VmHWM``,
  the high-water mark of ``ru_maxrss`` without the parent's share that Linux carries over
  through ``execve``).

The parent also times the whole child (``wall_s``: interpreter start to exit). The first
child of a series is a warm-up (it fills numba's on-disk cache and Prefect's database) and
is reported separately; the figures are medians over the following runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.perf_counter()

#: Issue 6 targets for the standard study.
TARGET_ANALYZE_S = 10.0
TARGET_PEAK_MB = 1.5 * 1024


# ------------------------------------------------------------------------------ child side
def _maxrss_mb() -> float:
    """This process's peak resident memory (MiB).

    Linux's ``ru_maxrss`` survives ``execve``: a child forked from a big parent reports the
    parent's peak. ``VmHWM`` in ``/proc/self/status`` belongs to the current address space
    only, so it is read first; ``ru_maxrss`` is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _timed(mod, name: str, store: dict):
    """Replace ``mod.name`` by a wrapper adding its wall time to ``store[name]``."""
    fn = getattr(mod, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            store[name] = store.get(name, 0.0) + time.perf_counter() - t0

    setattr(mod, name, wrapper)


def child_plain(input_path: str, outdir: str) -> dict:
    """Analyze one study with :func:`pipeline.study.analyze_study` (no Prefect)."""
    import pipeline.measure
    import pipeline.outputs
    import pipeline.study
    from pipeline.config import Config

    t_import = time.perf_counter() - _T0
    steps: dict = {}
    for mod, name in ((pipeline.study, "load_step"), (pipeline.study, "detect_step"),
                      (pipeline.measure, "measure_study"), (pipeline.study, "integrity_step"),
                      (pipeline.study, "integrity_findings"),
                      (pipeline.outputs, "write_outputs")):
        if hasattr(mod, name):
            _timed(mod, name, steps)
    t0 = time.perf_counter()
    pipeline.study.analyze_study(input_path, outdir, Config())
    analyze = time.perf_counter() - t0
    written = json.loads((Path(outdir) / "measurements.json").read_text())
    return {"import_s": t_import, "analyze_s": analyze, "steps_s": steps,
            "n_screws": len(written.get("screws", [])), "n_cages": len(written.get("cages", [])),
            "n_levels": len(written.get("levels", [])), "maxrss_mb": _maxrss_mb()}


def child_prefect(input_path: str, outdir: str) -> dict:
    """Analyze one study through the Prefect flow, timing Prefect's start-up separately."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    from prefect import flow

    import flows.analyze  # noqa: F401 - part of start-up
    from flows.cli import run_analysis

    t_import = time.perf_counter() - _T0

    @flow(name="fusionct-bench-startup")
    def _startup() -> int:
        return 1

    t0 = time.perf_counter()
    _startup()
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_analysis(input_path, outdir, show_progress=False)
    analyze = time.perf_counter() - t0
    written = json.loads((Path(outdir) / "measurements.json").read_text())
    return {"import_s": t_import, "prefect_startup_s": t_start, "analyze_s": analyze,
            "n_screws": len(written.get("screws", [])), "n_cages": len(written.get("cages", [])),
            "n_levels": len(written.get("levels", [])), "maxrss_mb": _maxrss_mb()}


def _child_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["plain", "prefect"], required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    try:
        res = (child_plain if a.mode == "plain" else child_prefect)(a.input, a.out)
        res["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed run
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
               "maxrss_mb": _maxrss_mb()}
    Path(a.result).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------- parent side
def run_child(input_path: str | Path, mode: str = "plain", timeout_s: float = 1800,
              env_extra: dict | None = None) -> dict:
    """One fresh-process analysis of ``input_path``; returns the child's figures + ``wall_s``.

    ``env_extra`` adds environment variables for the child (to measure a setting's effect).
    """
    from benchmarks.common import REPO, bench_root

    work = Path(tempfile.mkdtemp(prefix="run_", dir=bench_root()))
    try:
        env = dict(os.environ)
        env["FUSIONCT_CACHE_DIR"] = str(work / "cache")
        env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")
        # Prefect's database stays between runs (like an installed service's would) but is
        # the benchmark's own, not the user's or another engineer's.
        env["PREFECT_HOME"] = str(bench_root() / "prefect_home")
        env.pop("PREFECT_API_URL", None)
        # a loaded machine can take longer than Prefect's default 20 s to start its server;
        # the start-up is timed either way
        env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        env.update(env_extra or {})
        result = work / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.study_bench", "child", "--mode", mode,
               "--input", str(input_path), "--out", str(work / "out"), "--result", str(result)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        wall = time.perf_counter() - t0
        if result.exists():
            res = json.loads(result.read_text())
        else:
            tail = (p.stderr or p.stdout or "").strip().splitlines()
            res = {"ok": False, "error": (tail[-1] if tail else f"exit {p.returncode}")[:300]}
        res["wall_s"] = wall
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if r.get("ok") and key in r]
    return statistics.median(vals) if vals else float("nan")


def bench_study(input_path: str | Path, mode: str = "plain", repeats: int = 5,
                warmup: bool = True, env_extra: dict | None = None) -> dict:
    """Warm-up child, then ``repeats`` children; medians of every figure (s, MiB).

    ``warmup=False`` skips the warm-up child (when an earlier series already filled numba's
    cache and Prefect's database).
    """
    warm = (run_child(input_path, mode, env_extra=env_extra) if warmup
            else {"ok": True, "wall_s": float("nan")})
    runs = ([run_child(input_path, mode, env_extra=env_extra) for _ in range(max(1, repeats))]
            if warm.get("ok") else [])
    ok = [r for r in runs if r.get("ok")]
    out = {"mode": mode, "warmup": warm, "runs": runs, "ok": bool(ok),
           "n_ok": len(ok), "n_runs": len(runs)}
    if not ok:
        out["error"] = (warm if not warm.get("ok") else runs[0]).get("error", "failed")
        return out
    for key in ("import_s", "prefect_startup_s", "analyze_s", "wall_s", "maxrss_mb"):
        out[key] = _median(ok, key)
    out["maxrss_mb_max"] = max(r["maxrss_mb"] for r in ok)
    for key in ("n_screws", "n_cages", "n_levels"):
        out[key] = ok[0].get(key)
    if mode == "plain":
        names = sorted({k for r in ok for k in r.get("steps_s", {})})
        out["steps_s"] = {k: statistics.median(r["steps_s"].get(k, float("nan")) for r in ok)
                          for k in names}
    return out


def study_rows(plain: dict, prefect: dict | None, label: str, check_targets: bool = True,
               truth: dict | None = None) -> list:
    """Rows for the whole-study figures (targets: <= 10 s after start-up, <= 1.5 GB).

    With the phantom's ``truth`` the notes say how many screws, cages and levels the
    analysis found against how many the study has (a fast run that misses hardware is not
    a fast run of the same work).
    """
    from benchmarks.common import Row

    def found(r):
        if truth is None:
            return f"{r['n_screws']} screws, {r['n_cages']} cages, {r['n_levels']} levels"
        return (f"found {r['n_screws']}/{len(truth['screws'])} screws, "
                f"{r['n_cages']}/{len(truth['cages'])} cages, {r['n_levels']}/{len(truth['levels'])} levels")

    rows = []
    if not plain.get("ok"):
        rows.append(Row("study", f"{label}: whole study, no Prefect",
                        note=f"FAILED: {plain.get('error')}", target=f"<= {TARGET_ANALYZE_S:g} s",
                        met=False if check_targets else None))
    else:
        steps = ", ".join(f"{k.replace('_step', '').replace('_study', '').replace('_outputs', '')} "
                          f"{v:.2f}" for k, v in plain.get("steps_s", {}).items())
        rows.append(Row(
            "study", f"{label}: whole study, no Prefect (after start-up)", plain["analyze_s"],
            note=(f"{found(plain)}; steps s: {steps}; start-up (imports) {plain['import_s']:.2f} s; "
                  f"process wall {plain['wall_s']:.2f} s; "
                  + (f"first run {plain['warmup']['wall_s']:.1f} s wall; "
                     if math.isfinite(plain['warmup'].get('wall_s', float('nan'))) else "")
                  + f"median of {plain['n_ok']}"),
            target=f"<= {TARGET_ANALYZE_S:g} s" if check_targets else "",
            met=bool(plain["analyze_s"] <= TARGET_ANALYZE_S) if check_targets else None))
        rows.append(Row(
            "study", f"{label}: peak memory, no Prefect (VmHWM)",
            note=f"{plain['maxrss_mb']:.0f} MiB median, {plain['maxrss_mb_max']:.0f} MiB worst of {plain['n_ok']}",
            target="<= 1.5 GiB" if check_targets else "",
            met=bool(plain["maxrss_mb_max"] <= TARGET_PEAK_MB) if check_targets else None))
    if prefect is not None:
        if not prefect.get("ok"):
            rows.append(Row("study", f"{label}: whole study, Prefect flow",
                            note=f"FAILED: {prefect.get('error')}"))
        else:
            rows.append(Row(
                "study", f"{label}: whole study, Prefect flow (after start-up)", prefect["analyze_s"],
                note=(f"{found(prefect)}; Prefect start-up {prefect['prefect_startup_s']:.2f} s + imports "
                      f"{prefect['import_s']:.2f} s; with start-up "
                      f"{prefect['analyze_s'] + prefect['prefect_startup_s'] + prefect['import_s']:.2f} s; "
                      f"process wall {prefect['wall_s']:.2f} s; median of {prefect['n_ok']}"),
                target=f"<= {TARGET_ANALYZE_S:g} s" if check_targets else "",
                met=bool(prefect["analyze_s"] <= TARGET_ANALYZE_S) if check_targets else None))
            rows.append(Row(
                "study", f"{label}: peak memory, Prefect flow (VmHWM)",
                note=(f"{prefect['maxrss_mb']:.0f} MiB median in the flow's process "
                      "(Prefect's temporary API server is a separate process, not counted)"),
                target="<= 1.5 GiB" if check_targets else "",
                met=bool(prefect["maxrss_mb_max"] <= TARGET_PEAK_MB) if check_targets else None))
    return rows


# --------------------------------------------------------------------------------- scaling
def linear_fit(x, y) -> dict:
    """Least-squares ``y = a + b x``: intercept, slope, R^2 and the largest residual / mean y."""
    import numpy as np

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    fit = a + b * x
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fit) ** 2)) / ss if ss > 0 else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": r2,
            "max_rel_residual": float(np.max(np.abs(y - fit)) / max(float(y.mean()), 1e-12))}


def power_fit(x, y) -> float:
    """Exponent ``p`` of ``y ~ x**p`` (log-log least squares): 1 is linear growth."""
    import numpy as np

    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def bench_screw_scaling(size, repeats: int = 3, level_counts=(1, 2, 3, 4), warmup: bool = True,
                        known: dict | None = None) -> dict:
    """Whole study (no Prefect) on the same anatomy with 1..4 instrumented levels (4..10 screws).

    Levels are added from the bottom (L5-S1, then L4-L5, ...), so the volume and anatomy stay
    the same and only the hardware grows: 2 (n + 1) screws and up to 3 cages for n levels.
    ``known`` maps a study folder already measured (the standard study) to its result.
    """
    from benchmarks.standard import STANDARD_LEVELS, cached_study_dicom

    points = []
    for n in level_counts:
        levels = STANDARD_LEVELS[len(STANDARD_LEVELS) - n:]
        folder = cached_study_dicom(size, levels)
        r = (known or {}).get(str(folder)) or bench_study(folder, "plain", repeats, warmup)
        points.append({"instrumented_levels": list(levels), "screws_truth": 2 * (n + 1), **{
            k: r.get(k) for k in ("ok", "analyze_s", "maxrss_mb", "n_screws", "n_cages", "error",
                                  "steps_s")}})
    ok = [p for p in points if p["ok"]]
    out = {"points": points, "size": size.label()}
    if len(ok) >= 2:
        out["fit"] = linear_fit([p["screws_truth"] for p in ok], [p["analyze_s"] for p in ok])
        out["exponent"] = power_fit([p["screws_truth"] for p in ok], [p["analyze_s"] for p in ok])
        meas = [p for p in ok if (p.get("steps_s") or {}).get("measure_study") is not None]
        if len(meas) >= 2:
            out["measure_fit"] = linear_fit([p["screws_truth"] for p in meas],
                                            [p["steps_s"]["measure_study"] for p in meas])
    return out


def bench_voxel_scaling(sizes, repeats: int = 3, warmup: bool = True, known: dict | None = None) -> dict:
    """Whole study (no Prefect) on the same anatomy at finer and coarser grids (``known``: as
    in :func:`bench_screw_scaling`)."""
    from benchmarks.standard import cached_study_dicom

    points = []
    for size in sizes:
        folder = cached_study_dicom(size)
        r = (known or {}).get(str(folder)) or bench_study(folder, "plain", repeats, warmup)
        points.append({"size": size.label(), "pixel_mm": size.pixel_mm, "voxels": size.n_voxels,
                       **{k: r.get(k) for k in ("ok", "analyze_s", "maxrss_mb", "error", "steps_s")}})
    ok = [p for p in points if p["ok"]]
    out = {"points": points}
    if len(ok) >= 2:
        out["exponent"] = power_fit([p["voxels"] for p in ok], [p["analyze_s"] for p in ok])
        out["fit"] = linear_fit([p["voxels"] / 1e6 for p in ok], [p["analyze_s"] for p in ok])
        out["memory_exponent"] = power_fit([p["voxels"] for p in ok], [p["maxrss_mb"] for p in ok])
    return out


#: growth counts as linear (or better) when the log-log exponent of time against screws or
#: voxels is at most this: a fixed cost plus a linear part gives an exponent below 1
LINEAR_EXPONENT = 1.15


def scaling_rows(screws: dict | None, voxels: dict | None) -> list:
    """Rows: one per scaling point, then the fitted growth with its verdict."""
    from benchmarks.common import Row

    rows = []
    if screws is not None:
        for p in screws["points"]:
            name = f"scaling: {p['screws_truth']} screws ({len(p['instrumented_levels'])} levels)"
            if p["ok"]:
                m = p.get("steps_s", {}).get("measure_study")
                rows.append(Row("scaling", name, p["analyze_s"],
                                note=(f"found {p['n_screws']}/{p['screws_truth']} screws, {p['n_cages']} cages; "
                                      + (f"measure step {m:.2f} s; " if m is not None else "")
                                      + f"peak {p['maxrss_mb']:.0f} MiB")))
            else:
                rows.append(Row("scaling", name, note=f"FAILED: {p.get('error')}"))
        if "fit" in screws:
            f = screws["fit"]
            mf = screws.get("measure_fit")
            extra = (f"; measure step alone {mf['slope'] * 1e3:.0f} ms/screw, R^2 {mf['r2']:.3f}"
                     if mf else "")
            rows.append(Row("scaling", "growth with screws (whole study)",
                            note=(f"time ~ screws^{screws['exponent']:.2f}; "
                                  f"{f['intercept']:.2f} s + {f['slope'] * 1e3:.0f} ms/screw, "
                                  f"R^2 {f['r2']:.3f}" + extra),
                            target=f"exponent <= {LINEAR_EXPONENT:g}",
                            met=bool(screws["exponent"] <= LINEAR_EXPONENT)))
    if voxels is not None:
        for p in voxels["points"]:
            name = f"scaling: {p['size']} at {p['pixel_mm']:.2g} mm ({p['voxels'] / 1e6:.0f} Mvoxel)"
            if p["ok"]:
                rows.append(Row("scaling", name, p["analyze_s"],
                                note=f"{p['analyze_s'] / (p['voxels'] / 1e6) * 1e3:.0f} ms/Mvoxel; "
                                     f"peak {p['maxrss_mb']:.0f} MiB"))
            else:
                rows.append(Row("scaling", name, note=f"FAILED: {p.get('error')}"))
        if "exponent" in voxels:
            f = voxels["fit"]
            rows.append(Row("scaling", "growth with voxels (whole study)",
                            note=(f"time ~ voxels^{voxels['exponent']:.2f}; "
                                  f"{f['intercept']:.2f} s + {f['slope'] * 1e3:.0f} ms/Mvoxel; "
                                  f"peak memory ~ voxels^{voxels['memory_exponent']:.2f}"),
                            target=f"exponent <= {LINEAR_EXPONENT:g}",
                            met=bool(voxels["exponent"] <= LINEAR_EXPONENT)))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(_child_main(sys.argv[2:]))
    print("usage: python -m benchmarks.study_bench child --mode plain|prefect --input DIR "
          "--out DIR --result FILE (used by benchmarks.run)", file=sys.stderr)
    sys.exit(2)
