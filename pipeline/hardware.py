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
  (saturated) plateau the surface is where the profile leaves the plateau, taken at 95 %
  of the way from the local surround to the plateau, in the best-sampled directions; for an
  unclipped plateau (extended-HU
  data) it is the half-maximum. Radii are the median over many radial profiles.
* **Cages** (:func:`find_cages`): titanium cages are metal inside a disc space; PEEK cages
  are nearly bone-dense and are found through their tantalum marker pins (small, bright,
  parallel to the level normal, at the footprint corners); the cage box is the pins' box
  grown by ``Config.peek_marker_inset_mm``.
* **Rods** (:func:`find_rods`): the metal left behind the screws, running along the spine.
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from pipeline.anatomy import sample_lps
from pipeline.config import Config
from pipeline.results import CageGeometry, DiscLevel, Rod, ScrewGeometry, Vertebra
from pipeline.volume import Volume

SATURATED_EDGE_LEVEL = 0.95  # fraction surround -> plateau at a clipped metal surface
LINEAR_EDGE_LEVEL = 0.5      # half-maximum for an unclipped plateau
SATURATION_MARGIN_HU = 100.0 # a plateau this close to the data maximum is clipped
MIN_SHAFT_MM3 = 60.0         # metal in one pedicle/body below this is not a screw
TULIP_WIDENING_MM = 1.2      # the head: the metal radius grows this much past the shaft's
ROD_MIN_PIECE_MM = 12.0      # a rod piece (broken rod) at least this long along the spine
MAX_SHAFT_GAP_MM = 4         # a shaft fracture gap up to this wide is crossed when tracing


# ------------------------------------------------------------------------------ helpers
def metal_points(volume: Volume, threshold_hu: float) -> np.ndarray:
    """LPS positions (N, 3) of the voxels above ``threshold_hu``."""
    kji = np.argwhere(volume.hu > threshold_hu)
    if kji.size == 0:
        return np.zeros((0, 3))
    return volume.kji_to_lps(kji.astype(float))


class MetalVoxels:
    """The voxels above a metal threshold, found once and shared by the hardware searches.

    ``kji`` (N, 3) int indices, ``lps`` (N, 3) positions (mm) and, built on first use, a
    k-d tree over ``lps`` to pick the voxels near a line without scanning all of them.
    """

    def __init__(self, volume: Volume, threshold_hu: float):
        self.threshold_hu = float(threshold_hu)
        self.kji = _argwhere_cropped(volume.hu > threshold_hu)
        self.lps = volume.kji_to_lps(self.kji.astype(float)) if len(self.kji) else np.zeros((0, 3))
        self._tree = None

    def __len__(self) -> int:
        return len(self.kji)

    @property
    def tree(self):
        if self._tree is None:
            from scipy.spatial import cKDTree

            self._tree = cKDTree(self.lps)
        return self._tree

    def near_segment(self, a, b, radius_mm: float) -> np.ndarray:
        """Indices of the voxels within ``radius_mm`` of the segment ``a``-``b`` (candidates
        from balls along it; the exact distance test is the caller's)."""
        a, b = np.asarray(a, float), np.asarray(b, float)
        if len(self.kji) == 0:
            return np.zeros(0, int)
        L = float(np.linalg.norm(b - a))
        n = max(int(np.ceil(L / max(radius_mm, 0.5))), 1)
        samples = a + np.linspace(0.0, 1.0, n + 1)[:, None] * (b - a)
        reach = float(np.hypot(radius_mm, 0.5 * L / n)) + 1e-6
        hits = self.tree.query_ball_point(samples, r=reach, return_sorted=False)
        # every ball's indices at once (one conversion, not one per ball)
        idx = np.fromiter(itertools.chain.from_iterable(hits), dtype=np.intp)
        if idx.size == 0:
            return np.zeros(0, int)
        mask = np.zeros(len(self.kji), bool)
        mask[idx] = True
        return np.flatnonzero(mask)


