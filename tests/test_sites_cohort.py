"""ROI-series sites: files matched to participants, read in every format, resampled, checked."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from brainjepa.errors import DataError
from sites.cohort import load_site_series
from sites.config import parse_site_config
from sites.participants import write_participants
from sites.roi_io import read_roi_file
from sites.temporal import n_frames_after, resample


def make_site(
    tmp_path: Path, n_sub=6, n_rois=5, n_frames=60, tr=1.0, fmt="npy", orientation="rois_x_time", seed=0, extra=None
):
    """Write n_sub random ROI series + participants.tsv; return (cfg, {id: (R, L) array})."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "site"
    ids = [f"sub-{i:02d}" for i in range(n_sub)]
    truth = {}
    for sid in ids:
        x = (100 + rng.standard_normal((n_rois, n_frames))).astype(np.float32)  # (R, L)
        truth[sid] = x
        on_disk = x if orientation == "rois_x_time" else x.T
        d = root / "roi"
        d.mkdir(parents=True, exist_ok=True)
        if fmt == "npy":
            np.save(d / f"{sid}.npy", on_disk)
        else:
            text = "\n".join(",".join(f"{v:.9g}" for v in row) for row in on_disk) + "\n"
            if fmt == "csv.gz":
                with gzip.open(d / f"{sid}.csv.gz", "wt") as f:
                    f.write(text)
            else:
                (d / f"{sid}.csv").write_text(text)
    write_participants(
        root / "participants.tsv", ids, {"age": np.arange(n_sub) + 50.0, "sex": np.array(["M", "F"] * (n_sub // 2))}
    )
    raw = {
        "site": "t",
        "data": {"format": "roi", "root": str(root), "file": f"roi/{{subject}}.{fmt}", "orientation": orientation},
        "tr": tr,
        "rois": [{"name": "a", "n_rois": 2}, {"name": "b", "n_rois": n_rois - 2}],
        "participants": {"phenotypes": ["age", "sex"]},
    }
    for k, v in (extra or {}).items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return parse_site_config(raw, tmp_path / "site.yaml"), truth


@pytest.mark.parametrize("fmt", ["npy", "csv", "csv.gz"])
@pytest.mark.parametrize("orientation", ["rois_x_time", "time_x_rois"])
def test_formats_and_orientations_round_trip(tmp_path, fmt, orientation):
    cfg, truth = make_site(tmp_path, fmt=fmt, orientation=orientation)
    ss = load_site_series(cfg, model_tr=1.0)
    assert ss.subject_ids == sorted(truth) and ss.n_rois == 5 and ss.tr == 1.0 and ss.source == cfg.source
    for sid, x in zip(ss.subject_ids, ss.series, strict=True):
        assert x.dtype == np.float32 and x.shape == (5, 60)
        np.testing.assert_allclose(x, truth[sid], rtol=1e-6)
    np.testing.assert_array_equal(ss.phenotypes["age"], np.arange(6) + 50.0)
    assert list(ss.phenotypes["sex"][:2]) == ["M", "F"]


def test_ukb_layout_split_files_with_header_and_labels(tmp_path):
    """Reference layout: one CSV per atlas, label column + header row, concatenated in declared order."""
    root = tmp_path / "ukb"
    rng = np.random.default_rng(1)
    ids = ["sub-1000001", "sub-1000002"]
    truth = {}
    for sid in ids:
        sub, ctx = rng.standard_normal((3, 20)), rng.standard_normal((4, 20))
        truth[sid] = np.concatenate([sub, ctx])
        d = root / "time_series" / sid[4:]
        d.mkdir(parents=True)
        for name, block in (("fMRI.Tian.csv.gz", sub), ("fMRI.Schaefer.csv.gz", ctx)):
            lines = ["label_name," + ",".join(str(t) for t in range(20))]
            lines += [f"roi{i}," + ",".join(f"{v:.9g}" for v in row) for i, row in enumerate(block)]
            with gzip.open(d / name, "wt") as f:
                f.write("\n".join(lines) + "\n")
    write_participants(root / "participants.tsv", ids, {"sex": np.array([0.0, 1.0])})
    cfg = parse_site_config(
        {
            "site": "ukb",
            "data": {"format": "roi", "root": str(root), "csv_header": True},
            "tr": 0.735,
            "rois": [
                {"name": "tian", "n_rois": 3, "file": "time_series/{label}/fMRI.Tian.csv.gz"},
                {"name": "schaefer", "n_rois": 4, "file": "time_series/{label}/fMRI.Schaefer.csv.gz"},
            ],
        },
        tmp_path / "ukb.yaml",
    )
    ss = load_site_series(cfg, model_tr=0.735)
    for sid, x in zip(ss.subject_ids, ss.series, strict=True):
        np.testing.assert_allclose(x, truth[sid], rtol=1e-6, atol=1e-6)
    assert len(ss.files[0]) == 2


def test_row_without_file_and_file_without_row(tmp_path):
    cfg, _ = make_site(tmp_path)
    (cfg.data.root / "roi" / "sub-03.npy").unlink()
    with pytest.raises(DataError) as e:
        load_site_series(cfg)
    assert "'sub-03'" in str(e.value) and "without a data file" in str(e.value) and str(cfg.source) in str(e.value)
    np.save(cfg.data.root / "roi" / "sub-03.npy", np.ones((5, 60)))
    np.save(cfg.data.root / "roi" / "sub-99.npy", np.random.default_rng(0).standard_normal((5, 60)))
    with pytest.raises(DataError, match=r"no row in.*sub-99"):
        load_site_series(cfg)


def test_on_missing_skip(tmp_path):
    cfg, _ = make_site(tmp_path, extra={"data": {"on_missing": "skip"}})
    (cfg.data.root / "roi" / "sub-01.npy").unlink()
    ss = load_site_series(cfg)
    assert "sub-01" not in ss.subject_ids and ss.skipped["sub-01"] == "no data file" and len(ss) == 5


def test_too_short_error_and_skip(tmp_path):
    cfg, _ = make_site(tmp_path, n_frames=60, tr=1.0)
    with pytest.raises(
        DataError, match=r"60 frames at TR 1.0 s = 29 frames at the model TR 2.1 s, shorter than the window of 40"
    ):
        load_site_series(cfg, model_tr=2.1, min_frames=40)
    cfg2, _ = make_site(tmp_path / "b", n_frames=60, extra={"data": {"on_short": "skip"}})
    np.save(cfg2.data.root / "roi" / "sub-02.npy", np.random.default_rng(0).standard_normal((5, 30)).astype(np.float32))
    ss = load_site_series(cfg2, model_tr=1.0, min_frames=40)
    assert "sub-02" not in ss.subject_ids and "too short" in ss.skipped["sub-02"] and len(ss) == 5


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda x: np.where(np.arange(x.shape[0])[:, None] == 1, np.nan, x), r"NaN or Inf values in ROI\(s\) 1 "),
        (lambda x: np.where(np.arange(x.shape[0])[:, None] == 4, 0.0, x), r"all-zero ROI\(s\) 4 "),
        (lambda x: x[:4], r"has 4 ROIs .* declares 5"),
        (lambda x: x[0], r"expected a 2-D ROI series"),
    ],
)
def test_bad_series_name_the_file(tmp_path, corrupt, match):
    cfg, truth = make_site(tmp_path)
    bad = cfg.data.root / "roi" / "sub-02.npy"
    np.save(bad, corrupt(truth["sub-02"]))
    with pytest.raises(DataError, match=match) as e:
        load_site_series(cfg)
    assert str(bad) in str(e.value)


