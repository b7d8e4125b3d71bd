"""Load a NIfTI CT (``.nii`` / ``.nii.gz``) as a :class:`~pipeline.volume.Volume` in HU.

SimpleITK reads the file (it converts NIfTI's RAS affine to LPS and applies
``scl_slope``/``scl_inter``), so geometry equals ``SimpleITK.ReadImage``. Before that the
header's affine is checked with nibabel: a NaN/infinite or singular affine is refused,
because every millimetre in the report would be wrong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.volume import Volume


def _first_line(e: Exception, path: Path) -> str:
    """An exception's first line with the file's folders removed (they may name the patient)."""
    text = str(e).replace(str(path), path.name).replace(str(path.parent), "")
    return text.splitlines()[0][:160] if text else "unknown reason"


def _check_complete(path: Path, needed_bytes: int) -> None:
    """Refuse a file cut short (SimpleITK would zero-fill the missing voxels silently).

    ``.nii``: the file must hold the header, extensions and every voxel. ``.nii.gz``: the
    gzip trailer's ISIZE (uncompressed size mod 2**32) is checked first (O(1)); when it does
    not match, the stream is decompressed once to prove it is whole and long enough.
    """
    import gzip
    import zlib

    if not str(path).lower().endswith(".gz"):
        size = path.stat().st_size
        if size < needed_bytes:
            raise InputError(path.name, f"truncated NIfTI file: {size} of the {needed_bytes} bytes its header declares")
        return
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() >= 4:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
            if isize == needed_bytes % 2**32:
                return
    total = 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 22):
                total += len(chunk)
    except (EOFError, zlib.error, OSError) as e:
        raise InputError(path.name, f"truncated or corrupt NIfTI gzip stream ({type(e).__name__}) after "
                                    f"{total} of {needed_bytes} bytes") from None
    if total < needed_bytes:
        raise InputError(path.name, f"truncated NIfTI file: {total} of the {needed_bytes} bytes its header declares")


def _check_affine(path: Path) -> None:
    """Refuse a header whose voxel-to-world affine is not finite or not invertible, or a
    file that does not hold every voxel its header declares."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        hdr = img.header
        shape = img.shape
        affine = np.asarray(img.affine, float)
        zooms = np.asarray(hdr.get_zooms()[:3], float)
        needed = int(hdr.get_data_offset()) + int(np.prod(shape)) * hdr.get_data_dtype().itemsize
    except Exception as e:  # noqa: BLE001 - nibabel raises many types on bad headers
        raise InputError(path.name, f"not a readable NIfTI file ({type(e).__name__}: {_first_line(e, path)})") from None
    _check_complete(path, needed)
    if len(shape) < 3 or (len(shape) > 3 and int(np.prod(shape[3:])) != 1):
        raise InputError(path.name, f"NIfTI image must be one 3-D volume, got shape {tuple(shape)}")
    if min(shape[:3]) < 2:
        raise InputError(path.name, f"NIfTI volume of shape {tuple(shape[:3])} is not a 3-D volume")
    if not np.all(np.isfinite(affine)):
        raise InputError(path.name, "broken NIfTI affine (contains NaN or infinity)")
    m = affine[:3, :3]
    det = float(np.linalg.det(m))
    scale = float(np.prod(np.linalg.norm(m, axis=0)))
    if not np.isfinite(det) or scale == 0 or abs(det) < 1e-6 * scale:
        raise InputError(path.name, "broken NIfTI affine (singular: voxel axes are degenerate)")
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise InputError(path.name, f"zero or negative voxel size {zooms.tolist()} mm in NIfTI header")


def load_nifti(path: str | Path) -> Volume:
    """Read one NIfTI file as a Volume in HU (as stored, after scl_slope/scl_inter).

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    Volume
        Geometry as ``SimpleITK.ReadImage`` gives it (LPS); ``meta['input_kind'] == 'nifti'``.
        NIfTI records no modality; the volume is assumed to be CT in HU.

    Raises
    ------
    InputError
        Unreadable or truncated file, more than one volume, broken (NaN / singular) affine,
        zero spacing, non-finite voxel values.
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_affine(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        lines = [ln for ln in str(e).replace(str(path), path.name).splitlines() if ln.strip()]
        msg = lines[-1].strip()[:160] if lines else "unknown reason"
        raise InputError(path.name, f"SimpleITK cannot read this NIfTI file: {msg}") from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise InputError(path.name, f"NIfTI image must be 3-D, got {img.GetDimension()}-D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path.name, "NIfTI image has vector voxels; a CT volume has one value per voxel")
    origin = np.asarray(img.GetOrigin(), float)
    spacing = np.asarray(img.GetSpacing(), float)
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    if not (np.all(np.isfinite(origin)) and np.all(np.isfinite(spacing)) and np.all(np.isfinite(direction))):
        raise InputError(path.name, "broken NIfTI geometry (NaN or infinity in origin, spacing or direction)")
    if np.any(spacing <= 0):
        raise InputError(path.name, f"zero or negative voxel size {spacing.tolist()} mm")
    if abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(path.name, "broken NIfTI affine (singular direction)")
    hu = sitk.GetArrayFromImage(img)
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    if not np.all(np.isfinite(hu)):
        raise InputError(path.name, "NIfTI voxel values contain NaN or infinity (after scl_slope/scl_inter)")
    meta = {
        "modality": None,
        "study_instance_uid": None,
        "series_instance_uid": None,
        "frame_of_reference_uid": None,
        "series_description": path.name,
        "convolution_kernel": None,
        "slice_thickness_mm": float(spacing[2]),
        "sop_class_uid": None,
        "sop_instance_uids": [],
        "source_paths": [str(path)],
        "selection_reason": f"NIfTI file {path.name} read as the one volume (NIfTI records no modality; assumed CT in HU).",
        "input_kind": "nifti",
        "manufacturer": None,
    }
    return Volume(hu=hu, origin_lps_mm=origin, spacing_mm=spacing, direction=direction, meta=meta)


__all__ = ["load_nifti"]
