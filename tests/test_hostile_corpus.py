"""A corpus of hostile inputs, each run through the real command line (``flows.cli.main``).

Every case is built here, in the test, from a clean tiny CT series (pydicom), NIfTI file
(nibabel) or folder spoiled in exactly one way. For each one the contract (CONTRACT.md,
"Exit status") must hold:

- exit status 2 for input that cannot be analyzed;
- exactly one plain line on stderr, naming the file or series and the reason, no traceback;
- a fresh OUTDIR is left without measurements.json (nothing half-written), and an OUTDIR
  that already holds an earlier complete result is left byte-for-byte as it was.

Some hostile inputs must *not* be refused: a compressed series is decoded (pylibjpeg
plugins), two series interleaved in one folder are told apart, a study without hardware is
analyzed and says so, and unicode or spaces in paths change nothing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000Lossless, JPEGLSLossless, RLELossless, ExplicitVRLittleEndian,
                         generate_uid)

import flows.analyze  # noqa: F401  - Prefect configures its logging on import, as in a fresh `fusionct` process
from flows.cli import main as cli_main
from pipeline.loading import load_study
from pipeline.loading_bench import write_ct_series

SHAPE = (6, 16, 16)
DESC = "Hostile bone 1mm"
REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "realdata" / "totalseg_example_ct" / "example_ct.nii.gz"


# ------------------------------------------------------------------------------ helpers
def series(folder: Path, **kw) -> list[Path]:
    """A clean tiny CT series (ordered file names ``IM00000.dcm``...), optionally edited."""
    kw.setdefault("names", "ordered")
    kw.setdefault("description", DESC)
    return write_ct_series(folder, kw.pop("shape", SHAPE), **kw)


def earlier_result(outdir: Path) -> dict[str, bytes]:
    """Fill ``outdir`` with a complete earlier result and return its snapshot."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "measurements.json").write_text(json.dumps(
        {"schema_version": "1.0", "status": "draft", "note": "earlier complete run"}, indent=2))
    for name in ("levels.csv", "screws.csv", "cages.csv"):
        (outdir / name).write_text("level,bridging_fraction\nL4-L5,0.7\n")
    (outdir / "report.html").write_text("<html><body>earlier report</body></html>")
    return snapshot(outdir)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes); hidden files included."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def run_cli(capfd, *argv: str) -> Run:
    """``fusionct <argv>`` in this process; stdout and stderr captured at the descriptor level."""
    capfd.readouterr()
    rc = cli_main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return Run(rc, out, err)


def assert_refused(run: Run, *, where: str, words: tuple[str, ...], status: int = 2) -> str:
    """The contract's refusal: exit status, one plain line naming ``where``, the reason words."""
    assert run.rc == status, f"exit {run.rc}, stderr: {run.err!r}"
    assert len(run.err_lines) == 1, f"want exactly one stderr line, got: {run.err!r}"
    line = run.err_lines[0]
    assert "Traceback" not in run.err and 'File "' not in run.err
    assert line.startswith("fusionct: ")
    assert where in line, f"{where!r} not named in {line!r}"
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
    assert "results written" not in run.out
    return line


def needs_full_flow():
    """Skip (with the reason) while the detection/measurement steps are not in the tree."""
    for mod in ("pipeline.detect", "pipeline.measure"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not written yet; this case needs the whole flow")


def needs_real_ct() -> Path:
    if not REAL_CT.exists():
        pytest.skip(f"real CT not available: {REAL_CT} is absent (it lives in the workplace's shared/ folder)")
    return REAL_CT


@pytest.fixture(scope="module", autouse=True)
def _prefect(prefect_harness):
    """All CLI runs of this module share one temporary Prefect server."""
    yield


# ----------------------------------------------------------------------- corpus builders
# each builder makes the hostile input under ``base`` and returns (INPUT, where, words):
# ``where`` is what the stderr line must name (a file or the series), ``words`` the reason.
Case = Callable[[Path], tuple[Path, str, tuple[str, ...]]]


def truncated_pixel_data(base):
    paths = series(base / "in")
    paths[2].write_bytes(paths[2].read_bytes()[:-100])
    return base / "in", paths[2].name, ("truncated",)


def truncated_header(base):
    paths = series(base / "in")
    paths[4].write_bytes(paths[4].read_bytes()[:300])
    return base / "in", paths[4].name, ("corrupt",)


def cut_before_pixel_data(base):
    paths = series(base / "in")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: data.rfind(b"\xe0\x7f\x10\x00")])
    return base / "in", paths[1].name, ("pixel data",)


