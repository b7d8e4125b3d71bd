"""The loaded-volume cache is keyed by content: the same study from another folder is a hit,
and its source paths (read by the SR writer) point at the new folder."""
import shutil
from pathlib import Path

from pipeline.study import input_fingerprint, load_step
from sample_data.phantom import PhantomSpec
from sample_data.dicom_writer import write_dicom_study


def test_cache_hit_from_a_moved_folder_points_at_existing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONCT_CACHE_DIR", str(tmp_path / "cache"))
    first = tmp_path / "first"
    write_dicom_study(PhantomSpec(seed=4, spacing_mm=(1.0, 1.0, 2.0), vertebrae=("L5", "S1"),
                                  instrumented_levels=("L5-S1",)), first, extra_series=False)
    ref = load_step(first)
    second = tmp_path / "second"
    shutil.copytree(first, second)
    shutil.rmtree(first)
    assert input_fingerprint(second) == Path(ref.stem).name  # same content, same cache entry
    again = load_step(second)
    assert again == ref
    paths = [Path(p) for p in again.open(input_root=second).meta["source_paths"]]
    assert paths and all(p.exists() and second.resolve() in p.parents for p in paths)
    # without a root the cache still answers, with the paths it was first loaded from
    assert all(str(first.resolve()) in p for p in again.open().meta["source_paths"])
