"""Typed results, built bottom-up and validated when built (highdicom's manner).

Detection produces the geometry objects (``Vertebra``, ``ScrewGeometry``, ``CageGeometry``,
``DiscLevel``); measurement turns them into ``ScrewMeasurement``, ``CageMeasurement`` and
``LevelMeasurement``; ``StudyResult`` gathers them. The JSON, CSV, HTML and SR writers all
read these same objects, so the outputs cannot disagree. All positions are LPS mm.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

Vec3 = tuple[float, float, float]


def vec3(v) -> Vec3:
    """A validated LPS 3-vector of finite floats."""
    a = [float(x) for x in np.asarray(v, float).reshape(3)]
    if not all(math.isfinite(x) for x in a):
        raise ValueError(f"non-finite coordinate {a}")
    return (a[0], a[1], a[2])


def unit(v) -> Vec3:
    """A unit 3-vector."""
    a = np.asarray(v, float).reshape(3)
    n = np.linalg.norm(a)
    if not n > 0:
        raise ValueError("zero-length direction")
    return vec3(a / n)


def _check_fraction(name: str, x: float) -> None:
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be within 0..1, got {x}")


def _check_nonneg(name: str, x: float) -> None:
    if not (x >= 0.0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite non-negative number, got {x}")


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Plane:
    """An endplate surface: a point on it and its unit normal (pointing out of the body)."""

    point_lps_mm: Vec3
    normal: Vec3

    def __post_init__(self):
        object.__setattr__(self, "point_lps_mm", vec3(self.point_lps_mm))
        object.__setattr__(self, "normal", unit(self.normal))

    def signed_distance_mm(self, p_lps) -> np.ndarray:
        """Distance of points (..., 3) from the plane along its normal (positive outside)."""
        return (np.asarray(p_lps, float) - np.asarray(self.point_lps_mm)) @ np.asarray(self.normal)

    def line_parameter(self, origin_lps, direction) -> np.ndarray:
        """``t`` where the line ``origin + t * direction`` meets the plane, for points
        (..., 3); a line within 1e-6 of parallel to the plane is taken as that close
        (finite, far off)."""
        denom = float(np.asarray(direction, float) @ np.asarray(self.normal))
        denom = math.copysign(max(abs(denom), 1e-6), denom)
        return -self.signed_distance_mm(origin_lps) / denom


@dataclass(frozen=True)
class Vertebra:
    """A vertebral body found in the volume.

    ``name`` is anatomical (``L4``) when the sacrum is in view and counting is sure, else a
    positional name (``V1`` from the top) with ``named_by_position`` set. ``axis_si`` is the
    body's own superior direction; ``axis_lr`` its left direction; the body outline in a
    plane perpendicular to ``axis_si`` is the ellipse with ``semi_axes_mm`` (LR, AP).
    """

    name: str
    center_lps_mm: Vec3
    axis_si: Vec3
    axis_lr: Vec3
    semi_axes_mm: tuple[float, float]
    superior_endplate: Plane
    inferior_endplate: Plane
    named_by_position: bool = False
    is_sacrum: bool = False

    def __post_init__(self):
        object.__setattr__(self, "center_lps_mm", vec3(self.center_lps_mm))
        object.__setattr__(self, "axis_si", unit(self.axis_si))
        object.__setattr__(self, "axis_lr", unit(self.axis_lr))
        object.__setattr__(self, "semi_axes_mm", tuple(float(x) for x in self.semi_axes_mm))


@dataclass(frozen=True)
class DiscLevel:
    """A disc space between two vertebrae, named ``L4-L5`` (or ``V2-V3`` by position)."""

    name: str
    upper: str
    lower: str
    center_lps_mm: Vec3
    normal: Vec3  # unit, pointing superior (from the lower endplate to the upper)

    def __post_init__(self):
        object.__setattr__(self, "center_lps_mm", vec3(self.center_lps_mm))
        object.__setattr__(self, "normal", unit(self.normal))


@dataclass(frozen=True)
class ScrewGeometry:
    """One pedicle screw shaft as detected: head (posterior end where it leaves bone), tip.

    ``traced_diameter_mm`` is the diameter traced from the image when the nearest catalogue
    size was taken as ``diameter_mm`` instead (``pipeline.hardware.catalogue_diameter``);
    None when ``diameter_mm`` is itself the traced (or given) diameter."""

    id: str
    head_lps_mm: Vec3
    tip_lps_mm: Vec3
    diameter_mm: float
    vertebra: str | None = None
    side: Literal["left", "right"] | None = None
    traced_diameter_mm: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "head_lps_mm", vec3(self.head_lps_mm))
        object.__setattr__(self, "tip_lps_mm", vec3(self.tip_lps_mm))
        _check_nonneg("diameter_mm", self.diameter_mm)
        if self.side not in ("left", "right", None):
            raise ValueError(f"side must be left/right/None, got {self.side}")

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(np.subtract(self.tip_lps_mm, self.head_lps_mm)))

    @property
    def axis(self) -> Vec3:
        """Unit direction from head to tip."""
        return unit(np.subtract(self.tip_lps_mm, self.head_lps_mm))


@dataclass(frozen=True)
class CageGeometry:
    """One interbody cage as an oriented box.

    ``axes`` are three orthonormal unit vectors (rows): the first is the cage's own
    superior direction (towards the upper vertebra); ``half_sizes_mm`` go with them.
    ``material`` is ``titanium`` or ``peek`` (PEEK found through its marker pins).
    """

    id: str
    material: Literal["titanium", "peek"]
    centroid_lps_mm: Vec3
    axes: tuple[Vec3, Vec3, Vec3]
    half_sizes_mm: Vec3
    level: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "centroid_lps_mm", vec3(self.centroid_lps_mm))
        object.__setattr__(self, "axes", tuple(unit(a) for a in self.axes))
        object.__setattr__(self, "half_sizes_mm", vec3(self.half_sizes_mm))
        if self.material not in ("titanium", "peek"):
            raise ValueError(f"material must be titanium or peek, got {self.material}")


@dataclass(frozen=True)
class Rod:
    """A connecting rod as a polyline of LPS points along its centre."""

    id: str
    points_lps_mm: tuple[Vec3, ...]
    diameter_mm: float
    side: Literal["left", "right"] | None = None


@dataclass(frozen=True)
class Anatomy:
    """Everything detection found: vertebrae top to bottom, disc levels, hardware."""

    vertebrae: tuple[Vertebra, ...]
    levels: tuple[DiscLevel, ...]
    screws: tuple[ScrewGeometry, ...]
    cages: tuple[CageGeometry, ...]
    rods: tuple[Rod, ...] = ()
    named_by_position: bool = False
    notes: tuple[str, ...] = ()  # anything detection was unsure of, for the report


# -------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class ScrewMeasurement:
    """A screw's geometry and its peri-screw lucency halo (CONTRACT.md, "Peri-screw lucency halo")."""

    id: str
    vertebra: str | None
    side: Literal["left", "right"] | None
    head_lps_mm: Vec3
    tip_lps_mm: Vec3
    length_mm: float
    diameter_mm: float
    halo_mean_mm: float
    halo_max_mm: float
    halo_coverage: float
    loosening: bool
    double_halo: bool = False
    rays_used: int = 0
    rays_excluded: int = 0  # rays recognised as crossing a streak or leaving bone
    migration_mm: float | None = None
    halo_change_mm: float | None = None
    # Pedicle breach (Gertzbein-Robbins): how far the shaft lies outside the pedicle cortex.
    breach_mm: float | None = None
    breach_grade: Literal["A", "B", "C", "D", "E"] | None = None
    breach_direction: str | None = None
    # the diameter traced from the image when the catalogue size was taken (ScrewGeometry)
    traced_diameter_mm: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "head_lps_mm", vec3(self.head_lps_mm))
        object.__setattr__(self, "tip_lps_mm", vec3(self.tip_lps_mm))
        for name in ("length_mm", "diameter_mm", "halo_mean_mm", "halo_max_mm"):
            _check_nonneg(name, getattr(self, name))
        _check_fraction("halo_coverage", self.halo_coverage)