def _argwhere_cropped(mask: np.ndarray) -> np.ndarray:
    """``np.argwhere(mask)`` (same order), searched only in the mask's bounding box."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if ks.size == 0:
        return np.zeros((0, 3), np.intp)
    sub = mask[ks[0]: ks[-1] + 1]
    js = np.flatnonzero(sub.any(axis=(0, 2)))
    i_s = np.flatnonzero(sub.any(axis=(0, 1)))
    sub = sub[:, js[0]: js[-1] + 1, i_s[0]: i_s[-1] + 1]
    return np.argwhere(sub) + np.array([ks[0], js[0], i_s[0]])


def _metal(volume: Volume, config: Config, metal: MetalVoxels | None) -> MetalVoxels:
    if metal is None or metal.threshold_hu != float(config.metal_threshold_hu):
        return MetalVoxels(volume, config.metal_threshold_hu)
    return metal


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


def metal_edges_mm(profiles_hu: np.ndarray, x_mm: np.ndarray, surround_hu, saturated) -> np.ndarray:
    """:func:`metal_edge_mm` for many profiles at once (rows of ``profiles_hu``, one
    ``surround_hu`` and ``saturated`` per row); NaN where it would return None."""
    P = np.asarray(profiles_hu, float)
    P = P.reshape(-1, P.shape[-1])
    m, n = P.shape
    out = np.full(m, np.nan)
    if n < 3 or m == 0:
        return out
    x = np.asarray(x_mm, float)
    sur = np.broadcast_to(np.asarray(surround_hu, float), (m,))
    sat = np.broadcast_to(np.asarray(saturated, bool), (m,))
    head = P[:, : max(3, n // 4)]
    plateau = head.max(axis=1)
    frac = np.where(sat, SATURATED_EDGE_LEVEL, LINEAR_EDGE_LEVEL)
    level = sur + frac * (plateau - sur)
    i_pk = np.argmax(head, axis=1)
    below = (P < level[:, None]) & (np.arange(n)[None, :] >= i_pk[:, None])
    ok = (plateau > sur + 200.0) & below.any(axis=1) & np.isfinite(sur)
    j = np.argmax(below, axis=1)
    rows = np.nonzero(ok)[0]
    j = j[rows]
    a, b = P[rows, j - 1], P[rows, j]
    out[rows] = x[j - 1] + (a - level[rows]) / (a - b) * (x[j] - x[j - 1])
    return out


def radial_profiles(volume: Volume, centres, axis, radii_mm, n_azimuth: int = 24) -> np.ndarray:
    """HU on rays perpendicular to ``axis`` from each centre: shape (stations, azimuths, radii)."""
    e1, e2 = _perp_basis(axis)
    ang = np.linspace(0.0, 2 * np.pi, n_azimuth, endpoint=False)
    dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
    pts = (np.asarray(centres)[:, None, None, :]
           + np.asarray(radii_mm)[None, None, :, None] * dirs[None, :, None, :])
    return sample_lps(volume, pts)


def voxel_extent_mm(volume: Volume, directions) -> np.ndarray:
    """Sampling step (mm) along each unit LPS direction: the norm of the direction's
    components scaled by the voxel size (in-plane directions all read the pixel size; a
    direction across thick slices reads more)."""
    d = np.asarray(directions, float).reshape(-1, 3)
    return np.linalg.norm((d @ volume.direction) * volume.spacing_mm, axis=1)


def true_radius_mm(volume: Volume, centres, axis, data_max_hu: float, max_radius_mm: float = 9.0,
                   step_mm: float = 0.02, n_azimuth: int = 24, finest: float = 1.15) -> float | None:
    """Metal radius (mm) around ``axis`` at ``centres``, blooming removed.

    Radial profiles are read only in the best-sampled directions (voxel extent within
    ``finest`` x the smallest, e.g. in-plane for a screw lying in the slice plane): across
    thick slices, interpolation between a clipped sample and the next moves the edge by up
    to a slice. Per profile the local surround is the median HU 1.5 to 3 mm outside the
    rough (half-maximum) edge and :func:`metal_edge_mm` gives the surface; the radius is
    the median over stations and directions.
    """
    e1, e2 = _perp_basis(axis)
    ang = np.linspace(0.0, 2 * np.pi, n_azimuth, endpoint=False)
    dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
    w = voxel_extent_mm(volume, dirs)
    fine = w <= finest * w.min() + 1e-9
    r = np.arange(0.0, max_radius_mm, step_mm)
    pts = (np.asarray(centres)[:, None, None, :]
           + r[None, None, :, None] * dirs[fine][None, :, None, :])
    prof = sample_lps(volume, pts).reshape(-1, r.size).astype(float)
    # all profiles at once (metal_edges_mm): the same reading as metal_edge_mm per profile
    sat = is_saturated(prof[:, : int(0.5 / step_mm)].max(axis=1), data_max_hu)
    rough = metal_edges_mm(prof, r, np.median(prof[:, -int(1.0 / step_mm):], axis=1), False)
    ring = (r[None, :] >= rough[:, None] + 1.5) & (r[None, :] <= rough[:, None] + 3.0)
    has_ring = ring.any(axis=1)
    ring_hu = np.full(len(prof), np.nan)
    for k in np.nonzero(has_ring)[0]:
        ring_hu[k] = np.median(prof[k, ring[k]])
    e = metal_edges_mm(prof, r, ring_hu, sat)
    out = e[np.isfinite(e)]
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


def _bridge_gaps(area: np.ndarray, shaft_area: float, max_gap_mm: int = MAX_SHAFT_GAP_MM,
                 resume_mm: int = 4) -> np.ndarray:
    """Cross-section areas (1 mm slabs, going away from the start) with short gaps filled:
    a run of at most ``max_gap_mm`` slabs without metal followed by at least ``resume_mm``
    slabs of shaft-sized metal (0.5 to 1.8 x ``shaft_area``) is a fracture across the shaft
    (pipeline.fracture measures it), not the shaft's end."""
    a = np.asarray(area, float).copy()
    low = a < 0.3 * shaft_area
    k = 0
    while k < len(a):
        if not low[k]:
            k += 1
            continue
        run = k
        while run < len(a) and low[run]:
            run += 1
        nxt = a[run:run + resume_mm]
        if (run - k <= max_gap_mm and len(nxt) == resume_mm
                and np.all((nxt > 0.5 * shaft_area) & (nxt < 1.8 * shaft_area))):
            a[k:run] = shaft_area
            k = run
            continue
        break
    return a


