"""Load one study (a DICOM folder or a NIfTI file) as a :class:`~pipeline.volume.Volume` in HU.

Geometry is exactly what SimpleITK gives (``ImageSeriesReader`` on the files sorted along
the slice normal, or ``ReadImage`` for NIfTI): ``origin`` is the first slice's
ImagePositionPatient, the direction's columns are the row direction, the column direction
and the slice normal (row x column), all unit vectors, and the slice spacing is the
distance between the first and last slice positions divided by ``n - 1``.

Slices are sorted by their position along the normal (ImagePositionPatient . normal), never
by file name or InstanceNumber, so head-first and feet-first series and either slice order
load the same way. Every check that protects a measurement (one orientation, one size,
uniform spacing, one frame of reference, no duplicate positions, finite rescale) raises
:class:`~pipeline.errors.InputError` with one plain line naming the file or series.

Gantry tilt is *resampled*, not refused: a tilted series has its slices sheared along the
table (each slice displaced in its own plane by ``tan(tilt) * distance``), which an
orthogonal Volume cannot describe. Each slice is shifted in-plane (bilinear, no mixing
between slices) onto the orthogonal grid through the first slice, with the slice spacing
measured along the normal; voxels outside the acquired field of view become air
(-1024 HU). ``meta['gantry_tilt_deg']`` records the tilt and the selection reason says so.
Shears beyond any real gantry tilt (over 35 degrees) are refused.

Pixel values of uncompressed little-endian files are read straight from the file at the
offset the header scan found (``numpy.fromfile``, several files at once in a thread pool);
compressed transfer syntaxes (JPEG 2000, JPEG lossless, JPEG-LS, RLE) are decoded by
pydicom's pixel handlers with the installed pylibjpeg plugins.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

from pipeline.errors import InputError
from pipeline.series import SeriesInfo, SliceHeader, scan_dicom_folder, select_series
from pipeline.volume import Volume

#: Orientation cosines of two slices must agree within this (unitless).
ORIENTATION_TOLERANCE = 1e-4
#: Slice gaps may differ from the median gap by at most max(abs, rel * median).
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_REL = 0.01
#: Tilt (angle between slice stacking direction and normal) above which a series is refused.
GANTRY_TILT_TOLERANCE_DEG = 0.1
#: Slice shear beyond any real gantry tilt (scanners tilt at most about +-30 degrees).
MAX_GANTRY_TILT_DEG = 35.0
#: Sizes beyond these are refused as absurd.
MAX_IN_PLANE = 4096
MAX_SLICES = 5000
MAX_VOXELS = 1_500_000_000
MAX_SPACING_MM = 50.0
#: |HU| bound implied by rescale and stored bits above which values count as overflow.
MAX_ABS_HU = 1.0e6

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _rel(path: str, root: Path | None) -> str:
    """A file named relative to the input folder (short, and free of the user's tree).

    Bytes that are not UTF-8 in a file name are shown as U+FFFD: the message must encode
    (Prefect serialises it as JSON; stderr may be UTF-8 strict).
    """
    if root is None:
        name = os.path.basename(path)
    else:
        try:
            name = os.path.relpath(path, root)
        except ValueError:
            name = os.path.basename(path)
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_nifti_path(path: str | Path) -> bool:
    """True for ``*.nii`` / ``*.nii.gz`` file names."""
    name = str(path).lower()
    return name.endswith(_NIFTI_SUFFIXES)


def load_study(path: str | Path, allocate=None) -> Volume:
    """Load one study as a Volume in HU (float32, ``hu[k, j, i]``) with LPS geometry.

    Parameters
    ----------
    path : str or Path
        A folder holding one study's DICOM files (any nesting, names and order; non-DICOM
        files beside them are skipped; with several series the one fit for bone/hardware
        analysis is picked by :func:`pipeline.series.select_series`), or one NIfTI file
        (``.nii``/``.nii.gz``).
    allocate : callable, optional
        ``allocate(shape) -> ndarray`` (float32, C order) the DICOM pixels are written
        into, e.g. a memory-mapped cache file, so a 400 MB volume is not first built in
        memory and then copied to disk; default ``numpy.empty``. NIfTI input ignores it.

    Returns
    -------
    Volume
        ``meta`` holds modality, UIDs, series description, kernel, slice thickness,
        SOP class and instance UIDs and source paths in slice order, the selection
        reason, ``input_kind`` ("dicom" or "nifti") and manufacturer; no patient identifiers.

    Raises
    ------
    InputError
        The input cannot be analyzed (see the module docstring); the message names the
        file or series and the reason. Gantry-tilted series are resampled to an
        orthogonal grid (see the module docstring).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if p.is_file():
        if is_nifti_path(p):
            from pipeline.nifti import load_nifti

            return load_nifti(p)
        raise InputError(p, "a single file must be NIfTI (.nii or .nii.gz); give DICOM input as the folder of the study")
    return load_dicom_folder(p, allocate=allocate)


