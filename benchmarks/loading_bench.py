"""Loading one CT series: ours against SimpleITK's series reader and plain pydicom (item 2).

The three loaders and what each includes are defined once, in
:func:`pipeline.loading_bench.time_loading` (the loading engineer's harness): ``fusionct``
is ``load_study`` (scan the folder, select the series, sort, read, rescale to float32 HU);
``sitk`` is ``GetGDCMSeriesFileNames`` + ``ImageSeriesReader`` + ``GetArrayFromImage``;
``pydicom`` a plain ``dcmread`` loop sorted by position with ``pixel_array * slope +
intercept``. Here it is called ``repeats`` times with one run each (after one warm-up run
that fills the page cache) and the median of each loader is taken, so the figures follow
the same rule as the kernel benchmarks.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import Row

#: ours may take at most this many times SimpleITK's reader (issue 6 target).
TARGET_VS_SITK = 1.2


def bench_loading(folder: str | Path, repeats: int = 5) -> dict:
    """Median seconds of each loader on ``folder`` and the ratios (``x_s`` keys, ``ratio_*``)."""
    from pipeline.loading_bench import time_loading

    time_loading(folder, repeats=1)  # warm-up: page cache, imports, first-call costs
    runs: dict[str, list[float]] = {}
    for _ in range(max(1, repeats)):
        r = time_loading(folder, repeats=1)
        for k, v in r.items():
            if k.endswith("_s"):
                runs.setdefault(k, []).append(v)
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["ours_over_sitk"] = out["fusionct_s"] / out["sitk_s"]
    out["ours_over_sitk_read_only"] = out["fusionct_s"] / out["sitk_read_only_s"]
    out["ours_over_pydicom"] = out["fusionct_s"] / out["pydicom_s"]
    return out


def loading_rows(res: dict, label: str) -> list[Row]:
    """Rows: ours vs SimpleITK (target within 1.2x), vs SimpleITK without scan, vs pydicom."""
    ours = res["fusionct_s"]
    return [
        Row("loading", f"{label} series: load_study vs SimpleITK ImageSeriesReader", ours,
            res["sitk_s"], res["sitk_s"] / ours,
            f"ours takes {res['ours_over_sitk']:.2f}x SimpleITK's time (both scan the folder)",
            f">= {1 / TARGET_VS_SITK:.2f}x (within {TARGET_VS_SITK:g}x)",
            bool(res["ours_over_sitk"] <= TARGET_VS_SITK)),
        Row("loading", f"{label} series: load_study vs SimpleITK reader, file list given", ours,
            res["sitk_read_only_s"], res["sitk_read_only_s"] / ours,
            "SimpleITK without its folder scan (ours still scans)"),
        Row("loading", f"{label} series: load_study vs plain pydicom loop", ours,
            res["pydicom_s"], res["pydicom_s"] / ours, "dcmread + sort + pixel_array rescale"),
    ]
