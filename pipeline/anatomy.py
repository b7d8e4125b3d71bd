"""Find the vertebral bodies, their endplates and the disc spaces between them.

The steps, each one function (all positions LPS mm, see ``pipeline.volume``):

1. :func:`resample_to_lps_grid` - a smoothed copy of the CT on an LPS-aligned grid
   (z superior), so nothing depends on the series' slice order or direction.
2. :func:`column_cores` - in each axial plane, the "thick" bone-or-disc tissue: points at
   least ``CORE_RADIUS_MM`` inside a mask above ``COLUMN_THRESHOLD_HU``. Vertebral bodies
   are the thickest such tissue of the trunk; laminae, ribs and iliac blades drop out.
3. :func:`select_column_chain` - the chain of cores stacked along z (weighted to the
   midline) that covers the most length: the spinal column, never a femoral head or a
   hip implant beside it.
4. :func:`column_centreline`, :func:`column_profile`, :func:`find_disc_stations` - a
   smooth curve through the chain; along it, cross-section statistics; the disc spaces as
   the best-scoring set of evidence at least a short body apart (:func:`select_periodic`):
   dark disc tissue between bright endplates, a pair of cortical endplates (bridged
   levels, PEEK cages), non-trabecular tissue, or metal filling the centre (titanium cage).
5. :func:`fit_body` - per body between (or beyond) the discs: the outline
   (:func:`body_outline`), then each endplate as a robust plane (:func:`fit_plane`)
   through points found on rays parallel to the body axis (:func:`endplate_edge_mm`: the
   outer surface of the cortical endplate, half-way from its peak to what lies beyond).
6. The sacrum is the first body from the top with bone beside it at S1's level (the
   alae, :func:`lateral_bone_fraction`); it is fitted from its superior endplate only.
   Names count upward from it (:func:`name_vertebrae`: S1, L5, L4, ...); without a sacrum
   the bodies are named by position (V1 at the top) and a note says so (CONTRACT.md,
   "Geometry and units").
7. :func:`disc_levels` - one level per pair of consecutive bodies.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.results import DiscLevel, Plane, Vertebra
from pipeline.volume import Volume

_log = logging.getLogger(__name__)

# Grid and thresholds of the column search (not clinical criteria: detection internals).
ANATOMY_STEP_MM = 2.0          # LPS grid step for the column search
COLUMN_SIGMA_MM = 1.5          # pre-smoothing before thresholding
COLUMN_THRESHOLD_HU = 100.0    # bone-or-disc: above soft tissue (~40) and below trabecular
                               # bone even in osteopenic spines (~120-250 HU)
CORE_RADIUS_MM = 8.0           # in-plane half-thickness a vertebral body always exceeds
MAX_HOLE_MM2 = 120.0           # holes filled in the mask (not the spinal canal, ~300 mm2)
BODY_HEIGHT_RANGE_MM = (18.0, 45.0)  # a fitted body outside this is a failed fit
TALL_BODY_RATIO = 1.25         # a lumbar body this much taller than the others' median earns a note
SHORT_BODY_RATIO = 0.8         # ... or this much shorter (against at least two others)
MIN_DISC_SPACING_MM = 22.0     # disc-to-disc distance of the shortest body (T10) and disc
CAGE_MIN_WIDTH_MM = 9.0        # interbody cages are wider (phantom 11, PLIF/TLIF 9-12 mm);
                               # screw shafts, blooming included, are narrower (4.5-8.5 mm)
SOFT_TISSUE_HU = 40.0          # muscle and fat-muscle mix around the column
MIN_END_BODY_MM = 12.0         # a disc has a body beyond it: where the column ends inside the
                               # scan, no disc centre lies closer to that end (the shortest
                               # body, 18 mm, plus half a disc; a slab darkened by streaks
                               # inside the end vertebra does)
MIN_DISC_EVIDENCE = 0.25       # a disc's summed evidence (about 1 per clear kind; the weakest real
                               # disc of the sweeps scores 0.58): a stray dip near an open end of the
                               # column scored 0.01 and, with nothing to compete with, became a disc
TYPICAL_DISC_MM = 10.0          # lumbar disc height (8-12 mm; phantom 8.5-11.5)
MIN_DISC_MM = 3.0              # the thinnest disc space the endplates across it leave
PAIR_MIN_NON_TRABECULAR = 0.5  # an endplate pair's middle is mostly not trabecular (median)
MAX_WEDGE_DEG = 20.0           # a disc's endplates are this close to parallel (lordotic wedge)
MAX_BODY_WEDGE_DEG = 15.0      # a lumbar body's own two endplates are this close to parallel
                               # (its wedge is a few degrees, L5's the largest)
ENDPLATE_MAX_HU = 1500.0       # brighter than any cortex: metal or its blooming
ENDPLATE_CORTEX_MM = 1.0       # cortical endplate thickness assumed for its blurred surface
MAX_SURFACE_LEVEL = 0.9         # never read closer to the peak than this (noise)
MAX_MODEL_SIGMA_MM = 0.8        # thicker blur (slices > ~1.6 mm): the model is not used
SACRUM_LATERAL_BONE = 0.11     # lateral bone fraction beside S1 (alae): phantoms >= 0.14, real
                               # CT 0.39; lumbar bodies: phantoms 0.0, real CT <= 0.07
LUMBAR_NAMES_ABOVE_S1 = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8")


# ----------------------------------------------------------------------------- sampling
#: point sets at least this large are sampled in two halves on two threads (SciPy's
#: interpolation leaves Python free; every point's value is computed alone, so the values
#: are the same)
SPLIT_SAMPLES = 100_000


def sample_lps(volume: Volume, points_lps_mm, order: int = 1, cval_hu: float = -1000.0) -> np.ndarray:
    """HU at LPS points (..., 3) by spline interpolation of ``order`` (1 = trilinear)."""
    pts = np.asarray(points_lps_mm, float)
    # (k, j, i) rows directly (what map_coordinates takes): Volume.lps_to_kji, transposed
    to_kji = np.linalg.inv(volume.index_to_lps_matrix)[::-1]
    kji = to_kji @ (pts.reshape(-1, 3) - volume.origin_lps_mm).T
    n = kji.shape[1]
    if order <= 1 and n >= SPLIT_SAMPLES and GRID_THREADS > 1:
        # order 0/1 needs no spline prefilter: halves are independent
        vals = np.empty(n, dtype=np.asarray(volume.hu[:0, :0, :0]).dtype)  # map_coordinates: the input's

        def part(a: int, b: int) -> None:
            vals[a:b] = ndimage.map_coordinates(volume.hu, kji[:, a:b], order=order, mode="constant",
                                                cval=cval_hu, prefilter=False)

        _run_slabs(part, n, -(-n // GRID_THREADS), GRID_THREADS)
    else:
        vals = ndimage.map_coordinates(volume.hu, kji, order=order, mode="constant",
                                       cval=cval_hu, prefilter=False)
    return vals.reshape(pts.shape[:-1])


def lps_bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (min, max corner) of the voxel centres, mm."""
    ni, nj, nk = volume.shape_ijk
    corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float)
    c = volume.ijk_to_lps(corners)
    return c.min(0), c.max(0)


#: threads for the volume-wide passes of the column search (block mean, Gaussian): SciPy's
#: filters and NumPy's arithmetic release Python while they run, and each thread works on its
#: own slab of the output, so the values are the same as one pass over the whole volume
GRID_THREADS = 2
_SLAB = 8  # output slices per block-mean work item (its sums stay in the CPU caches)


def _run_slabs(fn, n: int, step: int, threads: int) -> None:
    """``fn(start, stop)`` over ``[0, n)`` in slabs of ``step``, on ``threads`` threads."""
    bounds = [(a, min(a + step, n)) for a in range(0, n, max(step, 1))]
    if threads <= 1 or len(bounds) <= 1:
        for a, b in bounds:
            fn(a, b)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fusionct-grid") as pool:
        for f in [pool.submit(fn, a, b) for a, b in bounds]:
            f.result()