def trace_shaft(volume: Volume, metal_lps: np.ndarray, seed_points: np.ndarray, anterior,
                data_max_hu: float, metal: MetalVoxels | None = None) -> dict | None:
    """Follow one screw shaft from the metal seen inside its vertebra.

    Returns head, tip (LPS mm), axis (head to tip), radius (mm) or None. See the module
    docstring for the definitions; ``anterior`` is the vertebra's anterior direction, used
    only to orient the axis. With ``metal`` (the same voxels as ``metal_lps``) only the
    voxels near the line are visited (same result, far fewer points).
    """
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    c, d = _pca_line(seed_points)
    if d @ anterior < 0:
        d = -d
    t_grid = np.arange(-80.0, 60.0, 1.0)
    for _ in range(3):
        if metal is not None:
            cand = metal.near_segment(c + (t_grid[0] - 1) * d, c + (t_grid[-1] + 1) * d, 10.0)
            sub = metal_lps[cand]
        else:
            sub = metal_lps
        rel = sub - c
        t = rel @ d
        rho = np.linalg.norm(rel - t[:, None] * d, axis=1)
        near = (rho < 10.0) & (t > t_grid[0] - 1) & (t < t_grid[-1] + 1)
        t, rho = t[near], rho[near]
        pts = sub[near]
        area = _station_areas(t, rho, t_grid, 9.0, voxel_mm3)
        i0 = int(np.argmin(np.abs(t_grid)))
        shaft_area = float(np.median(area[max(i0 - 3, 0): i0 + 4]))
        if shaft_area <= 0:
            return None
        # tip: forward until the metal stops (a fractured shaft's gap is crossed)
        fwd = np.nonzero(_bridge_gaps(area[i0:], shaft_area) < 0.3 * shaft_area)[0]
        t_tip = t_grid[i0 + fwd[0]] if fwd.size else t_grid[-1]
        # head: backward until the cross-section widens into the tulip (or metal stops)
        back = _bridge_gaps(area[: i0 + 1][::-1], shaft_area)
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
    prof = radial_profiles(volume, c + ts[:, None] * d, d, r, n_azimuth=12).astype(float)
    flat = prof.reshape(-1, r.size)
    e = metal_edges_mm(flat, r, np.median(flat[:, r >= 7.5], axis=1),
                       is_saturated(flat[:, :5].max(axis=1), data_max_hu))
    radii = np.median(np.where(np.isfinite(e), e, 9.0).reshape(prof.shape[:2]), axis=1)
    target = radius + TULIP_WIDENING_MM
    over = np.nonzero(radii > target)[0]
    if over.size == 0:
        return t_rough  # no tulip seen: the end of the metal found by areas
    k = int(over[0])
    if k == 0:
        return ts[0]
    a, b = radii[k - 1], radii[k]
    return ts[k - 1] + (target - a) / (b - a) * (ts[k] - ts[k - 1])


