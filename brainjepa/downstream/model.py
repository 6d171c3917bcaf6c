"""Downstream models: the pretrained target encoder as backbone, with a fine-tuning or a probing head.

- Backbone: `brainjepa.vit.Encoder` with the checkpoint's target-encoder weights (the reference's
  choice), run on ALL tokens of a window; features = mean over tokens (no CLS token), the tokens of
  missing ROIs (`sites.missing`) left out.
- Fine-tuning head: LayerNorm -> Linear; every weight trains, with layer-wise LR decay (block i of
  depth d gets lr * decay ** (d + 1 - i); embeddings the lowest, the head the full LR) and drop-path
  rising linearly over the blocks.
- Linear probe: frozen backbone (eval mode, no gradients), BatchNorm1d(affine=False) -> Linear.
- `pool: roi_std` (recipe key; default `mean`, the reference): features keep the ROI axis, per ROI the
  mean and the std over time of its tokens, (R, 2D); the heads normalise them per ROI (LayerNorm(2D),
  fine-tuning) or per feature (BatchNorm, probe) and read all R x 2D (docs/model.md).
- `pool: roi_fc`: second-order pooling, the connectivity of the learned features (`roi_coupling`):
  R(R-1)/2 features, normalised per feature by the head (BatchNorm, probe; LayerNorm, fine-tuning).
- `pool: roi_std_fc`: both, R x 2D + R(R-1)/2 features; after the head's normalisation `BlockWeight` gives
  the two blocks the same total variance (first-order statistics read amplitude and timescales,
  connectivity reads coupling: neither block outvotes the other by its size alone).
- `scratch` / `random_probe`: the same model with the backbone left at its random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import ModelConfig
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.errors import DataError
from brainjepa.masks import mean_observed, split_missing
from brainjepa.schema import from_mapping
from brainjepa.vit import Encoder, init_weights, set_drop_path


@dataclass(frozen=True)
class Backbone:
    """What a downstream model is built from: the model shape, its gradients and (pretrained) weights."""

    model: ModelConfig
    gradients: np.ndarray  # (R, k) float32
    weights: dict[str, torch.Tensor]  # Encoder state dict (the EMA target's)
    source: str
    scaling: dict | None = None  # the pretraining run's robust-scaling statistics, when it kept them


def load_backbone(path: str | Path) -> Backbone:
    """The target encoder of a pretraining checkpoint (`brainjepa pretrain`, federated, or imported)."""
    ckpt = load_checkpoint(path)
    for key in ("model_config", "gradients", "models"):
        if key not in ckpt:
            raise DataError(f"checkpoint '{path}': no '{key}' entry; expected a pretraining checkpoint")
    cfg = from_mapping(ModelConfig, ckpt["model_config"], f"{path} (model_config)")
    weights = {k.removeprefix("target."): v for k, v in ckpt["models"].items() if k.startswith("target.")}
    if not weights:
        raise DataError(f"checkpoint '{path}': no 'target.*' weights (the EMA target encoder) in 'models'")
    grads = np.asarray(ckpt["gradients"], dtype=np.float32)
    return Backbone(cfg, grads, weights, str(path), ckpt.get("scaling"))


class DownstreamModel(nn.Module):
    """x (B, R, T) -> (B, n_outputs): class logits or the regression prediction."""

    def __init__(self, backbone: Backbone, task: TaskSpec, recipe: DownstreamConfig) -> None:
        super().__init__()
        self.recipe = recipe
        self.backbone = Encoder(backbone.model, torch.from_numpy(backbone.gradients))
        if recipe.pretrained:
            missing = self.backbone.load_state_dict(backbone.weights, strict=True)
            assert not missing.missing_keys  # strict=True raised otherwise
        D, R = backbone.model.embed_dim, backbone.model.n_rois
        if recipe.pool in ("roi_fc", "roi_std_fc") and backbone.model.n_frames // backbone.model.patch_size < 3:
            raise DataError(
                f"recipe.pool '{recipe.pool}' needs 3 or more time patches per window to correlate, the model has "
                f"{backbone.model.n_frames // backbone.model.patch_size} (n_frames {backbone.model.n_frames}, "
                f"patch_size {backbone.model.patch_size})"
            )
        blocks = {"mean": [D], "roi_std": [R * 2 * D], "roi_fc": [R * (R - 1) // 2]}
        blocks["roi_std_fc"] = blocks["roi_std"] + blocks["roi_fc"]
        F = sum(blocks[recipe.pool])  # features per window
        if recipe.frozen_backbone:
            self.backbone.requires_grad_(False)
            norm: nn.Module = nn.BatchNorm1d(F, affine=False)
        else:
            set_drop_path(self.backbone.blocks, recipe.drop_path)
            norm = nn.LayerNorm(2 * D if recipe.pool == "roi_std" else F, eps=1e-6)  # per ROI for roi_std
        weight = [BlockWeight(blocks[recipe.pool])] if len(blocks[recipe.pool]) > 1 else []
        self.head = nn.Sequential(norm, *weight, nn.Linear(F, task.n_outputs))
        self.head.apply(init_weights)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, R, T) -> (B, D) (`pool: mean`): the backbone's tokens, mean-pooled over the observed ROIs'
        tokens (a missing ROI, a NaN row (sites.missing), enters the backbone as 0 and is left out of the
        mean); (B, R, 2D) (`pool: roi_std`): per ROI the mean and std over time, 0 for a missing ROI;
        (B, R(R-1)/2) (`pool: roi_fc`): the feature connectivity of `roi_coupling`; (B, R 2D + R(R-1)/2)
        (`pool: roi_std_fc`): both, flattened and side by side."""
        x, observed = split_missing(x)  # (B, R, T), (B, R)
        if self.recipe.frozen_backbone:
            self.backbone.eval()
            with torch.no_grad():
                return self.pool(self.backbone(x), observed)
        return self.pool(self.backbone(x), observed)

    def pool(self, h: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        if self.recipe.pool == "mean":
            return mean_observed(h, observed)  # (B, N, D) -> (B, D)
        if self.recipe.pool == "roi_fc":
            return roi_coupling(h, observed)  # (B, N, D) -> (B, R(R-1)/2)
        f = roi_statistics(h, observed)  # (B, R, 2D)
        if self.recipe.pool == "roi_std_fc":
            return torch.cat([f.flatten(1), roi_coupling(h, observed)], dim=1)  # (B, R 2D + R(R-1)/2)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))  # (B, n_outputs)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        """Features (B, F) or (B, R, 2D) -> (B, n_outputs)."""
        if f.ndim == 2:
            return self.head(f)
        norm, linear = self.head
        if self.recipe.frozen_backbone:
            return linear(norm(f.flatten(1)))  # BatchNorm over all R x 2D features
        return linear(norm(f).flatten(1))  # LayerNorm per ROI, then all R x 2D


class BlockWeight(nn.Module):
    """Normalised features (B, F) of consecutive blocks of `sizes` features -> each block times a fixed
    sqrt(F / (n_blocks * size)): every block then carries the same total variance (F / n_blocks), whatever
    its size. A non-persistent buffer: state dicts and the federated wire are those of the other readouts."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        total = sum(sizes)
        w = torch.cat([torch.full((n,), (total / (len(sizes) * n)) ** 0.5) for n in sizes])  # (F,)
        self.register_buffer("weight", w, persistent=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f * self.weight  # (B, F)


def roi_statistics(h: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """h (B, N, D) ROI-major tokens of R ROIs x W time patches, observed (B, R) -> (B, R, 2D): per ROI the
    mean and the std over time of its tokens, 0 for a missing ROI."""
    B, N, D = h.shape
    h = h.reshape(B, observed.shape[1], -1, D)  # (B, R, W, D)
    f = torch.cat([h.mean(2), h.std(2, unbiased=False)], dim=-1)  # (B, R, 2D)
    return f * observed[..., None].to(f.dtype)


def roi_coupling(h: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """The connectivity of learned features: h (B, N, D) ROI-major tokens of R ROIs x W time patches,
    observed (B, R) -> (B, R(R-1)/2). Per embedding dimension the Pearson correlation of two ROIs' tokens
    over the W time patches, averaged over the D dimensions, Fisher z (clamped at |r| = 0.999), upper
    triangle in `torch.triu_indices` order; 0 for a pair with a missing ROI."""
    B, N, D = h.shape
    R = observed.shape[1]
    if N // R < 3:
        raise DataError(
            f"pool 'roi_fc' correlates tokens over time: {N // R} time patch(es) per ROI make every "
            "correlation +-1; it needs 3 or more (a longer window or a smaller patch_size)"
        )
    c = h.reshape(B, R, N // R, D)  # (B, R, W, D)
    c = c - c.mean(dim=2, keepdim=True)
    c = c / c.norm(dim=2, keepdim=True).clamp_min(1e-6)  # unit norm over time per (ROI, dim)
    corr = torch.einsum("brwd,bswd->brs", c, c) / D  # (B, R, R)
    i, j = torch.triu_indices(R, R, 1, device=h.device)
    z = torch.atanh(corr[:, i, j].clamp(-0.999, 0.999))  # (B, R(R-1)/2)
    return z * (observed[:, i] & observed[:, j]).to(z.dtype)


def layer_of(name: str, depth: int) -> int:
    """Layer index for LR decay: embeddings 0, block i -> i + 1, final norm and head depth + 1."""
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("backbone.patch_embed", "backbone.pos_embed")):
        return 0
    return depth + 1


def param_groups(model: DownstreamModel) -> list[dict]:
    """AdamW groups: per layer an LR scale (`lr_scale`), weight decay on matrices only."""
    r = model.recipe
    depth = len(model.backbone.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of(name, depth)
        decay = not (name.endswith(".bias") or p.ndim == 1)
        g = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "lr_scale": r.layer_decay ** (depth + 1 - layer),
                "weight_decay": r.weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
