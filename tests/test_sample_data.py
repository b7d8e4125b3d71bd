"""The phantom generator: determinism, truth consistent with what is rasterised, imaging
physics, and DICOM studies that read back (SimpleITK) to the same HU and LPS geometry."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.results import Anatomy
from sample_data import (
    LABELS,
    CageSpec,
    PhantomSpec,
    apply_imaging,
    demo_spec,
    follow_up_spec,
    make_phantom,
    make_phantom_layers,
    pinned_spec,
    spacing_specs,
    truth_anatomy,
    write_dicom_study,
)
from sample_data.dicom_writer import write_volume_study

REPO = Path(__file__).resolve().parents[1]


def small_spec(**kw) -> PhantomSpec:
    """A small coarse study: L4, L5, S1."""
    base = dict(seed=11, spacing_mm=(0.8, 0.8, 1.5), vertebrae=("L4", "L5", "S1"))
    base.update(kw)
    return PhantomSpec(**base)


@pytest.fixture(scope="module")
def standard_layers():
    spec = PhantomSpec(
        seed=5, spacing_mm=(0.5, 0.5, 1.0), vertebrae=("L4", "L5", "S1"),
        instrumented_levels=("L4-L5", "L5-S1"),
        halo_widths_mm={"L4-left": 2.0, "L5-right": 1.5},
        halo_fractions={"L4-left": 1.0, "L5-right": 0.5},
        double_halo={"L4-left": False, "L5-right": True},
        cages={"L4-L5": CageSpec("titanium", 1.2, 3.1, 1), "L5-S1": CageSpec("peek", 0.4, 4.6, 2)},
        bridging_fractions={"L4-L5": 0.65, "L5-S1": 0.3},
    )
    return spec, make_phantom_layers(spec)


# ------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_volume_and_truth():
    v1, t1 = make_phantom(small_spec())
    v2, t2 = make_phantom(small_spec())
    assert np.array_equal(v1.hu, v2.hu)
    assert json.dumps(t1, sort_keys=True) == json.dumps(t2, sort_keys=True)
    v3, t3 = make_phantom(small_spec(seed=12))
    assert v1.hu.shape != v3.hu.shape or not np.array_equal(v1.hu, v3.hu)
    assert json.dumps(t1["screws"]) != json.dumps(t3["screws"])


def test_overriding_one_screw_leaves_other_defaults_unchanged():
    _, t1 = make_phantom(small_spec(instrumented_levels=("L5-S1",), noise_hu=0))
    _, t2 = make_phantom(small_spec(instrumented_levels=("L5-S1",), noise_hu=0,
                                    halo_widths_mm={"L5-left": 2.5}))
    s1 = {s["id"]: s for s in t1["screws"]}
    s2 = {s["id"]: s for s in t2["screws"]}
    assert s2["L5-left"]["halo_width_mm"] == 2.5
    assert s1["S1-right"] == s2["S1-right"]


def test_truth_is_json_ready_and_has_the_documented_layout():
    vol, truth = make_phantom(small_spec())
    text = json.dumps(truth)
    back = json.loads(text)
    for key in ("format", "version", "spec", "imaging", "criteria", "instrumented_levels",
                "vertebrae", "levels", "screws", "cages", "rods", "notes", "volume"):
        assert key in back
    assert back["spec"]["seed"] == 11
    assert back["imaging"]["psf_sigma_mm"] == pytest.approx([0.48, 0.48, 0.6])
    assert back["volume"]["shape_kji"] == list(vol.hu.shape)
    for s in back["screws"]:
        w, f = s["halo_width_mm"], s["halo_fraction"]
        assert s["halo_mean_mm"] == pytest.approx(w * f)
        assert s["halo_max_mm"] == (w if f >= 0.05 else 0.0)
        assert s["halo_coverage"] == (f if w >= 1.0 else 0.0)
        assert s["loosening"] == (s["halo_coverage"] >= 0.5)
        assert s["length_mm"] == pytest.approx(
            np.linalg.norm(np.subtract(s["tip_lps_mm"], s["head_lps_mm"])))
    for c in back["cages"]:
        assert c["subsidence_mm"] == max(c["subsidence_superior_mm"], c["subsidence_inferior_mm"])


def test_truth_anatomy_builds_the_exact_geometry_objects():
    _, truth = make_phantom(small_spec(noise_hu=0, streaks=False))
    anat = truth_anatomy(truth)
    assert isinstance(anat, Anatomy)
    assert [v.name for v in anat.vertebrae] == ["L4", "L5", "S1"]
    assert anat.vertebrae[-1].is_sacrum and not anat.vertebrae[0].is_sacrum
    assert [lv.name for lv in anat.levels] == ["L4-L5", "L5-S1"]
    for sg, st in zip(anat.screws, truth["screws"]):
        assert sg.length_mm == pytest.approx(st["length_mm"])
        assert sg.side == st["side"]
    assert len(anat.cages) == len(truth["cages"])
    assert {r.side for r in anat.rods} == {"left", "right"}


def test_default_findings_stay_clear_of_the_decision_cuts():
    for seed in range(12):
        spec = PhantomSpec(seed=seed, spacing_mm=(0.8, 0.8, 1.5))
        from sample_data import resolve_spec
        res = resolve_spec(spec)
        for s in res["screws"].values():
            assert abs(s["halo_width_mm"] - 1.0) >= 0.3
        for lv in res["levels"].values():
            b = lv["bridging_fraction_target"]
            assert b == 0.0 or (abs(b - 0.1) >= 0.1 and abs(b - 0.5) >= 0.1)
            if lv["cage"]:
                for key in ("subsidence_superior_mm", "subsidence_inferior_mm"):
                    d = lv["cage"][key]
                    assert abs(d - 2.0) >= 0.3 and abs(d - 4.0) >= 0.3


def test_study_without_sacrum_has_no_sacrum():
    _, truth = make_phantom(small_spec(vertebrae=("L2", "L3", "L4"), noise_hu=0))
    assert not any(v["is_sacrum"] for v in truth["vertebrae"])
    assert [lv["level"] for lv in truth["levels"]] == ["L2-L3", "L3-L4"]


def test_bad_spec_is_refused():
    with pytest.raises(ValueError):
        make_phantom(small_spec(vertebrae=("L4", "X9")))
    with pytest.raises(ValueError):
        make_phantom(small_spec(vertebrae=("S1", "L5")))
    with pytest.raises(ValueError, match="L4-Left"):
        make_phantom(small_spec(instrumented_levels=("L4-L5",), halo_widths_mm={"L4-Left": 2.0}))
    with pytest.raises(ValueError, match="L3-L4"):
        make_phantom(small_spec(bridging_fractions={"L3-L4": 0.5}))


# ------------------------------------------------------------- truth vs rasterised map
def _voxel_centres(layers, sl=None):
    nk, nj, ni = layers.labels.shape
    o, s = layers.origin_lps_mm, layers.spacing_mm
    return (o[0] + s[0] * np.arange(ni), o[1] + s[1] * np.arange(nj), o[2] + s[2] * np.arange(nk))


def _label_at(layers, pts):
    ijk = (np.asarray(pts) - layers.origin_lps_mm) / layers.spacing_mm
    kji = np.rint(ijk[..., ::-1]).astype(int)
    kji = np.clip(kji, 0, np.array(layers.labels.shape) - 1)
    return layers.labels[kji[..., 0], kji[..., 1], kji[..., 2]]


def _level_columns(layers, lv, vmap, step=0.4):
    """Column positions (u, v) over the level's domain and LPS samples along each column,
    from 0.6 mm past the lower endplate to 0.6 mm before the upper one."""
    truth = layers.truth
    c, n = np.array(lv["center_lps_mm"]), np.array(lv["normal"])
    eu, ev = np.array(lv["axis_u"]), np.array(lv["axis_v"])
    a, b = lv["semi_axes_mm"]
    up, lo = vmap[lv["upper"]]["inferior_endplate"], vmap[lv["lower"]]["superior_endplate"]
    uu, vv = np.meshgrid(np.arange(-a, a, step) + step / 2, np.arange(-b, b, step) + step / 2)
    inside = (uu / a) ** 2 + (vv / b) ** 2 <= 1
    for cg in truth["cages"]:
        if cg["level"] != lv["level"]:
            continue
        rel = np.array(cg["centroid_lps_mm"]) - c
        ax = np.array(cg["axes"])
        hs = cg["half_sizes_mm"]
        lu = (uu - rel @ eu) * (ax[1] @ eu) + (vv - rel @ ev) * (ax[1] @ ev)
        lvv = (uu - rel @ eu) * (ax[2] @ eu) + (vv - rel @ ev) * (ax[2] @ ev)
        inside &= ~((np.abs(lu) <= hs[1]) & (np.abs(lvv) <= hs[2]))
    u, v = uu[inside], vv[inside]
    p0 = c + u[:, None] * eu + v[:, None] * ev
    s_lo = (p0 - lo["point_lps_mm"]) @ np.array(lo["normal"])
    s_up = (p0 - up["point_lps_mm"]) @ np.array(up["normal"])
    t_min = -s_lo / (n @ np.array(lo["normal"]))
    t_max = -s_up / (n @ np.array(up["normal"]))
    ts = t_min[:, None] + 0.6 + (t_max - t_min - 1.2)[:, None] * np.linspace(0, 1, 40)[None, :]
    return u, v, p0[:, None, :] + ts[..., None] * n


def test_bridged_fraction_in_label_map_matches_truth(standard_layers):
    """The noise-free label map carries the truth's bridging: columns well inside the bridged
    set are bone all the way between the endplates, columns well outside are not (the
    non-bridging columns' gap included), and the bridged area across the disc's mid-plane
    is the truth's fraction (within 0.02)."""
    spec, layers = standard_layers
    truth = layers.truth
    vmap = {v["name"]: v for v in truth["vertebrae"]}
    bone = [LABELS[k] for k in ("bridging_bone", "trabecular", "cortical")]
    x, y, z = _voxel_centres(layers)
    for lv in truth["levels"]:
        maps = layers.bridging_maps[lv["level"]]
        br = maps["bridged"]
        inner = ndimage.binary_erosion(br, iterations=6)        # >= 0.6 mm inside
        outer = ~ndimage.binary_dilation(br, iterations=6) & maps["domain"]
        u, v, pts = _level_columns(layers, lv, vmap)
        ou, ovv = maps["origin_uv_mm"]
        iu = ((u - ou) / maps["step_mm"]).astype(int)
        iv = ((v - ovv) / maps["step_mm"]).astype(int)
        all_bone = np.isin(_label_at(layers, pts), bone).all(axis=1)
        if lv["bridging_fraction"] > 0:
            assert all_bone[inner[iv, iu]].all(), lv["level"]
        assert not all_bone[outer[iv, iu]].any(), lv["level"]
        # the non-bridging columns exist, carry bone, and are cut by a disc-density gap
        nb = maps["nonbridged"][iv, iu]
        assert lv["nonbridging_columns"] and nb.any()
        nb_labels = _label_at(layers, pts[nb])
        assert (nb_labels == LABELS["nonbridging_bone"]).any()
        assert (nb_labels == LABELS["disc"]).any(axis=1).all()
        # bridged area across the mid-plane (one voxel layer) over the domain
        c, n = np.array(lv["center_lps_mm"]), np.array(lv["normal"])
        eu, ev = np.array(lv["axis_u"]), np.array(lv["axis_v"])
        a, b = lv["semi_axes_mm"]
        k0, k1 = np.searchsorted(z, c[2] - 12), np.searchsorted(z, c[2] + 12)
        X, Y, Z = np.meshgrid(x, y, z[k0:k1], indexing="ij")
        rel = np.stack([X - c[0], Y - c[1], Z - c[2]], axis=-1)
        t, uu, vv = rel @ n, rel @ eu, rel @ ev
        sel = np.abs(t) <= 0.5 * layers.spacing_mm[2] * abs(n[2])
        iu2 = np.clip(((uu - ou) / maps["step_mm"]).astype(int), 0, br.shape[1] - 1)
        iv2 = np.clip(((vv - ovv) / maps["step_mm"]).astype(int), 0, br.shape[0] - 1)
        in_dom = sel & ((uu / a) ** 2 + (vv / b) ** 2 <= 1) & maps["domain"][iv2, iu2]
        lab = np.transpose(layers.labels[k0:k1], (2, 1, 0))
        measured = np.count_nonzero(in_dom & (lab == LABELS["bridging_bone"])) / np.count_nonzero(in_dom)
        assert measured == pytest.approx(lv["bridging_fraction"], abs=0.02), lv["level"]
        assert lv["fusion"] == ("fused" if lv["bridging_fraction"] >= 0.5 else
                                "partial" if lv["bridging_fraction"] >= 0.1 else "not_fused")


def test_screw_metal_voxel_count_matches_cylinder_volume(standard_layers):
    spec, layers = standard_layers
    vox = float(np.prod(layers.spacing_mm))
    expected = sum(np.pi * (s["diameter_mm"] / 2) ** 2 * s["length_mm"] for s in layers.truth["screws"])
    got = np.count_nonzero(layers.labels == LABELS["screw_shaft"]) * vox
    assert got == pytest.approx(expected, rel=0.03)


def test_halo_voxel_count_matches_truth_width_and_fraction(standard_layers):
    spec, layers = standard_layers
    vox = float(np.prod(layers.spacing_mm))
    expected = 0.0
    for s in layers.truth["screws"]:
        r, w, f = s["diameter_mm"] / 2, s["halo_width_mm"], s["halo_fraction"]
        expected += np.pi * ((r + w) ** 2 - r ** 2) * f * s["length_mm"]
    got = np.count_nonzero(layers.labels == LABELS["halo"]) * vox
    assert expected > 0
    assert got == pytest.approx(expected, rel=0.06)
    rim = [s for s in layers.truth["screws"] if s["double_halo"]]
    assert rim and np.count_nonzero(layers.labels == LABELS["sclerotic_rim"]) > 0


def test_halo_along_rays_matches_truth_mean_and_coverage(standard_layers):
    """Rays perpendicular to each shaft, from its true surface, cross the halo label over the
    truth's width in the truth's fraction of directions (CONTRACT.md halo definitions)."""
    spec, layers = standard_layers
    halo = (layers.labels == LABELS["halo"]).astype(np.float32)
    step = 0.1
    for s in layers.truth["screws"]:
        head, tip = np.array(s["head_lps_mm"]), np.array(s["tip_lps_mm"])
        ax = (tip - head) / np.linalg.norm(tip - head)
        e1 = np.cross(ax, [1.0, 0, 0]); e1 /= np.linalg.norm(e1)
        e2 = np.cross(ax, e1)
        rs = s["diameter_mm"] / 2 + np.arange(step / 2, 5.0, step)
        ts = np.arange(1.0, s["length_mm"] - 1.0, 1.5)
        angs = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        dirs = np.cos(angs)[:, None] * e1 + np.sin(angs)[:, None] * e2
        pts = (head + ts[:, None, None, None] * ax + rs[None, None, :, None] * dirs[None, :, None, :])
        ijk = (pts - layers.origin_lps_mm) / layers.spacing_mm
        v = ndimage.map_coordinates(halo, ijk[..., ::-1].reshape(-1, 3).T, order=1)
        widths = (v.reshape(pts.shape[:3]) >= 0.5).sum(axis=2) * step
        assert widths.mean() == pytest.approx(s["halo_mean_mm"], abs=0.2), s["id"]
        if s["halo_width_mm"] >= 1.3:
            assert (widths >= 1.0).mean() == pytest.approx(s["halo_coverage"], abs=0.06), s["id"]
            assert np.percentile(widths, 95) == pytest.approx(s["halo_max_mm"], abs=0.35), s["id"]
        elif s["halo_width_mm"] == 0:
            assert widths.max() == 0


@pytest.mark.parametrize("seed,spacing", [(0, "fine"), (8, "fine"), (6, "coarse"), (8, "coarse")])
def test_painted_halo_zone_is_exactly_the_truth_width_on_default_phantoms(seed, spacing):
    """On the default phantoms the benchmarks score (spacing_specs), every voxel centre of
    a screw's intraosseous shaft (1.5 mm clear of head and tip) that lies in the truth's
    halo sector between the true metal surface and ``halo_width_mm`` is labelled halo, the
    voxels just beyond that width are bone (or the double halo's sclerotic rim), and the
    halo label stops at ``r + halo_width_mm``: nothing painted later (cortex, pedicle,
    cages, rods, other screws) cuts into the zone the truth reports (CONTRACT.md halo)."""
    layers = make_phantom_layers(spacing_specs(seed, noise_hu=0.0)[spacing])
    x, y, z = _voxel_centres(layers)
    lab = np.transpose(layers.labels, (2, 1, 0))  # [i, j, k] like the meshgrid below
    bone = [LABELS[k] for k in ("trabecular", "cortical")]
    checked = 0
    for s in layers.truth["screws"]:
        w, f = s["halo_width_mm"], s["halo_fraction"]
        if w <= 0:
            continue
        head, tip = np.array(s["head_lps_mm"]), np.array(s["tip_lps_mm"])
        L = float(np.linalg.norm(tip - head))
        ax = (tip - head) / L
        e1 = np.array([0.0, 0.0, 1.0]) - ax[2] * ax  # the truth's angle 0 is superior
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(ax, e1)
        r = s["diameter_mm"] / 2
        reach = r + w + 2.0
        lo = np.minimum(head, tip) - reach
        hi = np.maximum(head, tip) + reach
        si, sj, sk = (slice(np.searchsorted(c, a), np.searchsorted(c, b)) for c, a, b in
                      zip((x, y, z), lo, hi))
        X, Y, Z = np.meshgrid(x[si], y[sj], z[sk], indexing="ij")
        rel = np.stack([X - head[0], Y - head[1], Z - head[2]], axis=-1)
        t, p1, p2 = rel @ ax, rel @ e1, rel @ e2
        rho = np.hypot(p1, p2)
        phi = np.degrees(np.arctan2(p2, p1))
        off = np.mod(phi - s["halo_start_deg"], 360.0)
        in_sector = off <= 360.0 * f - 3.0 if f < 1 else np.ones_like(off, bool)
        if f < 1:
            in_sector &= off >= 3.0
        shaft = (t > 1.5) & (t < L - 1.5) & in_sector
        sub = lab[si, sj, sk]
        zone = shaft & (rho > r + 0.02) & (rho < r + w - 0.02)
        beyond = shaft & (rho > r + w + 0.02) & (rho < r + w + 0.6)
        assert zone.sum() > 50, s["id"]
        assert (sub[zone] == LABELS["halo"]).all(), (s["id"], np.unique(sub[zone & (sub != LABELS["halo"])]))
        assert not (sub[beyond] == LABELS["halo"]).any(), s["id"]
        around = bone + ([LABELS["sclerotic_rim"]] if s["double_halo"] else [])
        assert np.isin(sub[beyond], around).all(), s["id"]
        checked += 1
    assert checked >= 2


def test_cage_deepest_voxel_matches_truth_subsidence(standard_layers):
    spec, layers = standard_layers
    truth = layers.truth
    vmap = {v["name"]: v for v in truth["vertebrae"]}
    x, y, z = _voxel_centres(layers)
    for cg in truth["cages"]:
        code = LABELS["cage_titanium"] if cg["material"] == "titanium" else LABELS["cage_peek"]
        ax = np.array(cg["axes"])
        c = np.array(cg["centroid_lps_mm"])
        hs = np.array(cg["half_sizes_mm"])
        ext = np.abs(ax).T @ hs + 1.0
        lo_i = ((c - ext - layers.origin_lps_mm) / layers.spacing_mm).astype(int)
        hi_i = ((c + ext - layers.origin_lps_mm) / layers.spacing_mm).astype(int) + 2
        sub = layers.labels[lo_i[2]:hi_i[2], lo_i[1]:hi_i[1], lo_i[0]:hi_i[0]]
        kk, jj, ii = np.nonzero(np.isin(sub, [code, LABELS["marker"]]))
        pts = np.stack([x[ii + lo_i[0]], y[jj + lo_i[1]], z[kk + lo_i[2]]], axis=1)
        # keep voxels of this cage only
        loc = (pts - c) @ ax.T
        pts = pts[np.all(np.abs(loc) <= hs + 0.5, axis=1)]
        upper, lower = cg["level"].split("-")
        for plane, key in ((vmap[upper]["inferior_endplate"], "subsidence_superior_mm"),
                           (vmap[lower]["superior_endplate"], "subsidence_inferior_mm")):
            depth = -((pts - plane["point_lps_mm"]) @ np.array(plane["normal"])).min()
            # voxel centres of a soft-edged box sit within half a voxel of its surface
            assert depth == pytest.approx(cg[key], abs=0.6), (cg["id"], key)
        assert cg["subsidence_grade"] == ("severe" if cg["subsidence_mm"] > 4 else
                                          "mild" if cg["subsidence_mm"] > 2 else "none")


def test_endplate_cortex_beside_the_cage_is_intact(standard_layers):
    spec, layers = standard_layers
    truth = layers.truth
    vmap = {v["name"]: v for v in truth["vertebrae"]}
    for lv in truth["levels"]:
        up = vmap[lv["upper"]]
        # a point 0.5 mm inside the upper body's inferior endplate, 16 mm to the left
        p = (np.array(up["inferior_endplate"]["point_lps_mm"]) + 16.0 * np.array(up["axis_lr"])
             - 0.5 * np.array(up["inferior_endplate"]["normal"]))
        assert _label_at(layers, p) == LABELS["cortical"], lv["level"]


def test_peek_cage_has_four_marker_pins(standard_layers):
    spec, layers = standard_layers
    lab = layers.labels == LABELS["marker"]
    n_pins = ndimage.label(lab)[1]
    peek = [c for c in layers.truth["cages"] if c["material"] == "peek"]
    assert n_pins == 4 * len(peek)
    for c in peek:
        assert c["marker_inset_mm"] == 1.0


def test_follow_up_differs_from_prior_exactly_by_the_requested_changes():
    prior = small_spec(instrumented_levels=("L4-L5", "L5-S1"), noise_hu=0, streaks=False)
    _, t_pin = make_phantom(pinned_spec(prior))
    _, t0 = make_phantom(prior)
    assert t_pin["screws"] == t0["screws"] and t_pin["cages"] == t0["cages"]
    fu = follow_up_spec(prior, vertebra_shifts_mm={"L4": (1.0, -0.5, 0.3)},
                        screw_shifts_mm={"L5-left": (0.0, -0.9, 0.0)},
                        added_subsidence_mm={"L4-L5": (0.5, 1.0)})
    _, t1 = make_phantom(fu)
    s0 = {s["id"]: s for s in t0["screws"]}
    s1 = {s["id"]: s for s in t1["screws"]}
    np.testing.assert_allclose(np.subtract(s1["L4-left"]["tip_lps_mm"], s0["L4-left"]["tip_lps_mm"]),
                               [1.0, -0.5, 0.3], atol=1e-9)
    np.testing.assert_allclose(np.subtract(s1["L5-left"]["head_lps_mm"], s0["L5-left"]["head_lps_mm"]),
                               [0.0, -0.9, 0.0], atol=1e-9)
    assert s1["S1-right"]["head_lps_mm"] == s0["S1-right"]["head_lps_mm"]
    c0 = {c["id"]: c for c in t0["cages"]}
    c1 = {c["id"]: c for c in t1["cages"]}
    for cid in c0:
        add = (0.5, 1.0) if cid.startswith("L4-L5") else (0.0, 0.0)
        assert c1[cid]["subsidence_superior_mm"] == pytest.approx(c0[cid]["subsidence_superior_mm"] + add[0])
        assert c1[cid]["subsidence_inferior_mm"] == pytest.approx(c0[cid]["subsidence_inferior_mm"] + add[1])
    assert [lv["bridging_fraction"] for lv in t1["levels"]] == [lv["bridging_fraction"] for lv in t0["levels"]]
    assert fu.seed != prior.seed and fu.findings_seed == prior.findings_seed


def test_rod_and_screw_fractures_cut_a_gap():
    spec = small_spec(instrumented_levels=("L4-L5", "L5-S1"), noise_hu=0, streaks=False,
                      rod_fractures={"rod-left": (0.3, 2.0)}, screw_fractures={"L5-right": (0.5, 2.0)})
    layers = make_phantom_layers(spec)
    rod = next(r for r in layers.truth["rods"] if r["id"] == "rod-left")
    c, d = np.array(rod["fracture"]["center_lps_mm"]), np.array(rod["fracture"]["direction"])
    assert _label_at(layers, c) != LABELS["rod"]
    assert _label_at(layers, c + 3.0 * d) == LABELS["rod"] and _label_at(layers, c - 3.0 * d) == LABELS["rod"]
    s = next(s for s in layers.truth["screws"] if s["id"] == "L5-right")
    c = np.array(s["fracture"]["center_lps_mm"]); d = np.array(s["fracture"]["direction"])
    assert _label_at(layers, c) != LABELS["screw_shaft"]
    assert _label_at(layers, c + 3.0 * d) == LABELS["screw_shaft"]


def test_pedicle_breach_puts_the_shaft_past_the_pedicle_cortex():
    spec = small_spec(spacing_mm=(0.5, 0.5, 1.0), instrumented_levels=("L4-L5",), noise_hu=0,
                      streaks=False, pedicle_breaches={"L4-left": (3.0, "lateral")})
    layers = make_phantom_layers(spec)
    s = next(s for s in layers.truth["screws"] if s["id"] == "L4-left")
    assert s["breach_grade"] == "C" and s["halo_coverage"] == 0 and not s["loosening"]
    ph, pt = np.array(s["pedicle_head_lps_mm"]), np.array(s["pedicle_tip_lps_mm"])
    h, t = np.array(s["head_lps_mm"]), np.array(s["tip_lps_mm"])
    pax = (pt - ph) / np.linalg.norm(pt - ph)
    off = (h - ph) - ((h - ph) @ pax) * pax
    # the shaft's outer edge lies breach_mm beyond the pedicle's outer surface
    assert np.linalg.norm(off) + s["diameter_mm"] / 2 == pytest.approx(s["pedicle_radius_mm"] + 3.0)
    # the shaft occupies a point 1.5 mm outside the pedicle surface, along the offset
    mid = ph + 0.3 * (pt - ph) + (s["pedicle_radius_mm"] + 1.5) * off / np.linalg.norm(off)
    assert _label_at(layers, mid) == LABELS["screw_shaft"]


# ------------------------------------------------------------------------------ physics
def test_blooming_makes_a_fixed_threshold_read_the_shaft_too_wide():
    spec = PhantomSpec(seed=3, spacing_mm=(0.5, 0.5, 1.0), vertebrae=("L4", "L5"), noise_hu=0,
                       streaks=False, instrumented_levels=("L4-L5",),
                       halo_widths_mm={"L4-left": 0.0})
    layers = make_phantom_layers(spec)
    hu = apply_imaging(layers, spec)
    s = next(s for s in layers.truth["screws"] if s["id"] == "L4-left")
    head, tip = np.array(s["head_lps_mm"]), np.array(s["tip_lps_mm"])
    ax = (tip - head) / np.linalg.norm(tip - head)
    e1 = np.cross(ax, [1.0, 0, 0]); e1 /= np.linalg.norm(e1)
    e2 = np.cross(ax, e1)
    rs = np.arange(0, 8, 0.02)
    radii = []
    for tt in np.linspace(0.3, 0.7, 5) * s["length_mm"]:
        for ang in np.linspace(0, 2 * np.pi, 24, endpoint=False):
            pts = head + tt * ax + rs[:, None] * (np.cos(ang) * e1 + np.sin(ang) * e2)
            ijk = (pts - layers.origin_lps_mm) / layers.spacing_mm
            v = ndimage.map_coordinates(hu, ijk[:, ::-1].T, order=1)
            radii.append(rs[np.argmax(v < 2200)])
    excess = 2 * np.median(radii) - s["diameter_mm"]
    assert 0.3 <= excess <= 1.2


def test_noise_level_and_clipping():
    spec = small_spec(noise_hu=25.0, streaks=False)
    vol, truth = make_phantom(spec)
    layers = make_phantom_layers(spec)
    # soft tissue far (>= 4 voxels) from anything else reads 40 HU + noise
    calm = ndimage.binary_erosion(layers.labels == LABELS["soft_tissue"], iterations=4)
    assert np.count_nonzero(calm) > 10000
    assert np.std(vol.hu[calm]) == pytest.approx(25.0, rel=0.1)
    assert np.mean(vol.hu[calm]) == pytest.approx(40.0, abs=1.0)
    assert vol.hu.max() <= 3071 and vol.hu.min() >= -1024
    assert np.array_equal(vol.hu, np.rint(vol.hu))
    vol_x, _ = make_phantom(replace(spec, extended_hu=True))
    assert vol_x.hu.max() > 3071


def test_streaks_darken_the_line_between_screws():
    spec = small_spec(noise_hu=0.0, instrumented_levels=("L4-L5",))
    layers = make_phantom_layers(spec)
    with_streaks = apply_imaging(layers, spec)
    without = apply_imaging(layers, replace(spec, streaks=False))
    diff = with_streaks - without
    assert diff.min() < -50 and np.count_nonzero(diff < -20) > 100


def test_streak_bands_can_be_left_out_keeping_the_radial_streaks():
    """``streak_bands=False`` (the accuracy harness's ``--no-streak-bands``) removes exactly
    the dark bands joining two pieces of metal: what it removes only darkens, and the radial
    streaks that remain are those of the full image."""
    spec = small_spec(noise_hu=0.0, instrumented_levels=("L4-L5",))
    layers = make_phantom_layers(spec)
    full = apply_imaging(layers, spec)
    radial = apply_imaging(layers, replace(spec, streak_bands=False))
    none = apply_imaging(layers, replace(spec, streaks=False))
    bands = full - radial
    assert bands.max() <= 1.0 and bands.min() < -50  # bands darken (1 HU: rounding)
    assert np.count_nonzero(radial - none) > 100     # the radial streaks are still there
    assert not make_phantom(replace(spec, streak_bands=False))[1]["imaging"]["streak_bands"]


def test_feet_first_volume_is_the_same_patient_flipped():
    v_hf, t_hf = make_phantom(small_spec())
    v_ff, t_ff = make_phantom(small_spec(feet_first=True))
    assert np.array_equal(v_ff.hu[::-1, :, ::-1], v_hf.hu)
    assert np.allclose(v_ff.direction, np.diag([-1.0, 1.0, -1.0]))
    nk, nj, ni = v_hf.hu.shape
    assert np.allclose(v_ff.ijk_to_lps([0, 0, 0]), v_hf.ijk_to_lps([ni - 1, 0, nk - 1]))
    assert t_hf["screws"] == t_ff["screws"]


def test_standard_spacing_phantom_is_made_quickly():
    t0 = time.perf_counter()
    make_phantom(spacing_specs(1)["standard"])
    assert time.perf_counter() - t0 < 20.0


# -------------------------------------------------------------------------------- DICOM
def _series_files(root: Path) -> dict:
    by = {}
    for p in root.rglob("*"):
        if p.is_file() and p.name != "truth.json":
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            by.setdefault(ds.SeriesInstanceUID, []).append((p, ds))
    return by


def _read_series_sitk(files, tmp: Path) -> sitk.Image:
    """Link a series' files into one flat folder and let GDCM sort and read them."""
    tmp.mkdir()
    for n, (p, _) in enumerate(files):
        os.symlink(p, tmp / f"f{n:05d}.dcm")
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(tmp), files[0][1].SeriesInstanceUID)
    reader.SetFileNames(names)
    return reader.Execute()


