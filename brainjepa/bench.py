"""Benchmark of the pretraining step: samples/s, achieved TFLOP/s and peak memory.

One optimizer step per batch with the default masking, random inputs of R x T, exactly as the
reference's figures in shared/reference/gpu-anchor.md were taken. FLOPs are counted once with
torch's FlopCounterMode over a whole step (forward, backward; the optimizer adds no matmul FLOPs).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.masks import sample_masks


@dataclass(frozen=True)
class BenchResult:
    size: str
    batch: int
    device: str
    samples_per_s: float
    tflops_per_s: float
    tflop_per_sample: float
    peak_memory_gib: float
    memory_kind: str  # "cuda max allocated" or "process peak RSS"
    encoder_params: int
    predictor_params: int
    context_tokens: float
    target_tokens: float
    step_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel: without
# these entries attention (about a third of ViT-B's FLOPs) would be missing from CPU figures.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_step_flops(fn) -> int:  # noqa: ANN001 (any callable running one step)
    """FLOPs of one call of `fn` (forward + backward), attention included on every device."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(size: str = "base", batch: int = 16, device: str = "cpu", steps: int = 5, warmup: int = 2,
              n_rois: int = 450, n_frames: int = 160, seed: int = 0,
              activation_checkpointing: bool = False) -> BenchResult:  # fmt: skip
    dev = torch.device(device)
    cfg = ModelConfig(size=size, n_rois=n_rois, n_frames=n_frames)
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n_rois, cfg.gradient_components, generator=g)
    models = JEPAModels(cfg, grads)
    step_fn = PretrainStep(models, OptimConfig(), total_steps=1000, device=dev,
                           activation_checkpointing=activation_checkpointing)  # fmt: skip
    mask_cfg = MaskConfig()
    warmup = max(1, warmup)
    n = warmup + steps
    xs = [torch.randn(batch, n_rois, n_frames, generator=g) for _ in range(n)]
    masks = [sample_masks(mask_cfg, batch, n_rois, cfg.n_time_patches, g) for _ in range(n)]
    if dev.type == "cuda":
        xs = [x.pin_memory() for x in xs]

    flops = count_step_flops(lambda: step_fn([(xs[0], masks[0])], 0))
    for i in range(1, warmup):
        step_fn([(xs[i], masks[i])], i)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(warmup, n):
        step_fn([(xs[i], masks[i])], i)
    _sync(dev)
    per_step = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**30, "cuda max allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
    return BenchResult(
        size=size, batch=batch, device=str(dev), samples_per_s=batch / per_step,
        tflops_per_s=flops / per_step / 1e12, tflop_per_sample=flops / batch / 1e12, peak_memory_gib=peak,
        memory_kind=kind, encoder_params=sum(p.numel() for p in models.encoder.parameters()),
        predictor_params=sum(p.numel() for p in models.predictor.parameters()),
        context_tokens=sum(m.context.shape[1] for m in masks) / n,
        target_tokens=sum(m.target.shape[1] for m in masks) / n, step_ms=per_step * 1e3,
    )  # fmt: skip


def format_table(results: list[BenchResult]) -> str:
    head = "| model | batch | device | samples/s | achieved TFLOP/s | TFLOP/sample | peak memory | encoder / predictor params |"
    rows = [head, "|" + "---|" * 8]
    for r in results:
        rows.append(
            f"| {r.size} | {r.batch} | {r.device} | {r.samples_per_s:.2f} | {r.tflops_per_s:.3f} | "
            f"{r.tflop_per_sample:.3f} | {r.peak_memory_gib:.2f} GiB ({r.memory_kind}) | "
            f"{r.encoder_params / 1e6:.1f} M / {r.predictor_params / 1e6:.1f} M |"
        )
    return "\n".join(rows)
