"""Each numba kernel agrees with its NumPy/SciPy reference (same definition) to float
tolerance, on random arrays and on phantom-like synthetic profiles whose answer is known
analytically."""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np
import pytest
from scipy import ndimage, special

from kernels.bridging import bridged_columns, bridged_columns_reference
from kernels.sampling import (
    sample_points,
    sample_points_reference,
    sample_rays,
    sample_rays_reference,
)
from kernels.subsidence import rising_edges, rising_edges_reference

RNG = np.random.default_rng(12345)


def _random_volume(shape=(9, 11, 13)):
    return RNG.normal(100.0, 400.0, size=shape).astype(np.float32)


def test_trilinear_sampling_matches_map_coordinates_inside_and_outside():
    hu = _random_volume()
    lo = np.array([-2.0, -2.0, -2.0])
    hi = np.array(hu.shape) + 1.0
    pts = lo + RNG.random((500, 3)) * (hi - lo)
    pts[:5] = [[0, 0, 0], [8, 10, 12], [8, 0, 12], [4.5, 5.5, 6.5], [8.0, 10.0, 0.0]]
    np.testing.assert_allclose(sample_points(hu, pts), sample_points_reference(hu, pts),
                               rtol=0, atol=1e-6)


def test_trilinear_sampling_is_exact_on_a_linear_field():
    k, j, i = np.meshgrid(np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    hu = (3.0 * k - 2.0 * j + 0.5 * i + 7.0).astype(np.float32)
    pts = RNG.random((200, 3)) * [5, 6, 7]
    expect = 3.0 * pts[:, 0] - 2.0 * pts[:, 1] + 0.5 * pts[:, 2] + 7.0
    np.testing.assert_allclose(sample_points(hu, pts), expect, atol=1e-4)


def test_ray_sampling_matches_reference():
    hu = _random_volume()
    o = RNG.random((40, 3)) * [8, 10, 12]
    d = RNG.normal(size=(40, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    got = sample_rays(hu, o, d * 0.7, -1.0, 0.1, 60)
    ref = sample_rays_reference(hu, o, d * 0.7, -1.0, 0.1, 60)
    assert got.shape == (40, 60)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def _blurred_slab_volume(surface_k, sigma_vox, low=40.0, high=1200.0, shape=(40, 8, 8)):
    """Dark below ``surface_k`` (continuous k index), bright above, blurred along k."""
    k = np.arange(shape[0], dtype=np.float64)
    prof = low + (high - low) * 0.5 * (1 + special.erf((k - surface_k) / (np.sqrt(2) * sigma_vox)))
    return np.broadcast_to(prof[:, None, None], shape).astype(np.float32).copy()


@pytest.mark.parametrize("surface_k", [17.0, 17.3, 17.75, 20.2])
def test_rising_edge_finds_a_blurred_step_sub_voxel(surface_k):
    hu = _blurred_slab_volume(surface_k, sigma_vox=0.8)
    o = np.array([[5.0, 3.3, 4.1], [6.0, 2.0, 5.0]])
    d = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # 1 voxel per unit of s
    edge, low, peak = rising_edges(hu, o, d, 0.0, 0.1, 300, 5, 600.0, 40, 0.5)
    np.testing.assert_allclose(edge, surface_k - o[:, 0], atol=0.05)
    assert np.all(low < 60) and np.all(peak > 1150)


def test_rising_edge_kernel_matches_reference_on_random_and_noisy_inputs():
    hu = _blurred_slab_volume(18.4, 1.0) + RNG.normal(0, 60, size=(40, 8, 8)).astype(np.float32)
    hu2 = _random_volume((20, 20, 20))
    for vol, detect in ((hu, 600.0), (hu2, 500.0)):
        n = 300
        o = RNG.random((n, 3)) * (np.array(vol.shape) - 1) * [0.3, 1, 1]
        d = RNG.normal(size=(n, 3)) * [1, 0.2, 0.2]
        d[:, 0] = np.abs(d[:, 0]) + 0.5
        args = (vol, o, d, 0.0, 0.13, 120, 4, detect, 25, 0.5)
        got = rising_edges(*args)
        ref = rising_edges_reference(*args)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-6, equal_nan=True)
        assert np.isfinite(got[0]).sum() > n // 4


def test_rising_edge_is_nan_when_nothing_bright_is_reached():
    hu = np.full((10, 10, 10), 50.0, np.float32)
    edge, low, peak = rising_edges(hu, np.array([[1.0, 5, 5]]), np.array([[1.0, 0, 0]]),
                                   0.0, 0.1, 50, 3, 300.0, 10, 0.5)
    assert np.isnan(edge[0]) and np.isnan(peak[0]) and low[0] == pytest.approx(50.0)


def test_bridging_columns_match_reference_and_detect_gaps():
    nk = 30
    hu = np.full((nk, 16, 16), 400.0, np.float32)
    hu[12:15, :, 8:] = 30.0  # a disc gap over half the columns
    hu += RNG.normal(0, 30, size=hu.shape).astype(np.float32)
    jj, ii = np.meshgrid(np.arange(1, 15), np.arange(1, 15), indexing="ij")
    starts = np.stack([np.full(jj.size, 5.0), jj.ravel() + 0.2, ii.ravel() + 0.3], axis=1)
    ends = starts.copy()
    ends[:, 0] = 24.0
    args = (hu, starts, ends, 60, 3, 150.0)
    b, m = bridged_columns(*args)
    br, mr = bridged_columns_reference(*args)
    np.testing.assert_array_equal(b, br)
    np.testing.assert_allclose(m, mr, atol=1e-6)
    bridged_expected = starts[:, 2] < 7.0  # columns clear of the gap (and of its blur)
    gap = starts[:, 2] > 8.0
    assert b[bridged_expected].all() and not b[gap].any()


def test_bridging_kernel_matches_reference_on_random_volume():
    hu = _random_volume((15, 15, 15)) + 200
    s = RNG.random((200, 3)) * 14
    e = RNG.random((200, 3)) * 14
    for smooth in (1, 3, 5):
        b, m = bridged_columns(hu, s, e, 25, smooth, 0.0)
        br, mr = bridged_columns_reference(hu, s, e, 25, smooth, 0.0)
        np.testing.assert_allclose(m, mr, atol=1e-6)
        np.testing.assert_array_equal(b, br)
