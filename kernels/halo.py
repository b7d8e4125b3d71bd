"""Peri-screw lucency halo: per-ray width of the low-density zone around a screw shaft.

CONTRACT.md, "Peri-screw lucency halo": at each point of the screw's intraosseous
surface, the radial width (perpendicular to the screw axis) of the low-density zone
between the *true* metal surface and the surrounding bone. Metal blooming must count
neither as metal nor as halo, so the width is measured from the shaft's true radius.

A ray starts on the screw axis and runs outward perpendicular to it; its profile is
sampled at distances ``d = d_start + s * step`` (mm) *from the true metal surface*. Before
the per-ray analysis the pipeline subtracts the metal's own tail (blooming and blur,
estimated from halo-free rays of the same study, see ``pipeline.measure``), so the
profile ``g`` the kernels read is, ideally, bone (``bone_hu``) where there is bone and
the lucent level (``lucent_hu``) inside a halo. Per ray:

1. ``half = (lucent_hu + bone_hu) / 2``: the half-way level of the lucent-to-bone step;
   for a step blurred by a symmetric point-spread function it crosses on the true edge.
2. **Crossing mode.** If ``g`` is below ``half`` at the first readable distance
   ``d_vis`` (the lucency touches the visible part of the surface), the outer edge is the
   first up-crossing of ``half`` beyond ``d_vis`` that is followed by bone for
   ``settle_mm`` (a short bright speck inside the halo does not end it); the width is
   the edge's distance, linearly interpolated between samples. When the densest tissue
   just beyond that edge (maximum over ``[edge + local_from, edge + local_to]``) is denser
   than ``bone_hu`` (a sclerotic rim), the step is from lucency to *that* level and the
   edge is re-read at the half-way level between the two (twice). No edge within ``max_width_mm``:
   the ray never reaches bone (a dark beam-hardening streak, or the ray left the bone)
   and is excluded (NaN, status 2). An edge found within ``window_mm`` of ``d_vis`` (and no
   rim) is censored: the true half-way crossing may lie before ``d_vis``, where it cannot be
   seen, and the first crossing after it is then wherever noise puts it, just past
   ``d_vis`` (0.8x0.8x1.5 mm, d_vis 1.1 mm: a 0.78 mm halo read 1.1-1.7 mm on most rays).
   Such a ray is read in deficit mode (step 3), whose blurred-box model covers edges on
   both sides of ``d_vis``.
   a. The profile need not be under ``half`` at ``d_vis`` itself: where the metal's tail is
      under-subtracted there (a small axis or diameter error of detected geometry puts the
      steep tail a little off) a wide lucency can start just above it. When the profile
      is still clearly lucent beyond the deficit window (median over
      ``(d_end, d_end + far_len]``, ``d_end = d_vis + window + 2 sigma``, within
      ``far_lucent`` of the lucent-to-bone step above ``lucent_hu``), the lucency is
      entered where the profile first falls under ``half`` up to ``d_end``. (Deficit
      mode, which assumes a halo thinner than ``d_vis``, then took the lucency beyond the
      window for the ray's own bone level and read no halo: on detected geometry at
      0.35x0.35x0.6 mm rays inside 2-3 mm halos read 0 mm, were dropped as outliers, and
      in-sector rays were excluded 2-3 times as often as the others.)
   b. Against the ray's own bone level: when the median of ``g`` over
      ``(edge + 2 sigma, edge + 2 sigma + far_len]`` (past the blurred edge) lies more than
      ``low_margin`` under ``bone_hu`` (poorer bone, a streak over the whole ray; no rim
      read), the step is from the lucency to that level and the edge is re-read at the
      half-way level between the two, as deficit mode compares with the ray's own level.
      A ray no longer under that level where the lucency was entered is read in deficit
      mode. (At the study's half-way level such a ray crossed wherever noise put it: a
      1.3 mm halo in 135 HU bone read 1.8 mm.)
3. **Deficit mode.** Otherwise the halo, if any, is thinner than ``d_vis`` and only its
   blurred outer tail reaches the readable part. The width is the one whose blurred
   box ``[0, w]`` (Gaussian, ``sigma_mm``) has the same deficit below bone over
   ``[d_vis, d_vis + window_mm + 2 sigma]`` as the profile: the deficit integral is unchanged by
   blurring, so this reads halos thinner than the blur. Status 0 when the result is 0,
   else 1.

Also returned per ray: the lucent minimum and the *rim excess*, the mean of ``g`` over
``[edge + rim_from_mm, edge + rim_to_mm]`` minus ``bone_hu`` (a sclerotic rim just
outside the lucency, the "double halo", shows as a clear excess).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from scipy import special

from kernels.sampling import trilinear

_SQRT2 = math.sqrt(2.0)


@numba.njit(cache=True, inline="always")
def _phi(x):
    return 0.5 * math.erfc(-x / _SQRT2)


@numba.njit(cache=True, inline="always")
def _psi(x):
    """Antiderivative of the normal CDF: psi(x) = x * Phi(x) + phi(x)."""
    return x * _phi(x) + math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@numba.njit(cache=True)
def blurred_box_integral(w, sigma, a, b):
    """Integral over [a, b] of the box [0, w] blurred by a Gaussian of ``sigma`` (mm)."""
    if w <= 0.0:
        return 0.0
    if sigma <= 1e-6:
        lo = max(a, 0.0)
        hi = min(b, w)
        return max(hi - lo, 0.0)
    s = sigma
    # int Phi((w - d)/s) dd = -s * psi((w - d)/s); int Phi(-d/s) dd = -s * psi(-d/s)
    i1 = s * (_psi((w - a) / s) - _psi((w - b) / s))
    i0 = s * (_psi(-a / s) - _psi(-b / s))
    return i1 - i0


@numba.njit(cache=True)
def invert_blurred_box_integral(target, sigma, a, b, w_hi):
    """The width ``w`` in [0, w_hi] whose blurred-box integral over [a, b] equals ``target``
    (monotone in ``w``; bisection to 1e-4 mm)."""
    if target <= 0.0:
        return 0.0
    if blurred_box_integral(w_hi, sigma, a, b) <= target:
        return w_hi
    lo = 0.0
    hi = w_hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if blurred_box_integral(mid, sigma, a, b) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@numba.njit(cache=True, inline="always")
def _first_settled_crossing(g, s_vis, s_max, level, n_settle):
    """First index s in (s_vis, s_max] where g rises through ``level`` and stays at or above
    it for ``n_settle`` samples (-1 if none), and the minimum of g from s_vis up to it."""
    n = g.shape[0]
    gmin = g[s_vis]
    for s in range(s_vis + 1, s_max + 1):
        if g[s] < gmin:
            gmin = g[s]
        if g[s] >= level and g[s - 1] < level:
            ok = True
            for q in range(s, min(s + n_settle, n)):
                if g[q] < level:
                    ok = False
                    break
            if ok:
                return s, gmin
    return -1, gmin


@numba.njit(cache=True, inline="always")
def _first_below(g, s_from, s_to, level):
    """First index s in [s_from, s_to] with g[s] < level (-1 if none)."""
    for s in range(s_from, s_to + 1):
        if g[s] < level:
            return s
    return -1


@numba.njit(cache=True, inline="always")
def _crossing_position(g, s, level, d_start, step):
    a = g[s - 1]
    b = g[s]
    f = (level - a) / (b - a) if b > a else 0.0
    return d_start + (s - 1 + f) * step


@numba.njit(cache=True, inline="always")
def _window_mean(g, d_start, step, lo, hi):
    acc = 0.0
    cnt = 0
    for s in range(g.shape[0]):
        d = d_start + s * step
        if d >= lo and d <= hi:
            acc += g[s]
            cnt += 1
    return acc / cnt if cnt > 0 else -np.inf


@numba.njit(cache=True, inline="always")
def _window_max(g, d_start, step, lo, hi):
    best = -np.inf
    for s in range(g.shape[0]):
        d = d_start + s * step
        if d >= lo and d <= hi and g[s] > best:
            best = g[s]
    return best


@numba.njit(cache=True, inline="always")
def _deficit_width(g, d_start, step, s_vis, d_vis, lucent_hu, bone_hu, sigma, window, min_deficit,
                   b_far):
    """Deficit mode (module docstring, step 3): the width whose blurred box has the profile's
    deficit below bone over [d_vis, d_end = d_vis + window + 2 sigma], against the ray's own
    bone level beyond the window, ``b_far`` (the median over ``(d_end, d_end + far_len]``,
    inf when empty), when that is lower (a dark streak or thinner bone lowers the whole ray,
    not just its start). Returns (width_mm, lucent_min_hu)."""
    n = g.shape[0]
    d_end = d_vis + window + 2.0 * sigma
    b_ray = bone_hu
    if b_far < b_ray:
        b_ray = b_far
    acc = 0.0
    gmin = g[s_vis]
    s = s_vis
    while s < n and d_start + s * step <= d_end + 1e-9:
        if g[s] < gmin:
            gmin = g[s]
        acc += (b_ray - g[s]) * step
        s += 1
    contrast = b_ray - lucent_hu
    target = acc / contrast if contrast > 0 else 0.0
    if target < min_deficit:
        return 0.0, gmin
    return invert_blurred_box_integral(target, sigma, d_vis, d_end, d_end), gmin


@numba.njit(cache=True, inline="always")
def _window_median(g, d_start, step, lo, hi):
    """Median of g over samples with lo < d <= hi (inf when there is none)."""
    cnt = 0
    for s in range(g.shape[0]):
        d = d_start + s * step
        if d > lo and d <= hi:
            cnt += 1
    if cnt == 0:
        return np.inf
    buf = np.empty(cnt, np.float64)
    k = 0
    for s in range(g.shape[0]):
        d = d_start + s * step
        if d > lo and d <= hi:
            buf[k] = g[s]
            k += 1
    return np.median(buf)


@numba.njit(cache=True)
def _analyse_ray(g, d_start, step, d_vis, lucent_hu, bone_hu, sigma, max_width,
                 window, settle, rim_from, rim_to, local_from, local_to, min_deficit, far_len,
                 low_margin, far_lucent):
    """Steps 1-3 of the module docstring on one profile.

    Returns (width_mm, status, lucent_min_hu, rim_excess_hu, edge_mm)."""
    n = g.shape[0]
    half = 0.5 * (lucent_hu + bone_hu)
    s_vis = int(math.ceil((d_vis - d_start) / step - 1e-9))
    if s_vis < 0:
        s_vis = 0
    if s_vis >= n - 1:
        return np.nan, 2, np.nan, np.nan, np.nan
    s_max = int(math.floor((max_width - d_start) / step + 1e-9))
    if s_max > n - 1:
        s_max = n - 1
    n_settle = max(int(round(settle / step)), 1)
    deficit = True
    width = 0.0
    edge = 0.0
    status = 0
    gmin = g[s_vis]
    # the median beyond the deficit window: step 2a's test and deficit mode's own bone level
    d_end = d_vis + window + 2.0 * sigma
    b_window = _window_median(g, d_start, step, d_end, d_end + far_len)
    # crossing mode when the profile is under the half-way level at d_vis, or when it is
    # still lucent beyond the deficit window (step 2a): the lucency is then entered where
    # the profile first falls under the half-way level
    s_in = -1
    if g[s_vis] < half:
        s_in = s_vis
    else:
        if b_window < lucent_hu + far_lucent * (bone_hu - lucent_hu):
            s_end = int(math.floor((d_end - d_start) / step + 1e-9))
            s_in = _first_below(g, s_vis, min(s_end, s_max), half)
    if s_in >= 0:
        # crossing mode: provisional edge at the half level against ordinary bone ...
        s0, gmin = _first_settled_crossing(g, s_in, s_max, half, n_settle)
        if s0 < 0:
            return np.nan, 2, gmin, np.nan, np.nan
        e0 = _crossing_position(g, s0, half, d_start, step)
        # ... then against what actually lies beyond it (a denser sclerotic rim)
        rim_read = False
        for _ in range(2):
            b_loc = _window_max(g, d_start, step, e0 + local_from, e0 + local_to)
            if b_loc <= bone_hu:
                break
            half1 = 0.5 * (lucent_hu + b_loc)
            s1, _ = _first_settled_crossing(g, s_in, s_max, half1, n_settle)
            if s1 < 0:
                break
            e0 = _crossing_position(g, s1, half1, d_start, step)
            rim_read = True
        # ... or against the ray's own, clearly lower, bone level beyond the blurred edge
        # (step 2b); no longer under its half-way level at d_vis: deficit mode
        lucent_here = True
        if not rim_read:
            b_far = _window_median(g, d_start, step, e0 + 2.0 * sigma, e0 + 2.0 * sigma + far_len)
            if b_far < bone_hu - low_margin and b_far > lucent_hu:
                half2 = 0.5 * (lucent_hu + b_far)
                lucent_here = False
                if g[s_in] < half2:
                    s2, gmin2 = _first_settled_crossing(g, s_in, s_max, half2, n_settle)
                    if s2 >= 0:
                        e0 = _crossing_position(g, s2, half2, d_start, step)
                        gmin = gmin2
                        lucent_here = True
        # an edge within ``window`` of d_vis may lie before it (the crossing is censored
        # at d_vis): read it through its deficit instead, like a thinner halo
        if rim_read or (lucent_here and e0 >= d_vis + window):
            edge = e0
            width = max(edge, 0.0)
            status = 1
            deficit = False
    if deficit:
        width, gmin = _deficit_width(g, d_start, step, s_vis, d_vis, lucent_hu, bone_hu, sigma,
                                     window, min_deficit, b_window)
        edge = width
        status = 1 if width > 0.0 else 0
    # rim excess just outside the edge
    m = _window_mean(g, d_start, step, edge + rim_from, edge + rim_to)
    rim = m - bone_hu if m > -np.inf else np.nan
    return width, status, gmin, rim, edge


@numba.njit(cache=True, parallel=True)
def halo_widths(g, d_start, step, d_vis, lucent_hu, bone_hu, sigma, max_width,
                window, settle, rim_from, rim_to, local_from, local_to, min_deficit, far_len,
                low_margin, far_lucent):
    """Per-ray halo widths from tail-corrected profiles (module docstring, steps 1-3).

    Parameters
    ----------
    g : (n_rays, n) float64, HU; profile at ``d = d_start + s * step`` mm from the true
        metal surface, the metal's own tail already subtracted.
    d_start, step : float, mm.
    d_vis : (n_rays,) float64, mm; first distance where the profile is readable.
    lucent_hu : float; the lucent level.
    bone_hu : (n_rays,) float64; the bone level each ray is compared against.
    sigma : (n_rays,) float64, mm; the blur of a lucent/bone edge along the ray.
    max_width : float, mm; a lucency not ended by then excludes the ray.
    window, settle, rim_from, rim_to : float, mm (module docstring).
    local_from, local_to : float, mm; window beyond a provisional edge whose maximum, when
        denser than ``bone_hu``, replaces it in the half-way level (module docstring).
    min_deficit : float, mm; deficits below this (noise) read as no halo.
    far_len : float, mm; deficit mode compares with the median of ``g`` over
        ``(d_vis + window, d_vis + window + far_len]`` when that is below ``bone_hu``.
    low_margin : float, HU; a ray's own level beyond its edge this far under ``bone_hu``
        replaces it in the half-way level (module docstring, step 2b).
    far_lucent : float, fraction of the lucent-to-bone step; a profile this close to
        ``lucent_hu`` beyond the deficit window is read in crossing mode (step 2a).

    Returns
    -------
    width_mm (NaN when excluded), status (0 none, 1 halo, 2 excluded), lucent_min_hu,
    rim_excess_hu, edge_mm : (n_rays,) arrays.
    """
    n = g.shape[0]
    width = np.empty(n, np.float64)
    status = np.empty(n, np.int64)
    gmin = np.empty(n, np.float64)
    rim = np.empty(n, np.float64)
    edge = np.empty(n, np.float64)
    for r in numba.prange(n):
        w, st, gm, rm, ed = _analyse_ray(g[r], d_start, step, d_vis[r], lucent_hu, bone_hu[r],
                                         sigma[r], max_width, window, settle, rim_from, rim_to,
                                         local_from, local_to, min_deficit, far_len, low_margin,
                                         far_lucent)
        width[r] = w
        status[r] = st
        gmin[r] = gm
        rim[r] = rm
        edge[r] = ed
    return width, status, gmin, rim, edge


@numba.njit(cache=True, parallel=True)
def fill_contradicted(g, d_start, step, fill_mm, d_vis, sigma, window, lucent_hu, bone_hu,
                      margin_mm, rim_hu):
    """Per ray, whether its own profile refutes a halo ``fill_mm`` wide that it was given
    from its neighbours: the lucency it holds in its deficit window ``[d_vis, d_end = d_vis +
    window + 2 sigma]`` (the positive part of ``bone_hu - g``, in mm of the lucent-to-bone
    step) falls short of what that halo, blurred by ``sigma``, would put there
    (:func:`blurred_box_integral`) by more than ``margin_mm``.

    Why: a ray along the slice axis of a thick-slice scan cannot read a loosening-size halo
    from its own profile and takes its neighbours' width around the circumference; beyond
    ``d_vis`` its profile still shows whether a halo of that width reaches it. Only the
    positive part of the deficit counts, so a denser speck (a trabecula, a bright streak)
    does not cancel a lucency elsewhere in the window. Rays with ``fill_mm`` NaN or not
    above zero are never contradicted, nor a ray whose profile rises above ``rim_hu`` in
    the window: a sclerotic rim's blur fills the lucency's deficit there (two 3 mm double
    halos on 0.75 of the circumference lost their fill and read 1.5 mm for 2.25).

    Parameters
    ----------
    g : (n_rays, n_steps) float64
        Tail-corrected profiles, ``d = d_start + s * step`` mm from the true metal surface.
    fill_mm, d_vis, sigma : (n_rays,) float64
        The width given to each ray, its readable distance and its edge blur (mm).
    window, margin_mm : float
        Deficit window beyond ``d_vis`` (mm, as in :func:`halo_widths`) and the shortfall
        (mm-equivalent) that refutes the fill.
    rim_hu : float
        A level above bone that marks a sclerotic rim (``inf``: never).

    Returns
    -------
    (n_rays,) bool
    """
    n_rays, n = g.shape
    out = np.zeros(n_rays, np.bool_)
    contrast = bone_hu - lucent_hu
    if contrast <= 0.0:
        return out
    for r in numba.prange(n_rays):
        f = fill_mm[r]
        if not (f > 0.0):
            continue
        d_end = d_vis[r] + window + 2.0 * sigma[r]
        s = int(math.ceil((d_vis[r] - d_start) / step - 1e-9))
        s = min(max(s, 0), n - 1)
        acc = 0.0
        rim = False
        while s < n and d_start + s * step <= d_end + 1e-9:
            if g[r, s] > rim_hu:
                rim = True
            elif g[r, s] < bone_hu:
                acc += (bone_hu - g[r, s]) * step
            s += 1
        expected = blurred_box_integral(f, sigma[r], d_vis[r], d_end)
        out[r] = (not rim) and expected - acc / contrast > margin_mm
    return out


# ----------------------------------------------------------------------------- reference
def blurred_box_integral_reference(w, sigma, a, b):
    """Same definition as :func:`blurred_box_integral` by numerical quadrature (SciPy)."""
    from scipy import integrate

    if w <= 0:
        return 0.0
    if sigma <= 1e-6:
        return max(min(b, w) - max(a, 0.0), 0.0)
    f = lambda d: special.ndtr((w - d) / sigma) - special.ndtr(-d / sigma)  # noqa: E731
    return integrate.quad(f, a, b, limit=200)[0]


def fill_contradicted_reference(g, d_start, step, fill_mm, d_vis, sigma, window, lucent_hu,
                                bone_hu, margin_mm, rim_hu):
    """Same definition as :func:`fill_contradicted`, vectorised NumPy with the blurred box
    integrated by quadrature (:func:`blurred_box_integral_reference`)."""
    g = np.asarray(g, float)
    n_rays, n = g.shape
    contrast = bone_hu - lucent_hu
    out = np.zeros(n_rays, bool)
    if contrast <= 0:
        return out
    d = d_start + step * np.arange(n)
    d_end = np.asarray(d_vis, float) + window + 2.0 * np.asarray(sigma, float)
    s_vis = np.clip(np.ceil((np.asarray(d_vis, float) - d_start) / step - 1e-9).astype(int), 0, n - 1)
    in_win = (np.arange(n)[None, :] >= s_vis[:, None]) & (d[None, :] <= d_end[:, None] + 1e-9)
    held = np.where(in_win, np.maximum(bone_hu - g, 0.0), 0.0).sum(axis=1) * step / contrast
    rim = (in_win & (g > rim_hu)).any(axis=1)
    for r in np.flatnonzero((np.asarray(fill_mm, float) > 0) & ~rim):
        expected = blurred_box_integral_reference(float(fill_mm[r]), float(sigma[r]),
                                                  float(d_vis[r]), float(d_end[r]))
        out[r] = expected - held[r] > margin_mm
    return out


def _first_crossing_vec(g, sv, s_max, level, n_settle):
    """Vectorised :func:`_first_settled_crossing` with a per-ray ``level``."""
    n_rays, n = g.shape
    idx = np.arange(n)
    below = g < level[:, None]
    up = np.zeros_like(below)
    up[:, 1:] = ~below[:, 1:] & below[:, :-1]
    cs = np.concatenate([np.zeros((n_rays, 1), int), np.cumsum(below, axis=1)], axis=1)
    hi_idx = np.minimum(idx + n_settle, n)
    settled = (cs[:, hi_idx] - cs[:, idx]) == 0
    cand = up & settled & (idx[None, :] > sv[:, None]) & (idx[None, :] <= s_max)
    has = cand.any(axis=1)
    s_up = np.argmax(cand, axis=1)
    stop = np.where(has, s_up, s_max)
    in_range = (idx[None, :] >= sv[:, None]) & (idx[None, :] <= stop[:, None])
    gmin = np.where(in_range, g, np.inf).min(axis=1)
    return has, s_up, gmin


def _first_below_vec(g, s_from, s_to, level):
    """Vectorised :func:`_first_below` (per-ray bounds and level)."""
    idx = np.arange(g.shape[1])
    cand = (g < np.asarray(level)[:, None]) & (idx[None, :] >= s_from[:, None]) & (idx[None, :] <= s_to[:, None])
    return np.where(cand.any(axis=1), np.argmax(cand, axis=1), -1)


def _crossing_vec(g, s_up, level, d_start, step):
    rows = np.arange(g.shape[0])
    a = g[rows, np.maximum(s_up - 1, 0)]
    b = g[rows, s_up]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(b > a, (level - a) / (b - a), 0.0)
    return d_start + (s_up - 1 + f) * step


def _window_mean_vec(g, d, lo, hi):
    win = (d[None, :] >= lo[:, None]) & (d[None, :] <= hi[:, None])
    cnt = win.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(win, g, 0.0).sum(axis=1) / np.maximum(cnt, 1), -np.inf)


def _window_max_vec(g, d, lo, hi):
    win = (d[None, :] >= lo[:, None]) & (d[None, :] <= hi[:, None])
    return np.where(win, g, -np.inf).max(axis=1)


def halo_widths_reference(g, d_start, step, d_vis, lucent_hu, bone_hu, sigma, max_width,
                          window, settle, rim_from, rim_to, local_from, local_to, min_deficit, far_len,
                          low_margin, far_lucent):
    """Same definition as :func:`halo_widths`, vectorised NumPy/SciPy (``brentq`` for the
    deficit inversion)."""
    from scipy import optimize

    g = np.asarray(g, np.float64)
    n_rays, n = g.shape
    d = d_start + step * np.arange(n)
    idx = np.arange(n)
    d_vis = np.asarray(d_vis, float)
    bone = np.asarray(bone_hu, float)
    sigma = np.asarray(sigma, float)
    half = 0.5 * (lucent_hu + bone)
    s_vis = np.maximum(np.ceil((d_vis - d_start) / step - 1e-9).astype(int), 0)
    s_max = min(int(np.floor((max_width - d_start) / step + 1e-9)), n - 1)
    n_settle = max(int(round(settle / step)), 1)
    width = np.full(n_rays, np.nan)
    status = np.full(n_rays, 2, np.int64)
    gmin = np.full(n_rays, np.nan)
    edge = np.full(n_rays, np.nan)
    valid = s_vis < n - 1
    sv = np.minimum(s_vis, n - 1)
    g_vis = g[np.arange(n_rays), sv]
    d_end = d_vis + window + 2.0 * sigma
    far = (d[None, :] > d_end[:, None]) & (d[None, :] <= d_end[:, None] + far_len)
    b_far = np.array([np.median(g[r, far[r]]) if far[r].any() else np.inf for r in range(n_rays)])
    s_in = np.where(g_vis < half, sv,
                    np.where(b_far < lucent_hu + far_lucent * (bone - lucent_hu), _first_below_vec(
                        g, sv, np.minimum(np.floor((d_end - d_start) / step + 1e-9).astype(int), s_max),
                        half), -1))
    crossing = valid & (s_in >= 0)
    deficit = valid & ~crossing
    s_in = np.where(s_in >= 0, s_in, sv)

    # crossing mode
    has, s_up, gmin_c = _first_crossing_vec(g, s_in, s_max, half, n_settle)
    e_cross = _crossing_vec(g, s_up, half, d_start, step)
    active = np.ones(n_rays, bool)
    rim_read = np.zeros(n_rays, bool)
    for _ in range(2):
        b_loc = _window_max_vec(g, d, e_cross + local_from, e_cross + local_to)
        active &= b_loc > bone
        half1 = np.where(active, 0.5 * (lucent_hu + b_loc), half)
        has1, s_up1, _ = _first_crossing_vec(g, s_in, s_max, half1, n_settle)
        active &= has1
        e1 = _crossing_vec(g, s_up1, half1, d_start, step)
        e_cross = np.where(active, e1, e_cross)
        rim_read |= active
    # ... or against the ray's own, clearly lower, bone level beyond the blurred edge
    lo_f = e_cross + 2.0 * sigma
    far_c = (d[None, :] > lo_f[:, None]) & (d[None, :] <= lo_f[:, None] + far_len)
    b_far_c = np.array([np.median(g[r, far_c[r]]) if far_c[r].any() else np.inf
                        for r in range(n_rays)])
    low = crossing & has & ~rim_read & (b_far_c < bone - low_margin) & (b_far_c > lucent_hu)
    half2 = np.where(low, 0.5 * (lucent_hu + b_far_c), half)
    has2, s_up2, gmin2 = _first_crossing_vec(g, s_in, s_max, half2, n_settle)
    low_ok = low & (g[np.arange(n_rays), s_in] < half2) & has2
    e_cross = np.where(low_ok, _crossing_vec(g, s_up2, half2, d_start, step), e_cross)
    gmin_c = np.where(low_ok, gmin2, gmin_c)
    lucent_here = ~low | low_ok
    ok_c = crossing & has & (rim_read | (lucent_here & (e_cross >= d_vis + window)))
    width[ok_c] = np.maximum(e_cross[ok_c], 0.0)
    edge[ok_c] = e_cross[ok_c]
    status[ok_c] = 1
    gmin[crossing] = gmin_c[crossing]
    # an edge within ``window`` of d_vis may lie before it: read through the deficit
    deficit = deficit | (crossing & has & ~ok_c)

    # deficit mode
    b_ray = np.minimum(bone, b_far)
    in_win = (idx[None, :] >= sv[:, None]) & (d[None, :] <= d_end[:, None] + 1e-9)
    acc = np.where(in_win, b_ray[:, None] - g, 0.0).sum(axis=1) * step
    gmin_def = np.where(in_win, g, np.inf).min(axis=1)
    contrast = b_ray - lucent_hu
    with np.errstate(divide="ignore", invalid="ignore"):
        target = np.where(contrast > 0, acc / contrast, 0.0)
    for r in np.flatnonzero(deficit):
        lo_r, hi_r = d_vis[r], d_end[r]
        fbox = lambda w: blurred_box_integral_reference(w, sigma[r], lo_r, hi_r) - target[r]  # noqa: E731
        if target[r] < min_deficit or target[r] <= 0:
            w = 0.0
        elif fbox(hi_r) <= 0:
            w = hi_r
        else:
            w = optimize.brentq(fbox, 0.0, hi_r, xtol=1e-7)
        width[r] = w
        edge[r] = w
        status[r] = 1 if w > 0 else 0
        gmin[r] = gmin_def[r]

    # rim excess
    m = _window_mean_vec(g, d, np.where(np.isfinite(edge), edge + rim_from, np.inf),
                         np.where(np.isfinite(edge), edge + rim_to, -np.inf))
    rim = np.where(np.isfinite(edge) & (m > -np.inf), m - bone, np.nan)
    return width, status, gmin, rim, edge


# --------------------------------------------------------------- fused per-screw hot path
@numba.njit(cache=True, parallel=True)
def halo_screw(hu, origins_kji, directions_kji, n_stations, n_azimuths, d_start, step, n_steps,
               radius_mm, tail_hu, d_vis, sigma, lucent_hu, bone_hu, smooth_stations, max_width,
               window, settle, rim_from, rim_to, local_from, local_to, min_deficit, far_len,
               beyond_from, beyond_to, low_margin, far_lucent):
    """One screw's halo in one pass: sampling, tail removal, smoothing along the shaft and
    the per-ray analysis of :func:`halo_widths`, in parallel over azimuths.

    Rays are station-major (``r = s * n_azimuths + a``), ``origin + (radius_mm + d) * dir``
    with ``d = d_start + k * step``. Per azimuth ``a``: ``tail_hu[a]`` (n_steps,) is
    subtracted from every station's profile, the result is averaged over
    ``smooth_stations`` neighbouring stations (odd; ends repeat, as
    ``scipy.ndimage.uniform_filter1d(mode="nearest")``), and each station's ray is read
    with ``d_vis[a]``, ``sigma[a]`` as in :func:`halo_widths`.

    Returns width_mm, status, lucent_min_hu, rim_excess_hu, edge_mm (as
    :func:`halo_widths`), plus ``g_vis_hu`` (the smoothed profile at ``d_vis``) and
    ``beyond_hu`` (its mean over ``[edge + beyond_from, edge + beyond_to]`` minus
    ``bone_hu``), all (n_rays,).
    """
    S = n_stations
    A = n_azimuths
    n = S * A
    width = np.empty(n, np.float64)
    status = np.empty(n, np.int64)
    gmin = np.empty(n, np.float64)
    rim = np.empty(n, np.float64)
    edge = np.empty(n, np.float64)
    g_vis = np.empty(n, np.float64)
    beyond = np.empty(n, np.float64)
    half_w = smooth_stations // 2
    for a in numba.prange(A):
        prof = np.empty((S, n_steps), np.float64)
        for s in range(S):
            r = s * A + a
            for k in range(n_steps):
                t = radius_mm + d_start + k * step
                prof[s, k] = trilinear(hu,
                                       origins_kji[r, 0] + t * directions_kji[r, 0],
                                       origins_kji[r, 1] + t * directions_kji[r, 1],
                                       origins_kji[r, 2] + t * directions_kji[r, 2]) - tail_hu[a, k]
        g = np.empty(n_steps, np.float64)
        s_vis = int(math.ceil((d_vis[a] - d_start) / step - 1e-9))
        s_vis = min(max(s_vis, 0), n_steps - 1)
        for s in range(S):
            for k in range(n_steps):
                acc = 0.0
                for q in range(s - half_w, s + half_w + 1):
                    qq = min(max(q, 0), S - 1)
                    acc += prof[qq, k]
                g[k] = acc / (2 * half_w + 1)
            r = s * A + a
            w, st, gm, rm, ed = _analyse_ray(g, d_start, step, d_vis[a], lucent_hu, bone_hu,
                                             sigma[a], max_width, window, settle, rim_from, rim_to,
                                             local_from, local_to, min_deficit, far_len,
                                             low_margin, far_lucent)
            width[r] = w
            status[r] = st
            gmin[r] = gm
            rim[r] = rm
            edge[r] = ed
            g_vis[r] = g[s_vis]
            if np.isfinite(ed):
                m = _window_mean(g, d_start, step, ed + beyond_from, ed + beyond_to)
                beyond[r] = m - bone_hu if m > -np.inf else np.nan
            else:
                beyond[r] = np.nan
    return width, status, gmin, rim, edge, g_vis, beyond


def halo_screw_reference(hu, origins_kji, directions_kji, n_stations, n_azimuths, d_start, step,
                         n_steps, radius_mm, tail_hu, d_vis, sigma, lucent_hu, bone_hu,
                         smooth_stations, max_width, window, settle, rim_from, rim_to, local_from,
                         local_to, min_deficit, far_len, beyond_from, beyond_to, low_margin,
                         far_lucent):
    """Same definition as :func:`halo_screw`: ``map_coordinates`` profiles,
    ``uniform_filter1d`` along the stations, :func:`halo_widths_reference` per ray."""
    from scipy import ndimage

    from kernels.sampling import sample_rays_reference

    S, A = n_stations, n_azimuths
    prof = sample_rays_reference(hu, origins_kji, directions_kji, radius_mm + d_start, step, n_steps)
    prof = prof.reshape(S, A, n_steps) - np.asarray(tail_hu)[None, :, :]
    size = 2 * (smooth_stations // 2) + 1
    g = ndimage.uniform_filter1d(prof, size, axis=0, mode="nearest").reshape(S * A, n_steps)
    dv = np.tile(np.asarray(d_vis, float), S)
    sg = np.tile(np.asarray(sigma, float), S)
    out = halo_widths_reference(g, d_start, step, dv, lucent_hu, np.full(S * A, bone_hu), sg,
                                max_width, window, settle, rim_from, rim_to, local_from, local_to,
                                min_deficit, far_len, low_margin, far_lucent)
    d = d_start + step * np.arange(n_steps)
    s_vis = np.clip(np.ceil((dv - d_start) / step - 1e-9).astype(int), 0, n_steps - 1)
    g_vis = g[np.arange(S * A), s_vis]
    edge = out[4]
    fin = np.isfinite(edge)
    m = _window_mean_vec(g, d, np.where(fin, edge + beyond_from, np.inf),
                         np.where(fin, edge + beyond_to, -np.inf))
    beyond = np.where(fin & (m > -np.inf), m - bone_hu, np.nan)
    return (*out, g_vis, beyond)
