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


def test_a_study_first_loaded_by_a_relative_path_is_found_from_another_folder(tmp_path, monkeypatch):
    """The demo passes a relative folder; the cache entry it leaves must still rebase when the
    same study arrives later from elsewhere (a second checkout's demo crashed on this)."""
    monkeypatch.setenv("FUSIONCT_CACHE_DIR", str(tmp_path / "cache"))
    _small_study(tmp_path / "a" / "study")
    monkeypatch.chdir(tmp_path / "a")
    ref = load_step(Path("study"))
    second = tmp_path / "b" / "study"
    shutil.copytree(tmp_path / "a" / "study", second)
    monkeypatch.chdir(tmp_path / "b")
    assert load_step(Path("study")) == ref
    paths = [Path(p) for p in ref.open(input_root=Path("study")).meta["source_paths"]]
    assert paths and all(p.is_absolute() and p.exists() and second.resolve() in p.parents for p in paths)


def _small_study(folder: Path) -> Path:
    write_dicom_study(PhantomSpec(seed=4, spacing_mm=(1.0, 1.0, 2.0), vertebrae=("L5", "S1"),
                                  instrumented_levels=("L5-S1",)), folder, extra_series=False)
    return folder


def test_cached_volume_equals_the_loaded_series_and_leaves_no_staging_file(tmp_path, monkeypatch):
    """load_step decodes the pixels straight into the cache file: the same HU and geometry
    as load_study, and nothing but the .npy/.json pair in the cache."""
    import numpy as np

    from pipeline.loading import load_study

    monkeypatch.setenv("FUSIONCT_CACHE_DIR", str(tmp_path / "cache"))
    study = _small_study(tmp_path / "study")
    cached = load_step(study).open()
    loaded = load_study(study)
    assert np.array_equal(np.asarray(cached.hu), loaded.hu) and cached.hu.dtype == np.float32
    for a, b in ((cached.origin_lps_mm, loaded.origin_lps_mm), (cached.spacing_mm, loaded.spacing_mm),
                 (cached.direction, loaded.direction)):
        assert np.array_equal(a, b)
    names = sorted(p.name for p in (tmp_path / "cache" / "volumes").iterdir())
    assert [n.split(".", 1)[1] for n in names] == ["json", "npy"]


def test_bad_input_leaves_no_half_written_volume_in_the_cache(tmp_path, monkeypatch):
    """A slice whose pixel data is cut short fails the load (InputError) after the cache
    file was started: no volume, no staging file is left behind."""
    import pytest

    from pipeline.errors import InputError

    monkeypatch.setenv("FUSIONCT_CACHE_DIR", str(tmp_path / "cache"))
    study = _small_study(tmp_path / "study")
    victim = sorted(p for p in study.rglob("*") if p.is_file() and p.suffix != ".json")[3]
    data = victim.read_bytes()
    victim.write_bytes(data[:-1000])
    with pytest.raises(InputError):
        load_step(study)
    left = list((tmp_path / "cache" / "volumes").glob("*")) if (tmp_path / "cache" / "volumes").exists() else []
    assert left == []


def test_one_changed_byte_changes_the_fingerprint(tmp_path):
    study = _small_study(tmp_path / "study")
    before = input_fingerprint(study)
    assert input_fingerprint(study, max_workers=1) == before  # threads do not change the key
    victim = sorted(p for p in study.rglob("*") if p.is_file())[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    assert input_fingerprint(study) != before


def test_full_disk_is_an_oserror_before_any_pixel_is_written(tmp_path, monkeypatch):
    """The cache file's blocks are reserved before the pixels go into its memory map, so a
    full disk is a plain OSError (retried by the flow, then one line) and nothing is left."""
    import errno
    import os

    import pytest

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    monkeypatch.setenv("FUSIONCT_CACHE_DIR", str(tmp_path / "cache"))
    study = _small_study(tmp_path / "study")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as err:
        load_step(study)
    assert err.value.errno == errno.ENOSPC
    assert list((tmp_path / "cache" / "volumes").glob("*")) == []
