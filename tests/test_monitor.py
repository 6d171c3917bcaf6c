"""The collapse monitor: effective rank and spread of the target's features, its warnings, its outputs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import structured_cohort, write_roi_dir

from brainjepa.config import DataConfig, MaskConfig, ModelConfig, MonitorConfig, PretrainConfig, TrainConfig
from brainjepa.errors import ConfigError
from brainjepa.jepa import JEPAModels, jepa_loss
from brainjepa.masks import sample_masks
from brainjepa.monitor import (
    CollapseMonitor,
    Explosion,
    content_stats,
    effective_rank,
    feature_stats,
    position_share,
    read_rows,
    synthetic_probe,
)
from brainjepa.pretrain import pretrain
from brainjepa.vit import Encoder

CFG = ModelConfig(size="tiny", n_rois=32, n_frames=64, gradient_components=8)


def _encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    grads = torch.randn(CFG.n_rois, CFG.gradient_components, generator=torch.Generator().manual_seed(1))
    return Encoder(CFG, grads)


def _collapse(enc: Encoder) -> Encoder:
    """Every token the same vector: the final LayerNorm's scale zeroed, its bias a constant."""
    with torch.no_grad():
        enc.norm.weight.zero_()
        enc.norm.bias.fill_(0.3)
    return enc


def test_effective_rank_counts_used_directions() -> None:
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    assert effective_rank(iso) > 15.0  # every direction used about equally
    line = torch.randn(4000, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 16, generator=g, dtype=torch.float64)
    assert effective_rank(line + 1e-9 * iso) < 1.1  # one direction
    two = torch.cat([torch.randn(4000, 2, generator=g, dtype=torch.float64), torch.zeros(4000, 14)], 1)
    assert 1.8 < effective_rank(two) < 2.05
    assert effective_rank(torch.ones(10, 4)) == 1.0  # no spread at all
    for m, d in ((40, 600), (600, 40)):  # wide rows go through the M x M Gram matrix: the same value
        x = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, d, dtype=torch.float64)
        s = torch.linalg.svdvals(x - x.mean(0))
        p = s / s.sum()
        assert effective_rank(x) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_synthetic_probe_is_deterministic_and_scan_specific() -> None:
    a, b = synthetic_probe(4, 32, 64, seed=3), synthetic_probe(4, 32, 64, seed=3)
    assert a.shape == (4, 32, 64) and torch.equal(a, b)
    assert not torch.equal(a, synthetic_probe(4, 32, 64, seed=4))
    lag1 = torch.corrcoef(torch.stack([a[0, 0, :-1], a[0, 0, 1:]]))[0, 1]
    assert lag1 > 0.6  # autocorrelated like BOLD, not white noise


def test_healthy_encoder_passes_collapsed_one_warns(tmp_path: Path, caplog) -> None:
    probe = synthetic_probe(8, CFG.n_rois, CFG.n_frames, seed=0)
    mon = CollapseMonitor(MonitorConfig(every=1), probe, CFG.embed_dim, tmp_path / "monitor.csv")
    caplog.set_level(logging.WARNING, logger="brainjepa.monitor")
    healthy = mon.measure(_encoder(), step=0)
    assert healthy.rank > MonitorConfig().rank_floor * CFG.embed_dim and healthy.spread > 0.05, healthy
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert mon.check(feature_stats(_encoder(seed=1), probe)) == []  # another healthy init: no warning

    collapsed = mon.measure(_collapse(_encoder()), step=1)
    assert collapsed.rank < 1.5 and collapsed.spread < 1e-6
    messages = [r.getMessage() for r in caplog.records]
    assert any("effective rank" in m and "below the floor" in m for m in messages), messages
    assert any("spread" in m and "below the floor" in m for m in messages), messages
    assert any("fell from" in m for m in messages), messages
    rows = read_rows(tmp_path / "monitor.csv")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["rank"] == pytest.approx(healthy.rank, rel=1e-5)


