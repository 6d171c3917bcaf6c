"""`prepare` on real NIfTI files written with nibabel: painted series recovered, bad inputs named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainjepa.errors import DataError
from sites.cohort import load_site_series
from sites.config import parse_site_config
from sites.manifest import file_sha256
from sites.participants import write_participants
from sites.prepare import prepare_site

pytestmark = pytest.mark.usefixtures("gc_frozen")  # nilearn collects garbage at every image read

SHAPE = (8, 8, 6)
AFF = np.array([[3.0, 0, 0, -12], [0, 3.0, 0, -12], [0, 0, 3.0, -9], [0, 0, 0, 1]])
N_FRAMES = 40


def atlases():
    sub = np.zeros(SHAPE, np.int16)
    sub[1:3, 1:3, 1:3] = 1
    sub[5:7, 1:3, 1:3] = 2
    ctx = np.zeros(SHAPE, np.int16)
    ctx[1:4, 5:7, 3:5] = 1
    ctx[4:7, 5:7, 3:5] = 2
    ctx[2:6, 3:5, 4:6] = 3
    return sub, ctx


def paint(rng, sub, ctx, tr=2.0):
    """4D image with each atlas region holding one known series; returns (img, (5, L) truth in ROI order)."""
    series = rng.standard_normal((5, N_FRAMES)).astype(np.float32) * 10 + 500  # (R, L)
    data = rng.standard_normal((*SHAPE, N_FRAMES)).astype(np.float32) + 300  # background
    regions = [sub == 1, sub == 2, ctx == 3, ctx == 1, ctx == 2]  # declared order: sub (1, 2), ctx [3, 1, 2]
    for r, m in enumerate(regions):
        data[m] = series[r]
    img = nib.Nifti1Image(data, AFF)
    img.header.set_zooms((3.0, 3.0, 3.0, tr))
    img.header.set_xyzt_units("mm", "sec")
    return img, series


def site_raw() -> dict:
    """The NIfTI site config (as parsed YAML) matching the tree `build` writes."""
    return {
        "site": "nii",
        "data": {"format": "nifti", "root": "derivatives/fmriprep"},
        "rois": [
            {"name": "sub", "n_rois": 2, "atlas": "atlases/sub.nii.gz"},
            {"name": "ctx", "n_rois": 3, "atlas": "atlases/ctx.nii.gz", "labels": [3, 1, 2]},
        ],
        "participants": {"phenotypes": ["age"]},
        "preprocess": {"n_jobs": 1},
    }


def build(tmp_path: Path, n_sub=3, atlas_aff=None, atlas_scale=1, extra=None, seed=0):
    """A BIDS-derivatives tree + atlases + site config; returns (cfg, {id: truth})."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "derivatives" / "fmriprep"
    sub, ctx = atlases()
    truth = {}
    ids = [f"sub-{i:02d}" for i in range(n_sub)]
    for sid in ids:
        img, series = paint(rng, sub, ctx)
        d = root / sid / "func"
        d.mkdir(parents=True)
        nib.save(img, d / f"{sid}_task-rest_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz")
        truth[sid] = series
    write_participants(root / "participants.tsv", ids, {"age": np.arange(n_sub) + 20.0})
    adir = tmp_path / "atlases"
    adir.mkdir()
    aff = AFF if atlas_aff is None else atlas_aff
    for name, lab in (("sub", sub), ("ctx", ctx)):
        for ax in range(3):
            lab = np.repeat(lab, atlas_scale, axis=ax)
        nib.save(nib.Nifti1Image(lab, aff), adir / f"{name}.nii.gz")
    raw = site_raw()
    for k, v in (extra or {}).items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return parse_site_config(raw, tmp_path / "site.yaml"), truth


