"""Measurement: the three numbers a surgeon reads, from a volume and detected geometry.

Each function follows one definition of CONTRACT.md ("What is measured") and calls the
numba kernels in ``kernels/`` for the per-ray work. All positions handed in and out are
LPS mm; the conversion to the volume's (k, j, i) index space happens here, with ray
directions expressed in voxels *per mm*, so anisotropic spacing never reaches a kernel.

* :func:`measure_screw` - peri-screw lucency halo (CONTRACT.md, "Peri-screw lucency
  halo"): rays perpendicular to the shaft at stations from head to tip; per ray the width
  of the lucent zone from the shaft's TRUE radius outward to where bone resumes.
* :func:`measure_cage` - cage subsidence through each bearing endplate, along the
  endplate's own normal, from the endplate plane fitted to its intact rim beside the cage.
* :func:`measure_level` - fusion bridging fraction over the disc-space cross-section.
* :func:`measure_study` - all of the above for one study.

Streaks. The dark beam-hardening band that joins two pieces of metal in a slice lies on each
screw's facing side, where it reads as a halo; with ``Config.streak_band_removal`` it is
measured and removed first (:mod:`pipeline.streaks`; off by default: the reader below was
calibrated with the bands in, README "Streak band removal"). Narrower bright and dark
streaks from one screw are left to the rays: a ray far from its neighbours is an artefact
(``_neighbour_outliers``).

Metal blooming. Titanium reads wider and brighter than it is (Elliott and Slakey, CORR
2014): next to a screw the image carries the metal's own tail (blur plus blooming) of
several hundred HU within the first millimetre, the size of the loosening rule itself. The
halo analysis therefore removes that tail before reading the lucency: the tail is
estimated from the halo-free rays of the same study (they share scanner, kernel and
voxel shape), per class of ray direction (the blur differs along the slice axis), and
subtracted (when the study has rods, the tail read around them in soft tissue, where no
halo can exist, lifts that estimate and keeps clearly lucent rays out of the halo-free
reference: a study whose screws all carry halos has few halo-free rays); widths are then
read on what remains (``kernels.halo``; one fused kernel per
screw samples, removes the tail, averages along the shaft and reads every ray). Distances
closer to the surface than the tail can be reproduced (``d_vis``) are not read directly; a
halo thinner than that is measured through its deficit below bone further out, and rays
of a direction that cannot tell a loosening-size halo from none (along the slice axis of
thick slices) take the width seen on both sides of them around the circumference, unless
they show that width is not there (it would be lucent at their own ``d_vis``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from kernels.bridging import bridged_columns
from kernels.halo import fill_contradicted, halo_screw, halo_widths
from kernels.sampling import sample_points, sample_rays
from kernels.subsidence import rising_edges
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.results import (
    Anatomy,
    CageEvidence,
    CageGeometry,
    CageMeasurement,
    DiscLevel,
    LevelEvidence,
    LevelMeasurement,
    Plane,
    ScrewEvidence,
    ScrewGeometry,
    ScrewMeasurement,
    Vertebra,
)
from pipeline.streaks import find_streak_bands, without_bands
from pipeline.volume import Volume

# ------------------------------------------------------------------ halo (internal constants)
HALO_D_START_MM = -0.5        # profiles start this far inside the true metal surface
HALO_HEAD_MARGIN_MM = 2.0     # first station past the head (where the shaft leaves bone): at
                              # 1 mm the tulip behind the head lifts the profiles by 600-1000 HU
                              # (0.8x0.8x1.5 mm), and the 5-station mean along the shaft carried
                              # that into the next two stations, hiding a halo's first 3 mm
HALO_TIP_MARGIN_MM = 1.5      # last station before the tip (the rounded end is not shaft side)
HALO_FAR_MM = (2.4, 3.0)      # where a halo-free ray's bone level is read (tail nearly gone)
HALO_TAIL_CLASSES = 6         # classes of ray direction (blur along the ray) for the tail
HALO_TAIL_START_PERCENTILE = 90  # first tail guess: halo rays only lower a profile
HALO_TAIL_SPREAD_HU = 60.0    # a distance is readable once halo-free rays agree this well
HALO_D_VIS_MIN_MM = 0.3       # never read closer to the surface than this
HALO_D_VIS_MIN_SIGMAS = 1.0   # ... nor closer than this many edge blurs of the direction class
HALO_DEFICIT_WINDOW_MM = 0.3  # deficit integrated over [d_vis, d_vis + this + 2 sigma]
HALO_LOCAL_MM = (0.2, 1.2)    # densest tissue just beyond a provisional edge (a rim?)
HALO_DEFICIT_MIN_MM = 0.15    # smaller deficits are noise: no halo
HALO_FAR_LEN_MM = 1.0         # the ray's own bone level is read this far beyond the window
HALO_SETTLE_MM = 0.3          # bone must persist this long to end a lucency
HALO_NOHALO_MM = 0.3          # rays thinner than this count as halo-free for the tail
HALO_MIN_REFERENCE_RAYS = 30  # halo-free rays a direction class needs for its own tail
LUCENT_DEFAULT_HU = 25.0      # fibrous tissue / fluid in a loosening track, when not measurable
HALO_READABLE_DVIS_MM = 1.35  # a direction class reading no closer than this cannot tell
                              # a loosening-size halo from none (see _fill_unreadable)
HALO_FILL_REFUTE_SIGMAS = 1.0  # a filled width this far (edge blurs) past the ray's d_vis
                              # must show at d_vis (see _fill_unreadable)
HALO_FILL_SHORTFALL_MM = 0.4  # ... and the ray's deficit window may hold at most this much
                              # less lucency than the filled width would put there
                              # (unless a sclerotic rim shows there: RIM_CLEAR_HU over bone)
HALO_DIRECT_FRACTION = 0.3    # a ray reads its lucency directly when at d_vis it is within this
                              # fraction of the lucent-to-bone step above the lucent level
HALO_LOW_BONE_MARGIN_HU = HALO_TAIL_SPREAD_HU  # a ray's own bone level this far under the
#   study's is not noise: its lucency is read against it (kernels.halo, step 2b); and a ray
#   within HALO_DIRECT_FRACTION of the lucent level beyond the deficit window is inside a
#   lucency wider than the window: read to its edge, not through its deficit (step 2a)
HALO_COVERAGE_STATIONS = 15   # coverage decided on the along-shaft width (interquartile
                              # mean) over this many stations (see _along_shaft_width)
HALO_OUTLIER_MM = 1.0         # a ray this far from its neighbours' median is an artefact
ROD_STATION_STEP_MM = 1.0     # rod tail: stations along each rod segment
ROD_END_MARGIN_MM = 3.0       # ... this far from the rod's two ends
ROD_TULIP_CLEAR_MM = 12.0     # ... and this far from every screw's tulip (head to 13 mm behind)
ROD_TULIP_DEPTH_MM = 13.0
ROD_DIAMETER_TOL_MM = 0.2     # a rod this much thicker than the thinnest screw still bounds
ROD_SOFT_HU = (-150.0, 150.0)  # a rod ray's far level must be soft tissue (not bone, not air)
ROD_LUCENT_WINDOW_MM = (1.0, 1.5)  # a ray this far below the rods' tail here is not halo-free
ROD_LUCENT_MARGIN_HU = 80.0
ROD_FLOOR_FROM_MM = 0.0       # the rods' tail lifts the screws' from this distance on
RIM_WINDOW_MM = (0.2, 0.8)    # sclerotic rim read just outside the lucency
RIM_CLEAR_HU = 150.0          # "clearly denser than the surrounding bone"
RIM_BEYOND_MM = (1.6, 2.4)    # bone beyond the rim must be ordinary (else a cortex, not a rim)
HALO_RIM_REACH_MM = 2.0       # a sclerotic rim is looked for this far beyond d_vis
HALO_RIM_VALLEY_MM = (0.8, 2.4)  # the level beyond a rim: the lowest of the median profile
                              # this far past its peak (before a pedicle cortex rises)
HALO_RIM_MIN_HU = 100.0       # ... peaking at least this far above the bone beyond it
HALO_RIM_MAX_WIDTH_MM = 2.5   # ... and a lucency read from a rim is no wider than this (wider
                              # ones are seen directly; a cortex beyond trabecular bone is not a rim)
HALO_RIM_MIN_AZIMUTHS = 3     # ... on at least this many neighbouring azimuths (30 degrees)
HALO_RIM_REF_MIN_AZIMUTHS = 2  # ... and on at least this many to keep its rays out of the tail's
                              # halo-free references (_rim_rays)
HALO_RIM_UNDER_MM = 0.5       # rays reading this much less than their azimuth's rim take it
HALO_RIM_SECTOR_FRACTION = 0.35  # an azimuth beside a seen rim holds it at this fraction of the
                              # way from the bone beyond the rim to the rim's own level (_rim_sector)
DOUBLE_HALO_MIN_FRACTION = 0.3
DOUBLE_HALO_MIN_RAYS = 10

# --------------------------------------------------------------- subsidence (internal constants)
RIM_GRID_MM = 1.5             # rim sample spacing in the endplate plane
RIM_CAGE_GAP_MM = 2.0         # rim points keep this far from the cage footprint
RIM_OUTLINE_MARGIN_MM = 2.0   # ... and this far inside the body outline (clear of the ~1 mm
                              # cortical side wall, its blur and the detected outline's error;
                              # at 3 mm two cages side by side left no rim at all on thick slices)
RIM_MAX_DIST_MM = 40.0        # ... and within this of the footprint
RIM_RAY_START_MM = 3.0        # rim rays start this far into the disc
RIM_RAY_DEPTH_MM = 5.0        # ... and run this far into the vertebra
ENDPLATE_DETECT_HU = 420.0    # a blurred cortical endplate exceeds this; disc and graft do not
ENDPLATE_FRACTION_PER_MM = 0.22  # see endplate_edge_fraction
ENDPLATE_CORTEX_HALF_MM = 0.5  # half the endplate cortex thickness (see endplate_edge_moments)
RIM_MOMENT_AGREE_MM = 1.0     # a rim ray's moment surface within this of its own level crossing
RIM_TILT_PRIOR_DEG = 1.0      # spread, per tilt direction, of the detected endplate normal about
                              # the true one (RMS 1.0 deg over both directions, 0.7 per direction,
                              # at most 2.3 deg, on 0.8x0.8x1.5 mm phantoms; less on thinner
                              # slices): the rim's own tilt is weighed against it (rim_plane_fit)
RIM_REJECT_MIN_MM = 0.3       # rim rays farther than max(3 robust SDs, this) from the plane are out
FACE_GRID_MM = 1.0
FACE_MARGIN_MM = 1.0          # face rays keep this far inside the face edges
FACE_RAY_OUT_MM = 4.0         # face rays start this far outside the nominal face
FACE_RAY_IN_MM = 3.0          # ... and end this far inside it
FACE_TOL_MM = 2.5             # a face point farther than this from the nominal face is wrong
FACE_PHASE_MIN_POINTS = 20    # face points needed to model their slice-phase error (slice_phase_offset)
FACE_PHASE_PRIOR_FRACTION = 0.25  # prior spread of that error's harmonic, a fraction of the voxel
                              # extent along the face normal (slice_phase_offset)
PIN_DETECT_HU = 1500.0        # tantalum marker pins in PEEK
SATURATED_EDGE_FRACTION = 0.75  # see _metal_edges
SATURATION_MARGIN_HU = 100.0  # a metal plateau this close to the data maximum is clipped
PIN_RAY_OUT_MM = 3.0

# ------------------------------------------------------------------ bridging (internal constants)
BRIDGE_GRID_MM = 0.5
BRIDGE_SAMPLE_MM = 0.25
BRIDGE_SMOOTH_MM = 0.75
BRIDGE_END_MARGIN_MM = 0.5    # columns start/end this far inside the two endplate planes
CAGE_MARGIN_TITANIUM_MM = 2.0  # titanium blooms into the disc around it
CAGE_MARGIN_PEEK_MM = 1.0      # PEEK walls are bone-dense: keep them out of the bone count
BRIDGE_RIM_MM = 2.0            # the outline's outer rim this deep is checked against the image
BRIDGE_ENDPLATE_WINDOW_MM = 3.0  # beyond each endplate plane: where its cortex must show
BRIDGE_SURROUND_HU = 40.0      # soft tissue around the bodies (anatomy.SOFT_TISSUE_HU)
CAGE_MIDLINE_MIN_MM = 1.0      # midline columns between two cages are read when this far from both


# ============================================================================== helpers
def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _hu(volume: Volume) -> np.ndarray:
    """The voxel array as a plain contiguous float32 ndarray (memmaps welcome)."""
    hu = np.asarray(volume.hu)
    if hu.dtype != np.float32 or not hu.flags.c_contiguous:
        hu = np.ascontiguousarray(hu, dtype=np.float32)
    return hu


def _perp_frame(axis) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``axis``: the first towards LPS superior (+z)
    where possible, the second ``axis x first``."""
    ax = _unit(axis)
    ref = np.array([0.0, 0.0, 1.0])
    e1 = ref - (ref @ ax) * ax
    if np.linalg.norm(e1) < 1e-3:
        ref = np.array([1.0, 0.0, 0.0])
        e1 = ref - (ref @ ax) * ax
    e1 = _unit(e1)
    return e1, np.cross(ax, e1)


def _blur_extent_mm(volume: Volume, dirs_lps: np.ndarray) -> np.ndarray:
    """Voxel extent along unit LPS directions, sqrt(sum((n_ijk * spacing)^2)) in mm: a
    proxy for how much the voxel grid blurs an edge crossed along that direction."""
    n_ijk = dirs_lps @ volume.direction  # components along the i, j, k axes
    return np.sqrt(((n_ijk * volume.spacing_mm[None, :]) ** 2).sum(axis=1))


def _vertebra(anatomy: Anatomy, name: str | None) -> Vertebra | None:
    for v in anatomy.vertebrae:
        if v.name == name:
            return v
    return None


def _level_of_cage(anatomy: Anatomy, cage: CageGeometry) -> DiscLevel | None:
    for lv in anatomy.levels:
        if lv.name == cage.level:
            return lv
    if not anatomy.levels:
        return None
    c = np.asarray(cage.centroid_lps_mm)
    return min(anatomy.levels, key=lambda lv: float(np.linalg.norm(np.asarray(lv.center_lps_mm) - c)))


