"""measurements.json: the machine-readable result (schema in shared/measurements.schema.json).

Built from the same ``StudyResult`` objects as the CSV, HTML and SR writers (through
``pipeline.results.as_plain``), so the four outputs cannot disagree. The schema's required
fields come first; optional extras (``double_halo``, ``rays_used``/``rays_excluded``,
``material``, ``notes``, the series selection reason) ride along, which the schema allows.

No patient identifier is ever written here: the study is named by its UIDs only.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path, PurePath

import numpy as np

from pipeline import __version__
from pipeline.results import (
    CageMeasurement,
    FractureFinding,
    LevelMeasurement,
    ScrewMeasurement,
    StudyResult,
    as_plain,
)

SCHEMA_VERSION = 1
SOFTWARE_NAME = "fusionct"

# Keys that could carry a person's identity; never copied from input metadata.
_IDENTIFYING_WORDS = ("patient", "accession", "birth", "physician", "operator", "institution", "name")


def is_identifying_key(key: str) -> bool:
    """True for metadata keys that may name or identify a person (patient, physician...)."""
    k = str(key).lower()
    if k in ("series_description", "study_description", "protocol_name"):
        return False
    return any(w in k for w in _IDENTIFYING_WORDS)


def _finite_or_none(obj):
    """JSON-ready values: NaN/inf -> None (JSON has no NaN), arrays -> lists, numpy
    scalars -> Python, paths -> str."""
    if isinstance(obj, np.ndarray):
        return _finite_or_none(obj.tolist())
    if isinstance(obj, np.generic):
        return _finite_or_none(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def input_section(result: StudyResult, volume=None) -> dict:
    """The ``input`` block: study/series UIDs, spacing (i, j, k mm), shape (ni, nj, nk), why
    this series.

    ``result.input`` wins; anything it lacks is filled from ``volume`` (its geometry and
    ``meta``). Identifying keys are dropped.
    """
    meta = dict(getattr(volume, "meta", {}) or {})
    src = {k: v for k, v in dict(result.input or {}).items() if not is_identifying_key(k)}
    out: dict = {}
    out["study_instance_uid"] = src.pop("study_instance_uid", meta.get("study_instance_uid"))
    out["series_instance_uid"] = src.pop("series_instance_uid", meta.get("series_instance_uid"))
    spacing = src.pop("spacing_mm", None)
    if spacing is None and volume is not None:
        spacing = volume.spacing_mm
    shape = src.pop("shape", None)
    if shape is None and volume is not None:
        shape = volume.shape_ijk
    if spacing is None or shape is None:
        raise ValueError("input spacing_mm and shape are required (give result.input or a volume)")
    out["spacing_mm"] = [float(x) for x in spacing]
    out["shape"] = [int(x) for x in shape]
    for key in ("input_kind", "series_description", "selection_reason", "convolution_kernel"):
        value = src.pop(key, meta.get(key))
        if value is not None:
            out[key] = value
    out.update(src)
    return _finite_or_none(as_plain(out))


def build_measurements(result: StudyResult, volume=None) -> dict:
    """The whole measurements.json document as plain values.

    Parameters
    ----------
    result : StudyResult
        What the flow measured.
    volume : Volume, optional
        Used only to fill ``input`` fields that ``result.input`` lacks.

    Returns
    -------
    dict
        Valid against ``measurements.schema.json`` (schema_version 1).
    """
    doc = {
        "schema_version": SCHEMA_VERSION,
        "status": result.status,
        "software": {"name": SOFTWARE_NAME, "version": __version__},
        "input": input_section(result, volume),
        "criteria": as_plain(result.criteria),
        "screws": [as_plain(s) for s in result.screws],
        "cages": [as_plain(c) for c in result.cages],
        "levels": [as_plain(lv) for lv in result.levels],
        "fractures": [as_plain(f) for f in result.fractures],
        "notes": list(result.notes),
    }
    for key, value in (result.extras or {}).items():
        doc.setdefault(key, as_plain(value))
    return _finite_or_none(doc)


def dumps(doc: dict) -> str:
    """Serialised measurements.json text (indented, newline-terminated)."""
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def _pick(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def result_from_measurements(doc: dict) -> StudyResult:
    """Rebuild the ``StudyResult`` from a measurements.json document (the review step has
    only the output folder). Unknown keys are kept in ``extras``."""
    screws = tuple(ScrewMeasurement(**_pick(ScrewMeasurement, s)) for s in doc.get("screws", []))
    cages = tuple(CageMeasurement(**_pick(CageMeasurement, c)) for c in doc.get("cages", []))
    levels = tuple(LevelMeasurement(**_pick(LevelMeasurement, lv)) for lv in doc.get("levels", []))
    known = {"schema_version", "status", "software", "input", "criteria", "screws", "cages",
             "levels", "notes", "fractures"}
    return StudyResult(
        screws=screws,
        cages=cages,
        levels=levels,
        input=dict(doc.get("input", {})),
        criteria=dict(doc.get("criteria", {})),
        notes=tuple(doc.get("notes", ())),
        status=doc.get("status", "draft"),
        fractures=tuple(FractureFinding(**_pick(FractureFinding, f)) for f in doc.get("fractures", [])),
        extras={k: v for k, v in doc.items() if k not in known},
    )


def find_schema() -> Path | None:
    """shared/measurements.schema.json beside the repository, when present."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "shared" / "measurements.schema.json",
                 here.parents[1] / "shared" / "measurements.schema.json"):
        if cand.is_file():
            return cand
    return None


def validate_measurements(doc: dict, schema_path: str | Path | None = None) -> None:
    """Raise ``jsonschema.ValidationError`` when ``doc`` breaks the contract's schema.

    Skipped silently only when no schema file can be found (an installed copy without
    shared/ beside it).
    """
    path = Path(schema_path) if schema_path else find_schema()
    if path is None:
        return
    import jsonschema

    jsonschema.validate(doc, json.loads(path.read_text(encoding="utf-8")))
