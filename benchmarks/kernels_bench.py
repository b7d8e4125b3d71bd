"""Each numba kernel against its plain NumPy/SciPy reference (issue 6, item 1).

Every kernel in ``kernels/`` that has a ``<name>_reference`` beside it is found
automatically. The workload given to both is, first choice, **exactly what one analysis of
the study asks of it**: the whole study is run once in this process with every kernel
wrapped by a recorder (``record_pipeline_calls``), and each recorded call (its arrays and
parameters) is replayed through the kernel and through the reference. A kernel the pipeline
does not call on its own (e.g. a scalar helper used inside another kernel) gets a synthetic
workload built from the phantom's true geometry:

* ``sample_rays``: halo rays, for every screw 72 directions perpendicular to the axis at
  every 0.5 mm along it, 60 samples of 0.1 mm (6 mm out from the axis);
* ``sample_points``: the same halo samples as a flat list of points;
* ``rising_edges``: endplate rays along each level's normal on a 0.5 mm grid over the disc
  cross-section outside the cages, both directions, 120 samples of 0.1 mm;
* ``bridged_columns``: one column per 0.5 mm of the disc cross-section from the upper to
  the lower endplate, 100 samples, 5-sample smoothing;
* ``fill_contradicted``: the halo rays of a 0.8x0.8x1.5 mm study with 10 screws (15120
  rays of 70 samples, blurred-box halos 0-3 mm with 25 HU noise, half of them given a
  neighbour's width), since the 0.5 mm bench study reads every ray itself;
* ``blurred_box_integral``: 2000 scalar calls over typical widths, blurs and windows, from a
  compiled loop (as halo_widths calls it; from Python each call would time the dispatch).

Timing: the first call of a kernel compiles it (or loads it from numba's cache); its time
is reported separately as ``compile_s``; kernel and reference are then each timed as the
median of ``repeats`` replays of the whole workload, and the ratio is reference / kernel. A
kernel with no workload is listed with a note instead of being skipped silently.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.common import Row, time_budgeted, time_call

TARGET_RATIO = 20.0
#: seconds after which no more reference replays are timed (the first one always is)
REFERENCE_BUDGET_S = 60.0


@dataclass
class KernelResult:
    """One kernel's figures: medians (s), compile time (s), ratio and bytes moved per call."""

    module: str
    name: str
    kernel_s: float
    reference_s: float
    compile_s: float
    ratio: float
    work: str
    bytes_moved: float = float("nan")
    disagree: float = 0.0
    extra: dict = field(default_factory=dict)


def discover_kernels() -> list[tuple[str, str, object, object]]:
    """(module, name, kernel, reference) for every ``name`` with a ``name_reference`` in kernels/."""
    import kernels

    found = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"kernels.{info.name}")
        for attr, ref in sorted(vars(mod).items()):
            if not attr.endswith("_reference") or not callable(ref):
                continue
            if getattr(ref, "__module__", None) != mod.__name__:
                continue  # imported from a sibling module
            base = attr[: -len("_reference")]
            fn = getattr(mod, base, None)
            if fn is not None and callable(fn):
                found.append((info.name, base, fn, ref))
    return found


# ----------------------------------------------------------------------------- workloads
def _perp_basis(axis):
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(a, t)
    u /= np.linalg.norm(u)
    return u, np.cross(a, u)


def halo_rays(volume, truth, n_angles: int = 72, station_mm: float = 0.5):
    """Rays out from every screw axis: (origins_kji, directions_kji per mm)."""
    origins, dirs = [], []
    ang = np.deg2rad(np.arange(n_angles) * 360.0 / n_angles)
    for s in truth["screws"]:
        head = np.asarray(s["head_lps_mm"], float)
        tip = np.asarray(s["tip_lps_mm"], float)
        axis = tip - head
        length = float(np.linalg.norm(axis))
        u, v = _perp_basis(axis)
        t = np.arange(0.0, length, station_mm) / length
        pts = head[None, :] + t[:, None] * axis[None, :]
        d = np.cos(ang)[:, None] * u[None, :] + np.sin(ang)[:, None] * v[None, :]
        o = np.repeat(pts, n_angles, axis=0)
        dd = np.tile(d, (len(pts), 1))
        origins.append(o)
        dirs.append(dd)
    o = np.concatenate(origins)
    d = np.concatenate(dirs)
    return (np.ascontiguousarray(volume.lps_to_kji(o), np.float64),
            np.ascontiguousarray(volume.direction_lps_to_kji(d), np.float64))


