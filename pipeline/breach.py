"""Pedicle breach: how far a screw's shaft lies outside its pedicle's cortex (Gertzbein-Robbins).

Gertzbein and Robbins (Spine 1990) grade a pedicle screw by how far the shaft lies outside
the pedicle's outer cortex: A none, B < 2 mm, C 2-4 mm, D 4-6 mm, E >= 6 mm (CLINICAL.md;
:func:`pipeline.results.gertzbein_robbins_grade`). We measure it the way a reader does on
cross-sections of the pedicle, one station at a time along the shaft's pedicle segment:

1. **Rays.** At each station, rays perpendicular to the shaft, from its true surface
   (radius = diameter / 2) outward (:func:`station_profiles`).
2. **Outer cortex points.** Where a ray passes from bone into soft tissue / CSF (below
   ``Config.bone_threshold_hu``), at the half-maximum between the bright cortex ring's peak
   and the soft tissue beyond, with no metal on the bone side: the outer surface of bone,
   seen from inside the pedicle (falling) or from outside it (rising, for a shaft that has
   left the pedicle). Crossings of the metal's own blooming and of the
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
from pipeline.fracture import _perp_frame, _unit  # one shaft frame for both integrity checks
from pipeline.results import ScrewGeometry, Vertebra, gertzbein_robbins_grade
from pipeline.volume import Volume

CORTEX_MIN_CONTRAST_HU = 150.0  # a cortex peak at least this far above the soft-tissue cut
CORTEX_HU = 1000.0              # cortical bone; its half-contrast to soft tissue is the surface
RING_FRACTION = 0.8             # ... or this fraction of a blurred ring's own height
N_AZIMUTHS = 72
RAY_STEP_MM = 0.1
RAY_REACH_MM = 22.0             # from the shaft axis
STATION_STEP_MM = 1.0
POOL_STATIONS = 2               # a station's outline is fitted with this many neighbours each side
SOFT_SIDE_MM = (0.8, 2.0)       # the far side of an outer-cortex crossing: soft tissue here
METAL_SIDE_MM = 2.0             # ... and no metal this close on its bone side
RANSAC_ITER = 300
RANSAC_TOL_MM = 0.35
PEDICLE_RADIUS_RANGE_MM = (2.5, 14.0)
MIN_INLIERS = 20
MIN_ARC_DEG = 100.0             # inliers must cover at least this arc of the outline
PEDICLE_FRACTION_NO_VERTEBRA = 0.45
BODY_MARGIN_MM = 2.5            # stop this far before the shaft enters the body outline
                                # (the pedicle widens into the body over ~1.5 mm; a detected
                                # outline is within ~1 mm of the true one)


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
    kji, dirs, frame = _station_rays_kji(volume, centre_lps, axis, radii_mm, n_azimuths)
    return sample_points(hu, kji).reshape(n_azimuths, len(radii_mm)), dirs, frame


def _station_rays_kji(volume: Volume, centre_lps, axis, radii_mm: np.ndarray,
                      n_azimuths: int = N_AZIMUTHS):
    """The (k, j, i) sample points of :func:`station_profiles` ((azimuths * radii, 3)), the
    ray directions and the in-plane frame."""
    e1, e2 = _perp_frame(axis)
    ang = 2 * np.pi * np.arange(n_azimuths) / n_azimuths
    dirs = np.cos(ang)[:, None] * e1 + np.sin(ang)[:, None] * e2
    pts = np.asarray(centre_lps)[None, None, :] + radii_mm[None, :, None] * dirs[:, None, :]
    kji = np.ascontiguousarray(volume.lps_to_kji(pts.reshape(-1, 3)), dtype=np.float64)
    return kji, dirs, (e1, e2)


def _median(x: np.ndarray) -> float:
    """``float(np.median(x))`` of a short 1-D array, without NumPy's per-call overhead
    (the same value: the middle element, or the mean of the middle two, NaN if any is)."""
    v = sorted(x.tolist())
    if v and v[-1] != v[-1] or any(e != e for e in v):
        return float("nan")
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else float(np.float64(v[m - 1] + v[m]) / 2.0)


def outer_cortex_points(profiles_hu: np.ndarray, radii_mm: np.ndarray, start_mm: float,
                        soft_hu: float, metal_hu: float):
    """Outer-cortex crossings on each ray: (azimuth index, radius mm) pairs (module doc, 2).

    Candidates are crossings of ``soft_hu`` (bone above, soft tissue below) beyond
    ``start_mm`` whose soft side (median ``SOFT_SIDE_MM`` beyond) is below ``soft_hu`` and
    whose bone side holds no metal within ``METAL_SIDE_MM``. Each is placed at the
    half-maximum between the cortex peak on its bone side (within ``METAL_SIDE_MM``) and the
    soft side's level: the outer surface of the bright cortex ring, whatever its blurred
    height (a 1 mm cortex peaks near 1000 HU on fine data, below 500 HU at 0.8 mm voxels)."""
    step = float(radii_mm[1] - radii_mm[0])
    n = len(radii_mm)
    s_lo, s_hi = (int(round(x / step)) for x in SOFT_SIDE_MM)
    m_n = int(round(METAL_SIDE_MM / step))
    out_a, out_r = [], []
    # every ray's threshold crossings at once, in (azimuth, radius) order as ray by ray
    above_all = profiles_hu >= soft_hu
    cross_a, cross_i = np.nonzero(above_all[:, 1:] != above_all[:, :-1])
    keep = radii_mm[cross_i] >= start_mm
    for a, i in zip(cross_a[keep].tolist(), cross_i[keep].tolist()):
        p = profiles_hu[a]
        if above_all[a, i]:   # falling: bone inside, soft tissue outward
            falling = True
            soft = p[min(n, i + 1 + s_lo):min(n, i + 1 + s_hi)]
            lo_b = max(0, i - m_n)
            bone = p[lo_b:i + 1]
            k_pk = lo_b + int(np.argmax(bone))
            seg_lo, seg_hi = k_pk, i + 1
        else:                 # rising: soft tissue inward, bone outward
            falling = False
            soft = p[max(0, i - s_hi):max(0, i - s_lo + 1)]
            hi_b = min(n, i + 1 + m_n)
            bone = p[i + 1:hi_b]
            k_pk = i + 1 + int(np.argmax(bone)) if bone.size else i + 1
            seg_lo, seg_hi = i, k_pk
        if soft.size < 3 or bone.size < 2:
            continue
        if k_pk in (seg_lo, seg_hi) and (falling and k_pk == lo_b or not falling and k_pk == hi_b - 1):
            continue  # no ring: a monotone fall from the metal (blooming), not a cortex
        soft_level = _median(soft)
        peak = float(bone.max())
        if soft_level >= soft_hu or peak >= metal_hu or peak < soft_hu + CORTEX_MIN_CONTRAST_HU:
            continue
        level = min(soft_level + 0.5 * (CORTEX_HU - soft_level),
                    soft_level + RING_FRACTION * (peak - soft_level))
        q = p[seg_lo:seg_hi + 1]
        hi_side = q >= level
        j = np.nonzero(hi_side[1:] != hi_side[:-1])[0]
        if j.size == 0:
            continue
        j = int(j[-1]) if falling else int(j[0])
        f = (level - q[j]) / (q[j + 1] - q[j])
        out_a.append(a)
        out_r.append(radii_mm[seg_lo + j] + f * step)
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
    # |point - centre| as in np.linalg.norm(axis=2): sqrt(dx*dx + dy*dy), same rounding
    dx = xy[None, :, 0] - cen[:, 0, None]
    dy = xy[None, :, 1] - cen[:, 1, None]
    resid = np.abs(np.sqrt(dx * dx + dy * dy) - rad[:, None])
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


def station_points(volume: Volume, hu: np.ndarray, centre_lps, axis, radius_mm: float,
                   config: Config) -> np.ndarray:
    """Outer-cortex points (n, 2) of one cross-section, in the shaft's own perpendicular
    frame (:func:`_perp_frame`), mm from the shaft axis."""
    radii = np.arange(0.0, RAY_REACH_MM + 1e-9, RAY_STEP_MM)
    prof, _, _ = station_profiles(volume, hu, centre_lps, axis, radii)
    return _profile_points(prof, radii, radius_mm, config)


def _profile_points(prof: np.ndarray, radii: np.ndarray, radius_mm: float, config: Config) -> np.ndarray:
    """:func:`station_points` from one station's profiles (azimuths, radii)."""
    az, rr = outer_cortex_points(prof, radii, radius_mm + 0.3, config.bone_threshold_hu,
                                 config.metal_threshold_hu)
    ang = 2 * np.pi * az / N_AZIMUTHS
    return np.column_stack([rr * np.cos(ang), rr * np.sin(ang)])


