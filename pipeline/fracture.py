"""Rod and screw fractures: a gap across a rod or a screw shaft, located and measured.

A fracture of a rod or a shaft is a thin slab where metal is missing. Sampled along the
hardware's centre line the HU profile is a metal plateau that drops into the gap and comes
back (:func:`centreline_profile`). Three things make this less simple than a threshold:

* **Clipping and blooming.** Titanium is far beyond a 12-bit scanner's range: the plateau
  is clipped (3071 HU) and the blurred metal on both sides of the gap spills into it. At
  coarse spacing a 1 mm gap can stay above the 2200 HU metal threshold and only shows as a
  shallow dip below the plateau. So a gap is any dip *below the plateau* that is deeper
  than the plateau's own noise (:func:`find_dips`), not a fall below the metal threshold.
* **Width.** The half-maximum of such a dip is not its width (a shallow dip's depth, not
  its width, carries the information). We model the dip as the sum of the two broken
  ends' edge responses, ``p(s) = min(C, B + (E(s - s0 + w/2) - B) + (E(s0 + w/2 - s) - B))``
  where ``E(x)`` is the HU at distance ``x`` outside a metal surface (measured on the same
  rod or shaft's own sides, from its true radius, and scaled to the axis direction by the
  voxel extent along it), ``B`` the surrounding tissue and ``C`` the plateau; the gap
  width ``w`` and centre ``s0`` are the least-squares fit (:func:`fit_gap`). For a wide gap
  this reduces to the distance between the two half-maximum crossings, corrected for the
  metal's spill; for a shallow one it reads the width from the depth.
* **False gaps.** Rod ends and screw tips fall and never come back; a tulip or the rod
  passing through it only adds metal; streaks are in-plane bands that touch a few of the
  parallel lines sampled across the rod's core (the profile is their median). A dip must
  come back to the plateau on both sides, be deeper than ``DIP_MIN_HU`` (and several
  plateau noise SDs) over at least ``DIP_MIN_LENGTH_MM``.
* **Gaps narrower than the blur (screw shafts).** At 0.8 x 0.8 x 1.5 mm a shaft gap up to
  about 1.2 mm (0.8 mm at 0.5 x 0.5 x 1.0 mm) leaves the centre line clipped at 3071 HU:
  the metal on both sides, amplified and blurred, still saturates it. The missing metal
  still lowers the blurred shaft's skirt, so the cross-section integral of the HU above
  ``SECTION_THRESHOLD_HU`` (far above cortex) dips where the centre line does not
  (:func:`section_metal_hu_mm2`). Its dips (:func:`section_dips`, a black top-hat that
  must come back on both sides within ``SECTION_SPAN_MM``) are gaps too; their width is
  read by superposing the shaft's own tip response twice (:func:`fit_section_gap`).
  Measured on the phantoms: the integral of intact shafts wanders (grid crossing, bone
  around the shaft) by up to 0.094 of its plateau at coarse spacing (0.06 at standard),
  more where the tulip's bloom decays into the shaft (0.12, hence ``JUNCTION_*``); a
  0.8 / 1.0 / 1.2 mm gap dips 0.12 / 0.15 / 0.19 at coarse spacing and 0.8 mm 0.17 at
  standard.
* **Rod gaps narrower than the blur.** Rods get the same cross-section channel, with no
  head junction (a tulip or the rod through it only adds metal) and a lower depth
  ``ROD_SECTION_DIP_REL``: intact rods' top-hat stays below 0.025 of the plateau at
  coarse spacing (0.016 at standard) over 8 seeds, sub-slice gaps dip 0.09-0.8. A rod has
  no clean end to read an end response from (its ends sit against the tulip walls), so
  such a gap is sized by the integral's deficit (:func:`section_deficit_mm`: metal
  missing, conserved by blurring), and a dip with no deficit (a detected line veering off
  the rod towards a tulip) is dropped. Measured over ten slice phases (seed 5): every
  1.0-1.2 mm rod gap found at 0.8 x 0.8 x 1.5 mm (0.8 mm: 7/10, 0.4-0.6 mm: 6/10), every
  0.8-1.0 mm one at 0.5 x 0.5 x 1.0 mm (0.6 mm: 6/10, 0.4 mm: 2/10), every 0.6 mm one at
  0.35 x 0.35 x 0.6 mm (0.4 mm: 9/10, 0.3 mm: 7/10). Sub-slice gaps that hold no slice
  centre read short (see :func:`section_deficit_mm`).

Tuned on the phantoms of :mod:`sample_data.phantom` at 0.35-0.8 mm in-plane / 0.6-1.5 mm
slices (tests/test_fracture.py). Rod fracture is clinically common after long constructs
and osteotomies (6.8 %, 15.8 % after pedicle subtraction osteotomy; CLINICAL.md) and usually
means pseudarthrosis.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from kernels.sampling import sample_points
from pipeline.config import Config
from pipeline.results import Anatomy, FractureFinding, Rod, ScrewGeometry
from pipeline.volume import Volume

STEP_MM = 0.1                 # sampling step along the centre line
CORE_FRACTION = 0.45          # parallel lines at this fraction of the radius around the axis
N_CORE_LINES = 6              # ... this many, plus the axis itself
END_PAD_MM = 4.0              # sample this far beyond the hardware's ends
DIP_MIN_HU = 12.0             # a dip shallower than this below the plateau is not a gap
DIP_NOISE_K = 6.0             # ... nor one within this many plateau noise SDs
DIP_MIN_LENGTH_MM = 0.3       # ... nor one shorter than this (a sampling blip)
RETURN_MM = 1.5               # the plateau must hold this far on both sides of a gap
ESF_RANGE_MM = (-1.0, 6.0)    # edge response sampled from the true surface outward
ESF_AZIMUTHS = 12
ESF_STATION_QUANTILE = 50     # percentile over rays (median: a low one read rod gaps short)
ESF_NEAREST = 48              # rays nearest in grid crossing that make one edge response
BACKGROUND_MM = (4.0, 6.0)    # surrounding tissue this far outside the surface
MAX_GAP_MM = 15.0
ROD_JOIN_MM = 12.0            # same-side rod pieces this close end to end are one rod
SECTION_THRESHOLD_HU = 2000.0  # cross-section channel: metal above this (far above cortex)
SECTION_MARGIN_MM = 2.5       # ... read this far beyond the radius
SECTION_PITCH_MM = 0.25       # ... on a grid of this pitch
SECTION_STEP_MM = 0.2         # ... every this far along the shaft
SECTION_SPAN_MM = 3.0         # ... a dip comes back up on both sides within this span
SECTION_DIP_REL = 0.105       # ... and is at least this fraction of the plateau deep
SECTION_NOISE_K = 6.0         # ... and this many robust SDs of the top-hat
JUNCTION_MM = 3.5             # ... within this of a screw's head (tulip bloom decaying)
JUNCTION_DIP_REL = 0.16       # ... at least this deep
TIP_REACH_MM = 3.0            # the tip's end response read this far either side of its face
SECTION_FIT_NEAREST = True    # the width fit reads voxel values (the clip acts on voxels)
MERGE_MM = 2.0                # a section dip this close to a centre-line dip is the same gap
ROD_SECTION_DIP_REL = 0.06    # rods: a section dip at least this fraction of the plateau deep
DEFICIT_HALF_MM = 2.5         # rods: the section deficit summed this far either side
DEFICIT_MIN_MM = 0.1          # rods: a section dip must miss at least this much metal


# ------------------------------------------------------------------------------ geometry
def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _perp_frame(axis) -> tuple[np.ndarray, np.ndarray]:
    ax = _unit(axis)
    ref = np.array([0.0, 0.0, 1.0]) if abs(ax[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = _unit(ref - (ref @ ax) * ax)
    return e1, np.cross(ax, e1)


def _perp_frames(axes) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_perp_frame` for many axes at once: (n, 3) e1 and e2."""
    ax = np.atleast_2d(np.asarray(axes, float))
    ax = ax / np.linalg.norm(ax, axis=1, keepdims=True)
    ref = np.where(np.abs(ax[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = ref - np.sum(ref * ax, axis=1, keepdims=True) * ax
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(ax, e1)


def voxel_extent_mm(volume: Volume, dirs_lps) -> np.ndarray:
    """Voxel extent (mm) along unit LPS directions, ``sqrt(sum((n_ijk * spacing)^2))``: how
    far the voxel grid (partial volume, PSF) smears an edge crossed along that direction."""
    d = np.atleast_2d(np.asarray(dirs_lps, float))
    n_ijk = d @ volume.direction
    return np.sqrt(((n_ijk * volume.spacing_mm[None, :]) ** 2).sum(axis=1))


def polyline_points(points_lps_mm, s_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, 3) and unit tangents (n, 3) at arc lengths ``s_mm`` along a polyline
    (extrapolated straight beyond both ends)."""
    P = np.asarray(points_lps_mm, float)
    seg = np.diff(P, axis=0)
    L = np.linalg.norm(seg, axis=1)
    keep = L > 1e-6
    P = np.vstack([P[:1], P[1:][keep]])
    seg, L = seg[keep], L[keep]
    cum = np.concatenate([[0.0], np.cumsum(L)])
    k = np.clip(np.searchsorted(cum, s_mm, side="right") - 1, 0, len(L) - 1)
    tan = seg[k] / L[k][:, None]
    return P[k] + (s_mm - cum[k])[:, None] * tan, tan


def polyline_length_mm(points_lps_mm) -> float:
    P = np.asarray(points_lps_mm, float)
    return float(np.linalg.norm(np.diff(P, axis=0), axis=1).sum())


# ------------------------------------------------------------------------------ sampling
def _sample(volume: Volume, hu: np.ndarray, pts_lps: np.ndarray) -> np.ndarray:
    shape = pts_lps.shape[:-1]
    kji = np.ascontiguousarray(volume.lps_to_kji(pts_lps.reshape(-1, 3)), dtype=np.float64)
    return sample_points(hu, kji).reshape(shape)


def centreline_profile(volume: Volume, hu: np.ndarray, points_lps_mm, radius_mm: float,
                       s_mm: np.ndarray) -> np.ndarray:
    """HU along a rod / shaft centre line at arc lengths ``s_mm``: per station the median of
    the axis and ``N_CORE_LINES`` parallel lines at ``CORE_FRACTION`` of the radius (a gap
    cuts them all; a streak or a slightly off-centre line touches only some)."""
    c, tan = polyline_points(points_lps_mm, s_mm)
    ang = 2 * np.pi * np.arange(N_CORE_LINES) / N_CORE_LINES
    off = [np.zeros_like(c)]
    for a in ang:
        e1 = np.cross(tan, np.where(np.abs(tan[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]]))
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        e2 = np.cross(tan, e1)
        off.append(CORE_FRACTION * radius_mm * (np.cos(a) * e1 + np.sin(a) * e2))
    pts = c[None, :, :] + np.stack(off)
    return np.median(_sample(volume, hu, pts), axis=0)


def grid_key(volume: Volume, dirs_lps) -> np.ndarray:
    """How a direction crosses the voxel grid: (in-plane extent, slice extent) in mm of a
    unit step along it. The PSF and partial volume of a CT volume are aligned with its
    grid (in-plane and through-slice differ), so edges crossed along directions with the
    same key are smeared alike."""
    d = np.atleast_2d(np.asarray(dirs_lps, float))
    ext = np.abs(d @ volume.direction) * volume.spacing_mm[None, :]
    return np.column_stack([np.hypot(ext[:, 0], ext[:, 1]), ext[:, 2]])


def recentre_stations(volume: Volume, hu: np.ndarray, stations_lps: np.ndarray, axes: np.ndarray,
                      radius_mm: float, iterations: int = 2) -> np.ndarray:
    """Stations moved onto the metal's own axis: per station, the half-maximum edge on
    ``ESF_AZIMUTHS`` rays across the axis; the first Fourier term of edge radius against
    azimuth is the station's offset from the true centre. A rod's centre line found as
    the mean of its metal is pulled towards the tulips; edge responses read from it would
    start inside or outside the true surface. (All stations are sampled in one call per
    iteration: per-call overhead, not arithmetic, dominated when they were read one by one.)"""
    ang = 2 * np.pi * np.arange(ESF_AZIMUTHS) / ESF_AZIMUTHS
    rho = np.arange(0.0, radius_mm + 4.0 + 1e-9, 0.05)
    out = np.array(stations_lps, float).copy()
    n = len(out)
    if n == 0:
        return out
    e1, e2 = _perp_frames(np.asarray(axes, float).reshape(n, 3))
    dirs = (np.cos(ang)[None, :, None] * e1[:, None, :]
            + np.sin(ang)[None, :, None] * e2[:, None, :])            # (n, az, 3)
    n_top = max(3, int(0.5 * radius_mm / 0.05))
    active = np.ones(n, bool)
    for _ in range(iterations):
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        pts = out[idx, None, None, :] + rho[None, None, :, None] * dirs[idx, :, None, :]
        prof = _sample(volume, hu, pts)                                # (m, az, rho)
        top = prof[:, :, :n_top].max(axis=2)
        level = 0.5 * (top + np.median(prof[:, :, -20:], axis=2))
        below = prof < level[:, :, None]
        has = below.any(axis=2)
        edges = np.where(has, rho[np.argmax(below, axis=2)], np.nan)  # (m, az)
        for q, k in enumerate(idx):
            e = edges[q]
            ok = np.isfinite(e)
            if ok.sum() < ESF_AZIMUTHS - 2:
                active[k] = False
                continue
            # rays that run into a tulip or a neighbour read long: drop the longest quarter
            ok &= e <= np.nanpercentile(e, 75) + 0.5
            a = 2.0 * np.mean((e * np.cos(ang))[ok])
            b = 2.0 * np.mean((e * np.sin(ang))[ok])
            shift = a * e1[k] + b * e2[k]
            if np.linalg.norm(shift) > 0.5 * radius_mm:
                active[k] = False
                continue
            out[k] = out[k] + shift
    return out


class EdgeLibrary:
    """Edge responses of the study's own metal, measured on the sides of its rods and
    shafts from their true radius outward, keyed by how each ray crosses the voxel grid.

    ``response(axis)`` gives ``E(x)`` (HU at distance ``x`` outside a metal face crossed
    along ``axis``): the ``ESF_STATION_QUANTILE`` percentile (the median) of the
    ``ESF_NEAREST`` rays whose :func:`grid_key` is nearest the axis's. Tulips and
    neighbouring metal only add HU, but they touch a minority of the rays; a low percentile
    (the 25th, used before) picked the sharpest, least spilled sides, so the modelled dip of
    a given width was too deep and rod gaps read short (2.0 mm gaps 1.42-1.86 mm at 0.8 x
    0.8 x 1.5 mm and 1.61-1.90 at 0.5 x 0.5 x 1.0 over ten slice phases; with the median
    1.71-2.16 and 1.80-2.11). ``background_hu``: surrounding tissue.
    """

    def __init__(self, x_mm: np.ndarray):
        self.x_mm = x_mm
        self._keys: list = []
        self._curves: list = []
        self._bg: list = []

    def add(self, volume: Volume, hu: np.ndarray, stations_lps: np.ndarray, axes: np.ndarray,
            radius_mm: float) -> None:
        ang = 2 * np.pi * np.arange(ESF_AZIMUTHS) / ESF_AZIMUTHS
        rho = np.arange(ESF_RANGE_MM[0], BACKGROUND_MM[1] + 1e-9, STEP_MM)
        far = (rho >= BACKGROUND_MM[0]) & (rho <= BACKGROUND_MM[1])
        if len(stations_lps) == 0:
            return
        e1, e2 = _perp_frames(np.asarray(axes, float).reshape(-1, 3))
        dirs = (np.cos(ang)[None, :, None] * e1[:, None, :]
                + np.sin(ang)[None, :, None] * e2[:, None, :])          # (n, az, 3)
        pts = (np.asarray(stations_lps, float)[:, None, None, :]
               + (radius_mm + rho)[None, None, :, None] * dirs[:, :, None, :])
        prof = _sample(volume, hu, pts)                                # (n, az, rho)
        for d, pr in zip(dirs, prof):
            self._keys.append(grid_key(volume, d))
            self._curves.append(np.array([np.interp(self.x_mm, rho, p) for p in pr]))
            self._bg.append(np.median(pr[:, far], axis=1))

    @property
    def background_hu(self) -> float:
        return float(np.median(np.concatenate(self._bg)))

    def response(self, volume: Volume, axis) -> np.ndarray:
        keys = np.concatenate(self._keys)
        curves = np.concatenate(self._curves)
        d = np.linalg.norm(keys - grid_key(volume, axis)[0], axis=1)
        near = np.argsort(d, kind="stable")[:ESF_NEAREST]
        E = np.percentile(curves[near], ESF_STATION_QUANTILE, axis=0)
        return np.minimum.accumulate(E)  # an edge response only falls outward


# ---------------------------------------------------------------------------------- dips
def plateau_level(profile_hu: np.ndarray) -> tuple[float, float]:
    """The metal plateau (HU) of a centre-line profile and its noise SD (robust).

    The metal part is what lies above half-way between the profile's 5th percentile (the
    tissue beyond the ends) and its maximum; the plateau is its median and the noise
    1.4826 x its MAD (zero on a clipped plateau)."""
    p = np.asarray(profile_hu, float)
    lo, hi = np.percentile(p, 5), p.max()
    metal = p[p >= lo + 0.5 * (hi - lo)]   # >=: a flat profile (outside the volume) is its own plateau
    C = float(np.median(metal))
    noise = 1.4826 * float(np.median(np.abs(metal - C)))
    return C, noise


def find_dips(profile_hu: np.ndarray, plateau_hu: float, threshold_hu: float,
              step_mm: float, return_mm: float = RETURN_MM,
              min_length_mm: float = DIP_MIN_LENGTH_MM) -> list[tuple[int, int]]:
    """Index ranges ``[a, b)`` where the profile sits more than ``threshold_hu`` below the
    plateau and comes back to it on both sides (within ``threshold_hu``, held for
    ``return_mm``): gaps, not ends. Runs shorter than ``min_length_mm`` are dropped."""
    p = np.asarray(profile_hu, float)
    at_plateau = p >= plateau_hu - threshold_hu
    n_ret = max(1, int(round(return_mm / step_mm)))
    n = len(p)
    return [(i, j) for i, j in true_runs(p < plateau_hu - threshold_hu)
            if (j - i) * step_mm >= min_length_mm and i - n_ret >= 0 and j + n_ret <= n
            and at_plateau[i - n_ret:i].all() and at_plateau[j:j + n_ret].all()]


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of the maximal runs of True in a 1-D boolean ``mask``."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(i), int(j)) for i, j in zip(edges[::2], edges[1::2])]


def gap_model(s_mm: np.ndarray, s0_mm: float, width_mm: float, esf_x_mm: np.ndarray,
              esf_hu: np.ndarray, background_hu: float, plateau_hu: float) -> np.ndarray:
    """Predicted profile across a gap of ``width_mm`` centred at ``s0_mm`` (module doc):
    the two broken ends' edge responses added over the background, capped at the plateau."""
    d1 = (s_mm - s0_mm) + 0.5 * width_mm      # distance outside the lower end's face
    d2 = (s0_mm - s_mm) + 0.5 * width_mm      # ... and the upper end's
    e1 = np.interp(d1, esf_x_mm, esf_hu, left=plateau_hu)   # deeper inside: the plateau
    e2 = np.interp(d2, esf_x_mm, esf_hu, left=plateau_hu)
    pred = e1 + e2 - background_hu
    return np.minimum(pred, plateau_hu)


def fit_gap(s_mm: np.ndarray, profile_hu: np.ndarray, s0_mm: float, esf_x_mm: np.ndarray,
            esf_hu: np.ndarray, background_hu: float, plateau_hu: float,
            max_width_mm: float = MAX_GAP_MM) -> float:
    """Gap width (mm) whose :func:`gap_model` dip, centred at ``s0_mm``, has the observed
    dip's deficit area ``sum(C - p) * step`` (monotone in the width; the area is robust to
    noise and to the exact shape of the blur, which a shallow dip barely shows)."""
    step = float(s_mm[1] - s_mm[0])
    observed = float(np.sum(np.clip(plateau_hu - profile_hu, 0.0, None)) * step)
    ws = np.arange(0.02, max_width_mm + 1e-9, 0.02)
    ss = s0_mm + np.arange(-0.5 * max_width_mm - 6.0, 0.5 * max_width_mm + 6.0 + 1e-9, step)
    areas = np.array([np.sum(plateau_hu - gap_model(ss, s0_mm, w, esf_x_mm, esf_hu,
                                                    background_hu, plateau_hu)) * step
                      for w in ws])
    areas = np.maximum.accumulate(areas)
    if observed <= areas[0]:
        return float(ws[0])
    if observed >= areas[-1]:
        return float(ws[-1])
    k = int(np.searchsorted(areas, observed))
    a0, a1 = areas[k - 1], areas[k]
    f = 0.0 if a1 <= a0 else (observed - a0) / (a1 - a0)
    return float(ws[k - 1] + f * (ws[k] - ws[k - 1]))


# ------------------------------------------------------------------- cross-section channel
def section_offsets_mm(radius_mm: float, margin_mm: float = SECTION_MARGIN_MM,
                       pitch_mm: float = SECTION_PITCH_MM) -> np.ndarray:
    """In-plane offsets (n, 2) in mm of a square grid of ``pitch_mm`` filling a disc of
    radius ``radius_mm + margin_mm``: the cross-section read at each station."""
    R = radius_mm + margin_mm
    g = np.arange(-R, R + 1e-9, pitch_mm)
    u, v = np.meshgrid(g, g, indexing="ij")
    keep = u ** 2 + v ** 2 <= R ** 2
    return np.column_stack([u[keep], v[keep]])


def section_samples(volume: Volume, hu: np.ndarray, points_lps_mm, s_mm: np.ndarray,
                    offsets_mm: np.ndarray, nearest: bool = False) -> np.ndarray:
    """HU (n_stations, n_offsets) on the planes perpendicular to the polyline at arc lengths
    ``s_mm``, at the in-plane ``offsets_mm`` of :func:`section_offsets_mm`."""
    c, tan = polyline_points(points_lps_mm, s_mm)
    ref = np.where(np.abs(tan[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(tan, ref)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(tan, e1)
    # built in array coordinates (an affine map): millions of points per study
    c_kji = volume.lps_to_kji(c)
    e1_kji, e2_kji = volume.direction_lps_to_kji(e1), volume.direction_lps_to_kji(e2)
    kji = np.matmul(offsets_mm[None, :, :], np.stack([e1_kji, e2_kji], axis=1))
    kji += c_kji[:, None, :]
    if nearest:
        kji = np.rint(kji)
    flat = np.ascontiguousarray(kji.reshape(-1, 3), dtype=np.float64)
    return sample_points(hu, flat).reshape(kji.shape[:-1])


def section_metal_hu_mm2(samples_hu: np.ndarray, threshold_hu: float = SECTION_THRESHOLD_HU,
                         pitch_mm: float = SECTION_PITCH_MM) -> np.ndarray:
    """Per station, the cross-section integral of the HU above ``threshold_hu`` (HU mm^2).

    Why: at a gap narrower than the blur the centre of a titanium shaft stays clipped at
    3071 HU, but the metal that is missing still lowers the blurred metal's *skirt*: the
    part of the cross-section above a high threshold narrows, so its integral dips even
    where the centre line stays on the plateau. A threshold far above bone (cortex about
    1000 HU) keeps bone, halo and the bone's own texture out of it."""
    return np.clip(samples_hu - threshold_hu, 0.0, None).sum(axis=-1) * pitch_mm ** 2


def section_dips(section: np.ndarray, s_mm: np.ndarray, length_mm: float,
                 span_mm: float = SECTION_SPAN_MM, min_rel: float = SECTION_DIP_REL,
                 noise_k: float = SECTION_NOISE_K, junction_mm: float = JUNCTION_MM,
                 junction_rel: float = JUNCTION_DIP_REL) -> list[tuple[float, float]]:
    """Dips of the cross-section integral: ``(centre s_mm, depth as a fraction of the
    plateau)``.

    The depth at each station is the black top-hat (grey closing over ``span_mm`` minus the
    profile): a dip must come back up on both sides within ``span_mm`` (an end falls and
    never returns; a tulip or a rod through it only adds metal). It must reach ``min_rel`` of
    the plateau (the median over the hardware's length) and ``noise_k`` robust SDs of the
    top-hat along the hardware, and lie inside the hardware. Within ``junction_mm`` of the
    start (a screw's head) the tulip's blooming decays along the shaft and leaves a shallow
    valley where the shaft enters bone: there a dip must reach ``junction_rel``."""
    step = float(s_mm[1] - s_mm[0])
    n = max(3, int(round(span_mm / step)) | 1)
    inside = (s_mm >= 0.0) & (s_mm <= length_mm)
    plateau = float(np.median(section[inside])) if inside.any() else 0.0
    if plateau <= 0.0:
        return []
    rel = (ndimage.grey_closing(section, size=n, mode="nearest") - section) / plateau
    core = inside & (s_mm > junction_mm) & (s_mm < length_mm - 1.0)
    noise = 0.0
    if core.any():
        noise = 1.4826 * float(np.median(np.abs(rel[core] - np.median(rel[core]))))
    thr = np.where(s_mm > junction_mm, min_rel, junction_rel)
    thr = np.maximum(thr, noise_k * noise)
    low = (rel > thr) & (s_mm > 0.0) & (s_mm < length_mm)
    return [(float(np.sum(s_mm[i:j] * rel[i:j]) / np.sum(rel[i:j])), float(rel[i:j].max()))
            for i, j in true_runs(low)]


def _rows_at(V: np.ndarray, x0_mm: float, dx_mm: float, d_mm: np.ndarray) -> np.ndarray:
    """Rows of ``V`` (sampled at ``x0 + k dx``) linearly interpolated at ``d_mm``, clamped."""
    f = np.clip((np.asarray(d_mm, float) - x0_mm) / dx_mm, 0.0, V.shape[0] - 1.0)
    k0 = np.minimum(np.floor(f).astype(int), V.shape[0] - 2)
    t = (f - k0)[..., None]
    return V[k0] * (1.0 - t) + V[k0 + 1] * t


def section_deficit_mm(volume: Volume, hu: np.ndarray, points_lps_mm, radius_mm: float,
                       s0_mm: float, half_mm: float = DEFICIT_HALF_MM,
                       step_mm: float = STEP_MM) -> float:
    """Width (mm) of a rod gap from the area of its cross-section dip: the integral along
    the rod of ``1 - section / plateau`` over ``s0_mm +- half_mm``, the plateau a straight
    line through the medians of the 1 mm flanks just outside the window.

    Why: blurring (PSF, partial volume, blooming) moves metal along the rod but does not
    create or destroy it, so a gap of width ``w`` removes ``w`` mm worth of the rod's
    cross-section from the integral of the blurred image along the rod, however narrow and
    shallow the dip it leaves: ``deficit / plateau = w``. A rod gap narrower than the blur
    has no clean end to read an end response from (rod ends sit against the tulip walls),
    and this needs none.

    Limits (measured on the phantoms, seed 5, ten slice phases): clipping at 3071 HU and the
    2000 HU threshold of :func:`section_metal_hu_mm2` hide the deficit of the clipped core,
    so what is read comes from the blurred rim. The phantom paints the gap as the minimum of
    the rod's and the slab's signed distances, so a rim voxel loses far less than its share
    of the slab (true partial volume is nearer the product of the two coverages): at 0.8 x
    0.8 x 1.5 mm a sub-slice gap that holds no slice centre reads about a third of its width
    (1.0 mm: 0.27-0.57 mm; 1.2 mm: 0.57-0.64), one that holds a slice centre 0.9-1.3 mm.
    With the gap painted as the product of coverages (a test patch of the phantom, not
    committed) every 0.6-2.0 mm coarse rod gap found read within 0.5 mm / 30 % (1.0 mm:
    0.68-1.33). Noise on an intact rod reads up to about 0.2 mm."""
    P = [np.asarray(p, float) for p in points_lps_mm]
    s = s0_mm + np.arange(-half_mm - 1.0, half_mm + 1.0 + 1e-9, step_mm)
    obs = section_metal_hu_mm2(section_samples(volume, hu, P, s, section_offsets_mm(radius_mm)))
    base, win = _flank_baseline(s, obs, s0_mm, half_mm)
    if np.any(base[win] <= 0.0):
        return 0.0
    return max(0.0, float(np.sum(1.0 - obs[win] / base[win]) * step_mm))


def _flank_baseline(s_mm, obs, s0_mm, half_mm):
    """The plateau a section integral would have without the gap: a straight line through the
    medians of the flanks just outside ``s0_mm +- half_mm`` (the integral drifts along a shaft
    with the grid crossing and the bone around it). Returns ``(baseline, window mask)``."""
    win = np.abs(s_mm - s0_mm) <= half_mm
    left, right = s_mm < s0_mm - half_mm, s_mm > s0_mm + half_mm
    base = np.interp(s_mm, [float(np.mean(s_mm[left])), float(np.mean(s_mm[right]))],
                     [float(np.median(obs[left])), float(np.median(obs[right]))])
    return base, win


def fit_section_gap(volume: Volume, hu: np.ndarray, points_lps_mm, radius_mm: float,
                    s0_mm: float, max_width_mm: float = 3.0) -> float:
    """Width (mm) of a gap seen only in the cross-section integral, from the shaft's own tip.

    Blurring and blooming are linear, so a gap of width ``w`` at ``s0`` is the sum of two
    ends facing each other: ``HU = min(cap, V(d1) + V(d2) - B)`` per cross-section pixel,
    where ``V(x)`` is the cross-section at distance ``x`` beyond the shaft's tip (its one
    clean flat end, read on the same shaft, so the same grid crossing; held beyond
    ``TIP_REACH_MM``, where the blooming is spent), ``B`` the tissue just beyond the tip,
    ``d1 = s - s0 + w/2``, ``d2 = s0 + w/2 - s``, and ``cap`` the scanner's clip (the tip's
    own maximum). The width is the one whose modelled signed deficit of
    :func:`section_metal_hu_mm2` (area below the plateau as a fraction of it, over a window
    of ``max_width_mm / 2 + 1.5`` mm either side) equals the observed one, the observed
    plateau being a straight line through the window's flanks.

    Both the tip response and the observed dip are read as voxel values (nearest voxel,
    ``SECTION_FIT_NEAREST``): the clip acts on voxels, so summing two *interpolated* clipped
    ends overstates the metal at the faces and read 1.0 mm gaps 1.5 mm wide at 0.8 x 0.8 x
    1.5 mm.

    Limits (measured on the phantoms): the tip face is taken where the hardware's tip says
    (a tip placed 0.2 mm short of the real one reads the gap 0.4 mm wider, and the
    reverse); a real tip is conical, not flat. 0.8 / 1.0 / 1.2 mm shaft gaps at 0.8 x 0.8 x
    1.5 mm read 0.85-1.29 / 0.93-1.40 / 1.06-1.44 mm; 0.8 mm at 0.5 x 0.5 x 1.0 mm reads
    0.48-0.75 mm; on unclipped (extended-range) data the model is exact (0.89 for 0.8)."""
    P = [np.asarray(p, float) for p in points_lps_mm]
    L = polyline_length_mm(P)
    offs = section_offsets_mm(radius_mm)
    dx = STEP_MM
    x = np.arange(-TIP_REACH_MM, TIP_REACH_MM + 1e-9, dx)
    V = section_samples(volume, hu, P, L + x, offs, nearest=SECTION_FIT_NEAREST)  # (n_x, n_pix)
    B = V[x >= TIP_REACH_MM - 0.5].mean(axis=0)   # just beyond the tip (not the far cortex)
    half = 0.5 * max_width_mm + 1.5
    s = s0_mm + np.arange(-half - 1.0, half + 1.0 + 1e-9, dx)
    obs = section_metal_hu_mm2(section_samples(volume, hu, P, s, offs,
                                               nearest=SECTION_FIT_NEAREST))
    base, win = _flank_baseline(s, obs, s0_mm, half)
    if np.any(base[win] <= 0.0):
        return 0.0
    deficit_obs = float(np.sum(1.0 - obs[win] / base[win]) * dx)
    cap = float(V.max())
    plateau_mod = float(section_metal_hu_mm2(np.minimum(cap, V[0] + V[-1] - B)))
    sw = s[win]
    ws = np.arange(-1.5, max_width_mm + 1e-9, 0.02)
    deficit_mod = np.empty(len(ws))
    for k, w in enumerate(ws):
        m = np.minimum(cap, _rows_at(V, x[0], dx, sw - s0_mm + 0.5 * w)
                       + _rows_at(V, x[0], dx, s0_mm + 0.5 * w - sw) - B)
        deficit_mod[k] = np.sum(1.0 - section_metal_hu_mm2(m) / plateau_mod) * dx
    deficit_mod = np.maximum.accumulate(deficit_mod)   # signed deficit: monotone in w
    return max(0.0, float(np.interp(deficit_obs, deficit_mod, ws)))


# ---------------------------------------------------------------------------- per piece
def hardware_fractures(volume: Volume, hu: np.ndarray, points_lps_mm, radius_mm: float,
                       kind: str, hardware_id: str, library: EdgeLibrary,
                       start_id: int = 1, section: bool = False) -> list[FractureFinding]:
    """Gaps along one rod polyline or screw shaft (points in order, LPS mm), measured with
    the study's edge responses ``library``. With ``section`` (screw shafts), dips of the
    cross-section integral (:func:`section_dips`) are gaps too where the centre line shows
    none (a gap narrower than the blur leaves the centre clipped), and every shaft gap is
    sized from the shaft's own tip (:func:`fit_section_gap`: on the phantoms within 0.25 mm
    for 1.5-3 mm gaps at all three spacings, where the centre-line fit read up to 0.43 mm
    short). Rods (``kind == "rod"``) always get the cross-section channel, with the rods'
    own depth threshold and no head junction; their section-only gaps are sized by the
    integral deficit (:func:`section_deficit_mm`)."""
    length = polyline_length_mm(points_lps_mm)
    s = np.arange(-END_PAD_MM, length + END_PAD_MM + 1e-9, STEP_MM)
    prof = centreline_profile(volume, hu, points_lps_mm, radius_mm, s)
    C, noise = plateau_level(prof)
    thr = max(DIP_MIN_HU, DIP_NOISE_K * noise)
    dips = find_dips(prof, C, thr, STEP_MM)
    out, at_s = [], []
    for i, j in dips:
        w_idx = max(int(round(3.0 / STEP_MM)), (j - i))
        lo, hi = max(0, i - w_idx), min(len(s), j + w_idx)
        s_guess = float(np.sum(s[i:j] * (C - prof[i:j])) / np.sum(C - prof[i:j]))
        _, tan = polyline_points(points_lps_mm, np.array([s_guess]))
        E = library.response(volume, tan[0])
        B = float(E[-1])  # the response's own far level: the tissue its rays ended in
        w = fit_gap(s[lo:hi], prof[lo:hi], s_guess, library.x_mm, E, B, C)
        if section:  # a shaft: its own tip's end response sizes the gap better (module doc)
            w = fit_section_gap(volume, hu, points_lps_mm, radius_mm, s_guess,
                                max_width_mm=max(3.0, 1.5 * w))
        pos, _ = polyline_points(points_lps_mm, np.array([s_guess]))
        out.append(FractureFinding(id=f"fracture-{start_id + len(out)}", kind=kind,
                                   hardware_id=hardware_id, position_lps_mm=pos[0], gap_mm=w))
        at_s.append(s_guess)
    if section or kind == "rod":
        s2 = np.arange(-END_PAD_MM, length + END_PAD_MM + 1e-9, SECTION_STEP_MM)
        sec = section_metal_hu_mm2(section_samples(volume, hu, points_lps_mm, s2,
                                                   section_offsets_mm(radius_mm)))
        if section:
            sdips = section_dips(sec, s2, length)
        else:  # a rod: no head junction; its tulips only add metal (module doc)
            sdips = section_dips(sec, s2, length, min_rel=ROD_SECTION_DIP_REL, junction_mm=0.0)
        for s0, _depth in sdips:
            if any(abs(s0 - a) <= MERGE_MM for a in at_s):
                continue
            if section:
                w = fit_section_gap(volume, hu, points_lps_mm, radius_mm, s0)
            else:
                w = section_deficit_mm(volume, hu, points_lps_mm, radius_mm, s0)
                # a dip that misses no metal against its flanks is the line running off
                # the rod (a detected line veering towards a tulip), not a gap
                if w < DEFICIT_MIN_MM:
                    continue
            pos, _ = polyline_points(points_lps_mm, np.array([s0]))
            out.append(FractureFinding(id=f"fracture-{start_id + len(out)}", kind=kind,
                                       hardware_id=hardware_id, position_lps_mm=pos[0], gap_mm=w))
            at_s.append(s0)
    return out


def _join_rod_pieces(rods) -> list[tuple[str, list, float]]:
    """Same-side rod pieces that meet end to end (a rod broken in two found as two pieces)
    joined into one polyline: [(id, points, diameter)]."""
    groups: dict = {}
    for r in rods:
        groups.setdefault(r.side if r.side is not None else r.id, []).append(r)
    out = []
    for pieces in groups.values():
        pieces = sorted(pieces, key=lambda r: -max(p[2] for p in r.points_lps_mm))
        cur_id, cur_pts, cur_d = pieces[0].id, [np.asarray(p, float) for p in pieces[0].points_lps_mm], pieces[0].diameter_mm
        for r in pieces[1:]:
            pts = [np.asarray(p, float) for p in r.points_lps_mm]
            if np.linalg.norm(pts[-1] - cur_pts[-1]) < np.linalg.norm(pts[0] - cur_pts[-1]):
                pts = pts[::-1]
            if np.linalg.norm(pts[0] - cur_pts[-1]) <= ROD_JOIN_MM:
                cur_pts = cur_pts + pts
            else:
                out.append((cur_id, cur_pts, cur_d))
                cur_id, cur_pts, cur_d = r.id, pts, r.diameter_mm
        out.append((cur_id, cur_pts, cur_d))
    return out


def find_fractures(volume: Volume, anatomy: Anatomy, config: Config) -> list[FractureFinding]:
    """Every gap across a rod or a screw shaft of ``anatomy`` (module docstring).

    Parameters
    ----------
    volume : Volume
        CT in HU.
    anatomy : Anatomy
        Rods (centre polylines, diameters) and screws (head -> tip, shaft diameter).
    config : Config
        Not used yet beyond the defaults of this module (kept for the pipeline's signature).

    Returns
    -------
    list of FractureFinding
        ``position_lps_mm`` the centre of the gap, ``gap_mm`` its width along the rod / shaft.
    """
    hu = np.asarray(volume.hu)
    if hu.dtype != np.float32 or not hu.flags.c_contiguous:
        hu = np.ascontiguousarray(hu, dtype=np.float32)
    rods = [r for r in _join_rod_pieces(anatomy.rods)
            if len(r[1]) >= 2 and polyline_length_mm(r[1]) >= 5.0]
    screws = [(sc.id, [np.asarray(sc.head_lps_mm), np.asarray(sc.tip_lps_mm)], sc.diameter_mm)
              for sc in anatomy.screws if sc.length_mm >= 5.0]
    # edge responses: rods read with those of all the hardware; shafts with the shafts'
    # own when there are screws (a detected rod's line and diameter are less exact than a
    # shaft's, and a shaft gap's width follows its edge response closely)
    x_mm = np.arange(ESF_RANGE_MM[0], ESF_RANGE_MM[1] + 1e-9, 0.05)
    library, shaft_library = EdgeLibrary(x_mm), EdgeLibrary(x_mm)
    for k, (_, pts, diam) in enumerate(rods + screws):
        L = polyline_length_mm(pts)
        st = np.arange(0.15 * L, 0.85 * L + 1e-9, 2.0)
        st_pts, st_ax = polyline_points(pts, st)
        if k < len(rods):  # a detected rod line runs off its axis near the tulips
            st_pts = recentre_stations(volume, hu, st_pts, st_ax, 0.5 * diam)
        library.add(volume, hu, st_pts, st_ax, 0.5 * diam)
        if k >= len(rods):
            shaft_library.add(volume, hu, st_pts, st_ax, 0.5 * diam)
    found: list[FractureFinding] = []
    for kind, items, lib in (("rod", rods, library), ("screw", screws, shaft_library)):
        for hid, pts, diam in items:
            found += hardware_fractures(volume, hu, pts, 0.5 * diam, kind, hid, lib,
                                        start_id=len(found) + 1, section=kind == "screw")
    return found