def disc_grid(truth, grid_mm: float = 0.5):
    """Points on each level's disc plane inside its body outline and outside its cages (with a
    1 mm margin, as the definitions exclude cage material): list of (points_lps, normal, height)."""
    out = []
    for lv in truth["levels"]:
        c = np.asarray(lv["center_lps_mm"], float)
        n = np.asarray(lv["normal"], float)
        u = np.asarray(lv["axis_u"], float)
        v = np.asarray(lv["axis_v"], float)
        a, b = lv["semi_axes_mm"]
        us = np.arange(-a, a + 1e-9, grid_mm)
        vs = np.arange(-b, b + 1e-9, grid_mm)
        uu, vv = np.meshgrid(us, vs, indexing="ij")
        inside = (uu / a) ** 2 + (vv / b) ** 2 <= 1.0
        pts = c[None, :] + uu[inside][:, None] * u[None, :] + vv[inside][:, None] * v[None, :]
        keep = np.ones(len(pts), bool)
        for cg in truth.get("cages", []):
            if cg.get("level") != lv["level"]:
                continue
            axes = np.asarray(cg["axes"], float)  # rows: normal, e_u, e_v
            half = np.asarray(cg["half_sizes_mm"], float)
            rel = pts - np.asarray(cg["centroid_lps_mm"], float)[None, :]
            keep &= ~((np.abs(rel @ axes[1]) <= half[1] + 1.0) & (np.abs(rel @ axes[2]) <= half[2] + 1.0))
        pts = pts[keep]
        out.append((pts, n, float(lv.get("disc_height_mm", 10.0))))
    return out


def endplate_rays(volume, truth, grid_mm: float = 0.5):
    """From the disc centre plane towards both endplates along the level normal."""
    origins, dirs = [], []
    for pts, n, _h in disc_grid(truth, grid_mm):
        for sign in (1.0, -1.0):
            origins.append(pts)
            dirs.append(np.repeat((sign * n)[None, :], len(pts), axis=0))
    o = np.concatenate(origins)
    d = np.concatenate(dirs)
    return (np.ascontiguousarray(volume.lps_to_kji(o), np.float64),
            np.ascontiguousarray(volume.direction_lps_to_kji(d), np.float64))


def bridging_columns(volume, truth, grid_mm: float = 0.5):
    """Columns across each disc from just inside the lower to just inside the upper endplate."""
    starts, ends = [], []
    for pts, n, h in disc_grid(truth, grid_mm):
        half = 0.5 * h - 0.5
        starts.append(pts - half * n[None, :])
        ends.append(pts + half * n[None, :])
    return (np.ascontiguousarray(volume.lps_to_kji(np.concatenate(starts)), np.float64),
            np.ascontiguousarray(volume.lps_to_kji(np.concatenate(ends)), np.float64))


def _trilinear_bytes(n_samples: int, coord_bytes_per_sample: float, out_bytes: float) -> float:
    """Bytes a gather kernel must move: 8 float32 neighbours per sample, coordinates, output."""
    return n_samples * (8 * 4 + coord_bytes_per_sample) + out_bytes


