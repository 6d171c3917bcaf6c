"""Benchmark of the pretraining step: samples/s, achieved TFLOP/s and peak memory.

One optimizer step per batch with the default masking, random inputs of R x T, exactly as the
reference's figures in the reference GPU figures in docs/performance.md were taken; eager or the fast path
(`brainjepa.fastpath`), our masks or the reference's (for a like-for-like FLOP budget). FLOPs are counted once with
torch's FlopCounterMode over a whole step (forward, backward; the optimizer adds no matmul FLOPs).
With `processes` > 1 the step runs over that many ranks of this machine (`brainjepa.distributed`: GPUs,
or gloo processes on a CPU), the batch split over them: samples/s is the whole batch's, and the scaling
efficiency is samples/s over `processes` x the one-process figure.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from brainjepa.config import DistributedConfig, MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.distributed import RankGroup, launch
from brainjepa.fastpath import attention_backends
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.masks import sample_masks
from brainjepa.perf.profiling import profile_steps
from brainjepa.prefetch import MicroBatches, Prefetcher

# The reference code on one H200 (the reference GPU figures in docs/performance.md, flash path via SDPA, bf16):
# (size, batch) -> (samples/s, peak GiB of torch.cuda.max_memory_allocated).
REFERENCE_H200 = {
    ("small", 16): (134, 5.5),
    ("small", 64): (259, 21.1),
    ("base", 16): (55.7, 8.8),
    ("base", 32): (114.5, 16.6),
    ("base", 64): (128.8, 32.2),
    ("large", 16): (44.7, 19.4),
    ("large", 32): (51.5, 34.3),
}


@dataclass(frozen=True)
class BenchResult:
    size: str
    batch: int
    device: str
    mode: str  # "eager", or what the fast path switched on: compile, cuda-graphs, attention=<order>
    masks: str  # "ours" (equal counts by construction) or "reference" (the reference's algorithm + truncation)
    samples_per_s: float
    tflops_per_s: float
    tflop_per_sample: float
    peak_memory_gib: float
    memory_kind: str  # "cuda max allocated", "process peak RSS" or "rank 0 peak RSS"
    encoder_params: int
    predictor_params: int
    context_tokens: float
    target_tokens: float
    step_ms: float
    first_step_s: float  # wall time of the first step: compilation, cuDNN plans, allocator warm-up
    processes: int = 1  # ranks the batch was split over (memory: rank 0's)

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


def synthetic_batches(
    batch: int, n_rois: int, n_frames: int, n_time: int, mask_cfg: MaskConfig, seed: int = 0
) -> Callable[[int], MicroBatches]:
    """step -> [(x (B, R, T) standard normal, masks)]: a pure function of (seed, step), like real data."""

    def make(step: int) -> MicroBatches:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = torch.randn(batch, n_rois, n_frames, generator=g)
        return [(x, sample_masks(mask_cfg, batch, n_rois, n_time, g))]

    return make


def fast_perf(
    device: torch.device | str,
    cuda_graphs: bool = False,
    attention: str = "auto",
    selective_checkpointing: bool = False,
    recompute_fraction: float = 0.0,
) -> PerfConfig:
    """The fast path's settings for a device: compiled blocks, SDPA backend order, prefetching."""
    return PerfConfig(
        compile=True,
        attention=attention,
        cuda_graphs=cuda_graphs and torch.device(device).type == "cuda",
        selective_checkpointing=selective_checkpointing,
        recompute_fraction=recompute_fraction,
    )


def _eager_step_flops(
    models: JEPAModels, batches: list[MicroBatches], device: torch.device, group: RankGroup | None = None
) -> int:
    """FLOPs of plain eager steps on `batches` (the anchor's counter), summed (over the ranks too), with an
    optimizer that is then freed. Our token counts change per batch, so the timed batches are counted."""
    step_fn = PretrainStep(models, OptimConfig(), total_steps=1000, device=device, group=group)
    flops = sum(count_step_flops(lambda mb=mb: step_fn(mb, 0)) for mb in batches)
    if group is not None:  # each rank counted its rows
        total = torch.tensor([float(flops)])
        group.sum_([total])
        flops = int(total.item())
    step_fn.optimizer.state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flops


def describe(perf: PerfConfig, device: torch.device | str) -> str:
    """A short label of what `perf` switches on for `device`: "eager" when nothing."""
    dev = torch.device(device)
    parts = ["compile"] if perf.compile else []
    if perf.cuda_graphs and dev.type == "cuda":
        parts.append("cuda-graphs")
    if perf.selective_checkpointing:
        parts.append("selective-ckpt")
    if perf.recompute_fraction:
        parts.append(f"recompute-{perf.recompute_fraction:.0%}")
    if attention_backends(perf.attention, dev) is not None:
        parts.append(f"attention={perf.attention}")
    return "+".join(parts) or "eager"


