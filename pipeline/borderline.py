"""Calls near their cut: which findings the surgeon should check on the images first.

Every call fusionct proposes is a threshold on a measured number (CONTRACT.md): loosening
on the halo coverage (0.5), the subsidence grade on each endplate's depth (2 and 4 mm),
the fusion class on the bridging fraction (0.1 and 0.5). A number closer to its cut than
the measurement's own error can fall on either side of it: on the phantoms a screw whose
halo covers exactly half of its shaft read coverage 0.36-0.68 (5th-95th percentile) at
0.8x0.8x1.5 mm, so its call was a coin toss. Such a call is not wrong, but it is not
evidence either; the report says so, and says when the voxels are coarser than any the
accuracy was measured at.

The margins are the 90th percentile of the absolute error measured against phantom ground
truth on detected geometry, rounded up to two decimals (README "Accuracy": seeds 0-47 of both
phantom sets, 25 HU noise, streaks and blooming, ``python -m benchmarks.accuracy
--detected``), by the study's coarsest voxel extent. There, 69-86 % of the wrong loosening
calls lay inside the coverage band, and outside it 96.8-98.4 % of the calls were right
(wrong: 1.6-3.2 % of unflagged screws at each spacing, 23-45 % of flagged ones). The 0.8x0.8x1.5
mm coverage margin was re-measured after the rim sector (pipeline.measure._rim_sector): 90th
percentile 0.184, was 0.202-0.210.

The coverage band misses one kind of wrong call: a halo just over the 1 mm width threshold is
read partly under it (at 0.8x0.8x1.5 mm the reader's deficit floor lies at 1.1-1.6 mm, README
"Sixteenth session"), so a 1.0-1.4 mm halo can read coverage 0.01-0.35, far from the cut, with
a lucency of 0.4-0.8 mm on average. A screw not called loose whose halo_mean is at least
``lucency_fraction`` of the width threshold is flagged too (detected geometry, seeds 0-47 of
both sets, 25 HU; wrong calls outside the coverage band / caught by this flag / more screws
flagged: 0.8x0.8x1.5 mm 11 / 7 / 23, right outside every flag 96.8 -> 98.8 %; 0.5x0.5x1.0 mm
8 / 7 / 24, 97.8 -> 99.7 %; 0.35x0.35x0.6 mm, fraction 0.5, 6 / 4 / 14, 98.4 -> 99.4 %). The
fractions were chosen on those seeds; on fresh seeds 48-59 (same conditions, seen by nothing
before) the flag catches 2 of 5 / 2 of 3 / 2 of 3 such calls for 2 / 5 / 3 more flagged
screws, right outside every flag 94.0 -> 96.3 % / 96.7 -> 98.8 % / 96.6 -> 98.8 % (coarse /
standard / fine).

One condition makes every halo call of a study less reliable rather than one of them: no
screw reading halo-free at voxels coarser than 1 mm, where the metal's blooming tail has no
clean bone to be calibrated on (:func:`no_reference_screw_note`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Criteria


@dataclass(frozen=True)
class MeasuredError:
    """90th-percentile absolute errors of one spacing class (see module docstring)."""

    voxel_up_to_mm: float   # coarsest voxel extent this row was measured at
    coverage: float         # halo_coverage
    subsidence_mm: float    # per endplate
    bridging: float         # bridging_fraction
    lucency_fraction: float | None = None  # a screw not called loose whose halo_mean is at
                                           # least this fraction of the width threshold (None:
                                           # no such flag at this spacing; module docstring)


MEASURED_ERRORS = (
    MeasuredError(0.6, 0.07, 0.23, 0.04, 0.5),   # 0.35x0.35x0.6 mm (lucency flag: 17th session)
    MeasuredError(1.0, 0.12, 0.23, 0.03, 0.45),  # 0.5x0.5x1.0 mm (lucency flag: 16th session)
    MeasuredError(1.5, 0.19, 0.28, 0.03, 0.4),  # 0.8x0.8x1.5 mm (coverage re-measured: 11th
                                                 # session; lucency flag: 16th session)
)


# A screw that reads halo-free over most of its shaft: the metal's blooming tail is calibrated
# on such bone (pipeline.measure.estimate_metal_tail). Without one, and at voxels coarser than
# 1 mm, the calls were measurably less reliable (see no_reference_screw_note).
REFERENCE_SCREW_MEAN_MM = 0.3
REFERENCE_SCREW_COVERAGE = 0.25
UNCALIBRATED_FROM_VOXEL_MM = 1.0


def coarsest_voxel_mm(spacing_mm) -> float:
    """A study's coarsest voxel extent, which decides its spacing class."""
    return max(float(s) for s in spacing_mm)


def voxels_within(spacing_mm, up_to_mm: float) -> bool:
    """Whether a study's coarsest voxel extent fits a spacing class measured up to
    ``up_to_mm`` (5 % tolerance)."""
    return coarsest_voxel_mm(spacing_mm) <= 1.05 * up_to_mm


def measured_error(spacing_mm) -> MeasuredError | None:
    """The measured errors for a study's voxel spacing: the row of the finest measured
    spacing class its coarsest voxel extent fits in; None when it is coarser than every
    measured one."""
    return next((row for row in MEASURED_ERRORS if voxels_within(spacing_mm, row.voxel_up_to_mm)),
                None)


def near_cut(value: float, cuts, margin: float) -> bool:
    """Whether ``value`` lies within ``margin`` of any of the ``cuts``."""
    return any(abs(value - c) <= margin for c in cuts)