@pytest.mark.parametrize("spacing", ["coarse", "standard",
                                     pytest.param("fine", marks=pytest.mark.slow)])
@pytest.mark.parametrize("feet_first", [False, True])
def test_dicom_study_reads_back_to_the_same_hu_and_geometry(tmp_path, spacing, feet_first):
    spec = replace(spacing_specs(2)[spacing], feet_first=feet_first, vertebrae=("L5", "S1"))
    vol, truth = make_phantom(spec)
    out = write_volume_study(vol, truth, spec, tmp_path / "study",
                             extra_series=(spacing == "coarse"))
    by = _series_files(out)
    bone_uid = json.loads((out / "truth.json").read_text())["dicom"]["bone_series_uid"]
    img = _read_series_sitk(by[bone_uid], tmp_path / "flat")
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == vol.hu.shape
    assert np.abs(arr - vol.hu).max() <= 0.5
    assert np.allclose(img.GetOrigin(), vol.origin_lps_mm, atol=1e-3)
    assert np.allclose(img.GetSpacing(), vol.spacing_mm, atol=1e-4)
    assert np.allclose(np.array(img.GetDirection()).reshape(3, 3), vol.direction, atol=1e-6)
    ds = by[bone_uid][0][1]
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.ConvolutionKernel == "BONE"
    assert ds.PatientPosition == ("FFS" if feet_first else "HFS")
    assert float(ds.SliceThickness) == pytest.approx(spec.spacing_mm[2])
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spec.spacing_mm[1], spec.spacing_mm[0]])