def missing_pixel_data(base):
    def edit(k, ds):
        if k == 3:
            del ds.PixelData

    paths = series(base / "in", edit=edit)
    return base / "in", paths[3].name, ("no (integer) pixel data",)


def empty_file_in_place_of_a_slice(base):
    paths = series(base / "in")
    paths[3].write_bytes(b"")
    return base / "in", DESC, ("slice is missing",)


def garbage_after_preamble(base):
    series(base / "in")
    (base / "in" / "IM99999.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    return base / "in", "IM99999.dcm", ("corrupt",)


def undecodable_transfer_syntax(base):
    paths = series(base / "in")
    ds = pydicom.dcmread(paths[2])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: nobody decodes it
    ds.PixelData = encapsulate([bytes(range(200))])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[2], enforce_file_format=True)
    return base / "in", paths[2].name, ("1.2.840.10008.1.2.4.100", "cannot be decoded")


def newline_in_transfer_syntax_uid(base):
    """A transfer syntax UID with a newline in it (found by the fuzz test): the quoted UID
    must not split the error over two lines."""
    paths = series(base / "in", transfer_syntax=ExplicitVRLittleEndian)
    data = paths[2].read_bytes()
    ts = b"1.2.840.10008.1.2.1\x00"
    assert ts in data
    paths[2].write_bytes(data.replace(ts, b"1\n2.840.10008.1.2.1\x00", 1))
    return base / "in", paths[2].name, ("transfer syntax", "1\\n2.840.10008.1.2.1")


def corrupt_jpeg2000_codestream(base):
    paths = series(base / "in", shape=(6, 64, 64), transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(paths[4])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(300)])  # SOC/SIZ markers, then zeros
    ds.save_as(paths[4], enforce_file_format=True)
    return base / "in", paths[4].name, ("JPEG 2000", "cannot be decoded")


def corrupt_rle_frame(base):
    paths = series(base / "in", transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[1])
    # an RLE header announcing one segment where 16-bit pixels need two
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x40\x00\x00\x00" + bytes(56) + b"\x00\x05" * 4])
    ds.save_as(paths[1], enforce_file_format=True)
    return base / "in", paths[1].name, ("RLE",)


def zero_pixel_spacing(base):
    def edit(k, ds):
        ds.PixelSpacing = ["0", "0"]

    paths = series(base / "in", edit=edit)
    return base / "in", paths[0].name, ("zero or negative PixelSpacing",)


def negative_pixel_spacing(base):
    def edit(k, ds):
        ds.PixelSpacing = ["-0.5", "0.5"]

    paths = series(base / "in", edit=edit)
    return base / "in", paths[0].name, ("zero or negative PixelSpacing",)


def zero_slice_spacing(base):
    def edit(k, ds):
        ds.ImagePositionPatient = ["-100", "-120", "-300"]  # every slice at the same place

    series(base / "in", edit=edit)
    return base / "in", DESC, ("duplicate slice position",)


def duplicate_slice_file(base):
    paths = series(base / "in")
    shutil.copyfile(paths[2], base / "in" / "IM00002 copy.dcm")
    return base / "in", "IM00002", ("duplicate slice position",)


def two_acquisitions_sharing_one_series_uid(base):
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    series(base / "in" / "a", series_uid=uid, study_uid=study, frame_uid=frame)
    series(base / "in" / "b", series_uid=uid, study_uid=study, frame_uid=frame, kernel="B30f", seed=1)
    return base / "in", DESC, ("duplicate slice position",)


def missing_slice(base):
    paths = series(base / "in")
    os.remove(paths[3])
    return base / "in", DESC, ("slice is missing", "2.000 mm")