def build_workload(name: str, volume, truth, scale: float = 1.0):
    """(args tuple, description, bytes moved per call) for a known kernel, or None."""
    hu = np.ascontiguousarray(volume.hu, np.float32)
    grid = 0.5 / np.sqrt(max(scale, 1e-6))
    if name == "sample_rays":
        o, d = halo_rays(volume, truth, station_mm=0.5 / max(scale, 1e-6))
        n_steps = 60
        args = (hu, o, d, 0.0, 0.1, n_steps)
        n = len(o) * n_steps
        return args, f"{len(o)} rays x {n_steps}", _trilinear_bytes(n, 0.0, n * 8 + o.nbytes + d.nbytes)
    if name == "sample_points":
        o, d = halo_rays(volume, truth, station_mm=0.5 / max(scale, 1e-6))
        t = 0.1 * np.arange(60)
        pts = (o[:, None, :] + t[None, :, None] * d[:, None, :]).reshape(-1, 3)
        pts = np.ascontiguousarray(pts)
        n = len(pts)
        return (hu, pts), f"{n} points", _trilinear_bytes(n, 24.0, n * 8)
    if name == "rising_edges":
        o, d = endplate_rays(volume, truth, grid)
        n_steps = 120
        args = (hu, o, d, 0.0, 0.1, n_steps, 5, 600.0, 20, 0.5)
        n = len(o) * n_steps
        return args, f"{len(o)} rays x {n_steps}", _trilinear_bytes(n, 0.0, len(o) * 24 + o.nbytes + d.nbytes)
    if name == "bridged_columns":
        s, e = bridging_columns(volume, truth, grid)
        n_samples = 100
        args = (hu, s, e, n_samples, 5, 200.0)
        n = len(s) * n_samples
        return args, f"{len(s)} columns x {n_samples}", _trilinear_bytes(n, 0.0, len(s) * 9 + s.nbytes + e.nbytes)
    if name == "fill_contradicted":
        # what one 0.8x0.8x1.5 mm study with 10 screws asks of it (the shipped bench study at
        # 0.5 mm reads every ray itself, so the pipeline does not call it there): 42 stations x
        # 36 azimuths per screw, 70 samples of 0.1 mm, half the rays given a neighbour's width
        rng = np.random.default_rng(0)
        n_rays, n_steps = max(int(15120 * min(scale, 1.0)), 100), 70
        d = -0.5 + 0.1 * np.arange(n_steps)
        w = rng.uniform(0.0, 3.0, n_rays)[:, None]
        g = (230.0 - 205.0 * ((d[None, :] > 0) & (d[None, :] < w))
             + rng.normal(0.0, 25.0, (n_rays, n_steps)))
        fill = np.where(rng.uniform(size=n_rays) < 0.5, rng.uniform(0.5, 3.0, n_rays), np.nan)
        args = (np.ascontiguousarray(g), -0.5, 0.1, fill, rng.uniform(1.2, 2.1, n_rays),
                np.full(n_rays, 0.9), 0.3, 25.0, 230.0, 0.4, 380.0)
        return args, f"{n_rays} rays x {n_steps}", float(g.nbytes + 3 * n_rays * 8 + n_rays)
    if name == "blurred_box_integral":
        rng = np.random.default_rng(0)
        n = max(int(2000 * min(scale, 1.0)), 20)
        args = np.column_stack([rng.uniform(0.0, 3.0, n), rng.uniform(0.2, 0.8, n),
                                rng.uniform(0.3, 1.0, n)])
        return args, f"{n} scalar calls", float("nan")
    return None


def disagreement(a, b) -> float:
    """Fraction of output elements where kernel and reference differ (0 = identical).

    Floats compare with ``rtol=1e-6, atol=1e-3`` and NaN equal to NaN. A decision taken on a
    knife edge (a flat profile whose half-way level equals its samples, a column minimum on
    the threshold) can flip with the last bit of rounding, so a tiny fraction is expected;
    the notes show it instead of hiding it.
    """
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    if len(a) != len(b):
        return 1.0
    worst = 0.0
    for x, y in zip(a, b):
        x = np.asarray(x)
        y = np.asarray(y)
        if x.shape != y.shape:
            return 1.0
        if x.dtype == bool or y.dtype == bool:
            bad = x != y
        else:
            bad = ~np.isclose(x, y, rtol=1e-6, atol=1e-3, equal_nan=True)
        worst = max(worst, float(np.mean(bad)) if bad.size else 0.0)
    return worst


