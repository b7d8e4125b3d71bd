"""Helpers shared by the detection tests: a phantom detected as ``fusionct analyze`` detects it,
and what is wrong with the result against the phantom's truth."""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

from benchmarks.detection_sweep import vertebra_problems  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.detect import detect  # noqa: E402
from sample_data.phantom import PhantomSpec, make_phantom, truth_anatomy  # noqa: E402


def detected_phantom(seed: int, spacing_mm, noise_hu: float):
    """(anatomy, truth) of one phantom with streaks and blooming, detected with the defaults."""
    vol, truth = make_phantom(PhantomSpec(seed=seed, spacing_mm=spacing_mm, noise_hu=noise_hu,
                                          streaks=True, blooming=True))
    return detect(vol, Config()), truth


def detection_problems(anatomy, truth) -> list[str]:
    """:func:`benchmarks.detection_sweep.vertebra_problems`, plus screws and cages whose ids
    (vertebra and side, level) are not the truth's. Empty when right."""
    problems = vertebra_problems(anatomy.vertebrae, truth_anatomy(truth).vertebrae)
    for kind, found in (("screws", anatomy.screws), ("cages", anatomy.cages)):
        want = sorted(x["id"] for x in truth[kind])
        got = sorted(x.id for x in found)
        if got != want:
            problems.append(f"{kind} {','.join(got)} for {','.join(want)}")
    return problems