@dataclass(frozen=True)
class CageMeasurement:
    """A cage's subsidence through each endplate (CONTRACT.md, "Cage subsidence")."""

    id: str
    level: str | None
    material: str
    centroid_lps_mm: Vec3
    subsidence_superior_mm: float
    subsidence_inferior_mm: float
    subsidence_grade: Literal["none", "mild", "severe"]
    subsidence_change_mm: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "centroid_lps_mm", vec3(self.centroid_lps_mm))
        for name in ("subsidence_superior_mm", "subsidence_inferior_mm"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        if self.subsidence_grade not in ("none", "mild", "severe"):
            raise ValueError(f"bad subsidence grade {self.subsidence_grade}")

    @property
    def subsidence_mm(self) -> float:
        """The larger of the two endplates (CONTRACT.md)."""
        return max(self.subsidence_superior_mm, self.subsidence_inferior_mm)


@dataclass(frozen=True)
class LevelMeasurement:
    """A disc level's bony bridging (CONTRACT.md, "Fusion bridging")."""

    level: str
    center_lps_mm: Vec3
    instrumented: bool
    bridging_fraction: float
    fusion: Literal["fused", "partial", "not_fused"]
    segmental_lordosis_deg: float | None = None
    disc_height_mm: float | None = None
    adjacent_to_fusion: bool = False
    disc_height_change_mm: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "center_lps_mm", vec3(self.center_lps_mm))
        _check_fraction("bridging_fraction", self.bridging_fraction)
        if self.fusion not in ("fused", "partial", "not_fused"):
            raise ValueError(f"bad fusion class {self.fusion}")


