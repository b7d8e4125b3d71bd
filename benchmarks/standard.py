"""The benchmark studies: the standard study of issue 6 and its scaled variants.

The standard study is a phantom lumbar spine L2-S1 after a four-level fusion: 10 pedicle
screws (two in each of the 5 vertebrae), 3 interbody cages (L3-L4, L4-L5, L5-S1; L2-L3 is
fused posterolaterally without a cage), 4 disc levels, on a 512 x 512 x 400 grid with
0.5 mm pixels and 0.5 mm slices.

The phantom generator sizes its field of view in-plane from ``fov_x_mm``/``fov_y_mm`` (so a
256 mm field gives exactly 512 x 512 at 0.5 mm) but along z from the anatomy (the listed
vertebrae plus a margin, about 180 mm here). To reach the requested slice count the volume
is padded with soft tissue (40 HU plus the phantom's noise level) above and below, or
cropped symmetrically when it is longer; the origin moves with the padding, so the truth's
LPS positions stay exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import bench_root

SOFT_TISSUE_HU = 40.0
STANDARD_VERTEBRAE = ("L2", "L3", "L4", "L5", "S1")
STANDARD_LEVELS = ("L2-L3", "L3-L4", "L4-L5", "L5-S1")


@dataclass(frozen=True)
class StudySize:
    """A study grid: ``n_inplane`` x ``n_inplane`` pixels of ``pixel_mm``, ``n_slices`` of ``slice_mm``."""

    n_inplane: int = 512
    n_slices: int = 400
    pixel_mm: float = 0.5
    slice_mm: float = 0.5

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return (self.n_slices, self.n_inplane, self.n_inplane)

    @property
    def n_voxels(self) -> int:
        return self.n_slices * self.n_inplane ** 2

    def label(self) -> str:
        return f"{self.n_inplane}x{self.n_inplane}x{self.n_slices}"


STANDARD = StudySize()


def standard_spec(size: StudySize = STANDARD, instrumented_levels=STANDARD_LEVELS, seed: int = 6):
    """PhantomSpec of the standard study (or a variant with fewer instrumented levels).

    Cages sit at the instrumented levels among L3-L4, L4-L5, L5-S1 (single cages: titanium,
    PEEK, titanium, with none / mild / severe subsidence); every other level has none.
    """
    from sample_data import CageSpec, PhantomSpec

    cage_for = {"L3-L4": CageSpec("titanium", 0.6, 1.0, 1),
                "L4-L5": CageSpec("peek", 0.5, 3.0, 1),
                "L5-S1": CageSpec("titanium", 1.0, 4.6, 1)}
    cages = {lv: (cage_for.get(lv) if lv in instrumented_levels else None) for lv in STANDARD_LEVELS}
    half = size.n_inplane * size.pixel_mm / 2.0
    return PhantomSpec(
        seed=seed,
        spacing_mm=(size.pixel_mm, size.pixel_mm, size.slice_mm),
        vertebrae=STANDARD_VERTEBRAE,
        instrumented_levels=tuple(instrumented_levels),
        cages=cages,
        fov_x_mm=(-half, half),
        # the phantom's y field is (-35, 65) by default: keep its centre near the spine
        fov_y_mm=(15.0 - half, 15.0 + half),
    )


def fit_slices(hu: np.ndarray, origin_lps_mm, spacing_mm, n_slices: int, noise_hu: float,
               seed: int = 0):
    """Pad (soft tissue + noise) or crop ``hu`` along k to ``n_slices``; returns (hu, origin).

    Only for the canonical head-first grid (identity direction), where k runs along +z.
    """
    nk = hu.shape[0]
    origin = np.asarray(origin_lps_mm, float).copy()
    if nk == n_slices:
        return hu, origin
    if nk > n_slices:
        lo = (nk - n_slices) // 2
        origin[2] += lo * float(spacing_mm[2])
        return np.ascontiguousarray(hu[lo:lo + n_slices]), origin
    lo = (n_slices - nk) // 2
    out = np.empty((n_slices,) + hu.shape[1:], np.float32)
    rng = np.random.default_rng(seed)
    pad = np.float32(SOFT_TISSUE_HU) + rng.standard_normal((n_slices - nk,) + hu.shape[1:],
                                                           dtype=np.float32) * np.float32(noise_hu)
    np.rint(pad, out=pad)
    out[:lo] = pad[:lo]
    out[lo:lo + nk] = hu
    out[lo + nk:] = pad[lo:]
    origin[2] -= lo * float(spacing_mm[2])
    return out, origin


def make_study_volume(size: StudySize = STANDARD, instrumented_levels=STANDARD_LEVELS, seed: int = 6):
    """The benchmark phantom as (Volume, truth) on exactly ``size``'s grid."""
    from pipeline.volume import Volume
    from sample_data import make_phantom

    spec = standard_spec(size, instrumented_levels, seed)
    vol, truth = make_phantom(spec)
    hu, origin = fit_slices(vol.hu, vol.origin_lps_mm, vol.spacing_mm, size.n_slices,
                            spec.noise_hu, seed)
    truth["volume"]["shape_kji"] = list(hu.shape)
    truth["volume"]["origin_lps_mm"] = origin.tolist()
    truth["benchmark_padding_slices"] = int(size.n_slices - vol.hu.shape[0])
    return Volume(hu, origin, vol.spacing_mm, vol.direction, meta=dict(vol.meta)), truth