# ------------------------------------------------------------------ recorded pipeline calls
def record_pipeline_calls(input_path, volume) -> dict:
    """Run the whole study on ``input_path`` in this process and record every kernel call.

    Returns ``{kernel name: [args tuple, ...]}``. Arguments are copied when they are small;
    the CT volume itself (any array of the volume's shape) is replaced by ``volume.hu`` in
    memory so replays never read a deleted cache file.
    """
    import os
    import sys
    import tempfile

    from pipeline.config import Config

    _import_pipeline()
    kernels_by_fn = {id(fn): name for _m, name, fn, _r in discover_kernels()}
    hu = np.ascontiguousarray(volume.hu, np.float32)
    calls: dict[str, list] = {}

    def keep(a):
        if isinstance(a, np.ndarray):
            if a.shape == hu.shape:
                return hu
            return a.copy(order="K")  # keep the memory layout: it selects the compiled version
        return a

    def recorder(name, fn):
        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append((tuple(keep(a) for a in args),
                                               {k: keep(v) for k, v in kwargs.items()}))
            return fn(*args, **kwargs)
        return wrapper

    patched = []
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith(("pipeline.", "flows.")):
            continue
        for attr, val in list(vars(mod).items()):
            if callable(val) and id(val) in kernels_by_fn:
                patched.append((mod, attr, val))
                setattr(mod, attr, recorder(kernels_by_fn[id(val)], val))
    old_cache = os.environ.get("FUSIONCT_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory(prefix="fusionct_record_") as tmp:
            os.environ["FUSIONCT_CACHE_DIR"] = os.path.join(tmp, "cache")
            import pipeline.study

            pipeline.study.analyze_study(str(input_path), os.path.join(tmp, "out"), Config())
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)
        if old_cache is None:
            os.environ.pop("FUSIONCT_CACHE_DIR", None)
        else:
            os.environ["FUSIONCT_CACHE_DIR"] = old_cache
    return calls


def _import_pipeline() -> None:
    """Import the modules that call kernels, so the recorder can find their references."""
    import importlib.util

    for name in ("pipeline.study", "pipeline.measure", "pipeline.detect", "pipeline.anatomy",
                 "pipeline.fracture", "pipeline.outputs"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _replay(fn, calls):
    out = None
    for args, kwargs in calls:
        out = fn(*args, **kwargs)
    return out


def _samples_in(name: str, args) -> int:
    """Trilinear samples one recorded call takes (for the bandwidth figure), 0 if none."""
    if name in ("sample_rays", "rising_edges"):
        return int(args[1].shape[0]) * int(args[5])
    if name == "sample_points":
        return int(np.asarray(args[1]).shape[0])
    if name == "bridged_columns":
        return int(args[1].shape[0]) * int(args[3])
    return 0


def _call_bytes(name: str, args) -> float:
    """Bytes a recorded call must move: 8 float32 neighbours per sample plus every small array."""
    small = sum(a.nbytes for a in args if isinstance(a, np.ndarray) and a.ndim < 3)
    return _samples_in(name, args) * 32.0 + small


def _scalar_loop(fn):
    """A compiled loop calling the scalar numba function ``fn`` once per row of its input."""
    import numba

    @numba.njit
    def loop(rows):
        out = np.empty(rows.shape[0])
        for i in range(rows.shape[0]):
            out[i] = fn(rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3])
        return out

    return loop


def bench_recorded(name, module, fn, ref, calls, repeats: int) -> KernelResult:
    """Kernel vs reference over the calls one analysis made."""
    t0 = time.perf_counter()
    out_k = [fn(*a, **k) for a, k in calls]  # first calls: compile or cache load
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_r = [ref(*a, **k) for a, k in calls]
    ref_first = time.perf_counter() - t0
    dis = max((disagreement(x, y) for x, y in zip(out_k, out_r)), default=0.0)
    del out_k, out_r
    tk = time_call(lambda: _replay(fn, calls), repeats=repeats, warmup=False)
    tr = time_budgeted(lambda: _replay(ref, calls), repeats=repeats, budget_s=REFERENCE_BUDGET_S,
                       first_s=ref_first)
    n_hu = sum(1 for a, _ in calls if any(isinstance(x, np.ndarray) and x.ndim == 3 for x in a))
    samples = sum(_samples_in(name, a) for a, _ in calls)
    work = f"{len(calls)} calls from one analysis" + (f", {samples} samples" if samples else "")
    nbytes = float(sum(_call_bytes(name, a) for a, _ in calls))
    return KernelResult(module, name, tk.median_s, tr.median_s, compile_s,
                        tr.median_s / tk.median_s, work, nbytes, dis,
                        {"kernel_spread": tk.spread, "reference_spread": tr.spread,
                         "reference_runs": len(tr.runs_s), "kernel_runs": len(tk.runs_s),
                         "calls": len(calls), "calls_with_volume": n_hu, "recorded": True})