@dataclass(frozen=True)
class FractureFinding:
    """A gap across a rod or a screw shaft: where it is and how wide (LPS mm)."""

    id: str
    kind: Literal["rod", "screw"]
    hardware_id: str
    position_lps_mm: Vec3
    gap_mm: float

    def __post_init__(self):
        object.__setattr__(self, "position_lps_mm", vec3(self.position_lps_mm))
        _check_nonneg("gap_mm", self.gap_mm)
        if self.kind not in ("rod", "screw"):
            raise ValueError(f"fracture kind must be rod or screw, got {self.kind}")


def gertzbein_robbins_grade(breach_mm: float) -> str:
    """Pedicle breach grade: A none, B < 2 mm, C 2-4 mm, D 4-6 mm, E >= 6 mm
    (Gertzbein and Robbins, Spine 1990; CLINICAL.md)."""
    if breach_mm <= 0.0:
        return "A"
    if breach_mm < 2.0:
        return "B"
    if breach_mm < 4.0:
        return "C"
    if breach_mm < 6.0:
        return "D"
    return "E"


@dataclass(frozen=True)
class StudyResult:
    """The whole analysis of one study; what every writer reads."""

    screws: tuple[ScrewMeasurement, ...]
    cages: tuple[CageMeasurement, ...]
    levels: tuple[LevelMeasurement, ...]
    input: dict  # study/series UIDs, spacing_mm, shape, series choice reason
    criteria: dict
    notes: tuple[str, ...] = ()
    status: Literal["draft", "confirmed"] = "draft"
    extras: dict = field(default_factory=dict)
    fractures: tuple[FractureFinding, ...] = ()  # optional sections (baseline comparison, ...)


def as_plain(obj):
    """A dataclass (or nested containers of them) as JSON-ready plain values."""
    if hasattr(obj, "__dataclass_fields__"):
        d = asdict(obj)
        if isinstance(obj, CageMeasurement):
            d["subsidence_mm"] = obj.subsidence_mm
        return {k: as_plain(v) for k, v in d.items()}
    if isinstance(obj, dict):
        return {k: as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ------------------------------------------------------------------------------ evidence
# What each measurement was read from, kept for the report's images and the reviewer.
# Arrays stay out of measurements.json; the flow saves them beside it (evidence.npz).
@dataclass(frozen=True)
class ScrewEvidence:
    """Per-ray halo widths: ``widths_mm[s, a]`` at station ``s`` along the intraosseous shaft
    (head to tip) and azimuth ``a``; NaN where a ray was excluded (streak, left bone).
    ``station_lps_mm[s]`` are the axis points, ``azimuth_dirs[a]`` unit LPS ray directions."""

    id: str
    widths_mm: np.ndarray
    station_lps_mm: np.ndarray
    azimuth_dirs: np.ndarray
    true_radius_mm: float


@dataclass(frozen=True)
class CageEvidence:
    """The endplate planes fitted from the intact rim beside the cage and the cage's deepest
    point past each (LPS mm); ``rim_points_*`` are the endplate samples used for the fit."""

    id: str
    superior_plane: Plane
    inferior_plane: Plane
    deepest_superior_lps_mm: Vec3
    deepest_inferior_lps_mm: Vec3
    rim_points_superior_lps_mm: np.ndarray
    rim_points_inferior_lps_mm: np.ndarray


@dataclass(frozen=True)
class LevelEvidence:
    """The bridging map over the disc-space cross-section: a 2-D grid in the level's own
    plane, ``origin_lps_mm + u*step*axis_u + v*step*axis_v``; ``domain[v, u]`` is True inside
    the body outline with cage material excluded, ``bridged[v, u]`` where bone runs
    continuously from the upper endplate to the lower; ``estimated[v, u]`` (optional) marks
    domain cells that could not be read (beside a cage, where its metal blooms) and took
    the state of the nearest readable cell."""

    level: str
    origin_lps_mm: Vec3
    axis_u: Vec3
    axis_v: Vec3
    step_mm: float
    domain: np.ndarray
    bridged: np.ndarray
    estimated: np.ndarray | None = None
