"""Write a phantom as a real DICOM CT study (bone series, localizer, thick soft series).

The files look like a scanner export: CT Image Storage, int16 pixels with RescaleSlope /
RescaleIntercept, one file per slice, random file names in nested folders written in
shuffled order, the three series of one study mixed in the same folders. UIDs are
deterministic (derived from the spec), so the same spec always gives the same study.
The patient module is fake but realistic so tests can check no identifier leaks into logs.
``truth.json`` (not DICOM) sits at the study folder's root.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.volume import Volume
from sample_data.phantom import PhantomSpec, _plain, _rng, make_phantom, prior_study_date

PATIENT_NAME = "PHANTOM^FUSION"
PATIENT_BIRTH_DATE = "19580312"
MANUFACTURER = "fusionct phantom"
INTERCEPT = -1024.0
SOFT_SLICE_MM = 5.0


def patient_id(seed: int) -> str:
    """The fake PatientID of a seed (``FCT-0007``)."""
    return f"FCT-{int(seed) % 10000:04d}"


def _spec_key(spec: PhantomSpec) -> str:
    """A stable digest of the spec: different specs, different studies."""
    d = _plain(asdict(spec))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _uid(spec_key: str, *what) -> str:
    return generate_uid(entropy_srcs=[spec_key, *map(str, what)])


def _base_dataset(spec: PhantomSpec, uids: dict, when: _dt.datetime) -> Dataset:
    """Patient, study, equipment and frame-of-reference modules shared by every file."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id(spec.findings_seed)
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = f"{when.year - 1958:03d}Y"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.StudyID = f"{int(spec.seed) % 100000}"
    ds.AccessionNumber = f"ACC{int(spec.seed) % 1000000:06d}"
    ds.ReferringPhysicianName = "REFERRER^DOCTOR"
    ds.StudyDescription = "CT LUMBAR SPINE POST FUSION"
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = "PHANTOM GENERAL HOSPITAL"
    ds.StationName = "PHANTOMCT1"
    ds.SoftwareVersions = "fusionct sample_data 1"
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "LSPINE"
    ds.KVP = 120
    ds.XRayTubeCurrent = 250
    ds.ExposureTime = 1000
    ds.Exposure = 250
    ds.PatientPosition = "FFS" if spec.feet_first else "HFS"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.AcquisitionDate = ds.StudyDate
    return ds