def bench_kernels(volume, truth, repeats: int = 5, scale: float = 1.0,
                  recorded: dict | None = None) -> list[KernelResult]:
    """Time every discovered kernel and its reference.

    ``recorded`` (from :func:`record_pipeline_calls`) gives the real workload of one analysis;
    kernels absent from it use :func:`build_workload` on ``volume``/``truth``.
    """
    results = []
    for module, name, fn, ref in discover_kernels():
        if recorded and recorded.get(name):
            results.append(bench_recorded(name, module, fn, ref, recorded[name], repeats))
            continue
        wl = build_workload(name, volume, truth, scale)
        if wl is None:
            sig = str(inspect.signature(ref)) if callable(ref) else ""
            results.append(KernelResult(module, name, float("nan"), float("nan"), float("nan"),
                                        float("nan"), f"not called by the pipeline on this study "
                                        f"and no synthetic workload for {name}{sig}"))
            continue
        args, work, nbytes = wl
        if name == "blurred_box_integral":
            # a scalar device function: timed as halo_widths calls it, from compiled code
            # (called one by one from Python it would time numba's dispatch, ~0.5 us a call)
            rows = np.column_stack([args[:, 0], args[:, 1], args[:, 2], args[:, 2] + 1.5])
            r = bench_recorded(name, module, _scalar_loop(fn),
                               lambda x: np.array([ref(*row) for row in x]), [((rows,), {})], repeats)
            r.work, r.bytes_moved = "synthetic: " + work + " in a compiled loop", float("nan")
            r.extra["recorded"] = False
            results.append(r)
            continue
        t0 = time.perf_counter()
        out_k = fn(*args)  # first call: compile, or load from numba's on-disk cache
        compile_s = time.perf_counter() - t0
        out_r = ref(*args)
        dis = disagreement(out_k, out_r)
        tk = time_call(lambda: fn(*args), repeats=repeats, warmup=True)
        tr = time_call(lambda: ref(*args), repeats=max(1, repeats), warmup=False)
        results.append(KernelResult(module, name, tk.median_s, tr.median_s, compile_s,
                                    tr.median_s / tk.median_s, "synthetic: " + work, nbytes, dis,
                                    {"kernel_spread": tk.spread, "reference_spread": tr.spread,
                                     "calls": 1, "calls_with_volume": 1, "recorded": False}))
    return results


def call_overhead(n_points: int = 1000, calls: int = 200) -> dict:
    """Per-call time of a small parallel kernel call (``sample_points`` on ``n_points``).

    The pipeline makes hundreds of small kernel calls per study; each parallel call wakes
    numba's worker threads. On a busy machine OpenMP's default active waiting makes some of
    those wake-ups cost milliseconds, which the median and the 90th percentile show.
    """
    import os

    import numba

    from kernels.sampling import sample_points

    hu = np.zeros((64, 64, 64), np.float32)
    pts = np.random.default_rng(0).uniform(1.0, 60.0, (n_points, 3))
    sample_points(hu, pts)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sample_points(hu, pts)
        ts.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(ts)), "p90_s": float(np.percentile(ts, 90)),
            "layer": numba.threading_layer(), "threads": numba.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}


def float64_copy_time(volume, repeats: int = 3) -> float:
    """Median seconds of ``np.asarray(hu, np.float64)``: the references start with this copy of
    the whole volume (``map_coordinates`` on float64), so it is part of their time."""
    hu = np.ascontiguousarray(volume.hu, np.float32)
    return time_call(lambda: np.asarray(hu, np.float64), repeats=repeats).median_s