def test_recovers_painted_series_in_declared_order(tmp_path, caplog):
    cfg, truth = build(tmp_path)
    m = prepare_site(cfg, progress=False)
    assert m["summary"]["ok"] == 3 and m["summary"]["failed"] == 0
    for sid, x in truth.items():
        y = np.load(cfg.output_dir / f"{sid}.npy")
        assert y.shape == (5, N_FRAMES) and y.dtype == np.float32
        np.testing.assert_allclose(y, x, rtol=1e-6)
    on_disk = json.loads((cfg.output_dir / "manifest.json").read_text())
    assert on_disk["roi_order"] == ["sub_0", "sub_1", "ctx_0", "ctx_1", "ctx_2"]
    assert on_disk["atlases"][1]["labels"] == [3, 1, 2]
    assert on_disk["atlases"][0]["sha256"] == file_sha256(tmp_path / "atlases" / "sub.nii.gz")
    e = on_disk["subjects"]["sub-01"]
    assert e["tr"] == 2.0 and e["frames"] == N_FRAMES and e["qc"]["empty_labels"] == [] and e["qc"]["frames_lost"] == 0
    # a second run skips what is done
    mtime = (cfg.output_dir / "sub-00.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="sites.prepare"):
        prepare_site(cfg, progress=False)
    assert "0 subject(s) to extract, 3 already done" in caplog.text
    assert (cfg.output_dir / "sub-00.npy").stat().st_mtime_ns == mtime
    # and the prepared site loads through the data contract
    ss = load_site_series(cfg, model_tr=2.0)
    np.testing.assert_allclose(ss.series[2], truth["sub-02"], rtol=1e-6)
    assert ss.phenotypes["age"].tolist() == [20.0, 21.0, 22.0]


def test_atlas_on_another_grid_is_resampled_with_a_warning(tmp_path, caplog):
    aff = AFF.copy()
    aff[:3, :3] /= 2  # 1.5 mm atlas, same origin: every data voxel centre is an atlas voxel centre
    cfg, truth = build(tmp_path, n_sub=1, atlas_aff=aff, atlas_scale=2)
    with caplog.at_level(logging.WARNING, logger="sites.prepare"):
        m = prepare_site(cfg, progress=False)
    assert "atlas resampled" in caplog.text and "sub.nii.gz" in caplog.text
    assert "shape (8, 8, 6) vs atlas (16, 16, 12)" in caplog.text  # the warning says what differs
    assert "voxel size (3.0, 3.0, 3.0) vs atlas (1.5, 1.5, 1.5) mm" in caplog.text
    assert m["subjects"]["sub-00"]["qc"]["resampled_atlases"] == ["sub", "ctx"]
    np.testing.assert_allclose(np.load(cfg.output_dir / "sub-00.npy"), truth["sub-00"], rtol=1e-6)


def bold_path(cfg, sid):
    return next((cfg.data.root / sid / "func").glob("*_bold.nii.gz"))


def test_bad_subjects_are_reported_and_skipped(tmp_path):
    cfg, truth = build(tmp_path, n_sub=4)
    # sub-01: a 3D image; sub-02: no TR in the header; sub-03: a NaN region
    p1 = bold_path(cfg, "sub-01")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFF), p1)
    p2 = bold_path(cfg, "sub-02")
    img = nib.load(p2)
    img2 = nib.Nifti1Image(np.asarray(img.dataobj), AFF)
    img2.header.set_zooms((3.0, 3.0, 3.0, 0.0))
    nib.save(img2, p2)
    p3 = bold_path(cfg, "sub-03")
    d = np.asarray(nib.load(p3).dataobj).copy()
    d[2, 5, 3, 7] = np.nan  # inside ctx label 1 -> ROI 3
    nib.save(nib.Nifti1Image(d, AFF), p3)
    m = prepare_site(cfg, progress=False)
    s = m["subjects"]
    assert s["sub-00"]["status"] == "ok" and m["summary"] == {**m["summary"], "ok": 1, "failed": 3}
    assert (
        str(p1) in s["sub-01"]["error"]
        and "expected a 4D BOLD image" in s["sub-01"]["error"]
        and "3D" in s["sub-01"]["error"]
    )
    assert str(p2) in s["sub-02"]["error"] and "no repetition time" in s["sub-02"]["error"]
    assert str(p3) in s["sub-03"]["error"] and "1 NaN or Inf voxel value(s) in frame(s) [7]" in s["sub-03"]["error"]
    assert not (cfg.output_dir / "sub-01.npy").exists()
    # a TR given in the config overrides the header
    cfg2, _ = build(tmp_path / "b", n_sub=1, extra={"tr": 0.8})
    p = bold_path(cfg2, "sub-00")
    img = nib.load(p)
    img2 = nib.Nifti1Image(np.asarray(img.dataobj), AFF)
    img2.header.set_zooms((3.0, 3.0, 3.0, 0.0))
    nib.save(img2, p)
    assert prepare_site(cfg2, progress=False)["subjects"]["sub-00"]["tr"] == 0.8


