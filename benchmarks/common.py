"""Shared benchmark helpers: timing (warm-up, then medians), the machine, table rows.

Timing rule for every benchmark in this package: one warm-up call (which for a numba kernel
is also its compile, reported separately), then ``repeats`` timed calls; the figure is their
median. Reference and kernel are timed in the same process, on the same inputs, one after
the other, so a ratio compares like with like on this machine at this moment.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_root() -> Path:
    """Scratch folder for generated studies (``FUSIONCT_BENCH_DIR`` overrides; never the repo)."""
    root = Path(os.environ.get("FUSIONCT_BENCH_DIR") or "/tmp/fusionct_bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class Timing:
    """Median wall time of ``repeats`` calls after one warm-up, and the warm-up itself (s)."""

    median_s: float
    first_s: float
    runs_s: list = field(default_factory=list)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed runs: a noise indicator, unitless."""
        if not self.runs_s or self.median_s <= 0:
            return float("nan")
        return (max(self.runs_s) - min(self.runs_s)) / self.median_s


def time_call(fn, repeats: int = 5, warmup: bool = True) -> Timing:
    """Time ``fn()``: one warm-up call (its time is ``first_s``), then the median of ``repeats``."""
    first = float("nan")
    if warmup:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(statistics.median(runs), first, runs)


def time_budgeted(fn, repeats: int = 5, budget_s: float = 60.0, first_s: float | None = None) -> Timing:
    """Like :func:`time_call` without warm-up, but stops adding runs once ``budget_s`` is spent
    (at least one run; ``first_s``, a run already timed elsewhere, counts as the first).

    For slow references replayed over hundreds of calls on a large volume, where five runs
    would take many minutes; ``len(runs_s)`` says how many runs the median is of.
    """
    runs = [] if first_s is None else [first_s]
    spent = sum(runs)
    while len(runs) < max(1, repeats) and (not runs or spent + runs[-1] <= budget_s):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
        spent += runs[-1]
    return Timing(statistics.median(runs), float("nan"), runs)


@dataclass
class Row:
    """One line of the benchmark table.

    section : which part of the issue it answers ("kernel", "loading", "study", ...).
    name : what was run.
    ours_s / ref_s : median seconds of ours and of the reference (NaN when not applicable).
    ratio : ref_s / ours_s (how many times faster ours is; > 1 is faster).
    note : everything else (compile time, sizes, bandwidth, memory).
    """

    section: str
    name: str
    ours_s: float = float("nan")
    ref_s: float = float("nan")
    ratio: float = float("nan")
    note: str = ""
    target: str = ""
    met: bool | None = None


def fmt_s(x: float) -> str:
    """Seconds in a readable unit (``nan`` as a dash)."""
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 1.0:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"


def fmt_ratio(x: float) -> str:
    """A speed ratio like ``37.2x`` (a dash when undefined)."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def render_table(rows: list[Row]) -> str:
    """The one table ``fusionct bench`` prints (GitHub markdown, readable as plain text)."""
    head = ["section", "benchmark", "ours", "reference", "ratio", "target", "met", "notes"]
    body = []
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        body.append([r.section, r.name, fmt_s(r.ours_s), fmt_s(r.ref_s), fmt_ratio(r.ratio),
                     r.target, met, r.note])
    widths = [max(len(h), *(len(b[c]) for b in body)) if body else len(h)
              for c, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def machine_info() -> dict:
    """CPU model, cores, memory, Python/NumPy/numba versions and the date (UTC)."""
    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for ln in out.splitlines():
            if ln.startswith("Model name:"):
                model = ln.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["cpu"] = model
    info["cores"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
        info["memory_gb"] = round(kb / 1024 ** 2, 1)
    except (OSError, ValueError, IndexError):
        info["memory_gb"] = None
    info["python"] = platform.python_version()
    import numba
    import numpy
    import scipy

    info["numpy"] = numpy.__version__
    info["scipy"] = scipy.__version__
    info["numba"] = numba.__version__
    info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    try:
        info["load_avg"] = os.getloadavg()[0]
    except OSError:
        info["load_avg"] = None
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine a table was measured on."""
    la = info.get("load_avg")
    return (f"{info['date_utc']}; {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; "
            f"Python {info['python']}, NumPy {info['numpy']}, SciPy {info['scipy']}, "
            f"numba {info['numba']} ({info['numba_threads']} threads)"
            + (f"; load average at start {la:.2f}" if la is not None else ""))


def python_exe() -> str:
    """The interpreter running the benchmark (children use the same one)."""
    return sys.executable
