"""Change since a prior CT of the same patient (CONTRACT.md, ``--baseline PRIOR``).

Subsidence and loosening are defined as change over time, and the best published
quantitative sign of loosening is screw movement between two CTs: a shift of 0.83 mm or more
predicted loosening (Tanioka et al., Eur Spine J 2021). So each vertebra of the prior study
is registered rigidly to the current one (SimpleITK, bone only: metal masked out), each
screw shaft is registered on its own metal, and a screw's migration is how far its shaft
moved relative to its own vertebra.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.results import ScrewGeometry, Vertebra
from pipeline.volume import Volume


def to_sitk(volume: Volume) -> sitk.Image:
    """A Volume as a SimpleITK image with the same LPS geometry (no copy of geometry rules)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.float32))
    img.SetOrigin(tuple(float(v) for v in volume.origin_lps_mm))
    img.SetSpacing(tuple(float(v) for v in volume.spacing_mm))
    img.SetDirection(tuple(float(v) for v in volume.direction.reshape(-1)))
    return img


@dataclass(frozen=True)
class RigidTransform:
    """A rigid map of LPS points from the prior study to the current one: ``R @ p + t``."""

    rotation: np.ndarray
    translation_mm: np.ndarray

    def apply(self, points_lps_mm) -> np.ndarray:
        p = np.asarray(points_lps_mm, float)
        return p @ self.rotation.T + self.translation_mm


def _inverse_of_itk(tx: sitk.Euler3DTransform) -> RigidTransform:
    """ITK maps current (fixed) points to prior (moving) points; we want prior -> current."""
    inv = tx.GetInverse()
    m = np.array(inv.GetMatrix()).reshape(3, 3)
    c = np.array(inv.GetCenter())
    t = np.array(inv.GetTranslation())
    # ITK: y = M (x - c) + c + t
    return RigidTransform(rotation=m, translation_mm=c + t - m @ c)


def _crop(image: sitk.Image, center_lps, half_extent_mm) -> sitk.Image:
    """The part of ``image`` inside an LPS-axis-aligned box (registration then costs only
    what the region costs, not the whole study)."""
    size = np.array(image.GetSize())
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    pts = np.asarray(center_lps, float) + corners * np.asarray(half_extent_mm, float)
    idx = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in pts])
    lo = np.clip(np.floor(idx.min(0)).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + 1, lo + 1, size)
    return sitk.RegionOfInterest(image, [int(v) for v in hi - lo], [int(v) for v in lo])


