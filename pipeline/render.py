"""Key images for the report and the review page: oblique CT slices with overlays, as PNG.

Every picture shows where a number was read: the screw's true shaft radius and the halo
measured from it, a cage's fitted endplate planes and its deepest point past them, a level's
bridging map. Slices are resampled with ``scipy.ndimage.map_coordinates`` (trilinear) in
LPS millimetres, shown in a bone window (W 2000 / L 400 HU), and drawn with Pillow.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import map_coordinates

from pipeline.results import CageEvidence, LevelEvidence, ScrewEvidence
from pipeline.volume import Volume

BONE_LEVEL_HU = 400.0
BONE_WIDTH_HU = 2000.0
AIR_HU = -1000.0

SHAFT_COLOUR = (0, 220, 255)
HALO_COLOUR = (255, 210, 0)
EXCLUDED_COLOUR = (255, 60, 60)
SUP_PLANE_COLOUR = (255, 140, 0)
INF_PLANE_COLOUR = (230, 60, 230)
DEEPEST_COLOUR = (255, 40, 40)
RIM_COLOUR = (80, 200, 255)


@dataclass(frozen=True)
class Figure:
    """One PNG image with the caption that tells what it shows."""

    caption: str
    png: bytes


def window_uint8(hu: np.ndarray, level_hu: float = BONE_LEVEL_HU,
                 width_hu: float = BONE_WIDTH_HU) -> np.ndarray:
    """Map HU to 0..255 grey with a display window (default bone: W 2000, L 400)."""
    lo = level_hu - width_hu / 2.0
    g = (np.asarray(hu, float) - lo) / width_hu
    return (np.clip(g, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def orthonormal_pair(axis, hint) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``axis``: the first as close to ``hint`` as possible."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    h = np.asarray(hint, float)
    e1 = h - (h @ a) * a
    if np.linalg.norm(e1) < 1e-6:
        for alt in ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)):
            e1 = np.asarray(alt) - (np.asarray(alt) @ a) * a
            if np.linalg.norm(e1) > 1e-3:
                break
    e1 = e1 / np.linalg.norm(e1)
    e2 = np.cross(a, e1)
    return e1, e2 / np.linalg.norm(e2)


@dataclass(frozen=True)
class Slice:
    """A resampled plane: ``image_hu[row, col]`` at ``center + u*axis_u + v*axis_v`` with
    ``u = -half_u + col*step`` and ``v = -half_v + row*step`` (mm)."""

    image_hu: np.ndarray
    center_lps_mm: np.ndarray
    axis_u: np.ndarray
    axis_v: np.ndarray
    half_u_mm: float
    half_v_mm: float
    step_mm: float

    def to_pixel(self, p_lps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS points (..., 3) to (col, row, out-of-plane distance mm)."""
        d = np.asarray(p_lps, float) - self.center_lps_mm
        u = d @ self.axis_u
        v = d @ self.axis_v
        w = d @ np.cross(self.axis_u, self.axis_v)
        return (u + self.half_u_mm) / self.step_mm, (v + self.half_v_mm) / self.step_mm, w

    def uv_to_pixel(self, u_mm, v_mm) -> tuple[float, float]:
        return (u_mm + self.half_u_mm) / self.step_mm, (v_mm + self.half_v_mm) / self.step_mm


def oblique_slice(volume: Volume, center_lps_mm, axis_u, axis_v, half_u_mm: float,
                  half_v_mm: float, step_mm: float) -> Slice:
    """Resample ``volume`` on a plane (trilinear; outside the volume reads as air).

    Parameters
    ----------
    volume : Volume
    center_lps_mm : array (3,)
        Plane centre in LPS mm.
    axis_u, axis_v : array (3,)
        Orthonormal in-plane directions (image columns, image rows).
    half_u_mm, half_v_mm : float
        Half extents of the image in mm.
    step_mm : float
        Pixel size in mm.
    """
    c = np.asarray(center_lps_mm, float)
    eu = np.asarray(axis_u, float)
    ev = np.asarray(axis_v, float)
    nu = int(round(2 * half_u_mm / step_mm)) + 1
    nv = int(round(2 * half_v_mm / step_mm)) + 1
    u = -half_u_mm + step_mm * np.arange(nu)
    v = -half_v_mm + step_mm * np.arange(nv)
    pts = c + u[None, :, None] * eu + v[:, None, None] * ev
    kji = volume.lps_to_kji(pts)
    img = map_coordinates(volume.hu, np.moveaxis(kji, -1, 0), order=1, mode="constant",
                          cval=AIR_HU)
    return Slice(img.astype(np.float32), c, eu, ev, half_u_mm, half_v_mm, step_mm)


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # optimize=True costs ~10x the time
    return buf.getvalue()


