"""Pre-LN ViT blocks and the Brain-JEPA encoder over ROI-patch tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from brainjepa.attention import Attention
from brainjepa.config import ModelConfig
from brainjepa.positions import BrainPositionalEmbedding


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# Selective activation checkpointing: in backward, keep what the matrix units produced (linear
# layers, attention with its log-sum-exp) and recompute the cheap pointwise work from it (LayerNorm,
# GELU, dtype casts, residual adds). Same gradients, no matmul recomputed.
_KEEP_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ANN001 (torch's policy signature)
    if op not in _KEEP_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        inp, weight = args[-2:]  # mm(input, weight) / addmm(bias, input, weight): (M, K) @ (K, N)
        if weight.shape[1] < inp.shape[1]:  # the MLP's down-projection: its output only joins the
            return CheckpointPolicy.PREFER_RECOMPUTE  # residual, backward never reads it (never recomputed)
    return CheckpointPolicy.MUST_SAVE


def _selective_context():  # noqa: ANN202
    return create_selective_checkpoint_contexts(_keep_matmuls)


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)). LayerNorm eps 1e-6.

    `selective_checkpointing` (set by the training step) keeps only matmul and attention outputs for
    backward and recomputes the pointwise ops: about a third less activation memory.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.selective_checkpointing = False
        self.drop_path = 0.0  # stochastic depth (fine-tuning): chance of skipping each residual branch
        self.batch_rows: tuple[int, int, int] | None = None  # (start, stop, B): a rank's rows of a batch of B

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: in training, zero a residual branch for a random share `drop_path` of the
        samples and scale the others by 1 / (1 - drop_path); otherwise (and at 0) the branch as is."""
        if self.drop_path == 0.0 or not self.training:
            return y
        keep = 1.0 - self.drop_path
        n = y.shape[0] if self.batch_rows is None else self.batch_rows[2]  # a rank draws the whole batch's masks
        mask = torch.empty(n, *(1,) * (y.ndim - 1), device=y.device, dtype=y.dtype).bernoulli_(keep)
        if self.batch_rows is not None:
            mask = mask[self.batch_rows[0] : self.batch_rows[1]]  # (b_rank, 1, 1): its rows
        return y * mask / keep  # (B, N, D)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._branch(self.attn(self.norm1(x)))
        return x + self._branch(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); with `select` (B, S) token indices, the block's output at those
        tokens only, (B, S, D): every token is a key and value, only the selected ones are queries,
        and the MLP runs on those alone (the same numbers as selecting after the full block)."""
        if select is not None:
            h = self.norm1(x)  # (B, N, D)
            x = gather_tokens(x, select) + self.attn(h, queries=gather_tokens(h, select))  # (B, S, D)
            return x + self.mlp(self.norm2(x))
        if self.selective_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._residual, x, use_reentrant=False, context_fn=_selective_context)
        return self._residual(x)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights, zero biases, unit LayerNorms (the ViT/I-JEPA convention)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def rescale_blocks(blocks: nn.ModuleList) -> None:
    """Scale each block's output projections by 1/sqrt(2 * layer), as I-JEPA does at init."""
    for layer, blk in enumerate(blocks, start=1):
        blk.attn.proj.weight.data.div_((2.0 * layer) ** 0.5)
        blk.mlp.fc2.weight.data.div_((2.0 * layer) ** 0.5)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, recompute: int = 0) -> torch.Tensor:
    """Apply the blocks; the first `recompute` keep only their input for backward and run their
    forward again there (activation checkpointing: less memory for one more forward of those blocks)."""
    for i, blk in enumerate(blocks):
        x = checkpoint(blk, x, use_reentrant=False) if i < recompute and torch.is_grad_enabled() else blk(x)
    return x


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample: x (B, N, D), idx (B, M) -> (B, M, D)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class PatchEmbed(nn.Module):
    """Each ROI's series cut into patches of p frames, each mapped by one shared Linear(p -> D)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, R, T = x.shape
        patches = x.reshape(B, R * (T // self.patch_size), self.patch_size)  # (B, R*W, p), ROI-major
        return self.proj(patches)  # (B, N, D)


def set_batch_rows(module: nn.Module, rows: tuple[int, int, int] | None) -> None:
    """Tell every block of `module` which rows (start, stop, B) of a global batch of B it is given (a rank of
    `brainjepa.distributed`), so that stochastic depth draws the whole batch's masks; None: the whole batch."""
    for sub in module.modules():
        if isinstance(sub, Block):
            sub.batch_rows = rows


def set_drop_path(blocks: nn.ModuleList, rate: float) -> None:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last (the ViT recipe)."""
    n = len(blocks)
    for i, blk in enumerate(blocks):
        blk.drop_path = rate * i / max(1, n - 1)


class Encoder(nn.Module):
    """ROI-patch embedding + brain-gradient positions + pre-LN ViT. No CLS token."""

    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.pos_embed = BrainPositionalEmbedding(gradients, cfg.n_time_patches, D, cfg.pos_embed)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.recompute_blocks = 0  # leading blocks recomputed whole in backward (set by the training step)
        self.select_in_last_block = True  # `select`: the last block computes the selected tokens only
        self.apply(init_weights)
        rescale_blocks(self.blocks)
        if cfg.patch_init == "unit":  # data term ~ positional term at init (the reference: ~1/9 of it)
            nn.init.normal_(self.patch_embed.proj.weight, std=cfg.patch_size**-0.5)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, R, T) -> (B, N, D) over all tokens, or (B, M, D) over `keep` (B, M) token indices.

        `select` (B, S) picks output tokens after the blocks (the final LayerNorm then runs on those
        only): the target encoder sees every token but only the targets' outputs are used.
        """
        tokens = self.patch_embed(x) + self.pos_embed()[None].to(x.dtype)  # (B, N, D)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)  # (B, M, D)
        if select is None or not self.select_in_last_block:
            tokens = run_blocks(self.blocks, tokens, self.recompute_blocks)
            if select is not None:
                tokens = gather_tokens(tokens, select)  # (B, S, D)
        else:  # the last block computes only the selected tokens' outputs
            tokens = run_blocks(self.blocks[:-1], tokens, self.recompute_blocks)
            tokens = self.blocks[-1](tokens, select)  # (B, S, D)
        return self.norm(tokens)
