"""Series selection: the series fit for bone and hardware is picked, and the reason says why.

Each study is a folder of tiny series written with pydicom, mixed together in one folder
(random names, nested sub-folders, non-DICOM files beside them) the way PACS exports look.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.loading import load_series, load_study
from pipeline.loading_bench import write_ct_series
from pipeline.series import is_bone_kernel, scan_dicom_folder, select_series

SMALL = (4, 8, 8)


def series(folder: Path, sub: str, n=4, thickness=1.0, **kw) -> list[Path]:
    kw.setdefault("study_uid", "1.2.3.4")
    return write_ct_series(folder / sub, (n, 8, 8), spacing_mm=(0.7, 0.7, thickness),
                           slice_thickness_mm=thickness, seed=zlib.crc32(sub.encode()), **kw)


def pick(folder: Path):
    return select_series(scan_dicom_folder(folder))


def test_bone_series_beats_localizer_and_thick_soft_series(tmp_path):
    series(tmp_path, "a", n=6, thickness=1.0, kernel="B70f", description="Spine bone 1.0", series_number=3)
    series(tmp_path, "b", n=1, thickness=1.0, kernel="T20f", description="Topogram",
           image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1,
           row_dir=(0, 1, 0), col_dir=(0, 0, -1))
    series(tmp_path, "c", n=3, thickness=5.0, kernel="B30f", description="Abdomen 5.0", series_number=2)
    chosen, reason = pick(tmp_path)
    assert chosen.description == "Spine bone 1.0"
    assert "bone/sharp kernel" in reason and "thinnest" in reason
    assert "'Topogram': localizer" in reason
    assert "'Abdomen 5.0': thicker slices (5 mm), soft kernel (B30f)" in reason
    assert reason.count(".") >= 1 and "\n" not in reason


def test_original_axial_beats_thinner_derived_reformat(tmp_path):
    series(tmp_path, "orig", n=5, thickness=1.0, kernel="B60f", description="Axial 1.0")
    series(tmp_path, "mpr", n=8, thickness=0.6, kernel="B60f", description="MPR",
           image_type=("DERIVED", "SECONDARY", "MPR"))
    chosen, reason = pick(tmp_path)
    assert chosen.description == "Axial 1.0"
    assert "'MPR': reformat/derived" in reason


# (series written: sub-folder, slices, thickness mm, other write_ct_series arguments) ->
# the description of the series chosen and what the reason must say of the other one
PAIRS = {
    "axial beats a sagittal original": (
        [("ax", 5, 1.0, dict(kernel="B60f", description="Axial")),
         ("sag", 6, 0.5, dict(kernel="B60f", description="Sagittal", row_dir=(0, 1, 0), col_dir=(0, 0, -1)))],
        "Axial", "'Sagittal': not axial"),
    "bone kernel beats a slightly thinner soft kernel": (
        [("soft", 5, 0.75, dict(kernel="B30f", description="Soft 0.75")),
         ("bone", 5, 1.0, dict(kernel="Br64", description="Bone 1.0"))],
        "Bone 1.0", "soft kernel (B30f)"),
    "thin soft series beats a thick bone series": (
        [("soft", 5, 1.0, dict(kernel="STANDARD", description="Std 1.0")),
         ("bone", 5, 3.0, dict(kernel="BONE", description="Bone 3.0"))],
        "Std 1.0", "'Bone 3.0': thicker slices (3 mm)"),
    "thinnest wins without recognised kernels": (
        [("x", 5, 1.0, dict(kernel="XYZ", description="One")),
         ("y", 5, 0.8, dict(kernel="XYZ", description="Two"))],
        "Two", "thinnest slices"),
    "more slices break a tie": (
        [("short", 3, 1.0, dict(kernel="B70f", description="Short")),
         ("long", 6, 1.0, dict(kernel="B70f", description="Long"))],
        "Long", "'Short': fewer images (3)"),
    "a non-CT series is passed over": (
        [("pet", 5, 0.5, dict(modality="PT", description="PET")),
         ("ct", 5, 2.0, dict(kernel="B30f", description="CT 2.0"))],
        "CT 2.0", "'PET': PT, not CT"),
}


@pytest.mark.parametrize("case", list(PAIRS))
def test_series_choice_between_two(tmp_path, case):
    written, winner, said = PAIRS[case]
    for sub, n, thickness, kw in written:
        series(tmp_path, sub, n=n, thickness=thickness, **kw)
    chosen, reason = pick(tmp_path)
    assert chosen.description == winner
    assert said in reason


def test_non_dicom_files_are_skipped_and_counted(tmp_path):
    series(tmp_path, "deep/er/ct", n=4, thickness=1.0, description="CT")
    (tmp_path / "README.txt").write_text("exported by PACS\n")
    (tmp_path / "deep" / "DICOMDIR.bak").write_bytes(b"\x00" * 50)
    (tmp_path / "deep" / "er" / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    found = scan_dicom_folder(tmp_path)
    assert len(found) == 1 and found[0].n_files == 4
    assert len(found.non_dicom_paths) == 3 and found.n_files == 7
    vol = load_study(tmp_path)
    assert vol.hu.shape == (4, 8, 8) and vol.meta["skipped_non_dicom_files"] == 3


def test_series_with_empty_uids_still_groups_and_loads(tmp_path):
    series(tmp_path, "anon", n=5, thickness=1.0, description="Anon", series_uid="", study_uid="")
    found = scan_dicom_folder(tmp_path)
    assert len(found) == 1 and found[0].uid == "" and found[0].n_files == 5
    vol = load_study(tmp_path)
    assert vol.hu.shape == (5, 8, 8) and vol.meta["series_instance_uid"] == ""


def test_empty_uid_series_kept_apart_by_number(tmp_path):
    series(tmp_path, "a", n=5, thickness=1.0, kernel="B70f", description="Bone", series_uid="", series_number=4)
    series(tmp_path, "b", n=5, thickness=5.0, kernel="B30f", description="Soft", series_uid="", series_number=5)
    chosen, _ = pick(tmp_path)
    assert chosen.description == "Bone" and chosen.n_files == 5


def test_corrupt_file_of_another_series_does_not_block_the_chosen_one(tmp_path):
    series(tmp_path, "bone", n=5, thickness=1.0, kernel="B70f", description="Bone")
    soft = series(tmp_path, "soft", n=3, thickness=5.0, kernel="B30f", description="Soft",
                  series_uid="1.2.826.0.1.3680043.99.5")
    # cut the soft file inside its header but after SeriesInstanceUID: attributable, corrupt
    data = soft[1].read_bytes()
    cut = data.find(b"1.2.826.0.1.3680043.99.5") + 40
    soft[1].write_bytes(data[:cut])
    found = scan_dicom_folder(tmp_path)
    by = {s.description: s for s in found}
    assert found.corrupt_paths == []
    assert load_study(tmp_path).meta["series_description"] == "Bone"
    cut_slice = [h for h in by["Soft"].slices if h.path == str(soft[1])]
    assert len(cut_slice) == 1 and not cut_slice[0].has_pixel_data
    with pytest.raises(InputError, match="no \\(integer\\) pixel data"):
        load_series(by["Soft"], root=tmp_path)


def test_only_single_slice_ct_refused(tmp_path):
    series(tmp_path, "one", n=1, thickness=1.0, description="Single")
    with pytest.raises(InputError, match="single slice"):
        pick(tmp_path)


@pytest.mark.parametrize("kernel", ["B70f", "B60s", "Br64", "Br76", "I70f", "Hr68", "BONE", "BONEPLUS", "EDGE",
                                    "YC", "D", "FC30", "FC81", "bone"])
def test_bone_kernels_recognised(kernel):
    assert is_bone_kernel(kernel)


@pytest.mark.parametrize("kernel", ["B30f", "Br38f", "I40f", "STANDARD", "SOFT", "B", "C", "FC13", "", None])
def test_soft_kernels_not_counted_as_bone(kernel):
    assert not is_bone_kernel(kernel)


def test_dicomdir_export_tree_loads_and_dicomdir_is_skipped(tmp_path):
    import pydicom
    from pydicom.fileset import FileSet

    src = series(tmp_path / "src", "ct", n=4, thickness=1.0, description="CT")
    fs = FileSet()
    for p in src:
        ds = pydicom.dcmread(p)
        ds.PatientID, ds.PatientName = "ANON", "ANON"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200101", "120000", "1", "1"
        fs.add(ds)
    fs.write(tmp_path / "export")
    found = scan_dicom_folder(tmp_path / "export")
    assert [s.n_files for s in found] == [4]
    assert [Path(p).name for p in found.non_dicom_paths] == ["DICOMDIR"] and found.corrupt_paths == []
    assert load_study(tmp_path / "export").hu.shape == (4, 8, 8)


def test_raw_dicom_files_without_preamble_load(tmp_path):
    import pydicom

    paths = series(tmp_path, "ct", n=5, thickness=1.0, description="Raw")
    for p in paths:  # rewrite as bare implicit-VR datasets: no preamble, no file meta
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(p, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert p.read_bytes()[128:132] != b"DICM"
    vol = load_study(tmp_path)
    assert vol.hu.shape == (5, 8, 8) and vol.meta["transfer_syntax_uid"] == "1.2.840.10008.1.2"
