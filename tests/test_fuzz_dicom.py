"""Fuzzing the DICOM entry points: whatever the bytes, the only failure is a clean InputError.

Hypothesis mutates the bytes of a real (tiny) CT series written by pydicom: bit flips,
overwritten runs, "interesting" 16/32-bit values (0, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF ...),
truncation, insertion and deletion, aimed mostly at the header where the parser lives. It
also builds headers from scratch with hostile values (garbage numbers, wrong counts,
absurd sizes, unknown transfer syntaxes, pixel data of the wrong length).

Entry points and what is allowed:

- ``pipeline.series.scan_dicom_folder``: never raises on a folder (bad files are counted);
- ``pipeline.loading.load_study``: returns a Volume whose voxels are finite and match its
  header sizes, or raises ``InputError`` with a one-line message; nothing else;
- the command line (``flows.cli.main``): exit status 2 with one stderr line whenever
  ``load_study`` refuses the input; never 1 (internal error).

The run is bounded for CI (``max_examples`` and no per-example deadline: the machine is
shared). ``FUSIONCT_FUZZ_SCALE`` multiplies the example counts for a longer local run.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, generate_uid

import flows.analyze  # noqa: F401  - Prefect configures its logging on import, as in a fresh `fusionct` process
from flows.cli import main as cli_main
from pipeline.errors import InputError
from pipeline.loading import load_study
from pipeline.loading_bench import write_ct_series
from pipeline.series import scan_dicom_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SCALE = float(os.environ.get("FUSIONCT_FUZZ_SCALE", "1"))
SHAPE = (3, 8, 8)
FUZZ = settings(deadline=None, derandomize=False, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
STATS: dict[str, dict[str, int]] = {}


def _count(test: str, outcome: str) -> None:
    STATS.setdefault(test, {}).setdefault(outcome, 0)
    STATS[test][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    """Quiet pydicom (hostile bytes make it chatty) and print the example counts at the end."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    yield
    pydicom_log.setLevel(level)
    lines = [f"{name}: {sum(c.values())} examples ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})"
             for name, c in sorted(STATS.items())]
    print(f"\nfuzz summary ({time.perf_counter() - t0:.1f} s):\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------- the seed series
def _seed_series(ts=pydicom.uid.ExplicitVRLittleEndian) -> list[bytes]:
    """A valid 3-slice CT series (ordered names), as the bytes of its files."""
    d = Path(tempfile.mkdtemp(prefix="fuzzseed_"))
    try:
        paths = write_ct_series(d, SHAPE, names="ordered", transfer_syntax=ts,
                                description="Fuzz bone", seed=4)
        return [p.read_bytes() for p in paths]
    finally:
        shutil.rmtree(d, ignore_errors=True)


SEED_NATIVE = _seed_series()
SEED_IMPLICIT = _seed_series(pydicom.uid.ImplicitVRLittleEndian)
SEED_RLE = _seed_series(pydicom.uid.RLELossless)
SEEDS = {"explicit": SEED_NATIVE, "implicit": SEED_IMPLICIT, "rle": SEED_RLE}
PIXEL_BYTES = int(np.prod(SHAPE[1:])) * 2

INTERESTING = [b"\x00\x00", b"\xff\xff", b"\x00\x80", b"\xff\x7f", b"\x00\x00\x00\x00",
               b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xfe\xff\x00\xe0",
               b"\xe0\x7f\x10\x00", b"\x01\x00\x00\x00", b"SQ", b"UN", b"OB", b"DS", b"\\\\", b"nan",
               b"1e308", b"-0"]


@st.composite
def mutation(draw, size: int):
    """One edit of a file of ``size`` bytes, mostly inside the header."""
    header_end = max(132, size - PIXEL_BYTES)
    pos = draw(st.one_of(st.integers(128, header_end), st.integers(0, size)))
    kind = draw(st.sampled_from(["flip", "overwrite", "interesting", "truncate", "insert", "delete"]))
    if kind == "flip":
        return ("flip", pos, draw(st.integers(0, 7)))
    if kind == "overwrite":
        return ("overwrite", pos, draw(st.binary(min_size=1, max_size=16)))
    if kind == "interesting":
        return ("overwrite", pos, draw(st.sampled_from(INTERESTING)))
    if kind == "truncate":
        return ("truncate", pos, None)
    if kind == "insert":
        return ("insert", pos, draw(st.binary(min_size=1, max_size=32)))
    return ("delete", pos, draw(st.integers(1, 64)))


def apply(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, len(b))
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << arg
        elif kind == "overwrite":
            b[pos:pos + len(arg)] = arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg]
    return bytes(b)


