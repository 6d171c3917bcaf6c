"""Missing ROIs (`preprocess.missing_rois: error | skip_scan | mask`) from the file to the model, and BIDS runs."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainjepa.config import MaskConfig
from brainjepa.data import BatchStream, pack_cohort
from brainjepa.downstream.baselines import fc_features, fit_fc_baseline
from brainjepa.errors import DataError
from brainjepa.gradients import federated_fc, fisher_z_fc, group_connectivity, site_fc_sum
from brainjepa.masks import mean_observed, sample_masks, sample_masks_observed, split_missing
from sites.cohort import load_cohort, load_site_series
from sites.config import parse_site_config
from sites.participants import write_participants
from sites.prepare import prepare_site
from sites.scaling import fit_method, fit_values

R, L = 6, 80

CORRUPT = {  # ROI 2 of a scan made missing in each of the three ways real data has
    "all-zero": lambda x: np.where(np.arange(R)[:, None] == 2, 0.0, x),
    "NaN": lambda x: np.where((np.arange(R)[:, None] == 2) & (np.arange(L) % 7 == 0), np.nan, x),
    "constant": lambda x: np.where(np.arange(R)[:, None] == 2, 123.0, x),
}


def roi_site(
    tmp_path: Path,
    policy: str | None = None,
    bad: dict[str, str] | None = None,
    n_sub: int = 8,
    runs: int = 0,
    scaling_shift: float = 100.0,
):
    """n_sub subjects of (R, L) .npy series; `bad` maps a subject to how its ROI 2 is broken."""
    rng = np.random.default_rng(0)
    root = tmp_path / "site"
    (root / "roi").mkdir(parents=True)
    ids = [f"sub-{i:02d}" for i in range(n_sub)]
    for sid in ids:
        for run in range(1, runs + 1) if runs else [0]:
            x = (scaling_shift + rng.standard_normal((R, L))).astype(np.float32)
            x = CORRUPT[bad[sid]](x) if bad and sid in bad else x
            np.save(root / "roi" / (f"{sid}_run-{run:02d}.npy" if runs else f"{sid}.npy"), x)
    write_participants(root / "participants.tsv", ids, {"age": np.arange(n_sub) + 30.0})
    raw = {
        "site": "m",
        "data": {"format": "roi", "root": str(root), "file": "roi/{subject}_*.npy" if runs else "roi/{subject}.npy"},
        "tr": 2.0,
        "rois": [{"name": "r", "n_rois": R}],
        "participants": {"phenotypes": ["age"], "runs": bool(runs)},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 3},
    }
    if policy is not None:
        raw["preprocess"] = {"missing_rois": policy}
    return parse_site_config(raw, tmp_path / "site.yaml")


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_each_policy_on_each_kind_of_missing_roi(tmp_path, kind, caplog):
    with pytest.raises(DataError, match=r"sub-03\.npy.*ROI\(s\) 2 .*missing_rois: mask"):
        load_site_series(roi_site(tmp_path / "e", None, {"sub-03": kind}), model_tr=2.0)
    with caplog.at_level(logging.WARNING):
        ss = load_site_series(roi_site(tmp_path / "s", "skip_scan", {"sub-03": kind}), model_tr=2.0)
    assert "sub-03" not in ss.subject_ids and "missing ROI(s) [2]" in ss.skipped["sub-03"] and len(ss) == 7
    assert ss.missing == {"sub-03": [2]} and "1 of 8 scan(s) have missing" in caplog.text
    ss = load_site_series(roi_site(tmp_path / "m", "mask", {"sub-03": kind}), model_tr=2.0)
    x = ss.series[ss.subject_ids.index("sub-03")]
    assert len(ss) == 8 and ss.missing == {"sub-03": [2]}
    assert np.isnan(x[2]).all() and np.isfinite(np.delete(x, 2, axis=0)).all()


def test_mask_reaches_the_model_finite_and_never_as_a_token(tmp_path):
    cfg = roi_site(tmp_path, "mask", {"sub-01": "all-zero", "sub-05": "NaN"})
    cohort = load_cohort(cfg, model_tr=2.0, split=None, min_frames=40, scaling="values")
    stats = cohort.scaling  # statistics of the present values only
    clean = load_cohort(roi_site(tmp_path / "c", "mask"), model_tr=2.0, split=None, scaling="none").series
    ref = fit_values([s[[2]] for i, s in enumerate(clean) if i not in (1, 5)])
    np.testing.assert_allclose(stats.median[2], ref.median[0], rtol=1e-6)
    packed = pack_cohort(cohort.series, cohort.subject_ids, 40)
    stream = BatchStream(packed, 40, 4, 8, MaskConfig(), seed=0)  # every batch holds sub-01 and sub-05
    for i in range(3):
        x, m = stream[i]
        assert torch.isfinite(x).all() and int((x[:, 2] == 0).all(dim=1).sum()) == 2  # filled after scaling
        for tok in (m.context, m.target):
            assert not (tok // 10 == 2).any()  # ROI 2's patches (W = 10) neither context nor target
        assert m.context.shape[0] == 8 and (m.context.diff(dim=1) > 0).all()


def test_masks_without_missing_rois_are_the_same_draws():
    cfg = MaskConfig()
    a = sample_masks(cfg, 4, 12, 10, torch.Generator().manual_seed(5))
    b = sample_masks_observed(cfg, 4, 12, 10, torch.Generator().manual_seed(5), torch.ones(4, 12, dtype=torch.bool))
    assert torch.equal(a.context, b.context) and torch.equal(a.target, b.target)
    obs = torch.ones(4, 12, dtype=torch.bool)
    obs[1, 3] = obs[2, 7] = False  # the batch's union {3, 7} leaves every sample's grid
    c = sample_masks_observed(cfg, 4, 12, 10, torch.Generator().manual_seed(5), obs)
    assert (
        c.context.shape[1] > 0 and not torch.isin(torch.cat([c.context, c.target], 1) // 10, torch.tensor([3, 7])).any()
    )


def test_pooling_ignores_missing_rois():
    x = torch.randn(2, 4, 6)
    x[1, 2] = float("nan")
    filled, observed = split_missing(x)
    assert torch.isfinite(filled).all() and observed.tolist() == [[True] * 4, [True, True, False, True]]
    h = torch.randn(2, 4 * 3, 5)  # 3 time patches per ROI, ROI-major
    pooled = mean_observed(h, observed)
    torch.testing.assert_close(pooled[0], h[0].mean(0))
    torch.testing.assert_close(pooled[1], torch.cat([h[1, :6], h[1, 9:]]).mean(0))


def test_fc_and_gradients_are_pairwise_complete():
    rng = np.random.default_rng(1)
    series = [rng.standard_normal((5, 50)) for _ in range(4)]
    series[1][3] = np.nan
    total, count = site_fc_sum(series)
    assert count.shape == (5, 5) and count[3, 0] == 3 and count[0, 1] == 4
    fc = federated_fc([(total, count)])
    z = [fisher_z_fc(s) for s in series]
    np.testing.assert_allclose(fc[3, 0], np.mean([z[i][3, 0] for i in (0, 2, 3)]))
    np.testing.assert_allclose(fc[0, 1], np.mean([zi[0, 1] for zi in z]))
    np.testing.assert_allclose(group_connectivity(np.stack(series)), fc, atol=1e-6)
    with pytest.raises(DataError, match="no scan with both"):
        federated_fc([site_fc_sum([series[1]])])


def test_fc_baseline_imputes_missing_pairs_from_training_scans():
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((4, 40)) for _ in range(12)]
    xs[0][1] = np.nan
    X = fc_features(xs)
    assert np.isnan(X[0, [0, 3, 4]]).all() and np.isfinite(X[1:]).all()  # pairs (0,1), (1,2), (1,3)
    y = np.arange(12) % 2
    est = fit_fc_baseline(X[:8], y[:8], X[8:], y[8:], "classification", seed=0)
    assert np.isfinite(est.predict_proba(X[:2])).all()


@pytest.mark.parametrize(
    "kind, method",
    [
        ("demeaned", "values"),
        ("standardized", "values"),
        ("raw-offset", "scan"),
        ("raw-equal", "values"),
        ("raw-near", "robust"),
    ],
)
def test_auto_scaling_picks_by_the_data_and_lands_near_unit_spread(kind, method, caplog):
    from sites.scaling import check_spread, choose_method

    rng = np.random.default_rng(0)
    base = [rng.normal(0, 1, (6, 200)) * rng.uniform(50, 1500, (6, 1)) for _ in range(12)]
    if kind == "demeaned":
        data = [x - x.mean(1, keepdims=True) for x in base]
    elif kind == "standardized":
        data = [(x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True) for x in base]
    elif kind == "raw-offset":  # per-scan baselines far apart against the signal
        data = [x + rng.uniform(5e3, 5e4, (6, 1)) for x in base]
    else:  # raw intensities, the same baseline per ROI in every scan (raw-equal) or within ~ the signal's SD
        offsets = rng.uniform(5e3, 5e4, (6, 1))
        jitter = 0.0 if kind == "raw-equal" else 10.0
        data = [rng.normal(0, 1, (6, 200)) * 20 + offsets + rng.normal(0, jitter, (6, 1)) for _ in range(12)]
    assert choose_method(data)[0] == method
    with caplog.at_level(logging.INFO):
        scaled = fit_method(data, "auto", "site_q").apply_all(data)
    assert f"picked '{method}'" in caplog.text and "site_q" in caplog.text
    assert 0.3 < check_spread(scaled, "site_q", "auto") < 3.0


def test_bids_runs_become_rows_of_one_subject_split_together(tmp_path):
    cfg = roi_site(tmp_path, n_sub=12, runs=3)
    ss = load_site_series(cfg, model_tr=2.0)
    assert len(ss) == 36 and ss.subject_ids[:3] == ["sub-00_run-01", "sub-00_run-02", "sub-00_run-03"]
    by_subject: dict[str, set] = {}
    for sid, split in zip(ss.subject_ids, ss.splits, strict=True):
        by_subject.setdefault(sid.split("_run-")[0], set()).add(str(split))
    assert len(by_subject) == 12 and all(len(s) == 1 for s in by_subject.values())
    assert {s for v in by_subject.values() for s in v} == {"train", "val", "test"}
    np.testing.assert_array_equal(ss.phenotypes["age"][:4], [30.0, 30.0, 30.0, 31.0])
    with pytest.raises(DataError, match="participants.runs: true"):
        load_site_series(parse_site_config({**_raw(cfg), "participants": {"phenotypes": ["age"]}}, cfg.source))
    from client.training import scan_units  # DP-SGD's privacy unit: the subject, not the run

    units = scan_units(cfg, ss.subject_ids)
    assert len(set(units.tolist())) == 12 and (units[:3] == units[0]).all() and units[3] != units[0]


def _raw(cfg) -> dict:
    return {
        "site": cfg.site,
        "data": {"format": "roi", "root": str(cfg.data.root), "file": cfg.data.file},
        "tr": cfg.tr,
        "rois": [{"name": "r", "n_rois": R}],
    }


def nifti_site(tmp_path: Path, policy: str, fd: np.ndarray | None = None, min_coverage: float = 0.0):
    """Two subjects' 4D BOLD (3 labels; label 3 all zero in sub-01: outside the field of view; half of
    label 1 outside it in sub-00)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "bids"
    tmp_path.mkdir(parents=True, exist_ok=True)
    atlas = np.zeros((4, 4, 3), np.int16)
    atlas[:2, :, :] = 1
    atlas[2:, :2, :] = 2
    atlas[2:, 2:, :] = 3
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(atlas, aff), tmp_path / "atlas.nii.gz")
    truth = {}
    for sid in ("sub-00", "sub-01"):
        sig = (rng.standard_normal((3, 30)) * 5 + 100).astype(np.float32)  # (R, L)
        if sid == "sub-01":
            sig[2] = 0.0
        data = sig[atlas - 1].astype(np.float32)  # (X, Y, Z, L)
        if sid == "sub-00":
            data[0] = 0.0  # half of label 1's voxels: the ROI is cut by the field of view
        (root / sid / "func").mkdir(parents=True)
        img = nib.Nifti1Image(data, aff)
        img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
        nib.save(img, root / sid / "func" / f"{sid}_task-rest_bold.nii.gz")
        if fd is not None:
            rows = ["n/a"] + [f"{v:.2f}" for v in fd[1:]]
            (root / sid / "func" / f"{sid}_conf.tsv").write_text("framewise_displacement\n" + "\n".join(rows) + "\n")
        truth[sid] = sig
    write_participants(root / "participants.tsv", ["sub-00", "sub-01"], {})
    raw = {
        "site": "n",
        "data": {"format": "nifti", "root": str(root), "bold": "{subject}/func/{subject}_task-rest_bold.nii.gz"},
        "rois": [{"name": "a", "n_rois": 3, "atlas": str(tmp_path / "atlas.nii.gz")}],
        "preprocess": {"n_jobs": 1, "missing_rois": policy, "min_coverage": min_coverage},
        "split": {"train": 1.0, "val": 0.0, "test": 0.0},
    }
    if fd is not None:
        raw["data"]["confounds"] = "{subject}/func/{subject}_conf.tsv"
        raw["preprocess"].update(scrub_fd=0.5, drop_initial=1)
    return parse_site_config(raw, tmp_path / "n.yaml"), truth


