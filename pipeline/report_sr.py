"""report_sr.dcm: a DICOM Comprehensive 3D SR carrying a TID 1500 Measurement Report.

One measurement group (TID 1501) per screw (halo mean / 95th-percentile width, coverage,
loosening as a qualitative evaluation), per cage (subsidence superior / inferior / larger,
grade) and per level (bridging fraction, fusion class), each with a tracking identifier (the
finding's id), a finding site (SNOMED CT vertebra or disc level, with laterality for screws)
and the source CT slice nearest the finding. Concepts DICOM has no code for use the private
scheme ``99FUSIONCT`` declared in the CodingSchemeIdentificationSequence; units are UCUM
(``mm``, ``{ratio}``). The observer is the device ``fusionct``.

The draft is VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY; the review step makes
a VERIFIED successor (same series, PredecessorDocumentsSequence -> the draft).

Patient and study modules are copied from the source headers into the DICOM object only
(that is what PACS needs to file it); nothing identifying is logged or written elsewhere.
"""
from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from pipeline import __version__
from pipeline.results import (CageMeasurement, FractureFinding, LevelMeasurement, ScrewMeasurement,
                              StudyResult)

PRIVATE_SCHEME = "99FUSIONCT"
SR_SERIES_NUMBER = 9901
MANUFACTURER = "fusionct"


def _fc(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# Private concepts (DICOM/SNOMED have no code for these measurements).
C_HALO_MEAN = _fc("FCT001", "Peri-screw lucency halo mean width")
C_HALO_MAX = _fc("FCT002", "Peri-screw lucency halo 95th percentile width")
C_HALO_COVERAGE = _fc("FCT003", "Peri-screw lucency halo coverage")
C_LOOSENING = _fc("FCT004", "Pedicle screw loosening")
C_DOUBLE_HALO = _fc("FCT005", "Sclerotic rim outside halo")
C_MIGRATION = _fc("FCT006", "Screw migration since prior CT")
C_HALO_CHANGE = _fc("FCT007", "Peri-screw lucency halo change since prior CT")
C_SUB_SUP = _fc("FCT010", "Cage subsidence through superior endplate")
C_SUB_INF = _fc("FCT011", "Cage subsidence through inferior endplate")
C_SUB_MAX = _fc("FCT012", "Cage subsidence")
C_SUB_GRADE = _fc("FCT013", "Cage subsidence grade")
C_SUB_CHANGE = _fc("FCT014", "Cage subsidence change since prior CT")
C_INTERBODY_CAGE = _fc("FCT015", "Interbody cage")
C_BRIDGING = _fc("FCT020", "Bridging bone fraction of disc space")
C_FUSION = _fc("FCT021", "Interbody fusion status")
C_FUSION_ASSESSMENT = _fc("FCT022", "Disc level fusion assessment")
GRADE_CODES = {
    "none": _fc("FCT030", "No subsidence"),
    "mild": _fc("FCT031", "Mild subsidence"),
    "severe": _fc("FCT032", "Severe subsidence"),
}
FUSION_CODES = {
    "fused": _fc("FCT040", "Fused"),
    "partial": _fc("FCT041", "Partially fused"),
    "not_fused": _fc("FCT042", "Not fused"),
}
C_BREACH = _fc("FCT050", "Pedicle breach distance")
C_BREACH_GRADE = _fc("FCT051", "Pedicle breach Gertzbein-Robbins grade")
BREACH_CODES = {g: _fc(f"FCT05{i + 2}", f"Gertzbein-Robbins grade {g}") for i, g in enumerate("ABCDE")}
C_LORDOSIS = _fc("FCT060", "Segmental lordosis")
C_DISC_HEIGHT = _fc("FCT061", "Disc height")
C_DISC_HEIGHT_CHANGE = _fc("FCT062", "Disc height change since prior CT")
C_FRACTURE_GAP = _fc("FCT070", "Fracture gap width")
FRACTURE_TYPES = {"rod": _fc("FCT071", "Rod fracture"), "screw": _fc("FCT072", "Screw shaft fracture")}
UNIT_MM = CodedConcept(value="mm", scheme_designator="UCUM", meaning="millimeter")
UNIT_DEG = CodedConcept(value="deg", scheme_designator="UCUM", meaning="degree")
UNIT_RATIO = CodedConcept(value="{ratio}", scheme_designator="UCUM", meaning="ratio")

PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="fusionct measurement concepts",
    version="1",
    responsible_organization="fusionct project",
)

