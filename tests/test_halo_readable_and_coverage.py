"""The readable distance's lower bound (one edge blur of the direction class) and the
along-shaft coverage decision (pipeline.measure).

Ground truth: the phantom's (sample_data.phantom) for the study test; the along-shaft
window tests build width maps whose true coverage is known by construction.
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import numpy as np  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.measure import HALO_COVERAGE_STATIONS, _along_shaft_width, measure_study  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy  # noqa: E402


def test_thin_whole_halo_not_called_loose_when_the_slice_axis_class_agrees_with_itself():
    # 0.8x0.8x1.5 mm, 40 HU, seed 6: the slice-axis direction class (sigma 0.9 mm) came out
    # readable at 0.3 mm; its rays read 1.2-1.4 mm around the 0.5 mm whole halo of L5-left
    # (coverage 0.55, called loose) and around the halo-free L5-right (coverage 0.36)
    spec = PhantomSpec(seed=6, spacing_mm=(0.8, 0.8, 1.5), noise_hu=40.0, streaks=True, blooming=True)
    vol, truth = make_phantom(spec)
    screws, _, _, _ = measure_study(vol, truth_anatomy(truth), Config())
    got = {s.id: s for s in screws}
    for t in truth["screws"]:
        w = t["halo_width_mm"]
        if w <= 0.5 or w >= 1.5:
            assert got[t["id"]].loosening == t["loosening"], t["id"]
    thin = [t for t in truth["screws"] if 0 < t["halo_width_mm"] <= 0.5]
    assert thin, "the seed must hold a thin halo"
    # (the margin is small: L5-left still reads coverage 0.44 and a mean of 0.86 mm;
    # see the report of this change)
    for t in thin:
        assert got[t["id"]].halo_coverage < 0.5, t["id"]
    for t in [t for t in truth["screws"] if t["halo_width_mm"] == 0]:
        assert got[t["id"]].halo_coverage < 0.3, t["id"]


def _noisy_widths(true_w: np.ndarray, sd_mm: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(true_w + rng.normal(0.0, sd_mm, true_w.shape), 0.0, None)


def test_halo_just_under_the_threshold_is_not_part_covered_by_noise():
    # a 0.85 mm whole halo read with 0.25 mm per-ray scatter: per ray about 27 % of the
    # readings cross 1 mm; the true coverage is 0
    S, A = 36, 36
    w = _noisy_widths(np.full((S, A), 0.85), 0.25, seed=1)
    per_ray = float(np.mean(w >= 1.0))
    smoothed = float(np.mean(_along_shaft_width(w.ravel(), (S, A)) >= 1.0))
    assert per_ray > 0.15
    assert smoothed < 0.05


def test_partial_halo_sector_and_a_track_along_part_of_the_shaft_keep_their_extent():
    # 1.6 mm over half the circumference on stations 0-19 of 36 (a track along part of the
    # shaft, longer than the along-shaft window); true coverage 20 * 18 / (36 * 36)
    S, A = 36, 36
    true_w = np.zeros((S, A))
    true_w[:20, :18] = 1.6
    w = _noisy_widths(true_w, 0.2, seed=2)
    w[5, 3] = np.nan   # excluded rays are ignored, not counted as zero
    used = np.isfinite(w.ravel())
    cov = float(np.mean(_along_shaft_width(w.ravel(), (S, A))[used] >= 1.0))
    # a running window keeps a step's position along the shaft (window shorter than the track)
    assert HALO_COVERAGE_STATIONS < 20
    assert abs(cov - 20 * 18 / (S * A)) <= 0.02
    # the window keeps azimuths apart: sector edges stay where they were
    med = _along_shaft_width(w.ravel(), (S, A)).reshape(S, A)
    assert np.all(med[:12, :18] >= 1.0) and np.all(med[:, 18:] < 1.0)