def find_screws(volume: Volume, config: Config, vertebrae,
                metal: MetalVoxels | None = None) -> list[ScrewGeometry]:
    """Pedicle screw shafts, one per vertebra and side at most (see module docstring).

    Metal is looked for only inside each vertebra's body and pedicles (between the
    endplates, away from the disc spaces where cages sit), so metal elsewhere is never a
    screw. Each connected piece of that metal is traced as one shaft (a breaching screw
    lies partly outside the pedicle and a medially breaching one crosses the midline, so
    pieces are not split by side); its side is that of its head along the vertebra's LR
    axis (left is patient left, +x in LPS); a gap across a fractured shaft is crossed
    (:func:`_bridge_gaps`) so the screw keeps its true tip.

    Parameters
    ----------
    volume : Volume
    config : Config
        ``metal_threshold_hu`` selects the metal voxels the shafts are traced in.
    vertebrae : sequence of Vertebra
        From :func:`pipeline.anatomy.find_vertebrae`.
    metal : MetalVoxels, optional
        The volume's metal voxels at ``config.metal_threshold_hu``, when already found.

    Returns
    -------
    list of ScrewGeometry
        ``id`` ``<vertebra>-<side>``; head (where the shaft meets its tulip), tip (anterior
        end of the metal) and true diameter, all in LPS mm.
    """
    mv = _metal(volume, config, metal)
    if len(mv) == 0 or not vertebrae:
        return []
    kji_metal, metal = mv.kji, mv.lps
    data_max = float(volume.hu.max())
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    screws = []
    for v in vertebrae:
        c, si, lr, ap, half_h = _vertebra_frame(v)
        a, b = v.semi_axes_mm
        # only the voxels within the box's circumscribed ball can be inside it (ascending
        # indices, as a scan of all voxels would give them)
        reach = float(np.sqrt((a + 10.0) ** 2 + (b + 6.0) ** 2 + max(half_h - 6.0, 5.0) ** 2)) + 1.0
        near = np.sort(np.asarray(mv.tree.query_ball_point(c, r=reach), dtype=np.intp))
        pts = metal[near]
        rel = pts - c
        u, w, h = rel @ lr, rel @ ap, rel @ si
        # between the body's own endplates (and clear of them: cages sit beyond them)
        s_sup = (pts - np.asarray(v.superior_endplate.point_lps_mm)) @ np.asarray(v.superior_endplate.normal)
        s_inf = (pts - np.asarray(v.inferior_endplate.point_lps_mm)) @ np.asarray(v.inferior_endplate.normal)
        slab = (np.abs(h) <= max(half_h - 6.0, 5.0)) & (s_sup < -4.0) & (s_inf < -4.0)
        inside = near[np.nonzero(slab & (w >= -b - 2.0) & (w <= b + 6.0) & (np.abs(u) <= a + 10.0))[0]]
        # each screw is its own connected piece of metal here; a medially breaching screw
        # crosses the midline, so pieces are separated by connectivity, not by side, and
        # the side is that of the screw's head
        found: dict[str, tuple[float, dict]] = {}
        for comp in _components(volume, kji_metal[inside]):
            piece = inside[comp]
            vol_mm3 = len(piece) * voxel_mm3
            if vol_mm3 < MIN_SHAFT_MM3:
                continue
            tr = trace_shaft(volume, metal, metal[piece], -ap, data_max, metal=mv)
            if tr is None:
                continue
            length = float(np.linalg.norm(tr["tip"] - tr["head"]))
            if length < 15.0:
                continue
            side = "left" if float((tr["head"] - c) @ lr) > 0 else "right"
            if side not in found or found[side][0] < vol_mm3:
                found[side] = (vol_mm3, tr)
        for side in ("left", "right"):
            if side in found:
                tr = found[side][1]
                traced = 2.0 * float(tr["radius"])
                diameter = catalogue_diameter(traced, config.screw_diameter_sizes_mm,
                                              config.screw_diameter_snap_mm)
                screws.append(ScrewGeometry(id=f"{v.name}-{side}", head_lps_mm=tr["head"],
                                            tip_lps_mm=tr["tip"], diameter_mm=diameter,
                                            vertebra=v.name, side=side,
                                            traced_diameter_mm=traced if diameter != traced else None))
    return screws


def catalogue_diameter(traced_mm: float, sizes_mm, snap_mm: float) -> float:
    """The catalogue screw diameter nearest to a traced one, when within ``snap_mm``;
    else the traced diameter.

    Why: the halo is measured from the shaft's true surface (CONTRACT.md, "Peri-screw
    lucency halo"), and next to titanium the image falls by 1000-2000 HU per mm, so a
    radius 0.09 mm off moves the metal's tail by 100-200 HU at the loosening threshold.
    The diameter traced from the blurred metal is off by up to 0.18 mm (SD 0.05 mm;
    seeds 0-11, both phantom sets, 0.8x0.8x1.5 and 0.5x0.5x1.0 mm), while pedicle screws
    come in 0.5 mm steps. With the exact diameters the halo on detected geometry at
    0.8x0.8x1.5 mm read coverage MAE 0.078 against 0.112 (halo_mean 0.184 against 0.238).

    Parameters
    ----------
    traced_mm : float
        Diameter measured from the image.
    sizes_mm : sequence of float
        Catalogue diameters (``Config.screw_diameter_sizes_mm``); empty: no snapping.
    snap_mm : float
        Largest difference taken as measurement error (less than half the catalogue step).
    """
    sizes = np.asarray(sizes_mm, float)
    if sizes.size == 0:
        return float(traced_mm)
    k = int(np.argmin(np.abs(sizes - traced_mm)))
    return float(sizes[k]) if abs(sizes[k] - traced_mm) <= snap_mm else float(traced_mm)


def near_shafts(metal: MetalVoxels, screws, margin_mm: float) -> np.ndarray:
    """Mask of the metal voxels within the widest screw radius + ``margin_mm`` of any screw
    shaft segment (head to tip): the same test as ``_shaft_distance_mm(...) <= radius``,
    on the voxels near each shaft only."""
    out = np.zeros(len(metal), bool)
    if not screws or len(metal) == 0:
        return out
    radius = max(0.5 * s.diameter_mm for s in screws) + margin_mm
    for s in screws:
        h, t = np.asarray(s.head_lps_mm, float), np.asarray(s.tip_lps_mm, float)
        cand = metal.near_segment(h, t, radius)
        if cand.size:
            out[cand] |= _shaft_distance_mm(metal.lps[cand], [s]) <= radius
    return out