VERTEBRA_CODES = {
    "T10": codes.SCT.BoneStructureOfT10, "T11": codes.SCT.BoneStructureOfT11,
    "T12": codes.SCT.BoneStructureOfT12, "L1": codes.SCT.BoneStructureOfL1,
    "L2": codes.SCT.BoneStructureOfL2, "L3": codes.SCT.BoneStructureOfL3,
    "L4": codes.SCT.BoneStructureOfL4, "L5": codes.SCT.BoneStructureOfL5,
    "S1": codes.SCT.BoneStructureOfSacrum,
}
LEVEL_CODES = {
    "T10-T11": codes.SCT.LevelOfT10T11IntervertebralDisc,
    "T11-T12": codes.SCT.LevelOfT11T12IntervertebralDisc,
    "T12-L1": codes.SCT.LevelOfT12L1IntervertebralDisc,
    "L1-L2": codes.SCT.LevelOfL1L2IntervertebralDisc,
    "L2-L3": codes.SCT.LevelOfL2L3IntervertebralDisc,
    "L3-L4": codes.SCT.LevelOfL3L4IntervertebralDisc,
    "L4-L5": codes.SCT.LevelOfL4L5IntervertebralDisc,
    "L5-S1": codes.SCT.LevelOfL5S1IntervertebralDisc,
}

# Non-identifying header attributes kept per source image (for the verified SR later).
_REF_KEYS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
             "FrameOfReferenceUID", "Modality", "Rows", "Columns", "PixelSpacing",
             "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness")
# Patient / study module attributes highdicom copies into the SR (type 2: may be empty).
_PATIENT_STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                       "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyInstanceUID", "SpecificCharacterSet")


# ------------------------------------------------------------------------ source headers
def read_source_headers(paths: Sequence[str | Path]) -> list[Dataset]:
    """Headers (no pixel data) of the source images, in the order given."""
    return [pydicom.dcmread(str(p), stop_before_pixels=True) for p in paths]


def warm_up() -> None:
    """Load what highdicom reads on its first SR of a process (its tables of the DICOM
    standard, ~0.3 s), so that cost can be paid ahead, in a background thread
    (``pipeline.outputs.prefetch_sources``). Only a cache is filled: the SR is the same."""
    try:
        from highdicom._standard_utils import does_iod_have_pixel_data
    except ImportError:  # a highdicom without this helper: nothing to warm
        return
    does_iod_have_pixel_data(Comprehensive3DSRStorage)


def source_refs(headers: Sequence[Dataset]) -> list[dict]:
    """Non-identifying facts about each source image (UIDs and geometry) as plain values;
    kept in evidence.npz so the verified SR can reference the same images later."""
    out = []
    for ds in headers:
        ref = {}
        for key in _REF_KEYS:
            if key in ds and ds[key].value not in (None, ""):
                v = ds[key].value
                if isinstance(v, pydicom.multival.MultiValue) or isinstance(v, (list, tuple)):
                    v = [float(x) for x in v]
                elif key in ("Rows", "Columns"):
                    v = int(v)
                elif key == "SliceThickness":
                    v = float(v)
                else:
                    v = str(v)
                ref[key] = v
        out.append(ref)
    return out


def headers_from_refs(refs: Sequence[dict], patient_study: Dataset) -> list[Dataset]:
    """Minimal evidence datasets rebuilt from ``source_refs`` plus the patient/study module
    of ``patient_study`` (the draft SR)."""
    out = []
    for ref in refs:
        ds = Dataset()
        for key in _PATIENT_STUDY_KEYS:
            if key in patient_study:
                setattr(ds, key, patient_study[key].value)
        for key, v in ref.items():
            setattr(ds, key, v)
        out.append(ds)
    return out