def _image_dataset(base: Dataset, series: dict, sop_uid: str, pixels_hu: np.ndarray,
                   ipp, iop, pixel_spacing_rc, instance: int) -> Dataset:
    """One CT image: int16 stored values, HU = stored * 1 + INTERCEPT."""
    ds = Dataset()
    ds.update(base)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["fusionct sample_data"])
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series["uid"]
    ds.SeriesNumber = series["number"]
    ds.SeriesDescription = series["description"]
    ds.ImageType = series["image_type"]
    ds.ConvolutionKernel = series["kernel"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
    ds.PixelSpacing = [round(float(v), 6) for v in pixel_spacing_rc]
    if series.get("slice_thickness") is not None:
        ds.SliceThickness = series["slice_thickness"]
        ds.SpacingBetweenSlices = series["slice_spacing"]
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        ds.SliceLocation = round(float(np.asarray(ipp, float) @ normal), 4)
    else:
        ds.SliceThickness = None
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels_hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = 1.0
    if "LOCALIZER" not in series["image_type"]:
        ds.RescaleType = "HU"
    ds.WindowCenter = series["window"][0]
    ds.WindowWidth = series["window"][1]
    stored = np.clip(np.rint(pixels_hu - INTERCEPT), -32768, 32767).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def _soft_series(vol: Volume) -> tuple[np.ndarray, float, int]:
    """Thick soft-tissue reconstruction: SOFT_SLICE_MM slabs of the bone series, with a mild
    in-plane smoothing (a standard kernel). Returns (slabs[k, j, i], thickness, slices per slab)."""
    from scipy import ndimage

    sz = float(vol.spacing_mm[2])
    per = max(1, int(round(SOFT_SLICE_MM / sz)))
    nk = vol.hu.shape[0] // per
    slabs = vol.hu[: nk * per].reshape(nk, per, *vol.hu.shape[1:]).mean(axis=1)
    slabs = ndimage.gaussian_filter(slabs, (0, 1.0, 1.0))
    return slabs, per * sz, per


def _localizer(vol: Volume) -> tuple[np.ndarray, np.ndarray, list, list]:
    """An AP projection (coronal scout): rows run head to feet, columns right to left.
    Returns (image, ipp, iop, pixel spacing [row, col])."""
    hu = vol.hu
    d = vol.direction
    # back to head-first canonical order (k towards +z, i towards +x)
    if d[2, 2] < 0:
        hu = hu[::-1]
    if d[0, 0] < 0:
        hu = hu[:, :, ::-1]
    proj = np.clip(hu, -1000, None).mean(axis=1)  # [k, i]
    img = proj[::-1]  # first row = most superior
    nk, ni = hu.shape[0], hu.shape[2]
    corners = vol.ijk_to_lps(np.array([[0, 0, 0], [vol.shape_ijk[0] - 1, vol.shape_ijk[1] - 1,
                                                     vol.shape_ijk[2] - 1]]))
    x_min = corners[:, 0].min()
    z_max = corners[:, 2].max()
    y_mid = 0.5 * (corners[0, 1] + corners[1, 1])
    ipp = np.array([x_min, y_mid, z_max])
    iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    sp = [float(vol.spacing_mm[2]), float(vol.spacing_mm[0])]
    return img, ipp, iop, sp


def write_dicom_study(spec: PhantomSpec, outdir, *, extra_series: bool = True) -> Path:
    """Write the phantom of ``spec`` as a DICOM study under ``outdir`` plus ``truth.json``.

    Parameters
    ----------
    spec : PhantomSpec
    outdir : path
        Created if needed; files go into random nested folders below it.
    extra_series : bool
        Also write a localizer (one projection image) and a 5 mm soft-tissue series.

    Returns
    -------
    Path
        ``outdir``. ``truth.json`` there holds the truth of ``make_phantom`` plus a ``dicom``
        section (study/series UIDs, descriptions, file counts).
    """
    vol, truth = make_phantom(spec)
    return write_volume_study(vol, truth, spec, outdir, extra_series=extra_series)


def write_volume_study(vol: Volume, truth: dict, spec: PhantomSpec, outdir, *,
                       extra_series: bool = True) -> Path:
    """Write an already made phantom (``make_phantom(spec)``) as a DICOM study; see
    ``write_dicom_study``. Saves making the phantom twice when a test needs both."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    truth = dict(truth)
    key = _spec_key(spec)
    uids = {"study": _uid(key, "study"), "frame": _uid(key, "frame")}
    day = prior_study_date(spec)
    when = _dt.datetime(int(day[:4]), int(day[4:6]), int(day[6:]), 9, 30, 0)
    base = _base_dataset(spec, uids, when)
    rng = _rng(spec.seed, "files", key)
    files: list[tuple[Dataset, str]] = []
    sx, sy, sz = (float(s) for s in vol.spacing_mm)
    d = vol.direction
    iop = [*d[:, 0], *d[:, 1]]

    bone = {"uid": _uid(key, "series", "bone"), "number": 2, "description": "LSPINE BONE 1.0",
            "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"], "kernel": "BONE",
            "slice_thickness": round(sz, 4), "slice_spacing": round(sz, 4), "window": [500, 2000]}
    bone["description"] = f"LSPINE BONE {sz:g}mm"
    for k in range(vol.hu.shape[0]):
        ipp = vol.ijk_to_lps([0, 0, k])
        files.append((_image_dataset(base, bone, _uid(key, "sop", "bone", k), vol.hu[k], ipp, iop,
                                     (sy, sx), k + 1), "bone"))
    series_info = [{"role": "bone", "uid": bone["uid"], "description": bone["description"],
                    "kernel": "BONE", "image_type": bone["image_type"],
                    "n_files": int(vol.hu.shape[0]), "slice_thickness_mm": sz}]
    if extra_series:
        loc_img, loc_ipp, loc_iop, loc_sp = _localizer(vol)
        loc = {"uid": _uid(key, "series", "localizer"), "number": 1, "description": "TOPOGRAM",
               "image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "kernel": "STANDARD",
               "slice_thickness": None, "window": [40, 1200]}
        files.append((_image_dataset(base, loc, _uid(key, "sop", "localizer"), loc_img, loc_ipp,
                                     loc_iop, loc_sp, 1), "localizer"))
        slabs, thick, per = _soft_series(vol)
        soft = {"uid": _uid(key, "series", "soft"), "number": 3,
                "description": f"LSPINE SOFT {thick:g}mm",
                "image_type": ["DERIVED", "SECONDARY", "AXIAL"], "kernel": "STANDARD",
                "slice_thickness": round(thick, 4), "slice_spacing": round(thick, 4),
                "window": [40, 400]}
        for k in range(slabs.shape[0]):
            ipp = vol.ijk_to_lps([0, 0, k * per + 0.5 * (per - 1)])
            files.append((_image_dataset(base, soft, _uid(key, "sop", "soft", k), slabs[k], ipp,
                                         iop, (sy, sx), k + 1), "soft"))
        series_info += [
            {"role": "localizer", "uid": loc["uid"], "description": loc["description"],
             "kernel": "STANDARD", "image_type": loc["image_type"], "n_files": 1,
             "slice_thickness_mm": None},
            {"role": "soft", "uid": soft["uid"], "description": soft["description"],
             "kernel": "STANDARD", "image_type": soft["image_type"],
             "n_files": int(slabs.shape[0]), "slice_thickness_mm": thick}]

    # random nested folders and names, written in shuffled order
    folders = [Path(f"D{rng.integers(0, 10**6):06d}") / f"S{rng.integers(0, 10**4):04d}"
               for _ in range(3)]
    order = rng.permutation(len(files))
    used = set()
    for n in order:
        ds, _role = files[n]
        while True:
            name = f"{rng.integers(0, 16**8):08X}"
            if name not in used:
                used.add(name)
                break
        folder = outdir / folders[int(rng.integers(len(folders)))]
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / name, enforce_file_format=True)

    truth["dicom"] = {
        "study_instance_uid": uids["study"],
        "frame_of_reference_uid": uids["frame"],
        "patient_position": "FFS" if spec.feet_first else "HFS",
        "series": series_info,
        "bone_series_uid": bone["uid"],
        "n_files": len(files),
    }
    (outdir / "truth.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return outdir


def read_truth(study_dir) -> dict:
    """The truth.json written beside a phantom study."""
    return json.loads((Path(study_dir) / "truth.json").read_text(encoding="utf-8"))


__all__ = ["write_dicom_study", "write_volume_study", "read_truth", "patient_id", "PATIENT_NAME", "MANUFACTURER"]
