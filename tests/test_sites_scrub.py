"""Frame censoring by framewise displacement (`preprocess.scrub_fd`): the right frames go, counts are right."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from brainjepa.errors import ConfigError, DataError
from sites.cohort import load_site_series
from sites.config import parse_site_config
from sites.manifest import write_manifest
from sites.participants import write_participants
from sites.scrub import keep_mask, longest_run, read_fd

N_FRAMES = 40
# FD spikes per subject (frame indices); sub-00 has none
SPIKES = {"sub-00": [], "sub-01": [10, 11], "sub-02": [5, 30]}
# the longest run of kept frames per subject, [start, stop)
EXPECTED = {"sub-00": (0, 40), "sub-01": (12, 40), "sub-02": (6, 30)}


def make_site(tmp_path: Path, preprocess: dict | None = None, fd_format: str = "tsv", skip_fd: str = ""):
    """Three subjects of (4, 40) series at TR 2.0 s, an FD file each (fMRIPrep-like: first value n/a)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "site"
    (root / "roi").mkdir(parents=True)
    (root / "motion").mkdir()
    truth = {}
    for sid, spikes in SPIKES.items():
        x = (100 + rng.standard_normal((4, N_FRAMES))).astype(np.float32)
        np.save(root / "roi" / f"{sid}.npy", x)
        truth[sid] = x
        fd = np.full(N_FRAMES, 0.1)
        fd[spikes] = 0.9
        if sid == skip_fd:
            continue
        if fd_format == "npy":
            np.save(root / "motion" / f"{sid}_fd.npy", fd)
        else:
            rows = ["n/a"] + [f"{v:.3f}" for v in fd[1:]]
            text = "framewise_displacement\tdvars\n" + "".join(f"{r}\t1.0\n" for r in rows)
            (root / "motion" / f"{sid}_fd.tsv").write_text(text)
    write_participants(root / "participants.tsv", list(SPIKES), {"age": np.array([50.0, 60.0, 70.0])})
    pp = {"scrub_fd": 0.5, "fd_file": f"motion/{{subject}}_fd.{fd_format}"}
    raw = {
        "site": "scrubbed",
        "data": {"format": "roi", "root": str(root), "file": "roi/{subject}.npy"},
        "tr": 2.0,
        "rois": [{"name": "a", "n_rois": 4}],
        "preprocess": pp if preprocess is None else preprocess,
        "split": {"train": 1.0, "val": 0.0, "test": 0.0},
    }
    return parse_site_config(raw, tmp_path / "site.yaml"), truth


def test_keep_mask_and_longest_run():
    fd = np.array([np.nan, 0.1, 0.6, 0.2, 0.2, 0.2, 0.7])
    keep = keep_mask(fd, 0.5)
    assert keep.tolist() == [True, True, False, True, True, True, False]
    assert longest_run(keep) == (3, 6)
    assert longest_run(np.zeros(3, bool)) == (0, 0)
    assert longest_run(np.array([True, False, True])) == (0, 1)  # first on ties


@pytest.mark.parametrize("fd_format", ["tsv", "npy"])
def test_censored_frames_removed_exactly(tmp_path, fd_format, caplog):
    cfg, truth = make_site(tmp_path, fd_format=fd_format)
    with caplog.at_level(logging.INFO, logger="sites.scrub"):
        ss = load_site_series(cfg, model_tr=2.0)  # site TR = model TR: resampling is the identity
    assert ss.subject_ids == list(SPIKES)
    for sid, x in zip(ss.subject_ids, ss.series, strict=True):
        a, b = EXPECTED[sid]
        np.testing.assert_array_equal(x, truth[sid][:, a:b])
    assert ss.censored == {
        "sub-00": {"frames": 40, "censored": 0, "kept": 40},
        "sub-01": {"frames": 40, "censored": 2, "kept": 28},
        "sub-02": {"frames": 40, "censored": 2, "kept": 24},
    }
    assert "site scrubbed: censored 4 frames (3.3 %) in 2 scans at FD > 0.5 mm" in caplog.text


def test_no_threshold_leaves_series_unchanged(tmp_path):
    cfg, truth = make_site(tmp_path, preprocess={"fd_file": "motion/{subject}_fd.tsv"})
    ss = load_site_series(cfg, model_tr=2.0)
    for sid, x in zip(ss.subject_ids, ss.series, strict=True):
        np.testing.assert_array_equal(x, truth[sid])
    assert ss.censored == {}