def headers_from_sr_evidence(sr: Dataset) -> list[Dataset]:
    """Minimal evidence datasets from an SR's CurrentRequestedProcedureEvidenceSequence
    (when the per-image geometry is not available)."""
    out = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for sop in series.get("ReferencedSOPSequence", []):
                ds = Dataset()
                for key in _PATIENT_STUDY_KEYS:
                    if key in sr:
                        setattr(ds, key, sr[key].value)
                ds.StudyInstanceUID = study.StudyInstanceUID
                ds.SeriesInstanceUID = series.SeriesInstanceUID
                ds.SOPClassUID = sop.ReferencedSOPClassUID
                ds.SOPInstanceUID = sop.ReferencedSOPInstanceUID
                out.append(ds)
    return out


def _complete_patient_study(ds: Dataset) -> Dataset:
    """A copy with every patient/study attribute highdicom reads present (empty if unknown)."""
    ds = pydicom.Dataset(ds)
    for key in _PATIENT_STUDY_KEYS:
        if key not in ds and key not in ("SpecificCharacterSet", "StudyInstanceUID"):
            setattr(ds, key, "")
    return ds


class SliceIndex:
    """Finds the source image nearest an LPS point (along the slice normal)."""

    def __init__(self, headers: Sequence[Dataset]):
        self.headers = [h for h in headers if "ImagePositionPatient" in h and "ImageOrientationPatient" in h]
        if self.headers:
            iop = np.asarray(self.headers[0].ImageOrientationPatient, float)
            self.normal = np.cross(iop[:3], iop[3:])
            self.pos = np.array([np.asarray(h.ImagePositionPatient, float) @ self.normal
                                 for h in self.headers])

    def nearest(self, p_lps) -> Dataset | None:
        if not self.headers:
            return None
        d = np.abs(self.pos - np.asarray(p_lps, float) @ self.normal)
        return self.headers[int(np.argmin(d))]


def _library_ok(ds: Dataset) -> bool:
    need = ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "PixelSpacing",
            "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness")
    return all(k in ds for k in need)


# --------------------------------------------------------------------------- content
def tracking_uid(study_uid: str | None, kind: str, ident: str) -> str:
    """Deterministic tracking UID for one finding, equal in the draft and the verified SR
    of a study, so a reader can follow one screw from one to the other.

    A ``2.25`` UID from a name-based UUID (ISO/IEC 9834-8, DICOM PS3.5 B.2). pydicom's
    ``generate_uid(prefix=None, ...)`` ignores its entropy sources and draws a random UUID.
    """
    return name_uid(str(study_uid), kind, ident)


def name_uid(*parts: str) -> str:
    """The same ``2.25`` UID for the same names, every time (name-based UUID)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(31).join(parts)).int}"


def _num(name, value, unit, where=None) -> hd.sr.Measurement:
    """One TID 300 measurement; ``where`` adds its 3D coordinates (SCOORD3D, LPS mm)."""
    return hd.sr.Measurement(name=name, value=float(value), unit=unit,
                             referenced_coordinates=[where] if where is not None else None)


def _where(frame_uid: str | None, points_lps_mm) -> hd.sr.CoordinatesForMeasurement3D | None:
    """SCOORD3D in the source frame of reference: a POINT, or a POLYLINE for several."""
    if not frame_uid:
        return None
    pts = np.asarray(points_lps_mm, float).reshape(-1, 3)
    kind = hd.sr.GraphicTypeValues3D.POINT if len(pts) == 1 else hd.sr.GraphicTypeValues3D.POLYLINE
    return hd.sr.CoordinatesForMeasurement3D(graphic_type=kind, graphic_data=pts,
                                             frame_of_reference_uid=frame_uid)


def _source_images(index: SliceIndex, p_lps) -> list | None:
    ds = index.nearest(p_lps)
    if ds is None:
        return None
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)]


def _algorithm() -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name="fusionct", version=__version__)


def screw_group(s: ScrewMeasurement, study_uid, index: SliceIndex,
                frame_uid: str | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one screw: halo widths, coverage, loosening, site; the halo mean
    carries the shaft (head -> tip) as a 3D polyline."""
    sites = None
    if s.vertebra in VERTEBRA_CODES:
        lat = {"left": codes.SCT.Left, "right": codes.SCT.Right}.get(s.side)
        sites = [hd.sr.FindingSite(anatomic_location=VERTEBRA_CODES[s.vertebra], laterality=lat)]
    measurements = [
        _num(C_HALO_MEAN, s.halo_mean_mm, UNIT_MM, _where(frame_uid, [s.head_lps_mm, s.tip_lps_mm])),
        _num(C_HALO_MAX, s.halo_max_mm, UNIT_MM),
        _num(C_HALO_COVERAGE, s.halo_coverage, UNIT_RATIO),
    ]
    if s.migration_mm is not None:
        measurements.append(_num(C_MIGRATION, s.migration_mm, UNIT_MM))
    if s.halo_change_mm is not None:
        measurements.append(_num(C_HALO_CHANGE, s.halo_change_mm, UNIT_MM))
    if s.breach_mm is not None:
        measurements.append(_num(C_BREACH, s.breach_mm, UNIT_MM))
    yes_no = lambda b: codes.SCT.Present if b else codes.SCT.Absent  # noqa: E731
    qual = [hd.sr.QualitativeEvaluation(C_LOOSENING, yes_no(s.loosening)),
            hd.sr.QualitativeEvaluation(C_DOUBLE_HALO, yes_no(s.double_halo))]
    if s.breach_grade in BREACH_CODES:
        qual.append(hd.sr.QualitativeEvaluation(C_BREACH_GRADE, BREACH_CODES[s.breach_grade]))
    mid = (np.asarray(s.head_lps_mm) + np.asarray(s.tip_lps_mm)) / 2
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(study_uid, "screw", s.id),
                                                     identifier=s.id),
        finding_type=codes.SCT.BoneScrew,
        algorithm_id=_algorithm(),
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=qual,
        source_images=_source_images(index, mid),
    )