def _grey_rgb(sl: Slice) -> Image.Image:
    return Image.fromarray(window_uint8(sl.image_hu)).convert("RGB")


def _station_width(ev: ScrewEvidence, direction) -> np.ndarray:
    """Per station, the halo width on the ray whose azimuth is nearest ``direction``."""
    dirs = np.asarray(ev.azimuth_dirs, float).reshape(-1, 3)
    a = int(np.argmax(dirs @ np.asarray(direction, float)))
    return np.asarray(ev.widths_mm, float)[:, a]


def worst_station(ev: ScrewEvidence, tie_mm: float = 0.05) -> int:
    """Station with the widest mean halo (the one a reader would look at).

    Stations within ``tie_mm`` of the widest count as equal and the one nearest the middle
    of the shaft wins (a uniform halo is then shown mid-shaft, not at the pedicle entry);
    with no measured ray at all, the middle station.
    """
    w = np.asarray(ev.widths_mm, float)
    if w.ndim != 2 or w.shape[0] == 0:
        return 0
    mid = (w.shape[0] - 1) / 2
    if np.all(np.isnan(w)):
        return int(round(mid))
    with np.errstate(all="ignore"):
        m = np.nanmean(w, axis=1)
    m = np.where(np.isnan(m), -np.inf, m)
    cand = np.flatnonzero(m >= m.max() - tie_mm)
    return int(cand[np.argmin(np.abs(cand - mid))])


def screw_axis_figure(volume: Volume, head_lps_mm, tip_lps_mm, ev: ScrewEvidence,
                      px_mm: float = 0.15) -> Figure:
    """Slice along the screw axis (plane holding the axis and the patient's left-right
    direction), with the true shaft radius (cyan) and the halo outer edge (yellow) drawn at
    each measured station; red ticks mark excluded rays."""
    head = np.asarray(head_lps_mm, float)
    tip = np.asarray(tip_lps_mm, float)
    axis = (tip - head) / np.linalg.norm(tip - head)
    e1, _ = orthonormal_pair(axis, (1.0, 0.0, 0.0))
    length = float(np.linalg.norm(tip - head))
    r = float(ev.true_radius_mm)
    half_u = length / 2 + 8.0
    half_v = max(10.0, r + 8.0)
    sl = oblique_slice(volume, (head + tip) / 2, axis, e1, half_u, half_v, px_mm)
    img = _grey_rgb(sl)
    draw = ImageDraw.Draw(img)
    st = np.asarray(ev.station_lps_mm, float).reshape(-1, 3)
    for sign in (+1.0, -1.0):
        if len(st):
            u = (st - sl.center_lps_mm) @ axis
            wid = _station_width(ev, sign * e1)
            # true radius: a straight line over the measured stations
            p0 = sl.uv_to_pixel(u.min(), sign * r)
            p1 = sl.uv_to_pixel(u.max(), sign * r)
            draw.line([p0, p1], fill=SHAFT_COLOUR, width=1)
            run: list[tuple[float, float]] = []
            for ui, wi in zip(u, wid):
                if np.isfinite(wi):
                    run.append(sl.uv_to_pixel(ui, sign * (r + wi)))
                else:
                    x, y = sl.uv_to_pixel(ui, sign * r)
                    draw.line([(x, y - 3), (x, y + 3)], fill=EXCLUDED_COLOUR, width=1)
                    if len(run) > 1:
                        draw.line(run, fill=HALO_COLOUR, width=1)
                    run = []
            if len(run) > 1:
                draw.line(run, fill=HALO_COLOUR, width=1)
            elif len(run) == 1:
                x, y = run[0]
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=HALO_COLOUR)
    caption = (f"Along the screw axis (head left, tip right); cyan = true shaft radius "
               f"{r:.2f} mm, yellow = outer edge of the lucent halo measured from it.")
    return Figure(caption, to_png(img))