def test_short_kept_stretch_is_dropped_and_counted(tmp_path):
    cfg, _ = make_site(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_short="skip"))
    ss = load_site_series(cfg, model_tr=2.0, min_frames=26)
    assert ss.subject_ids == ["sub-00", "sub-01"]  # sub-02 keeps 24 frames < 26
    assert ss.skipped["sub-02"].startswith("too short (24 < 26")
    assert ss.censored["sub-02"]["kept"] == 24


def test_missing_fd_file_is_an_error_naming_it(tmp_path):
    cfg, _ = make_site(tmp_path, skip_fd="sub-01")
    with pytest.raises(DataError, match=r"preprocess\.fd_file.*sub-01.*motion/sub-01_fd\.tsv"):
        load_site_series(cfg, model_tr=2.0)


def test_fd_length_mismatch_is_an_error(tmp_path):
    cfg, _ = make_site(tmp_path, fd_format="npy")
    np.save(cfg.data.root / "motion" / "sub-02_fd.npy", np.zeros(39))
    with pytest.raises(DataError, match=r"sub-02_fd\.npy.*39 frames.*40 frames"):
        load_site_series(cfg, model_tr=2.0)


def test_fd_column_and_headerless_files(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_text("a\tfd_x\n1\tn/a\n2\t0.3\n")
    np.testing.assert_array_equal(read_fd(p, "fd_x"), [np.nan, 0.3])
    q = tmp_path / "one.csv"
    q.write_text("n/a\n0.2\n0.7\n")  # no header, first value undefined: still 3 frames
    np.testing.assert_array_equal(read_fd(q, "framewise_displacement"), [np.nan, 0.2, 0.7])
    with pytest.raises(DataError, match=r"c\.tsv.*no FD column 'framewise_displacement'"):
        read_fd(p, "framewise_displacement")


@pytest.mark.parametrize(
    "pp, match",
    [
        ({"scrub_fd": 0.0, "fd_file": "m/{subject}.npy"}, r"preprocess\.scrub_fd.*> 0, got 0\.0"),
        ({"scrub_fd": 0.5}, r"preprocess\.fd_file.*scrub_fd needs FD"),
        ({"scrub_fd": 0.5, "fd_file": "m/fd.npy"}, r"preprocess\.fd_file.*must contain"),
    ],
)
def test_config_checks(tmp_path, pp, match):
    with pytest.raises(ConfigError, match=match):
        make_site(tmp_path, preprocess=pp)


def test_nifti_site_censored_from_confounds_after_drop_initial(tmp_path):
    """NIfTI: FD from the confounds TSV of each BOLD image; `prepare` already dropped `drop_initial` frames."""
    root = tmp_path / "nii"
    out = root / "derivatives" / "brainjepa"
    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    x = (100 + rng.standard_normal((3, 30))).astype(np.float32)  # prepared: 32 image frames - 2 dropped
    np.save(out / "sub-01.npy", x)
    fd = np.full(32, 0.1)
    fd[[3, 20]] = 1.0  # image frames 3 and 20 = prepared frames 1 and 18
    rows = ["n/a"] + [f"{v:.2f}" for v in fd[1:]]
    (root / "sub-01").mkdir()
    (root / "sub-01" / "conf.tsv").write_text("framewise_displacement\n" + "\n".join(rows) + "\n")
    write_manifest(out, {"subjects": {"sub-01": {"status": "ok", "file": "sub-01.npy", "tr": 2.0}}})
    write_participants(root / "participants.tsv", ["sub-01"], {})
    raw = {
        "site": "n",
        "data": {"format": "nifti", "root": str(root), "confounds": "{subject}/conf.tsv"},
        "rois": [{"name": "a", "n_rois": 3, "atlas": "atlas.nii.gz"}],
        "preprocess": {"scrub_fd": 0.5, "drop_initial": 2},
        "split": {"train": 1.0, "val": 0.0, "test": 0.0},
    }
    ss = load_site_series(parse_site_config(raw, tmp_path / "n.yaml"), model_tr=2.0)
    np.testing.assert_array_equal(ss.series[0], x[:, 2:18])
    assert ss.censored == {"sub-01": {"frames": 30, "censored": 2, "kept": 16}}