def borderline_findings(screws, cages, levels, criteria: Criteria,
                        spacing_mm) -> list[tuple[str, str, str]]:
    """``(kind, id, note)`` for every call whose number lies within the measured error of
    its cut (kind ``screw``, ``cage`` or ``level``), led by ``("study", "", note)`` when no
    screw reads halo-free at coarse voxels (:func:`no_reference_screw_note`); or only one
    ``("study", "", note)`` for voxels coarser than the accuracy was measured at (module
    docstring)."""
    err = measured_error(spacing_mm)
    if err is None:
        return [("study", "", f"Voxels up to {coarsest_voxel_mm(spacing_mm):.2f} mm: coarser "
                 f"than the {MEASURED_ERRORS[-1].voxel_up_to_mm:.1f} mm at which fusionct's "
                 "accuracy was measured; check every call on the images.")]
    out = []
    note = no_reference_screw_note(screws, spacing_mm)
    if note:
        out.append(("study", "", note))
    cut = criteria.halo_coverage_for_loosening
    for s in screws:
        if not s.rays_used:
            continue
        if near_cut(s.halo_coverage, (cut,), err.coverage):
            out.append(("screw", s.id, f"Screw {s.id}: loosening call borderline (halo coverage "
                        f"{100 * s.halo_coverage:.0f} % against the {100 * cut:.0f} % cut; "
                        f"measured coverage error up to {err.coverage:.2f} at this voxel size)."))
        elif lucent_under_threshold(s, criteria, err):
            out.append(("screw", s.id, f"Screw {s.id}: not called loose, but its lucency reads "
                        f"{s.halo_mean_mm:.2f} mm on average: at this voxel size a halo just over "
                        f"the {criteria.halo_threshold_mm:g} mm width threshold reads narrower, "
                        "with its coverage under the cut."))
    for c in cages:
        depths = {"superior": c.subsidence_superior_mm, "inferior": c.subsidence_inferior_mm}
        close = [f"{side} {depth:.1f} mm" for side, depth in depths.items()
                 if near_cut(depth, criteria.subsidence_grades_mm, err.subsidence_mm)]
        if close:
            cuts = " and ".join(f"{x:g}" for x in criteria.subsidence_grades_mm)
            out.append(("cage", c.id, f"Cage {c.id}: subsidence grade borderline "
                        f"({', '.join(close)} against the {cuts} mm cuts; measured error up to "
                        f"{err.subsidence_mm:.2f} mm)."))
    fusion_cuts = (criteria.bridging_partial, criteria.bridging_fused)
    for lv in levels:
        if near_cut(lv.bridging_fraction, fusion_cuts, err.bridging):
            out.append(("level", lv.level, f"Level {lv.level}: fusion class borderline (bridging "
                        f"{100 * lv.bridging_fraction:.0f} % against the "
                        f"{' and '.join(f'{100 * x:.0f}' for x in fusion_cuts)} % cuts; measured "
                        f"error up to {err.bridging:.2f})."))
    return out


def lucent_under_threshold(screw, criteria: Criteria, err: MeasuredError) -> bool:
    """Whether a screw not called loose reads a lucency wide enough to be a halo just over
    the width threshold read short at this spacing (module docstring): its halo_mean is at
    least ``err.lucency_fraction`` of ``criteria.halo_threshold_mm``."""
    return (err.lucency_fraction is not None and not screw.loosening
            and screw.halo_mean_mm >= err.lucency_fraction * criteria.halo_threshold_mm)


def no_reference_screw_note(screws, spacing_mm) -> str | None:
    """A note when no screw of the study reads halo-free and the voxels are coarser than
    ``UNCALIBRATED_FROM_VOXEL_MM``; None otherwise.

    The metal's blooming tail is removed before the halo is read, and it is estimated from
    the study's own halo-free bone beside the screws. When every screw carries a lucency
    (a study-wide loosening, as in infection) that estimate absorbs part of the halos. A
    screw counts as a reference when its halo_mean is under ``REFERENCE_SCREW_MEAN_MM``
    and its coverage under ``REFERENCE_SCREW_COVERAGE``. Measured on detected geometry,
    seeds 0-47 of both phantom sets at 25 HU: at 0.8x0.8x1.5 mm the 17 studies with no
    such screw had 5 of 44 clear loosening calls wrong (11.4 %, 3 missed and 2 false)
    against 3 of 263 (1.1 %) in the other 79 studies; at 0.5x0.5x1.0 mm and finer there was
    no difference (no wrong call in either group). With a 1.5 mm halo round every screw of
    seeds 0-3 at 0.8x0.8x1.5 mm, 5 of 18 screws read under the loosening cut."""
    measured = [s for s in screws if s.rays_used]
    if not measured or voxels_within(spacing_mm, UNCALIBRATED_FROM_VOXEL_MM):
        return None
    if any(s.halo_mean_mm < REFERENCE_SCREW_MEAN_MM and s.halo_coverage < REFERENCE_SCREW_COVERAGE
           for s in measured):
        return None
    return ("Every screw reads a lucency, so no halo-free screw calibrated the metal's blooming "
            "at this voxel size: halos may read narrower or wider than they are, and loosening "
            "calls are less reliable (phantoms at 0.8x0.8x1.5 mm: 11 % of such calls wrong, "
            "against 1 % when a halo-free screw was present); check every screw on the images.")


def borderline_notes(screws, cages, levels, criteria: Criteria, spacing_mm) -> list[str]:
    """The notes of :func:`borderline_findings`, for the report's list of what the
    analysis was unsure of."""
    return [note for _, _, note in borderline_findings(screws, cages, levels, criteria, spacing_mm)]