def _generator_hash() -> str:
    """Hash of the phantom generator and this file: a changed generator makes new studies."""
    import hashlib

    from benchmarks.common import REPO

    h = hashlib.blake2b(digest_size=4)
    for p in (REPO / "sample_data" / "phantom.py", Path(__file__)):
        h.update(p.read_bytes())
    return h.hexdigest()


def study_key(size: StudySize, instrumented_levels=STANDARD_LEVELS, seed: int = 6) -> str:
    """File-name stem of a cached benchmark study (size, levels, seed, generator version)."""
    return (f"study_{size.label()}_{size.pixel_mm:g}x{size.slice_mm:g}mm_"
            f"{len(instrumented_levels)}lv_s{seed}_{_generator_hash()}")


def cached_study_volume(size: StudySize = STANDARD, instrumented_levels=STANDARD_LEVELS, seed: int = 6):
    """(Volume, truth) of a benchmark study, kept as .npy + .json under the bench folder."""
    from pipeline.volume import Volume

    stem = bench_root() / study_key(size, instrumented_levels, seed)
    npy, js = Path(f"{stem}.npy"), Path(f"{stem}.json")
    if npy.exists() and js.exists():
        info = json.loads(js.read_text())
        v = info["volume"]
        hu = np.load(npy)
        return Volume(hu, v["origin_lps_mm"], v["spacing_mm"], v["direction"],
                      meta={"source": "fusionct phantom"}), info
    vol, truth = make_study_volume(size, instrumented_levels, seed)
    tmp = Path(f"{stem}.tmp.npy")
    np.save(tmp, vol.hu)
    tmp.replace(npy)
    js.write_text(json.dumps(truth))
    return vol, truth


def cached_study_dicom(size: StudySize = STANDARD, instrumented_levels=STANDARD_LEVELS, seed: int = 6) -> Path:
    """A DICOM folder (one CT series, uint16 stored, intercept -1024) of a benchmark study.

    Written with :func:`pipeline.loading_bench.write_ct_series` (the loading engineer's
    plain series writer) from the phantom volume; a ``<folder>.complete`` marker beside it
    makes reuse safe.
    """
    from pipeline.loading_bench import write_ct_series

    folder = bench_root() / (study_key(size, instrumented_levels, seed) + "_dicom")
    done = folder.parent / (folder.name + ".complete")
    if done.exists():
        return folder
    vol, _ = cached_study_volume(size, instrumented_levels, seed)
    stored = np.clip(np.rint(vol.hu) + 1024.0, 0, 65535).astype(np.uint16)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    sx, sy, sz = (float(s) for s in vol.spacing_mm)
    write_ct_series(folder, stored=stored, origin_lps_mm=tuple(vol.origin_lps_mm),
                    spacing_mm=(sx, sy, sz), rescale_intercept=-1024.0, kernel="BONE",
                    description="Lumbar spine bone 0.5", names="ordered", seed=seed)
    done.write_text("ok\n")
    return folder
