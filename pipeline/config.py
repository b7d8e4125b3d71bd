"""One configuration object with the clinical defaults and where they come from.

The ``Criteria`` part is echoed verbatim into ``measurements.json`` under ``criteria``.
A ``--config`` file (JSON or TOML) overrides any field by name.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from pipeline.errors import InputError


@dataclass(frozen=True)
class Criteria:
    """Clinical decision thresholds (see shared CLINICAL.md).

    halo_threshold_mm : a lucent zone of 1 mm or more around a pedicle screw means
        loosening (Wu et al., J Orthop Surg Res 2019; Kim et al., World Neurosurg 2022).
    halo_coverage_for_loosening : fraction of the intraosseous surface that must carry a
        halo of at least ``halo_threshold_mm`` to call loosening (fusionct default, CONTRACT.md).
    subsidence_grades_mm : cuts between none / mild / severe per endplate (Pinter,
        Global Spine J 2021): none <= 2, mild (2, 4], severe > 4.
    bridging_fused, bridging_partial : bridging-bone fractions for fused / partial
        (Mayfield grade I and BSF-style "fused": bridging over at least half the space).
    migration_threshold_mm : screw shift between two CTs that predicted loosening
        (Tanioka et al., Eur Spine J 2021).
    """

    halo_threshold_mm: float = 1.0
    halo_coverage_for_loosening: float = 0.5
    subsidence_grades_mm: tuple[float, float] = (2.0, 4.0)
    bridging_fused: float = 0.5
    bridging_partial: float = 0.1
    migration_threshold_mm: float = 0.83

    def subsidence_grade(self, depth_mm: float) -> str:
        """Grade one endplate's subsidence depth per CONTRACT.md."""
        mild, severe = self.subsidence_grades_mm
        if depth_mm > severe:
            return "severe"
        if depth_mm > mild:
            return "mild"
        return "none"

    def fusion_class(self, bridging_fraction: float) -> str:
        """Fusion class of a level from its bridging fraction per CONTRACT.md."""
        if bridging_fraction >= self.bridging_fused:
            return "fused"
        if bridging_fraction >= self.bridging_partial:
            return "partial"
        return "not_fused"

    def to_json(self) -> dict:
        d = asdict(self)
        d["subsidence_grades_mm"] = list(self.subsidence_grades_mm)
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> "Criteria":
        """The criteria a results document was made with (``to_json``); keys it does not
        know are ignored, missing ones take the defaults."""
        known = {k: v for k, v in dict(d or {}).items() if k in cls.__dataclass_fields__}
        if "subsidence_grades_mm" in known:
            known["subsidence_grades_mm"] = tuple(known["subsidence_grades_mm"])
        return cls(**known)


@dataclass(frozen=True)
class Config:
    """Everything tunable, with defaults chosen for clinical CT (CLINICAL.md, acquisition facts)."""

    criteria: Criteria = field(default_factory=Criteria)
    # Titanium reads ~3000 HU on 12-bit data; cortical bone rarely exceeds ~1800 HU.
    metal_threshold_hu: float = 2200.0
    # Trabecular bone ~150-300 HU; discs and soft tissue < 120 HU.
    bone_threshold_hu: float = 150.0
    # Measure the dark beam-hardening bands between two pieces of metal per slice and
    # remove them before the halo is read (pipeline.streaks). Off by default: on, coverage
    # error falls at every spacing but the halo reader, calibrated with the bands in,
    # under-reads widths at 0.8x0.8x1.5 mm (README, "Streak band removal").
    streak_band_removal: bool = False
    # Halo sampling: rays perpendicular to the screw axis.
    halo_azimuths: int = 36
    halo_station_step_mm: float = 1.0
    halo_radial_step_mm: float = 0.1
    halo_max_width_mm: float = 5.0
    # Pedicle screws come in catalogue diameters (0.5 mm steps in the common systems); a
    # traced shaft diameter within screw_diameter_snap_mm of one is taken as that size
    # (pipeline.hardware.catalogue_diameter). An empty tuple keeps the traced diameter.
    screw_diameter_sizes_mm: tuple = tuple(4.0 + 0.5 * k for k in range(13))
    screw_diameter_snap_mm: float = 0.2
    # PEEK cages are found through their marker pins; pin ends sit this far inside the
    # cage's bearing faces (vendor-specific; set per cage model).
    peek_marker_inset_mm: float = 1.0

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "criteria"}
        d["criteria"] = self.criteria.to_json()
        return d


def load_config(path: str | Path | None) -> Config:
    """Read a JSON or TOML file of overrides; ``None`` gives the defaults.

    Top-level keys name ``Config`` fields; a ``criteria`` table names ``Criteria`` fields.
    Unknown keys are refused so a typo cannot silently fall back to a default.
    """
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read config: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "config must be a table of settings")
    crit_data = data.pop("criteria", {}) or {}
    known = {f.name for f in fields(Config)} - {"criteria"}
    known_crit = {f.name for f in fields(Criteria)}
    bad = sorted(set(data) - known) + sorted(f"criteria.{k}" for k in set(crit_data) - known_crit)
    if bad:
        raise InputError(path, f"unknown config setting(s): {', '.join(bad)}")
    if "screw_diameter_sizes_mm" in data:
        data["screw_diameter_sizes_mm"] = tuple(float(x) for x in data["screw_diameter_sizes_mm"])
    return replace(Config(), criteria=Criteria.from_json(crit_data), **data)
