"""Bone continuity along disc-space columns (fusion bridging).

CONTRACT.md, "Fusion bridging": a column of the disc space's cross-section is *bridged*
when bone runs continuously from the upper endplate to the lower one. Per column (a
segment from ``start`` to ``end``, both already set just inside the two endplate cortices
so the cortices themselves are not counted):

1. ``n_samples`` trilinear samples evenly from ``start`` to ``end`` inclusive;
2. a centred moving average over ``smooth_samples`` samples (odd; edges repeat the end
   sample, as ``scipy.ndimage.uniform_filter1d(mode="nearest")``), which keeps single
   noisy voxels from breaking a bridge while a real gap of disc tissue stays below;
3. bridged when every smoothed sample is at or above ``bone_hu``.
"""
from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage

from kernels.sampling import sample_points_reference, trilinear


@numba.njit(cache=True, parallel=True)
def bridged_columns(hu, starts_kji, ends_kji, n_samples, smooth_samples, bone_hu):
    """Steps 1-3 of the module docstring, fused.

    Parameters
    ----------
    hu : (nk, nj, ni) float32, HU.
    starts_kji, ends_kji : (n, 3) float64 continuous (k, j, i) column ends.
    n_samples : int >= 2; samples per column.
    smooth_samples : int, odd >= 1; moving-average width in samples.
    bone_hu : float; bone threshold (HU).

    Returns
    -------
    bridged : (n,) bool.
    min_hu : (n,) float64; the lowest smoothed value of each column (HU).
    """
    n = starts_kji.shape[0]
    bridged = np.empty(n, np.bool_)
    min_hu = np.empty(n, np.float64)
    half = smooth_samples // 2
    for c in numba.prange(n):
        prof = np.empty(n_samples, np.float64)
        for s in range(n_samples):
            f = s / (n_samples - 1.0)
            prof[s] = trilinear(
                hu,
                starts_kji[c, 0] + f * (ends_kji[c, 0] - starts_kji[c, 0]),
                starts_kji[c, 1] + f * (ends_kji[c, 1] - starts_kji[c, 1]),
                starts_kji[c, 2] + f * (ends_kji[c, 2] - starts_kji[c, 2]),
            )
        lo = np.inf
        for s in range(n_samples):
            acc = 0.0
            for q in range(s - half, s + half + 1):
                qq = min(max(q, 0), n_samples - 1)
                acc += prof[qq]
            v = acc / (2 * half + 1)
            if v < lo:
                lo = v
        min_hu[c] = lo
        bridged[c] = lo >= bone_hu
    return bridged, min_hu


def bridged_columns_reference(hu, starts_kji, ends_kji, n_samples, smooth_samples, bone_hu):
    """Same definition as :func:`bridged_columns` with ``map_coordinates`` and
    ``uniform_filter1d``."""
    starts = np.asarray(starts_kji, np.float64)
    ends = np.asarray(ends_kji, np.float64)
    f = np.arange(n_samples) / (n_samples - 1.0)
    pts = starts[:, None, :] + f[None, :, None] * (ends - starts)[:, None, :]
    prof = sample_points_reference(hu, pts.reshape(-1, 3)).reshape(pts.shape[:2])
    width = 2 * (smooth_samples // 2) + 1
    smooth = ndimage.uniform_filter1d(prof, size=width, axis=1, mode="nearest")
    min_hu = smooth.min(axis=1)
    return min_hu >= bone_hu, min_hu
