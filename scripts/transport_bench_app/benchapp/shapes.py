"""Parameter shapes of Brain-JEPA's three weight sets (encoder, predictor, EMA target) for ViT-S / ViT-B.

Mirrors the model (docs/model.md): ROI-patch embedding Linear(p -> D), gradient positioning Linear(k -> D/2),
pre-LN blocks (qkv bias, MLP ratio 4), final norm; predictor Linear(D -> 384), mask token, 6 blocks of
width 384, norm, Linear(384 -> D). Only the shapes matter here (the transport does not care about names).
"""

from __future__ import annotations

import numpy as np

SIZES = {"vit-s": (384, 12), "vit-b": (768, 12), "vit-l": (1024, 24), "vit-tiny": (64, 2)}
PATCH, GRAD_K, PRED_D, PRED_DEPTH = 16, 30, 384, 6


def _blocks(prefix: str, dim: int, depth: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        out += [
            (b + "norm1.weight", (dim,)),
            (b + "norm1.bias", (dim,)),
            (b + "attn.qkv.weight", (3 * dim, dim)),
            (b + "attn.qkv.bias", (3 * dim,)),
            (b + "attn.proj.weight", (dim, dim)),
            (b + "attn.proj.bias", (dim,)),
            (b + "norm2.weight", (dim,)),
            (b + "norm2.bias", (dim,)),
            (b + "mlp.fc1.weight", (4 * dim, dim)),
            (b + "mlp.fc1.bias", (4 * dim,)),
            (b + "mlp.fc2.weight", (dim, 4 * dim)),
            (b + "mlp.fc2.bias", (dim,)),
        ]
    return out


def encoder_shapes(prefix: str, dim: int, depth: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (prefix + "patch_embed.weight", (dim, PATCH)),
        (prefix + "patch_embed.bias", (dim,)),
        (prefix + "pos_embed.grad_proj.weight", (dim // 2, GRAD_K)),
        (prefix + "pos_embed.grad_proj.bias", (dim // 2,)),
        *_blocks(prefix, dim, depth),
        (prefix + "norm.weight", (dim,)),
        (prefix + "norm.bias", (dim,)),
    ]


def predictor_shapes(prefix: str, enc_dim: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (prefix + "embed.weight", (PRED_D, enc_dim)),
        (prefix + "embed.bias", (PRED_D,)),
        (prefix + "mask_token", (1, 1, PRED_D)),
        (prefix + "pos_embed.grad_proj.weight", (PRED_D // 2, GRAD_K)),
        (prefix + "pos_embed.grad_proj.bias", (PRED_D // 2,)),
        *_blocks(prefix, PRED_D, PRED_DEPTH),
        (prefix + "norm.weight", (PRED_D,)),
        (prefix + "norm.bias", (PRED_D,)),
        (prefix + "proj.weight", (enc_dim, PRED_D)),
        (prefix + "proj.bias", (enc_dim,)),
    ]


def model_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """All (name, shape) of encoder., predictor. and target. for `model` (a key of SIZES)."""
    dim, depth = SIZES[model]
    return [
        *encoder_shapes("encoder.", dim, depth),
        *predictor_shapes("predictor.", dim),
        *encoder_shapes("target.", dim, depth),
    ]


def random_weights(model: str, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Random (never constant: Flower de-duplicates identical chunks) weights of `model`."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        for name, shape in model_shapes(model)
    }
