"""Pretraining on one machine: real learning without collapse, resume, checkpoints, the CLI."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import structured_cohort, write_roi_dir
from typer.testing import CliRunner

from brainjepa.checkpoint import load_checkpoint
from brainjepa.cli import app
from brainjepa.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from brainjepa.errors import ConfigError
from brainjepa.jepa import JEPAModels
from brainjepa.pretrain import pretrain


def _config(roi_dir: Path, out: Path, steps: int, **train) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(size="tiny", n_rois=32, n_frames=64, gradient_components=8),
        data=DataConfig(roi_dir=str(roi_dir), scaling="none"),  # the fixture's series are z-scored
        optim=OptimConfig(),
        train=TrainConfig(steps=steps, batch_size=8, out_dir=str(out), checkpoint_every=steps, **train),
    )


def _embedding_spread(models: JEPAModels, x: torch.Tensor) -> tuple[float, float]:
    """Per-position std of the target's normalised tokens across subjects, and the effective rank of
    the subjects' flattened representations (exp of the singular-value entropy)."""
    with torch.no_grad():
        h = models.target(x)  # (N, n_tokens, D)
    h = torch.nn.functional.layer_norm(h, (h.shape[-1],))
    std = h.std(dim=0).mean().item()
    z = h.flatten(1)
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum()
    return std, torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()


@pytest.mark.slow  # 200 pretraining steps
def test_pretraining_learns_without_collapse(tmp_path: Path) -> None:
    data = structured_cohort(48, 32, 96, seed=1)
    d = write_roi_dir(data, tmp_path / "rois")
    cfg = _config(d, tmp_path / "run", steps=200, log_every=20)
    result = pretrain(cfg, progress=False)
    with open(result.metrics) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 200
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    # with the data term on the scale of the positions (`patch_init: unit`) the pretext cannot be solved from
    # positions alone: the loss falls by about a third here (0.43 -> 0.28), not to ~0 (docs/results.md)
    assert end < 0.75 * start, f"loss did not fall below its start: {start:.4f} -> {end:.4f}"

    ckpt = load_checkpoint(result.checkpoint)
    models = JEPAModels(cfg.model, torch.from_numpy(ckpt["gradients"]))
    models.load_state_dict(ckpt["models"])
    x = torch.from_numpy(data[:, :, :64])
    std, rank = _embedding_spread(models, x)
    # a collapsed encoder maps every subject to the same tokens: std -> 0, effective rank -> 1
    assert std > 0.05, f"embeddings collapsed across subjects (std {std:.4f})"
    assert rank > 8, f"embeddings collapsed to a low-rank set (effective rank {rank:.2f})"


def test_resume_continues_bit_for_bit(roi_dir: Path, tmp_path: Path, monkeypatch) -> None:
    straight = pretrain(_config(roi_dir, tmp_path / "a", steps=6), progress=False)
    cfg_b = _config(roi_dir, tmp_path / "b", steps=6)
    cfg_b = replace(cfg_b, train=replace(cfg_b.train, checkpoint_every=3))
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(cfg_b, 4, monkeypatch)  # checkpoint at step 3 written, then Ctrl-C in step 4
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 3
    resumed = pretrain(cfg_b, resume=True, progress=False)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 6
    for k, v in a["models"].items():
        assert torch.equal(v, b["models"][k]), f"{k} differs after resume"
    with open(straight.metrics) as fa, open(resumed.metrics) as fb:
        assert [r["loss"] for r in csv.DictReader(fa)] == [r["loss"] for r in csv.DictReader(fb)]


def _interrupt_after(cfg: PretrainConfig, n_steps: int, monkeypatch) -> None:
    """Run pretraining and raise KeyboardInterrupt inside the n-th optimizer step (the Ctrl-C path)."""
    import brainjepa.pretrain as module

    original = module.PretrainStep.__call__
    calls = {"n": 0}

    def interrupting(self, batches, step):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n_steps:
            raise KeyboardInterrupt
        return original(self, batches, step)

    monkeypatch.setattr(module.PretrainStep, "__call__", interrupting)
    pretrain(cfg, progress=False)