def _outline_coords(v: Vertebra, pts: np.ndarray) -> np.ndarray:
    """Normalised elliptic radius of points (n, 3) in a vertebra's body outline (<= 1 inside)."""
    lr = np.asarray(v.axis_lr)
    ap = np.cross(np.asarray(v.axis_si), lr)
    rel = pts - np.asarray(v.center_lps_mm)
    a, b = v.semi_axes_mm
    return np.sqrt(((rel @ lr) / a) ** 2 + ((rel @ ap) / b) ** 2)


# ================================================================================ halo
@dataclass(frozen=True)
class ScrewRays:
    """The ray layout of one screw: stations (head to tip) x azimuths."""

    screw: ScrewGeometry
    radius_mm: float
    stations_lps: np.ndarray      # (S, 3)
    dirs_lps: np.ndarray          # (A, 3) unit
    origins_kji: np.ndarray       # (S*A, 3) axis points, station-major
    dirs_kji: np.ndarray          # (S*A, 3) voxels per mm
    blur_mm: np.ndarray           # (S*A,) voxel extent along each ray
    d_mm: np.ndarray              # (n,) sample distances from the true surface

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.stations_lps), len(self.dirs_lps))


def screw_rays(volume: Volume, screw: ScrewGeometry, config: Config) -> ScrewRays:
    """Stations every ``halo_station_step_mm`` along the intraosseous shaft (head to tip)
    and ``halo_azimuths`` ray directions perpendicular to it."""
    head = np.asarray(screw.head_lps_mm)
    axis = np.asarray(screw.axis)
    length = screw.length_mm
    step = config.halo_station_step_mm
    if step <= 0 or config.halo_azimuths < 4 or config.halo_radial_step_mm <= 0:
        raise InputError("config", "halo sampling settings must be positive (>= 4 azimuths)")
    t = np.arange(HALO_HEAD_MARGIN_MM, length - HALO_TIP_MARGIN_MM + 1e-9, step)
    if t.size == 0:
        t = np.array([0.5 * length])
    stations = head + t[:, None] * axis
    e1, e2 = _perp_frame(axis)
    ang = (np.arange(config.halo_azimuths) + 0.5) * (2 * np.pi / config.halo_azimuths)
    dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
    S, A = len(stations), len(dirs)
    origins = volume.lps_to_kji(np.repeat(stations, A, axis=0))
    dk = volume.direction_lps_to_kji(dirs)
    dirs_kji = np.tile(dk, (S, 1))
    blur = np.tile(_blur_extent_mm(volume, dirs), S)
    rstep = config.halo_radial_step_mm
    n = int(math.ceil((config.halo_max_width_mm + 1.5 - HALO_D_START_MM) / rstep)) + 1
    d = HALO_D_START_MM + rstep * np.arange(n)
    return ScrewRays(screw, 0.5 * float(screw.diameter_mm), stations, dirs,
                     np.ascontiguousarray(origins), np.ascontiguousarray(dirs_kji), blur, d)


def screw_profiles(volume: Volume, rays: ScrewRays, hu: np.ndarray | None = None) -> np.ndarray:
    """Trilinear profiles (S*A, n) in HU at ``rays.d_mm`` from the true surface."""
    hu = _hu(volume) if hu is None else hu
    d = rays.d_mm
    return sample_rays(hu, rays.origins_kji, rays.dirs_kji, rays.radius_mm + d[0],
                       float(d[1] - d[0]), len(d))


@dataclass(frozen=True)
class MetalTail:
    """The metal's own tail next to a screw (blur + blooming), estimated from the study's
    halo-free rays: ``tail_hu[c, s]`` is added to bone at distance ``d_mm[s]`` from the
    true surface by rays of direction class ``c`` (classes by voxel extent along the ray,
    edges ``class_edges_mm``). ``d_vis_mm[c]``: closest readable distance. ``sigma_mm[c]``:
    blur of a lucent/bone edge. ``lucent_hu``: the lucent level; ``bone_hu``: the study's
    peri-screw bone level. ``reference_rays[c]``: halo-free rays behind each class.
    ``bands``: the study's dark streak bands (:mod:`pipeline.streaks`), removed from the
    image before every profile the tail and the halo are read from."""

    d_mm: np.ndarray
    class_edges_mm: np.ndarray
    tail_hu: np.ndarray
    d_vis_mm: np.ndarray
    sigma_mm: np.ndarray
    lucent_hu: float
    bone_hu: float
    reference_rays: np.ndarray
    class_centres_mm: np.ndarray = None
    bands: tuple = ()

    def classes(self, blur_mm: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.class_edges_mm, blur_mm, side="right") - 1,
                       0, len(self.class_edges_mm) - 2)

    def _weights(self, blur_mm: np.ndarray):
        """Linear interpolation between the classes' mean blur extents: (lower, upper, w)."""
        c = self.class_centres_mm
        b = np.asarray(blur_mm, float)
        if len(c) == 1:
            z = np.zeros(len(b), int)
            return z, z, np.zeros(len(b))
        k = np.clip(np.searchsorted(c, b) - 1, 0, len(c) - 2)
        t = np.clip((b - c[k]) / np.maximum(c[k + 1] - c[k], 1e-9), 0.0, 1.0)
        return k, k + 1, t

    def tail_for(self, blur_mm: np.ndarray) -> np.ndarray:
        """The tail (n_rays, n) for rays of the given blur extents, interpolated."""
        lo, hi, t = self._weights(blur_mm)
        return (1 - t)[:, None] * self.tail_hu[lo] + t[:, None] * self.tail_hu[hi]

    def per_ray(self, values: np.ndarray, blur_mm: np.ndarray) -> np.ndarray:
        """A per-class quantity (d_vis, sigma) interpolated to rays."""
        lo, hi, t = self._weights(blur_mm)
        return (1 - t) * values[lo] + t * values[hi]


def _far_level(profiles: np.ndarray, d: np.ndarray) -> np.ndarray:
    sel = (d >= HALO_FAR_MM[0]) & (d <= HALO_FAR_MM[1])
    return np.median(profiles[:, sel], axis=1)


