"""fusionct sample data: a seeded synthetic post-fusion lumbar CT phantom with exact truth.

Public API
----------
PhantomSpec, CageSpec : what a phantom study contains (seeded defaults for anything unset).
make_phantom(spec) -> (Volume, truth) : the CT in memory (float32 HU, LPS geometry) and its
    JSON-ready ground truth.
make_phantom_layers(spec) -> PhantomLayers : the noise-free label map and true HU map.
truth_anatomy(truth) -> pipeline.results.Anatomy : the exact geometry objects.
write_dicom_study(spec, outdir, *, extra_series=True) -> Path : a real DICOM study + truth.json.
demo_spec(), spacing_specs(seed, noise_hu, streaks) : the bundled and the test studies.
pinned_spec(spec), follow_up_spec(prior, ...) : prior/follow-up pairs of one patient with
    known vertebral motion, screw migration, added subsidence.

Truth layout (``truth.json``; all positions LPS mm, lengths mm, fractions 0..1)
--------------------------------------------------------------------------------
format ("fusionct-phantom-truth"), version (1)
spec        : the PhantomSpec as given (seed, spacing_mm, noise_hu, streaks, blooming,
              psf_sigma_mm, vertebrae, instrumented_levels, per-object overrides, poses ...)
imaging     : spacing_mm, noise_hu, streaks, blooming, blooming_sigma_mm, blooming_weight,
              blooming_gain, psf_sigma_mm (actual), hu_range ([-1024, 3071], or up to
              30710 with extended_hu),
              feet_first, material_hu
criteria    : pipeline.config.Criteria used for the derived classes below
instrumented_levels : ["L4-L5", ...]
vertebrae[] : name, center_lps_mm, axis_si, axis_lr, axis_ap, semi_axes_mm [LR, AP],
              height_mm, tilt_deg, is_sacrum, shift_mm, rotation_deg,
              superior_endplate / inferior_endplate {point_lps_mm (on the outer surface),
              normal (outward unit)}
levels[]    : level (= name, "L4-L5"), upper, lower, center_lps_mm, normal (bisector of the
              two endplate normals, pointing superior), axis_u, axis_v (the level plane),
              semi_axes_mm, disc_height_mm, instrumented, bridging_fraction,
              bridging_fraction_target, fusion (fused | partial | not_fused),
              domain_area_mm2, nonbridging_columns [{center_uv_mm, radius_mm, gap_position}]
screws[]    : id ("L4-left"), vertebra, side (left = +x), head_lps_mm, tip_lps_mm, length_mm,
              diameter_mm, halo_width_mm, halo_fraction, halo_start_deg, halo_mean_mm,
              halo_max_mm, halo_coverage, loosening, double_halo, fracture (None |
              {position, gap_mm, center_lps_mm, direction}), shift_mm, breach_mm,
              breach_direction, breach_grade (Gertzbein-Robbins A-E), pedicle_head_lps_mm,
              pedicle_tip_lps_mm, pedicle_radius_mm
cages[]     : id ("L4-L5-cage1"), level, material (titanium | peek), centroid_lps_mm, axes
              (rows: superior, left-ish, posterior-ish), half_sizes_mm (same order),
              subsidence_superior_mm, subsidence_inferior_mm, subsidence_mm (max),
              subsidence_grade (none | mild | severe), subsidence_grade_superior,
              subsidence_grade_inferior, marker_inset_mm, marker_diameter_mm,
              markers_lps_mm (PEEK: 4 pins as [end, end])
rods[]      : id ("rod-left"), side, diameter_mm, points_lps_mm, fracture
notes[]     : plain sentences on the definitions
volume      : shape_kji, spacing_mm, origin_lps_mm, direction (as make_phantom's Volume)
dicom       : (written studies only) study_instance_uid, frame_of_reference_uid,
              patient_position, bone_series_uid, n_files, series [{role (bone | localizer |
              soft), uid, description, kernel, image_type, n_files, slice_thickness_mm}]
"""
from sample_data.phantom import (
    LABELS,
    CageSpec,
    PhantomLayers,
    PhantomSpec,
    apply_imaging,
    demo_spec,
    follow_up_spec,
    level_names,
    make_phantom,
    make_phantom_layers,
    pinned_spec,
    resolve_spec,
    spacing_specs,
    truth_anatomy,
)


def write_dicom_study(spec, outdir, *, extra_series=True):
    """Write a DICOM study of ``spec`` to ``outdir`` (see ``sample_data.dicom_writer``)."""
    from sample_data.dicom_writer import write_dicom_study as _w

    return _w(spec, outdir, extra_series=extra_series)


__all__ = [
    "LABELS", "CageSpec", "PhantomLayers", "PhantomSpec", "apply_imaging", "demo_spec",
    "follow_up_spec", "pinned_spec", "level_names", "make_phantom", "make_phantom_layers", "resolve_spec", "spacing_specs",
    "truth_anatomy", "write_dicom_study",
]
