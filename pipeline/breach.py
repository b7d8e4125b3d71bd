"""Pedicle breach: how far a screw's shaft lies outside its pedicle's cortex (Gertzbein-Robbins).

Gertzbein and Robbins (Spine 1990) grade a pedicle screw by how far the shaft lies outside
the pedicle's outer cortex: A none, B < 2 mm, C 2-4 mm, D 4-6 mm, E >= 6 mm (CLINICAL.md;
:func:`pipeline.results.gertzbein_robbins_grade`). We measure it the way a reader does on
cross-sections of the pedicle, one station at a time along the shaft's pedicle segment:

1. **Rays.** At each station, rays perpendicular to the shaft, from its true surface
   (radius = diameter / 2) outward (:func:`station_profiles`).
2. **Outer cortex points.** Where a ray crosses ``CORTEX_EDGE_HU`` (half-way between
   cortical bone, ~1000 HU, and soft tissue / CSF, ~0-50 HU: the half-maximum of the bright
   cortex ring against what lies outside the bone) with soft tissue (below
   ``Config.bone_threshold_hu``) on the far side and no metal on the bone side: the outer
   surface of bone, seen from inside the pedicle (falling) or from outside it (rising, for
   a shaft that has left the pedicle). Crossings of the metal's own blooming and of the
   inner face of the cortex are rejected (:func:`outer_cortex_points`).
3. **Pedicle outline.** A circle fitted to those points with RANSAC (other bone nearby,
   the transverse process, lamina or body, is outliers) and refined by least squares on
   its inliers (:func:`fit_circle_ransac`). The fit sees the pedicle's wall all round the
   shaft, also the part hidden where the shaft passes through it.
4. **Breach.** The shaft's outermost point beyond that outline:
   ``|centre - axis| + r - R`` (0 when inside); its direction is from the pedicle centre
   towards the shaft, named medial / lateral (towards / away from the midline) or superior /
   inferior, whichever component is larger. The screw's breach is the largest over the
   pedicle segment after a 3-station running median (one odd station cannot grade a screw).

The pedicle segment runs from the screw head (where the shaft leaves bone) to where the
shaft enters the vertebral body's outline (``Vertebra.semi_axes_mm``), or over the first
``PEDICLE_FRACTION_NO_VERTEBRA`` of the shaft when no vertebra is known. Real pedicles are
oval rather than round; the circle is the model of this first version (limitation).
"""
from __future__ import annotations

import numpy as np

from kernels.sampling import sample_points
from pipeline.config import Config
from pipeline.results import ScrewGeometry, Vertebra, gertzbein_robbins_grade
from pipeline.volume import Volume

