"""Sub-voxel rising edges along rays: the endplate surface and a cage's bearing face.

CONTRACT.md, "Cage subsidence": depth is measured along the endplate normal from the
endplate's own surface beside the cage (its intact rim) to the cage's deepest point. Both
surfaces are found the same way, as a *level crossing* of a blurred step: each ray
starts on the dark side (disc space, or bone beyond a cage face) and runs towards the
bright structure (endplate cortex, titanium, marker pin). Per ray:

1. ``low`` = mean of the first ``n_low`` samples (the dark side's level, HU);
2. ``s1`` = first sample at or above ``detect_hu`` (no such sample: no edge, NaN);
3. ``peak`` = the maximum over ``n_peak`` samples from ``s1`` (the bright structure's
   level, which for a thin cortex is its blurred peak);
4. ``level = low + fraction * (peak - low)`` (``fraction`` 0.5: half-max);
5. walking back from the peak, the first sample below ``level``; the edge is the linear
   interpolation between it and its successor, in the ray's parameter unit (mm).

For a step blurred by a symmetric point-spread function the half-way crossing sits on the
true surface. Where the bright side's level is not its true one (metal clipped at the top
of the data range and lifted by blooming; a thin cortex whose blurred peak is below its
density) the pipeline passes another ``fraction`` (see ``pipeline.measure``).
"""
from __future__ import annotations


import numba
import numpy as np

from kernels.sampling import sample_rays_reference, trilinear


@numba.njit(cache=True, inline="always")
def _rising_edge_1d(prof, n_low, detect_hu, n_peak, fraction):
    """Steps 1-5 of the module docstring on one profile; returns (edge_index, low, peak)."""
    n = prof.shape[0]
    nl = min(max(n_low, 1), n)
    low = 0.0
    for s in range(nl):
        low += prof[s]
    low /= nl
    s1 = -1
    for s in range(n):
        if prof[s] >= detect_hu:
            s1 = s
            break
    if s1 < 0:
        return np.nan, low, np.nan
    ipeak = s1
    peak = prof[s1]
    for s in range(s1, min(s1 + n_peak, n)):
        if prof[s] > peak:
            peak = prof[s]
            ipeak = s
    level = low + fraction * (peak - low)
    s = ipeak
    while s >= 0 and prof[s] >= level:
        s -= 1
    if s < 0 or s + 1 >= n:
        return np.nan, low, peak
    a = prof[s]
    b = prof[s + 1]
    if b - a <= 0.0:
        return float(s), low, peak
    return s + (level - a) / (b - a), low, peak


@numba.njit(cache=True, parallel=True)
def rising_edges(hu, origins_kji, directions_kji, s_start, s_step, n_steps,
                 n_low, detect_hu, n_peak, fraction):
    """Half-way rising edge along each ray, fused with the sampling.

    Parameters
    ----------
    hu : (nk, nj, ni) float32 array, HU.
    origins_kji, directions_kji : (n, 3) float64; ray ``origin + s * direction`` in
        continuous (k, j, i); the pipeline gives directions per mm so ``s`` is mm.
    s_start, s_step : float; first sample and step along the ray (mm).
    n_steps : int; samples per ray.
    n_low : int; samples averaged for the dark-side level.
    detect_hu : float; first sample at or above this means the bright structure is reached.
    n_peak : int; samples from there over which the bright level (maximum) is taken.
    fraction : float; 0.5 for the half-way crossing.

    Returns
    -------
    edge_s : (n,) float64; the edge's ray parameter (mm), NaN where none was found.
    low_hu, peak_hu : (n,) float64; the dark and bright levels used.
    """
    n = origins_kji.shape[0]
    edge = np.empty(n, np.float64)
    low = np.empty(n, np.float64)
    peak = np.empty(n, np.float64)
    for r in numba.prange(n):
        prof = np.empty(n_steps, np.float64)
        for s in range(n_steps):
            t = s_start + s * s_step
            prof[s] = trilinear(hu,
                                origins_kji[r, 0] + t * directions_kji[r, 0],
                                origins_kji[r, 1] + t * directions_kji[r, 1],
                                origins_kji[r, 2] + t * directions_kji[r, 2])
        e, lo, pk = _rising_edge_1d(prof, n_low, detect_hu, n_peak, fraction)
        edge[r] = s_start + e * s_step
        low[r] = lo
        peak[r] = pk
    return edge, low, peak


def rising_edges_reference(hu, origins_kji, directions_kji, s_start, s_step, n_steps,
                           n_low, detect_hu, n_peak, fraction):
    """Same definition as :func:`rising_edges`, vectorised NumPy over
    ``scipy.ndimage.map_coordinates(order=1)`` profiles."""
    prof = sample_rays_reference(hu, origins_kji, directions_kji, s_start, s_step, n_steps)
    n, m = prof.shape
    idx = np.arange(m)
    low = prof[:, : min(max(n_low, 1), m)].mean(axis=1)
    above = prof >= detect_hu
    found = above.any(axis=1)
    s1 = np.argmax(above, axis=1)
    window = (idx[None, :] >= s1[:, None]) & (idx[None, :] < s1[:, None] + n_peak)
    masked = np.where(window, prof, -np.inf)
    ipeak = np.argmax(masked, axis=1)
    peak = masked[np.arange(n), ipeak]
    level = low + fraction * (peak - low)
    below = (prof < level[:, None]) & (idx[None, :] <= ipeak[:, None])
    has_below = below.any(axis=1)
    s = m - 1 - np.argmax(below[:, ::-1], axis=1)
    s_next = np.minimum(s + 1, m - 1)
    a = prof[np.arange(n), s]
    b = prof[np.arange(n), s_next]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(b - a > 0, (level - a) / (b - a), 0.0)
    e = s + frac
    ok = found & has_below & (s < m - 1)
    edge = np.where(ok, s_start + e * s_step, np.nan)
    peak = np.where(found, peak, np.nan)
    return edge, low, peak
