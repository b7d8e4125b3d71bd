"""The column search's volume-wide passes, now cut into slabs run on two threads, give the
values of one pass: gaussian_filter_slabs equals scipy.ndimage.gaussian_filter exactly, and
block_mean is the same whatever the thread count and equals the blocks' mean."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.anatomy import block_mean, gaussian_filter_slabs, resample_to_lps_grid
from pipeline.volume import Volume


@pytest.mark.parametrize("shape,sigma", [((40, 33, 29), (1.0, 0.7, 0.0)), ((17, 64, 48), (0.9, 0.93, 0.93)),
                                         ((7,), (2.0,)), ((9, 11), (0.0, 0.0)), ((9, 11), (1.5, 0.5))])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gaussian_in_slabs_equals_scipy_gaussian_filter(shape, sigma, threads):
    a = (np.random.default_rng(7).normal(size=shape) * 300).astype(np.float32)
    want = ndimage.gaussian_filter(a, sigma, mode="nearest")
    got = gaussian_filter_slabs(a, sigma, mode="nearest", threads=threads)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,spacing", [((37, 45, 51), (0.35, 0.35, 0.6)), ((20, 30, 31), (0.8, 0.8, 1.5)),
                                           ((101, 64, 64), (0.5, 0.5, 0.5))])
def test_block_mean_same_on_any_thread_count_and_is_the_blocks_mean(shape, spacing):
    hu = (np.random.default_rng(11).normal(size=shape) * 300 + 100).astype(np.float32)
    vol = Volume(hu, [1.0, -2.0, 3.0], spacing, np.eye(3))
    one, two = block_mean(vol, 1.0, threads=1), block_mean(vol, 1.0, threads=2)
    np.testing.assert_array_equal(one.hu, two.hu)
    fi, fj, fk = (int(x) for x in np.maximum(np.floor(1.0 / np.asarray(spacing) + 1e-6), 1))
    mk, mj, mi = shape[0] // fk, shape[1] // fj, shape[2] // fi
    want = hu[:mk * fk, :mj * fj, :mi * fi].astype(np.float64).reshape(mk, fk, mj, fj, mi, fi).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(one.hu, want, rtol=0, atol=1e-3)
    np.testing.assert_allclose(one.spacing_mm, np.asarray(spacing) * [fi, fj, fk])


def test_resampled_grid_same_with_one_or_two_threads(monkeypatch):
    import pipeline.anatomy as anatomy

    hu = (np.random.default_rng(5).normal(size=(60, 70, 80)) * 200).astype(np.float32)
    vol = Volume(hu, [0.0, 0.0, 0.0], (0.5, 0.5, 0.6), np.eye(3))
    two, o2 = resample_to_lps_grid(vol)
    monkeypatch.setattr(anatomy, "GRID_THREADS", 1)
    monkeypatch.setattr(anatomy.block_mean, "__defaults__", (1,))
    monkeypatch.setattr(anatomy.gaussian_filter_slabs, "__defaults__", ("nearest", 1))
    one, o1 = resample_to_lps_grid(vol)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(o1, o2)


def test_large_point_sets_sampled_in_halves_read_the_same_values(monkeypatch):
    import pipeline.anatomy as anatomy
    from pipeline.anatomy import sample_lps

    hu = (np.random.default_rng(9).normal(size=(40, 50, 60)) * 500).astype(np.float32)
    vol = Volume(hu, [-10.0, 5.0, 2.0], (0.7, 0.7, 1.2), np.eye(3))
    pts = np.random.default_rng(10).uniform([-15, 0, -5], [40, 45, 55], size=(2, 70_000, 3))  # some outside
    monkeypatch.setattr(anatomy, "SPLIT_SAMPLES", 1000)
    split = sample_lps(vol, pts)
    monkeypatch.setattr(anatomy, "GRID_THREADS", 1)
    whole = sample_lps(vol, pts)
    assert split.shape == (2, 70_000) and split.dtype == whole.dtype == np.float32
    np.testing.assert_array_equal(split, whole)
    assert (whole == -1000.0).any()  # points outside read cval