def cage_group(c: CageMeasurement, study_uid, index: SliceIndex,
               frame_uid: str | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one cage: subsidence per endplate, the larger, the grade."""
    sites = [hd.sr.FindingSite(anatomic_location=LEVEL_CODES[c.level])] if c.level in LEVEL_CODES else None
    measurements = [
        _num(C_SUB_SUP, c.subsidence_superior_mm, UNIT_MM),
        _num(C_SUB_INF, c.subsidence_inferior_mm, UNIT_MM),
        _num(C_SUB_MAX, c.subsidence_mm, UNIT_MM, _where(frame_uid, [c.centroid_lps_mm])),
    ]
    if c.subsidence_change_mm is not None:
        measurements.append(_num(C_SUB_CHANGE, c.subsidence_change_mm, UNIT_MM))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(study_uid, "cage", c.id),
                                                     identifier=c.id),
        finding_type=C_INTERBODY_CAGE,
        algorithm_id=_algorithm(),
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(C_SUB_GRADE, GRADE_CODES[c.subsidence_grade])],
        source_images=_source_images(index, c.centroid_lps_mm),
    )


def level_group(lv: LevelMeasurement, study_uid, index: SliceIndex,
                frame_uid: str | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one disc level: bridging fraction and fusion class."""
    sites = [hd.sr.FindingSite(anatomic_location=LEVEL_CODES[lv.level])] if lv.level in LEVEL_CODES else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(study_uid, "level", lv.level),
                                                     identifier=lv.level),
        finding_type=C_FUSION_ASSESSMENT,
        algorithm_id=_algorithm(),
        finding_sites=sites,
        measurements=level_measurements(lv, frame_uid),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(C_FUSION, FUSION_CODES[lv.fusion])],
        source_images=_source_images(index, lv.center_lps_mm),
    )


def level_measurements(lv: LevelMeasurement, frame_uid: str | None) -> list:
    """Bridging fraction, and where measured: segmental lordosis, disc height and its change."""
    out = [_num(C_BRIDGING, lv.bridging_fraction, UNIT_RATIO, _where(frame_uid, [lv.center_lps_mm]))]
    if lv.segmental_lordosis_deg is not None:
        out.append(_num(C_LORDOSIS, lv.segmental_lordosis_deg, UNIT_DEG))
    if lv.disc_height_mm is not None:
        out.append(_num(C_DISC_HEIGHT, lv.disc_height_mm, UNIT_MM))
    if lv.disc_height_change_mm is not None:
        out.append(_num(C_DISC_HEIGHT_CHANGE, lv.disc_height_change_mm, UNIT_MM))
    return out