@st.composite
def mutated_series(draw):
    """(seed name, {file index: mutated bytes}) with one to three files spoiled."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    files = SEEDS[name]
    spoiled = draw(st.sets(st.integers(0, len(files) - 1), min_size=1, max_size=3))
    out = {}
    for i in spoiled:
        edits = draw(st.lists(mutation(len(files[i])), min_size=1, max_size=4))
        out[i] = apply(files[i], edits)
    return name, out


def write_folder(folder: Path, seed: str, spoiled: dict[int, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(SEEDS[seed]):
        (folder / f"IM{i:05d}.dcm").write_bytes(spoiled.get(i, data))
    return folder


def check_load(folder: Path, test: str):
    """The contract of load_study on any input: a sane Volume or a one-line InputError."""
    series = scan_dicom_folder(folder)  # never raises on a folder
    assert series.n_files == len(list(folder.iterdir()))
    try:
        vol = load_study(folder)
    except InputError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg
        assert msg.encode("utf-8")  # must encode (Prefect serialises it, stderr prints it)
        _count(test, "refused")
        return e
    assert vol.hu.dtype == np.float32 and vol.hu.ndim == 3
    assert np.all(np.isfinite(vol.hu)), "a loaded volume holds NaN or infinity"
    assert np.all(np.isfinite(vol.spacing_mm)) and np.all(vol.spacing_mm > 0)
    assert np.all(np.isfinite(vol.origin_lps_mm)) and np.all(np.isfinite(vol.direction))
    assert abs(abs(np.linalg.det(vol.direction)) - 1) < 1e-3
    _count(test, "loaded")
    return vol


# ------------------------------------------------------------------------------------ tests
@settings(FUZZ, max_examples=int(400 * SCALE))
@given(case=mutated_series())
def test_mutated_real_series_loads_or_is_refused_cleanly(case):
    seed, spoiled = case
    with tempfile.TemporaryDirectory(prefix="fuzz_") as d:
        check_load(write_folder(Path(d) / "in", seed, spoiled), "mutated series -> load_study")


# -------------------------------------------------------------------- headers from scratch
NUMBERS = st.one_of(st.sampled_from(["0", "-1", "1", "0.5", "1e308", "-1e308", "nan", "inf", "-inf", "",
                                     "abc", "1\\2", "  7 ", "1e-320", "99999999999999999"]),
                    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"{f:.6g}"[:16]))
SMALL_INTS = st.one_of(st.sampled_from([0, 1, 2, 8, 12, 16, 32, 64, 4096, 65535]), st.integers(0, 65535))


def _multi(n_min, n_max):
    return st.lists(NUMBERS, min_size=n_min, max_size=n_max).map(lambda v: "\\".join(v))


def _raw(ds: Dataset, keyword: str, vr: str, text: str) -> None:
    """Put ``text`` into the dataset as the element's raw bytes (pydicom would refuse to
    convert garbage on assignment; a file from the wild has no such scruples)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    value = text.encode("latin-1", "replace")
    if len(value) % 2:
        value += b" "
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


HOSTILE_US = st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 17, 24, 31, 32, 33, 64, 4097, 65535])
#: Technical fields of a CT image and how each can be spoiled: ("raw", VR, strategy) puts the
#: text as the element's raw bytes, ("US", strategy) an unsigned short.
SPOILERS = {
    "ImagePositionPatient": ("raw", "DS", _multi(0, 4)),
    "ImageOrientationPatient": ("raw", "DS", st.one_of(_multi(0, 7), st.sampled_from(
        ["1\\0\\0\\1\\0\\0", "0\\0\\0\\0\\0\\0", "1\\0\\0\\0\\0.7\\0.7", "0\\1\\0\\0\\0\\-1"]))),
    "PixelSpacing": ("raw", "DS", _multi(0, 3)),
    "RescaleSlope": ("raw", "DS", NUMBERS),
    "RescaleIntercept": ("raw", "DS", NUMBERS),
    "SliceThickness": ("raw", "DS", NUMBERS),
    "NumberOfFrames": ("raw", "IS", st.sampled_from(["0", "-1", "2", "abc", "99999999", ""])),
    "Rows": ("US", HOSTILE_US),
    "Columns": ("US", HOSTILE_US),
    "BitsAllocated": ("US", HOSTILE_US),
    "BitsStored": ("US", HOSTILE_US),
    "HighBit": ("US", HOSTILE_US),
    "PixelRepresentation": ("US", st.sampled_from([1, 2, 65535])),
    "SamplesPerPixel": ("US", st.sampled_from([0, 2, 3, 65535])),
    "Modality": ("raw", "CS", st.sampled_from(["MR", "", "ct", "CT\\MR", "SR"])),
    "FrameOfReferenceUID": ("raw", "UI", st.sampled_from(["", "1.2.3", "x" * 70])),
    "SeriesInstanceUID": ("raw", "UI", st.sampled_from(["", "1.2.3", "\x00" * 8])),
}
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50",
                     "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.3.4.5.6", "not-a-uid"]


