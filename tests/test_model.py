"""The model: parameter counts, positional embedding, attention, shapes for any R and T."""

from __future__ import annotations

import pytest
import torch

from brainjepa.attention import Attention, explicit_attention
from brainjepa.config import ModelConfig
from brainjepa.errors import ConfigError
from brainjepa.positions import BrainPositionalEmbedding, sincos_1d
from brainjepa.predictor import Predictor
from brainjepa.vit import Encoder


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_vit_base_parameter_counts_at_450_by_160() -> None:
    cfg = ModelConfig(size="base", n_rois=450, n_frames=160)
    g = torch.randn(450, 30)
    # ~85.1 M encoder, ~11.2 M predictor (the reference's ViT-B / 384-wide depth-6 predictor)
    assert _count(Encoder(cfg, g)) == 85_080_960
    assert _count(Predictor(cfg, g)) == 11_244_864


@pytest.mark.parametrize("size,heads", [("small", 6), ("base", 12), ("large", 16)])
def test_predictor_uses_the_encoders_head_count(size: str, heads: int) -> None:
    # the reference builds its predictor with num_heads=encoder.num_heads (docs/model.md)
    cfg = ModelConfig(size=size)
    assert cfg.pred_heads == heads == cfg.num_heads
    assert (cfg.pred_dim, cfg.pred_depth) == (384, 6)
    assert ModelConfig(size="tiny").pred_heads == 4


@pytest.mark.parametrize("R,T,p", [(450, 160, 16), (37, 48, 16), (100, 90, 10)])
def test_any_rois_and_frames(R: int, T: int, p: int) -> None:
    cfg = ModelConfig(size="tiny", n_rois=R, n_frames=T, patch_size=p, gradient_components=5)
    enc = Encoder(cfg, torch.randn(R, 5))
    x = torch.randn(2, R, T)
    assert enc(x).shape == (2, R * (T // p), cfg.embed_dim)
    keep = torch.stack([torch.randperm(R * (T // p))[:7] for _ in range(2)])
    assert enc(x, keep).shape == (2, 7, cfg.embed_dim)


def test_frames_not_divisible_by_patch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_frames"):
        ModelConfig(n_frames=150, patch_size=16)


def test_gradient_positional_embedding_layout() -> None:
    R, W, D = 20, 5, 32
    grads = torch.randn(R, 7)
    pe = BrainPositionalEmbedding(grads, W, D)
    out = pe()  # (R*W, D)
    assert out.shape == (R * W, D)
    time, space = out[:, : D // 2].reshape(R, W, -1), out[:, D // 2 :].reshape(R, W, -1)
    # time half: fixed sin-cos of the time-patch index, identical for every ROI
    assert torch.allclose(time[3], sincos_1d(D // 2, torch.arange(W)))
    # space half: one vector per ROI (same at every time), min-max scaled globally to [-1, 1]
    assert torch.allclose(space[:, 0], space[:, 4])
    assert space.min().item() == pytest.approx(-1.0, abs=1e-6)
    assert space.max().item() == pytest.approx(1.0, abs=1e-6)
    expected = pe.spatial.proj(grads)
    expected = 2 * (expected - expected.min()) / (expected.max() - expected.min()) - 1
    assert torch.allclose(space[:, 0], expected, atol=1e-6)
    # the learned projection receives gradients
    out.sum().backward()
    assert pe.spatial.proj.weight.grad is not None and pe.spatial.proj.weight.grad.abs().sum() > 0


def test_sdpa_matches_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(48, 6)
    x = torch.randn(3, 40, 48)
    fast = attn(x)
    attn.use_sdpa = False
    slow = attn(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    q, k, v = torch.randn(3, 2, 2, 11, 8).unbind(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    assert torch.allclose(explicit_attention(q, k, v), ref, atol=1e-6)


def test_patch_init_unit_puts_the_data_term_on_the_scale_of_the_positions() -> None:
    """The reference's trunc-normal(0.02) patch embedding maps a unit-variance 16-frame patch to ~0.08 per
    feature, a fraction of the positional term every scan shares; `patch_init: unit` makes them alike."""
    grads = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 20, 64, generator=torch.Generator().manual_seed(1))  # (B, R, T) unit variance
    ratios = {}
    for init in ("reference", "unit"):
        torch.manual_seed(0)
        enc = Encoder(ModelConfig(size="tiny", n_rois=20, n_frames=64, patch_init=init), grads)
        with torch.no_grad():
            data = enc.patch_embed(x) - enc.patch_embed.proj.bias  # (B, N, D)
            ratios[init] = (data.pow(2).mean().sqrt() / enc.pos_embed().pow(2).mean().sqrt()).item()
    assert ratios["reference"] < 0.3 < 1.0 < ratios["unit"] < 3.0
    with pytest.raises(ConfigError, match="model.patch_init"):
        ModelConfig(patch_init="xavier")
