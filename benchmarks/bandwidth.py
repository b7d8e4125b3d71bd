"""Effective memory bandwidth of each kernel against a plain memory copy (issue 6, item 5).

The physical limit is measured, not looked up: a copy of a buffer much larger than the
caches, both with ``numpy.copyto`` (one thread) and with a numba ``prange`` loop (all
threads), counting read + write bytes (2 x the buffer size) per copy; the faster of the two
is the machine's copy bandwidth.

A kernel's *effective* bandwidth counts the bytes its definition must touch once per call:
for trilinear sampling 8 float32 neighbours per sample (32 B), plus the coordinates it reads
and the outputs it writes (see ``kernels_bench.build_workload``), divided by its median time.
Neighbouring samples share voxels, so caches serve many of those reads and a gather kernel
can in principle exceed the copy figure; a fraction well below 1 says the kernel is bound
by arithmetic or latency rather than by memory.
"""
from __future__ import annotations

import numba
import numpy as np

from benchmarks.common import Row, time_call


@numba.njit(parallel=True, cache=True)
def _parallel_copy(dst, src):
    n = src.shape[0]
    for i in numba.prange(n):
        dst[i] = src[i]


def copy_bandwidth(n_bytes: int = 512 * 2 ** 20, repeats: int = 5) -> dict:
    """Copy bandwidth in GB/s (1e9 B/s; read + write) of a ``n_bytes`` float32 buffer."""
    n = n_bytes // 4
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    moved = 2.0 * src.nbytes
    t1 = time_call(lambda: np.copyto(dst, src), repeats=repeats)
    tp = time_call(lambda: _parallel_copy(dst, src), repeats=repeats)
    out = {"numpy_copy_GBps": moved / t1.median_s / 1e9,
           "parallel_copy_GBps": moved / tp.median_s / 1e9,
           "buffer_MB": src.nbytes / 2 ** 20}
    out["copy_GBps"] = max(out["numpy_copy_GBps"], out["parallel_copy_GBps"])
    return out


def bandwidth_rows(kernel_results, copy: dict) -> list[Row]:
    """One row for the copy and one per kernel: GB/s and the fraction of the copy figure."""
    limit = copy["copy_GBps"]
    rows = [Row("bandwidth", "memory copy (physical limit)",
                note=(f"{limit:.1f} GB/s (numpy copyto {copy['numpy_copy_GBps']:.1f}, "
                      f"numba prange {copy['parallel_copy_GBps']:.1f}; "
                      f"{copy['buffer_MB']:.0f} MB buffer, read+write)"))]
    for r in kernel_results:
        if not np.isfinite(r.kernel_s) or not np.isfinite(r.bytes_moved):
            continue
        gbps = r.bytes_moved / r.kernel_s / 1e9
        rows.append(Row("bandwidth", f"{r.module}.{r.name}", r.kernel_s,
                        note=f"{gbps:.2f} GB/s effective = {gbps / limit:.2f} of copy "
                             f"({r.bytes_moved / 2 ** 20:.0f} MB touched per call)"))
    return rows