def load_dicom_folder(folder: str | Path, allocate=None) -> Volume:
    """Scan ``folder``, pick the bone/hardware series and load it (see :func:`load_study`)."""
    folder = Path(folder)
    series = scan_dicom_folder(folder)
    if series.n_files == 0:
        raise InputError(folder, "folder is empty (no files in it or below it)")
    if not series:
        if series.corrupt_paths:
            f = _rel(series.corrupt_paths[0], folder)
            raise InputError(f, f"looks like DICOM but cannot be parsed (corrupt or truncated); "
                                f"no readable DICOM series in the folder")
        hint = ""
        if any(is_nifti_path(f) for f in series.non_dicom_paths):
            hint = " (it holds a NIfTI file: give that file itself as the input)"
        raise InputError(folder, f"no DICOM files among its {series.n_files} files{hint}")
    studies = {s.study_instance_uid for s in series if s.modality == "CT"}
    if len(studies) > 1:
        raise InputError(folder, f"holds CT series of {len(studies)} different studies (StudyInstanceUID); "
                                 "give one study per folder (a prior goes in --baseline)")
    chosen, reason = select_series(series)
    if series.corrupt_paths:
        f = _rel(series.corrupt_paths[0], folder)
        raise InputError(f, f"looks like DICOM but cannot be parsed (corrupt or truncated) and may belong to "
                            f"{chosen.label()}; remove or replace it")
    vol = load_series(chosen, reason=reason, root=folder, allocate=allocate)
    vol.meta["skipped_non_dicom_files"] = len(series.non_dicom_paths)
    return vol


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------
def sort_slices(series: SeriesInfo, root: Path | None = None) -> tuple[list[SliceHeader], dict]:
    """Check one series' slice headers and sort them along the slice normal.

    Parameters
    ----------
    series : SeriesInfo
    root : Path, optional
        Input folder; files are named relative to it in messages.

    Returns
    -------
    slices : list of SliceHeader
        Sorted by ImagePositionPatient . (row x column), ascending.
    geometry : dict
        ``origin_lps_mm`` (3,), ``spacing_mm`` (3,), ``direction`` (3, 3), ``rows``, ``columns``,
        ``gantry_tilt_deg`` and ``tilt_shift_ij_px`` ((n, 2) in-plane pixel offsets of each
        slice for a tilted series, else None).

    Raises
    ------
    InputError
        Missing geometry, mixed orientation, size, spacing or frame of reference, zero or
        negative spacing, duplicate positions, missing slices (non-uniform spacing),
        shear beyond any gantry tilt, single slice, absurd dimensions, multi-frame files,
        no pixel data.
    """
    label = series.label()
    if series.corrupt_paths:
        f = _rel(series.corrupt_paths[0], root)
        raise InputError(f, f"corrupt or truncated DICOM file in {label} (header cannot be parsed)")
    slices = list(series.slices)
    if len(slices) < 2:
        raise InputError(label, f"single slice ({len(slices)} image); a CT volume needs at least 2 slices")

    first = slices[0]
    for s in slices:
        name = _rel(s.path, root)
        if not s.has_pixel_data:
            raise InputError(name, f"no (integer) pixel data in this file of {label} (truncated, or not an image)")
        if s.number_of_frames != 1:
            raise InputError(name, f"multi-frame image ({s.number_of_frames} frames); only single-frame CT series are supported")
        if s.samples_per_pixel != 1:
            raise InputError(name, f"{s.samples_per_pixel} samples per pixel; CT must be grayscale")
        if s.position_lps_mm is None or not all(map(math.isfinite, s.position_lps_mm)):
            raise InputError(name, "missing or invalid ImagePositionPatient")
        if s.orientation is None or not all(map(math.isfinite, s.orientation)):
            raise InputError(name, "missing or invalid ImageOrientationPatient")
        if s.pixel_spacing_mm is None or not all(map(math.isfinite, s.pixel_spacing_mm)):
            raise InputError(name, "missing or invalid PixelSpacing")
        if min(s.pixel_spacing_mm) <= 0:
            raise InputError(name, f"zero or negative PixelSpacing {list(s.pixel_spacing_mm)} mm")
        if max(s.pixel_spacing_mm) > MAX_SPACING_MM:
            raise InputError(name, f"absurd PixelSpacing {list(s.pixel_spacing_mm)} mm")
        if not s.rows or not s.columns or s.rows < 2 or s.columns < 2 or s.rows > MAX_IN_PLANE or s.columns > MAX_IN_PLANE:
            raise InputError(name, f"absurd image size {s.rows} x {s.columns}")
        if s.bits_allocated not in (8, 16, 32) or s.bits_stored is None or not 1 <= s.bits_stored <= s.bits_allocated:
            raise InputError(name, f"unsupported pixel layout (BitsAllocated {s.bits_allocated}, BitsStored {s.bits_stored})")
        if np.max(np.abs(np.asarray(s.orientation) - np.asarray(first.orientation))) > ORIENTATION_TOLERANCE:
            raise InputError(name, f"slices of mixed orientation in {label} (ImageOrientationPatient differs from {_rel(first.path, root)})")
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(name, f"slices of mixed size in {label} ({s.rows}x{s.columns} vs {first.rows}x{first.columns})")
        if np.max(np.abs(np.asarray(s.pixel_spacing_mm) - np.asarray(first.pixel_spacing_mm))) > 1e-4:
            raise InputError(name, f"slices of mixed pixel spacing in {label}")
        if s.frame_of_reference_uid != first.frame_of_reference_uid:
            raise InputError(name, f"mixed frames of reference in {label} (FrameOfReferenceUID differs from {_rel(first.path, root)})")
        if not (math.isfinite(s.rescale_slope) and math.isfinite(s.rescale_intercept)) or s.rescale_slope == 0:
            raise InputError(name, f"invalid rescale (slope {s.rescale_slope}, intercept {s.rescale_intercept}): HU would be NaN or constant")
        hi = 2 ** s.bits_stored
        bound = abs(s.rescale_slope) * hi + abs(s.rescale_intercept)
        if not math.isfinite(bound) or bound > MAX_ABS_HU:
            raise InputError(name, f"rescale overflows (slope {s.rescale_slope:g}, intercept {s.rescale_intercept:g} give |HU| up to {bound:.3g})")

    o = np.asarray(first.orientation, float)
    row, col = o[:3], o[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(_rel(first.path, root), "ImageOrientationPatient is not two orthogonal unit vectors")
    # like SimpleITK (GDCM/ITK): unit column cosine, row made orthogonal to it, normal their
    # cross product; removes the rounding of the 6-decimal text in ImageOrientationPatient
    col = col / np.linalg.norm(col)
    row = row - (row @ col) * col
    row /= np.linalg.norm(row)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    pos = np.asarray([s.position_lps_mm for s in slices], float)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    pos, dist = pos[order], dist[order]
    n = len(slices)
    if n > MAX_SLICES or n * first.rows * first.columns > MAX_VOXELS:
        raise InputError(label, f"absurd dimensions ({first.columns} x {first.rows} x {n} voxels)")

    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        raise InputError(_rel(b.path, root), f"duplicate slice position in {label}: same position as {_rel(a.path, root)}")
    med = float(np.median(gaps))
    tol = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * med)
    bad = np.flatnonzero(np.abs(gaps - med) > tol)
    if bad.size:
        i = int(bad[0])
        a, b = slices[i], slices[i + 1]
        what = "a slice is missing" if gaps[i] > med else "slices are unevenly spaced"
        raise InputError(label, f"non-uniform slice spacing ({what}): gap of {gaps[i]:.3f} mm between "
                                f"{_rel(a.path, root)} and {_rel(b.path, root)} where the series has {med:.3f} mm")

    span = pos[-1] - pos[0]
    along = float(span @ normal)
    lateral = float(np.linalg.norm(span - along * normal))
    tilt_deg = math.degrees(math.atan2(lateral, abs(along)))
    tilted = tilt_deg > GANTRY_TILT_TOLERANCE_DEG and lateral > 0.05
    if tilted and tilt_deg > MAX_GANTRY_TILT_DEG:
        raise InputError(label, f"slices are sheared by {tilt_deg:.1f} degrees, more than any gantry tilts "
                                f"({MAX_GANTRY_TILT_DEG:g}); the slice positions are inconsistent")

    shift_ij = None
    if tilted:
        # each slice's in-plane offset from the orthogonal stack through slice 0, in pixels
        off = (pos - pos[0]) - np.outer((pos - pos[0]) @ normal, normal)
        shift_ij = np.column_stack([off @ row / first.pixel_spacing_mm[1], off @ col / first.pixel_spacing_mm[0]])
        spacing_k = along / (n - 1)
    else:
        # ITK's ImageSeriesReader: distance from first to last slice over n - 1
        spacing_k = float(np.linalg.norm(span)) / (n - 1)
    if not spacing_k > 0:
        raise InputError(label, f"zero or negative slice spacing ({spacing_k} mm)")
    geometry = {
        "origin_lps_mm": pos[0].copy(),
        "spacing_mm": np.array([first.pixel_spacing_mm[1], first.pixel_spacing_mm[0], spacing_k], float),
        "direction": np.column_stack([row, col, normal]),
        "rows": int(first.rows),
        "columns": int(first.columns),
        "gantry_tilt_deg": float(tilt_deg) if tilted else 0.0,
        "tilt_shift_ij_px": shift_ij,
    }
    return slices, geometry


