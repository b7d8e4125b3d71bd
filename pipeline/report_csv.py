"""levels.csv, screws.csv, cages.csv: one row per item for reviewers, units in column names.

Rows come from the same ``StudyResult`` objects as every other output (via ``as_plain``).
An LPS point ``head_lps_mm`` becomes three columns ``head_x_lps_mm``, ``head_y_lps_mm``,
``head_z_lps_mm``; a unitless fraction carries ``_fraction`` in its name; booleans are
``true``/``false``; a missing value is an empty cell. Every row has ``status`` (draft until
the surgeon confirms).
"""
from __future__ import annotations

import csv
import io
import math

from pipeline.results import StudyResult, as_plain

SCREW_COLUMNS = [
    "id", "vertebra", "side", "head_lps_mm", "tip_lps_mm", "length_mm", "diameter_mm",
    "halo_mean_mm", "halo_max_mm", "halo_coverage", "loosening", "double_halo", "rays_used",
    "rays_excluded", "migration_mm", "halo_change_mm", "breach_mm", "breach_grade",
    "breach_direction",
]
CAGE_COLUMNS = [
    "id", "level", "material", "centroid_lps_mm", "subsidence_superior_mm",
    "subsidence_inferior_mm", "subsidence_mm", "subsidence_grade", "subsidence_change_mm",
]
LEVEL_COLUMNS = ["level", "center_lps_mm", "instrumented", "bridging_fraction", "fusion",
                 "segmental_lordosis_deg", "disc_height_mm", "adjacent_to_fusion",
                 "disc_height_change_mm"]

# Plain names whose unit is not already in the name.
RENAMES = {"halo_coverage": "halo_coverage_fraction", "rays_used": "rays_used_count",
           "rays_excluded": "rays_excluded_count", "breach_grade": "breach_grade_gertzbein_robbins"}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(round(value, 4))
    return str(value)


def flatten_row(item: dict, columns: list[str]) -> dict[str, str]:
    """One plain item as ordered CSV cells: LPS vectors split into x/y/z, units in names.

    Fields of ``item`` not in ``columns`` are appended (so additive fields reach the CSV).
    """
    row: dict[str, str] = {}
    order = list(columns) + [k for k in item if k not in columns]
    for key in order:
        value = item.get(key)
        if key.endswith("_lps_mm") and isinstance(value, (list, tuple)) and len(value) == 3:
            stem = key[: -len("_lps_mm")]
            for axis, v in zip("xyz", value):
                row[f"{stem}_{axis}_lps_mm"] = _cell(float(v))
        elif isinstance(value, (list, tuple, dict)):
            continue  # nested values belong in measurements.json, not a flat table
        else:
            row[RENAMES.get(key, key)] = _cell(value)
    return row


def table_rows(result: StudyResult, kind: str) -> list[dict[str, str]]:
    """Rows for ``kind`` in ``("screws", "cages", "levels")``, each with a ``status`` cell."""
    items, columns = {
        "screws": (result.screws, SCREW_COLUMNS),
        "cages": (result.cages, CAGE_COLUMNS),
        "levels": (result.levels, LEVEL_COLUMNS),
    }[kind]
    rows = []
    for obj in items:
        row = flatten_row(as_plain(obj), columns)
        row["status"] = result.status
        rows.append(row)
    return rows


def header_for(kind: str) -> list[str]:
    """Column names of an empty table (so an empty CSV still tells what it would hold)."""
    columns = {"screws": SCREW_COLUMNS, "cages": CAGE_COLUMNS, "levels": LEVEL_COLUMNS}[kind]
    out = []
    for key in columns:
        if key.endswith("_lps_mm"):
            stem = key[: -len("_lps_mm")]
            out += [f"{stem}_{a}_lps_mm" for a in "xyz"]
        else:
            out.append(RENAMES.get(key, key))
    return out + ["status"]


def to_csv_text(rows: list[dict[str, str]], header: list[str]) -> str:
    """CSV text with the union of row keys, header order first."""
    names = list(header)
    for row in rows:
        names += [k for k in row if k not in names]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def csv_texts(result: StudyResult) -> dict[str, str]:
    """``{"levels.csv": text, "screws.csv": text, "cages.csv": text}``."""
    return {f"{kind}.csv": to_csv_text(table_rows(result, kind), header_for(kind))
            for kind in ("levels", "screws", "cages")}
