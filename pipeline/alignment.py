"""Sagittal alignment read off the fitted endplates: segmental lordosis and disc height.

Surgeons reading a failed fusion check whether the fused segments kept their lordosis and
whether the levels next to the fusion are degenerating (adjacent segment disease: disc
height loss or listhesis > 3 mm, CLINICAL.md). Both come from the endplate planes that
anatomy detection already fits, so they cost nothing extra.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.results import DiscLevel, Plane, Vertebra


def sagittal_angle_deg(normal) -> float:
    """Angle of an upward endplate normal in the sagittal (y-z) plane, in degrees.

    Positive when the endplate faces anteriorly (normal tilted towards -y, LPS).
    """
    n = np.asarray(normal, float)
    return math.degrees(math.atan2(-n[1], n[2]))


def segmental_lordosis_deg(upper: Vertebra, lower: Vertebra) -> float:
    """Cobb angle of one motion segment, positive for lordosis.

    The angle between the upper vertebra's superior endplate and the lower vertebra's
    inferior endplate, projected on the sagittal plane (the usual radiographic segmental
    lordosis). Both normals are taken pointing superior.

    Parameters
    ----------
    upper, lower : Vertebra
        The two vertebrae of the segment, with fitted endplate planes.

    Returns
    -------
    float
        Degrees; positive when the segment opens anteriorly (lordosis): the lower endplate
        faces more anteriorly than the upper one.
    """
    n_up = np.asarray(upper.superior_endplate.normal)
    n_low = -np.asarray(lower.inferior_endplate.normal)
    return sagittal_angle_deg(n_low) - sagittal_angle_deg(n_up)


def _distance_along_mm(origin, direction, plane: Plane) -> float:
    """Distance from ``origin`` along unit ``direction`` to ``plane`` (inf when parallel)."""
    n = np.asarray(plane.normal)
    denom = float(np.dot(direction, n))
    if abs(denom) < 1e-9:
        return math.inf
    return float(np.dot(np.asarray(plane.point_lps_mm) - origin, n) / denom)


def disc_height_mm(level: DiscLevel, upper: Vertebra, lower: Vertebra) -> float:
    """Height of the disc space at the level's centre, along the level's normal.

    The distance between the upper vertebra's inferior endplate and the lower vertebra's
    superior endplate measured through the centre of the disc space.
    """
    c = np.asarray(level.center_lps_mm)
    n = np.asarray(level.normal)
    up = _distance_along_mm(c, n, upper.inferior_endplate)
    down = _distance_along_mm(c, -n, lower.superior_endplate)
    return float(up + down)


def adjacent_levels(level_names: list[str], instrumented: set[str]) -> set[str]:
    """Levels that are not instrumented but border an instrumented one (adjacent segments)."""
    adjacent = set()
    for i, name in enumerate(level_names):
        if name in instrumented:
            continue
        neighbours = level_names[max(0, i - 1):i] + level_names[i + 1:i + 2]
        if any(nb in instrumented for nb in neighbours):
            adjacent.add(name)
    return adjacent


def annotate_levels(levels, anatomy) -> list:
    """The level measurements with segmental lordosis, disc height and the adjacent-segment
    flag filled in from the anatomy's fitted endplates."""
    from dataclasses import replace

    by_name = {v.name: v for v in anatomy.vertebrae}
    geo = {lv.name: lv for lv in anatomy.levels}
    instrumented = {lv.level for lv in levels if lv.instrumented}
    adjacent = adjacent_levels([lv.name for lv in anatomy.levels], instrumented)
    out = []
    for lv in levels:
        g = geo.get(lv.level)
        up = by_name.get(g.upper) if g else None
        low = by_name.get(g.lower) if g else None
        if g is None or up is None or low is None:
            out.append(lv)
            continue
        out.append(replace(lv, segmental_lordosis_deg=round(segmental_lordosis_deg(up, low), 2),
                           disc_height_mm=round(disc_height_mm(g, up, low), 2),
                           adjacent_to_fusion=lv.level in adjacent))
    return out