def mixed_frames_of_reference(base):
    other = generate_uid()

    def edit(k, ds):
        if k == 5:
            ds.FrameOfReferenceUID = other

    paths = series(base / "in", edit=edit)
    return base / "in", paths[5].name, ("mixed frames of reference",)


def mixed_orientation(base):
    def edit(k, ds):
        if k == 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]

    paths = series(base / "in", edit=edit)
    return base / "in", paths[2].name, ("mixed orientation",)


def shear_beyond_any_gantry_tilt(base):
    series(base / "in", slice_step_lps_mm=(0.0, np.tan(np.radians(50.0)), 1.0))
    return base / "in", DESC, ("sheared by 50.0 degrees", "gantry")


def single_slice(base):
    series(base / "in", shape=(1, 16, 16))
    return base / "in", DESC, ("single slice",)


def absurd_image_size(base):
    def edit(k, ds):
        ds.Rows, ds.Columns = 60000, 60000

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("absurd image size", "60000")


def absurd_pixel_spacing(base):
    def edit(k, ds):
        ds.PixelSpacing = ["1e6", "1e6"]

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("absurd PixelSpacing",)


def nan_rescale_slope(base):
    def edit(k, ds):
        ds.RescaleSlope = "NaN"

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("invalid rescale", "NaN")


def overflow_after_rescale(base):
    def edit(k, ds):
        ds.RescaleSlope = "1e38"

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("rescale overflows",)


def infinite_rescale_intercept(base):
    def edit(k, ds):
        ds.RescaleIntercept = "-inf"

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("invalid rescale",)