def _smooth_rays(g: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean over 5 neighbouring stations (2 mm either way along the shaft) per azimuth:
    a halo is coherent along the shaft, noise and the sampling-phase ripple of a tilted
    screw on the voxel grid are not. Azimuths are not mixed (a partial halo's sector
    edges stay sharp)."""
    S, A = shape
    x = g.reshape(S, A, -1)
    size = _station_window(S)
    if size > 1:
        x = ndimage.uniform_filter1d(x, size, axis=0, mode="nearest")
    return x.reshape(S * A, -1)


def _station_window(n_stations: int) -> int:
    """Odd number of stations averaged (5, fewer on a very short shaft)."""
    return max(1, min(5, n_stations - (1 - n_stations % 2)))


def _class_edges(volume: Volume, blur_mm: np.ndarray) -> np.ndarray:
    """Class edges over the rays' voxel extents: ``HALO_TAIL_CLASSES`` classes of equal
    size (one class when the voxels are isotropic)."""
    lo, hi = float(volume.spacing_mm.min()), float(volume.spacing_mm.max())
    if hi / lo < 1.05 or len(blur_mm) < 2 * HALO_MIN_REFERENCE_RAYS:
        return np.array([0.0, np.inf])
    q = np.quantile(blur_mm, np.arange(1, HALO_TAIL_CLASSES) / HALO_TAIL_CLASSES)
    q = np.unique(q)
    return np.concatenate([[0.0], q, [np.inf]])


def _analyse(prof: np.ndarray, rays: ScrewRays, tail: MetalTail, bone_hu: float,
             config: Config):
    """Tail-corrected, neighbour-smoothed profiles through the halo kernel."""
    g = _smooth_rays(prof - tail.tail_for(rays.blur_mm), rays.shape)
    d = rays.d_mm
    n_rays = g.shape[0]
    out = halo_widths(np.ascontiguousarray(g), float(d[0]), float(d[1] - d[0]),
                      tail.per_ray(tail.d_vis_mm, rays.blur_mm), float(tail.lucent_hu),
                      np.full(n_rays, float(bone_hu)), tail.per_ray(tail.sigma_mm, rays.blur_mm),
                      float(config.halo_max_width_mm), HALO_DEFICIT_WINDOW_MM, HALO_SETTLE_MM,
                      RIM_WINDOW_MM[0], RIM_WINDOW_MM[1], HALO_LOCAL_MM[0], HALO_LOCAL_MM[1],
                      HALO_DEFICIT_MIN_MM, HALO_FAR_LEN_MM, HALO_LOW_BONE_MARGIN_HU,
                      HALO_DIRECT_FRACTION)
    return g, out


def rod_tail_profiles(volume: Volume, rods, screws, d_mm: np.ndarray, config: Config,
                      hu: np.ndarray | None = None):
    """The metal's tail read around the rods, where no halo can exist.

    Blooming and blur are additive (the metal's excess HU times the scanner's spread), so
    the excess over the far level next to a titanium rod in soft tissue is the metal tail
    without bone or lucency under it. Rays perpendicular to each rod segment, at stations
    every ``ROD_STATION_STEP_MM`` kept ``ROD_TULIP_CLEAR_MM`` from every screw's tulip and
    ``ROD_END_MARGIN_MM`` from the rod's ends, sampled at ``d_mm`` from the rod's true
    surface; rays whose far level is not soft tissue (``ROD_SOFT_HU``) are dropped.

    Returns
    -------
    (excess_hu, blur_mm) : (n_rays, len(d_mm)) excess over each ray's far level and the
        voxel extent along each ray; None when no rod offers a usable station.
    """
    hu = _hu(volume) if hu is None else hu
    d = np.asarray(d_mm, float)
    tul = []
    for sc in screws:
        h, t = np.asarray(sc.head_lps_mm, float), np.asarray(sc.tip_lps_mm, float)
        ax = _unit(t - h)
        tul.append((h - ROD_TULIP_DEPTH_MM * ax, h))
    n_az = config.halo_azimuths
    ang = (np.arange(n_az) + 0.5) * (2 * np.pi / n_az)
    out_x, out_b = [], []
    for rod in rods:
        pts = np.asarray(rod.points_lps_mm, float)
        r = 0.5 * float(rod.diameter_mm)
        if len(pts) < 2 or r <= 0:
            continue
        for p, q in zip(pts[:-1], pts[1:]):
            L = float(np.linalg.norm(q - p))
            if L < ROD_STATION_STEP_MM:
                continue
            ax = (q - p) / L
            st = p + np.arange(0.5 * ROD_STATION_STEP_MM, L, ROD_STATION_STEP_MM)[:, None] * ax
            ok = (np.linalg.norm(st - pts[0], axis=1) >= ROD_END_MARGIN_MM) & \
                 (np.linalg.norm(st - pts[-1], axis=1) >= ROD_END_MARGIN_MM)
            for a, b in tul:
                ab = b - a
                u = np.clip(((st - a) @ ab) / max(ab @ ab, 1e-9), 0.0, 1.0)
                ok &= np.linalg.norm(st - (a + u[:, None] * ab), axis=1) >= ROD_TULIP_CLEAR_MM
            st = st[ok]
            if len(st) == 0:
                continue
            e1, e2 = _perp_frame(ax)
            dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
            origins = volume.lps_to_kji(np.repeat(st, n_az, axis=0))
            dk = np.tile(volume.direction_lps_to_kji(dirs), (len(st), 1))
            prof = sample_rays(hu, np.ascontiguousarray(origins), np.ascontiguousarray(dk),
                               r + d[0], float(d[1] - d[0]), len(d))
            far = _far_level(prof, d)
            soft = (far >= ROD_SOFT_HU[0]) & (far <= ROD_SOFT_HU[1])
            out_x.append(prof[soft] - far[soft, None])
            out_b.append(np.tile(_blur_extent_mm(volume, dirs), len(st))[soft])
    if not out_x or sum(len(x) for x in out_x) < HALO_MIN_REFERENCE_RAYS:
        return None
    return np.concatenate(out_x), np.concatenate(out_b)


def _rod_floor(rod_tail, centres: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per direction class, the rods' median tail over rod rays no more blurred than the
    class, from ``ROD_FLOOR_FROM_MM`` on: a tail estimate that absorbed halos (a study where
    every screw has one) is lifted back to it. From about 1 mm on it is a lower bound of
    the screws' tail (a wider blur and a thicker shaft only raise it there;
    ``_study_rod_tail`` keeps only rods no thicker than the thinnest screw). Closer to the
    surface it is not a strict bound (the clipped metal plateau makes a wider blur LOWER the
    tail: 0.8x0.8x1.5 mm, halo-free study, the rods' tail is 160 HU above the in-plane screw
    rays' at 0.3 mm, 20 HU under it at 1.0 mm); it is applied from the surface all the same
    because, measured on seeds 0-11 at 0.8x0.8x1.5 mm, that reads better (coverage MAE
    0.085-0.113 vs 0.095-0.118 with the floor from 1 mm on), these distances lying mostly
    inside ``d_vis`` where nothing is read directly. -inf where there is no bound."""
    floor = np.full((len(centres), len(d)), -np.inf)
    if rod_tail is None:
        return floor
    X, b = rod_tail
    inside = (d >= ROD_FLOOR_FROM_MM) & (d < HALO_FAR_MM[0])
    for c, bc in enumerate(centres):
        sel = b <= bc + 1e-6
        if sel.sum() >= HALO_MIN_REFERENCE_RAYS:
            floor[c, inside] = np.median(X[sel][:, inside], axis=0)
    return floor


def _below_rod_tail(Xs: np.ndarray, rod_tail, d: np.ndarray) -> np.ndarray:
    """Rays clearly lucent by the rods' measure: their station-smoothed excess over
    ``ROD_LUCENT_WINDOW_MM`` lies more than ``ROD_LUCENT_MARGIN_HU`` below the rods' tail.
    There the rods' tail is under every direction class's tail (farther than the blur
    from the surface, where the clipped metal plateau no longer matters), so a halo-free
    ray is not below it; such a ray is never taken as a halo-free reference."""
    if rod_tail is None:
        return np.zeros(len(Xs), bool)
    win = (d >= ROD_LUCENT_WINDOW_MM[0]) & (d <= ROD_LUCENT_WINDOW_MM[1])
    ref = float(np.median(rod_tail[0][:, win], axis=0).mean())
    return Xs[:, win].mean(axis=1) < ref - ROD_LUCENT_MARGIN_HU


def estimate_metal_tail(volume: Volume, rays_list: list[ScrewRays], profiles: list[np.ndarray],
                        config: Config, n_iter: int = 2, rod_tail=None) -> MetalTail:
    """Estimate the metal tail from the study's own halo-free rays (module docstring).

    Rays are grouped into classes of equal size by the voxel extent along them (the blur
    differs along the slice axis); a ray's tail is interpolated between the classes'
    mean extents. Start from a high percentile of every ray's excess over its far bone
    level (halo rays only lower a profile), read the widths with it, keep the rays found
    halo-free, and re-estimate each class's tail as their median; repeat ``n_iter`` times.
    The readable distance of a class is where its halo-free rays agree with the tail
    within ``HALO_TAIL_SPREAD_HU`` (robust SD, on the station-smoothed profiles the
    analysis reads).

    ``rod_tail`` (from :func:`rod_tail_profiles`): the tail read around the rods bounds
    every class's tail from below at each step (``_rod_floor``). Without it, a study whose
    screws all carry halos has few halo-free rays, the halo rays read as halo-free get into
    the tail and every halo reads near zero.
    """
    d = rays_list[0].d_mm
    excess, excess_s = [], []
    for rays, prof in zip(rays_list, profiles):
        x = prof - _far_level(prof, d)[:, None]
        excess.append(x)
        excess_s.append(_smooth_rays(x, rays.shape))
    X = np.concatenate(excess)
    Xs = np.concatenate(excess_s)
    blur = np.concatenate([r.blur_mm for r in rays_list])
    far = np.concatenate([_far_level(p, d) for p in profiles])
    edges = _class_edges(volume, blur)
    n_cls = len(edges) - 1
    cls = np.clip(np.searchsorted(edges, blur, side="right") - 1, 0, n_cls - 1)
    centres = np.array([blur[cls == c].mean() if np.any(cls == c) else 0.5 * (edges[c] + edges[min(c + 1, n_cls)])
                        for c in range(n_cls)])
    centres = np.maximum.accumulate(centres + 1e-9 * np.arange(n_cls))
    beyond = d >= HALO_FAR_MM[0]
    tail = np.zeros((n_cls, len(d)))
    for c in range(n_cls):
        sel = cls == c
        src = X[sel] if sel.sum() >= HALO_MIN_REFERENCE_RAYS else X
        tail[c] = np.percentile(src, HALO_TAIL_START_PERCENTILE, axis=0)
    tail[:, beyond] = 0.0
    floor = _rod_floor(rod_tail, centres, d)
    tail = np.maximum(tail, floor)
    below_rods = _below_rod_tail(Xs, rod_tail, d)
    sigma = 0.6 * centres

    def build(tail_hu, d_vis, bone, ref):
        return MetalTail(d, edges, tail_hu.copy(), d_vis, sigma, LUCENT_DEFAULT_HU, bone, ref, centres)

    tmp = build(tail, np.full(n_cls, 1.0), float(np.median(far)), np.zeros(n_cls, int))
    tmp = build(tail, _readable_distance(Xs, blur, cls, n_cls, d, tmp, np.ones(len(X), bool)),
                tmp.bone_hu, tmp.reference_rays)
    for _ in range(n_iter):
        widths, status, rims = [], [], []
        for rays, prof in zip(rays_list, profiles):
            _, (w, st, _, _, _) = _analyse(prof, rays, tmp, tmp.bone_hu, config)
            widths.append(w)
            status.append(st)
            rims.append(_rim_rays(prof, rays, tmp, tmp.bone_hu))
        w = np.concatenate(widths)
        st = np.concatenate(status)
        nohalo = (st != 2) & (w < HALO_NOHALO_MM) & ~below_rods & ~np.concatenate(rims)
        ref = np.zeros(n_cls, int)
        for c in range(n_cls):
            sel = nohalo & (cls == c)
            ref[c] = sel.sum()
            if ref[c] >= HALO_MIN_REFERENCE_RAYS:
                tail[c] = np.median(X[sel], axis=0)
            elif nohalo.sum() >= HALO_MIN_REFERENCE_RAYS:
                tail[c] = np.median(X[nohalo], axis=0)
        tail[:, beyond] = 0.0
        tail = np.maximum(tail, floor)
        bone = float(np.median(far[nohalo])) if nohalo.sum() >= HALO_MIN_REFERENCE_RAYS else tmp.bone_hu
        tmp = build(tail, tmp.d_vis_mm, bone, ref)
        tmp = build(tail, _readable_distance(Xs, blur, cls, n_cls, d, tmp, nohalo), bone, ref)
    return tmp


def _readable_distance(Xs, blur, cls, n_cls, d, tail: MetalTail, sel_ok) -> np.ndarray:
    """Per class, the smallest distance from which on the halo-free rays' robust spread
    about their (interpolated) tail stays below ``HALO_TAIL_SPREAD_HU`` (up to the far
    window).

    The spread is the upper semi-interquartile one, 1.4826 (Q75 - Q50) (the SD for normal
    residuals). The rays taken as halo-free include halo rays the first pass could not
    read and rays darkened by a streak; both only lower a profile, so the lower half of the
    residuals says nothing about how reproducible the tail is. (A symmetric MAD counted
    them: on a streak-heavy 0.8x0.8x1.5 mm study it put every direction class beyond the
    readable distance.)

    No class is readable closer than ``HALO_D_VIS_MIN_SIGMAS`` of its own edge blur
    (``sigma_mm``): within it lies the metal's own blurred edge, steep and dependent on the
    sampling phase. The rays taken as halo-free are those the current tail reads as
    halo-free, so a class can agree with itself at any distance: at 0.8x0.8x1.5 mm and
    40 HU the slice-axis class (1.5 mm voxel extent, sigma 0.9 mm) came out readable at
    0.3 mm while sharper classes read from 0.9-1.2 mm; its rays read 1.2-1.4 mm around a
    0.5 mm halo and around a halo-free screw, and the 0.5 mm halo was called loose. (A
    running maximum over the classes instead carried one class's bad distance to all: a
    single screw with a 2 mm halo on 0.75 of its circumference then read 0.28 mm.)"""
    out = np.empty(n_cls)
    upto = d < HALO_FAR_MM[0]
    resid = Xs - tail.tail_for(blur)
    for c in range(n_cls):
        sel = sel_ok & (cls == c)
        if sel.sum() < HALO_MIN_REFERENCE_RAYS:
            sel = sel_ok if sel_ok.sum() >= HALO_MIN_REFERENCE_RAYS else np.ones_like(sel_ok)
        q50, q75 = np.percentile(resid[sel], [50, 75], axis=0)
        spread = 1.4826 * (q75 - q50)
        bad = (spread > HALO_TAIL_SPREAD_HU) & upto
        idx = np.flatnonzero(bad)
        last_bad = d[idx[-1]] + (d[1] - d[0]) if idx.size else d[0]
        out[c] = max(HALO_D_VIS_MIN_MM, float(last_bad))
    # never closer than one edge blur of the class: the metal's own blurred edge
    return np.maximum(out, HALO_D_VIS_MIN_SIGMAS * np.asarray(tail.sigma_mm, float))


def _neighbour_outliers(widths: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rays whose width differs from the median of their neighbours (stations +-1,
    azimuths +-2) by more than ``HALO_OUTLIER_MM`` (or half the median): streak artefacts."""
    S, A = shape
    w = widths.reshape(S, A)
    fill = np.where(np.isfinite(w), w, np.nanmedian(w) if np.isfinite(w).any() else 0.0)
    padded = np.concatenate([fill[:, -2:], fill, fill[:, :2]], axis=1)  # azimuth wraps
    med = ndimage.median_filter(padded, size=(3, 5), mode="nearest")[:, 2:-2]
    tol = np.maximum(HALO_OUTLIER_MM, 0.5 * med)
    return (np.abs(fill - med) > tol).ravel()


def _along_shaft_width(widths: np.ndarray, shape: tuple[int, int],
                       n_stations: int | None = None) -> np.ndarray:
    """Each ray's width as the interquartile mean (the mean of the middle half) of its
    azimuth's used widths over ``HALO_COVERAGE_STATIONS`` neighbouring stations (fewer at
    the shaft's ends; NaN rays ignored), for the coverage decision.

    A loosening track is coherent along the shaft; the per-ray reading of a halo near the
    1 mm threshold is not (noise scatters it across the cut, most at 0.8x0.8x1.5 mm where
    such halos are read through their deficit only), so the per-ray decision counted a
    0.9 mm halo as part-covered. The window of 15 mm (a third of a 40-45 mm shaft) keeps
    a track longer than about 8 mm and decides on the local width rather than on one noisy
    reading. Seeds 0-11, coverage MAE for 1 (per ray) / 9 / 15 / 25 stations / whole shaft
    (window median): 0.8x0.8x1.5 mm 40 HU default set .107/.098/.090/.081/.065, uniform set
    25 HU .140/.137/.132/.126/.119; 0.5x0.5x1.0 mm 25 HU uniform .071/.064/.060/.054/.043
    (the whole-shaft decision put uniform loosening calls at 92-95 % against 95-97 %).

    The interquartile mean rather than the median: where a halo's width is near the
    readable distance the per-ray readings are bimodal (none, or past the halo's edge), and
    the median takes one mode for the whole window while the middle half's mean lies
    between them, as the halo's mean width does; the outer quarters still drop streak
    readings. 0.8x0.8x1.5 mm, true geometry, 25 HU, coverage MAE median -> interquartile
    mean, seeds 0-11 / 12-23 / 24-35 / 36-47: uniform set .129/.101/.104/.075 ->
    .118/.100/.099/.072, default set .067/.060/.080/.074 -> .060/.057/.073/.070 (the plain
    window mean: uniform .124/.105/.105/.078)."""
    n = HALO_COVERAGE_STATIONS if n_stations is None else n_stations
    S, A = shape
    W = widths.reshape(S, A)
    h = n // 2
    if h == 0 or S < 2:
        return widths.copy()
    pad = np.full((S + 2 * h, A), np.nan)
    pad[h:h + S] = W
    stack = np.stack([pad[k:k + S] for k in range(2 * h + 1)])
    # a window with no used ray (NaN there; never asked for: a used ray is in its own
    # window) is filled before the percentiles rather than silenced: warnings.catch_warnings
    # is process-wide and the measurement runs beside the integrity checks in threads
    empty = ~np.isfinite(stack).any(axis=0)
    stack[:, empty] = 0.0
    lo, hi = np.nanpercentile(stack, [25, 75], axis=0)
    mid = (stack >= lo) & (stack <= hi)  # NaN rays compare False
    width = np.where(mid, stack, 0.0).sum(axis=0) / np.maximum(mid.sum(axis=0), 1)
    width[empty] = np.nan
    return width.ravel()


def _fill_unreadable(w: np.ndarray, st: np.ndarray, g_vis: np.ndarray, rays: ScrewRays,
                     tail: MetalTail, bone_hu: float, known: np.ndarray | None = None,
                     prof: np.ndarray | None = None) -> np.ndarray:
    """Widths for rays that cannot tell a halo of the loosening size from none.

    Along the slice axis of a thick-slice scan the metal's tail stays irreproducible
    farther out than the loosening threshold (``d_vis`` of that direction class above
    ``HALO_READABLE_DVIS_MM``); a ray there that shows no lucency at ``d_vis`` has not
    shown that there is none. A lucency around a screw is contiguous, so such a ray takes
    its width around the circumference (same station) from the nearest rays that could
    read it: rays of readable classes, and any ray whose lucency reached past ``d_vis``
    and is clearly lucent there (read directly: within ``HALO_DIRECT_FRACTION`` of the
    lucent-to-bone step above the lucent level. At ``d_vis`` the tail still varies by up
    to ``HALO_TAIL_SPREAD_HU``, so the half-way level lies under two spreads below bone and
    a streak or a noise dip reaches it; copied round the circumference, one such ray made
    a halo-free screw read loose).

    Each unreadable ray takes the width of the NEAREST such ray around the circumference
    (the smaller of the two when they are equally near): where a partial halo's end lies
    in an unreadable stretch, between a ray that read the halo and one that read none, the
    end is as likely to be in either half, so the stretch is split in the middle. (Taking
    the smaller of the two for every ray put every such end on the lucent side and read a
    half-circumference halo's coverage under the 0.5 loosening cut.)

    A filled width is refused where the ray itself shows it is not there: a lucency more
    than ``HALO_FILL_REFUTE_SIGMAS`` edge blurs wider than the ray's own ``d_vis`` would put
    the ray under the half-way level at ``d_vis``; a ray that is not under it keeps its own
    reading. (The halo-free quarter of a 3 mm halo on 0.75 of the circumference lay in a
    stretch of slice-axis rays at 0.8x0.8x1.5 mm, took 2.5 mm from both sides, and the screw
    read coverage 1.0.)

    With the screw's profiles ``prof`` (:func:`screw_profiles`), a filled width is also
    refused where the ray's deficit window beyond ``d_vis`` holds more than
    ``HALO_FILL_SHORTFALL_MM`` less lucency than that width would put there
    (``kernels.halo.fill_contradicted``): the halo-free part of a partial halo lying along
    the slice axis took its lucent neighbours' width. (0.8x0.8x1.5 mm, detected geometry,
    seeds 0-11, both phantom sets: 2-3 mm half halos read coverage 0.55-0.71; with
    quarter-circumference halos 1-3 mm wide in their place, true coverage 0.25, 4 of 19 read
    0.50-0.54 and were called loose, 2 of 19 with the refusal.) A sclerotic rim's blur
    offsets the lucency's deficit, so a ray that rises ``RIM_CLEAR_HU`` over bone in its
    window refutes nothing (without that, seed 29's 3 mm double halos on 0.75 of the
    circumference read 1.5 mm for 2.25), and the rim-aware fill (``known``) is given no
    ``prof``.
    """
    d_vis = tail.per_ray(tail.d_vis_mm, rays.blur_mm)
    direct = (st == 1) & (g_vis < tail.lucent_hu + HALO_DIRECT_FRACTION * (bone_hu - tail.lucent_hu))
    unreadable = (d_vis > HALO_READABLE_DVIS_MM) & ~direct & (st != 2)
    if known is not None:
        unreadable &= ~known
    if not unreadable.any():
        return w
    S, A = rays.shape
    W = w.reshape(S, A)
    U = unreadable.reshape(S, A)
    ok = ~U & np.isfinite(W)
    out = W.copy()
    for s in range(S):
        good = np.flatnonzero(ok[s])
        if good.size == 0 or not U[s].any():
            continue
        ext = np.concatenate([good - A, good, good + A])
        vals = np.tile(W[s, good], 3)
        for a in np.flatnonzero(U[s]):
            k = np.searchsorted(ext, a)
            d_left, d_right = a - ext[k - 1], ext[k] - a
            if d_left < d_right:
                out[s, a] = vals[k - 1]
            elif d_right < d_left:
                out[s, a] = vals[k]
            else:
                out[s, a] = min(vals[k - 1], vals[k])
    # ... unless the ray shows that such a halo does not reach it (docstring)
    sigma = tail.per_ray(tail.sigma_mm, rays.blur_mm)
    half = 0.5 * (tail.lucent_hu + bone_hu)
    filled = out.ravel()
    refuted = unreadable & (g_vis >= half) & (filled > d_vis + HALO_FILL_REFUTE_SIGMAS * sigma)
    if prof is not None:
        g = _smooth_rays(prof - tail.tail_for(rays.blur_mm), rays.shape)  # what halo_screw read
        own = np.where(np.isfinite(w), w, 0.0)
        gave = np.where(unreadable & (filled > own), filled, np.nan)
        refuted |= fill_contradicted(np.ascontiguousarray(g, dtype=np.float64), float(rays.d_mm[0]),
                                     float(rays.d_mm[1] - rays.d_mm[0]), gave, d_vis, sigma,
                                     HALO_DEFICIT_WINDOW_MM, float(tail.lucent_hu), float(bone_hu),
                                     HALO_FILL_SHORTFALL_MM, float(bone_hu) + RIM_CLEAR_HU)
    refuted = refuted.reshape(S, A)
    out[refuted] = W[refuted]
    return out.ravel()


def _rim_widths(prof: np.ndarray, rays: ScrewRays, tail: MetalTail,
                bone_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Per azimuth, the halo width read from a sclerotic rim on the along-shaft median of the
    screw's profiles ``prof`` (:func:`screw_profiles`), and the rim's contrast there.

    Returns ``(width_mm, contrast_hu)``, (A,) each: the width, NaN where no rim is seen or
    where its inner edge cannot be read (censored); the peak's height over the level beyond
    it (0 where that level is not ordinary bone or the width is over the cap). A rim is
    seen where the contrast is at least ``HALO_RIM_MIN_HU``.

    Why: at 0.8x0.8x1.5 mm a 1.5 mm lucency between the bloomed shaft and a 1 mm sclerotic
    rim is filled in by the blur of both, and beyond ``d_vis`` the rim's excess cancels the
    lucency's deficit, so the per-ray kernel reads such a double halo as none; the rim
    itself stays plain on the median of 30-40 stations.

    A rim is the highest point within ``HALO_RIM_REACH_MM`` of ``d_vis`` (not its last
    one: a profile still rising there runs into a cortex), at least
    ``HALO_RIM_MIN_HU`` above the level beyond it (the lowest point ``HALO_RIM_VALLEY_MM``
    past the peak, before a pedicle cortex rises), with ordinary bone beyond it (within
    ``RIM_CLEAR_HU`` of ``bone_hu``; a pedicle wall has soft tissue beyond). The lucency
    ends where the profile, coming from the peak inward, falls under half-way between the
    level beyond and the peak. For a blurred rim 0.5-2 mm thick (sigma 0.35-0.9 mm) around
    a lucency at least 1 mm wide that level lies within 0.15 mm of the lucency's edge (a
    thin rim's blurred peak stays well under its true density; half-way between the lucent
    level and the peak read 0.05-0.65 mm short). A crossing at or before ``d_vis`` is not
    read (censored; the rim is seen), nor a width over ``HALO_RIM_MAX_WIDTH_MM`` (wider
    lucencies are read directly; a cortex beyond trabecular bone is not a rim: not seen)."""
    width, contrast, _ = _rim_readings(_median_profiles(prof, rays, tail), rays, tail, bone_hu)
    return width, contrast


def _median_profiles(prof: np.ndarray, rays: ScrewRays, tail: MetalTail) -> np.ndarray:
    """Per azimuth, the along-shaft median of the screw's profiles less the metal's tail
    (A, n): a sclerotic rim stays plain on it where single rays are lost in noise."""
    S, A = rays.shape
    return np.median(prof.reshape(S, A, -1), axis=0) - tail.tail_for(rays.blur_mm[:A])


def _rim_readings(g: np.ndarray, rays: ScrewRays, tail: MetalTail, bone_hu: float):
    """:func:`_rim_widths` on the median profiles ``g`` (:func:`_median_profiles`):
    ``(width_mm, contrast_hu, beyond_hu)`` per azimuth, the level beyond the rim NaN where
    no peak with ordinary bone beyond it was read."""
    _, A = rays.shape
    d = rays.d_mm
    step = float(d[1] - d[0])
    d_vis = tail.per_ray(tail.d_vis_mm, rays.blur_mm[:A])
    out = np.full(A, np.nan)
    contrast = np.zeros(A)
    beyonds = np.full(A, np.nan)
    for a in range(A):
        idx = np.flatnonzero((d >= d_vis[a]) & (d <= d_vis[a] + HALO_RIM_REACH_MM))
        if idx.size < 2:
            continue
        k = idx[np.argmax(g[a, idx])]
        if k == idx[-1]:
            continue  # still rising at the end of the reach: a cortex beyond, not a rim's peak
        peak = g[a, k]
        win = (d >= d[k] + HALO_RIM_VALLEY_MM[0]) & (d <= d[k] + HALO_RIM_VALLEY_MM[1])
        if not win.any():
            continue
        beyond = float(np.min(g[a, win]))
        if abs(beyond - bone_hu) >= RIM_CLEAR_HU:
            continue
        beyonds[a] = beyond
        contrast[a] = peak - beyond
        level = 0.5 * (beyond + peak)
        if contrast[a] < HALO_RIM_MIN_HU or g[a, idx[0]] >= level:
            continue
        s = k
        while g[a, s - 1] >= level:
            s -= 1
        f = (level - g[a, s - 1]) / (g[a, s] - g[a, s - 1])
        width = d[s - 1] + f * step
        if width <= HALO_RIM_MAX_WIDTH_MM:
            out[a] = width
        else:
            contrast[a] = 0.0
    # a rim surrounds a track: seen on fewer than HALO_RIM_MIN_AZIMUTHS neighbouring azimuths
    # it is a cortex or a bone island beside the shaft, not a rim
    seen = contrast >= HALO_RIM_MIN_HU
    out[~_in_long_runs(seen, HALO_RIM_MIN_AZIMUTHS)] = np.nan
    return out, contrast, beyonds


def _rim_sector(g: np.ndarray, rays: ScrewRays, rim_w: np.ndarray, beyond_hu: np.ndarray) -> np.ndarray:
    """Rim widths carried from the azimuths where a sclerotic rim was read (``rim_w``
    finite, :func:`_rim_widths`) round the circumference to the neighbouring azimuths that
    still hold the rim: their median profile ``g`` (:func:`_median_profiles`), averaged over
    ``RIM_WINDOW_MM`` past the carried width, lies at least ``HALO_RIM_SECTOR_FRACTION`` of
    the way from the bone beyond the read rims up to the read rims' own level there. The
    walk stops at the first azimuth that does not (the sector's edge). Returns the widths
    (A,), NaN where no rim is read or carried.

    Why: a double halo (lucency inside a sclerotic rim) is a sign of loosening (CLINICAL.md).
    At 0.8x0.8x1.5 mm its rim is read only on the sharpest directions: along the slice
    axis the blurred rim shows no peak over a pedicle cortex 2-3 mm beyond it, and the
    lucency is hidden inside the readable distance, so those directions read no halo and a
    2 mm double halo on 0.75 of the circumference read coverage 0.31-0.38 (not loose). Yet
    the rim's density is still plain there, 290-420 HU at the rim's distance where the
    rim-free part of the same screw reads 160-275 HU (true geometry, 25 HU; seeds 0, 27,
    29 and 34); it marks the double halo's sector."""
    A = len(rim_w)
    seen = np.isfinite(rim_w)
    out = rim_w.copy()
    if not seen.any() or seen.all():
        return out
    d = rays.d_mm

    def level(a: int, width: float) -> float:
        win = (d >= width + RIM_WINDOW_MM[0]) & (d <= width + RIM_WINDOW_MM[1])
        return float(np.mean(g[a, win])) if win.any() else -np.inf

    idx = np.flatnonzero(seen)
    bone = float(np.nanmedian(beyond_hu[idx]))
    rim = float(np.median([level(a, rim_w[a]) for a in idx]))
    cut = bone + HALO_RIM_SECTOR_FRACTION * (rim - bone)
    if not np.isfinite(cut) or rim <= bone:
        return out
    for step in (1, -1):  # walk outwards from every read azimuth, both ways
        for a0 in idx:
            if seen[(a0 + step) % A]:
                continue  # not the end of its run
            width = rim_w[a0]
            a = (a0 + step) % A
            while not seen[a] and np.isnan(out[a]) and level(a, width) >= cut:
                out[a] = width
                a = (a + step) % A
    return out


def _in_long_runs(mask: np.ndarray, min_len: int) -> np.ndarray:
    """Elements of a circular boolean sequence that lie in a run of at least ``min_len``
    consecutive True values."""
    n = len(mask)
    if mask.all():
        return mask.copy()
    out = np.zeros(n, bool)
    start = int(np.flatnonzero(~mask)[0]) + 1  # a run never wraps past this point
    k = 0
    while k < n:
        i = (start + k) % n
        if not mask[i]:
            k += 1
            continue
        run = []
        while k < n and mask[(start + k) % n]:
            run.append((start + k) % n)
            k += 1
        if len(run) >= min_len:
            out[run] = True
    return out


def _rim_rays(prof: np.ndarray, rays: ScrewRays, tail: MetalTail, bone_hu: float) -> np.ndarray:
    """Rays (S*A,) of the azimuths whose median profile shows a sclerotic rim on at least
    ``HALO_RIM_REF_MIN_AZIMUTHS`` neighbouring azimuths: never halo-free references,
    whatever the per-ray reading (a double halo the kernel reads as none would lift the tail
    by its rim and lower it by its lucency). Isolated rim-like peaks are left in: taking
    them out too drained a study's references at 0.35x0.35x0.6 mm, 40 HU (uniform seed 6:
    1.0-1.1 mm halos read 0.5-0.7 mm); requiring three azimuths, as for a rim's width, let
    rims back into the references (coarse whole double halos, seeds 0-3: MAE 0.23 -> 0.27)."""
    S, _ = rays.shape
    seen = _rim_widths(prof, rays, tail, bone_hu)[1] >= HALO_RIM_MIN_HU
    return np.tile(_in_long_runs(seen, HALO_RIM_REF_MIN_AZIMUTHS), S)


def _screw_result(rays: ScrewRays, hu: np.ndarray, prof: np.ndarray, tail: MetalTail,
                  config: Config, bone_hu: float | None = None):
    """Measurement and evidence of one screw through the fused kernel ``halo_screw``."""
    crit = config.criteria
    screw = rays.screw
    if bone_hu is None:
        bone_hu = tail.bone_hu
    S, A = rays.shape
    blur_a = rays.blur_mm[:A]
    d = rays.d_mm
    w, st, gmin, rim, edge, g_vis, beyond = halo_screw(
        hu, rays.origins_kji, rays.dirs_kji, S, A, float(d[0]), float(d[1] - d[0]), len(d),
        float(rays.radius_mm), np.ascontiguousarray(tail.tail_for(blur_a)),
        tail.per_ray(tail.d_vis_mm, blur_a), tail.per_ray(tail.sigma_mm, blur_a),
        float(tail.lucent_hu), float(bone_hu), _station_window(S), float(config.halo_max_width_mm),
        HALO_DEFICIT_WINDOW_MM, HALO_SETTLE_MM, RIM_WINDOW_MM[0], RIM_WINDOW_MM[1],
        HALO_LOCAL_MM[0], HALO_LOCAL_MM[1], HALO_DEFICIT_MIN_MM, HALO_FAR_LEN_MM,
        RIM_BEYOND_MM[0], RIM_BEYOND_MM[1], HALO_LOW_BONE_MARGIN_HU,
        HALO_DIRECT_FRACTION)
    # rays reading clearly less than their azimuth's sclerotic rim take the rim's reading,
    # before unreadable rays take their readable neighbours' widths, so a rim read on the
    # sharper directions also reaches the blurred ones (where it is censored); but not an
    # azimuth that is clearly rim-free (contrast under half HALO_RIM_MIN_HU): a halo-free
    # azimuth beside a half double halo took the rim's width (1.08 mm read for 0.75)
    # (and on the azimuths beside a read rim that still hold its level, _rim_sector)
    g_med = _median_profiles(prof, rays, tail)
    rim_read, rim_contrast, rim_beyond = _rim_readings(g_med, rays, tail, bone_hu)
    rim_w = _rim_sector(g_med, rays, rim_read, rim_beyond)
    carried = np.isfinite(rim_w) & ~np.isfinite(rim_read)
    rim_side = (rim_contrast >= 0.5 * HALO_RIM_MIN_HU) | carried
    W = w.copy().reshape(S, A)
    under = (np.isfinite(rim_w)[None, :] & (st.reshape(S, A) != 2)
             & (W < rim_w[None, :] - HALO_RIM_UNDER_MM))
    W[under] = np.broadcast_to(rim_w[None, :], W.shape)[under]
    w_plain = _fill_unreadable(w.copy(), st, g_vis, rays, tail, bone_hu, prof=prof)
    if under.any():  # else the rim-aware fill is the plain one
        w_rim = _fill_unreadable(W.ravel(), st, g_vis, rays, tail, bone_hu, known=under.ravel())
        w = np.where(np.tile(rim_side, S), w_rim, w_plain)
    else:
        w = w_plain
    excl = (st == 2) | ~np.isfinite(w)
    excl |= _neighbour_outliers(np.where(excl, np.nan, w), rays.shape) & ~excl
    w[excl] = np.nan
    used = np.isfinite(w)
    n_used = int(used.sum())
    if n_used:
        wu = w[used]
        mean = float(wu.mean())
        p95 = float(np.percentile(wu, 95))
        cov = float(np.mean(_along_shaft_width(w, rays.shape)[used] >= crit.halo_threshold_mm))
    else:
        mean = p95 = cov = 0.0
    # double halo: a dense rim just outside the lucency, where the bone beyond is ordinary
    # (a ray that took its azimuth's rim-read width is a rim ray: its own edge is not read)
    from_rim = under.ravel() & used
    lucent = used & (st == 1) & (w >= 0.75)
    evaluable = (lucent & (np.abs(beyond) < RIM_CLEAR_HU)) | from_rim
    n_eval = int(evaluable.sum())
    rim_ray = (rim > RIM_CLEAR_HU) | from_rim
    double = bool(n_eval >= DOUBLE_HALO_MIN_RAYS
                  and np.mean(rim_ray[evaluable]) >= DOUBLE_HALO_MIN_FRACTION)
    meas = ScrewMeasurement(
        id=screw.id, vertebra=screw.vertebra, side=screw.side,
        head_lps_mm=screw.head_lps_mm, tip_lps_mm=screw.tip_lps_mm,
        length_mm=screw.length_mm, diameter_mm=float(screw.diameter_mm),
        halo_mean_mm=max(mean, 0.0), halo_max_mm=max(p95, 0.0), halo_coverage=cov,
        loosening=bool(n_used > 0 and cov >= crit.halo_coverage_for_loosening),
        double_halo=double, rays_used=n_used, rays_excluded=int(len(w) - n_used),
        traced_diameter_mm=screw.traced_diameter_mm)
    ev = ScrewEvidence(id=screw.id, widths_mm=w.reshape(rays.shape),
                       station_lps_mm=rays.stations_lps, azimuth_dirs=rays.dirs_lps,
                       true_radius_mm=rays.radius_mm)
    return meas, ev


def _screw_bone_level(rays: ScrewRays, prof: np.ndarray, tail: MetalTail, config: Config) -> float:
    """The bone level around one screw: the far level of its halo-free rays when they are a
    good part of the screw (a quarter of its rays), kept within a third of the study's
    level; else the study's. (A screw with a full halo has no halo-free rays of its own, and
    the few rays that read none there are often the ones that met a cortex.) Azimuths that
    show a sclerotic rim are not halo-free (:func:`_rim_rays`): their far level lies in the
    rim and read 1.2-1.3x the study's bone around 1.5 mm double halos. Nor are the azimuths
    the rim's sector carries it to (:func:`_rim_sector`): the bone level read with them
    raised the half-way level on the rim-free side, whose rays then read lucencies (a 1.67 mm
    half double halo read coverage 0.73; 0.8x0.8x1.5 mm, seeds 0-47, 25 HU: half double
    halos +0.060 -> +0.046 on average, coverage MAE down by up to 0.005 per 12-seed set on both
    geometries, none up). (Keeping them out of the metal tail's references too was worse.)"""
    _, (w, st, _, _, _) = _analyse(prof, rays, tail, tail.bone_hu, config)
    nohalo = (st != 2) & (w < HALO_NOHALO_MM) & ~_rim_rays(prof, rays, tail, tail.bone_hu)
    g = _median_profiles(prof, rays, tail)
    rim_read, _, beyond = _rim_readings(g, rays, tail, tail.bone_hu)
    nohalo &= ~np.tile(np.isfinite(_rim_sector(g, rays, rim_read, beyond)), rays.shape[0])
    if nohalo.sum() >= max(HALO_MIN_REFERENCE_RAYS, 0.25 * len(w)):
        level = float(np.median(_far_level(prof[nohalo], rays.d_mm)))
        return float(np.clip(level, 0.75 * tail.bone_hu, 1.33 * tail.bone_hu))
    return tail.bone_hu


def measure_screw(volume: Volume, screw: ScrewGeometry, config: Config, *,
                  tail: MetalTail | None = None) -> tuple[ScrewMeasurement, ScrewEvidence]:
    """Peri-screw lucency halo of one screw (CONTRACT.md, "Peri-screw lucency halo").

    Parameters
    ----------
    volume : Volume
    screw : ScrewGeometry
        Head (where the shaft leaves bone), tip and the shaft's true diameter.
    config : Config
        ``halo_azimuths``, ``halo_station_step_mm``, ``halo_radial_step_mm``,
        ``halo_max_width_mm`` and the loosening criteria.
    tail : MetalTail, optional
        The study's metal tail (``measure_study`` estimates it once from every screw);
        without it the tail is estimated from this screw's own halo-free rays (and, with
        ``config.streak_band_removal``, the bands from the whole volume); with it, its
        ``bands`` are removed before reading.

    Returns
    -------
    ScrewMeasurement, ScrewEvidence
        ``halo_mean_mm`` is the mean width over used rays, ``halo_max_mm`` the 95th
        percentile, ``halo_coverage`` the fraction of used rays at least
        ``criteria.halo_threshold_mm`` wide, each ray's width for this decision being the
        interquartile mean of its azimuth's widths over ``HALO_COVERAGE_STATIONS`` stations
        along the shaft (:func:`_along_shaft_width`); ``rays_excluded`` counts rays recognised as
        crossing a streak or leaving bone (NaN in ``ScrewEvidence.widths_mm``).
    """
    if screw.diameter_mm <= 0 or screw.length_mm <= 0:
        raise InputError(f"screw {screw.id}", "screw has no length or diameter")
    hu = _hu(volume)
    bands = tail.bands if tail is not None else _study_bands(volume, config, hu)
    hu = without_bands(volume, bands, hu)
    rays = screw_rays(volume, screw, config)
    prof = screw_profiles(volume, rays, hu)
    if tail is None:
        tail = replace(estimate_metal_tail(volume, [rays], [prof], config), bands=bands)
    bone = _screw_bone_level(rays, prof, tail, config)
    return _screw_result(rays, hu, prof, tail, config, bone)


# ========================================================================== subsidence
def _endplate_for(cage: CageGeometry, anatomy: Anatomy, superior: bool):
    level = _level_of_cage(anatomy, cage)
    if level is None:
        return None, None, None
    vert = _vertebra(anatomy, level.upper if superior else level.lower)
    if vert is None:
        return level, None, None
    return level, vert, (vert.inferior_endplate if superior else vert.superior_endplate)


def _footprint_excess(points: np.ndarray, cage: CageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """How far (mm) points lie beyond a cage's footprint rectangle along its axes[1] and
    axes[2]: ``|u| - half_u``, ``|v| - half_v`` (negative inside)."""
    rel = points - np.asarray(cage.centroid_lps_mm)
    h = cage.half_sizes_mm
    return (np.abs(rel @ np.asarray(cage.axes[1])) - h[1],
            np.abs(rel @ np.asarray(cage.axes[2])) - h[2])


def _footprint_distance(points: np.ndarray, cages) -> np.ndarray:
    """Distance (mm) in the cages' own (axes[1], axes[2]) plane from points to the nearest
    cage footprint rectangle (0 inside)."""
    out = np.full(len(points), np.inf)
    for cg in cages:
        du, dv = _footprint_excess(points, cg)
        out = np.minimum(out, np.hypot(np.maximum(du, 0.0), np.maximum(dv, 0.0)))
    return out


def endplate_edge_fraction(volume: Volume, normal) -> float:
    """Where between the disc level and the cortical endplate's blurred peak its surface lies.

    A thin cortical endplate blurred by the scanner and the voxel peaks well below its true
    density, so half-way to that peak sits on the disc side of the surface; the thicker
    the voxels along the endplate normal, the lower the peak and the higher the surface's
    fraction of it: ``0.5 + ENDPLATE_FRACTION_PER_MM * extent`` (capped at 0.9), with
    ``extent`` the voxel extent along the normal. The slope was calibrated on the phantoms
    (1 mm cortical endplate; 0.6-1.5 mm slices); it is a property of thin-cortex imaging,
    not of one scan.
    """
    ext = float(_blur_extent_mm(volume, _unit(normal)[None, :])[0])
    return min(0.9, 0.5 + ENDPLATE_FRACTION_PER_MM * ext)


def endplate_edge_moments(profile_hu: np.ndarray, s_mm: np.ndarray, cortex_half_mm: float,
                          sample_extent_mm: float = 0.0) -> float:
    """The endplate surface on a disc-to-vertebra profile from its first two moments.

    Model: disc level ``L`` before the surface ``e``, a thin cortex from ``e`` (its excess
    over trabecular bone, of unknown height and thickness, centred ``cortex_half_mm``
    past ``e``), trabecular level ``T`` beyond. ``L`` is read over the first 0.5 mm,
    ``T`` over the last 1.5 mm. The integral ``m0`` and first moment ``m1`` of
    ``profile - L`` over the ray are unchanged by a symmetric blur:

        m0 = (T - L)(b - e) + K,   m1 = (T - L)(b^2 - e^2)/2 + K (e + h)

    with ``K`` the cortex's excess mass and ``h = cortex_half_mm``; eliminating ``K`` leaves
    a quadratic in ``e``. Why: a level crossing between the disc and the thin cortex's
    blurred peak depends on the slice phase when the endplate lies parallel to thick
    slices (its peak drops from 570 to 470 HU as the cortex splits between two 1.5 mm
    slices): 0.8x0.8x1.5 mm phantoms with an untilted L3 read its endplate -0.63 to +0.37
    mm off.

    Sampling: a profile interpolated linearly between voxels that each average the
    image over ``sample_extent_mm`` (``w``, the voxel's extent along the ray) keeps
    ``m0`` whatever the phase, but its ``m1`` is low by ``(T - L) w^2 / 8`` on average
    over the phase (the interpolated ramp of a step sampled in boxes: ``w^2/24`` from the
    ramp itself, ``w^2/12`` on average from where the step falls in its box); that mean is
    added back. What remains depends on the phase and cannot be read from one profile:
    a 1 mm cortex inside one 1.5 mm slice gives one sample whose value trades the cortex's
    density against its position (1D model of the phantoms' painting, 1.5 mm slices:
    -0.30 to +0.19 mm, mean -0.06 mm towards the disc without the term, -0.24 to +0.24,
    mean -0.01 with it; 1.0 mm slices: -0.04 to -0.01, mean -0.03 without, -0.01 to
    +0.01, mean -0.01 with).
    ``sample_extent_mm=0`` leaves ``m1`` as sampled.

    The disc side may be denser than the vertebra (bone bridging the disc): the model
    holds for any ``T - L``; at ``T = L`` it is the cortex's centroid less ``h``. Of two
    roots the one nearer the profile's peak less ``h`` is taken.

    Returns the surface's position in the profile's ``s_mm`` (NaN when no root lies on
    the ray with a positive cortex mass).
    """
    p = np.asarray(profile_hu, float)
    s = np.asarray(s_mm, float)
    a, b = float(s[0]), float(s[-1])
    L = float(p[s <= a + 0.5].mean())
    T = float(p[s >= b - 1.5].mean())
    D = T - L
    x = p - L
    m0 = float(np.trapezoid(x, s))
    m1 = float(np.trapezoid(s * x, s)) + D * float(sample_extent_mm) ** 2 / 8.0
    h = float(cortex_half_mm)
    # (D/2) e^2 + (m0 - D b + D h) e + (D b^2 / 2 + m0 h - D b h - m1) = 0
    qa, qb, qc = 0.5 * D, m0 - D * b + D * h, 0.5 * D * b * b + m0 * h - D * b * h - m1
    if abs(qa) * (b - a) < 1e-6 * max(abs(qb), 1e-9):
        roots = [-qc / qb] if qb != 0 else []
    else:
        disc = qb * qb - 4 * qa * qc
        if disc < 0:
            return float("nan")
        roots = [(-qb + math.sqrt(disc)) / (2 * qa), (-qb - math.sqrt(disc)) / (2 * qa)]
    # on the ray, and the cortex adds mass
    good = [r for r in roots if a <= r <= b and m0 - D * (b - r) > 0]
    if not good:
        return float("nan")
    hint = float(s[int(np.argmax(p))]) - h   # the cortex's blurred peak, less half the cortex
    return float(min(good, key=lambda r: abs(r - hint)))


def _between_cages(points: np.ndarray, cages) -> np.ndarray:
    """Points in the band joining two cages of one level: inside the rectangle (in the first
    cage's (axes[1], axes[2]) plane) spanned by both footprints.

    Why: the disc between two cages side by side is lit by both (blooming from either side,
    the streak band that joins two metal objects) and holds graft; its rays read the
    endplate up to 0.6 mm off (0.35 x 0.35 x 0.6 mm phantoms, S1 between two titanium
    cages), and a thin row of them there tilts the rim plane."""
    out = np.zeros(len(points), bool)
    cl = list(cages)
    for i in range(len(cl)):
        for j in range(i + 1, len(cl)):
            ax = np.asarray(cl[i].axes)[1:]
            corners = [np.asarray(cg.centroid_lps_mm) + s1 * cg.half_sizes_mm[1] * np.asarray(cg.axes[1])
                       + s2 * cg.half_sizes_mm[2] * np.asarray(cg.axes[2])
                       for cg in (cl[i], cl[j]) for s1 in (-1, 1) for s2 in (-1, 1)]
            cc = np.asarray(corners) @ ax.T
            pp = points @ ax.T
            out |= np.all((pp >= cc.min(0)) & (pp <= cc.max(0)), axis=1)
    return out


def rim_plane_fit(u_mm: np.ndarray, v_mm: np.ndarray, z_mm: np.ndarray,
                  tilt_prior_deg: float = RIM_TILT_PRIOR_DEG) -> tuple[np.ndarray, np.ndarray]:
    """Offset and tilt of the endplate surface ``z = c0 + gu * u + gv * v`` through rim points.

    ``(u, v)`` are the points' in-plane coordinates (mm) in the prior plane, ``z`` their
    surface offsets along the prior normal (mm). The slopes are a least-squares fit
    weighed against the prior normal (ridge, i.e. a Gaussian prior of ``tilt_prior_deg``
    on the tilt, against the rim's own scatter): where the rim surrounds the cage the
    points decide; where it is a thin strip (a level filled by two cages) the tilt across
    the strip stays the prior's. Points farther than max(3 robust SDs,
    ``RIM_REJECT_MIN_MM``) from the fit are dropped and the fit repeated.

    Returns
    -------
    coef : (3,) float; ``(c0, gu, gv)``.
    keep : (n,) bool; the points used.
    """
    z = np.asarray(z_mm, float)
    A = np.c_[np.ones(len(z)), np.asarray(u_mm, float), np.asarray(v_mm, float)]
    t2 = math.tan(math.radians(tilt_prior_deg)) ** 2

    def outside(r, keep):
        med = float(np.median(r[keep]))
        scale = max(1.4826 * float(np.median(np.abs(r[keep] - med))), 0.05)
        return np.abs(r - med) > max(3.0 * scale, RIM_REJECT_MIN_MM), scale

    keep = np.ones(len(z), bool)
    out, scale = outside(z, keep)          # first about the prior plane (no tilt)
    if (~out).sum() >= 6:
        keep = ~out
    for _ in range(20):
        Ak, zk = A[keep], z[keep]
        _, scale = outside(zk - Ak @ np.linalg.lstsq(Ak, zk, rcond=None)[0], np.ones(len(zk), bool))
        lam = scale * scale / t2
        coef = np.linalg.solve(Ak.T @ Ak + np.diag([0.0, lam, lam]), Ak.T @ zk)
        out, _ = outside(z - A @ coef, keep)
        if (~out).sum() < 6 or np.array_equal(~out, keep):
            break
        keep = ~out
    return coef, keep


def fit_endplate_rim(volume: Volume, hu: np.ndarray, vert: Vertebra, prior: Plane,
                     cages, config: Config) -> tuple[Plane, np.ndarray]:
    """The endplate plane fitted to its intact rim beside the cage(s).

    Rim points lie in the prior plane on a grid inside the body outline (less
    ``RIM_OUTLINE_MARGIN_MM``), at ``RIM_CAGE_GAP_MM`` to ``RIM_MAX_DIST_MM`` from the
    cage footprints and not between two cages (:func:`_between_cages`). Along the endplate
    normal, from the disc into the vertebra, each ray must meet a cortical endplate (a
    rising edge, ``kernels.subsidence.rising_edges`` at :func:`endplate_edge_fraction`);
    its surface is read from the profile's moments (:func:`endplate_edge_moments`, with the
    voxel extent along the normal for their mean sampling loss; they depend less than the
    level crossing, by up to 0.6 mm, on where the thin cortex falls within a thick slice,
    though still by +-0.25 mm on 1.5 mm slices) and must agree with the crossing within
    ``RIM_MOMENT_AGREE_MM``. The plane is fitted to those surface points, offset and tilt
    (:func:`rim_plane_fit`).

    Why the tilt: on 1.5 mm slices the detected endplate normal is up to 2.3 deg off (it is
    read from level crossings, seen only beside the cage), a millimetre at a cage corner 15
    mm from the rim's centre; the moment surfaces, 0.2 mm apart ray to ray, fix it wherever
    the rim spans the cage.
    """
    n0 = np.asarray(prior.normal)
    p0 = np.asarray(prior.point_lps_mm)
    c_proj = np.asarray(vert.center_lps_mm) - ((np.asarray(vert.center_lps_mm) - p0) @ n0) * n0
    u = np.asarray(vert.axis_lr) - (np.asarray(vert.axis_lr) @ n0) * n0
    u = _unit(u)
    v = np.cross(n0, u)
    R = max(vert.semi_axes_mm) + 1.0
    g = np.arange(-R, R + 1e-9, RIM_GRID_MM)
    U, V = np.meshgrid(g, g)
    pts = c_proj + U.ravel()[:, None] * u + V.ravel()[:, None] * v
    rho = _outline_coords(vert, pts)
    a, b = vert.semi_axes_mm
    shrink = 1.0 - RIM_OUTLINE_MARGIN_MM / min(a, b)
    fd = _footprint_distance(pts, cages)
    sel = (rho <= shrink) & (fd >= RIM_CAGE_GAP_MM) & (fd <= RIM_MAX_DIST_MM) & ~_between_cages(pts, cages)
    pts = pts[sel]
    if len(pts) < 6:
        return prior, np.empty((0, 3))
    starts = pts + RIM_RAY_START_MM * n0
    step = min(0.1, 0.25 * float(volume.spacing_mm.min()))
    n = int((RIM_RAY_START_MM + RIM_RAY_DEPTH_MM) / step) + 1
    o = np.ascontiguousarray(volume.lps_to_kji(starts))
    dk = np.ascontiguousarray(np.tile(volume.direction_lps_to_kji(-n0), (len(starts), 1)))
    edge, _, _ = rising_edges(hu, o, dk, 0.0, step, n,
                              5, ENDPLATE_DETECT_HU, int(1.5 / step), endplate_edge_fraction(volume, n0))
    ok = np.isfinite(edge)
    if ok.sum() < 6:
        return prior, np.empty((0, 3))
    prof = sample_rays(hu, np.ascontiguousarray(o[ok]), np.ascontiguousarray(dk[ok]), 0.0, step, n)
    s_mm = step * np.arange(n)
    e_mom = np.full(len(starts), np.nan)
    extent = float(_blur_extent_mm(volume, n0[None, :])[0])
    e_mom[ok] = [endplate_edge_moments(p, s_mm, ENDPLATE_CORTEX_HALF_MM, extent) for p in prof]
    ok &= np.isfinite(e_mom)
    ok[ok] = np.abs(e_mom[ok] - edge[ok]) <= RIM_MOMENT_AGREE_MM
    if ok.sum() < 6:
        return prior, np.empty((0, 3))
    rel = pts[ok] - c_proj
    coef, keep = rim_plane_fit(rel @ u, rel @ v, RIM_RAY_START_MM - e_mom[ok])
    normal = _unit(n0 - coef[1] * u - coef[2] * v)
    surf = starts[ok][keep] - e_mom[ok][keep, None] * n0
    return Plane(c_proj + coef[0] * n0, normal), surf


def _metal_edges(hu, origins_kji, dirs_kji, step, n, detect_hu,
                 clip_mm: float | None = None) -> np.ndarray:
    """Edge of metal reached from outside (mm along the ray): the crossing of the level
    ``SATURATED_EDGE_FRACTION`` (metal clipped at the top of the data range) or one half
    (unclipped) of the way from the surround to the metal's plateau.

    Why not half-max when clipped: the metal's true level is above the clip and blooming
    lifts the voxels at its surface, so the true surface reads about three quarters of the
    way up to the clip level (titanium ~3500 HU with a ~30 % blooming tail: at the surface
    (metal + surround) / 2 plus half the tail); the half-max of the clipped step would sit
    0.3-0.6 mm outside it.

    The metal's plateau is its maximum over 2 mm from the first sample at ``detect_hu``;
    whether it is clipped is judged, and the clipped edge's level read, over ``clip_mm``
    from there instead when given (at least those 2 mm): a thin object on thick slices can
    take longer than 2 mm to reach the clip (see :func:`marker_pin_ends`).
    """
    o = np.ascontiguousarray(origins_kji, dtype=float)
    d = np.ascontiguousarray(dirs_kji, dtype=float)
    n_low = max(int(round(0.5 / step)), 1)
    n_peak = int(round(2.0 / step))
    n_clip = n_peak if clip_mm is None else max(int(round(clip_mm / step)), n_peak)
    data_max = float(hu.max()) if hu.size else 0.0
    edge, low, peak = rising_edges(hu, o, d, 0.0, float(step), int(n), n_low, float(detect_hu), n_peak, 0.5)
    if n_clip > n_peak:
        _, _, peak = rising_edges(hu, o, d, 0.0, float(step), int(n), n_low, float(detect_hu), n_clip, 0.5)
    sat = np.isfinite(peak) & (peak >= data_max - SATURATION_MARGIN_HU)
    if sat.any():
        e2, _, _ = rising_edges(hu, o[sat], d[sat], 0.0, float(step), int(n), n_low, float(detect_hu),
                                n_clip, SATURATED_EDGE_FRACTION)
        edge[sat] = e2
    return edge


def _face_points_titanium(volume, hu, cage: CageGeometry, sign: float, config: Config):
    """Points on one bearing face of a titanium cage: half-max edge of the metal, found
    along the cage's own axis from outside the face inward."""
    c = np.asarray(cage.centroid_lps_mm)
    a0, a1, a2 = (np.asarray(x) for x in cage.axes)
    h0, h1, h2 = cage.half_sizes_mm
    o = sign * a0
    gu = np.arange(-h1 + FACE_MARGIN_MM, h1 - FACE_MARGIN_MM + 1e-9, FACE_GRID_MM)
    gv = np.arange(-h2 + FACE_MARGIN_MM, h2 - FACE_MARGIN_MM + 1e-9, FACE_GRID_MM)
    if gu.size == 0:
        gu = np.array([0.0])
    if gv.size == 0:
        gv = np.array([0.0])
    U, V = np.meshgrid(gu, gv)
    base = c + U.ravel()[:, None] * a1 + V.ravel()[:, None] * a2
    starts = base + (h0 + FACE_RAY_OUT_MM) * o
    step = min(0.05, 0.2 * float(volume.spacing_mm.min()))
    n = int((FACE_RAY_OUT_MM + FACE_RAY_IN_MM) / step) + 1
    ok_k = volume.lps_to_kji(starts)
    dk = np.tile(volume.direction_lps_to_kji(-o), (len(starts), 1))
    edge = _metal_edges(hu, ok_k, dk, step, n, config.metal_threshold_hu)
    face = starts - edge[:, None] * o
    nominal = (face - c) @ o - h0
    good = np.isfinite(edge) & (np.abs(nominal) <= FACE_TOL_MM)
    return face[good]


def marker_pin_ends(volume: Volume, hu: np.ndarray, cage: CageGeometry) -> list[dict]:
    """Both ends of each tantalum marker pin of a PEEK cage (LPS mm), read along the cage axis.

    A pin is a connected group of voxels at ``PIN_DETECT_HU`` or more inside the cage box
    (+1 mm); its line runs along the box axis through its centroid. From outside each face
    (``PIN_RAY_OUT_MM`` beyond it) a ray runs inward along that line to the pin's centre;
    the end is the ray's metal edge (:func:`_metal_edges`).

    Whether the pin is clipped at the top of the data range is judged over the whole ray up
    to the pin's centre (``clip_mm`` of :func:`_metal_edges`), not just the first 2 mm past
    the detection level. Why: a pin is thin (1 mm), so on thick slices the slice just beyond
    its end can be bright but unclipped (2000-2900 HU on 0.8x0.8x1.5 mm phantoms) and the
    interpolated profile can take more than 2 mm (up to two slices) to reach the clipped
    plateau. Within 2 mm its peak then read below the clip, the end was taken at half-way
    to that peak instead of the clipped-edge level, and the pin read 0.6-1.15 mm long at
    that end (seed 27's L3-L4 cage read 0.63-0.76 mm too deep). Read over the pin, every pin end of
    the development phantoms (seeds 0-35) at that spacing is within -0.25..+0.46 mm of the
    true end (what remains depends on where the end falls within a slice).

    Returns
    -------
    list of dict, one per pin: ``{+1.0: end or None, -1.0: end or None}``, the ends beyond
    ``+axes[0]`` and ``-axes[0]`` ((3,) arrays, None where no edge was found).
    """
    c = np.asarray(cage.centroid_lps_mm)
    A = np.asarray(cage.axes)
    h = np.asarray(cage.half_sizes_mm)
    # voxels inside the box (+1 mm) above the pin threshold
    corners = np.array([[s0, s1, s2] for s0 in (-1, 1) for s1 in (-1, 1) for s2 in (-1, 1)]) * (h + 1.0)
    kji = volume.lps_to_kji(c + corners @ A)
    lo = np.maximum(np.floor(kji.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(kji.max(axis=0)).astype(int) + 1, np.array(hu.shape))
    if np.any(hi <= lo):
        return []
    sub = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    kk, jj, ii = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    lps = volume.kji_to_lps(np.stack([kk, jj, ii], axis=-1).reshape(-1, 3)).reshape(sub.shape + (3,))
    local = (lps - c) @ A.T
    inside = np.all(np.abs(local) <= h + 1.0, axis=-1)
    mask = inside & (sub >= PIN_DETECT_HU)
    lab, n_lab = ndimage.label(mask)
    step = min(0.05, 0.2 * float(volume.spacing_mm.min()))
    ray_mm = float(h[0]) + PIN_RAY_OUT_MM
    n = int(ray_mm / step) + 1
    out = []
    for k in range(1, n_lab + 1):
        m = lab == k
        if m.sum() < 2:
            continue
        wts = sub[m] - PIN_DETECT_HU + 1.0
        cen = (lps[m] * wts[:, None]).sum(axis=0) / wts.sum()
        cl = cen - ((cen - c) @ A[0]) * A[0]  # the pin's line through its centroid
        ends = {}
        for sg in (1.0, -1.0):
            oo = sg * A[0]
            start = cl + ray_mm * oo
            edge = _metal_edges(hu, volume.lps_to_kji(start[None]), volume.direction_lps_to_kji(-oo)[None],
                                step, n, PIN_DETECT_HU, clip_mm=ray_mm)
            ends[sg] = start - edge[0] * oo if np.isfinite(edge[0]) else None
        out.append(ends)
    return out


def _face_points_peek(volume, hu, cage: CageGeometry, sign: float, config: Config):
    """Points on one bearing face of a PEEK cage from its tantalum marker pins
    (:func:`marker_pin_ends`).

    The pins run from ``peek_marker_inset_mm`` inside one face to the same inset inside
    the other. Where both ends of a pin are found, the face point is put the cage's half
    height from the pin's measured centre: a thin saturated pin's ends read off by the blur
    along the slice axis, alike at both ends, and by where each end falls within a slice;
    the centre cancels the first and averages the second. The half height is the cage
    box's, unless the box is shorter than its own pins: the shortest pin's measured half
    length plus the inset is a floor for the half height (a pin's end reads 0.07 mm long
    on average on 0.8x0.8x1.5 mm phantoms, -0.25 to +0.46 mm with the slice phase). (A
    detected PEEK box is only as tall as the detector read the pins: 0.6 mm short on the
    0.6x0.6x1.2 mm demo study, which read its cages 0.5-0.6 mm shallow.) With one end
    only, the face point is that end plus the inset.
    """
    h = np.asarray(cage.half_sizes_mm)
    o = sign * np.asarray(cage.axes)[0]
    pins, one_end = [], []
    for ends in marker_pin_ends(volume, hu, cage):
        if ends[1.0] is not None and ends[-1.0] is not None:
            pins.append((0.5 * (ends[1.0] + ends[-1.0]), 0.5 * float(np.linalg.norm(ends[1.0] - ends[-1.0]))))
        elif ends[sign] is not None:
            one_end.append(ends[sign])
    faces = []
    if pins:
        half = max(float(h[0]), min(hl for _, hl in pins) + config.peek_marker_inset_mm)
        faces = [mid + half * o for mid, _ in pins]
    faces += [e + config.peek_marker_inset_mm * o for e in one_end]
    return np.array(faces).reshape(-1, 3)


def slice_phase_offset(z_mm: np.ndarray, phase: np.ndarray, amplitude_prior_mm: float,
                       n_iter: int = 10) -> tuple[float, np.ndarray]:
    """Offset of a flat surface from points whose error depends on their slice phase.

    A thin surface read between slice centres (a level crossing or moments of a profile
    sampled every ``w`` mm along it and interpolated linearly) is off by an amount that
    repeats with the surface's position within a slice, ``phase`` in [0, 1) (0.8x0.8x1.5
    mm phantoms: a titanium face reads -0.03 to +0.28 mm off over one slice; an endplate
    beside it -0.25 to +0.2 mm). Where the surface is tilted to the slices its points see
    many phases; their median is pulled to whichever phases they happen to cover (a face
    2.6 deg to the slices covers 64 % of one). Here the error is modelled as its first
    harmonic ``a cos(2 pi phase) + b sin(2 pi phase)``, fitted with the offset ``c``: ``c``
    is the surface averaged over the slice phase. ``a`` and ``b`` are held by a Gaussian
    prior of ``amplitude_prior_mm`` (ridge against the points' robust scatter) so that a
    surface parallel to the slices (one phase) keeps its plain mean. Points farther than
    max(3 robust SDs, 0.3 mm) from the fit are dropped and the fit repeated.

    The harmonic's amplitude is also bounded by ``amplitude_prior_mm`` (the best fit with
    ``hypot(a, b)`` at that bound, :func:`_bounded_harmonic`). Why: the ridge weighs the
    prior against the points' scatter as if their errors were independent, but along a face
    they are smooth; where the points cover a small part of a cycle, a trend across the face
    (a box axis 0.7 deg off the face's own normal) was taken for a harmonic of 1.8 mm and
    the offset moved 1.7 mm past every point (seed 72 at 0.8x0.8x1.5 mm, 25 HU: phases
    0.19-0.38, a superior subsidence of 3.21 mm read for a true 4.76, graded mild for severe).

    Returns
    -------
    c : float; the offset (mm).
    keep : (n,) bool; the points used.
    """
    z = np.asarray(z_mm, float)
    t = 2.0 * np.pi * np.asarray(phase, float)
    A = np.c_[np.ones(len(z)), np.cos(t), np.sin(t)]
    med = float(np.median(z))
    keep = np.abs(z - med) <= max(3.0 * 1.4826 * float(np.median(np.abs(z - med))), 0.3)
    coef = np.array([float(np.median(z[keep])), 0.0, 0.0])
    for _ in range(n_iter):
        Ak, zk = A[keep], z[keep]
        r = zk - Ak @ coef
        scale = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 0.05)
        lam = scale * scale / max(amplitude_prior_mm, 1e-6) ** 2
        coef = np.linalg.solve(Ak.T @ Ak + np.diag([0.0, lam, lam]), Ak.T @ zk)
        r_all = z - A @ coef
        new = np.abs(r_all) <= max(3.0 * scale, 0.3)
        if new.sum() < 3 or np.array_equal(new, keep):
            break
        keep = new
    if np.hypot(coef[1], coef[2]) > amplitude_prior_mm:
        coef = _bounded_harmonic(z[keep], t[keep], amplitude_prior_mm)
    return float(coef[0]), keep


def _bounded_harmonic(z: np.ndarray, t: np.ndarray, amplitude_mm: float, n_angles: int = 360) -> np.ndarray:
    """Least-squares ``(c, a, b)`` of ``z = c + a cos t + b sin t`` with ``hypot(a, b)`` equal
    to ``amplitude_mm`` (where the unbounded fit lies beyond it, the bounded optimum is on the
    bound): for each direction of ``(a, b)`` on a 1-degree grid, ``c`` is the mean of what
    the harmonic leaves; the direction with the least squared residual wins."""
    ang = np.linspace(0.0, 2.0 * np.pi, n_angles, endpoint=False)
    harm = amplitude_mm * (np.cos(ang)[:, None] * np.cos(t)[None, :] + np.sin(ang)[:, None] * np.sin(t)[None, :])
    rest = z[None, :] - harm
    c = rest.mean(axis=1)
    k = int(np.argmin(((rest - c[:, None]) ** 2).sum(axis=1)))
    return np.array([c[k], amplitude_mm * np.cos(ang[k]), amplitude_mm * np.sin(ang[k])])


def _deepest_point(face_pts: np.ndarray, cage: CageGeometry, sign: float, plane: Plane,
                   volume: Volume | None = None):
    """The cage's deepest point past ``plane``. The face is the cage box's own face (the
    detected axes), placed at the measured face points' offset along the box axis averaged
    over the slice phase (:func:`slice_phase_offset`; with no ``volume``, or few points,
    their robust median); its deepest point past the plane is one of its four corners.
    Returns (depth_mm, point_lps)."""
    c = np.asarray(cage.centroid_lps_mm)
    A = np.asarray(cage.axes)
    h = np.asarray(cage.half_sizes_mm)
    o = sign * A[0]
    if len(face_pts):
        z = (face_pts - c) @ o
        med = np.median(z)
        mad = 1.4826 * np.median(np.abs(z - med))
        z_face = float(np.median(z[np.abs(z - med) <= max(3 * mad, 0.3)]))
        if volume is not None and len(face_pts) >= FACE_PHASE_MIN_POINTS:
            base = face_pts - z[:, None] * o
            w = float(_blur_extent_mm(volume, o[None, :])[0])
            # the grid axis that samples the face most coarsely (k, the slices, unless the
            # study is oriented oddly): the phase is taken along it
            axis_ijk = int(np.argmax(np.abs(o @ volume.direction) * volume.spacing_mm))
            for _ in range(2):   # the phase of the face plane at the current offset
                phase = np.mod(volume.lps_to_kji(base + z_face * o)[:, 2 - axis_ijk], 1.0)
                z_face, _ = slice_phase_offset(z, phase, FACE_PHASE_PRIOR_FRACTION * w)
    else:
        z_face = float(h[0])
    corners = np.array([c + z_face * o + s1 * h[1] * A[1] + s2 * h[2] * A[2]
                        for s1 in (-1, 1) for s2 in (-1, 1)])
    depth = -plane.signed_distance_mm(corners)
    k = int(np.argmax(depth))
    return float(depth[k]), corners[k]


def _cage_on_fitted_level(cage: CageGeometry, upper: tuple[Plane, Plane] | None,
                          lower: tuple[Plane, Plane] | None) -> CageGeometry:
    """The cage box turned with the level normal when the rim fits correct the endplates.

    ``upper`` and ``lower`` are ``(prior, fitted)`` planes of the upper body's inferior and
    the lower body's superior endplate. The detected box's own axis is the level normal
    (``hardware.find_cages``: the mean of the two endplates' superior normals,
    ``anatomy``), not a measurement of the cage: on thick slices its metal faces cannot
    give it (a saturated edge along the slice axis moves by +-0.2 mm with where it falls
    within a slice, 1-2 deg over a 22 mm face), and a 1.5 deg error puts a corner 11 mm
    from the face centre 0.3 mm off. The rim fits give better endplate normals; the box
    turns by the change they make to the level normal (none when either is missing).
    """
    if upper is None or lower is None:
        return cage
    old = _unit(np.asarray(lower[0].normal) - np.asarray(upper[0].normal))
    new = _unit(np.asarray(lower[1].normal) - np.asarray(upper[1].normal))
    A = np.asarray(cage.axes, float)
    a0 = _unit(A[0] + (new - old) * (1.0 if A[0] @ old >= 0 else -1.0))
    a1 = _unit(A[1] - (A[1] @ a0) * a0)
    return replace(cage, axes=(tuple(a0), tuple(a1), tuple(np.cross(a0, a1))))


def measure_cage(volume: Volume, cage: CageGeometry, anatomy: Anatomy,
                 config: Config) -> tuple[CageMeasurement, CageEvidence]:
    """Subsidence of one cage through each bearing endplate (CONTRACT.md, "Cage subsidence").

    For each bearing face: the endplate plane is fitted to the endplate's intact rim beside
    the cage (:func:`fit_endplate_rim`, offset and tilt); the box turns with the level
    normal those fits imply (:func:`_cage_on_fitted_level`); the face is read from the
    image (titanium: the cage's own metal edge, its points' offset averaged over the slice
    phase, :func:`slice_phase_offset`; PEEK: marker-pin ends plus
    ``config.peek_marker_inset_mm``); the depth is how far the face's deepest point lies
    past the plane along its normal (0 when the cage does not reach through it). Graded on
    the larger of the two.
    """
    hu = _hu(volume)
    level = _level_of_cage(anatomy, cage)
    same_level = [cg for cg in anatomy.cages if (cg.level == cage.level and cage.level is not None)] or [cage]
    planes, rims, fits = [], [], []
    for superior in (True, False):
        sign = 1.0 if superior else -1.0
        _, vert, prior = _endplate_for(cage, anatomy, superior)
        if prior is None:
            # no vertebra to read: the nominal face itself stands in for the endplate
            face_c = np.asarray(cage.centroid_lps_mm) + sign * cage.half_sizes_mm[0] * np.asarray(cage.axes[0])
            plane, rim = Plane(face_c, -sign * np.asarray(cage.axes[0])), np.empty((0, 3))
            fits.append(None)
        else:
            plane, rim = fit_endplate_rim(volume, hu, vert, prior, same_level, config)
            fits.append((prior, plane))
        planes.append(plane)
        rims.append(rim)
    box = _cage_on_fitted_level(cage, fits[0], fits[1])
    depths, deepest = [], []
    for superior, plane in zip((True, False), planes):
        sign = 1.0 if superior else -1.0
        if box.material == "titanium":
            face = _face_points_titanium(volume, hu, box, sign, config)
        else:
            face = _face_points_peek(volume, hu, box, sign, config)
        depth, point = _deepest_point(face, box, sign, plane, volume)
        depths.append(max(depth, 0.0))
        deepest.append(point)
    grade = config.criteria.subsidence_grade(max(depths))
    meas = CageMeasurement(id=cage.id, level=cage.level if cage.level else (level.name if level else None),
                           material=cage.material, centroid_lps_mm=cage.centroid_lps_mm,
                           subsidence_superior_mm=float(depths[0]),
                           subsidence_inferior_mm=float(depths[1]), subsidence_grade=grade)
    ev = CageEvidence(id=cage.id, superior_plane=planes[0], inferior_plane=planes[1],
                      deepest_superior_lps_mm=tuple(deepest[0]), deepest_inferior_lps_mm=tuple(deepest[1]),
                      rim_points_superior_lps_mm=rims[0], rim_points_inferior_lps_mm=rims[1])
    return meas, ev


# ============================================================================ bridging
def _endplate_centre(v: Vertebra, plane: Plane) -> np.ndarray:
    """Where a body's axis meets one of its endplate planes: the centre of its outline there
    (the plane's own point when the axis runs along the plane)."""
    p = np.asarray(v.center_lps_mm, float)
    d = np.asarray(v.axis_si, float)
    if abs(float(d @ np.asarray(plane.normal))) < 1e-6:
        return np.asarray(plane.point_lps_mm, float)
    return p + float(plane.line_parameter(p, d)) * d


def _outline_centre(level: DiscLevel, up: Vertebra | None, lo: Vertebra | None) -> np.ndarray:
    """Centre of the disc's outline in the level plane: the midpoint of the two endplate
    centres facing the disc (each body's axis meets its endplate there), moved along the
    level normal into the level plane.

    Each body's outline is centred on its own axis, so at the disc it sits where that axis
    meets the endplate; the level centre (on the line joining the two body centres) lies
    0.5-1.2 mm posterior of that at a lordotic level (bodies of unequal height, tilted
    against each other), which moved the whole outline off the disc.
    """
    c = np.asarray(level.center_lps_mm, float)
    if up is None or lo is None:
        return c
    m = 0.5 * (_endplate_centre(up, up.inferior_endplate) + _endplate_centre(lo, lo.superior_endplate))
    n = np.asarray(level.normal, float)
    return m - ((m - c) @ n) * n


def _endplate_level_hu(volume: Volume, pts: np.ndarray, n: np.ndarray, up: Vertebra,
                       lo: Vertebra) -> np.ndarray:
    """Per column (points ``pts`` in the level plane, normal ``n``): the mean of the highest
    HU within ``BRIDGE_ENDPLATE_WINDOW_MM`` beyond each of its two endplate planes (inside
    the bodies), i.e. how brightly the two endplates show at the ends of the column."""
    s = np.arange(0.0, BRIDGE_ENDPLATE_WINDOW_MM + 1e-9, BRIDGE_SAMPLE_MM)
    hu = _hu(volume)
    level = np.zeros(len(pts))
    for plane, sign in ((up.inferior_endplate, 1.0), (lo.superior_endplate, -1.0)):
        t = plane.line_parameter(pts, n)[:, None] + sign * s[None, :]
        q = pts[:, None, :] + t[..., None] * n
        vals = sample_points(hu, np.ascontiguousarray(volume.lps_to_kji(q.reshape(-1, 3))))
        level += 0.5 * vals.reshape(t.shape).max(axis=1)
    return level


def _rim_off_bodies(volume: Volume, pts: np.ndarray, n: np.ndarray, up: Vertebra, lo: Vertebra,
                    rim: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Columns of the outline's rim (``rim``, flat mask over ``pts``) that lie off the two
    bodies: their endplates show less than half-way from the surrounding soft tissue
    (``BRIDGE_SURROUND_HU``) to the endplates of the outline's core (``core``, median).

    The outline comes from the bodies' semi-axes; a blurred bright cortex moves a
    threshold edge outward (0.6 mm on 0.8x0.8x1.5 mm data), and columns beyond the bodies
    run through soft tissue (never bridged), which lowered the bridged fraction. Half-way
    to the core's endplate level is where a blurred surface lies; only the rim is checked,
    so a lucent or eroded endplate inside the disc still counts against fusion.
    """
    off = np.zeros(len(pts), bool)
    if not rim.any() or not core.any():
        return off
    sel = rim | core
    level = np.full(len(pts), np.nan)
    level[sel] = _endplate_level_hu(volume, pts[sel], n, up, lo)
    ref = float(np.median(level[core]))
    if not ref > BRIDGE_SURROUND_HU:
        return off
    off[rim] = level[rim] < 0.5 * (ref + BRIDGE_SURROUND_HU)
    return off


def _cage_box_distance(points: np.ndarray, cage: CageGeometry) -> np.ndarray:
    """In-plane distance (mm) of points from a cage's footprint, as the cage margins measure
    it: the larger of the two :func:`_footprint_excess` (negative inside the footprint; a
    margin ``m`` is the set where it is at most ``m``)."""
    return np.maximum(*_footprint_excess(points, cage))


def _cage_midline(dist_mm: np.ndarray, step_mm: float, min_mm: float) -> np.ndarray:
    """Columns on the midline between two cages: about as far from the nearest cage as from
    the next (within one grid cell, ``step_mm``) and at least ``min_mm`` from both.

    ``dist_mm`` is (n_cages, n_points) (:func:`_cage_box_distance`). Why: each cage's
    blooming margin is measured from its box, and a detected titanium box reads wide of
    the metal (its clipped, bloomed roll-off lies outside the true surface: +0.54 mm per
    face at 0.8x0.8x1.5 mm, +0.28 at 0.5x0.5x1.0 mm); two such margins closed the 5 mm
    gap between two cages side by side, so no column there was read and the gap (packed
    with graft, bridged in phantom seed 9 L3-L4) left the fraction (0.563 for 0.711 true).
    The midline is as far from both cages as the gap allows, where their blooming is
    weakest; it is read, and the rest of the gap takes its state (the margin fill).
    """
    if dist_mm.shape[0] < 2:
        return np.zeros(dist_mm.shape[1], bool)
    d = np.sort(dist_mm, axis=0)
    return (d[0] >= min_mm) & (d[1] - d[0] <= step_mm)


def _fill_from_nearest(values: np.ndarray, known: np.ndarray, unknown: np.ndarray,
                       shape: tuple[int, int], step_mm: float, reach_mm: float):
    """``values`` (flat, on a grid of ``shape`` with ``step_mm`` cells) where each
    ``unknown`` cell takes the value of the nearest ``known`` cell at most ``reach_mm``
    away. Returns the filled values and the mask of unknown cells left unfilled."""
    out = values.copy()
    if not unknown.any() or not known.any():
        return out, unknown.copy()
    dist, idx = ndimage.distance_transform_edt(~known.reshape(shape), return_indices=True)
    near = np.ravel_multi_index((idx[0].ravel(), idx[1].ravel()), shape)
    fill = unknown & (dist.ravel() * step_mm <= reach_mm)
    out[fill] = values[near[fill]]
    return out, unknown & ~fill


def measure_level(volume: Volume, level: DiscLevel, anatomy: Anatomy,
                  config: Config) -> tuple[LevelMeasurement, LevelEvidence]:
    """Fusion bridging of one disc level (CONTRACT.md, "Fusion bridging").

    The cross-section is a grid in the level's plane inside the vertebral body outline
    (the mean of the two bodies' outline ellipses, centred between the two endplate
    centres, :func:`_outline_centre`), cage footprints excluded; rim columns whose
    endplates do not show in the image lie off the bodies and leave it too
    (:func:`_rim_off_bodies`). Each column runs along the level normal from just inside the
    lower endplate plane to just inside the upper one (the endplate cortices themselves
    are not counted); it is bridged when its lightly smoothed profile stays above
    ``config.bone_threshold_hu`` all the way (``kernels.bridging``).

    Columns within a margin of a cage cannot be read (titanium blooms into its
    surroundings, PEEK walls are bone-dense); they stay in the cross-section and take the
    state of the nearest readable column at most one titanium margin away
    (:func:`_fill_from_nearest`); only those farther from any readable column are left out.
    Leaving the whole margin out instead counted it at the level's mean, while bone packed
    around cages is denser than that: 0.571 read for 0.669 true beside two titanium cages
    (phantom seed 22 L5-S1). Between two cages the midline is read whenever it lies at
    least ``CAGE_MIDLINE_MIN_MM`` from both (:func:`_cage_midline`), so two margins never
    close the gap: detected titanium boxes read wide of the metal, and the bridged gap of
    seed 9 L3-L4 left the fraction (0.563 read for 0.711 true at 0.8x0.8x1.5 mm).
    ``instrumented``: the level has a cage, or screws in both of its vertebrae.
    """
    up = _vertebra(anatomy, level.upper)
    lo = _vertebra(anatomy, level.lower)
    n = np.asarray(level.normal)
    c = _outline_centre(level, up, lo)
    ref_lr = np.asarray((up or lo).axis_lr) if (up or lo) else np.array([1.0, 0.0, 0.0])
    u = _unit(ref_lr - (ref_lr @ n) * n)
    v = np.cross(n, u)
    verts = [x for x in (up, lo) if x is not None]
    if verts:
        a = float(np.mean([x.semi_axes_mm[0] for x in verts]))
        b = float(np.mean([x.semi_axes_mm[1] for x in verts]))
    else:
        a, b = 20.0, 15.0
    step = BRIDGE_GRID_MM
    gu = np.arange(-a + 0.5 * step, a, step)
    gv = np.arange(-b + 0.5 * step, b, step)
    U, V = np.meshgrid(gu, gv)  # [v, u]
    pts = c + U.ravel()[:, None] * u + V.ravel()[:, None] * v
    domain = ((U / a) ** 2 + (V / b) ** 2 <= 1.0).ravel()
    cages = [cg for cg in anatomy.cages if cg.level == level.name]
    band = np.zeros(len(pts), bool)
    dist = np.array([_cage_box_distance(pts, cg) for cg in cages]).reshape(len(cages), len(pts))
    for cg, d in zip(cages, dist):
        margin = CAGE_MARGIN_TITANIUM_MM if cg.material == "titanium" else CAGE_MARGIN_PEEK_MM
        domain &= ~(d <= 0.0)
        band |= d <= margin
    band &= ~_cage_midline(dist, step, CAGE_MIDLINE_MIN_MM)
    if domain.any() and up is not None and lo is not None:
        inner = ((U / max(a - BRIDGE_RIM_MM, step)) ** 2
                 + (V / max(b - BRIDGE_RIM_MM, step)) ** 2 <= 1.0).ravel()
        domain &= ~_rim_off_bodies(volume, pts, n, up, lo, domain & ~inner, domain & inner)
    band &= domain
    readable = domain & ~band
    bridged = np.zeros(len(pts), bool)
    estimated = np.zeros(len(pts), bool)
    if readable.any() and up is not None and lo is not None:
        p = pts[readable]
        t_lo = lo.superior_endplate.line_parameter(p, n) + BRIDGE_END_MARGIN_MM
        t_up = up.inferior_endplate.line_parameter(p, n) - BRIDGE_END_MARGIN_MM
        mid = 0.5 * (t_lo + t_up)
        short = t_up - t_lo < BRIDGE_SAMPLE_MM * 2
        t_lo = np.where(short, mid - BRIDGE_SAMPLE_MM, t_lo)
        t_up = np.where(short, mid + BRIDGE_SAMPLE_MM, t_up)
        starts = p + t_lo[:, None] * n
        ends = p + t_up[:, None] * n
        n_s = max(int(np.ceil(np.max(t_up - t_lo) / BRIDGE_SAMPLE_MM)) + 1, 3)
        smooth = max(int(round(BRIDGE_SMOOTH_MM / BRIDGE_SAMPLE_MM)), 1)
        smooth += 1 - smooth % 2
        b_col, _ = bridged_columns(_hu(volume), np.ascontiguousarray(volume.lps_to_kji(starts)),
                                   np.ascontiguousarray(volume.lps_to_kji(ends)), n_s, smooth,
                                   float(config.bone_threshold_hu))
        bridged[readable] = b_col
        reach = max(CAGE_MARGIN_TITANIUM_MM, CAGE_MARGIN_PEEK_MM) + step
        bridged, unfilled = _fill_from_nearest(bridged, readable, band, U.shape, step, reach)
        domain &= ~unfilled
        estimated = band & ~unfilled
    else:
        domain &= ~band  # nothing readable to take the margin's state from
    n_dom = int(domain.sum())
    frac = float(bridged.sum() / n_dom) if n_dom else 0.0
    screw_verts = {s.vertebra for s in anatomy.screws}
    instrumented = bool(cages) or (level.upper in screw_verts and level.lower in screw_verts)
    meas = LevelMeasurement(level=level.name, center_lps_mm=level.center_lps_mm,
                            instrumented=instrumented, bridging_fraction=min(max(frac, 0.0), 1.0),
                            fusion=config.criteria.fusion_class(frac))
    origin = c - a * u - b * v + 0.5 * step * (u + v)
    ev = LevelEvidence(level=level.name, origin_lps_mm=tuple(origin), axis_u=tuple(u), axis_v=tuple(v),
                       step_mm=step, domain=domain.reshape(U.shape), bridged=bridged.reshape(U.shape),
                       estimated=estimated.reshape(U.shape))
    return meas, ev


# =============================================================================== study
def _study_screw_profiles(volume: Volume, anatomy: Anatomy, config: Config, hu: np.ndarray):
    """Rays and sampled profiles of every measurable screw of the study."""
    valid = [s for s in anatomy.screws if s.diameter_mm > 0 and s.length_mm > 0]
    rays_list = [screw_rays(volume, s, config) for s in valid]
    return rays_list, [screw_profiles(volume, r, hu) for r in rays_list]


def _study_rod_tail(volume: Volume, anatomy: Anatomy, config: Config, hu: np.ndarray,
                    rays_list: list[ScrewRays]):
    """The rods' tail profiles on the screws' distance grid (None without rods).

    Only rods no thicker than the study's thinnest screw (``ROD_DIAMETER_TOL_MM``) are
    used: a thicker rod carries more tail than a thinner screw, and would no longer bound
    that screw's tail from below."""
    thinnest = min(r.screw.diameter_mm for r in rays_list)
    rods = [r for r in anatomy.rods if r.diameter_mm <= thinnest + ROD_DIAMETER_TOL_MM]
    if not rods:
        return None
    return rod_tail_profiles(volume, rods, [r.screw for r in rays_list],
                             rays_list[0].d_mm, config, hu)


def study_metal_tail(volume: Volume, anatomy: Anatomy, config: Config) -> MetalTail | None:
    """The study's metal tail, estimated once from every screw's halo-free rays.

    For callers that measure screws one at a time (the flow's mapped tasks): pass it as
    ``measure_screw(..., tail=)`` to get exactly what ``measure_study`` gives. A tail from a
    single screw is poorer (fewer halo-free rays), so a whole halo can be under-read.
    None when the study has no measurable screw.
    """
    return _study_tail(volume, anatomy, config, _hu(volume))[2]


def _study_bands(volume: Volume, config: Config, hu: np.ndarray) -> tuple:
    """The study's dark streak bands (none when ``config.streak_band_removal`` is off)."""
    if not config.streak_band_removal:
        return ()
    return tuple(find_streak_bands(volume, config.metal_threshold_hu, hu))


def _study_tail(volume: Volume, anatomy: Anatomy, config: Config, hu: np.ndarray):
    """(rays, profiles, metal tail, image) of every measurable screw of the study: the
    streak bands are removed from ``hu`` first (the image returned; the tail keeps the
    bands); the tail is None when there is no measurable screw."""
    bands = _study_bands(volume, config, hu) if anatomy.screws else ()
    hu = without_bands(volume, bands, hu)
    rays_list, profiles = _study_screw_profiles(volume, anatomy, config, hu)
    if not rays_list:
        return rays_list, profiles, None, hu
    tail = estimate_metal_tail(volume, rays_list, profiles, config,
                               rod_tail=_study_rod_tail(volume, anatomy, config, hu, rays_list))
    return rays_list, profiles, replace(tail, bands=bands), hu


def measure_study(volume: Volume, anatomy: Anatomy, config: Config):
    """Every screw, cage and level of a study.

    With ``config.streak_band_removal`` the study's dark streak bands are measured and
    removed once (:mod:`pipeline.streaks`); the metal tail for the halo is estimated once
    from all screws' halo-free rays.

    Returns
    -------
    screws, cages, levels : lists of ScrewMeasurement, CageMeasurement, LevelMeasurement
    evidence : dict of ScrewEvidence / CageEvidence / LevelEvidence by screw id, cage id
        and level name.
    """
    hu = _hu(volume)
    evidence: dict = {}
    screws_out = []
    rays_list, profiles, tail, hu_halo = _study_tail(volume, anatomy, config, hu)
    if tail is not None:
        for rays, prof in zip(rays_list, profiles):
            bone = _screw_bone_level(rays, prof, tail, config)
            m, ev = _screw_result(rays, hu_halo, prof, tail, config, bone)
            screws_out.append(m)
            evidence[m.id] = ev
    cages_out = []
    for cg in anatomy.cages:
        m, ev = measure_cage(volume, cg, anatomy, config)
        cages_out.append(m)
        evidence[m.id] = ev
    levels_out = []
    for lv in anatomy.levels:
        m, ev = measure_level(volume, lv, anatomy, config)
        levels_out.append(m)
        evidence[m.level] = ev
    return screws_out, cages_out, levels_out, evidence


__all__ = ["MetalTail", "estimate_metal_tail", "fit_endplate_rim", "measure_cage", "measure_level",
           "measure_screw", "measure_study", "rod_tail_profiles", "screw_profiles", "screw_rays", "study_metal_tail"]