def run_bench(
    size: str = "base",
    batch: int = 16,
    device: str = "cpu",
    steps: int = 5,
    warmup: int = 2,
    n_rois: int = 450,
    n_frames: int = 160,
    seed: int = 0,
    activation_checkpointing: bool = False,
    perf: PerfConfig | None = None,
    reference_masks: bool = False,
    profile_dir: Path | None = None,
    processes: int = 1,
    group: RankGroup | None = None,
) -> BenchResult:
    """Time `steps` optimizer steps after `warmup` untimed ones; batches are built by the same
    background prefetcher as in training, so mask sampling is timed only where it is not hidden.
    With `profile_dir`, three more steps run under torch.profiler (`brainjepa.perf.profiling`).
    With `processes` > 1, over that many ranks (one process per device): rank 0's figures."""
    if processes > 1 and group is None:
        if profile_dir is not None:
            raise ValueError("bench: profiling runs in one process (processes 1)")
        job = {k: v for k, v in locals().items() if k not in ("processes", "group")}
        return launch(_bench_rank, job, DistributedConfig(devices=processes), device)
    dev = torch.device(device) if group is None else group.device
    perf = perf or PerfConfig(attention="default")
    cfg = ModelConfig(size=size, n_rois=n_rois, n_frames=n_frames)
    g = torch.Generator().manual_seed(seed)
    models = JEPAModels(cfg, torch.randn(n_rois, cfg.gradient_components, generator=g))
    mask_cfg = MaskConfig(reference_truncation=reference_masks)
    make = synthetic_batches(batch, n_rois, n_frames, cfg.n_time_patches, mask_cfg, seed)
    warmup = max(1, warmup)

    timed = range(1 + warmup, 1 + warmup + steps)
    flops = _eager_step_flops(models, [make(s) for s in timed], dev, group) / steps  # per timed step, on average
    step_fn = PretrainStep(
        models,
        OptimConfig(),
        total_steps=1000,
        device=dev,
        activation_checkpointing=activation_checkpointing,
        perf=perf,
        group=group,
    )
    batches = iter(Prefetcher(make, range(1, 1 + warmup + steps), perf.prefetch, pin=dev.type == "cuda"))
    tokens = []
    t0 = time.perf_counter()
    for i in range(warmup):
        s, mb = next(batches)
        step_fn(mb, s)
        if i == 0:
            _sync(dev)
            first_step_s = time.perf_counter() - t0
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for s, mb in batches:
        step_fn(mb, s)
        tokens.append((mb[0][1].context.shape[1], mb[0][1].target.shape[1]))
    _sync(dev)
    per_step = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**30, "cuda max allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
        if group is not None:  # a spawned rank inherits its launcher's ru_maxrss; its own memory's peak:
            peak, kind = _own_peak_rss_kib() / 2**20, "rank 0 peak RSS"
    if profile_dir is not None:
        n = 1 + warmup + steps
        profile_steps(step_fn, make, range(n, n + 3), dev, profile_dir)
    return BenchResult(
        size=size,
        batch=batch,
        device=str(dev),
        mode=describe(perf, dev),
        masks="reference" if reference_masks else "ours",
        samples_per_s=batch / per_step,
        tflops_per_s=flops / per_step / 1e12,
        tflop_per_sample=flops / batch / 1e12,
        peak_memory_gib=peak,
        memory_kind=kind,
        encoder_params=sum(p.numel() for p in models.encoder.parameters()),
        predictor_params=sum(p.numel() for p in models.predictor.parameters()),
        context_tokens=sum(c for c, _ in tokens) / len(tokens),
        target_tokens=sum(t for _, t in tokens) / len(tokens),
        step_ms=per_step * 1e3,
        first_step_s=first_step_s,
        processes=1 if group is None else group.world,
    )


def _own_peak_rss_kib() -> float:
    """This process's own peak resident memory (Linux VmHWM, KiB; not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _bench_rank(group: RankGroup, job: dict) -> BenchResult:
    """One rank of a multi-process bench (`brainjepa.distributed.launch`)."""
    return run_bench(**job, group=group)


def format_table(results: list[BenchResult]) -> str:
    """Markdown table; `x eager` is samples/s over the eager row of the same size, batch, masks and processes;
    `scaling` is samples/s over processes x the one-process row of the same size, batch, masks and mode."""
    eager = {(r.size, r.batch, r.masks, r.processes): r.samples_per_s for r in results if r.mode == "eager"}
    alone = {(r.size, r.batch, r.masks, r.mode): r.samples_per_s for r in results if r.processes == 1}
    head = (
        "| model | batch | masks | mode | processes | samples/s | x eager | scaling | achieved TFLOP/s | TFLOP/sample "
        "| peak memory | first step | encoder / predictor params |"
    )
    rows = [head, "|" + "---|" * 13]
    for r in results:
        base = eager.get((r.size, r.batch, r.masks, r.processes))
        ratio = f"{r.samples_per_s / base:.2f}" if base else "-"
        one = alone.get((r.size, r.batch, r.masks, r.mode))
        scaling = f"{r.samples_per_s / (r.processes * one):.0%}" if one and r.processes > 1 else "-"
        rows.append(
            f"| {r.size} | {r.batch} | {r.masks} | {r.mode} | {r.processes} | {r.samples_per_s:.2f} | {ratio} | "
            f"{scaling} | {r.tflops_per_s:.3f} | "
            f"{r.tflop_per_sample:.3f} | {r.peak_memory_gib:.2f} GiB ({r.memory_kind}) | {r.first_step_s:.1f} s | "
            f"{r.encoder_params / 1e6:.1f} M / {r.predictor_params / 1e6:.1f} M |"
        )
    return "\n".join(rows)