def test_weights_scaled_up_raise_an_explosion_and_record_nothing(tmp_path: Path) -> None:
    """What a hostile site's x 1e4 target does to the global target: the monitor raises instead of
    recording it; a healthy step after it is still measured against the last recorded one."""
    probe = synthetic_probe(8, CFG.n_rois, CFG.n_frames, seed=0)
    enc = _encoder()
    mon = CollapseMonitor(MonitorConfig(every=1), probe, CFG.embed_dim, tmp_path / "m.csv")
    base = mon.measure(enc, 0)
    assert base.weight_norm == pytest.approx(float(torch.cat([p.flatten() for p in enc.parameters()]).norm()), rel=1e-5)
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(1e4)
    with pytest.raises(Explosion, match=r"step 1: target weight norm went from .* monitor.explode 10 x"):
        mon.measure(enc, 1)
    assert [r["step"] for r in read_rows(tmp_path / "m.csv")] == [0]
    with torch.no_grad():  # the coordinator rolls back: the previous weights measure as before
        for p in enc.parameters():
            p.mul_(1e-4)
    assert mon.measure(enc, 1).weight_norm == pytest.approx(base.weight_norm, rel=1e-4)
    with torch.no_grad():  # x 3: inside the factor, no explosion
        for p in enc.parameters():
            p.mul_(3.0)
    assert mon.measure(enc, 2).weight_norm == pytest.approx(3 * base.weight_norm, rel=1e-4)
    off = CollapseMonitor(MonitorConfig(every=1, explode=0.0), probe, CFG.embed_dim, tmp_path / "off.csv")
    off.measure(enc, 0)
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(1e4)
    off.measure(enc, 1)  # off: recorded
    assert len(read_rows(tmp_path / "off.csv")) == 2
    with pytest.raises(ConfigError, match="monitor.explode"):
        MonitorConfig(explode=0.5)


def test_a_drop_below_the_baseline_warns_even_above_the_floors(tmp_path: Path, caplog) -> None:
    probe = synthetic_probe(8, CFG.n_rois, CFG.n_frames, seed=0)
    enc = _encoder()
    mon = CollapseMonitor(
        MonitorConfig(every=1, rank_floor=0.0, spread_floor=0.0, drop=0.5), probe, CFG.embed_dim, tmp_path / "m.csv"
    )
    base = mon.measure(enc, 0)
    with torch.no_grad():  # the output scale cut to a fifth: spread falls by 80 %, rank unchanged
        enc.norm.weight.mul_(0.2)
        enc.norm.bias.mul_(0.2)
    caplog.set_level(logging.WARNING, logger="brainjepa.monitor")
    now = mon.measure(enc, 1)
    assert now.spread == pytest.approx(0.2 * base.spread, rel=1e-3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "feature spread fell" in messages[0], messages


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="monitor.drop"):
        MonitorConfig(drop=1.5)
    with pytest.raises(ConfigError, match="probe_scans"):
        MonitorConfig(probe_scans=1)


def test_pretrain_writes_monitor_csv_and_plot(tmp_path: Path) -> None:
    data = structured_cohort(16, 32, 96, seed=2)
    d = write_roi_dir(data, tmp_path / "rois")
    cfg = PretrainConfig(
        model=CFG,
        data=DataConfig(roi_dir=str(d), scaling="none"),
        train=TrainConfig(steps=12, batch_size=8, out_dir=str(tmp_path / "run"), checkpoint_every=12),
        monitor=MonitorConfig(every=5, probe_scans=4),
    )
    pretrain(cfg, progress=False)
    rows = read_rows(tmp_path / "run" / "monitor.csv")
    assert [r["step"] for r in rows] == [0, 5, 10, 11]
    assert all(np.isfinite(r["rank"]) and 1.0 <= r["rank"] <= CFG.embed_dim for r in rows)
    assert (tmp_path / "run" / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "run" / "monitor.csv", newline="") as f:
        assert next(csv.reader(f)) == [
            "step",
            "rank",
            "spread",
            "scan_spread",
            "position_share",
            "context_gain",
            "weight_norm",
        ]
    assert all(0.0 <= r["position_share"] <= 1.0 and r["context_gain"] > 0 for r in rows), rows


def test_position_share_separates_position_from_scan_content() -> None:
    g = torch.Generator().manual_seed(0)
    B, N, D = 16, 40, 8
    by_position = torch.randn(1, N, D, generator=g, dtype=torch.float64).expand(B, N, D)
    noise = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    assert position_share(by_position + 1e-6 * noise) > 0.999  # every scan the same target at a position
    assert position_share(noise) < 0.05  # positions say nothing (the estimate is corrected for B = 16)
    half = position_share(by_position + noise)  # equal variances: about one half
    assert 0.35 < half < 0.65, half


def _models(seed: int = 0) -> JEPAModels:
    torch.manual_seed(seed)
    grads = torch.randn(CFG.n_rois, CFG.gradient_components, generator=torch.Generator().manual_seed(1))
    return JEPAModels(CFG, grads)