def _mask_from(image: sitk.Image, keep: np.ndarray) -> sitk.Image:
    mask = sitk.GetImageFromArray(keep.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _without_metal(image: sitk.Image, metal_threshold_hu: float, dilate_mm: float) -> sitk.Image:
    """A mask of everything but metal (grown by ``dilate_mm``): bone alone carries a
    vertebra's motion, and a migrating screw must not drag it."""
    from scipy import ndimage

    metal = sitk.GetArrayViewFromImage(image) > metal_threshold_hu
    r = np.maximum(1, np.round(dilate_mm / np.array(image.GetSpacing())[::-1])).astype(int)
    metal = ndimage.binary_dilation(metal, structure=np.ones(2 * r + 1, bool))
    return _mask_from(image, ~metal)


def _cylinder_mask(image: sitk.Image, a_lps, b_lps, radius_mm: float) -> sitk.Image:
    """A mask of the points within ``radius_mm`` of the segment a-b (a screw shaft)."""
    nk, nj, ni = sitk.GetArrayViewFromImage(image).shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    m = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    p = ijk @ m.T + np.array(image.GetOrigin())
    a, b = np.asarray(a_lps, float), np.asarray(b_lps, float)
    ab = b - a
    t = np.clip((p - a) @ ab / (ab @ ab), 0.0, 1.0)
    d = np.linalg.norm(p - (a + t[:, None] * ab), axis=1)
    return _mask_from(image, (d <= radius_mm).reshape(nk, nj, ni))


def register_rigid(prior: sitk.Image, current: sitk.Image, fixed_mask: sitk.Image,
                   moving_mask: sitk.Image | None, center_lps, initial_shift_mm,
                   shrink=(2, 1), smooth_mm=(1.0, 0.0)) -> RigidTransform:
    """Rigid (6 DOF) mean-squares registration of ``prior`` onto ``current`` inside masks.

    Same modality and scanner units (HU), so mean squares is the right metric. Images are
    expected already cropped to the region of interest. Returns the map of prior LPS points
    onto current LPS points.
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=300,
                                                 relaxationFactor=0.6,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smooth_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(float(v) for v in center_lps))
    # ITK's transform maps current -> prior, so it starts at the prior minus current offset.
    tx.SetTranslation(tuple(float(v) for v in -np.asarray(initial_shift_mm)))
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(current, prior)
    return _inverse_of_itk(tx)


def _vertebra_box(v: Vertebra) -> tuple[np.ndarray, np.ndarray]:
    """Centre and half extent (LPS mm) of a box holding a vertebra's body and posterior
    elements (they reach about three AP semi-axes behind the body's centre)."""
    a, b = v.semi_axes_mm
    top = np.asarray(v.superior_endplate.point_lps_mm)
    height = abs(float(np.dot(top - np.asarray(v.inferior_endplate.point_lps_mm), v.axis_si)))
    # The sacrum has no inferior endplate in view: take its top 30 mm, where S1 screws sit.
    height = min(height, 30.0) if v.is_sacrum else height
    center = top - 0.5 * height * np.asarray(v.axis_si) + np.array([0.0, 1.2 * b, 0.0])
    return center, np.array([a + 8.0, 2.4 * b, 0.5 * height + 1.0])


def register_vertebra(prior: sitk.Image, current: sitk.Image, prior_v: Vertebra,
                      current_v: Vertebra, metal_threshold_hu: float) -> RigidTransform:
    """Register one vertebra (body and posterior elements, metal masked out) prior -> current."""
    center, half = _vertebra_box(current_v)
    p_center, _ = _vertebra_box(prior_v)
    fixed = _crop(current, center, half)
    moving = _crop(prior, p_center, half + 8.0)
    shift = np.asarray(current_v.center_lps_mm) - np.asarray(prior_v.center_lps_mm)
    return register_rigid(moving, fixed, _without_metal(fixed, metal_threshold_hu, 2.0),
                          _without_metal(moving, metal_threshold_hu, 2.0),
                          current_v.center_lps_mm, shift)


def register_screw(prior: sitk.Image, current: sitk.Image, prior_s: ScrewGeometry,
                   current_s: ScrewGeometry) -> RigidTransform:
    """Register one screw shaft on its own metal: a tight cylinder around the shaft, so
    neither the bone around it nor the rod and tulip pull the estimate."""
    head, tip = np.asarray(current_s.head_lps_mm), np.asarray(current_s.tip_lps_mm)
    radius = current_s.diameter_mm / 2 + 1.5
    center = 0.5 * (head + tip)
    half = 0.5 * np.abs(tip - head) + radius + 2.0
    fixed = _crop(current, center, half)
    p_center = 0.5 * (np.asarray(prior_s.head_lps_mm) + np.asarray(prior_s.tip_lps_mm))
    moving = _crop(prior, p_center, half + 4.0)
    return register_rigid(moving, fixed, _cylinder_mask(fixed, head, tip, radius), None, center,
                          center - p_center, shrink=(1,), smooth_mm=(0.0,))


def screw_migration_mm(prior_s: ScrewGeometry, vertebra_tx: RigidTransform,
                       screw_tx: RigidTransform) -> float:
    """How far the shaft moved relative to its vertebra: the larger displacement of its two
    ends (head, tip) between "moved with the vertebra" and "where the screw is now"."""
    ends = np.array([prior_s.head_lps_mm, prior_s.tip_lps_mm])
    return float(np.max(np.linalg.norm(screw_tx.apply(ends) - vertebra_tx.apply(ends), axis=1)))


def compare_with_prior(prior_volume: Volume, prior_anatomy, prior_screws, prior_cages, prior_levels,
                       current_volume: Volume, current_anatomy, screws, cages, levels,
                       metal_threshold_hu: float):
    """Change since the prior study, matched by name (vertebra, screw id, cage level, level).

    Returns the current screw / cage / level measurements with ``migration_mm``,
    ``halo_change_mm``, ``subsidence_change_mm`` and ``disc_height_change_mm`` filled in
    where the prior has the same object, and a list of notes for what could not be matched.
    """
    from dataclasses import replace

    prior_img, current_img = to_sitk(prior_volume), to_sitk(current_volume)
    prior_v = {v.name: v for v in prior_anatomy.vertebrae}
    current_v = {v.name: v for v in current_anatomy.vertebrae}
    prior_geo = {s.id: s for s in prior_anatomy.screws}
    current_geo = {s.id: s for s in current_anatomy.screws}
    prior_meas = {s.id: s for s in prior_screws}
    notes = []
    vertebra_tx: dict[str, RigidTransform] = {}

    def tx_of(name):
        if name not in vertebra_tx:
            vertebra_tx[name] = register_vertebra(prior_img, current_img, prior_v[name], current_v[name],
                                                  metal_threshold_hu)
        return vertebra_tx[name]

    out_screws = []
    for s in screws:
        p, g = prior_geo.get(s.id), current_geo.get(s.id)
        if p is None or g is None or s.vertebra not in prior_v or s.vertebra not in current_v:
            notes.append(f"screw {s.id}: not in the prior study, no change measured")
            out_screws.append(s)
            continue
        migration = screw_migration_mm(p, tx_of(s.vertebra), register_screw(prior_img, current_img, p, g))
        halo_change = s.halo_mean_mm - prior_meas[s.id].halo_mean_mm if s.id in prior_meas else None
        out_screws.append(replace(s, migration_mm=round(migration, 3),
                                  halo_change_mm=None if halo_change is None else round(halo_change, 3)))
    prior_cage = {c.level: c for c in prior_cages}
    out_cages = [replace(c, subsidence_change_mm=round(c.subsidence_mm - prior_cage[c.level].subsidence_mm, 3))
                 if c.level in prior_cage else c for c in cages]
    prior_level = {lv.level: lv for lv in prior_levels}
    out_levels = []
    for lv in levels:
        pl = prior_level.get(lv.level)
        change = None
        if pl is not None and lv.disc_height_mm is not None and pl.disc_height_mm is not None:
            change = round(lv.disc_height_mm - pl.disc_height_mm, 3)
        out_levels.append(replace(lv, disc_height_change_mm=change))
    return out_screws, out_cages, out_levels, notes
