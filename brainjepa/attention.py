"""Multi-head self-attention through `scaled_dot_product_attention` (flash / cuDNN / efficient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v, for checking and for hooks that cannot see SDPA."""
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    return attn.softmax(dim=-1) @ v  # (B, H, N, Dh)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_sdpa: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = use_sdpa

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); with `queries` (B, S, D), only those attend (to all of x): (B, S, D).

        The queries' rows of the output equal those of the full call: each query row of attention
        depends on its own query and on every key and value, nothing else.
        """
        B, N, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        if queries is None:
            qkv = self.qkv(x).reshape(B, N, 3, H, Dh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(queries, w[:D], None if b is None else b[:D])  # (B, S, D)
            q = q.reshape(B, -1, H, Dh).transpose(1, 2)  # (B, H, S, Dh)
            kv = F.linear(x, w[D:], None if b is None else b[D:]).reshape(B, N, 2, H, Dh)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v) if self.use_sdpa else explicit_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, q.shape[2], D))  # (B, N or S, D)
