"""The disc search's own 1-D peak finding (pipeline.anatomy: local maxima, prominences,
widths) gives exactly what scipy.signal gives, on the kinds of profile it reads: smooth,
noisy, with flat tops and ties, with and without a window. (It replaced scipy.signal to
spare the analysis that package's import; the definitions must not move.)"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import find_peaks, peak_prominences, peak_widths

from pipeline.anatomy import find_prominent_peaks, local_maxima_1d, peak_prominences_1d, peak_widths_1d


def _signals():
    rng = np.random.default_rng(20261122)
    out = []
    for n in (0, 1, 2, 3, 5, 40, 257):
        out.append(rng.normal(size=n))
    # integer-valued: many ties and flat tops, including at the ends
    for _ in range(12):
        out.append(rng.integers(0, 4, size=int(rng.integers(3, 120))).astype(float))
    out.append(np.array([0.0, 2, 2, 2, 1, 3, 3, 0, 5, 5]))  # plateaus, one running to the end
    # column-profile-like: smooth periodic dips and bumps with noise, float32 as the profile is
    z = np.arange(300.0)
    for s in range(6):
        prof = (200 * np.cos(2 * np.pi * z / (30 + 3 * s)) + 20 * rng.normal(size=z.size)).astype(np.float32)
        out.append(prof)
        out.append(-prof)
    out.append(np.clip(np.sin(z / 9.0), -0.2, 0.7))  # clipped tops: long plateaus
    return out


@pytest.mark.parametrize("wlen", [None, 2, 3, 11, 21.0, 31, 10.5])
def test_prominent_peaks_and_prominences_equal_scipy_find_peaks(wlen):
    for x in _signals():
        for prominence in (0.0, 0.3, 1.0, 50.0):
            want, props = find_peaks(x, prominence=prominence, wlen=wlen)
            got, prom = find_prominent_peaks(x, prominence, wlen)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(prom, props["prominences"])  # bit-identical


def test_local_maxima_equal_scipy_find_peaks_without_conditions():
    for x in _signals():
        np.testing.assert_array_equal(local_maxima_1d(x), find_peaks(x)[0])


@pytest.mark.parametrize("wlen", [None, 5, 31])
def test_prominence_bases_equal_scipy_peak_prominences(wlen):
    for x in _signals():
        peaks = find_peaks(x)[0]
        for got, want in zip(peak_prominences_1d(x, peaks, wlen), peak_prominences(x, peaks, wlen=wlen)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rel_height", [0.5, 1.0, 0.25])
@pytest.mark.parametrize("wlen", [None, 31])
def test_peak_widths_equal_scipy_peak_widths(rel_height, wlen):
    for x in _signals():
        peaks = find_peaks(x)[0]
        got = peak_widths_1d(x, peaks, rel_height=rel_height, wlen=wlen)
        want = peak_widths(x, peaks, rel_height=rel_height, wlen=wlen)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_a_window_of_one_sample_or_less_is_refused_like_scipy():
    x = np.array([0.0, 1.0, 0.0])
    for wlen in (1, 0.5):
        with pytest.raises(ValueError):
            find_prominent_peaks(x, 0.1, wlen)
        with pytest.raises(ValueError):
            find_peaks(x, prominence=0.1, wlen=wlen)
