"""Brain-gradient positional embedding: a fixed sin-cos time half and a learned gradient half.

For token (r, t) of width D:
    PE = concat( sincos_1d(D/2, t), minmax_[-1,1]( Linear_k->D/2(g_r) ) )
with one global min/max over the whole R x D/2 spatial matrix. Tokens are ROI-major
(index = r * W + t), so the result is (R * W, D).
"""

from __future__ import annotations

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sin-cos embedding of integer positions: (P,) -> (P, dim), [sin | cos] halves."""
    assert dim % 2 == 0, "sin-cos embedding width must be even"
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = positions.to(torch.float64)[:, None] * omega[None, :]  # (P, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale the whole tensor to [-1, 1] with one global min and max."""
    lo, hi = x.min(), x.max()
    return 2.0 * (x - lo) / (hi - lo).clamp_min(1e-12) - 1.0


class GradientProjection(nn.Module):
    """Learned map of the k gradient coordinates of every ROI to D/2 channels, min-max scaled.

    Its only input is the (fixed) gradient matrix, kept as a buffer: forward() takes no batch data.
    """

    def __init__(self, gradients: torch.Tensor, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("gradients", gradients.float().clone(), persistent=True)  # (R, k)
        self.proj = nn.Linear(gradients.shape[1], out_dim)

    def forward(self) -> torch.Tensor:
        return minmax_scale(self.proj(self.gradients))  # (R, D/2)


class LearnedROIEmbedding(nn.Module):
    """Ablation: a free learned vector per ROI (no gradient information)."""

    def __init__(self, n_rois: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_rois, out_dim) * 0.02)

    def forward(self) -> torch.Tensor:
        return self.weight  # (R, D/2)


class SinCosROIEmbedding(nn.Module):
    """Ablation: fixed sin-cos of the ROI index."""

    def __init__(self, n_rois: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sincos_1d(out_dim, torch.arange(n_rois)), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.table  # (R, D/2)


class BrainPositionalEmbedding(nn.Module):
    """Positional embedding of every (ROI, time patch) token: (R * W, D), ROI-major."""

    def __init__(self, gradients: torch.Tensor, n_time_patches: int, dim: int, kind: str = "gradient") -> None:
        super().__init__()
        n_rois = gradients.shape[0]
        self.n_rois, self.n_time = n_rois, n_time_patches
        if kind == "gradient":
            self.spatial: nn.Module = GradientProjection(gradients, dim // 2)
        elif kind == "learned_roi":
            self.spatial = LearnedROIEmbedding(n_rois, dim // 2)
        elif kind == "sincos_roi":
            self.spatial = SinCosROIEmbedding(n_rois, dim // 2)
        else:
            raise ValueError(f"unknown positional embedding '{kind}'")
        self.register_buffer("temporal", sincos_1d(dim // 2, torch.arange(n_time_patches)), persistent=False)

    def forward(self) -> torch.Tensor:
        space = self.spatial()  # (R, D/2)
        R, W = self.n_rois, self.n_time
        time = self.temporal.to(space.dtype)  # (W, D/2)
        return torch.cat([time[None, :, :].expand(R, W, -1), space[:, None, :].expand(R, W, -1)], dim=-1).reshape(
            R * W, -1
        )  # (R*W, D)
