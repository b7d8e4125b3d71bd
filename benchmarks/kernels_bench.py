"""Each numba kernel against its plain NumPy/SciPy reference (issue 6, item 1).

Every kernel in ``kernels/`` that has a ``<name>_reference`` beside it is found
automatically; the workload given to both is what one analysis of the benchmark study
asks of it, built from the phantom's true geometry:

* ``sample_rays``: halo rays, for every screw 72 directions perpendicular to the axis at
  every 0.5 mm along it, 60 samples of 0.1 mm (6 mm out from the axis);
* ``sample_points``: the same halo samples as a flat list of points;
* ``rising_edges``: endplate/cage rays along each level's normal on a 0.5 mm grid over
  the disc cross-section outside the cages, both directions, 120 samples of 0.1 mm;
* ``bridged_columns``: one column per 0.5 mm of the disc cross-section from the upper to
  the lower endplate, 100 samples, 5-sample smoothing.

Timing: the first call of a kernel compiles it (or loads it from numba's cache); its
time is reported separately as ``compile_s``; kernel and reference are then each timed as
the median of ``repeats`` calls, and the ratio is reference / kernel. A kernel found with no
workload here is listed with a note instead of being skipped silently.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.common import Row, time_call

TARGET_RATIO = 20.0


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


def bench_kernels(volume, truth, repeats: int = 5, scale: float = 1.0) -> list[KernelResult]:
    """Time every discovered kernel and its reference on the study's workload."""
    results = []
    for module, name, fn, ref in discover_kernels():
        wl = build_workload(name, volume, truth, scale)
        if wl is None:
            sig = str(inspect.signature(ref)) if callable(ref) else ""
            results.append(KernelResult(module, name, float("nan"), float("nan"), float("nan"),
                                        float("nan"), f"no workload defined for {name}{sig}"))
            continue
        args, work, nbytes = wl
        t0 = time.perf_counter()
        out_k = fn(*args)  # first call: compile, or load from numba's on-disk cache
        compile_s = time.perf_counter() - t0
        out_r = ref(*args)
        dis = disagreement(out_k, out_r)
        tk = time_call(lambda: fn(*args), repeats=repeats, warmup=True)
        tr = time_call(lambda: ref(*args), repeats=max(1, repeats), warmup=False)
        results.append(KernelResult(module, name, tk.median_s, tr.median_s, compile_s,
                                    tr.median_s / tk.median_s, work, nbytes, dis,
                                    {"kernel_spread": tk.spread, "reference_spread": tr.spread}))
    return results


def float64_copy_time(volume, repeats: int = 3) -> float:
    """Median seconds of ``np.asarray(hu, np.float64)``: the references start with this copy of
    the whole volume (``map_coordinates`` on float64), so it is part of their time."""
    hu = np.ascontiguousarray(volume.hu, np.float32)
    return time_call(lambda: np.asarray(hu, np.float64), repeats=repeats).median_s


def kernel_rows(results: list[KernelResult]) -> list[Row]:
    """Table rows for :func:`bench_kernels` (target: at least 20x the reference)."""
    rows = []
    for r in results:
        if not np.isfinite(r.kernel_s):
            rows.append(Row("kernel", f"{r.module}.{r.name}", note=r.work))
            continue
        note = f"{r.work}; first call (compile/cache load) {r.compile_s:.2f} s"
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
