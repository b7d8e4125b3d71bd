"""Every kind of bad input is refused with InputError naming the file or series and the reason.

The series are tiny (16x16 pixels, a few slices) and written with pydicom in each test, each
spoiled in exactly one way; a clean copy of the same series loads, so each refusal is caused
by the one defect.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.errors import InputError
from pipeline.loading import load_study
from pipeline.loading_bench import write_ct_series

SHAPE = (6, 16, 16)


def write(folder: Path, **kw) -> list[Path]:
    kw.setdefault("names", "ordered")
    return write_ct_series(folder, SHAPE, **kw)


def refuse(path) -> InputError:
    with pytest.raises(InputError) as info:
        load_study(path)
    err = info.value
    assert "\n" not in str(err), "the message must be one line"
    return err


def test_clean_series_loads(tmp_path):
    write(tmp_path)
    assert load_study(tmp_path).hu.shape == SHAPE


def test_nonexistent_path_refused(tmp_path):
    err = refuse(tmp_path / "nothing_here")
    assert "no such file or folder" in str(err)


def test_empty_folder_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    err = refuse(tmp_path)
    assert "empty" in err.reason


def test_folder_of_text_files_refused(tmp_path):
    for i in range(3):
        (tmp_path / f"notes{i}.txt").write_text("not an image\n" * 20)
    err = refuse(tmp_path)
    assert "no DICOM files" in err.reason and "3 files" in err.reason


def test_mr_series_refused_as_not_ct(tmp_path):
    write(tmp_path, modality="MR", description="T2 sag")
    err = refuse(tmp_path)
    assert "not CT" in err.reason and "MR" in err.reason
    assert "T2 sag" in err.where


def test_missing_slice_refused_naming_series_and_gap(tmp_path):
    paths = write(tmp_path, description="Bone 1mm")
    os.remove(paths[3])
    err = refuse(tmp_path)
    assert "Bone 1mm" in err.where
    assert "slice is missing" in err.reason and "2.000 mm" in err.reason and "1.000 mm" in err.reason
    assert paths[2].name in err.reason and paths[4].name in err.reason


def test_truncated_pixel_data_refused_naming_file(tmp_path):
    paths = write(tmp_path)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 100])
    err = refuse(tmp_path)
    assert err.where == paths[2].name
    assert "truncated" in err.reason


def test_truncated_header_refused_naming_file(tmp_path):
    paths = write(tmp_path)
    paths[4].write_bytes(paths[4].read_bytes()[:300])
    err = refuse(tmp_path)
    assert err.where == paths[4].name
    assert "cannot be parsed" in err.reason


def test_file_cut_before_pixel_data_refused_naming_file(tmp_path):
    paths = write(tmp_path)
    data = paths[1].read_bytes()
    cut = data.rfind(b"\xe0\x7f\x10\x00")  # pixel data tag
    paths[1].write_bytes(data[:cut])
    err = refuse(tmp_path)
    assert err.where == paths[1].name
    assert "no (integer) pixel data" in err.reason


def test_garbage_after_dicom_preamble_refused(tmp_path):
    write(tmp_path)
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(64))
    err = refuse(tmp_path)
    assert err.where == "broken.dcm" and "corrupt" in err.reason


def test_mixed_orientation_refused(tmp_path):
    def edit(k, ds):
        if k == 3:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]

    paths = write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "mixed orientation" in err.reason and err.where == paths[3].name


def test_mixed_sizes_refused(tmp_path):
    def edit(k, ds):
        if k == 2:
            ds.Rows, ds.Columns = 8, 8
            ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()

    paths = write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "mixed size" in err.reason and err.where == paths[2].name


def test_no_pixel_data_refused(tmp_path):
    def edit(k, ds):
        if k == 0:
            del ds.PixelData

    paths = write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "no (integer) pixel data" in err.reason and err.where == paths[0].name


@pytest.mark.parametrize("spacing", [["0", "0"], ["-0.5", "0.5"]])
def test_zero_or_negative_pixel_spacing_refused(tmp_path, spacing):
    def edit(k, ds):
        ds.PixelSpacing = spacing

    write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "zero or negative PixelSpacing" in err.reason


def test_duplicate_slice_positions_refused(tmp_path):
    def edit(k, ds):
        if k == 4:
            ds.ImagePositionPatient = [-100.0, -120.0, -297.0]  # where slice 3 is

    paths = write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "duplicate slice position" in err.reason
    assert paths[3].name in str(err) and paths[4].name in str(err)


def test_mixed_frames_of_reference_refused(tmp_path):
    other = generate_uid()

    def edit(k, ds):
        if k == 5:
            ds.FrameOfReferenceUID = other

    paths = write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "mixed frames of reference" in err.reason and err.where == paths[5].name


def test_single_slice_refused(tmp_path):
    write_ct_series(tmp_path, (1, 16, 16), description="one")
    err = refuse(tmp_path)
    assert "single slice" in err.reason and "one" in err.where


def test_absurd_dimensions_refused(tmp_path):
    def edit(k, ds):
        ds.Rows, ds.Columns = 60000, 60000

    write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "absurd image size" in err.reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("slope,words", [("1e38", "overflows"), ("NaN", "invalid rescale")])
def test_nan_or_overflow_after_rescale_refused(tmp_path, slope, words):
    def edit(k, ds):
        ds.RescaleSlope = slope

    write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert words in err.reason


def test_shear_beyond_any_gantry_tilt_refused_with_angle(tmp_path):
    write(tmp_path, slice_step_lps_mm=(0.0, np.tan(np.radians(40.0)), 1.0))
    err = refuse(tmp_path)
    assert "sheared by 40.0 degrees" in err.reason and "more than any gantry tilts" in err.reason


def test_undecodable_transfer_syntax_named(tmp_path):
    write(tmp_path)
    # overwrite one slice with an MPEG2 (video) transfer syntax nobody here decodes
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    victim = sorted(tmp_path.iterdir())[2]
    ds = dcmread(victim)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([os.urandom(200)])
    ds["PixelData"].VR = "OB"
    ds.save_as(victim, enforce_file_format=True)
    err = refuse(tmp_path)
    assert err.where == victim.name
    assert "1.2.840.10008.1.2.4.100" in err.reason and "cannot be decoded" in err.reason


def test_single_dicom_file_as_input_refused(tmp_path):
    paths = write(tmp_path)
    err = refuse(paths[0])
    assert "must be NIfTI" in err.reason


def test_messages_never_carry_patient_identifiers(tmp_path):
    def edit(k, ds):
        ds.PatientName = "DOE^JANE"
        ds.PatientID = "PID123456"
        if k == 3:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    write(tmp_path, edit=edit)
    err = refuse(tmp_path)
    assert "DOE" not in str(err) and "PID123456" not in str(err)


def test_localizer_only_refused(tmp_path):
    write(tmp_path, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="Topogram")
    err = refuse(tmp_path)
    assert "localizer" in err.reason and "Topogram" in err.where


# ---------------------------------------------------------------------------------- NIfTI
def _nifti(path: Path, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def test_nifti_with_nan_affine_refused(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[0, 3] = np.nan
    err = refuse(_nifti(tmp_path / "nan.nii.gz", aff))
    assert err.where == "nan.nii.gz" and "broken NIfTI affine" in err.reason


def test_nifti_with_singular_affine_refused(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 2] = aff[:3, 0]  # k axis parallel to i axis
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), aff)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "flat.nii"))
    err = refuse(tmp_path / "flat.nii")
    assert err.where == "flat.nii" and "singular" in err.reason


def test_nifti_that_is_not_nifti_refused(tmp_path):
    (tmp_path / "fake.nii.gz").write_bytes(b"this is not a nifti file at all")
    err = refuse(tmp_path / "fake.nii.gz")
    assert err.where == "fake.nii.gz" and "not a readable NIfTI file" in err.reason
    assert str(tmp_path) not in str(err)


def test_folder_holding_only_a_nifti_points_to_the_file(tmp_path):
    _nifti(tmp_path / "ct.nii.gz", np.eye(4))
    err = refuse(tmp_path)
    assert "no DICOM files" in err.reason and "give that file itself" in err.reason


def test_nifti_with_several_volumes_refused(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), str(tmp_path / "fmri.nii.gz"))
    err = refuse(tmp_path / "fmri.nii.gz")
    assert "one 3-D volume" in err.reason


def test_nifti_with_one_trailing_volume_axis_loads(tmp_path):
    import nibabel as nib

    data = np.arange(8 * 7 * 6, dtype=np.int16).reshape(8, 7, 6, 1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "ct4d.nii.gz"))
    vol = load_study(tmp_path / "ct4d.nii.gz")
    np.testing.assert_array_equal(vol.hu, np.transpose(data[..., 0], (2, 1, 0)).astype(np.float32))


def test_two_ct_studies_in_one_folder_refused(tmp_path):
    write(tmp_path / "now", study_uid="1.2.826.0.1.3680043.99.10")
    write(tmp_path / "prior", study_uid="1.2.826.0.1.3680043.99.11")
    err = refuse(tmp_path)
    assert "2 different studies" in err.reason and "one study per folder" in err.reason


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_truncated_nifti_refused_not_zero_filled(tmp_path, name):
    p = _nifti(tmp_path / name, np.eye(4))
    full = np.arange(32 ** 3, dtype=np.int16).reshape(32, 32, 32)
    import nibabel as nib

    nib.save(nib.Nifti1Image(full, np.eye(4)), str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    err = refuse(p)
    assert err.where == name and "truncated" in err.reason


def test_nifti_gz_with_trailing_bytes_still_loads(tmp_path):
    """A gzip trailer that does not match (extra bytes, multi-member) falls back to a full check."""
    import gzip

    import nibabel as nib

    raw = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "ct.nii"))
    body = (tmp_path / "ct.nii").read_bytes()
    # two gzip members: header+half, then the rest plus 16 padding bytes
    (tmp_path / "ct.nii.gz").write_bytes(gzip.compress(body[:400]) + gzip.compress(body[400:] + b"\0" * 16))
    vol = load_study(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(vol.hu, np.transpose(raw, (2, 1, 0)).astype(np.float32))
