"""Seeded synthetic CT of a lumbar spine after fusion, with exact ground truth.

The phantom is built in two stages:

1. **True map.** Every object (vertebra, disc, cage, screw, rod) is described in its own
   local frame (a vertebra is rotated about the patient x axis by its lordosis tilt) and
   rasterised only inside its bounding box, with a signed-distance soft edge one voxel wide
   so partial volume is right at every surface. The result is a noise-free HU map
   (``hu_true``) and a hard label map (``labels``, a voxel takes the label of the last
   object covering at least half of it).
2. **Imaging physics**, in this order: metal blooming (metal convolved with a wide Gaussian
   tail added to the metal itself, so a fixed 2200 HU threshold reads a titanium shaft about
   0.5-1 mm too wide, Elliott and Slakey CORR 2014), Gaussian PSF blur, beam-hardening
   streaks in each axial slice (dark bands joining pairs of metal objects plus radial
   streaks), Gaussian noise, clipping to the 12-bit range unless ``extended_hu``, rounding.

Coordinates are DICOM patient LPS millimetres: +x patient left, +y posterior, +z superior.
The truth dictionary is JSON-ready and follows the definitions of CONTRACT.md ("What is
measured") so measurement code can be scored against it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage

from pipeline.config import Config, Criteria
from pipeline.results import (
    Anatomy,
    CageGeometry,
    DiscLevel,
    Plane,
    Rod,
    ScrewGeometry,
    Vertebra,
)
from pipeline.volume import Volume

TRUTH_FORMAT = "fusionct-phantom-truth"
TRUTH_VERSION = 1

# ------------------------------------------------------------------------------ materials
# Label codes of the noise-free label map and their true HU values.
LABELS = {
    "soft_tissue": 0,
    "fat": 1,
    "csf": 2,
    "disc": 3,
    "trabecular": 4,
    "cortical": 5,
    "bridging_bone": 6,
    "nonbridging_bone": 7,
    "halo": 8,
    "sclerotic_rim": 9,
    "screw_shaft": 10,
    "tulip": 11,
    "rod": 12,
    "cage_titanium": 13,
    "cage_peek": 14,
    "marker": 15,
}
BONE_LABELS = (LABELS["trabecular"], LABELS["cortical"])
METAL_LABELS = (LABELS["screw_shaft"], LABELS["tulip"], LABELS["rod"], LABELS["cage_titanium"],
                LABELS["marker"])

HU = {
    "soft_tissue": 40.0,
    "fat": -100.0,
    "csf": 10.0,
    "disc": 80.0,
    "trabecular": 230.0,
    "cortical": 1000.0,
    "bridging_bone": 330.0,
    "halo": 25.0,
    "sclerotic_rim": 650.0,
    "titanium": 3500.0,
    "peek": 320.0,
    "tantalum": 8000.0,
}
SCLEROTIC_RIM_MM = 1.0
EXTENDED_HU_MAX = 30710.0  # top of the extended CT scale; still fits int16 with intercept -1024
CORTEX_MM = 1.0
TULIP_DIAMETER_MM = 12.0
TULIP_HEIGHT_MM = 12.0
ROD_DIAMETER_MM = 5.5
ROD_DEPTH_IN_TULIP_MM = 7.0  # rod axis this far posterior of the screw head, along the screw axis
MARKER_DIAMETER_MM = 1.0
NONBRIDGING_GAP_MM = 3.0
BRIDGING_GRID_MM = 0.1

# Lumbar anatomy defaults: (LR semi-axis, AP semi-axis, body height) in mm, tilt in degrees.
_BODY = {
    "T12": (19.0, 14.0, 24.0), "L1": (20.0, 14.5, 25.0), "L2": (20.5, 15.0, 25.5),
    "L3": (21.0, 15.5, 26.0), "L4": (22.0, 16.0, 26.0), "L5": (23.0, 16.5, 25.5),
    "S1": (24.0, 17.0, 26.0),
}
_TILT = {"T12": -8.0, "L1": -6.0, "L2": -3.0, "L3": 0.0, "L4": 5.0, "L5": 10.0, "S1": 20.0}
_ORDER = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
SACRUM_DEPTH_MM = 60.0  # how far the sacrum runs below the S1 body centre (past the FOV)


# ---------------------------------------------------------------------------------- spec
@dataclass
class CageSpec:
    """One level's interbody cage(s).

    material : ``"titanium"`` or ``"peek"`` (PEEK carries 4 tantalum marker pins).
    subsidence_superior_mm, subsidence_inferior_mm : how far the cage's deepest point sits
        past the upper vertebra's inferior endplate / the lower vertebra's superior endplate,
        along that endplate's normal (CONTRACT.md, "Cage subsidence").
    count : 1 (central) or 2 (bilateral).
    footprint_mm : (LR, AP) size of one cage; None picks 11 x 26 (one) or 11 x 22 (two).
    offset_mm : (LR, AP) shift of the footprint centre in the disc plane.
    """

    material: str = "titanium"
    subsidence_superior_mm: float = 0.0
    subsidence_inferior_mm: float = 0.0
    count: int = 1
    footprint_mm: tuple | None = None
    offset_mm: tuple = (0.0, 0.0)


@dataclass
class PhantomSpec:
    """Everything that defines one phantom study; unset findings get seeded defaults.

    Screw ids are ``"<vertebra>-<side>"`` (``"L4-left"``; left = patient left = +x); cage
    ids ``"<level>-cage<n>"``; levels ``"L4-L5"``. Dictionaries are keyed by those ids.

    Parameters
    ----------
    seed : int
        Seeds every default and the noise; same seed, same study.
    spacing_mm : (x, y, z) voxel size in mm (i, j, k).
    noise_hu : standard deviation of the added Gaussian noise in HU.
    streaks, blooming : switch the beam-hardening streaks / metal blooming on or off.
    psf_sigma_mm : (x, y, z) Gaussian PSF sigma in mm; None: 0.6 x in-plane spacing and
        0.4 x slice thickness. (0, 0, 0) switches the blur off.
    vertebrae : names top to bottom; ``"S1"`` last means the sacrum is in view.
    instrumented_levels : levels with screws in both vertebrae and (by default) a cage;
        None picks one or two adjacent levels from the seed.
    screw_diameters_mm, screw_lengths_mm, halo_widths_mm, halo_fractions, double_halo,
    halo_start_deg : per-screw values by screw id.
    cages : per level a ``CageSpec`` (or a dict of its fields) or None for no cage.
    bridging_fractions : per level, the fraction of the disc cross-section bridged by bone.
    tilts_deg : per vertebra, the rotation about +x (positive turns the superior endplate
        anteriorly, i.e. lordosis at L4-S1).
    disc_heights_mm : per level, the disc height at its centre.
    extended_hu : keep values above 3071 HU (extended-range scanner) instead of clipping.
    feet_first : the study is acquired feet first (k runs towards the feet, i to the right).
    vertebra_shifts_mm : per vertebra an LPS translation applied to it and its screws
        (for prior/follow-up pairs with known motion).
    vertebra_rotations_deg : per vertebra (rx, ry, rz) degrees, a rigid rotation about its
        centre (x, then y, then z, LPS axes) applied with its screws after the layout.
    screw_shifts_mm : per screw an extra LPS translation relative to its vertebra
        (screw migration).
    body_sizes_mm : per vertebra (LR semi-axis, AP semi-axis, height) overriding the
        seeded anatomy.
    rod_fractures, screw_fractures : per rod id (``rod-left``) / screw id a
        ``(position 0..1 along it, gap_mm)``: a gap across the rod / shaft.
    pedicle_breaches : per screw id ``(mm, "lateral" | "medial")``: the screw is moved out of
        its pedicle so its shaft reaches that far past the pedicle's outer cortex (truth
        ``breach_grade`` by Gertzbein-Robbins); such a screw has no halo.
    anatomy_seed : seeds the anatomy and findings instead of ``seed`` (``seed`` then only
        drives noise, streaks and UIDs): a follow-up of the same patient keeps it.
    study_date : ``YYYYMMDD`` for the DICOM study; None derives one from the seed.
    z_offset_mm : table position: the mean vertebral centre sits at this z.
    streak_bands : with ``streaks``, whether the dark bands joining two pieces of metal in a
        slice are drawn (False keeps only the radial streaks: the accuracy harness's
        ``--no-streak-bands`` measures what the bands do to the halo reading).
    hardware : False renders the same study without its screws, rods and cages (halos,
        sclerotic rims and the truth unchanged): the hardware's exact footprint in the image
        (blur, blooming, streaks) is the difference, which the accuracy harness's
        ``--known-metal`` subtracts to measure the halo reader's ceiling.
    """

    seed: int = 0
    spacing_mm: tuple = (0.5, 0.5, 1.0)
    noise_hu: float = 20.0
    streaks: bool = True
    blooming: bool = True
    psf_sigma_mm: tuple | None = None
    vertebrae: tuple = ("L3", "L4", "L5", "S1")
    instrumented_levels: tuple | None = None
    screw_diameters_mm: dict = field(default_factory=dict)
    screw_lengths_mm: dict = field(default_factory=dict)
    halo_widths_mm: dict = field(default_factory=dict)
    halo_fractions: dict = field(default_factory=dict)
    double_halo: dict = field(default_factory=dict)
    halo_start_deg: dict = field(default_factory=dict)
    cages: dict = field(default_factory=dict)
    bridging_fractions: dict = field(default_factory=dict)
    tilts_deg: dict = field(default_factory=dict)
    disc_heights_mm: dict = field(default_factory=dict)
    extended_hu: bool = False
    feet_first: bool = False
    vertebra_shifts_mm: dict = field(default_factory=dict)
    vertebra_rotations_deg: dict = field(default_factory=dict)
    screw_shifts_mm: dict = field(default_factory=dict)
    body_sizes_mm: dict = field(default_factory=dict)
    rod_fractures: dict = field(default_factory=dict)
    screw_fractures: dict = field(default_factory=dict)
    pedicle_breaches: dict = field(default_factory=dict)
    anatomy_seed: int | None = None
    study_date: str | None = None
    z_offset_mm: float = -120.0
    fov_x_mm: tuple = (-55.0, 55.0)
    fov_y_mm: tuple = (-35.0, 65.0)
    streak_bands: bool = True
    hardware: bool = True

    @property
    def findings_seed(self) -> int:
        """The seed of the anatomy and the findings (``anatomy_seed`` when set)."""
        return int(self.seed if self.anatomy_seed is None else self.anatomy_seed)

    def psf_sigma(self) -> tuple[float, float, float]:
        """The PSF sigma in mm along x, y, z (derived from the spacing when not given)."""
        if self.psf_sigma_mm is not None:
            return tuple(float(s) for s in self.psf_sigma_mm)
        sx, sy, sz = (float(s) for s in self.spacing_mm)
        return (0.6 * sx, 0.6 * sy, 0.4 * sz)


def demo_spec() -> PhantomSpec:
    """The small bundled study ``fusionct demo`` analyzes (made in a few seconds).

    L3 to S1 at 0.6 x 0.6 x 1.2 mm; L4-L5 and L5-S1 instrumented; one loose screw (L5-left,
    2 mm full halo), one partial halo below the loosening rule (L4-right), one double halo
    (S1-left); L4-L5 titanium cage with severe inferior subsidence and a fused level;
    L5-S1 PEEK cage, no subsidence, not fused.
    """
    return PhantomSpec(
        seed=7,
        spacing_mm=(0.6, 0.6, 1.2),
        vertebrae=("L3", "L4", "L5", "S1"),
        instrumented_levels=("L4-L5", "L5-S1"),
        screw_diameters_mm={"L4-left": 6.5, "L4-right": 6.5, "L5-left": 6.5, "L5-right": 6.5,
                            "S1-left": 7.5, "S1-right": 7.5},
        halo_widths_mm={"L4-left": 0.0, "L4-right": 1.5, "L5-left": 2.0, "L5-right": 0.0,
                        "S1-left": 2.5, "S1-right": 0.0},
        halo_fractions={"L4-right": 0.25, "L5-left": 1.0, "S1-left": 0.75},
        double_halo={"S1-left": True},
        cages={"L4-L5": CageSpec("titanium", 0.8, 4.6, 1),
               "L5-S1": CageSpec("peek", 0.5, 1.0, 2)},
        bridging_fractions={"L3-L4": 0.0, "L4-L5": 0.7, "L5-S1": 0.0},
    )


def pinned_spec(spec: PhantomSpec) -> PhantomSpec:
    """The same study with every seeded default written out explicitly (anatomy, hardware,
    findings) and ``anatomy_seed`` fixed, so changing one value or the seed changes nothing
    else: the base of prior/follow-up pairs."""
    res = resolve_spec(spec)
    sc = res["screws"]
    return replace(
        spec,
        anatomy_seed=spec.findings_seed,
        instrumented_levels=tuple(res["instrumented_levels"]),
        tilts_deg={n: v["tilt_deg"] for n, v in res["vertebrae"].items()},
        body_sizes_mm={n: (*v["semi_axes_mm"], v["height_mm"]) for n, v in res["vertebrae"].items()},
        disc_heights_mm={lv: v["disc_height_mm"] for lv, v in res["levels"].items()},
        cages={lv: (None if v["cage"] is None else CageSpec(**{**v["cage"],
                    "footprint_mm": tuple(v["cage"]["footprint_mm"]),
                    "offset_mm": tuple(v["cage"]["offset_mm"])}))
               for lv, v in res["levels"].items()},
        bridging_fractions={lv: v["bridging_fraction_target"] for lv, v in res["levels"].items()},
        screw_diameters_mm={k: v["diameter_mm"] for k, v in sc.items()},
        screw_lengths_mm={k: v["length_mm"] for k, v in sc.items()},
        halo_widths_mm={k: v["halo_width_mm"] for k, v in sc.items()},
        halo_fractions={k: v["halo_fraction"] for k, v in sc.items()},
        halo_start_deg={k: v["halo_start_deg"] for k, v in sc.items()},
        double_halo={k: v["double_halo"] for k, v in sc.items()},
    )


def follow_up_spec(prior: PhantomSpec, *, seed: int | None = None, days_later: int = 180,
                   vertebra_shifts_mm: dict | None = None,
                   vertebra_rotations_deg: dict | None = None,
                   screw_shifts_mm: dict | None = None,
                   added_subsidence_mm: dict | None = None,
                   halo_widths_mm: dict | None = None,
                   bridging_fractions: dict | None = None) -> PhantomSpec:
    """A later study of the same patient: same anatomy and hardware, known changes.

    Parameters
    ----------
    prior : the earlier study's spec.
    seed : the follow-up's noise/UID seed (default ``prior.seed + 1``).
    days_later : the follow-up's study date after the prior's.
    vertebra_shifts_mm, vertebra_rotations_deg : per vertebra rigid motion (added to the
        prior's), e.g. patient repositioning; screws move with their vertebra.
    screw_shifts_mm : per screw migration relative to its vertebra (added to the prior's).
    added_subsidence_mm : per level ``(superior, inferior)`` mm added to the cage's subsidence.
    halo_widths_mm, bridging_fractions : new values for those screws / levels.

    The truth of the two studies differs exactly by these changes.
    """
    base = pinned_spec(prior)
    new = {}

    def _add(old: dict, delta: dict | None) -> dict:
        out = {k: tuple(v) for k, v in old.items()}
        for k, d in (delta or {}).items():
            out[k] = tuple(float(a) + float(b) for a, b in zip(out.get(k, (0.0, 0.0, 0.0)), d))
        return out

    new["vertebra_shifts_mm"] = _add(base.vertebra_shifts_mm, vertebra_shifts_mm)
    new["vertebra_rotations_deg"] = _add(base.vertebra_rotations_deg, vertebra_rotations_deg)
    new["screw_shifts_mm"] = _add(base.screw_shifts_mm, screw_shifts_mm)
    cages = dict(base.cages)
    for lv, (dsup, dinf) in (added_subsidence_mm or {}).items():
        if cages.get(lv) is None:
            raise ValueError(f"no cage at {lv} to subside")
        c = cages[lv]
        cages[lv] = replace(c, subsidence_superior_mm=c.subsidence_superior_mm + float(dsup),
                            subsidence_inferior_mm=c.subsidence_inferior_mm + float(dinf))
    new["cages"] = cages
    if halo_widths_mm:
        new["halo_widths_mm"] = {**base.halo_widths_mm, **halo_widths_mm}
        new["halo_fractions"] = {k: (v if v > 0 else 1.0) for k, v in base.halo_fractions.items()}
    if bridging_fractions:
        new["bridging_fractions"] = {**base.bridging_fractions, **bridging_fractions}
    from datetime import date, timedelta
    d0 = prior_study_date(prior)
    d1 = date(int(d0[:4]), int(d0[4:6]), int(d0[6:])) + timedelta(days=int(days_later))
    new["study_date"] = d1.strftime("%Y%m%d")
    new["seed"] = prior.seed + 1 if seed is None else int(seed)
    return replace(base, **new)


def prior_study_date(spec: PhantomSpec) -> str:
    """The study date (``YYYYMMDD``) a spec's DICOM study carries."""
    if spec.study_date:
        return spec.study_date
    from datetime import date, timedelta
    return (date(2024, 3, 1) + timedelta(days=int(spec.seed) % 365)).strftime("%Y%m%d")


def spacing_specs(seed: int = 0, noise_hu: float = 20.0, streaks: bool = True) -> dict:
    """Specs at the three test spacings, same anatomy and findings (same seed).

    Returns ``{"fine": 0.35x0.35x0.6, "standard": 0.5x0.5x1.0, "coarse": 0.8x0.8x1.5}``.
    """
    spacings = {"fine": (0.35, 0.35, 0.6), "standard": (0.5, 0.5, 1.0), "coarse": (0.8, 0.8, 1.5)}
    return {name: PhantomSpec(seed=seed, spacing_mm=s, noise_hu=noise_hu, streaks=streaks)
            for name, s in spacings.items()}


# ------------------------------------------------------------------------ small geometry
def _rx(theta_deg: float) -> np.ndarray:
    """Rotation about +x; columns are the local (left, posterior, superior) axes in LPS."""
    t = math.radians(theta_deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotation_xyz(angles_deg) -> np.ndarray:
    """Rotation by rx about x, then ry about y, then rz about z (degrees, LPS axes)."""
    rx, ry, rz = (math.radians(float(a)) for a in angles_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rng(seed: int, *key) -> np.random.Generator:
    """An independent generator per object so overriding one value leaves the rest unchanged."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(words)


def level_names(vertebrae) -> list[str]:
    """Disc levels between consecutive vertebrae, top to bottom (``L4-L5``)."""
    v = list(vertebrae)
    return [f"{a}-{b}" for a, b in zip(v[:-1], v[1:])]


def _choice(rng, values, p=None):
    return values[int(rng.choice(len(values), p=p))]


# --------------------------------------------------------------------------- resolution
def _check_spec(spec: PhantomSpec) -> None:
    names = list(spec.vertebrae)
    if len(names) < 2:
        raise ValueError("a phantom needs at least two vertebrae")
    for n in names:
        if n not in _ORDER or n not in _BODY:
            raise ValueError(f"unknown vertebra {n!r}")
    idx = [_ORDER.index(n) for n in names]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise ValueError("vertebrae must be consecutive, top to bottom")
    if "S1" in names[:-1]:
        raise ValueError("S1 can only be the lowest vertebra")
    if len(spec.spacing_mm) != 3 or min(spec.spacing_mm) <= 0:
        raise ValueError("spacing_mm must be three positive numbers")


def resolve_spec(spec: PhantomSpec) -> dict:
    """All findings of a spec made concrete (spec values, else seeded defaults).

    Returns a JSON-ready dict: ``vertebrae`` (per name: tilt, semi-axes, height),
    ``levels`` (per level: disc height, instrumented, bridging fraction, cage spec or None),
    ``screws`` (per id: vertebra, side, diameter, length, halo width / fraction / start,
    double halo). Defaults avoid the decision cuts (halo width 1.0 mm, subsidence 2 and 4
    mm, bridging 0.1 and 0.5) so that a default phantom has an unambiguous answer.
    """
    _check_spec(spec)
    names = list(spec.vertebrae)
    levels = level_names(names)
    seed = spec.findings_seed
    g = _rng(seed, "study")
    if spec.instrumented_levels is None:
        runs = [(lv,) for lv in levels] + [tuple(levels[i:i + 2]) for i in range(len(levels) - 1)]
        instrumented = _choice(g, runs)
    else:
        instrumented = tuple(spec.instrumented_levels)
        for lv in instrumented:
            if lv not in levels:
                raise ValueError(f"instrumented level {lv!r} is not between listed vertebrae")

    verts = {}
    for n in names:
        r = _rng(seed, "vertebra", n)
        a, b, h = _BODY[n]
        jitter = r.uniform(-1.0, 1.0, size=3)
        tilt = float(spec.tilts_deg.get(n, _TILT[n] + 2.0 * jitter[0]))
        a, b, h = spec.body_sizes_mm.get(n, (a + 0.5 * jitter[1], b + 0.3 * jitter[1],
                                              h + 0.8 * jitter[2]))
        verts[n] = {
            "tilt_deg": tilt,
            "semi_axes_mm": [float(a), float(b)],
            "height_mm": float(h),
            "is_sacrum": n == "S1",
        }

    lv_out = {}
    for lv in levels:
        r = _rng(seed, "level", lv)
        inst = lv in instrumented
        disc_h = float(spec.disc_heights_mm.get(lv, r.uniform(8.5, 11.5)))
        # cage
        if lv in spec.cages:
            c = spec.cages[lv]
            cage = None if c is None else (c if isinstance(c, CageSpec) else CageSpec(**c))
        elif inst:
            sub = []
            for _ in range(2):
                band = int(r.choice(3, p=[0.55, 0.3, 0.15]))
                lo, hi = [(0.0, 1.7), (2.3, 3.7), (4.3, 5.2)][band]
                sub.append(round(float(r.uniform(lo, hi)), 2))
            cage = CageSpec(material=_choice(r, ["titanium", "peek"]),
                            subsidence_superior_mm=sub[0], subsidence_inferior_mm=sub[1],
                            count=int(r.choice([1, 2])))
        else:
            cage = None
        if cage is not None:
            if cage.material not in ("titanium", "peek"):
                raise ValueError(f"cage material must be titanium or peek, got {cage.material!r}")
            if cage.count not in (1, 2):
                raise ValueError("cage count must be 1 or 2")
            fp = cage.footprint_mm or ((11.0, 26.0) if cage.count == 1 else (11.0, 22.0))
            cage = replace(cage, footprint_mm=tuple(float(x) for x in fp))
        if lv in spec.bridging_fractions:
            bf = float(spec.bridging_fractions[lv])
        elif inst:
            band = int(r.choice(3, p=[0.35, 0.3, 0.35]))
            bf = [0.0, float(r.uniform(0.22, 0.38)), float(r.uniform(0.62, 0.78))][band]
        else:
            bf = 0.0
        if not 0.0 <= bf <= 1.0:
            raise ValueError(f"bridging fraction of {lv} must be within 0..1")
        lv_out[lv] = {
            "disc_height_mm": disc_h,
            "instrumented": inst,
            "bridging_fraction_target": bf,
            "cage": None if cage is None else asdict(cage),
        }

    screw_verts = []
    for lv in instrumented:
        for n in lv.split("-"):
            if n not in screw_verts:
                screw_verts.append(n)
    screw_verts.sort(key=names.index)
    screws = {}
    for n in screw_verts:
        for side in ("left", "right"):
            sid = f"{n}-{side}"
            r = _rng(seed, "screw", sid)
            d_default = _choice(r, [5.5, 6.5, 7.5]) if n != "S1" else _choice(r, [6.5, 7.5])
            len_default = _choice(r, [40.0, 45.0])
            w_default = _choice(r, [0.0, 0.0, 0.5, 1.5, 2.0, 2.5, 3.0])
            f_default = _choice(r, [1.0, 0.5, 0.75])
            dh_default = bool(w_default >= 1.5 and r.uniform() < 0.3)
            start_default = float(r.uniform(0.0, 360.0))
            w = float(spec.halo_widths_mm.get(sid, w_default))
            f = float(spec.halo_fractions.get(sid, f_default))
            if w < 0 or not 0.0 <= f <= 1.0:
                raise ValueError(f"halo of {sid} must have width >= 0 and fraction in 0..1")
            screws[sid] = {
                "vertebra": n,
                "side": side,
                "diameter_mm": float(spec.screw_diameters_mm.get(sid, d_default)),
                "length_mm": float(spec.screw_lengths_mm.get(sid, len_default)),
                "halo_width_mm": w,
                "halo_fraction": f if w > 0 else 0.0,
                "halo_start_deg": float(spec.halo_start_deg.get(sid, start_default)),
                "double_halo": bool(spec.double_halo.get(sid, dh_default)) and w > 0,
                "convergence_deg": 15.0,
            }
    _check_keys(spec, names, levels, list(screws))
    return {"instrumented_levels": list(instrumented), "vertebrae": verts, "levels": lv_out,
            "screws": screws}


def _check_keys(spec: PhantomSpec, names, levels, screw_ids) -> None:
    """Refuse per-object settings that name no object of this study (a typo would otherwise
    silently fall back to a default)."""
    groups = {
        "vertebra": (names, ("tilts_deg", "body_sizes_mm", "vertebra_shifts_mm",
                             "vertebra_rotations_deg")),
        "level": (levels, ("cages", "bridging_fractions", "disc_heights_mm")),
        "screw": (screw_ids, ("screw_diameters_mm", "screw_lengths_mm", "halo_widths_mm",
                              "halo_fractions", "double_halo", "halo_start_deg", "screw_shifts_mm",
                              "screw_fractures", "pedicle_breaches")),
        "rod": (["rod-left", "rod-right"], ("rod_fractures",)),
    }
    for what, (known, attrs) in groups.items():
        for attr in attrs:
            bad = sorted(set(getattr(spec, attr)) - set(known))
            if bad:
                raise ValueError(f"{attr} names no {what} of this study: {', '.join(map(str, bad))}"
                                 f" (known: {', '.join(known)})")


# ------------------------------------------------------------------------- layout (truth)
def _layout(spec: PhantomSpec, res: dict) -> dict:
    """Place vertebrae, levels, screws, cages and rods in LPS; returns the geometry truth."""
    names = list(spec.vertebrae)
    V = res["vertebrae"]
    # Stack from the bottom: each upper body's inferior endplate sits one disc height above
    # the lower's superior endplate along the bisector of the two axes.
    frames = {}
    bottom = names[-1]
    frames[bottom] = {"center": np.zeros(3), "R": _rx(V[bottom]["tilt_deg"])}
    for upper, lower in reversed(list(zip(names[:-1], names[1:]))):
        fl = frames[lower]
        ax_l = fl["R"][:, 2]
        p_sup = fl["center"] + 0.5 * V[lower]["height_mm"] * ax_l
        R_u = _rx(V[upper]["tilt_deg"])
        ax_u = R_u[:, 2]
        n = _unit(ax_l + ax_u)
        h = res["levels"][f"{upper}-{lower}"]["disc_height_mm"]
        p_inf = p_sup + h * n
        frames[upper] = {"center": p_inf + 0.5 * V[upper]["height_mm"] * ax_u, "R": R_u}
    lumbar = [frames[n]["center"] for n in names if n != "S1"] or [frames[names[0]]["center"]]
    shift = np.array([0.0, -np.mean([c[1] for c in lumbar]),
                      spec.z_offset_mm - np.mean([frames[n]["center"][2] for n in names])])
    for n in names:
        frames[n]["center"] = frames[n]["center"] + shift + np.asarray(
            spec.vertebra_shifts_mm.get(n, (0.0, 0.0, 0.0)), float)
        if n in spec.vertebra_rotations_deg:
            frames[n]["R"] = _rotation_xyz(spec.vertebra_rotations_deg[n]) @ frames[n]["R"]

    vertebrae = []
    for n in names:
        c, R = frames[n]["center"], frames[n]["R"]
        h = V[n]["height_mm"]
        sup_pt = c + 0.5 * h * R[:, 2]
        inf_pt = c - (SACRUM_DEPTH_MM if n == "S1" else 0.5 * h) * R[:, 2]
        vertebrae.append({
            "name": n,
            "center_lps_mm": c.tolist(),
            "axis_si": R[:, 2].tolist(),
            "axis_lr": R[:, 0].tolist(),
            "axis_ap": R[:, 1].tolist(),
            "semi_axes_mm": list(V[n]["semi_axes_mm"]),
            "height_mm": h,
            "tilt_deg": V[n]["tilt_deg"],
            "is_sacrum": n == "S1",
            "shift_mm": [float(x) for x in spec.vertebra_shifts_mm.get(n, (0.0, 0.0, 0.0))],
            "rotation_deg": [float(x) for x in spec.vertebra_rotations_deg.get(n, (0.0, 0.0, 0.0))],
            "superior_endplate": {"point_lps_mm": sup_pt.tolist(), "normal": R[:, 2].tolist()},
            "inferior_endplate": {"point_lps_mm": inf_pt.tolist(), "normal": (-R[:, 2]).tolist()},
        })
    vmap = {v["name"]: v for v in vertebrae}

    crit = Criteria()
    levels, cages = [], []
    for upper, lower in zip(names[:-1], names[1:]):
        lv = f"{upper}-{lower}"
        L = res["levels"][lv]
        pu = np.array(vmap[upper]["inferior_endplate"]["point_lps_mm"])
        pl = np.array(vmap[lower]["superior_endplate"]["point_lps_mm"])
        n = _unit(np.array(vmap[upper]["axis_si"]) + np.array(vmap[lower]["axis_si"]))
        e_u = np.array([1.0, 0.0, 0.0])
        e_u = _unit(e_u - (e_u @ n) * n)
        e_v = np.cross(n, e_u)
        center = 0.5 * (pu + pl)
        semi = [0.5 * (vmap[upper]["semi_axes_mm"][k] + vmap[lower]["semi_axes_mm"][k]) for k in (0, 1)]
        level = {
            "level": lv, "name": lv, "upper": upper, "lower": lower,
            "center_lps_mm": center.tolist(), "normal": n.tolist(),
            "axis_u": e_u.tolist(), "axis_v": e_v.tolist(),
            "semi_axes_mm": semi, "disc_height_mm": L["disc_height_mm"],
            "instrumented": L["instrumented"],
        }
        cs = L["cage"]
        if cs is not None:
            fp_lr, fp_ap = cs["footprint_mm"]
            offs = [0.0] if cs["count"] == 1 else [-(0.5 * fp_lr + 2.5), 0.5 * fp_lr + 2.5]
            for m, du in enumerate(offs, start=1):
                cages.append(_place_cage(f"{lv}-cage{m}", lv, cs, center, n, e_u, e_v,
                                         du + cs["offset_mm"][0], cs["offset_mm"][1],
                                         vmap[upper]["inferior_endplate"],
                                         vmap[lower]["superior_endplate"], crit))
        levels.append(level)

    screws = []
    for sid, S in res["screws"].items():
        v = vmap[S["vertebra"]]
        c = np.array(v["center_lps_mm"])
        R = frames[S["vertebra"]]["R"]
        a, b = v["semi_axes_mm"]
        sgn = 1.0 if S["side"] == "left" else -1.0
        conv = math.radians(S["convergence_deg"])
        tip_local = np.array([sgn * 8.0, -0.55 * b, 0.0])
        dir_local = np.array([-sgn * math.sin(conv), -math.cos(conv), 0.0])  # head -> tip
        head_local = tip_local - S["length_mm"] * dir_local
        extra = np.asarray(spec.screw_shifts_mm.get(sid, (0.0, 0.0, 0.0)), float)
        # the pedicle follows the nominal trajectory; migration and breach move the screw in it
        ped_tip = c + R @ tip_local
        ped_head = c + R @ head_local
        r = 0.5 * S["diameter_mm"]
        w, f = S["halo_width_mm"], S["halo_fraction"]
        ped_r = max(8.0, r + 5.5, r + w + 1.5 + (SCLEROTIC_RIM_MM if S["double_halo"] else 0.0))
        breach_mm, breach_dir = 0.0, None
        offset = np.zeros(3)
        if sid in spec.pedicle_breaches:
            breach_mm, breach_dir = spec.pedicle_breaches[sid]
            breach_mm = float(breach_mm)
            if breach_dir not in ("lateral", "medial") or breach_mm <= 0:
                raise ValueError(f"breach of {sid} must be (mm > 0, 'lateral' or 'medial')")
            lateral = np.array([sgn * math.cos(conv), -math.sin(conv), 0.0])
            side_dir = lateral if breach_dir == "lateral" else -lateral
            offset = R @ ((ped_r - r + breach_mm) * side_dir)
            w, f = 0.0, 0.0  # a breaching screw is modelled without a halo
        tip = ped_tip + offset + extra
        head = ped_head + offset + extra
        cov = f if w >= crit.halo_threshold_mm else 0.0
        screws.append({
            "id": sid, "vertebra": S["vertebra"], "side": S["side"],
            "head_lps_mm": head.tolist(), "tip_lps_mm": tip.tolist(),
            "length_mm": float(np.linalg.norm(tip - head)), "diameter_mm": S["diameter_mm"],
            "halo_width_mm": w, "halo_fraction": f if w > 0 else 0.0,
            "halo_start_deg": S["halo_start_deg"],
            "halo_mean_mm": w * f, "halo_max_mm": w if f >= 0.05 else 0.0,
            "halo_coverage": cov, "loosening": bool(cov >= crit.halo_coverage_for_loosening),
            "double_halo": S["double_halo"] and w > 0,
            "fracture": _fracture_truth(spec.screw_fractures.get(sid), [head, tip]),
            "shift_mm": extra.tolist(),
            "breach_mm": breach_mm, "breach_direction": breach_dir,
            "breach_grade": _gertzbein_robbins(breach_mm),
            "pedicle_head_lps_mm": ped_head.tolist(), "pedicle_tip_lps_mm": ped_tip.tolist(),
            "pedicle_radius_mm": ped_r,
        })

    rods = []
    for side in ("left", "right"):
        pts = []
        for s in sorted((s for s in screws if s["side"] == side),
                        key=lambda s: -s["head_lps_mm"][2]):
            h, t = np.array(s["head_lps_mm"]), np.array(s["tip_lps_mm"])
            ax = _unit(t - h)
            pts.append(h - ROD_DEPTH_IN_TULIP_MM * ax)
        if len(pts) >= 2:
            first = pts[0] + 6.0 * _unit(pts[0] - pts[1])
            last = pts[-1] + 6.0 * _unit(pts[-1] - pts[-2])
            poly = [first, *pts, last]
            rid = f"rod-{side}"
            rods.append({"id": rid, "side": side, "diameter_mm": ROD_DIAMETER_MM,
                         "points_lps_mm": [p.tolist() for p in poly],
                         "fracture": _fracture_truth(spec.rod_fractures.get(rid), poly)})
    return {"vertebrae": vertebrae, "levels": levels, "screws": screws, "cages": cages,
            "rods": rods}


def _gertzbein_robbins(breach_mm: float) -> str:
    """Pedicle breach grade (Gertzbein-Robbins): A none, B < 2, C 2-4, D 4-6, E >= 6 mm."""
    if breach_mm <= 0:
        return "A"
    return "B" if breach_mm < 2 else "C" if breach_mm < 4 else "D" if breach_mm < 6 else "E"


def _fracture_truth(frac, poly):
    """Where a gap cuts a rod or shaft: ``frac = (position 0..1 along the polyline, gap_mm)``."""
    if frac is None:
        return None
    pos, gap = float(frac[0]), float(frac[1])
    if not (0.0 < pos < 1.0 and gap > 0):
        raise ValueError("a fracture needs a position in (0, 1) and a gap > 0 mm")
    poly = [np.asarray(p, float) for p in poly]
    seg = [np.linalg.norm(q - p) for p, q in zip(poly[:-1], poly[1:])]
    target = pos * sum(seg)
    for p, q, L in zip(poly[:-1], poly[1:], seg):
        if target <= L:
            return {"position": pos, "gap_mm": gap, "center_lps_mm": (p + (q - p) * target / L).tolist(),
                    "direction": _unit(q - p).tolist()}
        target -= L
    raise AssertionError("unreachable")


def _place_cage(cid, lv, cs, center, n, e_u, e_v, du, dv, up_inf, low_sup, crit) -> dict:
    """Solve the cage's centre along the level normal and its half height so that its deepest
    point sits ``subsidence_superior_mm`` past the upper endplate and
    ``subsidence_inferior_mm`` past the lower one (each along that endplate's normal)."""
    hu_, hv_ = 0.5 * cs["footprint_mm"][0], 0.5 * cs["footprint_mm"][1]
    p0 = center + du * e_u + dv * e_v
    Nu, Pu = np.array(up_inf["normal"]), np.array(up_inf["point_lps_mm"])
    Nl, Pl = np.array(low_sup["normal"]), np.array(low_sup["point_lps_mm"])
    su0, sl0 = (p0 - Pu) @ Nu, (p0 - Pl) @ Nl
    Ku = hu_ * abs(e_u @ Nu) + hv_ * abs(e_v @ Nu)
    Kl = hu_ * abs(e_u @ Nl) + hv_ * abs(e_v @ Nl)
    A, B = n @ Nu, n @ Nl  # A < 0 < B
    d_sup, d_inf = cs["subsidence_superior_mm"], cs["subsidence_inferior_mm"]
    # min over the box of s_up = su0 + t*A - hh*|A| - Ku = -d_sup (top face is deepest)
    # min over the box of s_low = sl0 + t*B - hh*|B| - Kl = -d_inf
    M = np.array([[A, -abs(A)], [B, -abs(B)]])
    rhs = np.array([-d_sup - su0 + Ku, -d_inf - sl0 + Kl])
    t, hh = np.linalg.solve(M, rhs)
    if hh <= 1.0:
        raise ValueError(f"cage {cid} does not fit its disc space")
    centroid = p0 + t * n
    axes = np.array([n, e_u, e_v])
    half = np.array([hh, hu_, hv_])
    # check by the support function
    chk_u = -((centroid - Pu) @ Nu - np.abs(axes @ Nu) @ half)
    chk_l = -((centroid - Pl) @ Nl - np.abs(axes @ Nl) @ half)
    assert abs(chk_u - d_sup) < 1e-9 and abs(chk_l - d_inf) < 1e-9
    smax = max(d_sup, d_inf)
    markers = None
    if cs["material"] == "peek":
        ins = Config().peek_marker_inset_mm
        markers = []
        for su in (-1, 1):
            for sv in (-1, 1):
                base = centroid + su * (half[1] - ins) * axes[1] + sv * (half[2] - ins) * axes[2]
                markers.append([(base - (half[0] - ins) * axes[0]).tolist(),
                                (base + (half[0] - ins) * axes[0]).tolist()])
    return {
        "id": cid, "level": lv, "material": cs["material"],
        "centroid_lps_mm": centroid.tolist(), "axes": axes.tolist(),
        "half_sizes_mm": half.tolist(),
        "subsidence_superior_mm": float(d_sup), "subsidence_inferior_mm": float(d_inf),
        "subsidence_mm": float(smax), "subsidence_grade": crit.subsidence_grade(smax),
        "subsidence_grade_superior": crit.subsidence_grade(d_sup),
        "subsidence_grade_inferior": crit.subsidence_grade(d_inf),
        "marker_inset_mm": Config().peek_marker_inset_mm if cs["material"] == "peek" else None,
        "marker_diameter_mm": MARKER_DIAMETER_MM if cs["material"] == "peek" else None,
        "markers_lps_mm": markers,
    }


# ------------------------------------------------------------------------------ the grid
class _Grid:
    """The canonical (head-first, identity direction) voxel grid and bbox helpers."""

    def __init__(self, origin, spacing, shape_kji):
        self.origin = np.asarray(origin, float)
        self.spacing = np.asarray(spacing, float)
        self.shape = tuple(int(s) for s in shape_kji)

    def slices(self, lo, hi):
        """Index slices (k, j, i) of the voxels whose centres lie in the LPS box [lo, hi]."""
        out = []
        for ax, n in zip((2, 1, 0), self.shape):
            a = int(math.floor((lo[ax] - self.origin[ax]) / self.spacing[ax]))
            b = int(math.ceil((hi[ax] - self.origin[ax]) / self.spacing[ax])) + 1
            a, b = max(a, 0), min(b, n)
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)

    def coords(self, sl):
        """Broadcastable LPS x (1,1,ni), y (1,nj,1), z (nk,1,1) of the voxel centres in ``sl``."""
        sk, sj, si = sl
        x = self.origin[0] + self.spacing[0] * np.arange(si.start, si.stop, dtype=np.float32)
        y = self.origin[1] + self.spacing[1] * np.arange(sj.start, sj.stop, dtype=np.float32)
        z = self.origin[2] + self.spacing[2] * np.arange(sk.start, sk.stop, dtype=np.float32)
        return x[None, None, :], y[None, :, None], z[:, None, None]

    def local(self, sl, center, R):
        """Coordinates of the voxel centres in ``sl`` in the frame (center, columns of R)."""
        x, y, z = self.coords(sl)
        dx, dy, dz = (x - np.float32(center[0]), y - np.float32(center[1]),
                      z - np.float32(center[2]))
        R = np.asarray(R, np.float32)
        return [dx * R[0, m] + dy * R[1, m] + dz * R[2, m] for m in range(3)]

    def width(self, direction) -> float:
        """Extent of one voxel along a unit direction (the soft-edge ramp width, mm)."""
        return float(np.abs(np.asarray(direction, float)) @ self.spacing)


def _bbox(center, R, lo_local, hi_local, pad=1.0):
    """LPS axis-aligned box around a local box [lo_local, hi_local] in frame (center, R)."""
    corners = np.array([[a, b, c] for a in (lo_local[0], hi_local[0])
                        for b in (lo_local[1], hi_local[1]) for c in (lo_local[2], hi_local[2])])
    pts = corners @ np.asarray(R).T + np.asarray(center)
    return pts.min(0) - pad, pts.max(0) + pad


def _soft(d, width):
    """Inside fraction of a voxel whose centre is ``d`` mm inside a surface (linear ramp)."""
    return np.clip(0.5 + d / width, 0.0, 1.0).astype(np.float32)


def _composite(hu, lab, sl, alpha, value, label):
    """Paint ``value`` over ``hu`` with coverage ``alpha``; label where alpha >= 0.5."""
    h = hu[sl]
    h += alpha * (np.asarray(value, np.float32) - h)
    lab[sl][alpha >= 0.5] = label


def _ellipse_sdf(u, v, a, b):
    """Approximate inside distance (mm) to the ellipse (u/a)^2 + (v/b)^2 = 1."""
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    gn = np.sqrt((u / a ** 2) ** 2 + (v / b ** 2) ** 2)
    return (1.0 - q) * np.where(gn > 1e-6, q / np.maximum(gn, 1e-6), min(a, b))


def _box_sdf(l, half):
    """Inside distance to a box (exact inside), and the index of the nearest face axis."""
    d = np.stack([np.float32(h) - np.abs(x) for x, h in zip(l, half)])
    return d.min(0), d.argmin(0)


def _texture(x, y, z, seed, key=""):
    """Mild trabecular texture (HU, about +-25), a smooth deterministic function of position
    (mm, in whatever frame the caller passes)."""
    r = _rng(seed, "texture", key)
    ph = r.uniform(0, 2 * np.pi, 6).astype(np.float32)
    k = np.float32(2 * np.pi)
    return (14.0 * np.sin(k * x / 3.7 + ph[0]) * np.sin(k * y / 4.3 + ph[1])
            + 10.0 * np.sin(k * z / 3.1 + ph[2]) * np.sin(k * (x + y) / 5.9 + ph[3])
            + 6.0 * np.sin(k * (y - z) / 2.3 + ph[4])).astype(np.float32)


# ----------------------------------------------------------------------------- painters
def _paint_background(g: _Grid, hu, lab):
    hu[...] = HU["soft_tissue"]
    lab[...] = LABELS["soft_tissue"]
    # subcutaneous fat behind the spine and two retroperitoneal fat pads in front of it
    sl = g.slices(np.array([-1e3, 54.0, -1e5]), np.array([1e3, 1e3, 1e5]))
    if sl is not None:
        x, y, z = g.coords(sl)
        alpha = np.broadcast_to(_soft(y - 56.0, g.spacing[1]), hu[sl].shape)
        _composite(hu, lab, sl, alpha, HU["fat"], LABELS["fat"])
    for cx in (-38.0, 38.0):
        sl = g.slices(np.array([cx - 14, -36.0, -1e5]), np.array([cx + 14, -8.0, 1e5]))
        if sl is None:
            continue
        x, y, z = g.coords(sl)
        d = _ellipse_sdf(x - cx, y + 22.0, 12.0, 10.0)
        alpha = np.broadcast_to(_soft(d, g.spacing[0]), hu[sl].shape)
        _composite(hu, lab, sl, alpha, HU["fat"], LABELS["fat"])


def _vertebra_parts(v: dict, screws: list) -> list:
    """Local-frame primitives whose union is the vertebra (body, pedicles, posterior arch)."""
    a, b = v["semi_axes_mm"]
    h = v["height_mm"]
    sac = v["is_sacrum"]
    parts = []
    lo_w = -SACRUM_DEPTH_MM if sac else -0.5 * h
    parts.append(("ellcyl", dict(a=a, b=b, v0=0.0, w0=lo_w, w1=0.5 * h)))
    if sac:
        parts.append(("ellcyl", dict(a=a + 26.0, b=13.0, v0=9.0, w0=lo_w, w1=0.5 * h - 4.0)))
        parts.append(("box", dict(c=(0.0, 31.0, -10.0), half=(20.0, 4.0, 14.0))))
        parts.append(("box", dict(c=(0.0, 38.0, -14.0), half=(2.5, 5.0, 9.0))))
    else:
        parts.append(("box", dict(c=(0.0, 34.0, -3.0), half=(13.0, 3.0, 8.0))))     # lamina
        parts.append(("box", dict(c=(0.0, 46.0, -6.0), half=(3.0, 10.0, 6.5))))     # spinous
        for s in (1.0, -1.0):                                                        # transverse
            parts.append(("box", dict(c=(s * 31.0, 21.0, 0.0), half=(10.0, 3.0, 4.0))))
    # pedicles: cylinders along each screw's axis (or the default trajectory), ending at the head
    mine = {s["side"]: s for s in screws if s["vertebra"] == v["name"]}
    c = np.array(v["center_lps_mm"])
    R = np.column_stack([v["axis_lr"], v["axis_ap"], v["axis_si"]])
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        if side in mine:
            s = mine[side]
            head = R.T @ (np.array(s["pedicle_head_lps_mm"]) - c)
            tip = R.T @ (np.array(s["pedicle_tip_lps_mm"]) - c)
            radius = s["pedicle_radius_mm"]
        else:
            conv = math.radians(15.0)
            tip = np.array([sgn * 8.0, -0.55 * b, 0.0])
            head = tip - 42.0 * np.array([-sgn * math.sin(conv), -math.cos(conv), 0.0])
            radius = 8.0
        ax = _unit(tip - head)
        # the pedicle runs from the head to where the axis is well inside the body
        t_end = float((head[1] - 0.3 * b) / -ax[1]) if ax[1] < 0 else 20.0
        parts.append(("cyl", dict(p=head, ax=ax, r=radius, t0=0.0, t1=t_end)))
    return parts


def _part_bounds(kind, p):
    if kind == "ellcyl":
        return (np.array([-p["a"], p["v0"] - p["b"], p["w0"]]),
                np.array([p["a"], p["v0"] + p["b"], p["w1"]]))
    if kind == "box":
        c, h = np.array(p["c"]), np.array(p["half"])
        return c - h, c + h
    if kind == "cyl":
        e0, e1 = p["p"] + p["t0"] * p["ax"], p["p"] + p["t1"] * p["ax"]
        return np.minimum(e0, e1) - p["r"], np.maximum(e0, e1) + p["r"]
    raise ValueError(kind)


def _paint_vertebra(g: _Grid, hu, lab, v: dict, screws: list, seed: int):
    """Union of the vertebra's parts as one signed-distance field, cortex within 1 mm of its
    surface, trabecular bone inside; the canal is carved out and filled with CSF."""
    c = np.array(v["center_lps_mm"])
    R = np.column_stack([v["axis_lr"], v["axis_ap"], v["axis_si"]])
    parts = _vertebra_parts(v, screws)
    bounds = [_part_bounds(k, p) for k, p in parts]
    lo = np.min([b[0] for b in bounds], axis=0)
    hi = np.max([b[1] for b in bounds], axis=0)
    sl = g.slices(*_bbox(c, R, lo, hi, pad=2.0))
    if sl is None:
        return
    shape = hu[sl].shape
    u, vv, w = (np.broadcast_to(t, shape) for t in g.local(sl, c, R))
    w_inplane = float(0.5 * (g.spacing[0] + g.spacing[1]))
    w_si = g.width(R[:, 2])
    dist = np.full(shape, -1e3, np.float32)
    width = np.full(shape, w_inplane, np.float32)
    for kind, p in parts:
        lo_p, hi_p = _part_bounds(kind, p)
        psl = g.slices(*_bbox(c, R, lo_p, hi_p, pad=2.0))
        if psl is None:
            continue
        # the part's own box, as a window into the vertebra's arrays
        win = tuple(slice(max(a.start, b.start) - b.start, min(a.stop, b.stop) - b.start)
                    for a, b in zip(psl, sl))
        if any(x.stop <= x.start for x in win):
            continue
        uu, vq, wq = u[win], vv[win], w[win]
        if kind == "ellcyl":
            de = _ellipse_sdf(uu, vq - p["v0"], p["a"], p["b"])
            dp = np.minimum(p["w1"] - wq, wq - p["w0"])
            d = np.minimum(de, dp)
            wd = np.where(de < dp, np.float32(w_inplane), np.float32(w_si))
        elif kind == "box":
            d, arg = _box_sdf((uu - p["c"][0], vq - p["c"][1], wq - p["c"][2]), p["half"])
            table = np.array([g.width(R[:, 0]), g.width(R[:, 1]), w_si], np.float32)
            wd = table[arg]
        else:  # cylinder along ax from p
            ax = np.asarray(p["ax"], np.float32)
            r0, r1, r2 = uu - p["p"][0], vq - p["p"][1], wq - p["p"][2]
            t = ax[0] * r0 + ax[1] * r1 + ax[2] * r2
            q0, q1, q2 = r0 - t * ax[0], r1 - t * ax[1], r2 - t * ax[2]
            rho = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2)
            dr = p["r"] - rho
            da = np.minimum(t - p["t0"], p["t1"] - t)
            d = np.minimum(dr, da)
            # radial direction in LPS for the ramp width
            Rf = R.astype(np.float32)
            sp = g.spacing.astype(np.float32)
            wr = sum(np.abs(Rf[i, 0] * q0 + Rf[i, 1] * q1 + Rf[i, 2] * q2) * sp[i] for i in range(3))
            wr = wr / np.maximum(rho, np.float32(1e-3))
            wd = np.where(dr < da, wr, np.float32(g.width(R @ p["ax"])))
        cur = dist[win]
        better = d > cur
        dist[win] = np.where(better, d, cur)
        width[win] = np.where(better, wd, width[win])
    # the spinal canal: CSF, carved out of the bone
    cb = 6.5 if v["is_sacrum"] else 7.0
    v0 = v["semi_axes_mm"][1] + 1.0 + cb
    w_half = 0.5 * v["height_mm"] + 6.0
    near = ((np.abs(u) <= 9.0 + 2.0) & (np.abs(vv - v0) <= cb + 2.0) & (np.abs(w) <= w_half + 2.0))
    if near.any():
        de = _ellipse_sdf(u[near], vv[near] - v0, 9.0, cb)
        dw = w_half - np.abs(w[near])
        d_canal = np.minimum(de, dw)
        canal = np.zeros(shape, np.float32)
        canal[near] = _soft(d_canal, np.where(de < dw, np.float32(w_inplane), np.float32(w_si)))
        _composite(hu, lab, sl, canal, HU["csf"], LABELS["csf"])
        dist[near] = np.minimum(dist[near], -d_canal)
    alpha = _soft(dist, width)
    shell = _soft(CORTEX_MM - dist, width)
    # value: cortex near the surface, textured trabecular bone inside; the texture is in
    # the vertebra's own frame so it moves with the vertebra between two studies
    value = np.full(shape, HU["cortical"], np.float32)
    inner = (alpha > 0) & (shell < 1)
    trab = HU["trabecular"] + _texture(u[inner], vv[inner], w[inner], seed, v["name"])
    value[inner] = trab + shell[inner] * (HU["cortical"] - trab)
    _composite(hu, lab, sl, alpha, value, LABELS["trabecular"])
    sub = lab[sl]
    sub[(alpha >= 0.5) & (shell >= 0.5)] = LABELS["cortical"]


def _bridging_masks(level: dict, cages: list, target: float, seed: int,
                    clamp: bool = False) -> dict:
    """2-D maps (0.1 mm grid) over the level's cross-section: the domain (inside the body
    outline, cage footprints excluded), bridged columns (fraction ``target`` of the domain)
    and non-bridging columns (interrupted by a gap). Returns the maps and exact fractions."""
    a, b = level["semi_axes_mm"]
    step = BRIDGING_GRID_MM
    nu, nv = int(round(2 * a / step)), int(round(2 * b / step))
    u = (-a + step * (np.arange(nu) + 0.5)).astype(np.float32)
    v = (-b + step * (np.arange(nv) + 0.5)).astype(np.float32)
    U, Vg = np.meshgrid(u, v)  # [v, u]
    ell = (U / a) ** 2 + (Vg / b) ** 2 <= 1.0
    inner = (U / (a - 0.8)) ** 2 + (Vg / (b - 0.8)) ** 2 <= 1.0
    c = np.array(level["center_lps_mm"])
    e_u, e_v = np.array(level["axis_u"]), np.array(level["axis_v"])
    cage_fp = np.zeros_like(ell)
    cage_margin = np.zeros_like(ell)
    for cg in cages:
        if cg["level"] != level["level"]:
            continue
        rel = np.array(cg["centroid_lps_mm"]) - c
        cu, cv = rel @ e_u, rel @ e_v
        ax = np.array(cg["axes"])
        hs = cg["half_sizes_mm"]
        # footprint: project the box onto the level plane (axes[1], axes[2] lie in it here)
        lu = (U - cu) * (ax[1] @ e_u) + (Vg - cv) * (ax[1] @ e_v)
        lv = (U - cu) * (ax[2] @ e_u) + (Vg - cv) * (ax[2] @ e_v)
        cage_fp |= (np.abs(lu) <= hs[1]) & (np.abs(lv) <= hs[2])
        cage_margin |= (np.abs(lu) <= hs[1] + 0.4) & (np.abs(lv) <= hs[2] + 0.4)
    domain = ell & ~cage_fp
    allowed = inner & ~cage_margin
    r = _rng(seed, "bridging", level["level"])
    bridged = np.zeros_like(ell)
    frac = 0.0
    reachable = float(allowed.sum() / domain.sum())
    if clamp and target > reachable - 0.03:
        target = max(0.6, reachable - 0.03)  # a seeded default "fused" that must fit
    if target > 0:
        if allowed.sum() < target * domain.sum():
            raise ValueError(f"bridging fraction {target} is not reachable at {level['level']} "
                             f"(at most {reachable:.2f} with these cages)")
        # random blobs, grown together until they cover the target fraction
        cand = np.flatnonzero(allowed.ravel())
        n_blobs = int(r.integers(5, 10))
        centers = cand[r.choice(cand.size, n_blobs, replace=False)]
        cu_, cv_ = U.ravel()[centers], Vg.ravel()[centers]
        base = r.uniform(0.6, 1.4, n_blobs)
        aspect = r.uniform(0.7, 1.3, n_blobs)
        d2 = np.min([((U - cu_[m]) / aspect[m]) ** 2 + ((Vg - cv_[m]) * aspect[m]) ** 2
                     - 0.0 for m in range(n_blobs)] / (base[:, None, None] ** 2), axis=0)
        # bridged = allowed & (d2 <= s^2); choose s so the fraction meets the target
        dvals = np.sort(d2[allowed])
        need = int(round(target * domain.sum()))
        need = min(max(need, 1), dvals.size)
        s2 = dvals[need - 1]
        bridged = allowed & (d2 <= s2)
        frac = float(bridged.sum() / domain.sum())
    # non-bridging columns: a few blobs away from the bridged ones, cut by a disc-density gap
    far = allowed & ~ndimage.binary_dilation(bridged, iterations=10)
    nonbridged = np.zeros_like(ell)
    gaps = []
    cand = np.flatnonzero(far.ravel())
    if cand.size:
        for m in range(int(r.integers(2, 4))):
            k = cand[int(r.integers(cand.size))]
            cu_, cv_ = U.ravel()[k], Vg.ravel()[k]
            rad = r.uniform(1.5, 3.0)
            blob = far & ((U - cu_) ** 2 + (Vg - cv_) ** 2 <= rad ** 2) & ~nonbridged
            nonbridged |= blob
            gaps.append({"center_uv_mm": [float(cu_), float(cv_)], "radius_mm": float(rad),
                         "gap_position": float(r.uniform(0.3, 0.7))})
    gap_pos = np.zeros(ell.shape, np.float32)
    for gp in gaps:
        cu_, cv_ = gp["center_uv_mm"]
        sel = nonbridged & ((U - cu_) ** 2 + (Vg - cv_) ** 2 <= gp["radius_mm"] ** 2)
        gap_pos[sel] = gp["gap_position"]
    return {"origin_uv_mm": (-a, -b), "step_mm": step, "domain": domain, "bridged": bridged,
            "target": float(target),
            "nonbridged": nonbridged, "gap_pos": gap_pos, "fraction": frac,
            "nonbridging_columns": gaps, "cage_footprint": cage_fp}


def _paint_disc(g: _Grid, hu, lab, level: dict, vmap: dict, masks: dict, seed: int):
    """The disc between the two endplate planes inside the body outline; bone where the
    bridging map says so (continuous), interrupted bone in the non-bridging columns."""
    a, b = level["semi_axes_mm"]
    c = np.array(level["center_lps_mm"])
    n = np.array(level["normal"])
    R = np.column_stack([level["axis_u"], level["axis_v"], n])
    up = vmap[level["upper"]]["inferior_endplate"]
    lo = vmap[level["lower"]]["superior_endplate"]
    wedge = math.acos(min(1.0, abs(float(np.dot(up["normal"], lo["normal"])))))
    half_h = 0.5 * level["disc_height_mm"] + b * math.tan(wedge) + 2.0
    sl = g.slices(*_bbox(c, R, (-a, -b, -half_h), (a, b, half_h), pad=1.0))
    if sl is None:
        return
    shape = hu[sl].shape
    u, v, _ = (np.broadcast_to(t, shape) for t in g.local(sl, c, R))
    x, y, z = g.coords(sl)
    s_up = ((x - up["point_lps_mm"][0]) * up["normal"][0] + (y - up["point_lps_mm"][1]) * up["normal"][1]
            + (z - up["point_lps_mm"][2]) * up["normal"][2])
    s_lo = ((x - lo["point_lps_mm"][0]) * lo["normal"][0] + (y - lo["point_lps_mm"][1]) * lo["normal"][1]
            + (z - lo["point_lps_mm"][2]) * lo["normal"][2])
    s_up, s_lo = np.broadcast_to(s_up, shape), np.broadcast_to(s_lo, shape)
    de = _ellipse_sdf(u, v, a, b)
    w_pl = g.width(n)
    d = np.minimum(de, np.minimum(s_up, s_lo))
    wd = np.where(de < np.minimum(s_up, s_lo), np.float32(g.spacing[0]), np.float32(w_pl))
    alpha = _soft(d, wd)
    ou, ov = masks["origin_uv_mm"]
    st = masks["step_mm"]
    nv_, nu_ = masks["bridged"].shape
    iu = np.clip(((u - ou) / st).astype(np.int32), 0, nu_ - 1)
    iv = np.clip(((v - ov) / st).astype(np.int32), 0, nv_ - 1)
    br = masks["bridged"][iv, iu]
    nb = masks["nonbridged"][iv, iu]
    gp = masks["gap_pos"][iv, iu]
    hgt = s_up + s_lo
    in_gap = np.abs(s_lo - gp * hgt) < 0.5 * NONBRIDGING_GAP_MM
    bone_val = HU["bridging_bone"] + _texture(u, v, _, seed, level["level"])
    value = np.where(br | (nb & ~in_gap), bone_val, np.float32(HU["disc"]))
    _composite(hu, lab, sl, alpha, value, LABELS["disc"])
    sub = lab[sl]
    sub[(alpha >= 0.5) & br] = LABELS["bridging_bone"]
    sub[(alpha >= 0.5) & nb & ~in_gap] = LABELS["nonbridging_bone"]


def _paint_cage(g: _Grid, hu, lab, cg: dict):
    axes = np.array(cg["axes"])  # rows
    R = axes.T
    c = np.array(cg["centroid_lps_mm"])
    half = np.array(cg["half_sizes_mm"])
    sl = g.slices(*_bbox(c, R, -half, half, pad=1.5))
    if sl is None:
        return
    shape = hu[sl].shape
    l = [np.broadcast_to(t, shape) for t in g.local(sl, c, R)]
    d, arg = _box_sdf(l, half)
    table = np.array([g.width(axes[m]) for m in range(3)], np.float32)
    alpha = _soft(d, table[arg])
    if cg["material"] == "titanium":
        _composite(hu, lab, sl, alpha, HU["titanium"], LABELS["cage_titanium"])
        return
    _composite(hu, lab, sl, alpha, HU["peek"], LABELS["cage_peek"])
    inset = cg["marker_inset_mm"]
    for su in (-1, 1):
        for sv in (-1, 1):
            pu, pv = su * (half[1] - inset), sv * (half[2] - inset)
            rho = np.sqrt((l[1] - pu) ** 2 + (l[2] - pv) ** 2)
            dr = 0.5 * MARKER_DIAMETER_MM - rho
            da = (half[0] - inset) - np.abs(l[0])
            dd = np.minimum(dr, da)
            a2 = _soft(dd, np.where(dr < da, np.float32(g.spacing[0]), table[0]))
            _composite(hu, lab, sl, a2, HU["tantalum"], LABELS["marker"])


def _screw_frame(s: dict):
    head, tip = np.array(s["head_lps_mm"]), np.array(s["tip_lps_mm"])
    ax = _unit(tip - head)
    sup = np.array([0.0, 0.0, 1.0])
    e1 = sup - (sup @ ax) * ax
    if np.linalg.norm(e1) < 1e-6:
        e1 = np.array([1.0, 0.0, 0.0]) - ax[0] * ax
    e1 = _unit(e1)
    e2 = np.cross(ax, e1)
    return head, ax, e1, e2


def _paint_screw(g: _Grid, hu, lab, s: dict, halo_only: bool):
    """Halo (and sclerotic rim) around the intraosseous shaft, replacing bone only; then the
    titanium shaft from head to tip and the tulip behind the head."""
    head, ax, e1, e2 = _screw_frame(s)
    L = s["length_mm"]
    r = 0.5 * s["diameter_mm"]
    R = np.column_stack([e1, e2, ax])
    reach = max(r + s["halo_width_mm"] + SCLEROTIC_RIM_MM, 0.5 * TULIP_DIAMETER_MM) + 1.0
    sl = g.slices(*_bbox(head, R, (-reach, -reach, -TULIP_HEIGHT_MM - 1), (reach, reach, L + 1),
                         pad=1.0))
    if sl is None:
        return
    shape = hu[sl].shape
    p1, p2, t = (np.broadcast_to(q, shape) for q in g.local(sl, head, R))
    rho = np.sqrt(p1 ** 2 + p2 ** 2)
    sp = g.spacing.astype(np.float32)
    wr = (np.abs(p1 * e1[0] + p2 * e2[0]) * sp[0] + np.abs(p1 * e1[1] + p2 * e2[1]) * sp[1]
          + np.abs(p1 * e1[2] + p2 * e2[2]) * sp[2]) / np.maximum(rho, 1e-3)
    wr = np.maximum(wr, np.float32(0.5 * sp.min()))
    wa = np.float32(g.width(ax))
    da = np.minimum(t, L - t)
    if halo_only:
        w, f = s["halo_width_mm"], s["halo_fraction"]
        if w <= 0 or f <= 0:
            return
        phi = np.degrees(np.arctan2(p2, p1))
        in_sector = np.mod(phi - s["halo_start_deg"], 360.0) <= 360.0 * f
        bone = np.isin(lab[sl], BONE_LABELS)
        region = in_sector & bone
        if s["double_halo"]:
            d = np.minimum(r + w + SCLEROTIC_RIM_MM - rho, da)
            a = _soft(d, np.where(r + w + SCLEROTIC_RIM_MM - rho < da, wr, wa)) * region
            _composite(hu, lab, sl, a, HU["sclerotic_rim"], LABELS["sclerotic_rim"])
        d = np.minimum(r + w - rho, da)
        a = _soft(d, np.where(r + w - rho < da, wr, wa)) * region
        _composite(hu, lab, sl, a, HU["halo"], LABELS["halo"])
        return
    d = np.minimum(r - rho, da)
    wd = np.where(r - rho < da, wr, wa)
    fr = s.get("fracture")
    if fr is not None:
        # the two faces of the gap are painted like the tip (the nearer surface decides)
        dg = np.abs(t - fr["position"] * L) - 0.5 * fr["gap_mm"]
        wd = np.where(dg < d, wa, wd)
        d = np.minimum(d, dg)
    a = _soft(d, wd)
    _composite(hu, lab, sl, a, HU["titanium"], LABELS["screw_shaft"])
    rt = 0.5 * TULIP_DIAMETER_MM
    dt = np.minimum(-t, TULIP_HEIGHT_MM + t)
    d = np.minimum(rt - rho, dt)
    a = _soft(d, np.where(rt - rho < dt, wr, wa))
    _composite(hu, lab, sl, a, HU["titanium"], LABELS["tulip"])


def _paint_rod(g: _Grid, hu, lab, rod: dict):
    pts = np.array(rod["points_lps_mm"])
    r = 0.5 * rod["diameter_mm"]
    for p, q in zip(pts[:-1], pts[1:]):
        lo, hi = np.minimum(p, q) - r - 1.5, np.maximum(p, q) + r + 1.5
        sl = g.slices(lo, hi)
        if sl is None:
            continue
        x, y, z = g.coords(sl)
        seg = q - p
        Ls = float(np.linalg.norm(seg))
        ax = seg / Ls
        rx, ry, rz = x - np.float32(p[0]), y - np.float32(p[1]), z - np.float32(p[2])
        t = np.clip(rx * ax[0] + ry * ax[1] + rz * ax[2], 0.0, Ls)
        dx, dy, dz = rx - t * ax[0], ry - t * ax[1], rz - t * ax[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        wr = (np.abs(dx) * g.spacing[0] + np.abs(dy) * g.spacing[1]
              + np.abs(dz) * g.spacing[2]) / np.maximum(dist, 1e-3)
        a = _soft(r - dist, np.maximum(wr, 0.5 * g.spacing.min()))
        fr = rod.get("fracture")
        if fr is not None:
            # the metal left in a voxel is the rod's coverage times the gap slab's complement
            # (min() of the two distances kept the rod's rim voxels at the gap too full)
            fc, fd = np.asarray(fr["center_lps_mm"], np.float32), np.asarray(fr["direction"])
            dg = (np.abs((x - fc[0]) * fd[0] + (y - fc[1]) * fd[1] + (z - fc[2]) * fd[2])
                  - 0.5 * fr["gap_mm"])
            a = a * _soft(dg, np.float32(g.width(fd)))
        _composite(hu, lab, sl, a, HU["titanium"], LABELS["rod"])


# ------------------------------------------------------------------------------ physics
def _metal_excess(hu_true, lab):
    """HU above the surrounding tissue carried by metal voxels (for blooming and streaks)."""
    m = np.isin(lab, METAL_LABELS)
    ex = np.zeros_like(hu_true)
    ex[m] = hu_true[m] - HU["trabecular"]
    return ex


BLOOM_GAIN = 6.0
BLOOM_SIGMA_MM = 1.2
BLOOM_WEIGHT = 0.025


def _apply_blooming(hu, metal_excess, spacing, gain=None, weight=None, sigma_mm=None):
    """Metal blooming: the metal's excess HU is amplified and spread by a heavy-tailed kernel.

    The metal excess ``E`` (HU above trabecular bone) becomes ``gain * ((1 - weight) * E +
    weight * G_sigma * E)``: titanium's true attenuation is far above the 12-bit range and
    part of it leaks into a wide tail, so after the PSF a fixed 2200 HU threshold reads a
    shaft about 0.5-1 mm too wide, as on clinical CT (Elliott and Slakey, CORR 2014).
    """
    gain = BLOOM_GAIN if gain is None else gain
    weight = BLOOM_WEIGHT if weight is None else weight
    sigma_mm = BLOOM_SIGMA_MM if sigma_mm is None else sigma_mm
    idx = np.argwhere(metal_excess > 0)
    if idx.size == 0:
        return
    pad = np.ceil(4 * sigma_mm / np.asarray(spacing)[::-1]).astype(int)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, hu.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    ex = metal_excess[sl]
    sig = sigma_mm / np.asarray(spacing)[::-1]
    tail = ndimage.gaussian_filter(ex, sig, mode="constant", truncate=3.0)
    hu[sl] += (gain * (1.0 - weight) - 1.0) * ex + (gain * weight) * tail


STREAK_DARK_HU = 150.0      # depth of the dark band joining two metal objects
STREAK_BAND_SIGMA_MM = 1.5
STREAK_RAY_SIGMA_MM = 0.8
STREAK_RAY_DECAY_MM = 25.0
STREAK_MAX_DARK_HU = 250.0


def _streak_window(xs, ys, p, q, pad):
    """Index window (rows, cols) of the slice covering the segment p-q padded by ``pad`` mm."""
    i0 = np.searchsorted(xs, min(p[0], q[0]) - pad)
    i1 = np.searchsorted(xs, max(p[0], q[0]) + pad)
    j0 = np.searchsorted(ys, min(p[1], q[1]) - pad)
    j1 = np.searchsorted(ys, max(p[1], q[1]) + pad)
    return slice(j0, j1), slice(i0, i1)


def _apply_streaks(hu, lab, grid: _Grid, seed: int, bands: bool = True):
    """Beam-hardening streaks per axial slice: dark bands along the lines joining pairs of
    metal objects (the classic dark streak between two screws, which can imitate a halo;
    left out when ``bands`` is False) and a few bright or dark radial streaks from each
    object, decaying with distance. Deterministic from the seed and the slice index."""
    nk, nj, ni = hu.shape
    sx, sy = grid.spacing[0], grid.spacing[1]
    xs = (grid.origin[0] + sx * np.arange(ni)).astype(np.float32)
    ys = (grid.origin[1] + sy * np.arange(nj)).astype(np.float32)
    metal = np.isin(lab, METAL_LABELS)
    ks = np.flatnonzero(metal.any(axis=(1, 2)))
    reach = 3.0 * STREAK_RAY_DECAY_MM
    for k in ks:
        labels2, nlab = ndimage.label(metal[k])
        if nlab == 0:
            continue
        idx = np.arange(1, nlab + 1)
        areas = ndimage.sum_labels(np.ones_like(labels2), labels2, idx) * sx * sy
        keep = np.flatnonzero(areas >= 2.0)
        if keep.size == 0:
            continue
        keep = keep[np.argsort(-areas[keep], kind="stable")[:6]]  # the largest objects
        cms = np.array(ndimage.center_of_mass(metal[k], labels2, idx[keep]))
        areas = areas[keep]
        cen = np.column_stack([grid.origin[0] + sx * cms[:, 1], grid.origin[1] + sy * cms[:, 0]])
        rng = _rng(seed, "streaks", int(k))
        sl2 = np.zeros((nj, ni), np.float32)
        m = len(cen)
        for a in range(m if bands else 0):
            for b in range(a + 1, m):
                Ls = float(np.hypot(*(cen[b] - cen[a])))
                if Ls < 3.0:
                    continue
                ax = (cen[b] - cen[a]) / Ls
                rows, cols = _streak_window(xs, ys, cen[a], cen[b], 4 * STREAK_BAND_SIGMA_MM + 3)
                X = xs[cols][None, :] - np.float32(cen[a][0])
                Y = ys[rows][:, None] - np.float32(cen[a][1])
                t = X * np.float32(ax[0]) + Y * np.float32(ax[1])
                dperp = -X * np.float32(ax[1]) + Y * np.float32(ax[0])
                strength = min(1.0, math.sqrt(areas[a] * areas[b]) / 25.0)
                along = _soft(np.minimum(t, Ls - t) + 3.0, 4.0)
                sl2[rows, cols] -= np.float32(STREAK_DARK_HU * strength) * along * np.exp(
                    np.float32(-0.5 / STREAK_BAND_SIGMA_MM ** 2) * dperp * dperp)
        for a in range(min(m, 4)):
            for _ in range(2):
                ang = rng.uniform(0, 2 * np.pi)
                amp = rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 110.0)
                ax = np.array([math.cos(ang), math.sin(ang)])
                end_pt = cen[a] + reach * ax
                rows, cols = _streak_window(xs, ys, cen[a], end_pt, 4 * STREAK_RAY_SIGMA_MM)
                X = xs[cols][None, :] - np.float32(cen[a][0])
                Y = ys[rows][:, None] - np.float32(cen[a][1])
                t = X * np.float32(ax[0]) + Y * np.float32(ax[1])
                dperp = -X * np.float32(ax[1]) + Y * np.float32(ax[0])
                sl2[rows, cols] += (np.float32(amp) * np.exp(-np.maximum(t, 0) / STREAK_RAY_DECAY_MM)
                                    * _soft(t - 2.0, 1.0)
                                    * np.exp(np.float32(-0.5 / STREAK_RAY_SIGMA_MM ** 2) * dperp * dperp))
        # overlapping bands do not add up without limit
        hu[k] += np.clip(sl2, -STREAK_MAX_DARK_HU, STREAK_MAX_DARK_HU)


# --------------------------------------------------------------------------- the phantom
@dataclass
class PhantomLayers:
    """The noise-free stages of a phantom on the canonical (head-first) grid.

    ``labels[k, j, i]`` (int8, codes in ``LABELS``) and ``hu_true`` (float32, no blooming,
    blur, streaks or noise) share the geometry of ``grid_volume`` (identity direction).
    ``bridging_maps`` holds per level the exact 2-D maps the bridging truth was read from.
    """

    labels: np.ndarray
    hu_true: np.ndarray
    origin_lps_mm: np.ndarray
    spacing_mm: np.ndarray
    truth: dict
    bridging_maps: dict

    def label_volume(self) -> Volume:
        """The label map as a Volume (values are label codes) in the canonical geometry."""
        return Volume(self.labels.astype(np.float32), self.origin_lps_mm, self.spacing_mm)


def _fov(spec: PhantomSpec, geo: dict):
    vs = geo["vertebrae"]
    top = vs[0]
    c = np.array(top["center_lps_mm"])
    R = np.column_stack([top["axis_lr"], top["axis_ap"], top["axis_si"]])
    a, b = top["semi_axes_mm"]
    lo_t, hi_t = _bbox(c, R, (-a, -b, -0.5 * top["height_mm"]), (a, b, 0.5 * top["height_mm"]), 0)
    z_hi = hi_t[2] + 4.0
    bot = vs[-1]
    if bot["is_sacrum"]:
        z_lo = bot["superior_endplate"]["point_lps_mm"][2] - 32.0
    else:
        c = np.array(bot["center_lps_mm"])
        R = np.column_stack([bot["axis_lr"], bot["axis_ap"], bot["axis_si"]])
        a, b = bot["semi_axes_mm"]
        lo_b, _ = _bbox(c, R, (-a, -b, -0.5 * bot["height_mm"]), (a, b, 0.5 * bot["height_mm"]), 0)
        z_lo = lo_b[2] - 4.0
    return z_lo, z_hi


def make_phantom_layers(spec: PhantomSpec) -> PhantomLayers:
    """Rasterise the true (noise-free, unblurred) phantom and its truth; see ``make_phantom``."""
    res = resolve_spec(spec)
    geo = _layout(spec, res)
    sx, sy, sz = (float(s) for s in spec.spacing_mm)
    z_lo, z_hi = _fov(spec, geo)
    fx, fy = spec.fov_x_mm, spec.fov_y_mm
    ni = int(round((fx[1] - fx[0]) / sx))
    nj = int(round((fy[1] - fy[0]) / sy))
    nk = int(math.ceil((z_hi - z_lo) / sz)) + 1
    origin = np.array([-(ni - 1) * sx / 2.0, fy[0] + sy / 2.0, z_lo])
    g = _Grid(origin, (sx, sy, sz), (nk, nj, ni))
    hu = np.empty((nk, nj, ni), np.float32)
    lab = np.empty((nk, nj, ni), np.int8)
    _paint_background(g, hu, lab)
    vmap = {v["name"]: v for v in geo["vertebrae"]}
    maps = {}
    for level in geo["levels"]:
        tgt = res["levels"][level["level"]]["bridging_fraction_target"]
        m = _bridging_masks(level, geo["cages"], tgt, spec.findings_seed,
                            clamp=level["level"] not in spec.bridging_fractions)
        maps[level["level"]] = m
        _paint_disc(g, hu, lab, level, vmap, m, spec.findings_seed)
    for v in geo["vertebrae"]:
        _paint_vertebra(g, hu, lab, v, geo["screws"], spec.findings_seed)
    for s in geo["screws"]:
        _paint_screw(g, hu, lab, s, halo_only=True)
    if spec.hardware:
        for cg in geo["cages"]:
            _paint_cage(g, hu, lab, cg)
        for rod in geo["rods"]:
            _paint_rod(g, hu, lab, rod)
        for s in geo["screws"]:
            _paint_screw(g, hu, lab, s, halo_only=False)

    crit = Criteria()
    for level in geo["levels"]:
        m = maps[level["level"]]
        b = m["fraction"]
        level["bridging_fraction"] = b
        level["bridging_fraction_target"] = m["target"]
        level["fusion"] = crit.fusion_class(b)
        level["domain_area_mm2"] = float(m["domain"].sum() * BRIDGING_GRID_MM ** 2)
        level["nonbridging_columns"] = m["nonbridging_columns"]
    truth = _truth_dict(spec, res, geo, g)
    return PhantomLayers(lab, hu, g.origin, g.spacing, truth, maps)


def _truth_dict(spec, res, geo, g) -> dict:
    sp = asdict(spec)
    sp["cages"] = {k: (None if c is None else (asdict(c) if isinstance(c, CageSpec) else dict(c)))
                   for k, c in spec.cages.items()}
    sp = _plain(sp)
    psf = list(spec.psf_sigma())
    notes = [
        "Synthetic phantom: every value below is the exact value the phantom was built with.",
        "Coordinates are LPS mm (+x patient left, +y posterior, +z superior).",
        "Screw head is where the shaft leaves bone (end of the pedicle); the tulip lies behind it.",
        "Halo widths are measured radially from the true shaft radius; halo lies in a contiguous "
        "sector of fraction halo_fraction starting at halo_start_deg from the superior direction "
        "(perpendicular to the axis), turning towards axis x superior.",
        "Cage subsidence is the depth of the cage's deepest point past each endplate plane along "
        "that plane's normal (planes in vertebrae[].*_endplate).",
        "Bridging fraction is exact on a 0.1 mm grid in the level plane (axis_u, axis_v) over the "
        "body outline (level semi_axes_mm) minus the cage footprints; non-bridging columns have a "
        f"{NONBRIDGING_GAP_MM:g} mm disc-density gap.",
        "The sacrum's inferior_endplate is a construction plane below the field of view.",
    ]
    return {
        "format": TRUTH_FORMAT,
        "version": TRUTH_VERSION,
        "spec": sp,
        "imaging": {
            "spacing_mm": [float(s) for s in spec.spacing_mm],
            "noise_hu": float(spec.noise_hu),
            "streaks": bool(spec.streaks),
            "streak_bands": bool(spec.streaks and spec.streak_bands),
            "blooming": bool(spec.blooming),
            "blooming_sigma_mm": BLOOM_SIGMA_MM if spec.blooming else 0.0,
            "blooming_weight": BLOOM_WEIGHT if spec.blooming else 0.0,
            "blooming_gain": BLOOM_GAIN if spec.blooming else 1.0,
            "psf_sigma_mm": psf,
            "hu_range": [-1024, EXTENDED_HU_MAX if spec.extended_hu else 3071],
            "feet_first": bool(spec.feet_first),
            "material_hu": dict(HU),
        },
        "criteria": Criteria().to_json(),
        "instrumented_levels": res["instrumented_levels"],
        "vertebrae": _plain(geo["vertebrae"]),
        "levels": _plain(geo["levels"]),
        "screws": _plain(geo["screws"]),
        "cages": _plain(geo["cages"]),
        "rods": _plain(geo["rods"]),
        "notes": notes,
    }


def _plain(o):
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, np.generic):
        return o.item()
    return o


def apply_imaging(layers: PhantomLayers, spec: PhantomSpec) -> np.ndarray:
    """The imaging chain on the canonical grid: blooming, PSF, streaks, noise, clip, round."""
    hu = layers.hu_true.copy()
    g = _Grid(layers.origin_lps_mm, layers.spacing_mm, hu.shape)
    if spec.blooming:
        _apply_blooming(hu, _metal_excess(layers.hu_true, layers.labels), layers.spacing_mm)
    psf = np.asarray(spec.psf_sigma(), float)
    if np.any(psf > 0):
        hu = ndimage.gaussian_filter(hu, (psf / layers.spacing_mm)[::-1], mode="nearest",
                                     truncate=3.0)
    if spec.streaks:
        _apply_streaks(hu, layers.labels, g, spec.seed, bands=spec.streak_bands)
    if spec.noise_hu > 0:
        rng = _rng(spec.seed, "noise")
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(spec.noise_hu)
    if spec.extended_hu:  # extended CT scale (as on Siemens / Philips scanners)
        np.clip(hu, -1024.0, EXTENDED_HU_MAX, out=hu)
    else:
        np.clip(hu, -1024.0, 3071.0, out=hu)
    np.rint(hu, out=hu)
    return hu


def _oriented(arr: np.ndarray, origin, spacing, feet_first: bool):
    """Array and geometry as acquired: feet first flips k (towards the feet) and i (to the
    patient's right), i.e. ImageOrientationPatient [-1,0,0,0,1,0]."""
    if not feet_first:
        return arr, np.asarray(origin, float), np.eye(3)
    nk, nj, ni = arr.shape
    origin = np.asarray(origin, float) + np.asarray(spacing) * np.array([ni - 1, 0, nk - 1])
    return np.ascontiguousarray(arr[::-1, :, ::-1]), origin, np.diag([-1.0, 1.0, -1.0])


def make_phantom(spec: PhantomSpec) -> tuple[Volume, dict]:
    """Make the phantom CT and its exact truth, in memory.

    Parameters
    ----------
    spec : PhantomSpec

    Returns
    -------
    volume : Volume
        float32 HU (integers after rounding) with LPS geometry; head first: identity
        direction, origin at the (right, anterior, inferior) corner; feet first: direction
        diag(-1, 1, -1).
    truth : dict
        JSON-ready ground truth (see the module docstring of ``sample_data``).
    """
    layers = make_phantom_layers(spec)
    return phantom_volume(layers, spec, apply_imaging(layers, spec))


def phantom_volume(layers: PhantomLayers, spec: PhantomSpec, hu: np.ndarray) -> tuple[Volume, dict]:
    """An image ``hu`` on the phantom's canonical grid as acquired (``spec.feet_first``), with
    the truth, whose ``volume`` entry gives that geometry: :func:`make_phantom`'s last step,
    also for an image made from the layers otherwise (the accuracy harness's known-metal
    study)."""
    arr, origin, direction = _oriented(hu, layers.origin_lps_mm, layers.spacing_mm, spec.feet_first)
    truth = layers.truth
    truth["volume"] = {
        "shape_kji": list(arr.shape),
        "spacing_mm": layers.spacing_mm.tolist(),
        "origin_lps_mm": origin.tolist(),
        "direction": direction.tolist(),
    }
    vol = Volume(arr, origin, layers.spacing_mm, direction,
                 meta={"source": "fusionct phantom", "seed": int(spec.seed), "kernel": "BONE"})
    return vol, truth


# --------------------------------------------------------------------- truth -> geometry
def truth_anatomy(truth: dict) -> Anatomy:
    """The exact geometry objects of a phantom, for testing measurement on true geometry."""
    verts = tuple(
        Vertebra(
            name=v["name"], center_lps_mm=v["center_lps_mm"], axis_si=v["axis_si"],
            axis_lr=v["axis_lr"], semi_axes_mm=tuple(v["semi_axes_mm"]),
            superior_endplate=Plane(v["superior_endplate"]["point_lps_mm"], v["superior_endplate"]["normal"]),
            inferior_endplate=Plane(v["inferior_endplate"]["point_lps_mm"], v["inferior_endplate"]["normal"]),
            is_sacrum=v["is_sacrum"])
        for v in truth["vertebrae"])
    levels = tuple(DiscLevel(name=lv["level"], upper=lv["upper"], lower=lv["lower"],
                             center_lps_mm=lv["center_lps_mm"], normal=lv["normal"])
                   for lv in truth["levels"])
    screws = tuple(ScrewGeometry(id=s["id"], head_lps_mm=s["head_lps_mm"], tip_lps_mm=s["tip_lps_mm"],
                                 diameter_mm=s["diameter_mm"], vertebra=s["vertebra"], side=s["side"])
                   for s in truth["screws"])
    cages = tuple(CageGeometry(id=c["id"], material=c["material"], centroid_lps_mm=c["centroid_lps_mm"],
                               axes=tuple(tuple(a) for a in c["axes"]),
                               half_sizes_mm=c["half_sizes_mm"], level=c["level"])
                  for c in truth["cages"])
    rods = tuple(Rod(id=r["id"], points_lps_mm=tuple(tuple(p) for p in r["points_lps_mm"]),
                     diameter_mm=r["diameter_mm"], side=r["side"]) for r in truth["rods"])
    return Anatomy(vertebrae=verts, levels=levels, screws=screws, cages=cages, rods=rods)