def multi_frame_image(base):
    def edit(k, ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("multi-frame",)


def color_image(base):
    def edit(k, ds):
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = ds.PixelData * 3

    series(base / "in", edit=edit)
    return base / "in", "IM0000", ("3 samples per pixel",)


def mr_series(base):
    series(base / "in", modality="MR", description="T2 sag lumbar")
    return base / "in", "T2 sag lumbar", ("not CT", "MR")


def pet_series(base):
    series(base / "in", modality="PT", description="PET WB")
    return base / "in", "PET WB", ("not CT", "PT")


def structured_report_only(base):
    folder = base / "in"
    folder.mkdir(parents=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "SR", 99, "Dose report"
    ds.save_as(folder / "sr.dcm", enforce_file_format=True)
    return folder, "Dose report", ("not CT", "SR")


def localizer_only(base):
    series(base / "in", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="Topogram")
    return base / "in", "Topogram", ("localizer",)


def empty_folder(base):
    (base / "in" / "sub" / "deeper").mkdir(parents=True)
    return base / "in", "in", ("empty",)


def no_dicom_files(base):
    folder = base / "in"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"notes{i}.txt").write_text("not an image\n" * 10)
    return folder, "in", ("no DICOM files",)


def missing_input(base):
    return base / "no such study", "no such study", ("no such file or folder",)


def named_pipe_as_input(base):
    p = base / "scan.nii.gz"
    os.mkfifo(p)  # opening it for reading would block for ever
    return p, "scan.nii.gz", ("not a folder",)


def dangling_symlink_as_input(base):
    p = base / "study link"
    p.symlink_to(base / "gone")
    return p, "study link", ("no such file or folder",)


def single_dicom_file_as_input(base):
    paths = series(base / "in")
    return paths[0], paths[0].name, ("must be NIfTI",)


def special_files_and_symlink_loop(base):
    # a named pipe (reading it would hang) and a folder symlink pointing at its own parent
    series(base / "in", modality="MR", description="MR beside a fifo")
    os.mkfifo(base / "in" / "pipe.dcm")
    os.symlink(base / "in", base / "in" / "loop")
    return base / "in", "MR beside a fifo", ("not CT",)


def non_utf8_file_name(base):
    paths = series(base / "in")
    weird = os.fsencode(base / "in") + b"/IM\xff\xfe bad name.dcm"
    data = paths[2].read_bytes()
    os.remove(paths[2])
    with open(weird, "wb") as fh:
        fh.write(data[:-100])  # the oddly named file is also truncated
    return base / "in", "bad name.dcm", ("truncated",)


def unicode_and_spaces_in_paths(base):
    folder = base / "Ünïcødé päth 日本" / "study with  spaces"
    paths = series(folder)
    victim = paths[3].with_name("Schnitt ✓ 3.dcm")
    paths[3].rename(victim)
    victim.write_bytes(victim.read_bytes()[:-64])
    return folder, "Schnitt ✓ 3.dcm", ("truncated",)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray, qform: bool = True) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=1)
    if qform:
        img.header.set_qform(affine, code=1)
    else:
        img.header.set_qform(None, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def nifti_nan_affine(base):
    aff = np.eye(4)
    aff[1, 3] = np.nan
    p = _nifti(base / "ct nan.nii.gz", np.zeros((8, 8, 8), np.int16), aff)
    return p, p.name, ("broken NIfTI affine", "NaN")


def nifti_singular_affine(base):
    aff = np.eye(4)
    aff[:3, 2] = aff[:3, 0]  # the k axis runs along the i axis: no volume
    p = _nifti(base / "flat.nii", np.zeros((8, 8, 8), np.int16), aff, qform=False)
    return p, p.name, ("broken NIfTI affine", "singular")


def nifti_overflow_after_scl_slope(base):
    import nibabel as nib

    img = nib.Nifti1Image(np.full((8, 8, 8), 1000, np.int16), np.eye(4))
    img.header.set_slope_inter(1e38, 0.0)  # 1000 * 1e38 overflows float32
    p = base / "overflow.nii"
    nib.save(img, str(p))
    return p, p.name, ("NaN or infinity",)


def nifti_truncated(base):
    """A .nii file cut short (a failed copy): its voxels would come back zero-filled."""
    p = _nifti(base / "cut.nii", np.arange(32 ** 3, dtype=np.int16).reshape(32, 32, 32), np.eye(4))
    p.write_bytes(p.read_bytes()[: 20000])
    return p, p.name, ("truncated",)


def nifti_truncated_gzip_stream(base):
    """A .nii.gz whose compressed stream is cut short."""
    p = _nifti(base / "cut.nii.gz", np.arange(32 ** 3, dtype=np.int16).reshape(32, 32, 32), np.eye(4))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return p, p.name, ("NIfTI",)


def nifti_not_nifti(base):
    p = base / "fake.nii.gz"
    p.write_bytes(b"this is not a nifti file at all" * 4)
    return p, p.name, ("not a readable NIfTI file",)


def nifti_four_d(base):
    p = _nifti(base / "fmri.nii.gz", np.zeros((8, 8, 8, 3), np.int16), np.eye(4))
    return p, p.name, ("one 3-D volume",)


CORPUS: dict[str, Case] = {f.__name__: f for f in (
    truncated_pixel_data, truncated_header, cut_before_pixel_data, missing_pixel_data,
    empty_file_in_place_of_a_slice, garbage_after_preamble, undecodable_transfer_syntax,
    newline_in_transfer_syntax_uid,
    corrupt_jpeg2000_codestream, corrupt_rle_frame, zero_pixel_spacing, negative_pixel_spacing, zero_slice_spacing,
    duplicate_slice_file, two_acquisitions_sharing_one_series_uid, missing_slice,
    mixed_frames_of_reference, mixed_orientation, shear_beyond_any_gantry_tilt, single_slice, absurd_image_size,
    absurd_pixel_spacing, nan_rescale_slope, overflow_after_rescale, infinite_rescale_intercept,
    multi_frame_image, color_image, mr_series, pet_series, structured_report_only, localizer_only,
    empty_folder, no_dicom_files, missing_input, named_pipe_as_input, dangling_symlink_as_input,
    single_dicom_file_as_input,
    special_files_and_symlink_loop, non_utf8_file_name, unicode_and_spaces_in_paths,
    nifti_nan_affine, nifti_singular_affine, nifti_overflow_after_scl_slope, nifti_truncated,
    nifti_truncated_gzip_stream, nifti_not_nifti, nifti_four_d,
)}

#: Kinds that fail at different stages (scan, pixel read, decode, NIfTI, missing input), also
#: run into a fresh OUTDIR: it must not even be created.
FRESH_OUTDIR_KINDS = ("truncated_pixel_data", "corrupt_jpeg2000_codestream", "mr_series",
                      "missing_slice", "nifti_truncated", "missing_input", "non_utf8_file_name",
                      "special_files_and_symlink_loop")


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_hostile_input_refused_with_one_line_and_earlier_result_intact(tmp_path, capfd, kind):
    """Exit 2, one plain line naming the file/series and the reason; the OUTDIR, which holds
    an earlier complete result, is byte-for-byte unchanged (nothing added, nothing half-written)."""
    inp, where, words = CORPUS[kind](tmp_path)
    earlier = tmp_path / "out earlier"
    before = earlier_result(earlier)
    assert_refused(run_cli(capfd, "analyze", inp, "-o", earlier), where=where, words=words)
    assert snapshot(earlier) == before, "a refused run changed an earlier complete result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fusionct-staging")]


