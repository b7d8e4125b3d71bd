"""Write a plain synthetic CT series and time loading it (for benchmarks and loader tests).

Not imported by :mod:`pipeline.loading`. ``time_loading`` compares :func:`load_study`
with SimpleITK's ``ImageSeriesReader`` and with a plain pydicom loop on the same folder::

    from pipeline.loading_bench import write_ct_series, time_loading
    write_ct_series("/tmp/ct400", shape_kji=(400, 512, 512))
    print(time_loading("/tmp/ct400"))

or simply ``python -m pipeline.loading_bench`` (512x512x400, realistic headers).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_series(outdir: str | Path, shape_kji=(40, 64, 64), *, stored=None,
                    origin_lps_mm=(-100.0, -120.0, -300.0), spacing_mm=(0.8, 0.8, 1.0),
                    row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0), slice_step_lps_mm=None,
                    rescale_slope=1.0, rescale_intercept=-1024.0, signed=False,
                    modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"), kernel="B70f",
                    description="Spine 1.0 bone", series_number=3, slice_thickness_mm=None,
                    study_uid=None, series_uid=None, frame_uid=None,
                    transfer_syntax=ExplicitVRLittleEndian, names="shuffled", seed=0,
                    realistic_header: bool = False,
                    edit: Callable[[int, Dataset], None] | None = None) -> list[Path]:
    """Write one CT series of single-frame files; returns the paths in slice (k) order.

    Parameters
    ----------
    outdir : folder (created).
    shape_kji : (nk, nj, ni) used when ``stored`` is None (a seeded random-ish pattern).
    stored : ndarray (nk, nj, ni) of stored integer values, optional.
    origin_lps_mm, spacing_mm (i, j, k), row_dir, col_dir : geometry; slice k sits at
        ``origin + k * slice_step_lps_mm`` where the step defaults to ``spacing_k * normal``.
    names : "shuffled" (random file names, random order), "ordered" or "reversed".
    edit : called as ``edit(k, dataset)`` before each file is written (for bad inputs).
    transfer_syntax : any syntax pydicom can encode (native, RLE, JPEG 2000 lossless, ...).
    realistic_header : add the ~120 further elements (and an 8 KB private block) a scanner's
        CT header carries, so header parsing costs what it costs on real exports.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if stored is None:
        nk, nj, ni = shape_kji
        base = (np.add.outer(np.arange(nj), np.arange(ni)) % 400).astype(np.int32)
        stored = np.empty((nk, nj, ni), np.int32)
        for k in range(nk):
            stored[k] = base + 7 * k
        stored = stored + 24  # keep values positive for unsigned storage
    stored = np.asarray(stored)
    nk, nj, ni = stored.shape
    row = np.asarray(row_dir, float)
    col = np.asarray(col_dir, float)
    normal = np.cross(row, col)
    step = np.asarray(slice_step_lps_mm, float) if slice_step_lps_mm is not None else spacing_mm[2] * normal
    study_uid = generate_uid() if study_uid is None else study_uid
    series_uid = generate_uid() if series_uid is None else series_uid
    frame_uid = generate_uid() if frame_uid is None else frame_uid
    dtype = np.int16 if signed else np.uint16

    ds0 = Dataset()
    ds0.SOPClassUID = CTImageStorage
    ds0.Modality = modality
    ds0.ImageType = list(image_type)
    ds0.Manufacturer = "SYNTHETIC"
    ds0.StudyInstanceUID = study_uid
    ds0.SeriesInstanceUID = series_uid
    ds0.FrameOfReferenceUID = frame_uid
    ds0.SeriesNumber = series_number
    ds0.SeriesDescription = description
    if kernel is not None:
        ds0.ConvolutionKernel = kernel
    ds0.SliceThickness = f"{slice_thickness_mm if slice_thickness_mm is not None else spacing_mm[2]:g}"
    ds0.PatientPosition = "FFS" if normal[2] < 0 else "HFS"
    ds0.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
    ds0.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[0]:g}"]
    ds0.Rows, ds0.Columns = nj, ni
    ds0.SamplesPerPixel = 1
    ds0.PhotometricInterpretation = "MONOCHROME2"
    ds0.BitsAllocated = 16
    ds0.BitsStored = 16
    ds0.HighBit = 15
    ds0.PixelRepresentation = 1 if signed else 0
    ds0.RescaleSlope = f"{rescale_slope:g}"
    ds0.RescaleIntercept = f"{rescale_intercept:g}"
    ds0.RescaleType = "HU"

    if realistic_header:
        _add_scanner_header(ds0, rng)

    if names == "shuffled":
        order = rng.permutation(nk)
        fnames = [f"{rng.integers(0, 16**8):08x}{k:04d}" for k in range(nk)]
    else:
        order = np.arange(nk) if names == "ordered" else np.arange(nk)[::-1]
        fnames = [f"IM{k:05d}.dcm" for k in range(nk)]
    paths: list[Path] = [outdir / fnames[k] for k in range(nk)]
    compressed = pydicom.uid.UID(transfer_syntax).is_compressed
    for k in order:
        ds = ds0.copy()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = int(k) + 1
        p = np.asarray(origin_lps_mm, float) + k * step
        ds.ImagePositionPatient = [f"{v:.6f}" for v in p]
        ds.SliceLocation = f"{p[2]:.6f}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored[k].astype(dtype).tobytes()
        if edit is not None:
            edit(int(k), ds)
        if compressed and "PixelData" in ds:
            ds.compress(transfer_syntax)
        else:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.save_as(paths[k], enforce_file_format=True)
    return paths


