"""Find the spinal hardware: pedicle screw shafts, rods and interbody cages.

Everything is searched relative to the vertebrae found by :mod:`pipeline.anatomy`, so metal
elsewhere (a hip prosthesis, a surgical clip) is never taken for spinal hardware.

* **Screws** (:func:`find_screws`): in each vertebra and on each side, the metal inside the
  body and pedicle is the anterior part of a screw shaft (the tulip and rod sit behind the
  pedicle). Its axis is fitted by PCA and followed along the shaft; the head is where the
  cross-section widens into the tulip (CONTRACT.md: the posterior end of the shaft where it
  leaves bone), the tip is the anterior end of the metal.
* **True size, blooming removed** (:func:`metal_edge_mm`): titanium is beyond a 12-bit
  scanner's range, so the shaft reads as a clipped plateau whose blurred roll-off spreads
  *outward* from the true surface; a fixed threshold or the half-maximum of the clipped
  profile reads it about 1 mm too wide (Elliott and Slakey, CORR 2014). For a clipped
  (saturated) plateau the surface is where the profile leaves the plateau, taken at 90 %
  of the way from the local surround to the plateau; for an unclipped plateau (extended-HU
  data) it is the half-maximum. Radii are the median over many radial profiles.
* **Cages** (:func:`find_cages`): titanium cages are metal inside a disc space; PEEK cages
  are nearly bone-dense and are found through their tantalum marker pins (small, bright,
  parallel to the level normal, at the footprint corners); the cage box is the pins' box
  grown by ``Config.peek_marker_inset_mm``.
* **Rods** (:func:`find_rods`): the metal left behind the screws, running along the spine.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.anatomy import sample_lps
from pipeline.config import Config
from pipeline.results import CageGeometry, DiscLevel, Rod, ScrewGeometry, Vertebra
from pipeline.volume import Volume

SATURATED_EDGE_LEVEL = 0.9   # fraction surround -> plateau at a clipped metal surface
LINEAR_EDGE_LEVEL = 0.5      # half-maximum for an unclipped plateau
SATURATION_MARGIN_HU = 100.0 # a plateau this close to the data maximum is clipped
MIN_SHAFT_MM3 = 60.0         # metal in one pedicle/body below this is not a screw
TULIP_WIDENING_MM = 1.2      # the head: the metal radius grows this much past the shaft's


# ------------------------------------------------------------------------------ helpers
def metal_points(volume: Volume, threshold_hu: float) -> np.ndarray:
    """LPS positions (N, 3) of the voxels above ``threshold_hu``."""
    kji = np.argwhere(volume.hu > threshold_hu)
    if kji.size == 0:
        return np.zeros((0, 3))
    return volume.kji_to_lps(kji.astype(float))


def _perp_basis(axis) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    ref = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = ref - (ref @ a) * a
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(a, e1)


def is_saturated(plateau_hu: float, data_max_hu: float) -> bool:
    """Whether a metal plateau sits at the top of the data range (clipped)."""
    return plateau_hu >= data_max_hu - SATURATION_MARGIN_HU


def metal_edge_mm(profile_hu: np.ndarray, x_mm: np.ndarray, surround_hu: float,
                  saturated: bool) -> float | None:
    """Where a profile running outward from inside metal crosses the metal's surface.

    The level is ``SATURATED_EDGE_LEVEL`` (clipped plateau: the surface is where the
    profile leaves the plateau; the blur spreads outward from it) or ``LINEAR_EDGE_LEVEL``
    (half-maximum) of the way from ``surround_hu`` to the plateau (the profile's maximum
    near its start). Returns the first downward crossing (mm, linear interpolation) or None.
    """
    p = np.asarray(profile_hu, float)
    if p.size < 3:
        return None
    plateau = float(np.max(p[: max(3, p.size // 4)]))
    if plateau <= surround_hu + 200.0:
        return None
    frac = SATURATED_EDGE_LEVEL if saturated else LINEAR_EDGE_LEVEL
    level = surround_hu + frac * (plateau - surround_hu)
    i_pk = int(np.argmax(p[: max(3, p.size // 4)]))
    below = np.nonzero(p[i_pk:] < level)[0]
    if below.size == 0:
        return None
    j = i_pk + int(below[0])
    a, b = p[j - 1], p[j]
    return float(x_mm[j - 1] + (a - level) / (a - b) * (x_mm[j] - x_mm[j - 1]))


def radial_profiles(volume: Volume, centres, axis, radii_mm, n_azimuth: int = 24) -> np.ndarray:
    """HU on rays perpendicular to ``axis`` from each centre: shape (stations, azimuths, radii)."""
    e1, e2 = _perp_basis(axis)
    ang = np.linspace(0.0, 2 * np.pi, n_azimuth, endpoint=False)
    dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
    pts = (np.asarray(centres)[:, None, None, :]
           + np.asarray(radii_mm)[None, None, :, None] * dirs[None, :, None, :])
    return sample_lps(volume, pts)


def true_radius_mm(volume: Volume, centres, axis, data_max_hu: float, max_radius_mm: float = 9.0,
                   step_mm: float = 0.05, n_azimuth: int = 24) -> float | None:
    """Median metal radius (mm) over radial profiles around ``axis`` at ``centres``.

    Per profile: the local surround is the median HU 1.5 to 3 mm outside the rough
    (half-maximum) edge, then :func:`metal_edge_mm` gives the surface.
    """
    r = np.arange(0.0, max_radius_mm, step_mm)
    prof = radial_profiles(volume, centres, axis, r, n_azimuth).reshape(-1, r.size)
    out = []
    for p in prof:
        plateau = float(p[: 10].max())
        sat = is_saturated(plateau, data_max_hu)
        rough = metal_edge_mm(p, r, float(np.median(p[-20:])), saturated=False)
        if rough is None:
            continue
        ring = p[(r >= rough + 1.5) & (r <= rough + 3.0)]
        if ring.size == 0:
            continue
        e = metal_edge_mm(p, r, float(np.median(ring)), sat)
        if e is not None:
            out.append(e)
    return float(np.median(out)) if len(out) >= max(3, prof.shape[0] // 4) else None


def _pca_line(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = points.mean(0)
    _, _, vt = np.linalg.svd(points - c, full_matrices=False)
    return c, vt[0]


# ------------------------------------------------------------------------------- screws
def _vertebra_frame(v: Vertebra):
    si = np.asarray(v.axis_si)
    lr = np.asarray(v.axis_lr)
    ap = np.cross(si, lr)
    c = np.asarray(v.center_lps_mm)
    half_h = 0.5 * float((np.asarray(v.superior_endplate.point_lps_mm)
                          - np.asarray(v.inferior_endplate.point_lps_mm)) @ si)
    if v.is_sacrum:
        half_h = min(half_h, 15.0)
    return c, si, lr, ap, half_h


def _station_areas(pts_t, pts_rho, t_grid, radius_mm, voxel_mm3):
    """Metal cross-section area (mm2) in 1 mm slabs along the line, within ``radius_mm``."""
    sel = pts_rho <= radius_mm
    h, _ = np.histogram(pts_t[sel], bins=np.append(t_grid - 0.5, t_grid[-1] + 0.5))
    return h * voxel_mm3  # per 1 mm slab: mm3 / mm = mm2


def trace_shaft(volume: Volume, metal_lps: np.ndarray, seed_points: np.ndarray, anterior,
                data_max_hu: float) -> dict | None:
    """Follow one screw shaft from the metal seen inside its vertebra.

    Returns head, tip (LPS mm), axis (head to tip), radius (mm) or None. See the module
    docstring for the definitions; ``anterior`` is the vertebra's anterior direction, used
    only to orient the axis.
    """
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    c, d = _pca_line(seed_points)
    if d @ anterior < 0:
        d = -d
    t_grid = np.arange(-80.0, 60.0, 1.0)
    for _ in range(3):
        rel = metal_lps - c
        t = rel @ d
        rho = np.linalg.norm(rel - t[:, None] * d, axis=1)
        near = (rho < 10.0) & (t > t_grid[0] - 1) & (t < t_grid[-1] + 1)
        t, rho = t[near], rho[near]
        pts = metal_lps[near]
        area = _station_areas(t, rho, t_grid, 9.0, voxel_mm3)
        i0 = int(np.argmin(np.abs(t_grid)))
        shaft_area = float(np.median(area[max(i0 - 3, 0): i0 + 4]))
        if shaft_area <= 0:
            return None
        # tip: forward until the metal stops
        fwd = np.nonzero(area[i0:] < 0.3 * shaft_area)[0]
        t_tip = t_grid[i0 + fwd[0]] if fwd.size else t_grid[-1]
        # head: backward until the cross-section widens into the tulip (or metal stops)
        back = area[: i0 + 1][::-1]
        wide = np.nonzero((back > 1.8 * shaft_area) | (back < 0.3 * shaft_area))[0]
        t_head = t_grid[i0 - wide[0]] if wide.size else t_grid[0]
        seg = (t > t_head + 2.0) & (t < t_tip - 2.0) & (rho < np.sqrt(shaft_area / np.pi) + 1.0)
        if seg.sum() < 10:
            break
        c_new, d_new = _pca_line(pts[seg])
        if d_new @ d < 0:
            d_new = -d_new
        # keep the origin inside the vertebra's part of the shaft
        c = c_new + ((c - c_new) @ d_new) * d_new
        d = d_new
    # precise ends and radius on the image itself
    stations = c + np.arange(t_head + 3.0, t_tip - 2.0, 2.0)[:, None] * d
    if len(stations) < 2:
        stations = c + np.array([[0.0], [1.0]]) * d
    radius = true_radius_mm(volume, stations, d, data_max_hu)
    if radius is None:
        return None
    tip = _axial_end(volume, c, d, t_tip, radius, data_max_hu)
    head = _head_position(volume, c, d, t_head, radius, data_max_hu)
    if tip is None or head is None:
        return None
    return dict(head=c + head * d, tip=c + tip * d, axis=d, radius=radius)


def _axial_end(volume, c, d, t_rough, radius, data_max_hu, step_mm=0.05):
    """The tip: along the axis (mean of a 1 mm bundle), the metal edge past ``t_rough``."""
    s = np.arange(t_rough - 6.0, t_rough + 6.0, step_mm)
    e1, e2 = _perp_basis(d)
    offs = [np.zeros(3)] + [0.5 * radius * (np.cos(a) * e1 + np.sin(a) * e2)
                            for a in np.linspace(0, 2 * np.pi, 6, endpoint=False)]
    prof = np.mean([sample_lps(volume, c + o + s[:, None] * d) for o in offs], axis=0)
    surround = float(np.median(prof[s > t_rough + 3.0]))
    sat = is_saturated(float(prof[: int(3.0 / step_mm)].max()), data_max_hu)
    e = metal_edge_mm(prof, s - s[0], surround, sat)
    return None if e is None else s[0] + e


def _head_position(volume, c, d, t_rough, radius, data_max_hu, step_mm=0.5):
    """The head: going back along the shaft, where the metal radius grows past the shaft's
    by ``TULIP_WIDENING_MM`` (the start of the tulip), interpolated between stations."""
    ts = np.arange(t_rough + 6.0, t_rough - 6.0, -step_mm)
    r = np.arange(0.0, 9.0, 0.1)
    prof = radial_profiles(volume, c + ts[:, None] * d, d, r, n_azimuth=12)
    radii = []
    for st in prof:
        vals = []
        for p in st:
            ring = p[r >= 7.5]
            sat = is_saturated(float(p[:5].max()), data_max_hu)
            e = metal_edge_mm(p, r, float(np.median(ring)), sat)
            vals.append(9.0 if e is None else e)
        radii.append(float(np.median(vals)))
    radii = np.array(radii)
    target = radius + TULIP_WIDENING_MM
    over = np.nonzero(radii > target)[0]
    if over.size == 0:
        return t_rough  # no tulip seen: the end of the metal found by areas
    k = int(over[0])
    if k == 0:
        return ts[0]
    a, b = radii[k - 1], radii[k]
    return ts[k - 1] + (target - a) / (b - a) * (ts[k] - ts[k - 1])


def find_screws(volume: Volume, config: Config, vertebrae) -> list[ScrewGeometry]:
    """Pedicle screw shafts, one per vertebra and side at most (see module docstring).

    Metal is looked for only inside each vertebra's body and pedicles (between the
    endplates, away from the disc spaces where cages sit), so metal elsewhere is never a
    screw. Sides follow the vertebra's LR axis: left is patient left (+x in LPS).
    """
    metal = metal_points(volume, config.metal_threshold_hu)
    if len(metal) == 0 or not vertebrae:
        return []
    data_max = float(volume.hu.max())
    screws = []
    for v in vertebrae:
        c, si, lr, ap, half_h = _vertebra_frame(v)
        a, b = v.semi_axes_mm
        rel = metal - c
        u, w, h = rel @ lr, rel @ ap, rel @ si
        slab = np.abs(h) <= max(half_h - 6.0, 5.0)
        inside = slab & (w >= -b - 2.0) & (w <= b + 6.0) & (np.abs(u) <= a + 6.0)
        for side, sgn in (("left", 1.0), ("right", -1.0)):
            sel = inside & (sgn * u > 1.0)
            if sel.sum() * np.prod(volume.spacing_mm) < MIN_SHAFT_MM3:
                continue
            tr = trace_shaft(volume, metal, metal[sel], -ap, data_max)
            if tr is None:
                continue
            length = float(np.linalg.norm(tr["tip"] - tr["head"]))
            if length < 15.0:
                continue
            screws.append(ScrewGeometry(id=f"{v.name}-{side}", head_lps_mm=tr["head"],
                                        tip_lps_mm=tr["tip"], diameter_mm=2.0 * tr["radius"],
                                        vertebra=v.name, side=side))
    return screws