@pytest.mark.parametrize("kind", FRESH_OUTDIR_KINDS)
def test_hostile_input_leaves_a_fresh_outdir_uncreated(tmp_path, capfd, kind):
    inp, where, words = CORPUS[kind](tmp_path)
    fresh = tmp_path / "out fresh"
    assert_refused(run_cli(capfd, "analyze", inp, "-o", fresh), where=where, words=words)
    assert not (fresh / "measurements.json").exists()
    assert not snapshot(fresh), f"a refused run left files in a fresh OUTDIR: {sorted(snapshot(fresh))}"


def prefect_env() -> dict[str, str]:
    """Environment for a ``fusionct`` subprocess that talks to this session's Prefect server
    (no second temporary server to start) with its own caches."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env.pop("PREFECT_LOGGING_LEVEL", None)  # the CLI's own default must keep Prefect quiet
    return env


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unicode_and_spaces_in_paths", "non_utf8_file_name", "corrupt_rle_frame"])
def test_fusionct_process_refuses_with_one_line_even_in_the_c_locale(tmp_path, kind):
    """The real console script in a fresh process, under LC_ALL=C (ASCII locale): unicode and
    undecodable file names still give exit 2 and one line, no UnicodeEncodeError; a corrupt
    compressed frame gives one line too (no library's logged traceback before it)."""
    import subprocess

    inp, where, words = CORPUS[kind](tmp_path)
    env = prefect_env() | {"LC_ALL": "C", "LANG": "C"}
    exe = Path(sys.executable).with_name("fusionct")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "flows.cli"]),
           "analyze", str(inp), "-o", str(tmp_path / "out ✓")]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert_refused(Run(proc.returncode, proc.stdout.decode("utf-8", "replace"), err),
                   where=where, words=words)
    assert not (tmp_path / "out ✓").exists()


def test_corpus_has_at_least_fifteen_kinds():
    assert len(CORPUS) >= 15


def test_debug_flag_shows_the_traceback_the_plain_line_hides(tmp_path, capfd):
    inp, _, _ = mr_series(tmp_path)
    run = run_cli(capfd, "--debug", "analyze", inp, "-o", tmp_path / "out")
    assert run.rc == 2
    assert "Traceback" in run.err and "InputError" in run.err


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless, JPEGLSLossless],
                         ids=["rle", "jpeg2000", "jpegls"])
def test_compressed_transfer_syntaxes_decoded_to_the_native_values(tmp_path, ts):
    """Compressed series are decoded by the installed pylibjpeg plugins, not refused."""
    kw = dict(shape=(4, 64, 64), signed=True, rescale_intercept=0.0, seed=3)
    series(tmp_path / "native", **kw)
    series(tmp_path / "packed", transfer_syntax=ts, **kw)
    a, b = load_study(tmp_path / "native"), load_study(tmp_path / "packed")
    assert b.meta["transfer_syntax_uid"] == str(ts)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.origin_lps_mm, b.origin_lps_mm)


