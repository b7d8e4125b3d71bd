"""Loading gives the voxels and LPS geometry SimpleITK gives, for every layout a scanner writes.

Ground truth is SimpleITK (``ImageSeriesReader`` on GDCM's position-sorted file list, and
``ReadImage`` for NIfTI) and the stored values the tests wrote themselves; the real
TotalSegmentator example CT in ../shared is used when present.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, RLELossless

from pipeline.loading import load_study
from pipeline.loading_bench import write_ct_series


def sitk_series(folder):
    """SimpleITK's reading of a DICOM folder: (array float32, origin, spacing, direction 3x3)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    r = sitk.ImageSeriesReader()
    r.SetFileNames(files)
    img = r.Execute()
    return (sitk.GetArrayFromImage(img).astype(np.float32), np.array(img.GetOrigin()),
            np.array(img.GetSpacing()), np.array(img.GetDirection()).reshape(3, 3))


def assert_same_as_sitk(vol, folder, atol_hu=0.0):
    arr, origin, spacing, direction = sitk_series(folder)
    assert vol.hu.dtype == np.float32
    assert vol.hu.shape == arr.shape
    np.testing.assert_allclose(vol.origin_lps_mm, origin, atol=1e-6)
    np.testing.assert_allclose(vol.spacing_mm, spacing, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(vol.direction, direction, atol=1e-9)
    np.testing.assert_allclose(vol.hu, arr, atol=atol_hu, rtol=0)


LAYOUTS = {
    "head_first_shuffled": dict(names="shuffled"),
    "head_first_reversed_names": dict(names="reversed"),
    "feet_first": dict(row_dir=(-1, 0, 0), col_dir=(0, 1, 0), names="shuffled"),
    "prone": dict(row_dir=(-1, 0, 0), col_dir=(0, -1, 0), names="ordered"),
    "oblique": dict(row_dir=(0.9659258, 0.2588190, 0), col_dir=(-0.2588190, 0.9659258, 0), names="shuffled"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("spacing_mm", [(0.5, 0.5, 1.0), (0.8, 0.8, 2.0), (0.35, 0.35, 0.6)])
def test_voxels_and_geometry_equal_simpleitk(tmp_path, layout, spacing_mm):
    write_ct_series(tmp_path, (9, 20, 24), spacing_mm=spacing_mm, **LAYOUTS[layout])
    vol = load_study(tmp_path)
    assert_same_as_sitk(vol, tmp_path)


def test_slices_sorted_along_normal_not_by_name_or_instance_number(tmp_path):
    stored = np.zeros((7, 6, 6), np.int32)
    for k in range(7):
        stored[k] = 100 * k + 5  # each slice holds its own k

    def scramble_instance_numbers(k, ds):
        ds.InstanceNumber = [4, 1, 7, 2, 6, 3, 5][k]

    paths = write_ct_series(tmp_path, stored=stored, spacing_mm=(1, 1, 2.5), names="shuffled",
                            rescale_intercept=0, edit=scramble_instance_numbers)
    vol = load_study(tmp_path)
    np.testing.assert_array_equal(vol.hu[:, 0, 0], 100 * np.arange(7) + 5)
    assert vol.meta["source_paths"] == [str(p) for p in paths]
    z = [vol.kji_to_lps([k, 0, 0])[2] for k in range(7)]
    np.testing.assert_allclose(np.diff(z), 2.5)


def test_feet_first_slice_order_keeps_anatomy_at_the_same_lps_position(tmp_path):
    """The same stored slab written head-first and feet-first puts each value at the same z."""
    stored = (np.arange(8)[:, None, None] * 50 + np.zeros((8, 5, 5), int)).astype(np.int32) + 10
    write_ct_series(tmp_path / "hf", stored=stored, origin_lps_mm=(0, 0, -50), spacing_mm=(1, 1, 1.5),
                    rescale_intercept=0)
    # feet-first: the same anatomy, slices stacked downwards from the top slice
    write_ct_series(tmp_path / "ff", stored=stored[::-1], origin_lps_mm=(0, 0, -50 + 7 * 1.5),
                    spacing_mm=(1, 1, 1.5), row_dir=(1, 0, 0), col_dir=(0, -1, 0), rescale_intercept=0)
    hf, ff = load_study(tmp_path / "hf"), load_study(tmp_path / "ff")
    for z_index in range(8):
        z = -50 + 1.5 * z_index
        k_hf = hf.lps_to_kji([0, 0, z])[0]
        k_ff = ff.lps_to_kji([0, 0, z])[0]
        assert hf.hu[int(round(k_hf)), 0, 0] == ff.hu[int(round(k_ff)), 0, 0] == 10 + 50 * z_index


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000_lossless"])
def test_compressed_series_decode_to_the_same_voxels(tmp_path, ts):
    # 64x64: OpenJPEG's default 6 resolution levels need tiles of at least 32 pixels
    write_ct_series(tmp_path / "native", (4, 64, 64), names="ordered", seed=1)
    write_ct_series(tmp_path / "comp", (4, 64, 64), names="ordered", seed=1, transfer_syntax=ts)
    native, comp = load_study(tmp_path / "native"), load_study(tmp_path / "comp")
    np.testing.assert_array_equal(native.hu, comp.hu)
    assert comp.meta["transfer_syntax_uid"] == str(ts)
    assert_same_as_sitk(comp, tmp_path / "comp")


@pytest.mark.parametrize("tool,args,ts", [
    ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),   # JPEG lossless, process 14, SV1
    ("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80"),   # JPEG-LS lossless
], ids=["jpeg_lossless_sv1", "jpegls_lossless"])
def test_dcmtk_compressed_series_decode_to_the_same_voxels(tmp_path, tool, args, ts):
    """Compressed by an independent encoder (DCMTK), decoded by pydicom's pylibjpeg handlers."""
    import shutil
    import subprocess

    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (Debian package dcmtk) is not installed")
    paths = write_ct_series(tmp_path / "native", (4, 32, 40), names="ordered", seed=2)
    (tmp_path / "comp").mkdir()
    for p in paths:
        subprocess.run([tool, *args, str(p), str(tmp_path / "comp" / p.name)], check=True, capture_output=True)
    native, comp = load_study(tmp_path / "native"), load_study(tmp_path / "comp")
    assert comp.meta["transfer_syntax_uid"] == ts
    np.testing.assert_array_equal(native.hu, comp.hu)
    assert_same_as_sitk(comp, tmp_path / "comp")


def test_rescale_slope_and_intercept_applied(tmp_path):
    stored = np.arange(5 * 4 * 4).reshape(5, 4, 4).astype(np.int32) * 3 - 100
    write_ct_series(tmp_path, stored=stored, signed=True, rescale_slope=0.5, rescale_intercept=-1000.25,
                    names="ordered")
    vol = load_study(tmp_path)
    np.testing.assert_allclose(vol.hu, stored * 0.5 - 1000.25, rtol=0, atol=1e-4)
    assert_same_as_sitk(vol, tmp_path, atol_hu=1e-3)


def test_bits_stored_12_sign_extended_and_masked(tmp_path):
    """Stored values live in the low 12 bits; high bits carry junk that must not change HU."""
    values = np.array([-2048, -1, 0, 1, 2047, -1000], np.int16)
    stored = np.tile(values, (3, 2, 1)).astype(np.int32)  # (3 slices, 2 rows, 6 cols)

    def bits12(k, ds):
        ds.BitsStored, ds.HighBit = 12, 11
        a = np.frombuffer(ds.PixelData, np.int16).copy()
        a = (a.astype(np.uint16) & 0x0FFF) | 0x5000  # junk in bits 12-15
        ds.PixelData = a.tobytes()

    write_ct_series(tmp_path / "signed", stored=stored, signed=True, rescale_intercept=0, edit=bits12)
    np.testing.assert_array_equal(load_study(tmp_path / "signed").hu, stored.astype(np.float32))

    unsigned = np.abs(stored) % 4096
    write_ct_series(tmp_path / "unsigned", stored=unsigned, signed=False, rescale_intercept=-1024, edit=bits12)
    np.testing.assert_array_equal(load_study(tmp_path / "unsigned").hu, unsigned - 1024.0)


def test_meta_is_json_ready_complete_and_free_of_patient_identifiers(tmp_path):
    def who(k, ds):
        ds.PatientName = "ROE^RICHARD"
        ds.PatientID = "MRN-998877"
        ds.PatientBirthDate = "19500101"

    paths = write_ct_series(tmp_path, (4, 8, 8), names="shuffled", kernel="B70f", description="Spine bone",
                            series_uid="1.2.826.0.1.3680043.99.1", study_uid="1.2.826.0.1.3680043.99.2",
                            frame_uid="1.2.826.0.1.3680043.99.3", edit=who)
    vol = load_study(tmp_path)
    text = json.dumps(vol.meta)
    for ident in ("ROE", "RICHARD", "MRN-998877", "19500101"):
        assert ident not in text
    m = vol.meta
    assert m["modality"] == "CT" and m["input_kind"] == "dicom" and m["manufacturer"] == "SYNTHETIC"
    assert m["series_instance_uid"] == "1.2.826.0.1.3680043.99.1"
    assert m["study_instance_uid"] == "1.2.826.0.1.3680043.99.2"
    assert m["frame_of_reference_uid"] == "1.2.826.0.1.3680043.99.3"
    assert m["convolution_kernel"] == "B70f" and m["series_description"] == "Spine bone"
    assert m["slice_thickness_mm"] == 1.0 and m["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
    assert m["source_paths"] == [str(p) for p in paths]
    assert len(set(m["sop_instance_uids"])) == 4
    assert "Picked series #3 'Spine bone'" in m["selection_reason"]


def test_nifti_scl_slope_and_inter_applied(tmp_path):
    import nibabel as nib

    raw = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.8, 1.5, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    vol = load_study(tmp_path / "ct.nii.gz")
    # nibabel array is [x, y, z] (i, j, k); ours is hu[k, j, i]
    np.testing.assert_array_equal(vol.hu, np.transpose(raw * 2.0 - 1024.0, (2, 1, 0)))
    np.testing.assert_allclose(vol.spacing_mm, [0.7, 0.8, 1.5])
    # RAS identity affine is LPS diag(-1, -1, 1)
    np.testing.assert_allclose(vol.direction, np.diag([-1.0, -1.0, 1.0]))
    assert vol.meta["input_kind"] == "nifti"


# ------------------------------------------------------------------------- real data (shared/)
def test_real_jpeg2000_series_with_empty_uids_equals_simpleitk(realdata):
    folder = realdata / "example_ct_dicom"
    vol = load_study(folder)
    assert vol.hu.shape == (20, 512, 512)
    assert_same_as_sitk(vol, folder)
    np.testing.assert_allclose(vol.spacing_mm, [0.9765625, 0.9765625, 2.0])
    assert vol.meta["series_instance_uid"] == "" and vol.meta["study_instance_uid"] == ""
    assert vol.meta["convolution_kernel"] == "Br38f" and vol.meta["manufacturer"] == "SIEMENS"
    assert all(vol.meta["sop_instance_uids"])  # taken from the file meta when the dataset's is empty
    assert -1100 < vol.hu.min() < -900 and 1000 < vol.hu.max() < 4000


def test_real_nifti_geometry_equals_simpleitk_and_nibabel(realdata):
    import nibabel as nib

    path = realdata / "example_ct.nii.gz"
    vol = load_study(path)
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(vol.origin_lps_mm, img.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(vol.spacing_mm, img.GetSpacing())
    np.testing.assert_allclose(vol.direction.ravel(), img.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(vol.hu, sitk.GetArrayFromImage(img).astype(np.float32))
    # independent check: nibabel's RAS affine flipped to LPS maps the same voxel to the same point
    ras = nib.load(str(path)).affine
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    ijk = np.array([[0, 0, 0], [121, 100, 111], [37, 58, 12]], float)
    expected = (lps_affine @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(vol.ijk_to_lps(ijk), expected, atol=1e-4)
    assert vol.hu.shape == (112, 101, 122)
    assert -1300 < vol.hu.min() < -900 and 2000 < vol.hu.max() < 4000
    assert -200 < float(np.median(vol.hu)) < 200 or float(np.median(vol.hu)) < -800  # air or soft tissue


# ------------------------------------------------------------------ sample_data phantom studies
SAMPLE_LAYOUTS = {
    "fine_head_first": ("fine", False),
    "standard_head_first": ("standard", False),
    "coarse_head_first": ("coarse", False),
    "coarse_feet_first": ("coarse", True),
    "standard_feet_first": ("standard", True),
}


@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory):
    """Phantom studies (bone + localizer + thick soft series, random nested names) at the three
    test spacings, head-first and feet-first; trimmed to two vertebrae to stay small."""
    import dataclasses

    from sample_data.dicom_writer import read_truth, write_dicom_study
    from sample_data.phantom import make_phantom, spacing_specs

    specs = spacing_specs(seed=3, noise_hu=20.0, streaks=False)
    out = {}
    for name, (which, feet_first) in SAMPLE_LAYOUTS.items():
        spec = dataclasses.replace(specs[which], vertebrae=("L5", "S1"), feet_first=feet_first,
                                   fov_x_mm=(-30.0, 30.0), fov_y_mm=(-20.0, 40.0))
        folder = write_dicom_study(spec, tmp_path_factory.mktemp(name))
        phantom, _ = make_phantom(spec)
        out[name] = (folder, read_truth(folder), phantom)
    return out


@pytest.mark.parametrize("name", sorted(SAMPLE_LAYOUTS))
def test_phantom_study_loads_bone_series_equal_to_simpleitk(phantom_studies, name):
    folder, truth, _ = phantom_studies[name]
    vol = load_study(folder)
    bone_uid = truth["dicom"]["bone_series_uid"]
    assert vol.meta["series_instance_uid"] == bone_uid
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), bone_uid, False, True)
    r = sitk.ImageSeriesReader()
    r.SetFileNames(files)
    img = r.Execute()
    np.testing.assert_array_equal(vol.hu, sitk.GetArrayFromImage(img).astype(np.float32))
    np.testing.assert_allclose(vol.origin_lps_mm, img.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(vol.spacing_mm, img.GetSpacing(), rtol=1e-9)
    np.testing.assert_allclose(vol.direction.ravel(), img.GetDirection(), atol=1e-9)
    assert sorted(vol.meta["source_paths"]) == sorted(files)


@pytest.mark.parametrize("name", sorted(SAMPLE_LAYOUTS))
def test_phantom_study_reproduces_the_phantom_volume_and_geometry(phantom_studies, name):
    folder, _, phantom = phantom_studies[name]
    vol = load_study(folder)
    np.testing.assert_allclose(vol.spacing_mm, phantom.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(vol.direction, phantom.direction, atol=1e-6)
    np.testing.assert_allclose(vol.origin_lps_mm, phantom.origin_lps_mm, atol=1e-4)
    # stored as int16 with intercept -1024: HU survive to within rounding (0.5 HU), except clipped metal
    expected = np.clip(np.rint(phantom.hu + 1024), -32768, 32767) - 1024
    np.testing.assert_array_equal(vol.hu, expected.astype(np.float32))


def test_phantom_study_picks_bone_over_localizer_and_thick_soft_series(phantom_studies):
    folder, truth, _ = phantom_studies["standard_head_first"]
    vol = load_study(folder)
    reason = vol.meta["selection_reason"]
    roles = {s["role"]: s for s in truth["dicom"]["series"]}
    assert vol.meta["series_instance_uid"] == roles["bone"]["uid"]
    assert f"Picked series #2 '{roles['bone']['description']}'" in reason
    assert "bone/sharp kernel" in reason and "thinnest slices" in reason
    assert f"'{roles['localizer']['description']}': localizer" in reason
    assert f"'{roles['soft']['description']}': reformat/derived, thicker slices (5 mm)" in reason
    assert len(vol.meta["source_paths"]) == roles["bone"]["n_files"]
    assert vol.meta["convolution_kernel"] == "BONE" and vol.meta["input_kind"] == "dicom"
    text = json.dumps(vol.meta)
    from sample_data.dicom_writer import PATIENT_NAME, patient_id

    assert PATIENT_NAME.split("^")[0] not in text and patient_id(3) not in text


@pytest.mark.parametrize("tilted_plane", [False, True], ids=["positions_sheared", "image_plane_tilted"])
@pytest.mark.parametrize("tilt_deg", [12.0, -20.0])
def test_gantry_tilted_series_resampled_onto_orthogonal_grid(tmp_path, tilt_deg, tilted_plane):
    """A linear HU field sampled on a sheared (tilted) stack comes back exact on the orthogonal grid.

    Two ways scanners write tilt: axial image planes whose positions drift in y from slice to
    slice, or image planes tilted about x (ImageOrientationPatient) stacked straight along z.
    """
    nk, nj, ni, dz = 8, 40, 30, 2.0
    t = np.radians(tilt_deg)
    origin = np.array([-15.0, -20.0, -40.0])
    row = np.array([1.0, 0.0, 0.0])
    if tilted_plane:
        col = np.array([0.0, np.cos(t), np.sin(t)])
        step = np.array([0.0, 0.0, dz])                  # table moves along z
        normal = np.cross(row, col)
        spacing_along_normal = dz * normal[2]
    else:
        col = np.array([0.0, 1.0, 0.0])
        step = np.array([0.0, np.tan(t) * dz, dz])       # positions drift along y
        normal = np.array([0.0, 0.0, 1.0])
        spacing_along_normal = dz

    def field(x, y, z):
        return 3.0 * x + 2.0 * y + 4.0 * z + 500.0

    i, j = np.meshgrid(np.arange(ni), np.arange(nj), indexing="xy")
    pix = [origin + k * step + i[..., None] * row + j[..., None] * col for k in range(nk)]
    stored = np.stack([field(p[..., 0], p[..., 1], p[..., 2]) for p in pix])
    write_ct_series(tmp_path, stored=np.rint(stored).astype(np.int32), origin_lps_mm=origin, spacing_mm=(1.0, 1.0, dz),
                    row_dir=row, col_dir=col, slice_step_lps_mm=step, signed=True, rescale_intercept=0.0,
                    names="shuffled")
    vol = load_study(tmp_path)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(abs(tilt_deg), abs=0.01)
    assert "Gantry tilt" in vol.meta["selection_reason"]
    np.testing.assert_allclose(vol.direction, np.column_stack([row, col, normal]), atol=1e-6)
    np.testing.assert_allclose(vol.spacing_mm, [1.0, 1.0, spacing_along_normal], atol=1e-5)
    np.testing.assert_allclose(vol.origin_lps_mm, origin, atol=1e-6)
    x, y, z = vol.voxel_grid_lps()
    expected = field(x, y, z)
    # inside each slice's acquired field of view the resampled values match the field
    off = np.array([(k * step) - (k * step @ normal) * normal for k in range(nk)])
    shift_rows = (off @ col)[:, None, None]
    jj = np.arange(nj)[None, :, None]
    inside = np.broadcast_to((jj - shift_rows >= 0) & (jj - shift_rows <= nj - 1), vol.hu.shape)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(vol.hu[inside], expected[inside], atol=0.51)
    assert np.all(vol.hu[~inside] < expected[~inside])  # outside: air or blended with air


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(quat=st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: np.linalg.norm(q) > 0.3),
       spacing=st.tuples(st.sampled_from([0.3, 0.5, 0.78125]), st.sampled_from([0.5, 0.7, 1.0]),
                         st.sampled_from([0.6, 1.0, 1.25, 3.0])),
       order=st.sampled_from(["shuffled", "ordered", "reversed"]))
def test_any_orientation_and_order_equals_simpleitk(tmp_path_factory, quat, spacing, order):
    """Random rotations of the image plane, spacings and file orders: same as SimpleITK."""
    w, x, y, z = np.asarray(quat) / np.linalg.norm(quat)
    rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                    [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                    [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    folder = tmp_path_factory.mktemp("rot")
    write_ct_series(folder, (5, 12, 10), spacing_mm=spacing, row_dir=rot[:, 0], col_dir=rot[:, 1], names=order)
    assert_same_as_sitk(load_study(folder), folder)


def test_deflated_series_loads_like_native(tmp_path):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    paths = write_ct_series(tmp_path / "native", (4, 16, 16), names="ordered", signed=True, seed=4)
    (tmp_path / "deflated").mkdir()
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / "deflated" / p.name, enforce_file_format=True)
    native, deflated = load_study(tmp_path / "native"), load_study(tmp_path / "deflated")
    assert deflated.meta["transfer_syntax_uid"] == str(DeflatedExplicitVRLittleEndian)
    np.testing.assert_array_equal(native.hu, deflated.hu)
    np.testing.assert_allclose(native.origin_lps_mm, deflated.origin_lps_mm)


def test_big_endian_series_written_by_dcmtk_loads_like_native(tmp_path):
    import shutil
    import subprocess

    if shutil.which("dcmconv") is None:
        pytest.skip("dcmconv (Debian package dcmtk) is not installed")
    paths = write_ct_series(tmp_path / "native", (4, 16, 16), names="ordered", signed=True, seed=5)
    (tmp_path / "be").mkdir()
    for p in paths:
        subprocess.run(["dcmconv", "+tb", str(p), str(tmp_path / "be" / p.name)], check=True, capture_output=True)
    native, be = load_study(tmp_path / "native"), load_study(tmp_path / "be")
    assert be.meta["transfer_syntax_uid"] == "1.2.840.10008.1.2.2"
    np.testing.assert_array_equal(native.hu, be.hu)
