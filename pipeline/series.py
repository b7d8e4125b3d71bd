"""Find the DICOM series in a study folder and pick the one fit for bone and hardware.

Two ideas live here:

* :func:`scan_dicom_folder` reads every file's header once (pydicom, ``stop_before_pixels``)
  and groups the slices into :class:`SeriesInfo` values. It remembers, for uncompressed
  files, where the pixel values start, so :mod:`pipeline.loading` can read them straight
  from disk without parsing the header a second time.
* :func:`select_series` ranks the series for bone/hardware analysis and explains its choice
  in one sentence (CLINICAL.md, "Acquisition facts to design for": spine CT is about 1 mm,
  bone kernel; a study often also holds a localizer and soft-tissue or thick reformats).

Nothing here reads or reports patient identifiers: only technical header fields are kept.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial

from pipeline.errors import InputError

#: Transfer syntaxes whose pixel values :mod:`pipeline.loading` reads directly from the file.
NATIVE_LITTLE_ENDIAN = {
    "1.2.840.10008.1.2": True,     # Implicit VR Little Endian (implicit -> True)
    "1.2.840.10008.1.2.1": False,  # Explicit VR Little Endian
}

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR

#: The only header elements the scan converts (pydicom still walks every element to find
#: the pixel data offset, but skips building the rest: about 1.6x faster on real headers).
HEADER_TAGS = [
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "Modality", "Manufacturer",
    "SeriesDescription", "SliceThickness", "ConvolutionKernel", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesNumber", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "FrameOfReferenceUID", "SamplesPerPixel", "NumberOfFrames", "Rows", "Columns", "PixelSpacing",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    "DirectoryRecordSequence",
]
_PIXEL_DATA_TAG = 0x7FE00010
_FLOAT_PIXEL_TAGS = {0x7FE00008, 0x7FE00009}

# --------------------------------------------------------------------------------------
# Reconstruction kernels counted as bone / sharp (preferred for screws, halo and bridging).
# Sources: vendor kernel tables (Siemens B/Br/I/J/H/U/Q family with sharpness >= 60 and
# "Hr"/"Ur" bone kernels; GE BONE, BONEPLUS, EDGE, LUNG; Philips D, E, L, YC, YD, YE, YF;
# Canon/Toshiba FC30-FC39 (bone), FC50-FC59 (lung), FC80-FC89 (high-resolution bone)).
# Anything not matched counts as soft/standard; the thinnest series is then chosen.
# --------------------------------------------------------------------------------------
BONE_KERNEL_PATTERNS: tuple[str, ...] = (
    r"BONE",                        # GE BONE, BONEPLUS; generic "bone" names
    r"EDGE",                        # GE EDGE
    r"SHARP",                       # generic
    r"LUNG",                        # GE LUNG (sharp)
    r"^[BIJHQUTV][RFSVHOEA]?(6\d|7\d|8\d|9\d)",  # Siemens B60f, Br64, I70f, J70h, Hr68, Ur77, Qr69
    r"^(D|E|L|YC|YD|YE|YF|H)$",     # Philips sharp/bone letters (and bare H)
    r"^FC(3\d|5\d|8\d)",            # Canon/Toshiba bone, lung, high-res bone
)
_BONE_KERNEL_RE = [re.compile(p, re.IGNORECASE) for p in BONE_KERNEL_PATTERNS]


def is_bone_kernel(kernel: str | None) -> bool:
    """True when ``kernel`` (ConvolutionKernel text) is in :data:`BONE_KERNEL_PATTERNS`."""
    if not kernel:
        return False
    k = kernel.strip()
    return any(rx.search(k) for rx in _BONE_KERNEL_RE)


@dataclass(frozen=True)
class SliceHeader:
    """The header facts of one image file that loading needs (no patient identifiers).

    ``pixel_offset`` is the byte offset of the first pixel value for uncompressed
    little-endian files (``None`` otherwise, or when the file has no pixel data);
    ``pixel_length`` the declared length of the pixel data element (``None`` when
    encapsulated/undefined).
    """

    path: str
    sop_instance_uid: str
    position_lps_mm: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    rows: int | None
    columns: int | None
    pixel_spacing_mm: tuple[float, float] | None
    rescale_slope: float
    rescale_intercept: float
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    samples_per_pixel: int
    number_of_frames: int
    transfer_syntax_uid: str
    has_pixel_data: bool
    pixel_offset: int | None
    pixel_length: int | None
    frame_of_reference_uid: str
    instance_number: int | None


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder: technical description plus its slice headers.

    The first-file fields (modality, image_type, ...) describe the series; ``slices`` keeps
    every file's header in scan order (loading sorts them by position, never by name).
    ``corrupt_paths`` lists files of this series that looked like DICOM but failed to parse.
    """

    uid: str
    modality: str
    image_type: tuple[str, ...]
    description: str
    kernel: str
    slice_thickness_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    series_number: int | None
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    manufacturer: str
    slices: list[SliceHeader] = field(default_factory=list)
    corrupt_paths: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        """Number of readable image files in the series."""
        return len(self.slices)

    @property
    def paths(self) -> list[str]:
        """File paths in scan order."""
        return [s.path for s in self.slices]

    @property
    def is_localizer(self) -> bool:
        """ImageType says LOCALIZER (scout/topogram)."""
        return "LOCALIZER" in self.image_type

    @property
    def is_original_primary(self) -> bool:
        """ORIGINAL and PRIMARY, and not marked as a reformat (an empty ImageType counts as original)."""
        it = self.image_type
        if not it:
            return True
        derived = {"DERIVED", "SECONDARY", "REFORMATTED", "MPR", "MIP", "VOLUME", "PROJECTION IMAGE"}
        return it[0] == "ORIGINAL" and (len(it) < 2 or it[1] == "PRIMARY") and not derived & set(it)

    @property
    def is_axial(self) -> bool:
        """The slice normal lies within about 37 degrees of the patient's long (S-I) axis
        (gantry-tilted axial series tilt up to about 30 degrees)."""
        n = _normal(self.orientation)
        return n is not None and abs(n[2]) >= 0.8

    @property
    def slice_spacing_mm(self) -> float | None:
        """Median distance between neighbouring slice positions along the normal."""
        n = _normal(self.orientation)
        pos = [s.position_lps_mm for s in self.slices if s.position_lps_mm is not None]
        if n is None or len(pos) < 2:
            return None
        d = np.sort(np.asarray(pos) @ n)
        gaps = np.diff(d)
        gaps = gaps[gaps > 1e-3]
        return float(np.median(gaps)) if gaps.size else None

    @property
    def effective_thickness_mm(self) -> float:
        """SliceThickness when recorded, else the slice spacing, else infinity (ranks last)."""
        if self.slice_thickness_mm and self.slice_thickness_mm > 0:
            return float(self.slice_thickness_mm)
        sp = self.slice_spacing_mm
        return sp if sp else math.inf

    def label(self) -> str:
        """How messages name the series: number and description (no UIDs, no patient data)."""
        num = f"#{self.series_number} " if self.series_number is not None else ""
        desc = self.description or "(no description)"
        return f"series {num}'{desc}'"