@pytest.mark.parametrize("ts", [pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian],
                         ids=["deflated", "big-endian"])
def test_deflated_and_big_endian_files_decoded_to_the_native_values(tmp_path, ts):
    """The whole dataset zlib-compressed, or big endian: pydicom inflates / byte-swaps it, so
    the series loads with the same voxels (it used to be refused as 'no pixel data')."""
    from pydicom.filewriter import dcmwrite

    paths = series(tmp_path / "in", seed=5)
    series(tmp_path / "plain", seed=5)
    big = ts == pydicom.uid.ExplicitVRBigEndian
    for p in paths:
        ds = pydicom.dcmread(p)
        if big:
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = ts
        dcmwrite(p, ds, little_endian=not big, implicit_vr=False, enforce_file_format=True)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(load_study(tmp_path / "in").hu, load_study(tmp_path / "plain").hu)


def test_gantry_tilt_is_resampled_and_reported_not_refused(tmp_path):
    """A 15 degree gantry tilt loads onto the orthogonal grid and says so (the loader's rule;
    a shear beyond any real gantry is refused, see the corpus)."""
    series(tmp_path / "in", slice_step_lps_mm=(0.0, np.tan(np.radians(15.0)), 1.0))
    vol = load_study(tmp_path / "in")
    assert abs(vol.meta["gantry_tilt_deg"] - 15.0) < 0.01
    assert "tilt" in vol.meta["selection_reason"].lower()
    assert np.all(np.isfinite(vol.hu))


def test_two_series_interleaved_in_one_folder_are_told_apart(tmp_path):
    """Bone and soft series shuffled into one folder (random names): the bone one is loaded
    whole, with its own geometry, and the choice is explained."""
    folder = tmp_path / "mixed"
    study = generate_uid()
    write_ct_series(folder, (8, 16, 16), kernel="B70f", description="Spine bone", study_uid=study,
                    spacing_mm=(0.8, 0.8, 1.0), seed=1)
    write_ct_series(folder, (5, 16, 16), kernel="B30f", description="Spine soft", study_uid=study,
                    spacing_mm=(0.8, 0.8, 1.0), origin_lps_mm=(-100.0, -120.0, -299.5), seed=2,
                    series_number=4)
    vol = load_study(folder)
    assert vol.hu.shape == (8, 16, 16)
    assert vol.meta["series_description"] == "Spine bone"
    assert "Spine soft" in vol.meta["selection_reason"]
    np.testing.assert_allclose(vol.spacing_mm, [0.8, 0.8, 1.0])


# ---------------------------------------------------------- OUTDIR that cannot be written
def _make_read_only(folder: Path) -> Callable[[], None]:
    """Make ``folder`` unwritable (chmod; as root also the immutable attribute); returns undo."""
    import subprocess

    os.chmod(folder, 0o555)
    undo = [lambda: os.chmod(folder, 0o755)]
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            undo.insert(0, lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True))
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        pass
    else:
        os.remove(folder / ".probe")
        for u in undo:
            u()
        pytest.skip("cannot make a folder read-only here (root without chattr)")

    def restore():
        for u in undo:
            u()

    return restore


def _good_small_input(base: Path) -> Path:
    """An input that loads (the real CT when present, else a small clean series)."""
    if REAL_CT.exists():
        link = base / "good input.nii.gz"
        link.symlink_to(REAL_CT)
        return link
    series(base / "good")
    return base / "good"


def test_read_only_outdir_refused_and_earlier_result_kept(tmp_path, capfd):
    inp = _good_small_input(tmp_path)
    out = tmp_path / "read only out"
    before = earlier_result(out)
    restore = _make_read_only(out)
    try:
        run = run_cli(capfd, "analyze", inp, "-o", out)
    finally:
        restore()
    assert_refused(run, where="read only out", words=("OUTDIR cannot be written",))
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fusionct-staging")]