def block_mean(volume: Volume, max_block_mm: float, threads: int = GRID_THREADS) -> Volume:
    """The volume averaged over blocks of whole voxels at most ``max_block_mm`` on a side.

    Each output voxel is the mean of ``f_i x f_j x f_k`` input voxels (trailing voxels that
    do not fill a block are dropped); its centre is the block's centre, so the geometry stays
    exact. A cheap first step before smoothing for a coarse search grid. Slabs of output
    slices are summed on ``threads`` threads, each voxel's sum in the same order.
    """
    f = np.maximum(np.floor(max_block_mm / volume.spacing_mm + 1e-6), 1).astype(int)  # i, j, k
    fi, fj, fk = (int(x) for x in f)
    if fi == fj == fk == 1:
        return volume
    nk, nj, ni = volume.hu.shape
    mk, mj, mi = max(nk // fk, 1), max(nj // fj, 1), max(ni // fi, 1)
    fk, fj, fi = min(fk, nk), min(fj, nj), min(fi, ni)
    hu = volume.hu[: mk * fk, : mj * fj, : mi * fi]
    out = np.zeros((mk, mj, mi), np.float32)

    def slab(k0: int, k1: int) -> None:
        o = out[k0:k1]
        part = hu[k0 * fk: k1 * fk]
        for a in range(fk):  # sum the block's planes one at a time (no large temporaries)
            plane = part[a::fk]
            acc = np.zeros((k1 - k0, mj * fj, mi), np.float32)
            for c in range(fi):
                acc += plane[:, :, c::fi]
            for b in range(fj):
                o += acc[:, b::fj]
        o /= float(fi * fj * fk)

    _run_slabs(slab, mk, _SLAB, threads)
    origin = volume.ijk_to_lps(np.array([(fi - 1) / 2.0, (fj - 1) / 2.0, (fk - 1) / 2.0]))
    return Volume(out, origin, volume.spacing_mm * np.array([fi, fj, fk]), volume.direction)


def gaussian_filter_slabs(array: np.ndarray, sigma_vox, mode: str = "nearest",
                          threads: int = GRID_THREADS) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(array, sigma_vox, mode=mode)`` (same values), each
    axis's 1-D pass run on ``threads`` threads over slabs across another axis.

    The filter is separable and every 1-D pass reads only along its own axis, so slabs cut
    across a different axis are independent: the passes and their order are SciPy's
    (``gaussian_filter1d`` per axis, axes with sigma <= 1e-15 skipped, float32 in between).
    """
    array = np.asarray(array)
    sig = [float(x) for x in np.broadcast_to(np.asarray(sigma_vox, float), (array.ndim,))]
    out = np.empty_like(array)
    src = array
    axes = [ax for ax in range(array.ndim) if sig[ax] > 1e-15]
    if not axes:
        out[...] = array
        return out
    for ax in axes:
        cut = 0 if ax != 0 else (1 if array.ndim > 1 else 0)
        n = array.shape[cut]
        inp = src

        def run(a: int, b: int, ax=ax, cut=cut, inp=inp) -> None:
            sl = (slice(None),) * cut + (slice(a, b),)
            ndimage.gaussian_filter1d(inp[sl], sig[ax], axis=ax, output=out[sl], mode=mode)

        if cut == ax:  # a 1-D array: one pass
            run(0, n)
        else:
            _run_slabs(run, n, -(-n // max(threads, 1)), threads)
        src = out
    return out


def resample_to_lps_grid(volume: Volume, step_mm: float = ANATOMY_STEP_MM,
                         sigma_mm: float = COLUMN_SIGMA_MM) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed HU on an LPS-aligned grid.

    The CT is first averaged over blocks of voxels no larger than half the grid step
    (:func:`block_mean`; a box of width ``b`` already blurs with variance ``b^2 / 12``, so
    the Gaussian's sigma is reduced to keep the total blur ``sigma_mm``): at 0.5 mm the
    smoothing then runs on 8 times fewer voxels. (Larger blocks move the column's
    centreline enough to change body fits at the ends of the column.)

    Returns
    -------
    grid_hu : ndarray (nz, ny, nx) float32; ``grid_hu[c, b, a]`` is the HU at
        ``origin_lps_mm + step_mm * (a, b, c)`` (x left, y posterior, z superior).
    origin_lps_mm : ndarray (3,)
    """
    coarse = block_mean(volume, 0.5 * step_mm)
    box_var = (coarse.spacing_mm**2 - volume.spacing_mm**2) / 12.0  # i, j, k
    sig_mm = np.sqrt(np.maximum(sigma_mm**2 - box_var, 0.0))
    sig_vox = [max(s / sp, 0.0) for s, sp in zip(sig_mm[::-1], coarse.spacing_mm[::-1])]
    smooth = gaussian_filter_slabs(coarse.hu.astype(np.float32, copy=False), sig_vox, mode="nearest")
    lo, hi = lps_bounds(volume)
    n = np.floor((hi - lo) / step_mm).astype(int) + 1
    axes = [lo[a] + step_mm * np.arange(n[a]) for a in range(3)]
    out = np.empty((n[2], n[1], n[0]), np.float32)
    xx, yy = np.meshgrid(axes[0], axes[1], indexing="xy")  # (ny, nx)
    # the grid lies inside the original volume; beyond the last whole block the nearest
    # block stands in
    mode = "constant" if coarse is volume else "nearest"
    for c, z in enumerate(axes[2]):
        pts = np.stack([xx, yy, np.full_like(xx, z)], -1)
        kji = coarse.lps_to_kji(pts.reshape(-1, 3))
        out[c] = ndimage.map_coordinates(smooth, kji.T, order=1, mode=mode,
                                         cval=-1000.0, prefilter=False).reshape(xx.shape)
    return out, lo


# ------------------------------------------------------------------------------ column
def column_cores(grid_hu: np.ndarray, step_mm: float, threshold_hu: float = COLUMN_THRESHOLD_HU,
                 core_radius_mm: float = CORE_RADIUS_MM, max_hole_mm2: float = MAX_HOLE_MM2):
    """Label the thick bone of each axial plane.

    Returns
    -------
    labels : int ndarray like ``grid_hu``; 3-D connected components of the core.
    depth_mm : float32 ndarray; in-plane distance to the mask boundary (mm).
    """
    mask = grid_hu > threshold_hu
    depth = np.zeros(grid_hu.shape, np.float32)
    max_hole_px = max(int(max_hole_mm2 / step_mm**2), 1)
    for c in range(mask.shape[0]):
        m = mask[c]
        if not m.any():
            continue
        holes = ndimage.binary_fill_holes(m) & ~m
        hl, nh = ndimage.label(holes)
        if nh:
            sizes = np.bincount(hl.ravel())
            small = sizes <= max_hole_px
            small[0] = False
            m = m | small[hl]
        depth[c] = ndimage.distance_transform_edt(m, sampling=step_mm)
    labels, _ = ndimage.label(depth >= core_radius_mm)
    return labels, depth


def _component_table(labels, depth, origin, step_mm, min_volume_mm3=1000.0):
    """Per-component summary: z range, per-slice centroids (x, y), volume."""
    comps = []
    objs = ndimage.find_objects(labels)
    for lab, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        sub = labels[sl] == lab
        vol = sub.sum() * step_mm**3
        if vol < min_volume_mm3:
            continue
        w = np.where(sub, depth[sl], 0.0)
        zs, cents = [], []
        for c in range(sub.shape[0]):
            ws = w[c]
            tot = ws.sum()
            if tot <= 0:
                continue
            b, a = np.nonzero(ws)
            wv = ws[b, a]
            x = origin[0] + step_mm * (sl[2].start + (a * wv).sum() / tot)
            y = origin[1] + step_mm * (sl[1].start + (b * wv).sum() / tot)
            zs.append(origin[2] + step_mm * (sl[0].start + c))
            cents.append((x, y))
        comps.append(dict(label=lab, volume=vol, z=np.array(zs), xy=np.array(cents)))
    return comps


def select_column_chain(comps: list[dict], midline_x_mm: float | None = None) -> list[dict]:
    """The chain of core components stacked along z that covers the most length.

    Consecutive members overlap or are separated by at most a disc-and-a-half in z, and the
    lower end of the upper one lies near the upper end of the lower one in (x, y). Ties go
    to the chain nearest the body's midline.
    """
    if not comps:
        return []
    comps = sorted(comps, key=lambda c: -c["z"].max())  # top first
    n = len(comps)
    length = np.array([c["z"].max() - c["z"].min() + ANATOMY_STEP_MM for c in comps])
    if midline_x_mm is not None:
        off = np.array([abs(np.median(c["xy"][:, 0]) - midline_x_mm) for c in comps])
        length = length * np.clip(1.0 - (off - 30.0) / 40.0, 0.05, 1.0)
    best = length.copy()
    prev = -np.ones(n, int)
    for j in range(n):  # j lower than i for i < j in top-first order
        for i in range(j):
            up, lo_ = comps[i], comps[j]
            gap = up["z"].min() - lo_["z"].max()
            if gap > 30.0 or up["z"].min() < lo_["z"].min() + 4.0:
                continue
            d = np.linalg.norm(np.median(up["xy"], 0) - np.median(lo_["xy"], 0))
            dz = np.median(up["z"]) - np.median(lo_["z"])
            if d > 15.0 + 0.5 * dz:
                continue
            if best[i] + length[j] > best[j]:
                best[j] = best[i] + length[j]
                prev[j] = i
    j = int(np.argmax(best))
    chain = []
    while j >= 0:
        chain.append(comps[j])
        j = prev[j]
    return chain[::-1]  # top first


def column_centreline(chain: list[dict], step_mm: float = 1.0, smooth_mm: float = 6.0,
                      extend_mm: float = 20.0) -> np.ndarray:
    """A smooth curve (N, 3) through the chain, one point per ``step_mm`` of z, top first.

    Gaps between members (discs) are bridged linearly; the ends are extended by
    ``extend_mm`` along the end direction so that the outer endplates are inside.
    """
    z = np.concatenate([c["z"] for c in chain])
    xy = np.concatenate([c["xy"] for c in chain])
    order = np.argsort(z)
    z, xy = z[order], xy[order]
    # average duplicates (overlapping members)
    uz, inv = np.unique(np.round(z, 3), return_inverse=True)
    uxy = np.zeros((len(uz), 2))
    np.add.at(uxy, inv, xy)
    uxy /= np.bincount(inv)[:, None]
    zz = np.arange(uz[0] - extend_mm, uz[-1] + extend_mm + 1e-6, step_mm)
    x = np.interp(zz, uz, uxy[:, 0])
    y = np.interp(zz, uz, uxy[:, 1])
    sig = smooth_mm / step_mm
    x = ndimage.gaussian_filter1d(x, sig, mode="nearest")
    y = ndimage.gaussian_filter1d(y, sig, mode="nearest")
    # linear extension beyond the data ends, following the end slope
    for end in (0, 1):
        sel = zz < uz[0] if end == 0 else zz > uz[-1]
        ref = np.argmin(np.abs(zz - (uz[0] if end == 0 else uz[-1])))
        k = min(int(8 / step_mm), len(zz) - 1)
        a, b = (ref, ref + k) if end == 0 else (ref - k, ref)
        if b <= a or not sel.any():
            continue
        sx = (x[b] - x[a]) / (zz[b] - zz[a])
        sy = (y[b] - y[a]) / (zz[b] - zz[a])
        x[sel] = x[ref] + sx * (zz[sel] - zz[ref])
        y[sel] = y[ref] + sy * (zz[sel] - zz[ref])
    pts = np.stack([x, y, zz], -1)
    return pts[::-1]


def frames_along(curve: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit tangent (pointing superior), left and posterior axes at each curve point."""
    t = np.gradient(curve, axis=0)
    t = -t  # curve is top first; tangent towards superior
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    ex = np.array([1.0, 0.0, 0.0])
    lr = ex - (t @ ex)[:, None] * t
    lr /= np.linalg.norm(lr, axis=1, keepdims=True)
    ap = np.cross(t, lr)  # superior x left = posterior (LPS right-handed: z x x = y)
    return t, lr, ap


# ----------------------------------------------------------------------------- profile
def cross_section_points(curve, lr, ap, half_lr_mm=14.0, half_ap_mm=7.0, step_mm=2.0):
    """Sample points (N, M, 3) on a window of each cross-section of the curve."""
    u = np.arange(-half_lr_mm, half_lr_mm + 1e-6, step_mm)
    w = np.arange(-half_ap_mm, half_ap_mm + 1e-6, step_mm)
    uu, ww = np.meshgrid(u, w)
    return (curve[:, None, :] + uu.ravel()[None, :, None] * lr[:, None, :]
            + ww.ravel()[None, :, None] * ap[:, None, :])


def column_profile(volume: Volume, curve: np.ndarray, metal_threshold_hu: float,
                   quantile: float = 0.3) -> dict:
    """Cross-section statistics along the column curve (top first, 1 point per mm).

    Returns a dict of arrays: ``low_hu`` (the ``quantile`` of each central cross-section,
    +-14 mm LR x +-7 mm AP: disc tissue shows through even beside a cage or bridging bone),
    ``high_hu`` (its 75th percentile away from metal: the cortical endplates stand out),
    ``non_trabecular`` (the fraction of samples far from the body level ``body_hu``: disc,
    PEEK cage, bridging bone and endplates, not the body's inside),
    ``central_metal_fraction`` (metal in the central +-6 mm: a cage, or a screw breached
    across the midline), ``central_cage_metal_fraction`` (only cage-wide metal there, see
    :func:`central_cage_metal_fraction`: a cage, not a screw), ``valid`` (the whole cross-section is inside the volume) and the local
    frames.
    """
    t, lr, ap = frames_along(curve)
    pts = cross_section_points(curve, lr, ap)
    vals = sample_lps(volume, pts, cval_hu=np.nan)
    valid = np.all(np.isfinite(vals), axis=1)
    v = np.where(np.isfinite(vals), vals, -1000.0)
    low = np.quantile(v, quantile, axis=1)
    # without metal and its blooming (the grid neighbours of metal samples)
    nw = len(np.arange(-7.0, 7.0 + 1e-6, 2.0))
    grid = (v >= ENDPLATE_MAX_HU).reshape(len(v), nw, -1)
    near_metal = ndimage.binary_dilation(grid, structure=np.ones((1, 3, 3), bool)).reshape(len(v), -1)
    no_metal = np.where(near_metal, np.nan, v)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        high = np.nanquantile(no_metal, 0.75, axis=1)
        med = np.nanmedian(no_metal, axis=1)
    fill = np.nanmedian(high) if np.isfinite(high).any() else 0.0
    high = np.where(np.isfinite(high), high, fill)
    # the body level: trabecular bone fills most stations; a disc, a PEEK cage or bridging
    # bone is not trabecular-like
    body_hu = float(np.nanmedian(med[valid])) if valid.any() else 0.0
    band = max(45.0, 0.35 * (body_hu - 40.0))
    other = np.mean(np.abs(v - body_hu) > band, axis=1)
    # the same in the central +-5 mm only: screws, their halos and blooming run beside it
    cpts5 = cross_section_points(curve, lr, ap, half_lr_mm=5.0, half_ap_mm=5.0, step_mm=1.0)
    c5 = sample_lps(volume, cpts5, cval_hu=-1000.0)
    other_c = np.mean(np.abs(c5 - body_hu) > band, axis=1)
    cpts = cross_section_points(curve, lr, ap, half_lr_mm=6.0, half_ap_mm=6.0, step_mm=1.5)
    cvals = sample_lps(volume, cpts, cval_hu=-1000.0)
    metal = (cvals > metal_threshold_hu).mean(axis=1)
    cage_metal = central_cage_metal_fraction(volume, curve, lr, ap, metal_threshold_hu)
    return dict(low_hu=low, high_hu=high, non_trabecular=other, central_non_trabecular=other_c,
                body_hu=body_hu,
                central_metal_fraction=metal, central_cage_metal_fraction=cage_metal, valid=valid, tangent=t, lr=lr, ap=ap)


def central_cage_metal_fraction(volume: Volume, curve: np.ndarray, lr: np.ndarray, ap: np.ndarray,
                                metal_threshold_hu: float, half_mm: float = 6.0,
                                min_width_mm: float = CAGE_MIN_WIDTH_MM, step_mm: float = 1.0) -> np.ndarray:
    """Fraction of the central +-``half_mm`` of each cross-section covered by cage-wide metal.

    Metal counts only where a disk ``min_width_mm`` across fits inside the metal of the
    cross-section (a binary opening): an interbody cage is wider than that, a screw shaft
    (4.5-8.5 mm, blooming included) is not, so a screw whose tip crosses the midline (a
    medial breach, a convergent trajectory) never reads as a titanium cage filling a disc.
    """
    r_px = int(np.floor(0.5 * min_width_mm / step_mm))
    half = half_mm + r_px * step_mm + 2.0 * step_mm
    pts = cross_section_points(curve, lr, ap, half_lr_mm=half, half_ap_mm=half, step_mm=step_mm)
    n_side = len(np.arange(-half, half + 1e-6, step_mm))
    metal = (sample_lps(volume, pts, cval_hu=-1000.0) > metal_threshold_hu).reshape(len(curve), n_side, n_side)
    yy, xx = np.mgrid[-r_px:r_px + 1, -r_px:r_px + 1]
    disk = (xx**2 + yy**2) * step_mm**2 <= (0.5 * min_width_mm) ** 2
    wide = ndimage.binary_opening(metal, structure=disk[None])
    c = np.abs(np.arange(-half, half + 1e-6, step_mm)) <= half_mm + 1e-6
    return wide[:, c][:, :, c].reshape(len(curve), -1).mean(axis=1)


# ------------------------------------------------------------------------- 1-D peaks
# The disc search needs three things of ``scipy.signal``: local maxima, their prominences and
# a peak's width. Importing ``scipy.signal`` costs about 1 s of every analysis (it loads the
# whole signal-processing package); these are the same definitions (SciPy's
# ``_local_maxima_1d``, ``_peak_prominences``, ``_peak_widths``), step for step, on the few
# hundred stations of a column profile. tests/test_speed_peaks.py checks them against SciPy.
def _window(wlen) -> int:
    """SciPy's ``wlen`` rule: None -> -1 (the whole signal), else rounded up, > 1."""
    if wlen is None:
        return -1
    if not wlen > 1:
        raise ValueError(f"wlen must be larger than 1, was {wlen}")
    return int(np.ceil(wlen)) if isinstance(wlen, float) else int(wlen)


def local_maxima_1d(x) -> np.ndarray:
    """Indices of the local maxima of ``x`` (a flat top counts once, at its middle,
    rounded down; the first and last samples never count), as ``scipy.signal.find_peaks``."""
    x = np.asarray(x, dtype=np.float64).ravel().tolist()
    out = []
    i, i_max = 1, len(x) - 1
    while i < i_max:
        if x[i - 1] < x[i]:
            ahead = i + 1
            while ahead < i_max and x[ahead] == x[i]:
                ahead += 1
            if x[ahead] < x[i]:
                out.append((i + ahead - 1) // 2)
                i = ahead
        i += 1
    return np.asarray(out, dtype=np.intp)


def peak_prominences_1d(x, peaks, wlen=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prominences, left_bases, right_bases) of ``peaks`` in ``x``, as
    ``scipy.signal.peak_prominences`` (``wlen``: the window in samples, None for all)."""
    xs = np.asarray(x, dtype=np.float64).ravel().tolist()
    w = _window(wlen)
    prom, left, right = [], [], []
    for peak in (int(p) for p in np.asarray(peaks).ravel()):
        i_min, i_max = 0, len(xs) - 1
        if not i_min <= peak <= i_max:
            raise ValueError(f"peak {peak} is not a valid index for x")
        if w >= 2:
            i_min, i_max = max(peak - w // 2, i_min), min(peak + w // 2, i_max)
        top = xs[peak]
        i = lb = peak
        left_min = top
        while i_min <= i and xs[i] <= top:
            if xs[i] < left_min:
                left_min, lb = xs[i], i
            i -= 1
        i = rb = peak
        right_min = top
        while i <= i_max and xs[i] <= top:
            if xs[i] < right_min:
                right_min, rb = xs[i], i
            i += 1
        prom.append(top - max(left_min, right_min))
        left.append(lb)
        right.append(rb)
    return (np.asarray(prom, dtype=np.float64), np.asarray(left, dtype=np.intp),
            np.asarray(right, dtype=np.intp))


def find_prominent_peaks(x, prominence: float, wlen=None) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``x`` at least ``prominence`` prominent (``wlen`` as in
    :func:`peak_prominences_1d`): ``scipy.signal.find_peaks(x, prominence=prominence,
    wlen=wlen)``'s peaks and ``"prominences"``."""
    peaks = local_maxima_1d(x)
    prom, _, _ = peak_prominences_1d(x, peaks, wlen)
    keep = prominence <= prom
    return peaks[keep], prom[keep]


def peak_widths_1d(x, peaks, rel_height: float = 0.5, wlen=None):
    """(widths, width_heights, left_ips, right_ips) of ``peaks`` at ``rel_height`` of their
    prominence, with linear interpolation between samples, as ``scipy.signal.peak_widths``."""
    xs = np.asarray(x, dtype=np.float64).ravel().tolist()
    prom, left, right = peak_prominences_1d(x, peaks, wlen)
    widths, heights, lips, rips = [], [], [], []
    for peak, pr, i_min, i_max in zip((int(p) for p in np.asarray(peaks).ravel()), prom.tolist(),
                                      left.tolist(), right.tolist()):
        height = xs[peak] - pr * rel_height
        i = peak
        while i_min < i and height < xs[i]:
            i -= 1
        left_ip = float(i)
        if xs[i] < height:
            left_ip += (height - xs[i]) / (xs[i + 1] - xs[i])
        i = peak
        while i < i_max and height < xs[i]:
            i += 1
        right_ip = float(i)
        if xs[i] < height:
            right_ip -= (height - xs[i]) / (xs[i - 1] - xs[i])
        widths.append(right_ip - left_ip)
        heights.append(height)
        lips.append(left_ip)
        rips.append(right_ip)
    return tuple(np.asarray(a, dtype=np.float64) for a in (widths, heights, lips, rips))


def _normalised_peaks(signal, valid, prominence, wlen):
    """Peaks of ``signal`` (valid stations only) with their prominences."""
    peaks, prominences = find_prominent_peaks(signal, prominence, wlen)
    return [(int(p), float(pr)) for p, pr in zip(peaks, prominences) if valid[p]]


def cage_run_middle(cage_fraction: np.ndarray, peak: int, reach: int) -> float:
    """The middle of the run of cage-wide metal whose top lies within ``reach`` stations of
    ``peak``: half-way between the stations (interpolated) where it falls below half its top.

    Why not the peak itself: a cage fills its disc's centre evenly from one endplate to the
    other, so its metal fraction is a plateau, and the plateau's top is wherever blooming from
    a screw or a rod lifts it by a few per cent. With two titanium cages sunk into both
    bodies (seed 148 at 0.8x0.8x1.5 mm) the top sat on the upper endplate, 6 mm above the disc
    centre, and the body below was then fitted with its superior endplate 11 mm high.
    """
    x = np.asarray(cage_fraction, dtype=float)
    lo = max(peak - reach, 0)
    top = lo + int(np.argmax(x[lo: peak + reach + 1]))
    half = 0.5 * x[top]
    i = top
    while i > 0 and x[i - 1] >= half:
        i -= 1
    left = i - (x[i] - half) / (x[i] - x[i - 1]) if i > 0 else float(i)
    j = top
    while j < len(x) - 1 and x[j + 1] >= half:
        j += 1
    right = j + (x[j] - half) / (x[j] - x[j + 1]) if j < len(x) - 1 else float(j)
    return 0.5 * (left + right)


def find_disc_stations(prof: dict, spacing_mm: float = 1.0, min_contrast_hu: float = 20.0) -> list[int]:
    """Indices of disc centres along the column profile (see :func:`column_profile`).

    Four kinds of evidence, each scored about 1 for a clear disc, are summed where they
    coincide (within 6 mm); the dips are weighted by how bright the endplates on both
    sides within 10 mm are (see ``flanks``):

    * a dip of the low-quantile HU below the endplates on both sides within 10 mm (disc
      tissue; scored by its depth over the body-to-disc contrast);
    * a pair of bright thin peaks of the 75th percentile 5 to 16 mm apart (the two cortical
      endplates bounding a disc, still there when bone bridges it or a PEEK cage fills it),
      with mostly non-trabecular tissue between them (median central fraction at least
      ``PAIR_MIN_NON_TRABECULAR``: bright streaks or texture inside a body pair up too);
    * a run of stations where at least 70 % of the central +-5 mm is far from the body level
      (disc, PEEK, bridging bone; scored by its prominence, 0.5 at least);
    * metal filling the centre of the cross-section, cage-wide (a titanium cage; scored 2,
      placed at the middle of the cage's metal run, :func:`cage_run_middle`; a screw
      breached across the midline is narrower, see :func:`central_cage_metal_fraction`).

    A dark metal streak through a body makes a dip but has no endplate pair beside it;
    :func:`select_periodic` then keeps the best-scoring set of candidates at least
    ``MIN_DISC_SPACING_MM`` apart. Inside the column a false candidate competes with the
    real discs on either side and loses; at an end of the column nothing competes with it,
    so a candidate with less than ``MIN_END_BODY_MM`` of bone beyond it before the column
    ends inside the scan (:func:`column_ends`) is not a disc: there is no body beyond it.
    Nor is any candidate with less than ``MIN_DISC_EVIDENCE`` in all. Between two real discs
    such a candidate loses anyway; where the scan cuts the column (an open end) nothing
    competes with it (seed 242 at 0.5x0.5x1.0 mm and 40 HU: a dip scoring 0.01 inside L3,
    6 mm under its top, was kept as the disc above it).
    """
    valid = prof["valid"]
    sig = 1.0 / spacing_mm
    low = ndimage.gaussian_filter1d(np.where(valid, prof["low_hu"], np.nan_to_num(prof["low_hu"])), 1.5 * sig)
    qv = low[valid]
    if qv.size < 10:
        return []
    # the body level: the upper quartile of the stations that are not metal (a cage fills
    # its disc's whole cross-section; with three cages more than a quarter of the column
    # is metal, and its upper quartile read 413 HU for 230 HU bodies)
    qb = qv[qv < ENDPLATE_MAX_HU]
    body = np.percentile(qb if qb.size >= 10 else qv, 75)
    disc = np.percentile(qv[qv > 0], 10) if np.any(qv > 0) else 0.0
    contrast = max(min_contrast_hu / 0.3, body - disc)
    high = ndimage.gaussian_filter1d(prof["high_hu"], 0.5 * sig)
    hv = high[valid]
    level = float(np.median(hv))
    spread = max(float(np.percentile(hv, 95)) - level, min_contrast_hu)
    n = len(high)
    reach = int(round(10 * sig))

    def flanks(p):
        """How bright the brightest endplate-like point is on the weaker side of ``p``."""
        a = high[max(p - reach, 0): max(p - 1, 0)]
        b = high[min(p + 2, n): min(p + reach + 1, n)]
        if a.size == 0 or b.size == 0:
            return 0.0
        return float(np.clip((min(a.max(), b.max()) - level) / spread, 0.0, 1.0))

    cand: list[tuple[int, float]] = []
    # dips (disc tissue) and non-trabecular runs (disc, PEEK, bridging bone) count only with
    # bright flanks: a dark streak or a lucent halo at screw level inside a body has none
    for p, pr in _normalised_peaks(-low, valid, 0.3 * contrast, int(round(20 * sig)) + 1):
        cand.append((p, min(pr / contrast, 1.5) * flanks(p)))
    # the centre of a disc is not trabecular (disc, cage, bridging bone) across most of
    # it; at screw level inside a body the centre stays trabecular (at most about half of
    # it is crossed by streaks)
    nt = ndimage.gaussian_filter1d(prof["central_non_trabecular"], sig)
    for p, pr in _normalised_peaks(nt, valid, 0.5, int(round(30 * sig)) + 1):
        if nt[p] >= 0.7:
            # the middle of the run (its half-height width), not wherever its top happens
            _, _, left, right = peak_widths_1d(nt, [p], rel_height=0.5, wlen=int(round(30 * sig)) + 1)
            cand.append((int(round(0.5 * (left[0] + right[0]))), min(pr, 1.0)))
    # two endplates bound disc, cage or bridging bone, none of it trabecular: bright streaks
    # or texture at screw level inside a body pair up too, with trabecular bone between
    hp = _normalised_peaks(high, valid, 0.3 * spread, int(round(10 * sig)) + 1)
    for (a, pa), (b, pb) in zip(hp[:-1], hp[1:]):
        if (5.0 <= (b - a) * spacing_mm <= 16.0
                and np.median(nt[a + 1:b]) >= PAIR_MIN_NON_TRABECULAR):
            cand.append(((a + b) // 2, min(min(pa, pb) / spread, 1.5)))
    mf = ndimage.gaussian_filter1d(prof["central_metal_fraction"], sig)
    # a cage: where the centre's metal peaks and is cage-wide there (a screw across the
    # midline is not); the disc is the middle of that cage-wide run (cage_run_middle)
    cage = ndimage.gaussian_filter1d(prof.get("central_cage_metal_fraction", prof["central_metal_fraction"]), sig)
    near = int(round(3 * sig))
    for p, _ in _normalised_peaks(mf, valid, 0.3, None):
        if mf[p] >= 0.3 and cage[max(p - near, 0): p + near + 1].max() >= 0.3:
            cand.append((int(round(cage_run_middle(cage, p, near))), 2.0))
    _log.debug("disc evidence %s", [(p, round(sc, 2)) for p, sc in sorted(cand)])
    # merge evidence within 6 mm (one disc; bodies are far taller); a dip with no bright
    # flank scores 0 and is no evidence (two such in a row divided by zero: seed 91 at
    # 0.8x0.8x1.5 mm and 40 HU stopped the analysis)
    cand = sorted((p, sc) for p, sc in cand if sc > 0)
    merged: list[list[float]] = []
    for p, sc in cand:
        if merged and (p - merged[-1][0]) * spacing_mm <= 6.0:
            w0, s0 = merged[-1][2], merged[-1][1]
            merged[-1] = [(merged[-1][0] * w0 + p * sc) / (w0 + sc), s0 + sc, w0 + sc]
        else:
            merged.append([p, sc, sc])
    pos = [int(round(m[0])) for m in merged]
    scores = [m[1] for m in merged]
    lo_end, hi_end = column_ends(low, valid, body)
    keep = [k for k, p in enumerate(pos)
            if (p - lo_end) * spacing_mm >= MIN_END_BODY_MM and (hi_end - p) * spacing_mm >= MIN_END_BODY_MM
            and scores[k] >= MIN_DISC_EVIDENCE]
    if len(keep) < len(pos):
        _log.debug("disc candidates with no body beyond them or too little evidence dropped: %s",
                   [pos[k] for k in range(len(pos)) if k not in keep])
    return select_periodic([pos[k] for k in keep], [scores[k] for k in keep], MIN_DISC_SPACING_MM / spacing_mm)


def column_ends(low_hu: np.ndarray, valid: np.ndarray, body_hu: float, soft_tissue_hu: float = SOFT_TISSUE_HU,
                edge_margin: int = 3) -> tuple[float, float]:
    """Stations where the bony column ends inside the volume (first, last), else +-inf.

    Bone (or disc) is where the low-quantile profile is above half-way from soft tissue to
    the body level (the 75th percentile of the profile: the discs are few). When
    soft tissue follows it for more than ``edge_margin`` valid stations before the volume
    ends, the column itself ends there (no vertebra beyond it in the scan); when bone
    reaches the edge of the volume (a vertebra cut by the scan), the end is open (+-inf).
    """
    bone = valid & (low_hu >= 0.5 * (body_hu + soft_tissue_hu))
    idx = np.flatnonzero(bone)
    vidx = np.flatnonzero(valid)
    if idx.size == 0:
        return -np.inf, np.inf
    first = float(idx[0]) if idx[0] - vidx[0] > edge_margin else -np.inf
    last = float(idx[-1]) if vidx[-1] - idx[-1] > edge_margin else np.inf
    return first, last


def select_periodic(positions, scores, min_gap) -> list[int]:
    """The subset of candidate positions, pairwise at least ``min_gap`` apart when
    consecutive, with the largest total score (a dip inside a body is too close to the
    discs on either side to be taken with them, and scores less than they do)."""
    n = len(positions)
    if n == 0:
        return []
    best = np.array(scores, float)
    prev = -np.ones(n, int)
    for j in range(n):
        for i in range(j):
            if positions[j] - positions[i] >= min_gap and best[i] + scores[j] > best[j]:
                best[j] = best[i] + scores[j]
                prev[j] = i
    j = int(np.argmax(best))
    out = []
    while j >= 0:
        out.append(positions[j])
        j = prev[j]
    return sorted(out)


# -------------------------------------------------------------------------- body fitting
def _orthonormal_frame(axis_si) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(superior, left, posterior) unit vectors with ``left`` closest to LPS +x."""
    si = np.asarray(axis_si, float)
    si = si / np.linalg.norm(si)
    lr = np.array([1.0, 0.0, 0.0]) - si[0] * si
    lr /= np.linalg.norm(lr)
    ap = np.cross(si, lr)
    return si, lr, ap


def first_drop_mm(profile: np.ndarray, step_mm: float, threshold: float, start: int = 0,
                  hold_mm: float = 2.0) -> float | None:
    """Distance (mm, sub-sample) where ``profile`` first falls below ``threshold`` from
    ``start`` onward and stays below for ``hold_mm``; None if it never does."""
    hold = max(1, int(round(hold_mm / step_mm)))
    below = profile < threshold
    for i in range(max(start, 1), len(profile) - hold + 1):
        if below[i:i + hold].all() and not below[i - 1]:
            a, b = profile[i - 1], profile[i]
            frac = (a - threshold) / (a - b) if a != b else 0.0
            return (i - 1 + frac) * step_mm
    return None


def body_outline(volume: Volume, centre, si, lr, ap, inside_hu: float, heights_mm=(-5.0, 5.0),
                 outside_hu: float = 40.0, max_radius_mm: float = 45.0, step_mm: float = 0.25):
    """Outline of the body: semi-axes (LR, AP) and the centre correction in its plane.

    Along rays from the axis (+-LR, +-AP, each at small angles) the edge is where HU first
    falls half-way from the body's inside level to soft tissue and stays there for 5 mm
    (a dark metal streak across the body is narrower); the
    posterior ray stops at the spinal canal, not the lamina. Rays are cast at
    ``heights_mm`` along ``si`` (away from mid-height, where screws and their streaks sit).
    Left and right take their smallest per-height median (the sacral alae or a transverse
    process widen some heights only); anterior and posterior the median over heights (at
    the far heights of a tilted body those rays leave through an endplate).
    """
    r = np.arange(0.0, max_radius_mm, step_mm)
    thr = 0.5 * (inside_hu + outside_hu)
    dists = {}
    for name, d0, d90 in (("P", ap, lr), ("A", -ap, lr), ("L", lr, ap), ("R", -lr, ap)):
        if name == "L" and np.isfinite(dists["P"]) and np.isfinite(dists["A"]):
            centre = centre + 0.5 * (dists["P"] - dists["A"]) * ap  # LR rays through the middle
        per_h = []
        for h in heights_mm:
            vals = []
            for ang in (-0.2, 0.0, 0.2):
                d = np.cos(ang) * d0 + np.sin(ang) * d90
                prof = sample_lps(volume, centre + h * si + r[:, None] * d)
                e = first_drop_mm(prof, step_mm, thr, start=int(4.0 / step_mm), hold_mm=5.0)
                if e is not None:
                    vals.append(e * np.cos(ang))
            if len(vals) >= 2:
                per_h.append(float(np.median(vals)))
        if not per_h:
            dists[name] = np.nan
        elif name in "LR":  # sacral alae or a transverse process widen some heights only
            dists[name] = min(per_h)
        else:  # AP rays at the far heights of a tilted body leave through an endplate
            dists[name] = float(np.median(per_h))
    semi_ap = 0.5 * (dists["P"] + dists["A"])
    semi_lr = 0.5 * (dists["L"] + dists["R"])
    shift_ap = 0.5 * (dists["P"] - dists["A"]) if np.isfinite(semi_ap) else 0.0
    shift_lr = 0.5 * (dists["L"] - dists["R"]) if np.isfinite(semi_lr) else 0.0
    shift = shift_lr * lr + shift_ap * ap
    return semi_lr, semi_ap, shift


def cortex_surface_level(blur_sigma_mm: float, cortex_mm: float = ENDPLATE_CORTEX_MM) -> float:
    """Fraction of the way from the surround up to a blurred cortical layer's peak at which
    the profile crosses the layer's outer surface.

    A cortical endplate is a thin bright layer (about 1 mm); blurred by the scanner's
    point-spread function (Gaussian ``blur_sigma_mm`` along the ray) its peak drops and
    its flanks spread, so the half-way crossing between peak and disc lies *outside* the
    true surface (0.2-0.5 mm at 1-1.5 mm slices, reading disc heights low). For a layer
    of thickness ``T`` the peak excess is ``2 Phi(T / 2 sigma) - 1`` and the excess at the
    outer surface ``Phi(T / sigma) - 1/2`` (in units of the layer's contrast); their
    ratio is the level returned (1/2 for a sharp or thick layer). Validated on phantoms
    up to 1.5 mm slices; beyond ``MAX_MODEL_SIGMA_MM`` (e.g. 3 mm slices, where the layer
    is no longer resolved and the peak itself moves) the half-way level is kept.
    """
    from scipy.special import ndtr
    if blur_sigma_mm <= 1e-6 or blur_sigma_mm > MAX_MODEL_SIGMA_MM:
        return 0.5
    peak = 2.0 * ndtr(0.5 * cortex_mm / blur_sigma_mm) - 1.0
    surface = ndtr(cortex_mm / blur_sigma_mm) - 0.5
    return float(np.clip(surface / peak, 0.5, MAX_SURFACE_LEVEL))


def ray_blur_sigma_mm(volume: Volume, direction) -> float:
    """Gaussian blur (mm) an edge crossed along ``direction`` shows: the slice sensitivity
    / PSF (FWHM about one voxel extent along the ray, sigma = 0.42 x extent) and the
    box of the voxel's own sampling (extent / sqrt(12)) added in quadrature."""
    d = np.asarray(direction, float)
    ext = float(np.linalg.norm((d @ volume.direction) * volume.spacing_mm))
    return ext * float(np.sqrt(0.42 ** 2 + 1.0 / 12.0))


def endplate_edge_mm(prof: np.ndarray, step_mm: float, disc_mm: float, window_mm: float = 9.0,
                     min_contrast_hu: float = 15.0, surface_level: float = 0.5) -> float | None:
    """Distance along one ray (mm) of the outer surface of an endplate.

    ``prof`` runs from inside the body outward, past the disc expected at ``disc_mm``.
    The cortical endplate is the brightest point from ``window_mm`` before the disc centre
    to 1 mm past it; the surround is the darkest 1 mm within 4 mm beyond it (disc tissue,
    or bone where the level is bridged); the surface is the crossing at ``surface_level``
    of the way from the surround to the peak (:func:`cortex_surface_level`; 1/2 for a
    sharp image). Where no cortex stands out (thin endplates at coarse slices), the disc is the
    darkest 2 mm stretch near ``disc_mm`` and the surface the last half-way crossing
    between the body's inside level and the disc before it. None when neither is found.
    """
    n = len(prof)
    # a screw crossing the ray near mid-height: start past its metal and blooming
    metal = np.nonzero(prof >= ENDPLATE_MAX_HU)[0]
    start = 0 if metal.size == 0 else int(metal[-1]) + int(2.0 / step_mm)
    lo_i = max(int((disc_mm - window_mm) / step_mm), start + int(3.0 / step_mm))
    hi_i = min(int((disc_mm + 0.5 * window_mm) / step_mm) + 1, n)
    in_i = max(int((disc_mm - window_mm - 4.0) / step_mm), int(3.0 / step_mm),
               lo_i - int(4.0 / step_mm), start + int(2.0 / step_mm))
    if hi_i - lo_i < int(4.0 / step_mm) or in_i >= n:
        return None
    body = prof[start:in_i]
    if body.size < 4:
        return None
    inside = float(np.median(body))
    smooth = ndimage.uniform_filter1d(prof, max(1, int(1.0 / step_mm)))
    # 1. a cortical endplate standing out of both the body and what lies beyond it
    pk_hi = min(int((disc_mm + 1.0) / step_mm), hi_i)
    i_pk = None
    if pk_hi - lo_i >= 3:
        seg = smooth[lo_i:pk_hi]
        # a true peak inside the window (not the rising flank of the next body's endplate)
        interior = np.nonzero((seg[1:-1] >= seg[:-2]) & (seg[1:-1] > seg[2:]))[0] + 1
        if interior.size:
            i_pk = lo_i + int(interior[np.argmax(seg[interior])])
    if i_pk is not None:
        k = min(i_pk + int(4.0 / step_mm), n - 1)
        if k > i_pk + 1:
            surround = float(smooth[i_pk:k + 1].min())
            peak = float(prof[i_pk])
            if peak >= inside + 2 * min_contrast_hu and peak >= surround + 2 * min_contrast_hu:
                thr = surround + surface_level * (peak - surround)
                below = np.nonzero(prof[i_pk:k + 1] < thr)[0]
                if below.size:
                    j = i_pk + int(below[0]) - 1
                    a, b = prof[j], prof[j + 1]
                    return (j + (a - thr) / (a - b)) * step_mm if a != b else j * step_mm
    # 2. no cortex seen: the dip of the disc
    lowest = ndimage.uniform_filter1d(prof, max(1, int(2.0 / step_mm)))
    i_min = lo_i + int(np.argmin(lowest[lo_i:hi_i]))
    disc_hu = lowest[i_min]
    if not disc_hu < inside - min_contrast_hu:
        return None
    thr = 0.5 * (inside + disc_hu)
    j0 = max(1, start, lo_i - int(3.0 / step_mm), i_min - int(9.0 / step_mm))
    above = np.nonzero(prof[j0: i_min + 1] >= thr)[0]
    if above.size == 0:
        return None
    j = j0 + int(above[-1])
    if j + 1 >= n:
        return None
    a, b = prof[j], prof[j + 1]
    return (j + (a - thr) / (a - b)) * step_mm if a != b else j * step_mm


def endplate_points(volume: Volume, centre, si, lr, ap, semi_lr, semi_ap, direction: int,
                    disc_mm: float, metal_threshold_hu: float, step_mm: float = 0.25,
                    window_mm: float = 9.0):
    """Points on the outer surface of one endplate (``direction`` +1 superior, -1 inferior).

    Rays parallel to the body axis from a grid inside 85 % of the outline, each the mean of
    a bundle of 5 rays 1.5 mm apart, are read by :func:`endplate_edge_mm`. Rays that meet
    metal near the endplate (a cage, whose own surface is not the endplate) are left out
    of their bundle's mean, and a bundle whose axis or most rays meet it is skipped, so
    the plane comes from the intact endplate beside a cage; rays are cut where they leave
    the volume.
    """
    pts_out = []
    level = cortex_surface_level(ray_blur_sigma_mm(volume, si))
    disc_mm = float(disc_mm)
    s = np.arange(0.0, disc_mm + window_mm + 2.0, step_mm)
    near = max(int((disc_mm - window_mm - 3.0) / step_mm), 0)  # screws sit nearer mid-height
    bundle = np.array([[0, 0], [1.5, 0], [-1.5, 0], [0, 1.5], [0, -1.5]])
    offs = bundle[:, :1] * lr + bundle[:, 1:] * ap
    bases = [centre + fu * semi_lr * lr + fw * semi_ap * ap
             for fu in np.linspace(-0.85, 0.85, 9) for fw in np.linspace(-0.85, 0.85, 9)
             if fu**2 + fw**2 <= 0.85**2 + 1e-9]
    if not bases:
        return np.zeros((0, 3))
    bases = np.array(bases)
    lines = bases[:, None, :] + direction * s[None, :, None] * np.asarray(si, float)
    # all rays of all bundles in one sampling call: (ray, bundle member, station)
    members = sample_lps(volume, lines[:, None, :, :] + offs[None, :, None, :], cval_hu=np.nan)
    metal_hu = min(metal_threshold_hu, ENDPLATE_MAX_HU)
    for base, rays in zip(bases, members):
        ok = np.isfinite(rays).all(0)
        if not ok[0]:
            continue
        if not ok.all():
            rays = rays[:, : int(np.argmin(ok))]  # the ray leaves the volume here
        # a ray of the bundle meeting metal or its blooming near the endplate (a cage) is
        # left out of the bundle's mean (which would dilute its titanium into a
        # cortex-bright plateau); the bundle is skipped when its own axis or more than two
        # of its rays meet metal
        clean = ~(rays[:, near:] >= metal_hu).any(1) if rays.shape[1] > near else np.ones(len(rays), bool)
        if not clean[0] or clean.sum() < 3:
            continue
        prof = rays[clean].mean(0)
        e = endplate_edge_mm(prof, step_mm, disc_mm, window_mm, surface_level=level)
        if e is None or e > (len(prof) - 1) * step_mm - 1.0:
            continue
        pts_out.append(base + direction * e * si)
    return np.array(pts_out).reshape(-1, 3)


def fit_plane(points: np.ndarray, outward, max_residual_mm: float = 1.5, min_cos: float = 0.8,
              trials: int = 400, iterations: int = 3, lr=None, max_lr_tilt: float = 0.25):
    """Plane through points, robust to outliers (RANSAC); its normal points along ``outward``.

    Planes through random triples (seeded, so results repeat) whose normal is within
    acos(``min_cos``) of ``outward`` vote with the points within ``max_residual_mm``; the
    best is refitted by SVD to its inliers. Rays that caught a screw, a streak or the next
    endplate form smaller, off-plane clusters. With ``lr`` (the body's left axis) a normal
    may lean sideways by at most ``max_lr_tilt`` (sine): endplates tilt mostly in the
    sagittal plane, and a plane seen on one side only is otherwise free to roll.
    Returns (point, unit normal, inlier count).
    """
    pts = np.asarray(points, float)
    out = np.asarray(outward, float) / np.linalg.norm(outward)
    m = len(pts)
    if m < 3:
        return (pts.mean(0) if m else np.zeros(3)), out, 0
    rng = np.random.default_rng(12345)
    tri = np.array([rng.choice(m, 3, replace=False) for _ in range(trials)])
    a, b, c = pts[tri[:, 0]], pts[tri[:, 1]], pts[tri[:, 2]]
    nrm = np.cross(b - a, c - a)
    ln = np.linalg.norm(nrm, axis=1)
    ok = ln > 1e-6
    nrm[ok] /= ln[ok, None]
    nrm *= np.sign(nrm @ out)[:, None]
    ok &= (nrm @ out) >= min_cos
    if lr is not None:
        ok &= np.abs(nrm @ np.asarray(lr, float)) <= max_lr_tilt
    if not ok.any():
        nrm = np.broadcast_to(out, nrm.shape).copy()
        ok[:] = True
    res = np.abs(np.einsum("tk,pk->tp", nrm, pts) - np.einsum("tk,tk->t", nrm, a)[:, None])
    votes = np.where(ok, (res <= max_residual_mm).sum(1), -1)
    best = int(np.argmax(votes))
    keep = res[best] <= max_residual_mm
    n, c0 = nrm[best], a[best]
    for _ in range(iterations):
        if keep.sum() < 3:
            break
        c0 = pts[keep].mean(0)
        _, _, vt = np.linalg.svd(pts[keep] - c0)
        n_new = vt[2] if vt[2] @ out >= 0 else -vt[2]
        if n_new @ out < min_cos or (lr is not None and abs(n_new @ np.asarray(lr, float)) > max_lr_tilt):
            break
        n = n_new
        keep = np.abs((pts - c0) @ n) <= max_residual_mm
    return c0, n, int(keep.sum())


def plane_spans(points: np.ndarray, centre, normal, lr, ap, max_residual_mm: float):
    """How far (mm) the inliers of a fitted plane reach on both sides of the body axis:
    twice the smaller of the two one-sided reaches, along LR and along AP."""
    pts = np.asarray(points, float)
    keep = np.abs((pts - np.asarray(centre)) @ np.asarray(normal)) <= max_residual_mm
    if keep.sum() < 2:
        return 0.0, 0.0
    rel = pts[keep] - np.asarray(centre)
    u, w = rel @ lr, rel @ ap
    return (2.0 * float(min(-u.min(), u.max(), key=float)) if u.size else 0.0,
            2.0 * float(min(-w.min(), w.max(), key=float)) if w.size else 0.0)


def borrow_tilt(normal, other_normal, lr, ap, fix_lr: bool, fix_ap: bool) -> np.ndarray:
    """Replace the LR and/or AP tilt of ``normal`` by the mirrored tilt of the opposite
    endplate's ``other_normal`` (used when an endplate was seen on one side only, e.g.
    beside a cage; endplates of one body are near parallel in the unseen direction)."""
    n = np.asarray(normal, float).copy()
    o = -np.asarray(other_normal, float)
    if fix_lr:
        n = n + ((o - n) @ lr) * lr
    if fix_ap:
        n = n + ((o - n) @ ap) * ap
    return n / np.linalg.norm(n)


def lateral_bone_fraction(volume: Volume, centre, si, lr, ap, semi_lr_mm: float, semi_ap_mm: float,
                          bone_threshold_hu: float, reach_mm: float = 40.0) -> float:
    """Fraction of bone-density samples beside the body, the smaller of the two sides.

    The zones run from 1.15 outline semi-axes (at least 28 mm: where the sacral alae meet
    the body the outline itself is lost) to ``reach_mm`` further out along the body's LR
    axis, over +-8 mm of height and the body's own depth (AP). Beside a lumbar body they
    hold psoas and fat (transverse processes sit behind the body); beside S1 they hold the
    sacral alae and the sacro-iliac joints (see ``SACRUM_LATERAL_BONE``).
    """
    start = max(28.0, 1.15 * min(semi_lr_mm, 26.0))  # a lumbar body is at most ~27 mm wide per side
    u = np.arange(start, start + reach_mm, 2.0)
    h = np.arange(-8.0, 8.01, 2.0)
    w = np.arange(-0.3 * semi_ap_mm, semi_ap_mm + 0.01, 2.0)  # the alae sit back
    uu, hh, ww = np.meshgrid(u, h, w, indexing="ij")
    fr = []
    for side in (1.0, -1.0):
        pts = centre + side * uu[..., None] * lr + hh[..., None] * si + ww[..., None] * ap
        fr.append(float(np.mean(sample_lps(volume, pts) > bone_threshold_hu)))
    return min(fr)


def endplate_across_disc(volume: Volume, point, normal, semi_mm, tol_mm: float,
                         metal_threshold_hu: float, reach_mm: float = 22.0):
    """The endplate facing a known one across a disc (e.g. S1's superior from L5's inferior).

    Rays leave the known endplate (``point``, outward ``normal``, outline ``semi_mm``) along
    its normal from a grid inside 90 % of its outline (bundles of 5, 1.5 mm apart); on each,
    the disc level is the darkest point within 4 mm past the known endplate's own cortex and
    the facing surface the half-way crossing from it up to the first cortex rising well
    out of it (disc tissue, bridging bone and PEEK are all darker than cortex). Rays meeting metal or its blooming
    (a cage) are skipped. Returns the robust plane (point, normal pointing back towards the
    known endplate) or None.
    """
    n = np.asarray(normal, float)
    _, lr, ap = _orthonormal_frame(-n)
    step = 0.25
    s = np.arange(0.0, reach_mm, step)
    bundle = np.array([[0, 0], [1.5, 0], [-1.5, 0], [0, 1.5], [0, -1.5]])
    offs = bundle[:, :1] * lr + bundle[:, 1:] * ap
    i1 = int(1.0 / step)
    pts = []
    for fu in np.linspace(-0.9, 0.9, 13):
        for fw in np.linspace(-0.9, 0.9, 13):
            if fu**2 + fw**2 > 0.9**2 + 1e-9:
                continue
            base = np.asarray(point) + fu * semi_mm[0] * lr + fw * semi_mm[1] * ap
            line = base + s[:, None] * n
            prof = sample_lps(volume, line[None] + offs[:, None], cval_hu=np.nan).mean(0)
            if not np.all(np.isfinite(prof)) or prof.max() >= min(metal_threshold_hu, ENDPLATE_MAX_HU):
                continue
            smooth = ndimage.uniform_filter1d(prof, int(1.0 / step))
            # the disc (tissue, bridging bone or a PEEK cage) just past the known endplate's
            # own cortex; then the first cortex rising well out of it
            i4 = min(i1 + int(4.0 / step), len(s) - 1)
            i_min = i1 + int(np.argmin(smooth[i1:i4]))
            level = float(smooth[i_min])
            rise = level + max(40.0, 0.4 * (float(smooth[i_min:].max()) - level))
            above = np.nonzero(smooth[i_min:] >= rise)[0]
            if above.size == 0:
                continue
            pk = i_min + int(above[0])
            while pk + 1 < len(smooth) and smooth[pk + 1] >= smooth[pk]:
                pk += 1
            peak = float(prof[pk])
            if peak < level + 30.0:
                continue
            thr = 0.5 * (level + peak)
            up = np.nonzero(prof[i_min:pk + 1] >= thr)[0]
            if up.size == 0 or i_min + int(up[0]) < 1:
                continue
            j = i_min + int(up[0])
            a, b = prof[j - 1], prof[j]
            e = (j - 1 + (thr - a) / (b - a)) * step if b != a else j * step
            if e >= MIN_DISC_MM:  # a disc is never thinner
                pts.append(base + e * n)
    if len(pts) < 6:
        return None
    pts = np.array(pts)
    c, nrm, k = fit_plane(pts, -n, max_residual_mm=tol_mm, lr=lr)
    if k < 6 or k < 0.4 * len(pts):
        return None
    return c, nrm


def _fit_from_superior(volume: Volume, plane, half_height_mm: float, fallback: dict | None) -> dict:
    """A body (the sacrum) placed under a given superior endplate: axis along its normal,
    centre a half height below it, outline read 3 mm under the endplate."""
    c, n = plane
    si, lr, ap = _orthonormal_frame(n)
    top = np.asarray(c) - 3.0 * si
    inside = float(np.median(sample_lps(volume, top - 6.0 * si + np.random.default_rng(0).normal(0, 3, (300, 3)))))
    semi_lr, semi_ap, shift = body_outline(volume, top, si, lr, ap, inside, heights_mm=(-1.0, 0.0, 1.0))
    if not (np.isfinite(semi_lr) and np.isfinite(semi_ap)):
        semi_lr, semi_ap = fallback["semi"] if fallback is not None else (22.0, 16.0)
        shift = np.zeros(3)
    centre = np.asarray(c) - half_height_mm * si + shift
    return dict(centre=centre, si=si, lr=lr, ap=ap, semi=(semi_lr, semi_ap), superior=(c, n),
                inferior=None, inside_hu=inside, half_height=half_height_mm)


def _axis_hit(plane, body: dict) -> np.ndarray:
    """Where a fitted body's axis (through its centre) meets a plane (point, normal)."""
    return _plane_hit(Plane(*plane), body["centre"], -np.asarray(body["si"]))


def _endplate_facing(volume: Volume, above: dict, tol_mm: float, metal_threshold_hu: float):
    """The endplate facing a fitted body's inferior one across the disc
    (:func:`endplate_across_disc`), as (point, normal) with the point where that body's axis
    meets it; None when it is not seen. The plane's own point is the centroid of whichever
    rays saw the endplate (cages hide most of it), not a point under the body above."""
    plane = endplate_across_disc(volume, *above["inferior"], above["semi"], tol_mm, metal_threshold_hu)
    if plane is None:
        return None
    return _axis_hit(plane, above), np.asarray(plane[1])


def _disc_gap_mm(superior, above: dict) -> float:
    """How far a body's superior endplate (point, normal) lies below the inferior endplate of
    the body above, along that body's axis through its centre."""
    return float((_axis_hit(above["inferior"], above) - _axis_hit(superior, above)) @ np.asarray(above["si"]))


def _superior_below_disc(volume: Volume, fit: dict, rough: dict, above: dict, tol_mm: float,
                         metal_threshold_hu: float) -> dict:
    """A lumbar body's fit whose superior endplate is missing, or lies less than
    ``MIN_DISC_MM`` plus the plane tolerance (at least 1.5 mm) below the inferior endplate of
    the body above (the same cortex, read twice), mended: first from across the disc
    (:func:`_superior_across_disc`, when the body above has both endplates), else by fitting
    the body again with the disc centre put half a typical disc (``TYPICAL_DISC_MM``) below
    the body above, so its rays stop short of that body's endplate. A refit is kept only with
    both endplates and a disc of at least that gap; otherwise ``fit`` is returned unchanged.

    Why the refit: the disc stations come from the column's profile, where two titanium
    cages brighten the disc; on seed 148 at 0.8x0.8x1.5 mm the L3-L4 station sat on L3's
    inferior endplate, L4's rays looked for their endplate around it and took L3's (11 mm
    high), while L3 itself, 4.6 mm inside the top of the scan, had no superior endplate to
    read across the disc from. That station is now the middle of the cage's metal run
    (:func:`cage_run_middle`) and this mend no longer acts on any study of the coarse sweep
    (seeds 0-159 at 10, 25 and 40 HU); it stays as a safety net for a station that lands on
    an endplate anyway (tests/test_detection_endplates_cages.py puts one there).
    """
    if fit["superior"] is not None and _disc_gap_mm(fit["superior"], above) >= MIN_DISC_MM + tol_mm:
        return fit
    if above["superior"] is not None:
        mended = _superior_across_disc(volume, fit, above, tol_mm, metal_threshold_hu)
        if mended is not fit:
            return mended
    disc = _axis_hit(above["inferior"], above) - 0.5 * TYPICAL_DISC_MM * np.asarray(above["si"], float)
    g = fit_body(volume, rough["centre"], rough["axis"], disc, rough["disc_below"], metal_threshold_hu)
    if (g is not None and g["superior"] is not None and g["inferior"] is not None
            and _disc_gap_mm(g["superior"], above) >= MIN_DISC_MM + tol_mm):
        return g
    return fit


def _superior_across_disc(volume: Volume, fit: dict, above: dict, tol_mm: float,
                          metal_threshold_hu: float) -> dict:
    """A lumbar body's fit with its superior endplate as seen across the disc from the body
    above (:func:`endplate_across_disc`), its axis and centre between that plane and its own
    inferior endplate; ``fit`` unchanged when that endplate is not seen or the height leaves
    ``BODY_HEIGHT_RANGE_MM``.

    Used by :func:`_superior_below_disc`. Why: two titanium cages in a disc on 1.5 mm slices
    can hide the lower body's superior endplate from its own rays (their blooming fills the
    disc). On seed 124 at 0.8x0.8x1.5 mm L4 found none and was left out, and the names above
    it were counted one short (L3 named L4, with its screws and cages). The body above sees
    the endplate from the disc side, between the cages. The body above must have both
    endplates: one fitted without its superior endplate (at the top of the scan) can be
    tilted 20 deg, and so is the plane it sees (seed 148).
    """
    sup = _endplate_facing(volume, above, tol_mm, metal_threshold_hu)
    if sup is None:
        return fit
    inf = fit["inferior"]
    si, lr, ap = _orthonormal_frame(sup[1] - np.asarray(inf[1]))
    centre = np.asarray(fit["centre"], float)
    t_s = ((sup[0] - centre) @ sup[1]) / (si @ sup[1])
    t_i = ((np.asarray(inf[0]) - centre) @ np.asarray(inf[1])) / (si @ np.asarray(inf[1]))
    if not (BODY_HEIGHT_RANGE_MM[0] <= t_s - t_i <= BODY_HEIGHT_RANGE_MM[1]):
        return fit
    return {**fit, "superior": sup, "centre": centre + 0.5 * (t_s + t_i) * si, "half_height": 0.5 * (t_s - t_i),
            "si": si, "lr": lr, "ap": ap}


def _lateral_bone_below_top(volume: Volume, fit: dict, bone_threshold_hu: float) -> float:
    """:func:`lateral_bone_fraction` 12 mm under a fitted body's superior endplate, in the
    endplate's own frame (the alae run from just under S1's superior endplate downwards)."""
    sup_c, sup_n = fit["superior"]
    si, lr, ap = _orthonormal_frame(sup_n)
    return lateral_bone_fraction(volume, np.asarray(sup_c) - 12.0 * si, si, lr, ap,
                                 fit["semi"][0], fit["semi"][1], bone_threshold_hu)


def _angle_deg(u, v) -> float:
    """Angle (degrees) between two unit vectors."""
    return float(np.degrees(np.arccos(np.clip(np.asarray(u, float) @ np.asarray(v, float), -1.0, 1.0))))


def _plausible_wedge(planes: dict, fractions: dict, lr, ap) -> dict:
    """A body's two endplate planes, the less supported one tilted like the other when they
    are further from parallel than ``MAX_BODY_WEDGE_DEG``.

    A lumbar body's wedge is a few degrees. Far more means one plane followed rays that
    read something else (beside a cage, its blooming and the next body's endplate across
    the disc: L5's superior endplate 23.8 deg off on a coarse phantom with two titanium
    cages, its inferior one within 1 deg); the plane whose rays agree less with it
    (``fractions``: inliers over rays) then takes the other's tilt (:func:`borrow_tilt`).
    """
    sup, inf = planes["superior"], planes["inferior"]
    if _angle_deg(-np.asarray(sup[1]), inf[1]) <= MAX_BODY_WEDGE_DEG:
        return planes
    worse, better = (("superior", "inferior") if fractions["superior"] < fractions["inferior"]
                     else ("inferior", "superior"))
    c, n = planes[worse]
    return {**planes, worse: (c, borrow_tilt(n, planes[better][1], lr, ap, True, True))}


def fit_body(volume: Volume, centre0, axis0, disc_above_lps, disc_below_lps,
             metal_threshold_hu: float = 2200.0, iterations: int = 3,
             superior_only: bool = False, ignore_metal: bool = False) -> dict | None:
    """Refine one body from a rough centre and axis.

    Each round: the outline in the mid plane (centres the body in LR and AP), then both
    endplate planes (an endplate seen on one side only borrows the other's tilt there, and
    of two endplates further from parallel than ``MAX_BODY_WEDGE_DEG`` the less supported
    takes the other's tilt, :func:`_plausible_wedge`); the new axis bisects the two
    endplate normals and the new centre lies midway between the planes. A round whose
    height leaves ``BODY_HEIGHT_RANGE_MM`` is discarded. Returns a dict with ``centre``,
    ``si``, ``lr``, ``ap``, ``semi`` (LR, AP mm), ``superior`` / ``inferior`` (point,
    outward normal, or None when not found),
    ``disc_above_lps`` / ``disc_below_lps`` are the disc centres seen on the column profile
    (or a typical body height away at an end of the column);
    ``half_height`` and ``inside_hu``; None when no outline is found. With
    ``superior_only`` (the top of the sacrum: nothing below S1's superior endplate is an
    endplate) the axis follows the superior endplate's normal and the centre sits a typical
    half height below it. With ``ignore_metal`` the body's inside level is read without
    the metal around its centre (a screw crossing the middle of the body, e.g. a medial
    breach; used when the plain fit finds no outline).
    """
    centre = np.asarray(centre0, float)
    si, lr, ap = _orthonormal_frame(axis0)
    discs = {1: np.asarray(disc_above_lps, float), -1: np.asarray(disc_below_lps, float)}
    half_h = 0.5 * float((discs[1] - discs[-1]) @ si) - 4.0
    rng = np.random.default_rng(0)
    tol_mm = max(1.5, 0.7 * float(volume.spacing_mm.max()))  # endplates are concave
    best = None
    for _ in range(iterations):
        ball = sample_lps(volume, centre + rng.normal(0.0, 3.0, (300, 3)))
        bone = ball[ball < ENDPLATE_MAX_HU]
        inside = float(np.median(bone if ignore_metal and bone.size >= 60 else ball))
        hs = tuple(f * half_h for f in (-0.8, -0.55, 0.55, 0.8))
        semi_lr, semi_ap, shift = body_outline(volume, centre, si, lr, ap, inside, hs)
        centre = centre + shift
        if not np.isfinite(semi_ap) or semi_ap < 5:
            break
        if not np.isfinite(semi_lr):  # bone runs on sideways (sacral alae): try again
            semi_lr = 1.35 * semi_ap    # from the corrected centre with a typical shape
            if best is None and _ < iterations - 1:
                continue
        planes, spans, fractions = {}, {}, {}
        for name, direction in (("superior", 1),) if superior_only else (("superior", 1), ("inferior", -1)):
            disc_mm = float((discs[direction] - centre) @ (direction * si))
            pts = endplate_points(volume, centre, si, lr, ap, semi_lr, semi_ap, direction, disc_mm,
                                  metal_threshold_hu)
            if len(pts) >= 6:
                c, n, k = fit_plane(pts, direction * si, max_residual_mm=tol_mm, lr=lr,
                                    min_cos=0.9 if superior_only else 0.8)
                if k >= 6 and k >= 0.4 * len(pts) and n @ (direction * si) > 0.7:
                    planes[name] = (c, n)
                    support = k
                    fractions[name] = k / len(pts)
                    spans[name] = plane_spans(pts, c, n, lr, ap, tol_mm)
                    # reaches measured from the body axis, not from the inliers' mean
                    rel_c = centre + ((c - centre) @ si) * si
                    keep_pts = pts[np.abs((pts - c) @ n) <= tol_mm]
                    spans[name] = plane_spans(keep_pts, rel_c, si, lr, ap, 1e9)
        if len(planes) == 2:  # an endplate seen on one side only borrows the other's tilt
            for name, other in (("superior", "inferior"), ("inferior", "superior")):
                s_lr, s_ap = spans[name]
                o_lr, o_ap = spans[other]
                fix_lr = s_lr < 0.8 * semi_lr and o_lr >= 0.8 * semi_lr
                fix_ap = s_ap < 0.6 * semi_ap and o_ap >= 0.6 * semi_ap
                if fix_lr or fix_ap:
                    c, n = planes[name]
                    planes[name] = (c, borrow_tilt(n, planes[other][1], lr, ap, fix_lr, fix_ap))
            planes = _plausible_wedge(planes, fractions, lr, ap)
        sup, inf = planes.get("superior"), planes.get("inferior")
        if superior_only and sup is not None:
            # keep the best-supported round: re-aiming the rays along a poorer plane
            # only drifts further
            if best is not None and support <= best["support"]:
                break
            si, lr, ap = _orthonormal_frame(sup[1])
            t_s = ((sup[0] - centre) @ sup[1]) / (si @ sup[1])
            centre = centre + (t_s - half_h) * si
            best = dict(centre=centre, si=si, lr=lr, ap=ap, semi=(semi_lr, semi_ap),
                        superior=sup, inferior=None, inside_hu=inside, half_height=half_h,
                        support=support)
            continue
        if sup is None or inf is None:
            if best is None:
                if sup is not None:
                    si, lr, ap = _orthonormal_frame(sup[1])
                best = dict(centre=centre, si=si, lr=lr, ap=ap, semi=(semi_lr, semi_ap),
                            superior=sup, inferior=inf, inside_hu=inside, half_height=half_h)
            break
        new_si = sup[1] - inf[1]
        new_si /= np.linalg.norm(new_si)
        # centre: midway between the two planes along the new axis through the centre
        t_s = ((sup[0] - centre) @ sup[1]) / (new_si @ sup[1])
        t_i = ((inf[0] - centre) @ inf[1]) / (new_si @ inf[1])
        if not (BODY_HEIGHT_RANGE_MM[0] <= t_s - t_i <= BODY_HEIGHT_RANGE_MM[1]):
            break
        centre = centre + 0.5 * (t_s + t_i) * new_si
        half_h = 0.5 * (t_s - t_i)
        si, lr, ap = _orthonormal_frame(new_si)
        best = dict(centre=centre, si=si, lr=lr, ap=ap, semi=(semi_lr, semi_ap),
                    superior=sup, inferior=inf, inside_hu=inside, half_height=half_h)
    return best


def _rough_bodies(prof: dict, discs: list[int], curve: np.ndarray) -> tuple[list[dict], list[str]]:
    """Rough body centres between (and beyond) the disc stations, top first."""
    notes = []
    valid = prof["valid"]
    gaps = np.diff(discs) if len(discs) >= 2 else np.array([])
    typical = float(np.median(gaps)) if gaps.size else 38.0
    rough = []
    for a, b in zip(discs[:-1], discs[1:]):
        n_split = max(1, int(round((b - a) / typical))) if (b - a) > 1.6 * typical else 1
        if n_split > 1:
            notes.append("a disc space was not seen between two vertebrae; split by body height")
        for m in range(n_split):
            lo_ = a + (b - a) * m / n_split
            hi_ = a + (b - a) * (m + 1) / n_split
            rough.append(dict(station=0.5 * (lo_ + hi_), half=0.5 * (hi_ - lo_) - 4.0,
                              between_discs=n_split == 1))
    n = len(curve)
    for r in rough:
        i = int(np.clip(round(r["station"]), 0, n - 1))
        r["centre"] = curve[i]
        r["axis"] = prof["tangent"][i]
        half = r["half"] + 4.0  # disc centres above and below (curve index runs downward)
        r["disc_above"] = curve[int(np.clip(round(r["station"] - half), 0, n - 1))]
        r["disc_below"] = curve[int(np.clip(round(r["station"] + half), 0, n - 1))]
    # a body beyond the first / last disc: placed from that disc along the curve's direction
    # there (the curve bends away at the ends of the column, the sacrum above all)
    if discs:
        first_valid = int(np.argmax(valid))
        last_valid = len(valid) - 1 - int(np.argmax(valid[::-1]))
        half = 0.5 * typical
        if discs[0] - first_valid >= 0.55 * typical:
            d = discs[0]
            ax = prof["tangent"][d]
            rough.insert(0, dict(station=d - half, half=half - 4.0, axis=ax,
                                 centre=curve[d] + half * ax, disc_below=curve[d],
                                 disc_above=curve[d] + typical * ax))
        if last_valid - discs[-1] >= 0.45 * typical:
            d = discs[-1]
            ax = prof["tangent"][d]
            rough.append(dict(station=d + half, half=half - 4.0, axis=ax,
                              centre=curve[d] - half * ax, disc_above=curve[d],
                              disc_below=curve[d] - typical * ax))
    return rough, notes


def name_vertebrae(n_bodies: int, sacrum_index: int | None) -> tuple[list[str], bool]:
    """Names top to bottom: counted up from S1 when the sacrum is seen, else V1..Vn."""
    if sacrum_index is None:
        return [f"V{i + 1}" for i in range(n_bodies)], True
    names = []
    for i in range(n_bodies):
        k = sacrum_index - i  # how many above S1
        if k == 0:
            names.append("S1")
        elif k <= len(LUMBAR_NAMES_ABOVE_S1):
            names.append(LUMBAR_NAMES_ABOVE_S1[k - 1])
        else:
            names.append(f"T{8 - (k - len(LUMBAR_NAMES_ABOVE_S1))}")
    return names, False


def find_vertebrae(volume: Volume, config: Config):
    """Vertebral bodies top to bottom, the disc levels between them, and how they are named.

    Returns
    -------
    vertebrae : list[Vertebra], top to bottom.
    levels : list[DiscLevel], top to bottom, one per pair of consecutive bodies.
    named_by_position : bool; True when the sacrum is not in view (names V1..Vn).
    notes : list[str]; plain sentences for the report on anything uncertain.
    """
    if volume.hu.size == 0 or min(volume.hu.shape) < 2:
        raise InputError("volume", "too small to hold a vertebral column")
    notes: list[str] = []
    grid, origin = resample_to_lps_grid(volume)
    labels, depth = column_cores(grid, ANATOMY_STEP_MM)
    comps = _component_table(labels, depth, origin, ANATOMY_STEP_MM)
    trunk = grid > -300.0
    midline = origin[0] + ANATOMY_STEP_MM * float(np.nonzero(trunk)[2].mean()) if trunk.any() else None
    chain = select_column_chain(comps, midline)
    if not chain:
        return [], [], True, ["no vertebral column found in this volume"]
    curve = column_centreline(chain)
    prof = column_profile(volume, curve, config.metal_threshold_hu)
    discs = find_disc_stations(prof)
    if not discs:
        return [], [], True, ["no disc space found along the vertebral column"]
    rough, more = _rough_bodies(prof, discs, curve)
    notes += more

    fitted, fits_by_rough = [], {}
    tol_mm = max(1.5, 0.7 * float(volume.spacing_mm.max()))
    for i_r, r in enumerate(rough):
        f = fit_body(volume, r["centre"], r["axis"], r["disc_above"], r["disc_below"],
                     config.metal_threshold_hu)
        if f is None:  # perhaps a screw across the body's middle lit its inside level
            f = fit_body(volume, r["centre"], r["axis"], r["disc_above"], r["disc_below"],
                         config.metal_threshold_hu, ignore_metal=True)
        if (f is None or f["superior"] is None or f["inferior"] is None) and r.get("between_discs"):
            # the column curve can wander off a body between its discs (its cores follow
            # pedicles and screws there): start again from the middle of the chord joining
            # the two disc centres, along it
            chord = np.asarray(r["disc_above"], float) - np.asarray(r["disc_below"], float)
            mid = 0.5 * (np.asarray(r["disc_above"], float) + np.asarray(r["disc_below"], float))
            for ignore_metal in (False, True):
                g = fit_body(volume, mid, chord, r["disc_above"], r["disc_below"], config.metal_threshold_hu,
                             ignore_metal=ignore_metal)
                if g is not None and g["superior"] is not None and g["inferior"] is not None:
                    f = g
                    break
        above = fits_by_rough.get(i_r - 1)  # kept or not (cut by the volume's edge above)
        if f is not None and f["inferior"] is not None and above is not None and above["inferior"] is not None:
            f = _superior_below_disc(volume, f, r, above, tol_mm, config.metal_threshold_hu)
        if i_r == len(rough) - 1 and discs and r["station"] > discs[-1]:
            # below the last disc: perhaps the sacrum; its fit must not look for an inferior
            # endplate (there is none) nor let one tilt its axis. The column curve bends
            # away into the sacrum, so start from the body above: across the disc, S1's
            # superior endplate faces that body's inferior one.
            axis0, centre0 = r["axis"], r["centre"]
            if fitted and fitted[-1]["inferior"] is not None:
                axis0 = -np.asarray(fitted[-1]["inferior"][1])
                centre0 = np.asarray(r["disc_above"]) - (r["half"] + 4.0) * axis0
            fs = fit_body(volume, centre0, axis0, r["disc_above"], centre0 - (r["half"] + 4.0) * axis0,
                          config.metal_threshold_hu, superior_only=True)
            if fitted and fitted[-1]["inferior"] is not None:
                # S1's superior endplate seen from the disc: the first cortex below the
                # body above (screws and streaks inside S1 never get in the way), its outline
                # read under the point facing that body's axis
                up = fitted[-1]
                plane = _endplate_facing(volume, up, tol_mm, config.metal_threshold_hu)
                facing = -np.asarray(up["inferior"][1])

                def wedge_deg(fit):
                    return _angle_deg(fit["superior"][1], facing)

                if plane is not None:
                    fa = _fit_from_superior(volume, plane, r["half"], fs)
                    # the lumbosacral disc is a wedge of a few degrees: of the two fits keep
                    # the one closer to facing the body above, the one from the disc if both fit
                    if fs is None or fs["superior"] is None or wedge_deg(fa) <= max(MAX_WEDGE_DEG, wedge_deg(fs)):
                        fs = fa
            if fs is not None and fs["superior"] is not None:
                lat = max(_lateral_bone_below_top(volume, g, config.bone_threshold_hu)
                          for g in (fs, f) if g is not None and g["superior"] is not None)
                if lat >= SACRUM_LATERAL_BONE or f is None or f["superior"] is None:
                    f = fs  # the sacrum (or nothing better): its superior-only fit
        if f is not None:
            fits_by_rough[i_r] = f
        if f is None or f["superior"] is None or not _plane_in_volume(volume, *f["superior"], f["semi"]):
            if fitted and f is not None and f["superior"] is None:
                # below a kept body: names count up from the sacrum, so those above shift
                notes.append("a vertebra whose superior endplate could not be found (hidden by hardware?) "
                             "was left out: the vertebrae above it may be named one level too low")
            else:
                notes.append("a vertebra cut by the edge of the volume was left out")
            continue
        if f["inferior"] is not None and not _plane_in_volume(volume, *f["inferior"], f["semi"]):
            f["inferior"] = None
        f["lateral_bone"] = _lateral_bone_below_top(volume, f, config.bone_threshold_hu)
        fitted.append(f)
        _log.debug("body centre %s axis %s semi %s lateral bone %.3f endplates %s/%s",
                   np.round(f["centre"], 1), np.round(f["si"], 2), np.round(f["semi"], 1),
                   f["lateral_bone"], f["superior"] is not None, f["inferior"] is not None)

    sacrum = next((i for i, f in enumerate(fitted) if f["lateral_bone"] >= SACRUM_LATERAL_BONE), None)
    if sacrum is not None:
        fitted = fitted[: sacrum + 1]
        f = fitted[sacrum]
        f["inferior"] = None  # fused below S1: whatever was found there is not an endplate
        f["si"], f["lr"], f["ap"] = _orthonormal_frame(f["superior"][1])
    # a lumbar body needs both endplates; the sacrum only its superior one
    kept = []
    for i, f in enumerate(fitted):
        if f["inferior"] is None and i != sacrum:
            notes.append("a vertebra without a visible inferior endplate was left out")
            continue
        kept.append(f)
    if sacrum is not None:
        sacrum = len(kept) - 1
    names, by_position = name_vertebrae(len(kept), sacrum)
    if by_position:
        notes.append("vertebrae named by position (V1 at the top): sacrum not in view")

    heights = [2 * f["half_height"] for f in kept if f["inferior"] is not None]
    typical_h = float(np.median(heights)) if heights else 26.0
    vertebrae = []
    for i, (f, name) in enumerate(zip(kept, names)):
        sup_c, sup_n = f["superior"]
        semi = f["semi"]
        if f["inferior"] is None:  # the sacrum: S1's lower limit is fused, set by a typical height
            inf_c, inf_n = sup_c - typical_h * f["si"], -f["si"]
            centre = sup_c - 0.5 * typical_h * f["si"]
            # the alae join the body below its top: read the outline just under the endplate
            top = sup_c - 3.0 * f["si"]
            s_lr, s_ap, shift = body_outline(volume, top, f["si"], f["lr"], f["ap"], f["inside_hu"],
                                             heights_mm=(-1.0, 0.0, 1.0))
            if np.isfinite(s_lr) and np.isfinite(s_ap):
                semi = (s_lr, s_ap)
                centre = centre + shift
        else:
            inf_c, inf_n = f["inferior"]
            centre = f["centre"]
        vertebrae.append(Vertebra(
            name=name, center_lps_mm=centre, axis_si=f["si"], axis_lr=f["lr"],
            semi_axes_mm=semi, superior_endplate=Plane(sup_c, sup_n),
            inferior_endplate=Plane(inf_c, inf_n), named_by_position=by_position,
            is_sacrum=(i == sacrum)))
    notes += body_height_notes(vertebrae)
    levels = disc_levels(vertebrae)
    return vertebrae, levels, by_position, list(dict.fromkeys(notes))


def body_height_notes(vertebrae: list[Vertebra]) -> list[str]:
    """A note for each lumbar body (not the sacrum) whose height between its endplates, along
    its axis, is more than ``TALL_BODY_RATIO`` or (against at least two others) less than
    ``SHORT_BODY_RATIO`` times the median height of the other lumbar bodies.

    Why: a body that took the next vertebra's endplate across a disc reads a disc and an
    endplate taller, one that took a streak or a cage for an endplate reads short, and the
    measurements at its levels are then wrong with nothing else to show it. Seed 148 at
    0.8x0.8x1.5 mm, 40 HU: L4 36.9 mm against 26.0 (its superior endplate is L3's inferior,
    11 mm high; :func:`_superior_below_disc` mends it at 10 and 25 HU); seed 47 at 40 HU: L3
    18.1 mm against 25.1-25.2 (its superior endplate 9 mm low). Over seeds 0-159 (0.8x0.8x1.5
    mm, 25 HU), 0-99 (40 HU) and 0-99 (0.5x0.5x1.0 mm, 25 HU) every other body is within
    0.91-1.08 of the others' median. A collapsed (fractured) body is noted too, which it
    should be.
    """
    heights = {v.name: float(np.subtract(v.superior_endplate.point_lps_mm, v.inferior_endplate.point_lps_mm)
                             @ np.asarray(v.axis_si)) for v in vertebrae if not v.is_sacrum}
    notes = []
    for name, h in heights.items():
        others = [x for k, x in heights.items() if k != name]
        if not others:
            continue
        typical = float(np.median(others))
        if h > TALL_BODY_RATIO * typical:
            notes.append(f"{name} reads {h:.0f} mm tall against {typical:.0f} mm for the other vertebrae: one of "
                         "its endplates may be a neighbour's, so its levels' measurements need checking on the images")
        elif len(others) >= 2 and h < SHORT_BODY_RATIO * typical:
            notes.append(f"{name} reads {h:.0f} mm tall against {typical:.0f} mm for the other vertebrae: an "
                         "endplate may be misread (or the body has collapsed), so its levels' measurements need "
                         "checking on the images")
    return notes


def _plane_in_volume(volume: Volume, point, normal, semi_mm=(0.0, 0.0), margin_mm: float = 4.0) -> bool:
    """Whether the volume holds the endplate (its centre and rim at 70 % of the outline)
    and ``margin_mm`` beyond it, i.e. the endplate is not the edge of the scan."""
    ni, nj, nk = volume.shape_ijk
    n = np.asarray(normal, float)
    _, lr, ap = _orthonormal_frame(n)
    c = np.asarray(point, float)
    rim = [c] + [c + 0.7 * su * semi_mm[0] * lr + 0.7 * sw * semi_mm[1] * ap
                 for su, sw in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    pts = np.array([p + margin_mm * n for p in rim])
    ijk = volume.lps_to_ijk(pts)
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.array([ni, nj, nk]) - 0.5))


def _plane_hit(plane: Plane, origin, direction) -> np.ndarray:
    """Where the line ``origin + t * direction`` meets the plane."""
    d = np.asarray(direction, float)
    return origin + plane.line_parameter(origin, d) * d


def disc_levels(vertebrae: list[Vertebra]) -> list[DiscLevel]:
    """A disc level between each pair of consecutive bodies, top to bottom.

    Centre: midway between the upper body's inferior endplate and the lower body's superior
    endplate, on the line joining the two body centres; normal: the mean of the two
    endplates' superior-pointing normals.
    """
    levels = []
    for up, lo_ in zip(vertebrae[:-1], vertebrae[1:]):
        cu, cl = np.asarray(up.center_lps_mm), np.asarray(lo_.center_lps_mm)
        d = cu - cl
        a = _plane_hit(up.inferior_endplate, cl, d)
        b = _plane_hit(lo_.superior_endplate, cl, d)
        normal = np.asarray(lo_.superior_endplate.normal) - np.asarray(up.inferior_endplate.normal)
        levels.append(DiscLevel(name=f"{up.name}-{lo_.name}", upper=up.name, lower=lo_.name,
                                center_lps_mm=0.5 * (a + b), normal=normal))
    return levels