class SeriesList(list):
    """``list[SeriesInfo]`` that also remembers what the scan skipped.

    Attributes
    ----------
    folder : str
    n_files : int
        Regular files seen.
    non_dicom_paths : list of str
        Files skipped quietly (no DICOM preamble and not parseable as raw DICOM).
    corrupt_paths : list of str
        Files with a DICOM preamble that failed to parse and could not be given to a series.
    """

    def __init__(self, items=(), folder: str = "", n_files: int = 0,
                 non_dicom_paths=None, corrupt_paths=None):
        super().__init__(items)
        self.folder = folder
        self.n_files = n_files
        self.non_dicom_paths = list(non_dicom_paths or [])
        self.corrupt_paths = list(corrupt_paths or [])


# ------------------------------------------------------------------------------------------
# header reading
# ------------------------------------------------------------------------------------------
def _normal(orientation) -> np.ndarray | None:
    if orientation is None or len(orientation) != 6:
        return None
    o = np.asarray(orientation, float)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if not np.isfinite(norm) or norm < 1e-6:
        return None
    return n / norm


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        if value is None:
            return None
        vals = tuple(float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]))
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == count else None


def _float(value, default=None):
    try:
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value, default=None):
    try:
        if value is None or value == "":
            return default
        return int(value)
    except (TypeError, ValueError):
        return default


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A file without preamble that starts with a group 0002 or 0008 little-endian tag."""
    if len(head) < 8:
        return False
    group, elem = struct.unpack("<HH", head[:4])
    return group in (0x0002, 0x0008) and elem < 0x0100


def _pixel_element(f, ds, transfer_syntax: str) -> tuple[bool, int | None, int | None, bool]:
    """After ``stop_before_pixels``, read the element header at the file position.

    Returns (has_pixel_data, value_offset_or_None, length_or_None, float_pixels).
    """
    if transfer_syntax in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):
        # deflated / big endian: the file bytes here are not a little-endian element
        # header; pydicom inflates or byte-swaps and decodes the pixels later
        return True, None, None, False
    head = f.read(12)
    if len(head) < 8:
        return False, None, None, False
    group, elem = struct.unpack("<HH", head[:4])
    tag = group << 16 | elem
    if tag in _FLOAT_PIXEL_TAGS:
        return False, None, None, True
    if tag != _PIXEL_DATA_TAG:
        return False, None, None, False
    start = f.tell() - len(head)
    implicit = NATIVE_LITTLE_ENDIAN.get(transfer_syntax)
    if implicit is None:
        # compressed / big endian / deflated: pydicom decodes it later
        return True, None, None, False
    if implicit:
        length = struct.unpack("<I", head[4:8])[0]
        offset = start + 8
    else:
        if len(head) < 12:
            return True, None, None, False
        length = struct.unpack("<I", head[8:12])[0]
        offset = start + 12
    if length == 0xFFFFFFFF:
        return True, None, None, False
    return True, offset, length, False


def read_slice_header(path: str | Path) -> tuple[str, pydicom.Dataset | None, SliceHeader | None]:
    """Read one file's header.

    Returns
    -------
    status : {"dicom", "non_dicom", "corrupt"}
    dataset : the header dataset (pixel data not read) or None
    header : :class:`SliceHeader` or None
    """
    path = str(path)
    preamble = False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            preamble = len(head) >= 132 and head[128:132] == b"DICM"
            if not preamble and not _looks_like_raw_dicom(head):
                return "non_dicom", None, None
            f.seek(0)
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=not preamble, specific_tags=HEADER_TAGS)
            except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error, OSError,
                    IndexError, TypeError, NotImplementedError, AttributeError):
                return ("corrupt" if preamble else "non_dicom"), None, None
            ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
            if not ts:
                ts = "1.2.840.10008.1.2"  # no meta header: DICOM default (implicit VR LE)
            has_px, offset, length, _float_px = _pixel_element(f, ds, ts)
    except OSError:
        return "non_dicom", None, None
    except Exception:  # noqa: BLE001 - pydicom converts values lazily: a malformed one raises late
        return ("corrupt" if preamble else "non_dicom"), None, None
    try:
        if "SeriesInstanceUID" not in ds:
            media_class = _text(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID"))
            if media_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
                return "non_dicom", None, None  # a DICOMDIR index: not an image, skip quietly
            # every image (and SR/PR) has this tag; a preamble file without it was cut short
            return ("corrupt" if preamble else "non_dicom"), None, None
        sop_uid = _text(ds.get("SOPInstanceUID")) or _text(getattr(ds, "file_meta", {}).get("MediaStorageSOPInstanceUID"))
        for keyword in ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "ImageType",
                        "ConvolutionKernel", "SliceThickness", "StudyInstanceUID", "SOPClassUID", "Manufacturer"):
            _text(ds.get(keyword))  # convert now: scan_dicom_folder reads these for the series
    except Exception:  # noqa: BLE001 - a malformed value makes the file corrupt
        return ("corrupt" if preamble else "non_dicom"), None, None
    try:
        # touching values forces pydicom to convert them; a malformed value raises here
        hdr = SliceHeader(
            path=path,
            sop_instance_uid=sop_uid,
            position_lps_mm=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            rows=_int(ds.get("Rows")),
            columns=_int(ds.get("Columns")),
            pixel_spacing_mm=_floats(ds.get("PixelSpacing"), 2),
            rescale_slope=_float(ds.get("RescaleSlope"), 1.0),
            rescale_intercept=_float(ds.get("RescaleIntercept"), 0.0),
            bits_allocated=_int(ds.get("BitsAllocated")),
            bits_stored=_int(ds.get("BitsStored")),
            pixel_representation=_int(ds.get("PixelRepresentation")),
            samples_per_pixel=_int(ds.get("SamplesPerPixel"), 1),
            number_of_frames=_int(ds.get("NumberOfFrames"), 1) or 1,
            transfer_syntax_uid=ts,
            has_pixel_data=has_px,
            pixel_offset=offset,
            pixel_length=length,
            frame_of_reference_uid=_text(ds.get("FrameOfReferenceUID")),
            instance_number=_int(ds.get("InstanceNumber")),
        )
    except Exception:  # noqa: BLE001 - any malformed header value makes the file corrupt
        return "corrupt", None, None
    return "dicom", ds, hdr


def _series_uid_of_corrupt(path: str) -> str | None:
    """Best effort: the SeriesInstanceUID of a file whose full header failed to parse."""
    try:
        with open(path, "rb") as f:
            ds = read_partial(f, stop_when=lambda tag, vr, length: tag > 0x0020000E)
        uid = ds.get("SeriesInstanceUID")
        return None if uid is None else _text(uid)
    except Exception:  # noqa: BLE001
        return None


def _series_key(ds) -> tuple:
    uid = _text(ds.get("SeriesInstanceUID"))
    if uid:
        return (uid,)
    # de-identified data with an empty UID: keep separate series apart by number/description
    return ("", _text(ds.get("SeriesNumber")), _text(ds.get("SeriesDescription")))


def _iter_files(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                yield p


def scan_dicom_folder(path: str | Path) -> SeriesList:
    """Group the DICOM files under ``path`` (any nesting, any names) into series.

    Each file's header is read once with pydicom (``stop_before_pixels``). Files without a
    DICOM preamble that do not parse as raw DICOM are skipped quietly and counted; a file
    with the ``DICM`` preamble that fails to parse is remembered as corrupt (given to its
    series when its SeriesInstanceUID can still be read).

    Parameters
    ----------
    path : str or Path
        A folder.

    Returns
    -------
    SeriesList
        A list of :class:`SeriesInfo` (largest series first) with ``non_dicom_paths`` and
        ``corrupt_paths`` (unattributed) attributes.

    Raises
    ------
    InputError
        When ``path`` is not a folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    groups: dict[tuple, SeriesInfo] = {}
    non_dicom: list[str] = []
    corrupt: list[str] = []
    n_files = 0
    for p in _iter_files(folder):
        n_files += 1
        status, ds, hdr = read_slice_header(p)
        if status == "non_dicom":
            non_dicom.append(p)
            continue
        if status == "corrupt":
            corrupt.append(p)
            continue
        key = _series_key(ds)
        info = groups.get(key)
        if info is None:
            kernel = ds.get("ConvolutionKernel")
            if isinstance(kernel, (list, tuple, pydicom.multival.MultiValue)):
                kernel = kernel[0] if len(kernel) else ""
            info = SeriesInfo(
                uid=key[0],
                modality=_text(ds.get("Modality")).upper(),
                image_type=tuple(v.strip().upper() for v in (ds.get("ImageType") or [])),
                description=_text(ds.get("SeriesDescription")),
                kernel=_text(kernel),
                slice_thickness_mm=_float(ds.get("SliceThickness")),
                pixel_spacing_mm=hdr.pixel_spacing_mm,
                orientation=hdr.orientation,
                series_number=_int(ds.get("SeriesNumber")),
                study_instance_uid=_text(ds.get("StudyInstanceUID")),
                frame_of_reference_uid=hdr.frame_of_reference_uid,
                sop_class_uid=_text(ds.get("SOPClassUID")),
                manufacturer=_text(ds.get("Manufacturer")),
            )
            groups[key] = info
        info.slices.append(hdr)
    unattributed = []
    by_uid = {s.uid: s for s in groups.values() if s.uid}
    for p in corrupt:
        uid = _series_uid_of_corrupt(p)
        if uid and uid in by_uid:
            by_uid[uid].corrupt_paths.append(p)
        else:
            unattributed.append(p)
    series = sorted(groups.values(), key=lambda s: -s.n_files)
    return SeriesList(series, folder=str(folder), n_files=n_files,
                      non_dicom_paths=non_dicom, corrupt_paths=unattributed)


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------
def _describe(s: SeriesInfo) -> str:
    th = s.effective_thickness_mm
    th_txt = f"{th:g} mm" if math.isfinite(th) else "unknown-thickness"
    kind = "original axial" if (s.is_original_primary and s.is_axial) else (
        "reformat/derived" if not s.is_original_primary else "non-axial")
    kern = f"kernel {s.kernel}" if s.kernel else "no kernel recorded"
    return f"{s.label()} ({s.modality or 'no modality'}, {kind}, {th_txt} slices, {kern}, {s.n_files} images)"


