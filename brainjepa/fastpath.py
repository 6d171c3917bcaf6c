"""The fast path of the pretraining step: SDPA backend order, regional `torch.compile`, CUDA graphs.

Every switch lives in `PerfConfig`; with all of them off the step is plain eager PyTorch (what
Opacus' per-sample hooks need). None changes the model: the same parameters, the same maths, only
other kernels (float rounding differs; `tests/test_fastpath.py` bounds the drift over 200 steps).

- Attention: on Hopper (compute capability 9.x) SDPA's cuDNN backend is much faster than its default
  (flash) choice at small batch (the reference GPU figures in docs/performance.md), so `auto` puts it first there.
- Compile: each transformer block is compiled on its own ("regional" compilation). Blocks of one
  width share one graph (parameters are graph inputs), and the token count is a dynamic dimension,
  so the per-batch context / target sizes of our masking never trigger a recompile. The compiler
  fuses LayerNorm, GELU, bias and residual adds into a few kernels per block and frees their
  intermediate activations (recomputed in backward where cheap).
- CUDA graphs: the target encoder's forward always has the same shape (B, R*W tokens), so it can be
  captured once and replayed, removing its kernel launches (launch-bound small batches).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from brainjepa.config import PerfConfig
from brainjepa.vit import Block

_ORDERS: dict[str, list[SDPBackend]] = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ],
    "math": [SDPBackend.MATH],
}


def attention_backends(name: str, device: torch.device) -> list[SDPBackend] | None:
    """SDPA backends in priority order for `perf.attention`, or None for torch's own choice.

    Only CUDA has a choice; on CPU SDPA always runs its flash kernel (or math for odd shapes).
    """
    if device.type != "cuda" or name == "default":
        return None
    if name == "auto":
        major, _ = torch.cuda.get_device_capability(device)
        return _ORDERS["cudnn"] if major == 9 else None
    return _ORDERS[name]


def attention_context(backends: list[SDPBackend] | None) -> AbstractContextManager:
    """Context in which SDPA tries `backends` in order (a no-op for None)."""
    return nullcontext() if backends is None else sdpa_kernel(backends, set_priority=True)


def compile_blocks(module: nn.Module) -> int:
    """Compile every transformer `Block` inside `module` in place; returns how many."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.compile(dynamic=True)
    return len(blocks)


def target_graph(target: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The target encoder's full forward, x (B, R, T) -> (B, N, D), compiled for CUDA-graph replay.

    Its output lives in the graph's static buffer until the next replay: consume it (gather) before
    calling again, and call `torch.compiler.cudagraph_mark_step_begin()` before each step.
    """
    return torch.compile(target, mode="reduce-overhead", dynamic=False)


def accelerate(models: nn.Module, perf: PerfConfig, device: torch.device) -> Callable | None:
    """Apply `perf` to the JEPA models (encoder, predictor, target). Returns the CUDA-graph target
    forward when one is used, else None (the step then calls the target module itself)."""
    graphs = perf.cuda_graphs and device.type == "cuda"
    if perf.compile:
        compile_blocks(models.encoder)
        compile_blocks(models.predictor)
        if not graphs:  # else the whole target forward is compiled (and captured) as one graph
            compile_blocks(models.target)
    return target_graph(models.target) if graphs else None