def stations_points(volume: Volume, hu: np.ndarray, centres_lps, axis, radius_mm: float,
                    config: Config) -> list[np.ndarray]:
    """:func:`station_points` of several cross-sections along one shaft, with one sampling
    call for all of them (the same samples: each point is sampled on its own)."""
    radii = np.arange(0.0, RAY_REACH_MM + 1e-9, RAY_STEP_MM)
    if len(centres_lps) == 0:
        return []
    kji = np.concatenate([_station_rays_kji(volume, c, axis, radii)[0] for c in centres_lps])
    prof = sample_points(hu, kji).reshape(len(centres_lps), N_AZIMUTHS, len(radii))
    return [_profile_points(p, radii, radius_mm, config) for p in prof]


def outline_breach(xy: np.ndarray, axis, radius_mm: float):
    """Breach (mm; negative is clearance inside the pedicle) of a shaft of ``radius_mm`` on
    the frame's origin against the pedicle circle fitted to ``xy``, and the unit LPS
    direction from the pedicle centre to the shaft; None when no outline fits (too few
    points, or inliers covering less than ``MIN_ARC_DEG``)."""
    fit = fit_circle_ransac(xy)
    if fit is None:
        return None
    c, R, inl = fit
    if _arc_deg(xy[inl], c) < MIN_ARC_DEG:
        return None
    e1, e2 = _perp_frame(axis)
    off = float(np.linalg.norm(c))
    direction = -(c[0] * e1 + c[1] * e2)  # from the pedicle centre to the shaft axis
    return off + radius_mm - R, (direction / off if off > 1e-6 else np.zeros(3))


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
    ts = np.arange(t0 + 0.5 * STATION_STEP_MM, t1 + 1e-9, STATION_STEP_MM)
    pts = stations_points(volume, hu, [head + t * ax for t in ts], ax, r, config)
    rows = []
    for i, t in enumerate(ts):
        # pool the neighbouring cross-sections: the pedicle is a tube, locally parallel
        xy = np.concatenate(pts[max(0, i - POOL_STATIONS):i + POOL_STATIONS + 1])
        res = outline_breach(xy, ax, r)
        if res is not None:
            rows.append((t, res[0], res[1]))
    if not rows:
        return 0.0, "A", None
    vals = np.array([b for _, b, _ in rows])
    if len(vals) >= 3:
        # full 3-station windows only: at the segment's ends a 2-station window is a mean,
        # and one odd end station (the pedicle widening into the body) would grade the screw
        med = np.array([np.median(vals[i - 1:i + 2]) for i in range(1, len(vals) - 1)])
        k = 1 + int(np.argmax(med))
        med = np.concatenate([[-np.inf], med, [-np.inf]])
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