def _why_not(s: SeriesInfo, chosen: SeriesInfo) -> str:
    if s.modality != "CT":
        return f"{s.label()}: {s.modality or 'no modality'}, not CT"
    if s.is_localizer:
        return f"{s.label()}: localizer"
    if s.n_files < 2:
        return f"{s.label()}: single image"
    reasons = []
    if not (s.is_original_primary and s.is_axial) and (chosen.is_original_primary and chosen.is_axial):
        reasons.append("reformat/derived" if not s.is_original_primary else "not axial")
    if s.effective_thickness_mm > chosen.effective_thickness_mm + 1e-3:
        reasons.append(f"thicker slices ({s.effective_thickness_mm:g} mm)")
    if is_bone_kernel(chosen.kernel) and not is_bone_kernel(s.kernel):
        reasons.append(f"soft kernel ({s.kernel or 'none recorded'})")
    if not reasons:
        reasons.append(f"fewer images ({s.n_files})" if s.n_files < chosen.n_files else "ranked lower")
    return f"{s.label()}: {', '.join(reasons)}"


def select_series(series: list[SeriesInfo]) -> tuple[SeriesInfo, str]:
    """Pick the series fit for bone and hardware analysis.

    Rules, in order (CLINICAL.md, acquisition facts; CONTRACT.md "INPUT"):

    1. CT only; localizers (ImageType LOCALIZER) and single images never.
    2. ORIGINAL/PRIMARY axial series beat DERIVED/SECONDARY, reformatted or non-axial ones.
    3. Among those, the "thin" series are the ones whose slices are at most 1.5x as thick
       as the thinnest; within them a bone/sharp kernel (:data:`BONE_KERNEL_PATTERNS`) wins
       (so a 1 mm bone series beats a 0.75 mm soft one, but a 3 mm bone series does not
       beat a 1 mm soft one), then thinner slices, then more slices.

    Parameters
    ----------
    series : list of SeriesInfo
        As returned by :func:`scan_dicom_folder`.

    Returns
    -------
    chosen : SeriesInfo
    reason : str
        One sentence naming the chosen series, why, and the series passed over.

    Raises
    ------
    InputError
        No CT series, only localizers, or only single-image CT series.
    """
    if not series:
        raise InputError("study", "no DICOM series found")
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        mods = sorted({s.modality or "no modality" for s in series})
        raise InputError(series[0].label(), f"not CT (modality {', '.join(mods)}); fusionct analyzes CT only")
    candidates = [s for s in ct if not s.is_localizer and s.n_files >= 2]
    if not candidates:
        s = ct[0]
        if s.is_localizer:
            raise InputError(s.label(), "only a CT localizer (scout) was found, no CT volume")
        raise InputError(s.label(), "single slice; a CT volume needs at least 2 slices")

    top = [s for s in candidates if s.is_original_primary and s.is_axial] or candidates
    thinnest = min(s.effective_thickness_mm for s in top)
    limit = thinnest * 1.5 + 1e-3 if math.isfinite(thinnest) else math.inf
    thin = [s for s in top if s.effective_thickness_mm <= limit]
    chosen = max(thin, key=lambda s: (is_bone_kernel(s.kernel), -round(s.effective_thickness_mm, 3), s.n_files))

    why = []
    if chosen.is_original_primary and chosen.is_axial:
        why.append("original axial CT")
    else:
        why.append("CT (no original axial series available)")
    if is_bone_kernel(chosen.kernel):
        why.append("bone/sharp kernel")
    if len(thin) == 1 or chosen.effective_thickness_mm <= thinnest + 1e-3:
        why.append("thinnest slices")
    reason = f"Picked {_describe(chosen)} as the {', '.join(why)}"
    others = [s for s in series if s is not chosen]
    if others:
        reason += "; passed over " + "; ".join(_why_not(s, chosen) for s in others)
    return chosen, reason + "."


__all__ = ["BONE_KERNEL_PATTERNS", "SeriesInfo", "SeriesList", "SliceHeader", "is_bone_kernel",
           "read_slice_header", "scan_dicom_folder", "select_series"]