def test_context_gain_is_one_when_the_predictor_ignores_the_context() -> None:
    probe = synthetic_probe(8, CFG.n_rois, CFG.n_frames, seed=0)
    masks = sample_masks(MaskConfig(), 8, CFG.n_rois, CFG.n_frames // CFG.patch_size, torch.Generator().manual_seed(0))
    models = _models()
    with torch.no_grad():  # at init (std 0.02) the context barely reaches the targets' outputs: make it count
        for layer in models.predictor.blocks.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(20.0)
        models.predictor.proj.weight.mul_(50.0)  # predictions no longer ~0 whatever the input
    _, gain = content_stats(models, probe, masks)
    assert abs(gain - 1.0) > 1e-3, gain  # the predictor reacts to what it is shown
    with torch.no_grad():  # the predictor's input projection zeroed: predictions from positions only
        models.predictor.embed.weight.zero_()
    share, blind = content_stats(models, probe, masks)
    assert blind == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= share <= 1.0
    assert models.encoder.training and models.predictor.training  # modes restored


@pytest.mark.parametrize(("loss", "target_norm", "chunk"), [("smooth_l1", "layer_norm", 1), ("l2", "centered", 3)])
def test_content_measures_in_chunks_equal_the_whole_batch_loss(
    tmp_path: Path, loss: str, target_norm: str, chunk: int
) -> None:
    """One target pass and the context / predictor `chunk` scans at a time give what `jepa_loss` gives on the
    whole batch (with the scan's own context, and the batch rolled by one)."""
    probe = synthetic_probe(8, CFG.n_rois, CFG.n_frames, seed=2)
    masks = sample_masks(MaskConfig(), 8, CFG.n_rois, CFG.n_frames // CFG.patch_size, torch.Generator().manual_seed(3))
    models = _models()
    models.eval()
    with torch.no_grad():  # as above: make the context count, so that the gain is not ~1 at init
        for layer in models.predictor.blocks.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(20.0)
        models.predictor.proj.weight.mul_(50.0)
        own = jepa_loss(models, probe, masks, loss, target_norm=target_norm)
        other = jepa_loss(models, probe, masks, loss, context_input=probe.roll(1, dims=0), target_norm=target_norm)
        h = models.target(probe)
        want_share = position_share(torch.nn.functional.layer_norm(h, (h.shape[-1],)))
    share, gain = content_stats(models, probe, masks, loss, target_norm, chunk=chunk)
    assert gain == pytest.approx(float(other / own), rel=1e-5) and abs(gain - 1.0) > 1e-4
    assert share == pytest.approx(want_share, rel=1e-5, abs=1e-9)
    # the monitor's one-pass measures do not depend on the chunk
    kw = dict(mask_cfg=MaskConfig(), patch_size=CFG.patch_size, loss=loss, target_norm=target_norm)
    one = CollapseMonitor(MonitorConfig(every=1), probe, CFG.embed_dim, tmp_path / "one.csv", chunk=1, **kw)
    eight = CollapseMonitor(MonitorConfig(every=1), probe, CFG.embed_dim, tmp_path / "eight.csv", chunk=8, **kw)
    a, b = one.stats(models.target, models), eight.stats(models.target, models)
    for field in ("rank", "spread", "scan_spread", "position_share", "context_gain", "weight_norm"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5), field
    with pytest.raises(ValueError, match="must be `models.target`"):
        one.stats(models.encoder, models)


def test_monitor_warns_when_the_pretext_ignores_the_content(tmp_path: Path, caplog) -> None:
    probe = synthetic_probe(8, CFG.n_rois, CFG.n_frames, seed=0)
    mon = CollapseMonitor(
        MonitorConfig(every=1, context_gain_floor=1.05),
        probe,
        CFG.embed_dim,
        tmp_path / "m.csv",
        mask_cfg=MaskConfig(),
        patch_size=CFG.patch_size,
    )
    models = _models()
    mon.measure(models.target, 0, models)  # the first measurement never warns about content
    with torch.no_grad():
        models.predictor.embed.weight.zero_()
    caplog.set_level(logging.WARNING, logger="brainjepa.monitor")
    now = mon.measure(models.target, 1, models)
    assert now.context_gain == pytest.approx(1.0, abs=1e-6)
    assert any("barely uses what it sees" in r.getMessage() for r in caplog.records), caplog.records
    assert read_rows(tmp_path / "m.csv")[1]["context_gain"] == pytest.approx(1.0, abs=1e-5)