def test_outdir_inside_read_only_parent_refused(tmp_path, capfd):
    inp = _good_small_input(tmp_path)
    parent = tmp_path / "locked parent"
    parent.mkdir()
    restore = _make_read_only(parent)
    try:
        run = run_cli(capfd, "analyze", inp, "-o", parent / "new out")
    finally:
        restore()
    assert_refused(run, where="new out", words=("OUTDIR cannot be written",))
    assert not (parent / "new out").exists()


def test_outdir_that_is_a_file_refused(tmp_path, capfd):
    inp = _good_small_input(tmp_path)
    out = tmp_path / "out.txt"
    out.write_text("a file, not a folder\n")
    run = run_cli(capfd, "analyze", inp, "-o", out)
    assert_refused(run, where="out.txt", words=("not a folder",))
    assert out.read_text() == "a file, not a folder\n"


# ------------------------------------------------------- hostile but analyzable (full flow)
@pytest.mark.slow
def test_study_without_hardware_is_analyzed_and_says_so_under_unicode_paths(tmp_path, capfd):
    """The real CT (no spinal hardware) behind a path with unicode and spaces: exit 0, a
    complete result that says no hardware was found, written under a unicode OUTDIR."""
    needs_full_flow()
    real = needs_real_ct()
    folder = tmp_path / "Patiënt map ✓" / "CT wervelkolom 日本"
    folder.mkdir(parents=True)
    inp = folder / "ct scan 1.nii.gz"
    inp.symlink_to(real)
    out = tmp_path / "résultats ünïcode" / "out dir"
    run = run_cli(capfd, "analyze", inp, "-o", out)
    assert run.rc == 0, run.err
    assert "Traceback" not in run.err
    doc = json.loads((out / "measurements.json").read_text(encoding="utf-8"))
    assert doc["screws"] == [] and doc["cages"] == []
    assert any("no spinal hardware" in n.lower() for n in doc.get("notes", [])), doc.get("notes")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "no spinal hardware" in html.lower()
    for name in ("levels.csv", "screws.csv", "cages.csv"):
        assert (out / name).exists()


@pytest.mark.slow
def test_real_dicom_ct_without_hardware_is_analyzed_and_says_so(tmp_path, capfd):
    """The real CT as DICOM (no spinal hardware): exit 0, no measurements invented, the
    notes and the report say no hardware was found (it used to end in exit 1 when the SR
    writer got nothing to report)."""
    needs_full_flow()
    dicom = needs_real_ct().parent / "example_ct_dicom"
    if not dicom.is_dir():
        pytest.skip(f"{dicom} is absent")
    out = tmp_path / "out"
    run = run_cli(capfd, "analyze", dicom, "-o", out)
    assert run.rc == 0, run.err
    doc = json.loads((out / "measurements.json").read_text(encoding="utf-8"))
    assert doc["screws"] == [] and doc["cages"] == []
    assert any("no spinal hardware" in n.lower() for n in doc["notes"]), doc["notes"]
    assert "no spinal hardware" in (out / "report.html").read_text(encoding="utf-8").lower()


@pytest.mark.slow
def test_two_interleaved_series_without_spine_analyzed_through_the_command_line(tmp_path, capfd):
    """Bone and soft series shuffled into one folder, a CT with no spine in it: the flow
    picks the bone series, says why, finds nothing, and says that (exit 0)."""
    needs_full_flow()
    folder = tmp_path / "mixed"
    study = generate_uid()
    write_ct_series(folder, (24, 48, 48), kernel="B70f", description="Spine bone", study_uid=study, seed=1)
    write_ct_series(folder, (6, 48, 48), kernel="B30f", description="Spine soft", study_uid=study,
                    spacing_mm=(0.8, 0.8, 4.0), seed=2, series_number=4)
    out = tmp_path / "out"
    run = run_cli(capfd, "analyze", folder, "-o", out)
    assert run.rc == 0, run.err
    doc = json.loads((out / "measurements.json").read_text(encoding="utf-8"))
    assert doc["input"]["series_description"] == "Spine bone"
    assert "Spine soft" in doc["input"]["selection_reason"]
    assert doc["input"]["shape"] == [48, 48, 24]
    assert any("no spinal hardware" in n.lower() for n in doc["notes"]), doc["notes"]
