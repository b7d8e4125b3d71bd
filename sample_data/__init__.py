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