def _add_scanner_header(ds: Dataset, rng: np.random.Generator) -> None:
    """Fill ``ds`` with the kind of elements a CT scanner writes (values are synthetic)."""
    from pydicom.sequence import Sequence

    text = {
        "SpecificCharacterSet": "ISO_IR 100", "StudyDate": "20240301", "SeriesDate": "20240301",
        "AcquisitionDate": "20240301", "ContentDate": "20240301", "StudyTime": "093000",
        "SeriesTime": "093512", "AcquisitionTime": "093420.123", "ContentTime": "093512.456",
        "AccessionNumber": "SYN0001", "InstitutionName": "SYNTHETIC HOSPITAL", "StationName": "CTSYN01",
        "StudyDescription": "CT LUMBAR SPINE", "ManufacturerModelName": "Synthetic 128",
        "PatientName": "SYNTHETIC^PATIENT", "PatientID": "SYN-0001", "PatientBirthDate": "19600101",
        "PatientSex": "O", "PatientAge": "064Y", "BodyPartExamined": "LSPINE", "ProtocolName": "Spine routine",
        "DeviceSerialNumber": "12345", "SoftwareVersions": "syn 1.0", "PatientPosition": "HFS",
        "RotationDirection": "CW", "FilterType": "BODY", "StudyID": "1", "PositionReferenceIndicator": "",
        "PhotometricInterpretation": "MONOCHROME2", "RescaleType": "HU", "ReferringPhysicianName": "",
        "OperatorsName": "", "ExposureModulationType": "XYZ_EC", "ContrastBolusAgent": "",
    }
    for k, v in text.items():
        setattr(ds, k, v)
    nums = {"KVP": "120", "DataCollectionDiameter": "500", "ReconstructionDiameter": "350",
            "DistanceSourceToDetector": "1085.6", "DistanceSourceToPatient": "595", "GantryDetectorTilt": "0",
            "TableHeight": "150", "ExposureTime": "1000", "XRayTubeCurrent": "250", "Exposure": "250",
            "GeneratorPower": "30", "SingleCollimationWidth": "0.6", "TotalCollimationWidth": "38.4",
            "TableSpeed": "46", "TableFeedPerRotation": "23", "SpiralPitchFactor": "0.6",
            "SliceLocation": "0", "WindowCenter": "500", "WindowWidth": "2000", "AcquisitionNumber": "1",
}
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    for k, v in nums.items():
        vr = dictionary_VR(tag_for_keyword(k))
        setattr(ds, k, float(v) if vr in ("FD", "FL") else int(float(v)) if vr in ("US", "UL", "SS", "SL") else v)
    ds.CTDIvol, ds.EstimatedDoseSaving, ds.RevolutionTime = 12.5, 31.2, 0.5
    ds.FocalSpots = ["1.2"]
    ds.DataCollectionCenterPatient = [0.0, -150.0, -300.0]
    ds.ReconstructionTargetCenterPatient = [0.0, -150.0, -300.0]
    ds.WindowCenterWidthExplanation = ["BONE", "SOFT"]
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "CTLSPINE", "SYN", "CT lumbar spine"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(3)])
    for it in ds.ReferencedImageSequence:
        it.ReferencedSOPClassUID = CTImageStorage
        it.ReferencedSOPInstanceUID = generate_uid()
    ds.IrradiationEventUID = generate_uid()
    # a private block the size of a vendor's (e.g. Siemens CSA) header
    block = ds.private_block(0x0029, "SYNTHETIC CSA HEADER", create=True)
    block.add_new(0x10, "OB", rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    block.add_new(0x20, "LO", "synthetic private")


def benchmark_512x512x400(workdir: str | Path = "/tmp/fusionct_loading_bench", repeats: int = 3) -> dict:
    """Write (once) a 512x512x400 CT series with realistic headers and time loading it.

    Returns :func:`time_loading`'s dict (seconds and ratios) plus ``n_files``. The folder is
    kept for the next call; delete it to rewrite.
    """
    workdir = Path(workdir)
    if not workdir.exists() or len(list(workdir.iterdir())) != 400:
        write_ct_series(workdir, (400, 512, 512), spacing_mm=(0.7, 0.7, 1.0), realistic_header=True)
    time_loading(workdir, repeats=1)  # warm the page cache
    out = time_loading(workdir, repeats=repeats)
    out["n_files"] = 400
    return out


def time_loading(folder: str | Path, repeats: int = 3) -> dict:
    """Best-of-``repeats`` wall time (s) to load ``folder`` three ways, and the ratios.

    ``fusionct`` is :func:`pipeline.loading.load_study` (scan, select, sort, read, rescale
    to float32); ``sitk`` is ``GetGDCMSeriesFileNames`` + ``ImageSeriesReader.Execute`` +
    ``GetArrayFromImage``; ``sitk_read_only`` the same without the folder scan;
    ``pydicom`` a plain loop (dcmread every file, sort by position, ``pixel_array`` * slope + intercept).
    Run it twice: the first run warms the page cache.
    """
    import SimpleITK as sitk

    from pipeline.loading import load_study

    folder = str(folder)

    def t_fusionct():
        return load_study(folder).hu

    def t_sitk():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder)
        r = sitk.ImageSeriesReader()
        r.SetFileNames(files)
        return sitk.GetArrayFromImage(r.Execute())

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder)

    def t_sitk_read():
        r = sitk.ImageSeriesReader()
        r.SetFileNames(files)
        return sitk.GetArrayFromImage(r.Execute())

    def t_pydicom():
        dss = [pydicom.dcmread(str(p)) for p in Path(folder).rglob("*") if p.is_file()]
        normal = np.cross(np.asarray(dss[0].ImageOrientationPatient[:3], float),
                          np.asarray(dss[0].ImageOrientationPatient[3:], float))
        dss.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
        return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]).astype(np.float32)

    out = {}
    for name, fn in [("fusionct", t_fusionct), ("sitk", t_sitk), ("sitk_read_only", t_sitk_read), ("pydicom", t_pydicom)]:
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name + "_s"] = best
    out["ratio_vs_sitk"] = out["fusionct_s"] / out["sitk_s"]
    out["ratio_vs_sitk_read_only"] = out["fusionct_s"] / out["sitk_read_only_s"]
    out["ratio_vs_pydicom"] = out["fusionct_s"] / out["pydicom_s"]
    return out


__all__ = ["benchmark_512x512x400", "time_loading", "write_ct_series"]


if __name__ == "__main__":  # python -m pipeline.loading_bench
    res = benchmark_512x512x400()
    for key, val in res.items():
        print(f"{key:>24}: {val:.3f}" if isinstance(val, float) else f"{key:>24}: {val}")