def test_crash_while_writing_keeps_the_previous_checkpoint(roi_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = _config(roi_dir, tmp_path / "run", steps=2)
    pretrain(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    before = path.read_bytes()

    def crash(obj, f, *a, **k):  # the disk fills up half-way through the write
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        pretrain(cfg, progress=False)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 2
    assert not list(path.parent.glob(".checkpoint.pt.tmp-*")), "the partial temporary file must be removed"


def test_checkpoint_is_self_describing(roi_dir: Path, tmp_path: Path) -> None:
    result = pretrain(_config(roi_dir, tmp_path / "run", steps=2), progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    for key in ("config", "model_config", "gradients", "gradient_checksum", "step", "models", "trainer"):
        assert key in ckpt
    assert {k.split(".")[0] for k in ckpt["models"]} == {"encoder", "predictor", "target"}
    assert ckpt["model_config"]["n_rois"] == 32 and ckpt["gradients"].shape == (32, 8)


def test_cli_pretrain_from_yaml(roi_dir: Path, tmp_path: Path) -> None:
    cfg = {
        "model": {"size": "tiny", "n_rois": 32, "n_frames": 64, "gradient_components": 8},
        "data": {"roi_dir": str(roi_dir), "scaling": "none"},
        "train": {"steps": 3, "batch_size": 4, "out_dir": str(tmp_path / "cli_run")},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["pretrain", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "checkpoint.pt" in result.output
    assert (tmp_path / "cli_run" / "checkpoint.pt").is_file()
    assert (tmp_path / "cli_run" / "metrics.csv").is_file()
    assert (tmp_path / "cli_run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synth_then_pretrain_end_to_end_from_the_cli(tmp_path: Path) -> None:
    """The README's path: `brainjepa synth`, then `brainjepa pretrain --site` on one generated site."""
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "synth"),
            "--sites",
            "2",
            "--subjects",
            "12",
            "--rois",
            "40",
            "--duration",
            "400",
            "--no-progress",
        ],
    )
    assert out.exit_code == 0, out.output
    site = tmp_path / "synth" / "site_b" / "site_b.yaml"
    assert site.is_file()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"size": "tiny", "n_rois": 40, "n_frames": 160, "gradient_components": 10},
                "train": {"steps": 2, "batch_size": 4, "out_dir": str(tmp_path / "run")},
            }
        )
    )
    res = runner.invoke(app, ["pretrain", "--config", str(cfg), "--site", str(site)])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["scaling"]["kind"] == "centered_roi_scaling" and len(ckpt["scaling"]["scale"]) == 40  # the default
    assert ckpt["gradients"].shape == (40, 10)


def test_keep_every_keeps_the_checkpoints_along_the_run(roi_dir: Path, tmp_path: Path) -> None:
    """`train.keep_every: 2` leaves checkpoint_000002.pt ... beside the latest: each the run at that step
    (a later save does not overwrite an earlier kept one), the last equal to checkpoint.pt."""
    result = pretrain(_config(roi_dir, tmp_path / "run", steps=6, keep_every=2), progress=False)
    kept = sorted((tmp_path / "run").glob("checkpoint_*.pt"))
    assert [k.name for k in kept] == ["checkpoint_000002.pt", "checkpoint_000004.pt", "checkpoint_000006.pt"]
    ckpts = [load_checkpoint(k) for k in kept]
    assert [c["step"] for c in ckpts] == [2, 4, 6]
    last = load_checkpoint(result.checkpoint)
    assert all(torch.equal(ckpts[-1]["models"][k], v) for k, v in last["models"].items())
    assert not all(torch.equal(ckpts[0]["models"][k], v) for k, v in last["models"].items())  # trained on after step 2
    with pytest.raises(ConfigError, match="train.keep_every"):
        TrainConfig(keep_every=-1)