CORTEX_EDGE_HU = 500.0          # half-way between cortex (~1000 HU) and soft tissue (~40 HU)
N_AZIMUTHS = 72
RAY_STEP_MM = 0.1
RAY_REACH_MM = 22.0             # from the shaft axis
STATION_STEP_MM = 1.0
SOFT_SIDE_MM = (0.8, 2.0)       # the far side of an outer-cortex crossing: soft tissue here
METAL_SIDE_MM = 1.5             # ... and no metal this close on its bone side
RANSAC_ITER = 300
RANSAC_TOL_MM = 0.35
PEDICLE_RADIUS_RANGE_MM = (2.5, 14.0)
MIN_INLIERS = 14
MIN_ARC_DEG = 100.0             # inliers must cover at least this arc of the outline
PEDICLE_FRACTION_NO_VERTEBRA = 0.45
BODY_MARGIN_MM = 1.0            # stop this far before the shaft enters the body outline


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _perp_frame(axis) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``axis``: the first towards LPS superior (+z)."""
    ax = _unit(axis)
    ref = np.array([0.0, 0.0, 1.0]) if abs(ax[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = _unit(ref - (ref @ ax) * ax)
    return e1, np.cross(ax, e1)


def pedicle_segment_mm(screw: ScrewGeometry, vertebra: Vertebra | None) -> tuple[float, float]:
    """Arc lengths (from the head, mm) of the shaft's pedicle segment: from the head to where
    the shaft enters the vertebral body's outline (ellipse with ``semi_axes_mm`` in the plane
    perpendicular to ``axis_si``), less ``BODY_MARGIN_MM``."""
    L = screw.length_mm
    if vertebra is None:
        return 0.0, PEDICLE_FRACTION_NO_VERTEBRA * L
    h = np.asarray(screw.head_lps_mm)
    ax = np.asarray(screw.axis)
    c = np.asarray(vertebra.center_lps_mm)
    lr = np.asarray(vertebra.axis_lr)
    ap = np.cross(np.asarray(vertebra.axis_si), lr)
    a, b = vertebra.semi_axes_mm
    t = np.arange(0.0, L + 1e-9, 0.25)
    p = h[None, :] + t[:, None] * ax[None, :] - c[None, :]
    inside = ((p @ lr) / a) ** 2 + ((p @ ap) / b) ** 2 <= 1.0
    if not inside.any():
        return 0.0, PEDICLE_FRACTION_NO_VERTEBRA * L
    t_in = float(t[np.argmax(inside)])
    end = max(t_in - BODY_MARGIN_MM, min(5.0, L))
    return 0.0, end


def station_profiles(volume: Volume, hu: np.ndarray, centre_lps, axis, radii_mm: np.ndarray,
                     n_azimuths: int = N_AZIMUTHS):
    """HU on rays perpendicular to ``axis`` from ``centre_lps``: (azimuths, radii), with the
    ray directions (azimuths, 3) and the in-plane frame (e1, e2)."""
    e1, e2 = _perp_frame(axis)
    ang = 2 * np.pi * np.arange(n_azimuths) / n_azimuths
    dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
    pts = np.asarray(centre_lps)[None, None, :] + radii_mm[None, :, None] * dirs[:, None, :]
    kji = np.ascontiguousarray(volume.lps_to_kji(pts.reshape(-1, 3)), dtype=np.float64)
    return sample_points(hu, kji).reshape(n_azimuths, len(radii_mm)), dirs, (e1, e2)


def outer_cortex_points(profiles_hu: np.ndarray, radii_mm: np.ndarray, start_mm: float,
                        soft_hu: float, metal_hu: float, edge_hu: float = CORTEX_EDGE_HU):
    """Outer-cortex crossings on each ray: (azimuth index, radius mm) pairs (module doc, 2).

    A crossing of ``edge_hu`` beyond ``start_mm`` counts when the median HU
    ``SOFT_SIDE_MM`` beyond it on its low side is below ``soft_hu`` (soft tissue, not
    trabecular bone) and nothing within ``METAL_SIDE_MM`` on its high side reaches
    ``metal_hu`` (not the metal's own blooming)."""
    step = float(radii_mm[1] - radii_mm[0])
    n = len(radii_mm)
    s_lo, s_hi = (int(round(x / step)) for x in SOFT_SIDE_MM)
    m_n = int(round(METAL_SIDE_MM / step))
    out_a, out_r = [], []
    for a, p in enumerate(profiles_hu):
        above = p >= edge_hu
        idx = np.nonzero(above[1:] != above[:-1])[0]
        for i in idx:
            if radii_mm[i] < start_mm:
                continue
            falling = above[i] and not above[i + 1]
            if falling:   # bone inside, the far side outward
                lo_side = p[min(n, i + 1 + s_lo):min(n, i + 1 + s_hi)]
                hi_side = p[max(0, i - m_n):i + 1]
            else:         # rising: bone outward, the far side inward
                lo_side = p[max(0, i - s_hi):max(0, i - s_lo + 1)]
                hi_side = p[i + 1:min(n, i + 1 + m_n)]
            if lo_side.size < 3 or np.median(lo_side) >= soft_hu or hi_side.max() >= metal_hu:
                continue
            f = (edge_hu - p[i]) / (p[i + 1] - p[i])
            out_a.append(a)
            out_r.append(radii_mm[i] + f * step)
    return np.array(out_a, int), np.array(out_r, float)


def _circle_lsq(xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Algebraic (Kasa) circle fit: centre (2,), radius."""
    A = np.column_stack([2 * xy, np.ones(len(xy))])
    b = (xy ** 2).sum(1)
    sol, *_ = np.linalg.lstsq(A, b, rcond=None)
    c = sol[:2]
    return c, float(np.sqrt(max(sol[2] + c @ c, 0.0)))


def fit_circle_ransac(xy: np.ndarray, tol_mm: float = RANSAC_TOL_MM,
                      radius_range_mm=PEDICLE_RADIUS_RANGE_MM, n_iter: int = RANSAC_ITER,
                      seed: int = 0):
    """Robust circle through 2-D points: RANSAC on 3-point circles within ``radius_range_mm``
    (most inliers within ``tol_mm``), refined by least squares on the inliers. Returns
    (centre, radius, inlier mask) or None."""
    n = len(xy)
    if n < MIN_INLIERS:
        return None
    rng = np.random.default_rng(seed)
    tri = rng.integers(0, n, size=(n_iter, 3))
    p1, p2, p3 = xy[tri[:, 0]], xy[tri[:, 1]], xy[tri[:, 2]]
    # circumcentre of each triple
    d = 2 * (p1[:, 0] * (p2[:, 1] - p3[:, 1]) + p2[:, 0] * (p3[:, 1] - p1[:, 1])
             + p3[:, 0] * (p1[:, 1] - p2[:, 1]))
    ok = np.abs(d) > 1e-6
    s1, s2, s3 = (p1 ** 2).sum(1), (p2 ** 2).sum(1), (p3 ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ux = (s1 * (p2[:, 1] - p3[:, 1]) + s2 * (p3[:, 1] - p1[:, 1]) + s3 * (p1[:, 1] - p2[:, 1])) / d
        uy = (s1 * (p3[:, 0] - p2[:, 0]) + s2 * (p1[:, 0] - p3[:, 0]) + s3 * (p2[:, 0] - p1[:, 0])) / d
    cen = np.column_stack([ux, uy])
    rad = np.linalg.norm(p1 - cen, axis=1)
    ok &= (rad >= radius_range_mm[0]) & (rad <= radius_range_mm[1])
    if not ok.any():
        return None
    cen, rad = cen[ok], rad[ok]
    resid = np.abs(np.linalg.norm(xy[None, :, :] - cen[:, None, :], axis=2) - rad[:, None])
    counts = (resid < tol_mm).sum(1)
    k = int(np.argmax(counts))
    inl = resid[k] < tol_mm
    for _ in range(3):
        if inl.sum() < MIN_INLIERS:
            return None
        c, R = _circle_lsq(xy[inl])
        inl = np.abs(np.linalg.norm(xy - c, axis=1) - R) < tol_mm
    if inl.sum() < MIN_INLIERS or not (radius_range_mm[0] <= R <= radius_range_mm[1]):
        return None
    return c, R, inl


def _arc_deg(xy: np.ndarray, centre: np.ndarray) -> float:
    """The arc of a circle (deg) that points cover: 360 minus the largest empty gap."""
    ang = np.sort(np.degrees(np.arctan2(xy[:, 1] - centre[1], xy[:, 0] - centre[0])))
    gaps = np.diff(np.concatenate([ang, [ang[0] + 360.0]]))
    return float(360.0 - gaps.max())


def station_breach(volume: Volume, hu: np.ndarray, centre_lps, axis, radius_mm: float,
                   config: Config):
    """One cross-section's breach (mm, may be negative: clearance inside the pedicle) and
    the unit LPS direction from the pedicle centre towards the shaft; None if no pedicle
    outline could be fitted."""
    radii = np.arange(0.0, RAY_REACH_MM + 1e-9, RAY_STEP_MM)
    prof, dirs, (e1, e2) = station_profiles(volume, hu, centre_lps, axis, radii)
    az, rr = outer_cortex_points(prof, radii, radius_mm + 0.3, config.bone_threshold_hu,
                                 config.metal_threshold_hu)
    if az.size < MIN_INLIERS:
        return None
    ang = 2 * np.pi * az / N_AZIMUTHS
    xy = np.column_stack([rr * np.cos(ang), rr * np.sin(ang)])
    fit = fit_circle_ransac(xy)
    if fit is None:
        return None
    c, R, inl = fit
    if _arc_deg(xy[inl], c) < MIN_ARC_DEG:
        return None
    off = float(np.linalg.norm(c))
    breach = off + radius_mm - R
    direction = -(c[0] * e1 + c[1] * e2)  # from the pedicle centre to the shaft axis
    return breach, (direction / off if off > 1e-6 else np.zeros(3))


def breach_direction(direction_lps: np.ndarray, screw: ScrewGeometry,
                     vertebra: Vertebra | None) -> str:
    """Name a breach direction relative to the patient: medial (towards the midline / canal),
    lateral, superior or inferior, whichever component is larger."""
    if vertebra is not None:
        si = np.asarray(vertebra.axis_si)
        lr = np.asarray(vertebra.axis_lr)
        head = np.asarray(screw.head_lps_mm) - np.asarray(vertebra.center_lps_mm)
        side = np.sign(head @ lr) or (1.0 if screw.side == "left" else -1.0)
    else:
        si, lr = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
        side = 1.0 if screw.side == "left" else -1.0 if screw.side == "right" else \
            float(np.sign(screw.head_lps_mm[0]) or 1.0)
    lat = float(direction_lps @ lr) * side   # > 0: away from the midline
    sup = float(direction_lps @ si)
    if abs(lat) >= abs(sup):
        return "lateral" if lat > 0 else "medial"
    return "superior" if sup > 0 else "inferior"


def measure_breach(volume: Volume, screw: ScrewGeometry, vertebra: Vertebra | None,
                   config: Config) -> tuple[float, str, str | None]:
    """Pedicle breach of one screw (module docstring).

    Parameters
    ----------
    volume : Volume
        CT in HU.
    screw : ScrewGeometry
        The shaft (head -> tip) and its true diameter.
    vertebra : Vertebra or None
        The screw's vertebra: bounds the pedicle segment (up to the body outline) and
        defines medial/lateral and superior/inferior; None uses the shaft's first 45 % and
        the patient's x / z axes.
    config : Config
        ``bone_threshold_hu`` (soft tissue outside the cortex is below it) and
        ``metal_threshold_hu``.

    Returns
    -------
    breach_mm : float
        How far the shaft's outer surface lies beyond the pedicle's outer cortex (>= 0).
    grade : str
        Gertzbein-Robbins ``A``..``E``.
    direction : str or None
        ``medial`` / ``lateral`` / ``superior`` / ``inferior``; None for grade A or when no
        pedicle outline could be fitted.
    """
    hu = np.asarray(volume.hu)
    if hu.dtype != np.float32 or not hu.flags.c_contiguous:
        hu = np.ascontiguousarray(hu, dtype=np.float32)
    t0, t1 = pedicle_segment_mm(screw, vertebra)
    head = np.asarray(screw.head_lps_mm)
    ax = np.asarray(screw.axis)
    r = 0.5 * screw.diameter_mm
    rows = []
    for t in np.arange(t0 + 0.5 * STATION_STEP_MM, t1 + 1e-9, STATION_STEP_MM):
        res = station_breach(volume, hu, head + t * ax, ax, r, config)
        if res is not None:
            rows.append((t, res[0], res[1]))
    if not rows:
        return 0.0, "A", None
    vals = np.array([b for _, b, _ in rows])
    if len(vals) >= 3:
        med = np.array([np.median(vals[max(0, i - 1):i + 2]) for i in range(len(vals))])
    else:
        med = vals
    k = int(np.argmax(med))
    breach = float(max(0.0, med[k]))
    grade = gertzbein_robbins_grade(breach)
    if grade == "A":
        return 0.0, "A", None
    # the direction at the worst stations (mean of the three around it)
    dirs = np.array([d for _, _, d in rows[max(0, k - 1):k + 2]]).mean(0)
    if np.linalg.norm(dirs) < 1e-6:
        return breach, grade, None
    return breach, grade, breach_direction(_unit(dirs), screw, vertebra)