def fracture_group(f: FractureFinding, study_uid, index: SliceIndex,
                   frame_uid: str | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one rod or screw fracture: the gap width at its 3D position."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(study_uid, "fracture", f.id),
                                                     identifier=f.id),
        finding_type=FRACTURE_TYPES[f.kind],
        algorithm_id=_algorithm(),
        measurements=[_num(C_FRACTURE_GAP, f.gap_mm, UNIT_MM, _where(frame_uid, [f.position_lps_mm]))],
        source_images=_source_images(index, f.position_lps_mm),
    )


def measurement_report(result: StudyResult, headers: Sequence[Dataset]) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree for ``result`` over the source images ``headers``."""
    study_uid = headers[0].StudyInstanceUID
    index = SliceIndex(headers)
    frame_uid = str(headers[0].get("FrameOfReferenceUID", "") or "") or None
    groups = ([screw_group(s, study_uid, index, frame_uid) for s in result.screws]
              + [cage_group(c, study_uid, index, frame_uid) for c in result.cages]
              + [level_group(lv, study_uid, index, frame_uid) for lv in result.levels]
              + [fracture_group(f, study_uid, index, frame_uid) for f in result.fractures])
    used = {}
    # Image library: only the images the groups reference (a whole series would bloat it).
    ref_uids = set()
    for s in list(result.screws):
        ds = index.nearest((np.asarray(s.head_lps_mm) + np.asarray(s.tip_lps_mm)) / 2)
        if ds is not None:
            ref_uids.add(ds.SOPInstanceUID)
    for p in ([c.centroid_lps_mm for c in result.cages] + [lv.center_lps_mm for lv in result.levels]
              + [f.position_lps_mm for f in result.fractures]):
        ds = index.nearest(p)
        if ds is not None:
            ref_uids.add(ds.SOPInstanceUID)
    for ds in headers:
        if ds.SOPInstanceUID in ref_uids and _library_ok(ds):
            used[ds.SOPInstanceUID] = ds
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=name_uid("fusionct-device", __version__),
            name="fusionct",
            manufacturer_name=MANUFACTURER,
            model_name="fusionct",
        ),
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ComputedTomography,
        imaging_measurements=groups,
        referenced_images=list(used.values()) or None,
    )


def is_complete(result: StudyResult) -> bool:
    """COMPLETE unless some finding could not be measured at all (a screw whose every halo
    ray was excluded) or the flow said its content is partial (``extras['partial']``)."""
    if (result.extras or {}).get("partial"):
        return False
    return not any(s.rays_used == 0 and s.rays_excluded > 0 for s in result.screws)


def build_sr(result: StudyResult, headers: Sequence[Dataset], *,
             series_instance_uid: str | None = None, sop_instance_uid: str | None = None,
             instance_number: int = 1, complete: bool | None = None,
             verifying_observer_name: str | None = None, verifying_organization: str | None = None,
             predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR for ``result`` referencing the source images ``headers``.

    Without ``verifying_observer_name`` the document is UNVERIFIED / PRELIMINARY (the draft);
    with it, VERIFIED / FINAL with ``predecessor`` in PredecessorDocumentsSequence.
    """
    if not headers:
        raise ValueError("an SR needs at least one source image header")
    evidence = [_complete_patient_study(headers[0])] + list(headers[1:])
    content = measurement_report(result, evidence)
    verified = verifying_observer_name is not None
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=is_complete(result) if complete is None else complete,
        is_final=verified,
        is_verified=verified,
        verifying_observer_name=verifying_observer_name,
        verifying_organization=verifying_organization,
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description="fusionct measurements" + (" (verified)" if verified else " (draft)"),
        manufacturer_model_name="fusionct",
        software_versions=__version__,
        coding_schemes=[PRIVATE_SCHEME_ITEM],
        # UTF-8, so any reviewer's name (and any source patient name) survives intact
        specific_character_set="ISO_IR 192",
    )
    return sr


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file in memory."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def refs_json(headers: Sequence[Dataset]) -> str:
    """``source_refs`` as JSON text."""
    return json.dumps(source_refs(headers))