def kernel_rows(results: list[KernelResult], float64_copy_s: float | None = None,
                variant: tuple[str, dict] | None = None) -> list[Row]:
    """Table rows for :func:`bench_kernels` (target: at least 20x the reference).

    With ``float64_copy_s`` the notes also give the ratio after taking out of the reference
    the float64 copy of the volume it makes on each call (a cost a better reference would
    avoid), so a ratio is not mistaken for the kernel's own merit.
    """
    rows = []
    for r in results:
        if not np.isfinite(r.kernel_s):
            rows.append(Row("kernel", f"{r.module}.{r.name}", note=r.work))
            continue
        note = f"{r.work}; first replay (incl. compile or cache load) {r.compile_s:.2f} s"
        if r.extra.get("reference_runs") and r.extra["reference_runs"] < r.extra.get("kernel_runs", 0):
            note += f"; reference median of {r.extra['reference_runs']} (time budget)"
        n_copy = r.extra.get("calls_with_volume", 0)
        if float64_copy_s and n_copy:
            rest = r.reference_s - n_copy * float64_copy_s
            if rest > 0:
                note += f"; {rest / r.kernel_s:.1f}x without the reference's {n_copy} volume copies"
        if variant is not None and isinstance(variant[1].get(r.name), float):
            tv = variant[1][r.name]
            note += f"; with {variant[0]}: {tv * 1e3:.1f} ms = {r.reference_s / tv:.1f}x"
        if r.disagree > 0:
            note += f"; {100 * r.disagree:.2g} % of outputs differ from the reference"
        rows.append(Row("kernel", f"{r.module}.{r.name} vs {r.name}_reference", r.kernel_s,
                        r.reference_s, r.ratio, note, f">= {TARGET_RATIO:g}x",
                        bool(r.ratio >= TARGET_RATIO)))
    return rows


def compile_fresh(names=None) -> dict:
    """Compile time of each kernel without numba's cache, in a fresh interpreter (s)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    code = r"""
import json, time, importlib, numpy as np
from benchmarks.kernels_bench import discover_kernels
out = {}
for module, name, fn, ref in discover_kernels():
    if not hasattr(fn, "signatures"):
        continue
    hu = np.zeros((4, 4, 4), np.float32)
    o = np.full((2, 3), 1.0); d = np.full((2, 3), 0.1)
    args = {"sample_rays": (hu, o, d, 0.0, 0.1, 5), "sample_points": (hu, o),
            "rising_edges": (hu, o, d, 0.0, 0.1, 5, 2, 100.0, 2, 0.5),
            "bridged_columns": (hu, o, o + 1, 5, 3, 100.0)}.get(name)
    if args is None:
        continue
    t0 = time.perf_counter(); fn(*args); out[name] = time.perf_counter() - t0
print(json.dumps(out))
"""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           cwd=str(__import__("benchmarks.common").common.REPO), timeout=600)
    if p.returncode != 0:
        return {}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ kernels under a setting
def kernel_times_child(size_args: tuple, repeats: int, env_extra: dict, scale: float = 1.0,
                       timeout_s: float = 1800) -> dict:
    """Median kernel replay times (s) in a fresh interpreter with ``env_extra`` set.

    Settings such as ``OMP_WAIT_POLICY`` are read once when the OpenMP runtime starts, so
    they can only be compared in another process. The child records the same analysis and
    replays only the kernels (the references' times from the main run stay valid).
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from benchmarks.common import REPO

    with tempfile.TemporaryDirectory(prefix="fusionct_kvar_") as d:
        out = os.path.join(d, "times.json")
        env = dict(os.environ, **env_extra)
        cmd = [sys.executable, "-m", "benchmarks.kernels_bench", "--replay-kernels",
               ",".join(str(x) for x in size_args), "--repeats", str(repeats), "--scale", str(scale),
               "--out", out]
        p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        if p.returncode != 0 or not os.path.exists(out):
            tail = (p.stderr or "").strip().splitlines()
            return {"error": tail[-1][:300] if tail else f"exit {p.returncode}"}
        with open(out) as fh:
            return json.load(fh)


def _replay_kernels_main(size_csv: str, repeats: int, scale: float, out: str) -> int:
    import json

    from benchmarks.standard import StudySize, cached_study_dicom, cached_study_volume

    n, k, px, sl = size_csv.split(",")
    size = StudySize(int(n), int(k), float(px), float(sl))
    volume, truth = cached_study_volume(size)
    recorded = record_pipeline_calls(cached_study_dicom(size), volume)
    times = {}
    for _module, name, fn, _ref in discover_kernels():
        calls = recorded.get(name)
        if not calls:
            wl = build_workload(name, volume, truth, scale)
            if wl is None or name == "blurred_box_integral":
                continue
            calls = [(wl[0], {})]
        _replay(fn, calls)
        times[name] = time_call(lambda: _replay(fn, calls), repeats=repeats, warmup=False).median_s
    with open(out, "w") as fh:
        json.dump(times, fh)
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--replay-kernels", required=True, help="n_inplane,n_slices,pixel_mm,slice_mm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.exit(_replay_kernels_main(a.replay_kernels, a.repeats, a.scale, a.out))