@pytest.mark.usefixtures("gc_frozen")  # nilearn collects garbage at every image read
def test_prepare_records_missing_rois_and_the_loader_applies_the_policy(tmp_path):
    cfg, truth = nifti_site(tmp_path / "e", "error")
    m = prepare_site(cfg, progress=False)
    assert m["subjects"]["sub-01"]["status"] == "failed" and "missing_rois: mask" in m["subjects"]["sub-01"]["error"]
    cfg, truth = nifti_site(tmp_path / "m", "mask")
    m = prepare_site(cfg, progress=False)
    assert m["summary"]["ok"] == 2 and m["summary"]["scans_with_missing_rois"] == 1
    assert m["qc"]["missing_rois"]["per_roi"] == {"a_2": 1} and m["subjects"]["sub-01"]["qc"]["missing_rois"] == [2]
    ss = load_site_series(cfg, model_tr=2.0)
    assert ss.missing == {"sub-01": [2]} and np.isnan(ss.series[1][2]).all()
    np.testing.assert_allclose(ss.series[1][:2], truth["sub-01"][:2], rtol=1e-5)
    q0 = m["subjects"]["sub-00"]["qc"]
    assert (
        q0["partial_coverage_rois"] == [0]
        and q0["coverage_min"] == 0.5
        and m["summary"]["scans_with_partial_coverage"] == 1
    )
    np.testing.assert_allclose(ss.series[0][0], truth["sub-00"][0] / 2, rtol=1e-5)  # nilearn averages the zeros in
    cfg, _ = nifti_site(tmp_path / "c", "mask", min_coverage=0.6)  # less than 60 % of a ROI in the data: missing
    assert prepare_site(cfg, progress=False)["qc"]["missing_rois"]["per_scan"] == {"sub-00": [0], "sub-01": [2]}