def screw_cross_figure(volume: Volume, head_lps_mm, tip_lps_mm, ev: ScrewEvidence,
                       station: int | None = None, px_mm: float = 0.1) -> Figure:
    """Cross-section perpendicular to the screw at one station (default: the widest halo),
    with the true radius (cyan circle), the halo outline (yellow) and excluded rays (red)."""
    head = np.asarray(head_lps_mm, float)
    tip = np.asarray(tip_lps_mm, float)
    axis = (tip - head) / np.linalg.norm(tip - head)
    e1, e2 = orthonormal_pair(axis, (1.0, 0.0, 0.0))
    st = np.asarray(ev.station_lps_mm, float).reshape(-1, 3)
    s = worst_station(ev) if station is None else int(station)
    center = st[s] if len(st) else (head + tip) / 2
    r = float(ev.true_radius_mm)
    w = np.asarray(ev.widths_mm, float)
    ws = w[s] if len(st) else np.array([])
    wmax = float(np.nanmax(ws)) if ws.size and np.any(np.isfinite(ws)) else 0.0
    half = max(8.0, r + wmax + 5.0)
    sl = oblique_slice(volume, center, e1, e2, half, half, px_mm)
    img = _grey_rgb(sl)
    draw = ImageDraw.Draw(img)
    cx, cy = sl.uv_to_pixel(0.0, 0.0)
    rp = r / px_mm
    draw.ellipse([cx - rp, cy - rp, cx + rp, cy + rp], outline=SHAFT_COLOUR, width=1)
    dirs = np.asarray(ev.azimuth_dirs, float).reshape(-1, 3)
    poly = []
    for a, d in enumerate(dirs):
        du, dv = float(d @ e1), float(d @ e2)
        if a < ws.size and np.isfinite(ws[a]):
            rr = r + ws[a]
            poly.append(sl.uv_to_pixel(rr * du, rr * dv))
        else:
            x0, y0 = sl.uv_to_pixel(r * du, r * dv)
            x1, y1 = sl.uv_to_pixel((r + 1.5) * du, (r + 1.5) * dv)
            draw.line([(x0, y0), (x1, y1)], fill=EXCLUDED_COLOUR, width=2)
    if len(poly) > 2:
        draw.line(poly + [poly[0]], fill=HALO_COLOUR, width=1)
    dist = float(np.linalg.norm(center - head))
    with np.errstate(all="ignore"):
        mean_s = float(np.nanmean(ws)) if ws.size and np.any(np.isfinite(ws)) else float("nan")
    caption = (f"Cross-section {dist:.1f} mm from the head (widest halo): true "
               f"radius {r:.2f} mm (cyan), halo outline (yellow); halo here mean "
               f"{mean_s:.2f} mm, max {wmax:.2f} mm; excluded rays in red.")
    return Figure(caption, to_png(img))


def _plane_line(sl: Slice, point, normal) -> list[tuple[float, float]] | None:
    """Where a plane cuts the image, as two pixel end points (None when parallel)."""
    n = np.asarray(normal, float)
    a = float(n @ sl.axis_u)
    b = float(n @ sl.axis_v)
    d = float(n @ (sl.center_lps_mm - np.asarray(point, float)))
    if abs(a) < 1e-9 and abs(b) < 1e-9:
        return None
    if abs(b) >= abs(a):
        us = (-sl.half_u_mm, sl.half_u_mm)
        return [sl.uv_to_pixel(u, -(a * u + d) / b) for u in us]
    vs = (-sl.half_v_mm, sl.half_v_mm)
    return [sl.uv_to_pixel(-(b * v + d) / a, v) for v in vs]