def test_extended_hu_study_reads_back_exactly(tmp_path):
    spec = small_spec(extended_hu=True, vertebrae=("L5", "S1"))
    vol, truth = make_phantom(spec)
    assert vol.hu.max() > 3071 and truth["imaging"]["hu_range"][1] > 3071
    out = write_volume_study(vol, truth, spec, tmp_path / "x", extra_series=False)
    by = _series_files(out)
    img = _read_series_sitk(next(iter(by.values())), tmp_path / "flat")
    assert np.array_equal(sitk.GetArrayFromImage(img).astype(np.float32), vol.hu)


def test_extra_series_and_patient_module_are_present(tmp_path):
    spec = small_spec()
    out = write_dicom_study(spec, tmp_path / "s")
    truth = json.loads((out / "truth.json").read_text())
    by = _series_files(out)
    assert len(by) == 3
    roles = {s["role"]: s for s in truth["dicom"]["series"]}
    loc = by[roles["localizer"]["uid"]]
    assert len(loc) == 1 and list(loc[0][1].ImageType)[2] == "LOCALIZER"
    soft = by[roles["soft"]["uid"]]
    assert float(soft[0][1].SliceThickness) >= 4.5 and soft[0][1].ConvolutionKernel == "STANDARD"
    uids = {ds.StudyInstanceUID for files in by.values() for _, ds in files}
    frames = {ds.FrameOfReferenceUID for files in by.values() for _, ds in files}
    assert len(uids) == 1 and len(frames) == 1
    ds = by[roles["bone"]["uid"]][0][1]
    assert str(ds.PatientName) == "PHANTOM^FUSION" and ds.PatientID.startswith("FCT-")
    assert ds.PatientBirthDate and ds.Manufacturer == "fusionct phantom" and float(ds.KVP) == 120
    # files are nested and not named by instance
    assert all(p.parent != out for files in by.values() for p, _ in files)
    # same spec, same UIDs
    out2 = write_dicom_study(spec, tmp_path / "s2", extra_series=False)
    t2 = json.loads((out2 / "truth.json").read_text())
    assert t2["dicom"]["study_instance_uid"] == truth["dicom"]["study_instance_uid"]
    assert t2["dicom"]["bone_series_uid"] == truth["dicom"]["bone_series_uid"]


def test_demo_study_is_written_in_a_few_seconds(tmp_path):
    t0 = time.perf_counter()
    out = write_dicom_study(demo_spec(), tmp_path / "demo")
    assert time.perf_counter() - t0 < 20.0
    truth = json.loads((out / "truth.json").read_text())
    loose = [s for s in truth["screws"] if s["loosening"]]
    assert loose
    assert {lv["fusion"] for lv in truth["levels"]} >= {"fused", "not_fused"}
    assert any(c["subsidence_grade"] != "none" for c in truth["cages"])


def test_command_line_writes_a_study(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "sample_data", str(tmp_path / "cli"), "--seed", "3",
                        "--spacing", "coarse"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "truth.json").exists()
    assert json.loads((tmp_path / "cli" / "truth.json").read_text())["spec"]["seed"] == 3