# ------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------
def _stored_dtype(h: SliceHeader) -> np.dtype:
    signed = h.pixel_representation == 1
    return np.dtype({8: "i1" if signed else "u1", 16: "<i2" if signed else "<u2", 32: "<i4" if signed else "<u4"}[h.bits_allocated])


def _fix_bits(a: np.ndarray, h: SliceHeader) -> np.ndarray:
    """Mask unused high bits (unsigned) or sign-extend from BitsStored (signed)."""
    ba, bs = h.bits_allocated, h.bits_stored
    if bs >= ba:
        return a
    if h.pixel_representation == 1:
        shift = ba - bs
        return (a << shift) >> shift
    return a & np.array((1 << bs) - 1, dtype=a.dtype)


def read_stored_pixels(h: SliceHeader, root: Path | None = None) -> np.ndarray:
    """The stored (un-rescaled) pixel values of one slice, shape (rows, columns).

    Uncompressed little-endian files are read with :func:`numpy.fromfile` at the pixel data
    offset; anything else is decoded by pydicom (pylibjpeg plugins for JPEG 2000/JPEG/RLE).

    Raises
    ------
    InputError
        Truncated file, short pixel data, or a transfer syntax that cannot be decoded.
    """
    name = _rel(h.path, root)
    rows, cols = h.rows, h.columns
    dtype = _stored_dtype(h)
    nbytes = rows * cols * dtype.itemsize
    if h.pixel_offset is not None:
        if h.pixel_length is not None and h.pixel_length < nbytes:
            raise InputError(name, f"pixel data holds {h.pixel_length} bytes, {rows}x{cols} pixels need {nbytes}")
        try:
            with open(h.path, "rb") as f:
                f.seek(h.pixel_offset)
                a = np.fromfile(f, dtype=dtype, count=rows * cols)
        except OSError as e:
            raise InputError(name, f"cannot read pixel data ({e.strerror or e})") from None
        if a.size != rows * cols:
            raise InputError(name, f"truncated file: pixel data has {a.size * dtype.itemsize} of {nbytes} bytes")
        return _fix_bits(a.reshape(rows, cols), h)
    ts = pydicom.uid.UID(h.transfer_syntax_uid)
    ts_name = ts.name if ts.is_valid else h.transfer_syntax_uid
    try:
        ds = pydicom.dcmread(h.path, force=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(name, f"cannot be read ({type(e).__name__}); corrupt or truncated") from None
    try:
        a = ds.pixel_array
    except NotImplementedError:
        raise InputError(name, f"transfer syntax {ts_name} ({h.transfer_syntax_uid}) cannot be decoded by the installed pixel handlers") from None
    except Exception as e:  # noqa: BLE001
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        msg = lines[0][:160]
        if "exceptions were raised by all available plugins" in msg and len(lines) > 1:
            # every installed decoder tried and failed on the data: say what each one found
            raise InputError(name, f"pixel data cannot be decoded ({ts_name}): {'; '.join(lines[1:])[:200]}; "
                                   "corrupt or truncated") from None
        if "no available" in msg.lower() or "plugin" in msg.lower() or "missing required dependencies" in msg.lower():
            raise InputError(name, f"transfer syntax {ts_name} ({h.transfer_syntax_uid}) cannot be decoded: {msg}") from None
        raise InputError(name, f"pixel data cannot be decoded ({ts_name}): {msg}; corrupt or truncated") from None
    if a.shape != (rows, cols):
        raise InputError(name, f"decoded pixel data has shape {a.shape}, header says {rows}x{cols}")
    return a


def read_series_hu(slices: list[SliceHeader], rows: int, columns: int, root: Path | None = None,
                   max_workers: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Stack the slices' pixels as HU (stored * RescaleSlope + RescaleIntercept), float32.

    Parameters
    ----------
    slices : list of SliceHeader
        In the order they go into ``hu[k]``.
    rows, columns : int
    root : Path, optional
        Input folder for naming files in messages.
    max_workers : int, optional
        Threads reading/decoding files (default: min(4, cpu count)).
    out : ndarray, optional
        float32 array of that shape to fill (e.g. a memory-mapped file); default a new one.

    Returns
    -------
    ndarray, shape (len(slices), rows, columns), float32
        ``out`` when given.
    """
    shape = (len(slices), rows, columns)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")

    def one(k: int) -> None:
        h = slices[k]
        a = read_stored_pixels(h, root)
        slope, inter = h.rescale_slope, h.rescale_intercept
        if slope == 1.0 and float(inter).is_integer():
            np.add(a, np.float32(inter), out=out[k], casting="unsafe")
        else:
            out[k] = a * np.float64(slope) + np.float64(inter)

    workers = max_workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(slices) < 4:
        for k in range(len(slices)):
            one(k)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(one, k) for k in range(len(slices))]:
                fut.result()
    return out


def correct_gantry_tilt(hu: np.ndarray, shift_ij_px: np.ndarray, fill_hu: float = -1024.0,
                        out: np.ndarray | None = None) -> np.ndarray:
    """Resample a gantry-tilted (sheared) stack onto the orthogonal grid through slice 0.

    Slice ``k`` of a tilted series lies displaced in its own plane by ``shift_ij_px[k]``
    (columns, rows) from where an untilted stack would put it; the orthogonal grid point
    ``(i, j, k)`` is therefore slice ``k`` sampled at ``(i - di_k, j - dj_k)``, bilinearly.
    The slices themselves are not moved along the normal, so no interpolation across
    slices happens. Points that fall outside a slice's field of view get ``fill_hu``
    (air).

    Parameters
    ----------
    hu : ndarray (nk, nj, ni), float32
    shift_ij_px : ndarray (nk, 2)
        In-plane offsets (along i, along j) in pixels.
    fill_hu : float
        Value outside the acquired field of view.
    out : ndarray (nk, nj, ni), float32, optional
        Where to write the result (not ``hu`` itself); default a new array.

    Returns
    -------
    ndarray (nk, nj, ni), float32
    """
    from scipy import ndimage

    if out is None:
        out = np.empty_like(hu)
    for k in range(hu.shape[0]):
        di, dj = shift_ij_px[k]
        ndimage.shift(hu[k], (dj, di), output=out[k], order=1, mode="constant", cval=fill_hu)
    return out


def load_series(series: SeriesInfo, reason: str = "", root: Path | None = None,
                allocate=None) -> Volume:
    """Load one scanned series as a Volume in HU (see :func:`load_study` for geometry;
    ``allocate`` as there)."""
    slices, g = sort_slices(series, root)
    shape = (len(slices), g["rows"], g["columns"])
    tilted = g["tilt_shift_ij_px"] is not None
    hu = read_series_hu(slices, g["rows"], g["columns"], root,
                        out=allocate(shape) if allocate is not None and not tilted else None)
    if tilted:
        hu = correct_gantry_tilt(hu, g["tilt_shift_ij_px"],
                                 out=allocate(shape) if allocate is not None else None)
        tilt_note = (f" Gantry tilt of {g['gantry_tilt_deg']:.2f} degrees: slices were shifted in-plane "
                     "(bilinear) onto an orthogonal grid; voxels outside the acquired field of view are air.")
        reason = (reason or f"Loaded {series.label()}.") + tilt_note
    meta = {
        "modality": series.modality or None,
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "series_description": series.description,
        "convolution_kernel": series.kernel,
        "slice_thickness_mm": series.slice_thickness_mm,
        "sop_class_uid": series.sop_class_uid,
        "sop_instance_uids": [s.sop_instance_uid for s in slices],
        "source_paths": [str(Path(s.path).resolve()) for s in slices],
        "selection_reason": reason or f"Loaded {series.label()}.",
        "input_kind": "dicom",
        "manufacturer": series.manufacturer,
        "series_number": series.series_number,
        "image_type": list(series.image_type),
        "transfer_syntax_uid": slices[0].transfer_syntax_uid,
        "gantry_tilt_deg": g["gantry_tilt_deg"],
    }
    return Volume(hu=hu, origin_lps_mm=g["origin_lps_mm"], spacing_mm=g["spacing_mm"],
                  direction=g["direction"], meta=meta)


__all__ = ["correct_gantry_tilt", "is_nifti_path", "load_dicom_folder", "load_series", "load_study", "read_series_hu",
           "read_stored_pixels", "sort_slices"]
