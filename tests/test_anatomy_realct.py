"""Detection on a real CT: the TotalSegmentator example (3 mm, T12 to the femora, a hip
prosthesis in the right femur, no spinal hardware), scored against TotalSegmentator's own
labels (model predictions, see SOURCE.txt). Skipped, with the reason, when ../shared is
absent.

Vertebra centres are compared with two centroids of the label of the same name: the part
of it inside TotalSegmentator's vertebral-body mask (what our centre means: the body) and
the whole label (body and posterior arch, whose centroid lies about a centimetre behind
the body's centre).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.volume import Volume

V2_LABELS = {26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1", 32: "T12"}
BODY_CENTRE_TOL_MM = 10.0
WHOLE_LABEL_TOL_MM = 15.0


def _load(path) -> Volume:
    """A NIfTI file as a Volume via SimpleITK (which reads it in LPS)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return Volume(sitk.GetArrayFromImage(img).astype(np.float32), img.GetOrigin(), img.GetSpacing(),
                  np.array(img.GetDirection()).reshape(3, 3))


@pytest.fixture(scope="module")
def real(realdata):
    from pipeline.detect import detect

    ct = _load(realdata / "example_ct.nii.gz")
    labels = _load(realdata / "labels" / "totalseg_v2_vertebrae.nii.gz").hu.astype(int)
    bodies = _load(realdata / "labels" / "totalseg_vertebrae_body_discs.nii.gz").hu.astype(int) == 1
    return ct, labels, bodies, detect(ct, Config())


def _centroids(ct, labels, bodies):
    out = {}
    for code, name in V2_LABELS.items():
        whole = np.argwhere(labels == code)
        body = np.argwhere((labels == code) & bodies)
        if len(body):
            out[name] = (ct.kji_to_lps(body.mean(0)), ct.kji_to_lps(whole.mean(0)))
    return out


def test_l1_to_l5_and_s1_found_and_named_from_the_sacrum(real):
    ct, labels, bodies, an = real
    names = [v.name for v in an.vertebrae]
    assert not an.named_by_position
    want = ["L1", "L2", "L3", "L4", "L5", "S1"]
    assert names[-6:] == want
    assert an.vertebrae[-1].is_sacrum
    assert [lv.name for lv in an.levels][-5:] == ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]


def test_vertebra_centres_match_totalsegmentator_labels(real, capsys):
    ct, labels, bodies, an = real
    ref = _centroids(ct, labels, bodies)
    rows = []
    for v in an.vertebrae:
        if v.name not in ref:
            continue
        body_c, whole_c = ref[v.name]
        d_body = float(np.linalg.norm(np.subtract(v.center_lps_mm, body_c)))
        d_whole = float(np.linalg.norm(np.subtract(v.center_lps_mm, whole_c)))
        rows.append((v.name, d_body, d_whole))
    with capsys.disabled():
        print("\nvertebra  centre to label-body centroid / to whole-label centroid (mm)")
        for name, db, dw in rows:
            print(f"{name:8s}  {db:5.1f} / {dw:5.1f}")
    assert {r[0] for r in rows} >= {"L1", "L2", "L3", "L4", "L5", "S1"}
    for name, db, dw in rows:
        assert db <= BODY_CENTRE_TOL_MM, name
        assert dw <= WHOLE_LABEL_TOL_MM, name


def test_lumbar_endplates_are_above_and_below_their_centres(real):
    """Each body's superior endplate lies above its centre along its axis, the inferior below,
    and consecutive bodies do not overlap (a disc space between them)."""
    _, _, _, an = real
    for v in an.vertebrae:
        assert v.superior_endplate.signed_distance_mm(v.center_lps_mm) < -8.0
        if not v.is_sacrum:
            assert v.inferior_endplate.signed_distance_mm(v.center_lps_mm) < -8.0
    for up, lo in zip(an.vertebrae[:-1], an.vertebrae[1:]):
        assert up.center_lps_mm[2] > lo.center_lps_mm[2]
        assert lo.superior_endplate.signed_distance_mm(up.inferior_endplate.point_lps_mm) > 0.0


def test_hip_prosthesis_is_not_spinal_hardware(real):
    """The right femur holds a real metal implant: no screw, cage or rod is reported, and the
    note says metal outside the spinal hardware was not analysed."""
    ct, _, _, an = real
    assert float((ct.hu > Config().metal_threshold_hu).sum()) > 100  # the implant is there
    assert an.screws == ()
    assert an.cages == ()
    assert an.rods == ()
    assert any("metal outside" in n for n in an.notes)
