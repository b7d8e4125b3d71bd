"""Trilinear sampling of a CT volume along rays, in array (k, j, i) index coordinates.

Every measurement in fusionct reads the volume sub-voxel along straight rays (halo rays
perpendicular to a screw, endplate normals, bridging columns). This module holds the one
interpolation rule they all share, so a kernel and its reference read the same numbers:

* trilinear interpolation of ``hu[k, j, i]`` at continuous ``(k, j, i)``;
* coordinates outside the array are clamped to its edge (``scipy.ndimage``'s
  ``mode="nearest"``), so a ray leaving the volume repeats the border value instead of
  failing; callers that care flag such rays themselves.

Rays are ``point(s) = origin + s * direction`` with ``s`` in the caller's unit (the
pipeline passes directions as (k, j, i) voxels per mm so ``s`` is in mm whatever the
voxel spacing).
"""
from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage


@numba.njit(cache=True, inline="always")
def trilinear(hu, k, j, i):
    """Trilinear value of ``hu`` at continuous (k, j, i), clamped to the array (HU)."""
    nk, nj, ni = hu.shape
    if k < 0.0:
        k = 0.0
    elif k > nk - 1:
        k = nk - 1.0
    if j < 0.0:
        j = 0.0
    elif j > nj - 1:
        j = nj - 1.0
    if i < 0.0:
        i = 0.0
    elif i > ni - 1:
        i = ni - 1.0
    k0 = int(k)
    j0 = int(j)
    i0 = int(i)
    if k0 > nk - 2:
        k0 = max(nk - 2, 0)
    if j0 > nj - 2:
        j0 = max(nj - 2, 0)
    if i0 > ni - 2:
        i0 = max(ni - 2, 0)
    k1 = min(k0 + 1, nk - 1)
    j1 = min(j0 + 1, nj - 1)
    i1 = min(i0 + 1, ni - 1)
    fk = k - k0
    fj = j - j0
    fi = i - i0
    c00 = hu[k0, j0, i0] * (1.0 - fi) + hu[k0, j0, i1] * fi
    c01 = hu[k0, j1, i0] * (1.0 - fi) + hu[k0, j1, i1] * fi
    c10 = hu[k1, j0, i0] * (1.0 - fi) + hu[k1, j0, i1] * fi
    c11 = hu[k1, j1, i0] * (1.0 - fi) + hu[k1, j1, i1] * fi
    c0 = c00 * (1.0 - fj) + c01 * fj
    c1 = c10 * (1.0 - fj) + c11 * fj
    return c0 * (1.0 - fk) + c1 * fk


@numba.njit(cache=True, parallel=True)
def sample_points(hu, points_kji):
    """Trilinear values at ``points_kji`` (n, 3) continuous (k, j, i); returns (n,) float64 HU."""
    n = points_kji.shape[0]
    out = np.empty(n, np.float64)
    for p in numba.prange(n):
        out[p] = trilinear(hu, points_kji[p, 0], points_kji[p, 1], points_kji[p, 2])
    return out


def sample_points_reference(hu, points_kji):
    """Same definition as :func:`sample_points` with ``scipy.ndimage.map_coordinates``."""
    pts = np.asarray(points_kji, np.float64)
    return ndimage.map_coordinates(
        np.asarray(hu, np.float64), pts.T, order=1, mode="nearest"
    ).astype(np.float64)


@numba.njit(cache=True, parallel=True)
def sample_rays(hu, origins_kji, directions_kji, s_start, s_step, n_steps):
    """Trilinear profiles along rays.

    ``out[r, s] = hu(origins_kji[r] + (s_start + s * s_step) * directions_kji[r])`` for
    ``s = 0 .. n_steps-1``; the unit of ``s_start``/``s_step`` is whatever unit the
    directions are expressed per (mm in the pipeline). Returns (n_rays, n_steps) float64 HU.
    """
    n = origins_kji.shape[0]
    out = np.empty((n, n_steps), np.float64)
    for r in numba.prange(n):
        for s in range(n_steps):
            t = s_start + s * s_step
            out[r, s] = trilinear(
                hu,
                origins_kji[r, 0] + t * directions_kji[r, 0],
                origins_kji[r, 1] + t * directions_kji[r, 1],
                origins_kji[r, 2] + t * directions_kji[r, 2],
            )
    return out


def ray_points(origins_kji, directions_kji, s_start, s_step, n_steps):
    """The sample positions of :func:`sample_rays`: (n_rays, n_steps, 3) continuous (k, j, i)."""
    t = s_start + s_step * np.arange(n_steps, dtype=np.float64)
    o = np.asarray(origins_kji, np.float64)[:, None, :]
    d = np.asarray(directions_kji, np.float64)[:, None, :]
    return o + t[None, :, None] * d


def sample_rays_reference(hu, origins_kji, directions_kji, s_start, s_step, n_steps):
    """Same definition as :func:`sample_rays` with ``scipy.ndimage.map_coordinates(order=1)``."""
    pts = ray_points(origins_kji, directions_kji, s_start, s_step, n_steps)
    vals = sample_points_reference(hu, pts.reshape(-1, 3))
    return vals.reshape(pts.shape[:2])
