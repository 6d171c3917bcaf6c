"""`brainjepa embed`: frozen-backbone features of a site or a series file, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig, load_site
from brainjepa.downstream.model import load_backbone
from brainjepa.pretrain import pretrain
from brainjepa.vit import Encoder
from sites.cohort import load_site_series
from sites.scaling import scaling_from_dict
from sites.synth import generate_cohorts

R, T, K = 30, 64, 8  # ROIs, window frames, gradient components; patch 16 -> 4 time patches


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(site YAML, checkpoint): a 12-subject generated site and a tiny model pretrained 2 steps on it."""
    root = tmp_path_factory.mktemp("embed")
    (site,) = generate_cohorts(root / "sites", n_sites=1, subjects_per_site=12, n_rois=R, duration_s=300)
    cfg = PretrainConfig(
        model=ModelConfig(size="tiny", n_rois=R, n_frames=T, gradient_components=K),
        data=DataConfig(site=str(site)),
        train=TrainConfig(steps=2, batch_size=4, out_dir=str(root / "run"), checkpoint_every=2, device="cpu"),
    )
    return site, pretrain(cfg, progress=False).checkpoint


def _embed(*args: str) -> None:
    res = CliRunner().invoke(app, ["embed", *args, "--no-progress"])
    assert res.exit_code == 0, res.output


def _fails(*args: str) -> str:
    res = CliRunner().invoke(app, ["embed", *args, "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output
    return res.output


def test_pooled_features_ids_and_metadata(run: tuple[Path, Path], tmp_path: Path) -> None:
    site, ckpt = run
    _embed(str(ckpt), "--site", str(site), "--split", "train", "--out", str(tmp_path / "train"))
    x = np.load(tmp_path / "train.npy")
    expected = load_site_series(load_site(site)[0], split="train", min_frames=T).subject_ids
    assert (tmp_path / "train.ids.txt").read_text().splitlines() == expected
    assert x.shape == (len(expected), 64) and x.dtype == np.float32 and np.isfinite(x).all()
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["checkpoint"] == str(ckpt.resolve()) and len(meta["checkpoint_sha256"]) == 64
    assert meta["shape"] == [len(expected), 64] and meta["windows"] == 4 and meta["split"] == "train"
    assert meta["random_init"] is False and meta["model"]["n_rois"] == R
    assert meta["scaling"]["kind"] == "site-train-centered" and meta["subject_splits"] == ["train"] * len(expected)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_tokens_pooled_is_their_mean_and_runs_are_identical(run: tuple[Path, Path], tmp_path: Path) -> None:
    site, ckpt = run
    common = [str(ckpt), "--site", str(site), "--windows", "3"]
    _embed(*common, "--out", str(tmp_path / "a"))
    _embed(*common, "--out", str(tmp_path / "b"))
    _embed(*common, "--tokens", "--out", str(tmp_path / "tok"))
    a, b, tok = (np.load(tmp_path / f"{n}.npy") for n in ("a", "b", "tok"))
    n_all = len(load_site_series(load_site(site)[0], min_frames=T).subject_ids)
    assert np.array_equal(a, b), "the same command twice must give identical features"
    assert tok.shape == (n_all, R * (T // 16), 64) and a.shape == (n_all, 64)
    np.testing.assert_allclose(tok.mean(axis=1), a, rtol=1e-5, atol=1e-6)


def test_random_init_differs_with_the_same_shape(run: tuple[Path, Path], tmp_path: Path) -> None:
    site, ckpt = run
    _embed(str(ckpt), "--site", str(site), "--out", str(tmp_path / "pre"))
    _embed(str(ckpt), "--site", str(site), "--random-init", "--out", str(tmp_path / "rnd"))
    _embed(str(ckpt), "--site", str(site), "--random-init", "--seed", "1", "--out", str(tmp_path / "rnd1"))
    pre, rnd, rnd1 = (np.load(tmp_path / f"{n}.npy") for n in ("pre", "rnd", "rnd1"))
    assert pre.shape == rnd.shape
    assert not np.allclose(pre, rnd) and not np.allclose(rnd, rnd1)
    meta = json.loads((tmp_path / "rnd.json").read_text())
    assert meta["random_init"] is True and meta["seed"] == 0


def test_series_file_matches_a_direct_forward(run: tuple[Path, Path], tmp_path: Path) -> None:
    """One window (the centred one) of one file, scaled by the checkpoint's statistics: the pooled
    feature is the target encoder's mean token."""
    _, ckpt = run
    x = np.random.default_rng(0).normal(size=(R, 100)).astype(np.float32)
    np.save(tmp_path / "scan.npy", x)
    _embed(
        str(ckpt),
        "--series",
        str(tmp_path / "scan.npy"),
        "--ids",
        "sub-x",
        "--windows",
        "1",
        "--out",
        str(tmp_path / "one"),
    )
    assert (tmp_path / "one.ids.txt").read_text() == "sub-x\n"
    bb = load_backbone(ckpt)
    enc = Encoder(bb.model, torch.from_numpy(bb.gradients))
    enc.load_state_dict(bb.weights)
    start = (100 - T + 1) // 2  # multi_windows' single window: floor(span * 0.5 + 0.5)
    scaled = scaling_from_dict(bb.scaling).apply(x)[:, start : start + T]
    with torch.no_grad():
        expected = enc.eval()(torch.from_numpy(scaled)[None]).mean(dim=1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), expected, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "one.json").read_text())["scaling"]["kind"] == "checkpoint-robust"


def test_clear_errors_name_the_file(run: tuple[Path, Path], tmp_path: Path) -> None:
    site, ckpt = run
    (other,) = generate_cohorts(tmp_path / "other", n_sites=1, subjects_per_site=4, n_rois=20, duration_s=300)
    out = _fails(str(ckpt), "--site", str(other), "--out", str(tmp_path / "x"))
    assert str(other) in out and "20 ROIs" in out and "30" in out
    np.save(tmp_path / "wide.npy", np.zeros((20, 100), dtype=np.float32))
    out = _fails(str(ckpt), "--series", str(tmp_path / "wide.npy"), "--out", str(tmp_path / "x"))
    assert "wide.npy" in out and "R=30" in out and "(20, 100)" in out
    np.save(tmp_path / "short.npy", np.zeros((R, T - 1), dtype=np.float32))
    out = _fails(str(ckpt), "--series", str(tmp_path / "short.npy"), "--out", str(tmp_path / "x"))
    assert "short.npy" in out and f"L>={T}" in out
    assert "does not exist" in _fails(str(ckpt), "--series", str(tmp_path / "none.npy"), "--out", str(tmp_path / "x"))
    assert "does not exist" in _fails(str(tmp_path / "no.pt"), "--site", str(site), "--out", str(tmp_path / "x"))
    assert "exactly one input" in _fails(str(ckpt), "--out", str(tmp_path / "x"))
    assert "embed.split" in _fails(str(ckpt), "--site", str(site), "--split", "dev", "--out", str(tmp_path / "x"))
    assert not list(tmp_path.glob("x*")), "a failed run writes nothing"
