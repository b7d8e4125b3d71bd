"""Smoke run of the benchmark harness on tiny sizes (no timing assertions: timings belong in
``fusionct bench``, not in tests).

The harness run (one in-process analysis to record kernel calls, then three fresh-process
analyses of a 160 x 160 x 124 phantom) takes one to two minutes on the 2-core machine, so the
tests that use it are marked slow; the fits and the study grid are checked on their own.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import os

    os.environ["FUSIONCT_BENCH_DIR"] = str(tmp_path_factory.mktemp("bench"))
    from benchmarks.run import run_all, tiny_plan

    try:
        yield run_all(tiny_plan())
    finally:
        os.environ.pop("FUSIONCT_BENCH_DIR", None)


@pytest.mark.slow
def test_every_kernel_with_a_reference_is_benchmarked_with_a_finite_ratio(tiny_run):
    from benchmarks.kernels_bench import discover_kernels

    found = {f"{m}.{n}" for m, n, _, _ in discover_kernels()}
    assert {"sampling.sample_rays", "subsidence.rising_edges", "bridging.bridged_columns"} <= found
    kernels = tiny_run["raw"]["kernels"]
    assert {f"{k['module']}.{k['name']}" for k in kernels} == found
    for k in kernels:
        assert math.isfinite(k["ratio"]) and k["ratio"] > 0, k
        assert math.isfinite(k["compile_s"]) and k["compile_s"] >= 0
        assert k["disagree"] < 0.01, f"{k['name']} differs from its reference on {k['disagree']:.1%}"


@pytest.mark.slow
def test_table_has_every_section_and_the_summary_names_kernel_ratio_and_study(tiny_run):
    table = tiny_run["table"]
    lines = table.splitlines()
    assert lines[0].startswith("| section") and set(lines[1]) <= {"|", "-"}
    sections = {r.section for r in tiny_run["rows"]}
    assert {"kernel", "bandwidth", "loading", "study", "scaling"} <= sections
    summary = tiny_run["summary"]
    assert summary.startswith("fusionct bench: smallest kernel ratio ")
    assert "whole study 160x160x124" in summary
    smallest = min(k["ratio"] for k in tiny_run["raw"]["kernels"])
    assert f"{smallest:.1f}x" in summary


@pytest.mark.slow
def test_loading_ratios_and_copy_bandwidth_are_finite(tiny_run):
    raw = tiny_run["raw"]
    for key in ("fusionct_s", "sitk_s", "sitk_read_only_s", "pydicom_s", "ours_over_sitk"):
        assert math.isfinite(raw["loading"][key]) and raw["loading"][key] > 0
    assert raw["copy"]["copy_GBps"] > 0


@pytest.mark.slow
def test_whole_study_runs_in_a_fresh_process_and_reports_memory(tiny_run):
    plain = tiny_run["raw"]["study_plain"]
    if importlib.util.find_spec("pipeline.measure") is None or importlib.util.find_spec("pipeline.detect") is None:
        pytest.skip("pipeline.measure / pipeline.detect not in the repository yet")
    assert plain["ok"], plain.get("error")
    assert math.isfinite(plain["analyze_s"]) and plain["analyze_s"] > 0
    # a child process that loaded a volume holds at least that volume's float32 array
    assert plain["maxrss_mb"] > 160 * 160 * 124 * 4 / 2 ** 20
    assert plain["n_screws"] >= 1


def test_growth_fits_recover_known_slope_and_exponent():
    from benchmarks.study_bench import linear_fit, power_fit

    fit = linear_fit([4, 6, 8, 10], [1.0, 1.5, 2.0, 2.5])
    assert fit["slope"] == pytest.approx(0.25) and fit["intercept"] == pytest.approx(0.0, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_rel_residual"] < 1e-9
    assert power_fit([1e6, 2e6, 4e6], [2.0, 4.0, 8.0]) == pytest.approx(1.0)
    assert power_fit([1e6, 2e6, 4e6], [1.0, 4.0, 16.0]) == pytest.approx(2.0)


@pytest.mark.slow
def test_scaling_points_cover_the_planned_screw_counts(tiny_run):
    screws = tiny_run["raw"]["scaling_screws"]
    assert [p["screws_truth"] for p in screws["points"]] == [4, 10]
    ok = [p for p in screws["points"] if p["ok"]]
    if len(ok) >= 2:
        assert np.isfinite(screws["fit"]["slope"])


def test_standard_study_grid_is_padded_to_the_requested_size_without_moving_anatomy():
    from benchmarks.standard import StudySize, make_study_volume

    size = StudySize(96, 120, 2.6667, 2.0)
    vol, truth = make_study_volume(size)
    assert vol.hu.shape == (120, 96, 96)
    assert len(truth["screws"]) == 10 and len(truth["cages"]) == 3
    # the middle of a screw shaft (LPS, from the truth) is metal in the padded grid
    k, j, i = np.rint(vol.lps_to_kji(np.asarray(truth["screws"][0]["tip_lps_mm"]) * 0.5
                                     + np.asarray(truth["screws"][0]["head_lps_mm"]) * 0.5)).astype(int)
    assert vol.hu[k, j, i] > 1500
    pad = truth["benchmark_padding_slices"]
    assert pad > 0
    assert abs(float(np.median(vol.hu[0])) - 40.0) < 30.0  # soft tissue fills the added slices


@pytest.mark.slow
def test_kernel_replay_under_another_setting_runs_in_a_fresh_process(tiny_run):
    from benchmarks.kernels_bench import discover_kernels, kernel_times_child
    from benchmarks.run import tiny_plan

    st = tiny_plan().study
    times = kernel_times_child((st.n_inplane, st.n_slices, st.pixel_mm, st.slice_mm), 1,
                               {"OMP_WAIT_POLICY": "PASSIVE"}, 0.05)
    assert "error" not in times, times.get("error")
    assert set(times) <= {n for _, n, _, _ in discover_kernels()} and "sample_rays" in times
    assert all(math.isfinite(t) and t > 0 for t in times.values())
