"""The JEPA predictor: narrow ViT that fills mask tokens at target positions from the context."""

from __future__ import annotations

import torch
from torch import nn

from brainjepa.config import ModelConfig
from brainjepa.positions import BrainPositionalEmbedding
from brainjepa.vit import Block, gather_tokens, init_weights, rescale_blocks, run_blocks


class MaskToken(nn.Module):
    """The learnable mask token, added to target positions (single-input module: Opacus-friendly)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.token, std=0.02)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return pos + self.token.to(pos.dtype)  # (B, M, Dp)


class Predictor(nn.Module):
    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor) -> None:
        super().__init__()
        Dp = cfg.pred_dim
        self.embed = nn.Linear(cfg.embed_dim, Dp)
        self.mask_token = MaskToken(Dp)
        self.pos_embed = BrainPositionalEmbedding(gradients, cfg.n_time_patches, Dp, cfg.pos_embed)
        self.blocks = nn.ModuleList(Block(Dp, cfg.pred_heads, cfg.mlp_ratio) for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(Dp, eps=1e-6)
        self.proj = nn.Linear(Dp, cfg.embed_dim)
        self.recompute_blocks = 0  # leading blocks recomputed whole in backward (set by the training step)
        self.apply(init_weights)
        rescale_blocks(self.blocks)
        nn.init.trunc_normal_(self.mask_token.token, std=0.02)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """ctx (B, Nc, D) encoded context at ctx_idx (B, Nc) -> predictions (B, Nt, D) at tgt_idx (B, Nt)."""
        pos = self.pos_embed()[None].expand(ctx.shape[0], -1, -1)  # (B, N, Dp)
        x = self.embed(ctx) + gather_tokens(pos, ctx_idx).to(ctx.dtype)  # (B, Nc, Dp)
        m = self.mask_token(gather_tokens(pos, tgt_idx).to(x.dtype))  # (B, Nt, Dp)
        x = torch.cat([x, m], dim=1)  # (B, Nc+Nt, Dp)
        x = run_blocks(self.blocks, x, self.recompute_blocks)
        x = self.norm(x[:, ctx.shape[1] :])  # (B, Nt, Dp)
        return self.proj(x)  # (B, Nt, D)
