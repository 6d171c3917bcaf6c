"""The JEPA step: gradients flow where they should, EMA formula, schedules, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig
from brainjepa.jepa import JEPAModels, PretrainStep, jepa_loss, jepa_targets, recompute_count
from brainjepa.masks import Masks, sample_masks
from brainjepa.perf.bench import CPU_SDPA_FLOPS
from brainjepa.schedules import ema_momentum, learning_rate, weight_decay

CFG = ModelConfig(size="tiny", n_rois=24, n_frames=64, gradient_components=6)


def _setup(seed: int = 0, batch: int = 4) -> tuple[JEPAModels, torch.Tensor, Masks]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    models = JEPAModels(CFG, torch.randn(24, 6, generator=g))
    x = torch.randn(batch, 24, 64, generator=g)
    return models, x, sample_masks(MaskConfig(), batch, 24, CFG.n_time_patches, g)


def test_target_gets_no_gradient_and_every_trained_parameter_does() -> None:
    models, x, masks = _setup()
    jepa_loss(models, x, masks).backward()
    assert all(p.grad is None and not p.requires_grad for p in models.target.parameters())
    for name, module in (("encoder", models.encoder), ("predictor", models.predictor)):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


def test_ema_update_equals_the_formula() -> None:
    models, x, masks = _setup()
    step = PretrainStep(models, OptimConfig(), total_steps=10)
    with torch.no_grad():
        for p in models.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in models.target.parameters()]
    online = [p.clone() for p in models.encoder.parameters()]
    step.ema_update(0.9)
    for t, t0, o in zip(models.target.parameters(), before, online, strict=True):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o, atol=1e-6)


def test_step_applies_the_schedule_and_updates_target_with_the_scheduled_momentum() -> None:
    models, x, masks = _setup()
    cfg = OptimConfig()
    step = PretrainStep(models, cfg, total_steps=10)
    t0 = [p.clone() for p in models.target.parameters()]
    step([(x, masks)], 3)
    groups = step.optimizer.param_groups
    assert groups[0]["lr"] == learning_rate(cfg, 3, 10)
    assert groups[0]["weight_decay"] == weight_decay(cfg, 3, 10) and groups[1]["weight_decay"] == 0.0
    m = ema_momentum(cfg, 3, 10)
    for t, old, o in zip(models.target.parameters(), t0, models.encoder.parameters(), strict=True):
        assert torch.allclose(t, m * old + (1 - m) * o, atol=1e-6)


def test_no_weight_decay_on_biases_and_1d_parameters() -> None:
    models, _, _ = _setup()
    step = PretrainStep(models, OptimConfig(), total_steps=10)
    decay, no_decay = step.optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    n_trained = sum(1 for m in (models.encoder, models.predictor) for _ in m.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trained


def test_schedules_endpoints() -> None:
    cfg = OptimConfig()
    total = 300
    warm = round(cfg.warmup_fraction * total)
    assert learning_rate(cfg, 0, total) == cfg.start_lr
    assert math.isclose(learning_rate(cfg, warm, total), cfg.lr)
    assert math.isclose(learning_rate(cfg, total, total), cfg.final_lr)
    assert all(learning_rate(cfg, s + 1, total) <= learning_rate(cfg, s, total) + 1e-12 for s in range(warm, total))
    assert math.isclose(weight_decay(cfg, 0, total), cfg.weight_decay)
    assert math.isclose(weight_decay(cfg, total, total), cfg.final_weight_decay)
    assert math.isclose(ema_momentum(cfg, total - 1, total), cfg.ema[1])
    assert ema_momentum(cfg, 0, total) > cfg.ema[0]


def test_gradient_accumulation_equals_the_full_batch() -> None:
    models, x, masks = _setup(batch=4)
    models_b = JEPAModels(CFG, models.encoder.pos_embed.spatial.gradients.clone())
    models_b.load_state_dict(models.state_dict())
    full = PretrainStep(models, OptimConfig(), total_steps=10)
    accum = PretrainStep(models_b, OptimConfig(), total_steps=10)
    half = [
        (x[:2], Masks(masks.context[:2], masks.target[:2], masks.region_sizes)),
        (x[2:], Masks(masks.context[2:], masks.target[2:], masks.region_sizes)),
    ]
    loss_full = full([(x, masks)], 0)
    loss_acc = accum(half, 0)
    assert torch.allclose(loss_full, loss_acc, atol=1e-6)
    for a, b in zip(models.parameters(), models_b.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_l2_loss_option() -> None:
    models, x, masks = _setup()
    l1, l2 = jepa_loss(models, x, masks, "smooth_l1"), jepa_loss(models, x, masks, "l2")
    assert torch.isfinite(l1) and torch.isfinite(l2)
    assert l1.item() < l2.item()  # smooth-L1(e) <= e^2 for every element, equal only at e = 0


def test_recompute_count_rounds_up() -> None:
    assert [recompute_count(f, 6) for f in (0.0, 0.1, 0.25, 0.5, 1.0)] == [0, 1, 2, 3, 6]
    assert recompute_count(0.5, 12) == 6


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    models, x, masks = _setup()
    jepa_loss(models, x, masks).backward()
    plain = [p.grad.clone() for p in models.parameters() if p.requires_grad]
    models.zero_grad(set_to_none=True)
    models.encoder.recompute_blocks, models.predictor.recompute_blocks = len(models.encoder.blocks), 1  # all / some
    jepa_loss(models, x, masks).backward()
    ckpt = [p.grad for p in models.parameters() if p.requires_grad]
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_selective_checkpointing_gives_the_same_gradients() -> None:
    """Keeping matmul outputs and recomputing LayerNorm / GELU / adds in backward changes no gradient,
    and recomputes no matmul."""
    models, x, masks = _setup()
    blocks = [*models.encoder.blocks, *models.predictor.blocks]

    def grads_and_flops(selective: bool) -> tuple[list[torch.Tensor], int]:
        models.zero_grad(set_to_none=True)
        for blk in blocks:
            blk.selective_checkpointing = selective
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            jepa_loss(models, x, masks).backward()
        return [p.grad.clone() for p in models.parameters() if p.requires_grad], counter.get_total_flops()

    plain, plain_flops = grads_and_flops(False)
    recomputed = []
    handles = [blk.norm2.register_forward_hook(lambda *_: recomputed.append(1)) for blk in blocks]
    selective, selective_flops = grads_and_flops(True)
    for h in handles:
        h.remove()
    assert len(recomputed) == 2 * len(blocks), "LayerNorm was not recomputed in backward"
    for a, b in zip(plain, selective, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # kept outputs come from the cache; the MLP's down-projection, read by no backward, is neither
    # kept nor recomputed
    assert selective_flops == plain_flops


def test_the_default_targets_are_the_layer_normed_target_tokens_bit_for_bit() -> None:
    import torch.nn.functional as F

    models, x, masks = _setup()
    torch.manual_seed(1)
    with torch.no_grad():  # the formula before `optim.target_norm` existed
        h = models.target(x, select=masks.target)  # (B, Nt, D)
        target = F.layer_norm(h, (h.shape[-1],))
        pred = models.predictor(models.encoder(x, masks.context), masks.context, masks.target)
        before = F.smooth_l1_loss(pred.float(), target.float(), beta=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        now = jepa_loss(models, x, masks)
    assert torch.equal(jepa_targets(models, x, masks), target)
    assert torch.equal(jepa_targets(models, x, masks, "layer_norm"), target)
    assert torch.equal(now, before)


def test_centered_targets_are_the_targets_less_each_positions_batch_mean() -> None:
    import torch.nn.functional as F

    models, x, masks = _setup(batch=6)
    with torch.no_grad():
        full = F.layer_norm(models.target(x), (CFG.embed_dim,))  # (B, N, D): every token
        centre = full.mean(0)  # (N, D): each token position's mean over the 6 scans
        expect = torch.stack([full[b, masks.target[b]] - centre[masks.target[b]] for b in range(6)])
        got = jepa_targets(models, x, masks, "centered")
        plain = jepa_targets(models, x, masks)
    assert got.shape == plain.shape and torch.allclose(got, expect, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # something was removed: what the position carries
    assert not torch.equal(jepa_loss(models, x, masks, target_norm="centered"), jepa_loss(models, x, masks))
    with pytest.raises(ValueError, match="at least 2 scans"):
        jepa_targets(models, x[:1], masks.rows(slice(0, 1)), "centered")


def test_centered_targets_are_refused_with_site_side_dp_and_by_the_config_loader(tmp_path) -> None:
    from brainjepa.config import load_pretrain_config
    from brainjepa.errors import ConfigError
    from brainjepa.privacy.dpsgd import DPPretrainStep

    models, _, _ = _setup()
    step = PretrainStep(models, OptimConfig(target_norm="centered"), total_steps=10, precision="fp32")
    with pytest.raises(ConfigError, match="per-sample clipping"):
        DPPretrainStep(step, 1.0, 1.0, 4.0, torch.Generator().manual_seed(0))
    path = tmp_path / "pre.yaml"
    path.write_text("optim: {target_norm: centred}\n")
    with pytest.raises(ConfigError, match="target_norm"):
        load_pretrain_config(path)
    path.write_text("optim: {target_norm: centered}\n")
    assert load_pretrain_config(path).optim.target_norm == "centered"
    assert OptimConfig().target_norm == "layer_norm"