def test_csv_with_text_cell(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("1,2,3\n4,oops,6\n")
    with pytest.raises(DataError, match=r"non-numeric value 'oops' at data row 2, column 2"):
        read_roi_file(p)


def test_splits_are_deterministic_and_cover_everyone(tmp_path):
    cfg, _ = make_site(tmp_path, n_sub=20, n_frames=20)
    a = load_site_series(cfg)
    b = load_site_series(cfg)
    assert list(a.splits) == list(b.splits)
    assert sorted(set(a.splits)) == ["test", "train", "val"] and (a.splits == "train").sum() == 16
    tr = load_site_series(cfg, split="train")
    assert tr.subject_ids == [s for s, sp in zip(a.subject_ids, a.splits, strict=True) if sp == "train"]
    assert a.subset("val").subject_ids == load_site_series(cfg, split="val").subject_ids


def test_resampling_to_model_tr(tmp_path):
    t_in = np.arange(490) * 0.735
    x = np.stack([np.sin(2 * np.pi * 0.02 * t_in), np.cos(2 * np.pi * 0.05 * t_in)])  # (2, 490) slow waves
    for method in ("polyphase", "linear", "nearest"):
        y = resample(x, 0.735, 2.205, method)
        assert y.shape == (2, n_frames_after(490, 0.735, 2.205)) == (2, 164)
        t_out = np.arange(y.shape[1]) * 2.205
        ref = np.stack([np.sin(2 * np.pi * 0.02 * t_out), np.cos(2 * np.pi * 0.05 * t_out)])
        inner = slice(5, -5)  # polyphase edge effects
        assert np.abs(y[:, inner] - ref[:, inner]).max() < 0.05, method
    np.testing.assert_array_equal(resample(x, 0.735, 2.205, "nearest"), x[:, ::3].astype(np.float32))  # reference
    # upsampling keeps the span; identity when TRs match
    assert resample(x, 2.0, 1.0).shape == (2, 979)
    assert resample(x, 1.0, 1.0).shape == x.shape


def test_cohort_resamples_each_site_tr(tmp_path):
    cfg, truth = make_site(tmp_path, n_frames=90, tr=0.7)
    ss = load_site_series(cfg, model_tr=2.1, method="nearest")
    assert ss.tr == 2.1 and ss.lengths.tolist() == [30] * 6
    np.testing.assert_allclose(ss.series[0], truth["sub-00"][:, ::3], rtol=1e-6)