def _shaft_distance_mm(points: np.ndarray, screws) -> np.ndarray:
    """Distance of each point to the nearest screw shaft segment (inf without screws)."""
    d = np.full(len(points), np.inf)
    for s in screws:
        h, t = np.asarray(s.head_lps_mm), np.asarray(s.tip_lps_mm)
        ax = t - h
        L = float(np.linalg.norm(ax))
        ax /= L
        rel = points - h
        tt = np.clip(rel @ ax, 0.0, L)
        d = np.minimum(d, np.linalg.norm(rel - tt[:, None] * ax, axis=1))
    return d


# -------------------------------------------------------------------------------- cages
def level_frame(level: DiscLevel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal, e_u, e_v): the level normal (superior), e_u closest to LPS +x, e_v = n x e_u."""
    n = np.asarray(level.normal, float)
    e_u = np.array([1.0, 0.0, 0.0]) - n[0] * n
    e_u /= np.linalg.norm(e_u)
    return n, e_u, np.cross(n, e_u)


def disc_region_mask(points: np.ndarray, upper: Vertebra, lower: Vertebra, level: DiscLevel,
                     depth_mm: float = 7.0, outline_scale: float = 1.15) -> np.ndarray:
    """Points in a level's disc space: between the two endplates (allowing ``depth_mm`` of
    subsidence into either body) and inside the body outline (scaled)."""
    up, lo = upper.inferior_endplate, lower.superior_endplate
    s_up = (points - np.asarray(up.point_lps_mm)) @ np.asarray(up.normal)
    s_lo = (points - np.asarray(lo.point_lps_mm)) @ np.asarray(lo.normal)
    n, e_u, e_v = level_frame(level)
    rel = points - np.asarray(level.center_lps_mm)
    a = 0.5 * (upper.semi_axes_mm[0] + lower.semi_axes_mm[0]) * outline_scale
    b = 0.5 * (upper.semi_axes_mm[1] + lower.semi_axes_mm[1]) * outline_scale
    ell = (rel @ e_u / a) ** 2 + (rel @ e_v / b) ** 2 <= 1.0
    return (s_up >= -depth_mm) & (s_lo >= -depth_mm) & ell


def _components(volume: Volume, kji: np.ndarray) -> list[np.ndarray]:
    """26-connected groups of the given voxel indices (each an index array into ``kji``)."""
    if len(kji) == 0:
        return []
    lo = kji.min(0)
    shape = kji.max(0) - lo + 1
    m = np.zeros(shape, bool)
    loc = kji - lo
    m[loc[:, 0], loc[:, 1], loc[:, 2]] = True
    lab, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
    ids = lab[loc[:, 0], loc[:, 1], loc[:, 2]]
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(1, n + 2))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n)]


def _box_edges(volume: Volume, centre, axes, half0, data_max_hu):
    """Refine a metal box: along each axis, profiles from inside through the faces at a
    3 x 3 grid of offsets; each face at :func:`metal_edge_mm`. Returns centre, half sizes."""
    centre = np.asarray(centre, float)
    half = np.asarray(half0, float)
    new_c, new_h = centre.copy(), half.copy()
    for k in range(3):
        o1, o2 = [m for m in range(3) if m != k]
        ends = {1: [], -1: []}
        for f1 in (-0.4, 0.0, 0.4):
            for f2 in (-0.4, 0.0, 0.4):
                base = centre + f1 * half[o1] * axes[o1] + f2 * half[o2] * axes[o2]
                s = np.arange(0.0, half[k] + 6.0, 0.05)
                for sgn in (1, -1):
                    prof = sample_lps(volume, base + sgn * s[:, None] * axes[k])
                    if prof[0] < 0.5 * data_max_hu:
                        continue
                    # the surround: the darkest 1 mm just outside (between two cages side
                    # by side the gap is narrow and lit by both)
                    beyond = ndimage.uniform_filter1d(prof, 20)[(s > half[k] + 0.5) & (s < half[k] + 5.0)]
                    sur = float(beyond.min()) if beyond.size else float(prof[-1])
                    e = metal_edge_mm(prof, s, sur, is_saturated(float(prof[:20].max()), data_max_hu))
                    if e is not None:
                        ends[sgn].append(e)
        if ends[1] and ends[-1]:
            p, m = float(np.median(ends[1])), float(np.median(ends[-1]))
            new_h[k] = 0.5 * (p + m)
            new_c = new_c + 0.5 * (p - m) * axes[k]
    return new_c, new_h


def _rectangles(points_uv: np.ndarray, tol_mm: float = 1.5) -> list[tuple[int, ...]]:
    """Disjoint sets of 4 points forming rectangles whose boxes do not overlap.

    A rectangle: two antipodal pairs about the 4 points' mean (equal distances to it, within
    ``tol_mm``), sides 3 to 45 mm. Among all ways to take disjoint, non-overlapping
    rectangles the one with the most rectangles (then the best fit) wins, so the inner pins
    of two cages side by side are not paired with each other.
    """
    from itertools import combinations

    cands = []
    for quad in combinations(range(len(points_uv)), 4):
        p = points_uv[list(quad)]
        c = p.mean(0)
        r = np.linalg.norm(p - c, axis=1)
        if r.max() - r.min() > tol_mm:
            continue
        dd = np.linalg.norm(p[:, None] - p[None], axis=2)
        sides = np.sort(dd[np.triu_indices(4, 1)])[:4]
        if sides.min() < 3.0 or sides.max() > 45.0:
            continue
        cands.append((float(r.max() - r.min()), quad, p.min(0), p.max(0)))

    def overlaps(a, b):
        return bool(np.all(a[2] < b[3]) and np.all(b[2] < a[3]))

    best: tuple[int, float, list] = (0, 0.0, [])

    def search(k, chosen, err):
        nonlocal best
        if (len(chosen), -err) > (best[0], -best[1]):
            best = (len(chosen), err, list(chosen))
        for m in range(k, len(cands)):
            cm = cands[m]
            if any(set(cm[1]) & set(o[1]) or overlaps(cm, o) for o in chosen):
                continue
            chosen.append(cm)
            search(m + 1, chosen, err + cm[0])
            chosen.pop()

    search(0, [], 0.0)
    return [c[1] for c in best[2]]


def find_cages(volume: Volume, config: Config, vertebrae, levels, screws=(),
               metal: MetalVoxels | None = None) -> list[CageGeometry]:
    """Interbody cages in the disc spaces, each assigned to its level (module docstring).

    Titanium: a large metal component in the disc space, its box refined face by face.
    PEEK: four small metal pins parallel to the level normal at the corners of a rectangle;
    the box is the pins' box (centres in the plane, ends along the normal) grown by
    ``config.peek_marker_inset_mm``. Ids ``<level>-cage<k>``, k ordered from patient right
    to left.

    Parameters
    ----------
    volume : Volume
    config : Config
        ``metal_threshold_hu`` and ``peek_marker_inset_mm``.
    vertebrae, levels : sequences of Vertebra and DiscLevel
        From :func:`pipeline.anatomy.find_vertebrae`.
    screws : sequence of ScrewGeometry, optional
        Their shafts are removed first (a screw near an endplate is not cage metal).
    metal : MetalVoxels, optional
        The volume's metal voxels at ``config.metal_threshold_hu``, when already found.

    Returns
    -------
    list of CageGeometry
        Boxes with axes ``(level normal, in-plane LR-most, in-plane AP-most)``.
    """
    if not levels:
        return []
    mv = _metal(volume, config, metal)
    if len(mv) == 0:
        return []
    kji_all, pts_all = mv.kji, mv.lps
    if screws:
        keep = ~near_shafts(mv, screws, 2.5)
        kji_all, pts_all = kji_all[keep], pts_all[keep]
    data_max = float(volume.hu.max())
    voxel = float(np.prod(volume.spacing_mm))
    vmap = {v.name: v for v in vertebrae}
    cages = []
    for lv in levels:
        up, lo = vmap.get(lv.upper), vmap.get(lv.lower)
        if up is None or lo is None:
            continue
        sel = disc_region_mask(pts_all, up, lo, lv)
        if not sel.any():
            continue
        kji, pts = kji_all[sel], pts_all[sel]
        n, e_u, e_v = level_frame(lv)
        axes = np.array([n, e_u, e_v])
        found = []  # (u position, CageGeometry kwargs)
        pins = []
        for comp in _components(volume, kji):
            p = pts[comp]
            vol = len(comp) * voxel
            rel = p - p.mean(0)
            ext = np.ptp(rel @ axes.T, axis=0) if len(p) > 1 else np.zeros(3)
            if vol >= 300.0 and ext[0] >= 3.0:
                c, h = _box_edges(volume, p.mean(0), axes, 0.5 * ext, data_max)
                found.append((float(c @ e_u), dict(material="titanium", centroid_lps_mm=c,
                                                    axes=tuple(map(tuple, axes)),
                                                    half_sizes_mm=h)))
            elif vol >= 1.0 and ext[0] >= 2.5 and max(ext[1], ext[2]) <= 5.0:
                pins.append(p.mean(0))
        if len(pins) >= 4:
            pins = np.array(pins)
            uv = np.stack([(pins - lv.center_lps_mm) @ e_u, (pins - lv.center_lps_mm) @ e_v], 1)
            for quad in _rectangles(uv):
                q = pins[list(quad)]
                kw = _peek_box(volume, q, n, config.peek_marker_inset_mm, data_max)
                if kw is not None:
                    found.append((float(kw["centroid_lps_mm"] @ e_u), kw))
        found.sort(key=lambda f: f[0])
        for k, (_, kw) in enumerate(found, start=1):
            cages.append(CageGeometry(id=f"{lv.name}-cage{k}", level=lv.name, **kw))
    return cages


def _peek_box(volume: Volume, pins: np.ndarray, n, inset_mm: float, data_max_hu: float) -> dict | None:
    """The PEEK cage box from its 4 marker pins (centres ``pins``) and the level normal."""
    c = pins.mean(0)
    # in-plane axes along the rectangle's sides: the shorter side first (e_u)
    d = pins[1:] - pins[0]
    d = d - (d @ n)[:, None] * n
    lens = np.linalg.norm(d, axis=1)
    order = np.argsort(lens)
    side_u = d[order[0]] / lens[order[0]]
    if side_u[0] < 0:
        side_u = -side_u
    side_v = np.cross(n, side_u)
    half_u = 0.5 * lens[order[0]]
    half_v = 0.5 * lens[order[1]]
    # pin ends along the normal, from profiles along each pin
    ends_p, ends_m = [], []
    s = np.arange(0.0, 15.0, 0.05)
    for p in pins:
        for sgn, store in ((1, ends_p), (-1, ends_m)):
            prof = sample_lps(volume, p + sgn * s[:, None] * n)
            sur = float(np.median(prof[-40:]))
            e = metal_edge_mm(prof, s, sur, is_saturated(float(prof[:10].max()), data_max_hu))
            if e is not None:
                store.append(e)
    if not ends_p or not ends_m:
        return None
    up, dn = float(np.median(ends_p)), float(np.median(ends_m))
    centre = c + 0.5 * (up - dn) * n
    half_n = 0.5 * (up + dn)
    return dict(material="peek", centroid_lps_mm=centre, axes=(tuple(n), tuple(side_u), tuple(side_v)),
                half_sizes_mm=(half_n + inset_mm, half_u + inset_mm, half_v + inset_mm))


# --------------------------------------------------------------------------------- rods
def find_rods(volume: Volume, config: Config, vertebrae, screws,
              metal: MetalVoxels | None = None) -> list[Rod]:
    """Connecting rods: metal joined to the screw heads (tulips) and running along the spine.

    The metal left after removing the screw shafts is grouped into connected pieces; a
    piece that reaches a screw head and is at least 20 mm long along the spine is a rod
    (with its tulips). Its centre line is the mean of its metal in 5 mm steps along its
    main direction; its diameter comes from radial profiles midway between tulips.

    Parameters
    ----------
    volume : Volume
    config : Config
    vertebrae : sequence of Vertebra
        Their mean LR position splits left from right.
    screws : sequence of ScrewGeometry
        Rods are the metal joined to these screws' heads.
    metal : MetalVoxels, optional
        The volume's metal voxels at ``config.metal_threshold_hu``, when already found.

    Returns
    -------
    list of Rod
        ``rod-left`` / ``rod-right`` (a further piece on a side gets a number), points top
        first, LPS mm.
    """
    if not screws:
        return []
    mv = _metal(volume, config, metal)
    keep = ~near_shafts(mv, screws, 1.5)
    kji, pts = mv.kji[keep], mv.lps[keep]
    heads = np.array([s.head_lps_mm for s in screws])
    axes = np.array([s.axis for s in screws])
    data_max = float(volume.hu.max())
    mid_x = float(np.mean([v.center_lps_mm[0] for v in vertebrae])) if vertebrae else 0.0
    rods = []
    single_tulip = []
    for comp in _components(volume, kji):
        p = pts[comp]
        if len(p) < 20:
            continue
        dh = np.linalg.norm(p[:, None, :] - heads[None, :, :], axis=2).min(0)
        touched = np.nonzero(dh < 10.0)[0]
        if touched.size == 0:
            continue
        # the rod's direction from its metal away from the tulips (a piece of a broken rod
        # holding one tulip is dominated by it)
        tulips = heads[touched] - axes[touched] * 7.0
        far = np.linalg.norm(p[:, None, :] - tulips[None, :, :], axis=2).min(1) > 9.0
        if far.sum() < 20:
            continue
        c, d = _pca_line(p[far])
        if abs(d[2]) < 0.5:
            continue  # not along the spine: a cross-link or a cage
        if d[2] < 0:
            d = -d
        t = (p - c) @ d
        if np.ptp(t) < ROD_MIN_PIECE_MM:
            continue
        # the centre line: the metal's mean in 5 mm steps (the tulips pull it a little
        # towards themselves where they hold the rod)
        line = []
        for t0 in np.arange(t.min(), t.max() + 1e-6, 5.0):
            sl = (t >= t0) & (t < t0 + 5.0)
            if sl.sum() >= 3:
                line.append(p[sl].mean(0))
        line = np.array(line[::-1])  # top first
        if len(line) < 2:
            continue
        # diameter midway between consecutive screw heads on this rod, or (one tulip: a
        # piece of a broken rod) on its free part
        th = np.sort((tulips - c) @ d)
        # (three stations per interval: a gap of a broken rod often lies midway)
        mids = (np.array([a + f * (b - a) for a, b in zip(th[:-1], th[1:]) for f in (0.3, 0.5, 0.7)])
                if th.size >= 2 else np.array([]))
        single = not mids.size  # one tulip: a piece of a broken rod
        if single:
            free = far & (t > t.min() + 4.0) & (t < t.max() - 4.0)  # clear of the broken end
            mids = np.percentile(t[free if free.sum() >= 20 else far], [30.0, 50.0, 70.0])
        diam = None
        if mids.size:
            # stations on the rod's own centre: the metal centroid in a 2 mm slab there
            st = []
            for m in mids:
                sl = np.abs(t - m) <= 1.0
                if sl.sum() >= 3:
                    st.append(p[sl].mean(0))
            st = np.array(st) if st else c + mids[:, None] * d
            r = true_radius_mm(volume, st, d, data_max, max_radius_mm=8.0)
            diam = None if r is None else 2.0 * r
        if diam is None:
            diam = 2.0 * float(np.sqrt(far.sum() * np.prod(volume.spacing_mm) / max(np.ptp(t[far]), 1.0) / np.pi))
        side = "left" if float(np.mean(p[:, 0])) > mid_x else "right"
        single_tulip.append(single)
        rods.append(Rod(id=f"rod-{side}", points_lps_mm=tuple(tuple(map(float, q)) for q in line),
                        diameter_mm=float(diam), side=side))
    # a piece of a broken rod holding one tulip has little free rod to read its diameter
    # on (0.3-0.5 mm off): it takes the median of the construct's whole rods (rods of one
    # construct share a diameter), or of all pieces when every rod is broken
    full = [r.diameter_mm for r, one in zip(rods, single_tulip) if not one]
    ref = float(np.median(full if full else [r.diameter_mm for r in rods])) if rods else 0.0
    rods = [Rod(id=r.id, points_lps_mm=r.points_lps_mm, diameter_mm=ref, side=r.side) if one else r
            for r, one in zip(rods, single_tulip)]
    # one id per side; several pieces on a side keep a number
    seen: dict[str, int] = {}
    out = []
    for r in rods:
        k = seen.get(r.side, 0) + 1
        seen[r.side] = k
        out.append(r if k == 1 else Rod(id=f"{r.id}-{k}", points_lps_mm=r.points_lps_mm,
                                         diameter_mm=r.diameter_mm, side=r.side))
    return out


def unexplained_metal_mm3(volume: Volume, config: Config, screws, cages, rods,
                          metal: MetalVoxels | None = None) -> float:
    """Volume (mm3) of metal not within any found screw, cage or rod (e.g. a hip implant).

    Explained: within the widest screw radius + 2 mm of a shaft, within 16 mm of a screw
    head (tulip and rod seat), inside a cage box grown by 2 mm, within a rod's radius + 4 mm
    of its centre line. Only the voxels near each object are tested (``MetalVoxels``).
    """
    mv = _metal(volume, config, metal)
    if len(mv) == 0:
        return 0.0
    pts = mv.lps
    left = np.ones(len(pts), bool)
    if screws:
        left &= ~near_shafts(mv, screws, 2.0)
        for s in screws:
            h = np.asarray(s.head_lps_mm, float)
            cand = np.asarray(mv.tree.query_ball_point(h, r=16.0 + 1e-6), int)
            if cand.size:
                left[cand[np.linalg.norm(pts[cand] - h, axis=1) <= 16.0]] = False
    for cg in cages:
        c = np.asarray(cg.centroid_lps_mm, float)
        half = np.asarray(cg.half_sizes_mm, float) + 2.0
        cand = np.asarray(mv.tree.query_ball_point(c, r=float(np.linalg.norm(half)) + 1e-6), int)
        if cand.size:
            loc = np.abs((pts[cand] - c) @ np.asarray(cg.axes).T) <= half
            left[cand[loc.all(1)]] = False
    for r in rods:
        line = np.asarray(r.points_lps_mm)
        radius = 0.5 * r.diameter_mm + 4.0
        for a, b in zip(line[:-1], line[1:]):
            ab = b - a
            L = float(np.linalg.norm(ab))
            if L <= 0:
                continue
            ab /= L
            cand = mv.near_segment(a, b, radius)
            if cand.size == 0:
                continue
            rel = pts[cand] - a
            tt = np.clip(rel @ ab, 0.0, L)
            left[cand[np.linalg.norm(rel - tt[:, None] * ab, axis=1) <= radius]] = False
    return float(left.sum() * np.prod(volume.spacing_mm))