@pytest.mark.usefixtures("gc_frozen")  # nilearn collects garbage at every image read
def test_prepare_censors_through_sample_mask_and_keeps_the_longest_stretch(tmp_path):
    fd = np.full(30, 0.1)
    fd[[8, 20]] = 0.9  # censored: frames 8 and 20; frame 0 dropped (drop_initial = 1)
    cfg, truth = nifti_site(tmp_path, "mask", fd)
    m = prepare_site(cfg, progress=False)
    e = m["subjects"]["sub-00"]
    assert e["qc"]["censoring"] == {"frames": 29, "censored": 2, "kept": 11, "threshold_mm": 0.5}
    assert e["frames"] == 11 and m["summary"]["frames_censored"] == 4
    out = np.load(cfg.output_dir / "sub-00.npy")  # (R, 11); ROI 0 half outside the field of view
    np.testing.assert_allclose(out, truth["sub-00"][:, 9:20] * np.array([[0.5], [1.0], [1.0]]), rtol=1e-5)
    ss = load_site_series(cfg, model_tr=2.0)  # not censored twice
    assert ss.series[0].shape == (3, 11) and ss.censored["sub-00"] == {"frames": 29, "censored": 2, "kept": 11}


@pytest.mark.usefixtures("gc_frozen")  # nilearn collects garbage at every image read
def test_prepare_extracts_each_bids_run_as_a_row(tmp_path):
    cfg, truth = nifti_site(tmp_path, "mask")
    root = cfg.data.root
    for sid in ("sub-00", "sub-01"):  # rename to run-01 and add a run-02 (the same image, reversed in time)
        f = root / sid / "func" / f"{sid}_task-rest_bold.nii.gz"
        img = nib.load(f)
        nib.save(img, root / sid / "func" / f"{sid}_task-rest_run-01_bold.nii.gz")
        rev = nib.Nifti1Image(np.asarray(img.dataobj)[..., ::-1].copy(), img.affine, img.header)
        nib.save(rev, root / sid / "func" / f"{sid}_task-rest_run-02_bold.nii.gz")
        f.unlink()
    raw = {
        "site": "n",
        "data": {"format": "nifti", "root": str(root), "bold": "{subject}/func/{subject}_*_bold.nii.gz"},
        "rois": [{"name": "a", "n_rois": 3, "atlas": str(cfg.rois[0].atlas)}],
        "preprocess": {"n_jobs": 1, "missing_rois": "mask"},
        "participants": {"runs": True},
        "split": {"train": 0.5, "val": 0.5, "test": 0.0},
    }
    runs = parse_site_config(raw, tmp_path / "r.yaml")
    m = prepare_site(runs, progress=False)
    assert list(m["subjects"]) == ["sub-00_run-01", "sub-00_run-02", "sub-01_run-01", "sub-01_run-02"]
    assert m["summary"]["ok"] == 4 and m["qc"]["missing_rois"]["scans_with_missing"] == 2
    ss = load_site_series(runs, model_tr=2.0)
    np.testing.assert_allclose(ss.series[1][1:], truth["sub-00"][1:, ::-1], rtol=1e-5)  # run-02: reversed
    assert ss.splits[0] == ss.splits[1] and ss.splits[2] == ss.splits[3] and ss.splits[0] != ss.splits[2]
    with pytest.raises(DataError, match="participants.runs: true"):
        prepare_site(parse_site_config({**raw, "participants": {}}, tmp_path / "r.yaml"), progress=False)