def test_orientation_mismatch_and_empty_label(tmp_path):
    flip = AFF.copy()
    flip[0, 0], flip[0, 3] = -3.0, 9.0  # LAS atlas over the same box
    cfg, _ = build(tmp_path, n_sub=1, atlas_aff=flip)
    e = prepare_site(cfg, progress=False)["subjects"]["sub-00"]["error"]
    assert "orientation RAS differs from atlas" in e and "LAS" in e
    cfg2, _ = build(tmp_path / "b", n_sub=1)
    p = bold_path(cfg2, "sub-00")
    d = np.asarray(nib.load(p).dataobj).copy()
    d[5:7, 1:3, 1:3] = 0.0  # sub label 2 all zero: outside the brain mask
    img = nib.Nifti1Image(d, AFF)
    img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
    nib.save(img, p)
    e = prepare_site(cfg2, progress=False)["subjects"]["sub-00"]["error"]
    assert "constant/all-zero ROIs [1]" in e


def test_site_level_errors_leave_outputs_intact(tmp_path):
    cfg, _ = build(tmp_path, n_sub=2)
    prepare_site(cfg, progress=False)
    before = (cfg.output_dir / "manifest.json").read_bytes()
    bad, _ = build(tmp_path / "x", n_sub=1)
    import dataclasses

    wrong = dataclasses.replace(cfg, rois=(dataclasses.replace(cfg.rois[0], n_rois=3), cfg.rois[1]))
    with pytest.raises(DataError, match=r"sub.nii.gz.*has 2 labels but .*rois\[0\]\.n_rois.* declares 3"):
        prepare_site(wrong, progress=False)
    bold_path(cfg, "sub-01").unlink()
    with pytest.raises(DataError, match=r"without a BOLD file.*sub-01"):
        prepare_site(cfg, progress=False)
    assert (cfg.output_dir / "manifest.json").read_bytes() == before
    assert (cfg.output_dir / "sub-01.npy").is_file()


@pytest.mark.slow  # n_jobs 2: a pool of worker processes that import nilearn
def test_confound_regression_detrend_and_parallel(tmp_path):
    cfg, truth = build(
        tmp_path,
        n_sub=2,
        extra={
            "data": {"confounds": "{subject}/func/{subject}_task-rest_desc-confounds_timeseries.tsv"},
            "preprocess": {"detrend": True, "confound_columns": ["trans_x"], "drop_initial": 2, "n_jobs": 2},
        },
    )
    rng = np.random.default_rng(9)
    conf = {}
    for sid in truth:
        c = rng.standard_normal(N_FRAMES)
        conf[sid] = c
        lines = ["trans_x\tother"] + [f"{'n/a' if t == 0 else c[t]}\t1" for t in range(N_FRAMES)]
        (cfg.data.root / sid / "func" / f"{sid}_task-rest_desc-confounds_timeseries.tsv").write_text(
            "\n".join(lines) + "\n"
        )
    m = prepare_site(cfg, progress=False)
    assert m["summary"]["ok"] == 2 and m["summary"]["frames_lost"] == 4
    for sid in truth:
        y = np.load(cfg.output_dir / f"{sid}.npy").astype(np.float64)  # (5, 38)
        assert y.shape == (5, N_FRAMES - 2)
        c = conf[sid][2:].copy()
        c[0] = c[0]
        t = np.arange(y.shape[1])
        assert np.abs(y.mean(axis=1)).max() < 1e-3  # detrended
        assert np.abs(y @ (t - t.mean())).max() / np.linalg.norm(t - t.mean()) < 1e-2
        assert np.abs(np.corrcoef(np.vstack([y, c]))[-1, :-1]).max() < 0.05  # confound regressed out
        # what is left is still the painted signal
        x = truth[sid][:, 2:].astype(np.float64)
        assert min(np.corrcoef(x[r], y[r])[0, 1] for r in range(5)) > 0.9