def cage_figures(volume: Volume, centroid_lps_mm, ev: CageEvidence, half_mm: float = 25.0,
                 px_mm: float = 0.2) -> list[Figure]:
    """Sagittal and coronal slices through a cage: fitted superior (orange) and inferior
    (magenta) endplate planes, rim samples near the slice (blue) and the cage's deepest
    point past each plane (red)."""
    c = np.asarray(centroid_lps_mm, float)
    down = np.array([0.0, 0.0, -1.0])
    views = [
        ("Sagittal (anterior left, superior up)", np.array([0.0, 1.0, 0.0])),
        ("Coronal (patient right on the left, superior up)", np.array([1.0, 0.0, 0.0])),
    ]
    out = []
    for title, eu in views:
        sl = oblique_slice(volume, c, eu, down, half_mm, half_mm, px_mm)
        img = _grey_rgb(sl)
        draw = ImageDraw.Draw(img)
        for plane, rim, colour in ((ev.superior_plane, ev.rim_points_superior_lps_mm, SUP_PLANE_COLOUR),
                                   (ev.inferior_plane, ev.rim_points_inferior_lps_mm, INF_PLANE_COLOUR)):
            line = _plane_line(sl, plane.point_lps_mm, plane.normal)
            if line:
                draw.line(line, fill=colour, width=1)
            rim = np.asarray(rim, float).reshape(-1, 3)
            if len(rim):
                x, y, w = sl.to_pixel(rim)
                for xi, yi in zip(x[np.abs(w) < 1.5], y[np.abs(w) < 1.5]):
                    draw.ellipse([xi - 1, yi - 1, xi + 1, yi + 1], fill=RIM_COLOUR)
        for p in (ev.deepest_superior_lps_mm, ev.deepest_inferior_lps_mm):
            x, y, w = sl.to_pixel(np.asarray(p, float))
            rr = 4
            if abs(float(w)) < 2.0:
                draw.ellipse([x - rr, y - rr, x + rr, y + rr], outline=DEEPEST_COLOUR, width=2)
            else:  # out of this slice: hollow dashed marker
                draw.rectangle([x - rr, y - rr, x + rr, y + rr], outline=DEEPEST_COLOUR, width=1)
        out.append(Figure(f"{title}: superior endplate plane (orange), inferior (magenta), "
                          f"rim samples (blue), deepest cage point past each plane (red).",
                          to_png(img)))
    return out


def level_figure(volume: Volume, ev: LevelEvidence, scale_px_per_cell: int | None = None) -> Figure:
    """Bridging map of a disc level over the CT mid-disc slice: green where bone bridges
    from endplate to endplate, red where the domain is not bridged, outside the domain
    (outside the body outline, or cage) left as plain CT; cells whose state was estimated
    from the nearest readable cell (beside a cage) are drawn paler, so a reader sees what
    was measured."""
    dom = np.asarray(ev.domain, bool)
    bri = np.asarray(ev.bridged, bool) & dom
    nv, nu = dom.shape
    o = np.asarray(ev.origin_lps_mm, float)
    eu = np.asarray(ev.axis_u, float)
    evv = np.asarray(ev.axis_v, float)
    step = float(ev.step_mm)
    vv, uu = np.meshgrid(np.arange(nv), np.arange(nu), indexing="ij")
    pts = o + (uu[..., None] * step) * eu + (vv[..., None] * step) * evv
    kji = volume.lps_to_kji(pts)
    ct = map_coordinates(volume.hu, np.moveaxis(kji, -1, 0), order=1, mode="constant", cval=AIR_HU)
    grey = window_uint8(ct).astype(float)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    alpha = 0.5
    green = np.array([40.0, 200.0, 80.0])
    red = np.array([220.0, 50.0, 50.0])
    est = (np.asarray(ev.estimated, bool) & dom) if ev.estimated is not None else np.zeros_like(dom)
    for cells, colour in ((bri, green), (dom & ~bri, red)):
        for sel, a_sel in ((cells & ~est, alpha), (cells & est, 0.5 * alpha)):
            rgb[sel] = (1 - a_sel) * rgb[sel] + a_sel * colour
    img = Image.fromarray(rgb.astype(np.uint8))
    if scale_px_per_cell is None:
        scale_px_per_cell = max(1, int(360 // max(nu, nv, 1)))
    img = img.resize((nu * scale_px_per_cell, nv * scale_px_per_cell), Image.NEAREST)
    frac = float(bri.sum()) / float(dom.sum()) if dom.any() else float("nan")
    caption = (f"Bridging map in the disc plane ({step:.2f} mm cells): green = bone continuous "
               f"from endplate to endplate, red = not bridged, uncoloured = outside the body "
               f"outline or cage"
               + (f"; paler = estimated from the nearest readable cell (beside a cage, "
                  f"{int(est.sum())} of {int(dom.sum())} cells)" if est.any() else "")
               + f"; map fraction {frac:.2f}.")
    return Figure(caption, to_png(img))
