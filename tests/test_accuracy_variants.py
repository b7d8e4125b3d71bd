"""The accuracy harness's variants (benchmarks.accuracy): half-circumference halos moved off
the coverage cut, for the README's measurement of the loosening column off the cut."""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")

import pytest  # noqa: E402

from benchmarks.accuracy import half_halo_fractions, uniform_set_overrides  # noqa: E402
from sample_data.phantom import PhantomSpec, resolve_spec  # noqa: E402


def _half_halos(seed, **kw):
    screws = resolve_spec(PhantomSpec(seed=seed, **kw))["screws"]
    return [sid for sid, s in screws.items() if abs(s["halo_fraction"] - 0.5) < 1e-9]


@pytest.mark.parametrize("variant, allowed", [("0.4/0.6", {0.4, 0.6}), ("0.25", {0.25})])
def test_only_the_half_halos_move_off_the_cut(variant, allowed):
    moved = 0
    for seed in range(12):
        for kw in ({}, uniform_set_overrides(seed)):
            fr = half_halo_fractions(seed, variant, **kw)
            assert set(fr) == set(_half_halos(seed, **kw))
            assert set(fr.values()) <= allowed
            assert not _half_halos(seed, halo_fractions=fr, **kw)  # none left on the cut
            moved += len(fr)
    assert moved > 20  # the generator draws a half halo for about a third of its halos
    assert half_halo_fractions(0, "0.5") == {}
    with pytest.raises(ValueError):
        half_halo_fractions(0, "0.3")