def test_shifted_header_on_the_same_grid_fails_that_subject(tmp_path):
    """Same shape and voxel size but a 4 mm translation: misaligned headers, not resampled silently."""
    cfg, truth = build(tmp_path, n_sub=3)
    p = bold_path(cfg, "sub-01")
    img = nib.load(p)
    aff = AFF.copy()
    aff[0, 3] += 4.0
    moved = nib.Nifti1Image(np.asarray(img.dataobj), aff)
    moved.header.set_zooms((3.0, 3.0, 3.0, 2.0))
    nib.save(moved, p)
    m = prepare_site(cfg, progress=False)
    s = m["subjects"]
    assert s["sub-00"]["status"] == "ok" and s["sub-02"]["status"] == "ok" and s["sub-01"]["status"] == "failed"
    e = s["sub-01"]["error"]
    assert str(p) in e and "atlas 'sub'" in e and "translation of (4.0, 0.0, 0.0) mm" in e
    assert "same grid shape and voxel size" in e and "not aligned" in e
    assert not (cfg.output_dir / "sub-01.npy").exists()
    np.testing.assert_allclose(np.load(cfg.output_dir / "sub-02.npy"), truth["sub-02"], rtol=1e-6)


def test_overlapping_atlas_blocks_are_counted_in_qc(tmp_path, caplog):
    cfg, _ = build(tmp_path, n_sub=1)
    assert prepare_site(cfg, progress=False)["qc"]["atlas_overlap_voxels"] == {}
    ctx_file = tmp_path / "atlases" / "ctx.nii.gz"
    ctx = np.asarray(nib.load(ctx_file).dataobj).copy()
    ctx[1:3, 1:3, 1] = 3  # 4 voxels of sub label 1 also in ctx label 3
    nib.save(nib.Nifti1Image(ctx, AFF), ctx_file)
    with caplog.at_level(logging.WARNING, logger="sites.prepare"):
        m = prepare_site(cfg, progress=False)
    assert m["qc"]["atlas_overlap_voxels"] == {"sub+ctx": 4}
    assert json.loads((cfg.output_dir / "manifest.json").read_text())["qc"] == m["qc"]
    assert "claimed by two atlas blocks" in caplog.text and "'sub+ctx': 4" in caplog.text
    assert m["subjects"]["sub-00"]["status"] == "ok"  # reported, not an error


def _set_header_tr(p: Path, tr: float) -> None:
    img = nib.load(p)
    out = nib.Nifti1Image(np.asarray(img.dataobj), AFF)
    out.header.set_zooms((3.0, 3.0, 3.0, tr))
    out.header.set_xyzt_units("mm", "sec")
    nib.save(out, p)


def test_declared_tr_is_checked_against_the_header(tmp_path, caplog):
    # header TR 2.0 s (from `paint`); the site config says 0.8 s -> that subject fails, naming both
    cfg, _ = build(tmp_path, n_sub=2, extra={"tr": 0.8})
    _set_header_tr(bold_path(cfg, "sub-01"), 1.0)  # a placeholder header: the config's value is used
    with caplog.at_level(logging.WARNING, logger="sites.prepare"):
        s = prepare_site(cfg, progress=False)["subjects"]
    e = s["sub-00"]["error"]
    assert str(bold_path(cfg, "sub-00")) in e and "tr=0.8 s" in e and "TR of 2.0 s" in e
    assert s["sub-01"]["status"] == "ok" and s["sub-01"]["tr"] == 0.8
    assert "placeholder TR of 1.0 s: using the site config's tr=0.8 s" in caplog.text
    # within 1 %: accepted
    cfg2, _ = build(tmp_path / "b", n_sub=1, extra={"tr": 2.01})
    assert prepare_site(cfg2, progress=False)["subjects"]["sub-00"]["status"] == "ok"