@st.composite
def scratch_header(draw, k: int, uids: dict):
    """A sane 8x8 CT slice ``k`` of a series with up to three technical fields spoiled
    (hostile value or missing), the pixel data possibly of the wrong length and the
    transfer syntax possibly one the bytes do not follow."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.SeriesDescription, ds.ImageType = "CT", "Scratch", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    spoiled = draw(st.integers(0, 2)) == 0  # most slices of a series stay sane
    for name in draw(st.lists(st.sampled_from(sorted(SPOILERS)), min_size=1, max_size=3, unique=True)) if spoiled else []:
        spec = SPOILERS[name]
        tag = pydicom.datadict.tag_for_keyword(name)
        if draw(st.integers(0, 4)) == 0:
            if tag in ds:
                del ds[tag]
        elif spec[0] == "US":
            ds.add_new(tag, "US", draw(spec[1]))
        else:
            _raw(ds, name, spec[1], draw(spec[2]))
    if spoiled and draw(st.integers(0, 3)) == 0:
        ds.file_meta.TransferSyntaxUID = draw(st.sampled_from(TRANSFER_SYNTAXES))
    size = 8 * 8 * 2
    n_px = draw(st.sampled_from(["exact", "exact", "short", "long", "empty", "odd", "none"])) if spoiled else "exact"
    if n_px != "none":
        length = {"exact": size, "short": size // 2, "long": size * 3, "empty": 0, "odd": size + 1}[n_px]
        ds.add_new(0x7FE00010, draw(st.sampled_from(["OW", "OB"])), draw(st.binary(min_size=length, max_size=length)))
    return ds


@st.composite
def scratch_series(draw):
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    n = draw(st.integers(1, 5))
    return [draw(scratch_header(k, uids)) for k in range(n)]


def write_scratch(folder: Path, datasets) -> Path:
    from pydicom import config

    folder.mkdir(parents=True, exist_ok=True)
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for i, ds in enumerate(datasets):
            ts = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID))
            implicit = ts == pydicom.uid.ImplicitVRLittleEndian
            try:
                pydicom.filewriter.dcmwrite(folder / f"S{i:03d}.dcm", ds, implicit_vr=implicit,
                                            little_endian=True, enforce_file_format=True)
            except Exception:  # noqa: BLE001 - pydicom refused to write it: keep what it wrote
                pass
    finally:
        config.settings.writing_validation_mode = old
    return folder


@settings(FUZZ, max_examples=int(300 * SCALE))
@given(datasets=scratch_series())
def test_scratch_headers_with_hostile_values_load_or_are_refused_cleanly(datasets):
    with tempfile.TemporaryDirectory(prefix="fuzz_") as d:
        folder = write_scratch(Path(d) / "in", datasets)
        if not any(folder.iterdir()):
            _count("scratch headers -> load_study", "unwritable")
            return
        check_load(folder, "scratch headers -> load_study")


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def _prefect(prefect_harness):
    yield


@settings(FUZZ, max_examples=int(12 * SCALE))
@given(case=mutated_series())
def test_command_line_exits_2_with_one_line_whenever_loading_refuses(_prefect, capfd, case):
    """The same mutated inputs through ``fusionct analyze``: exit 2 and one line, never 1."""
    seed, spoiled = case
    with tempfile.TemporaryDirectory(prefix="fuzz_") as d:
        folder = write_folder(Path(d) / "in", seed, spoiled)
        try:
            load_study(folder)
        except InputError:
            pass
        else:
            _count("mutated series -> fusionct analyze", "loadable (not run)")
            return  # a loadable input is analyzed by the whole flow, tested elsewhere
        capfd.readouterr()
        rc = cli_main(["analyze", str(folder), "-o", str(Path(d) / "out")])
        out, err = capfd.readouterr()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, err
        assert len(lines) == 1 and lines[0].startswith("fusionct: cannot analyze"), err
        assert "Traceback" not in err
        assert not (Path(d) / "out").exists()
        _count("mutated series -> fusionct analyze", "exit 2")