# ------------------------------------------------------------------ the SR beside the analysis
class SRWorker:
    """A helper process that prepares and builds the draft SR beside the analysis.

    Everything the SR needs apart from the result - importing highdicom (~0.5 s), its DICOM
    standard tables (~0.3 s), the source images' headers and their references - depends only
    on the source files, so the helper starts on them as soon as the study is loaded and
    works on the machine's other core while this process detects and measures (threads
    would not do: pure-Python work in a second thread holds up every NumPy call of the
    first). :meth:`build` then hands it the result; it answers with the same file
    :func:`build_sr` + :func:`sr_bytes` make here, and the same :func:`source_refs`.

    Messages are pickles over the helper's stdin/stdout; it exits when its stdin closes
    (this process ended or dropped it). Nothing is logged; its stderr is discarded.
    """

    def __init__(self, paths: Sequence[str | Path]):
        import os
        import pickle
        import subprocess
        import sys

        self.paths = [str(p) for p in paths]
        self.signature = files_signature(self.paths)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.report_sr import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            cwd=root, close_fds=True)
        self._sender = None  # the thread that hands over the result (see build)
        pickle.dump(self.paths, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.flush()

    def build(self, result: StudyResult | None, timeout_s: float = 300.0) -> tuple[bytes | None, list[dict]]:
        """(SR file bytes, source refs) for ``result`` (None: the refs only, no SR).

        Raises RuntimeError when the helper failed, gave no answer within ``timeout_s`` or
        the source files changed since it read them (the caller then builds the SR itself)."""
        import pickle
        import select
        import subprocess
        import threading

        try:
            if files_signature(self.paths) != self.signature:
                raise RuntimeError("source files changed since the SR helper read them")
            # sent from a thread: a helper that is alive but stuck reads nothing, and a
            # result larger than the pipe's buffer would block here for ever
            self._sender = threading.Thread(target=self._send, args=(result,), daemon=True,
                                            name="fusionct-sr-send")
            self._sender.start()
            ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
            if not ready:
                raise RuntimeError(f"SR helper gave no answer in {timeout_s:g} s")
            status, payload = pickle.load(self._proc.stdout)
            self._proc.wait(timeout=timeout_s)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError,
                subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"SR helper failed ({type(exc).__name__})") from None
        finally:
            self.close()
        if status != "ok":
            raise RuntimeError(f"SR helper failed ({payload})")
        return payload

    def _send(self, result) -> None:
        """Hand the helper the result and close its input (a helper gone or stopped: the
        answer is then missing, which :meth:`build` reports)."""
        import pickle

        try:
            pickle.dump(result, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.close()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Stop the helper (idempotent). It is stopped first, so a send still blocked on a
        full pipe fails at once; the send is then waited for before the pipes are closed,
        because closing a buffered pipe while another thread writes to it is a race that
        CPython reports as ValueError (seen in CI)."""
        p = self._proc
        if p.poll() is None:
            p.kill()
            p.wait()
        if self._sender is not None:
            self._sender.join(timeout=10.0)
        for fh in (p.stdin, p.stdout):
            try:
                fh.close()
            except (OSError, ValueError):
                pass


def files_signature(paths: Sequence[str]) -> list:
    """(mtime_ns, size) of each file (None when unreadable): headers read earlier are used
    only while their files are unchanged."""
    import os

    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return out


def _worker_main() -> None:
    """The helper process of :class:`SRWorker`: paths in, then a result in, SR bytes out.

    It runs at the analysis's own priority: niced, it starved behind other work on a busy
    machine while the analysis waited for its SR."""
    import pickle
    import sys

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        paths = pickle.load(stdin)
        headers = read_source_headers(paths)
        refs = source_refs(headers)
        warm_up()
        result = pickle.load(stdin)
        data = None if result is None else sr_bytes(build_sr(result, headers))
        answer = ("ok", (data, refs))
    except EOFError:  # dropped before it was asked for anything
        return
    except Exception as exc:  # noqa: BLE001 - reported; the caller builds the SR itself
        answer = ("error", type(exc).__name__)
    pickle.dump(answer, stdout, protocol=pickle.HIGHEST_PROTOCOL)
    stdout.flush()
