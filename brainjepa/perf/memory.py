"""Peak memory of a training step on a GPU, estimated on any machine.

The step runs on fake tensors (`torch._subclasses.fake_tensor`): every op computes shapes and dtypes,
no data, so ViT-L at batch 64 takes seconds on a laptop. A dispatch mode adds up the bytes of every
storage while it is alive; the peak of that sum over a step is what `torch.cuda.max_memory_allocated`
reports, less what the CUDA caching allocator rounds up and what cuBLAS / cuDNN keep as workspace.

bf16 autocast runs on the CPU's autocast policy, which casts the same ops as CUDA's (matmuls and
attention in bf16; LayerNorm, softmax and the loss in fp32), and SDPA takes the CPU flash kernel,
which saves for backward what the CUDA flash and cuDNN kernels save (output and log-sum-exp, no
attention matrix). docs/performance.md compares the estimate with the reference code's measured H200
peaks. Eager only: compiled blocks keep the same tensors for backward (measured on CPU).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.masks import Masks, sample_masks
from brainjepa.perf.bench import CPU_SDPA_FLOPS, synthetic_batches

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of all storages alive now, and the largest that sum has been since `reset_peak`.

    A storage counts from the op that creates it until its last reference goes away (a view shares its
    base's storage and adds nothing); tensors made outside the mode count once passed to `track`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.now = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, n)

    def bytes_of(self, t: torch.Tensor) -> int:
        """Bytes of `t`'s storage if it is tracked and alive, else 0."""
        return self._seen.get(t.untyped_storage(), 0)

    def _free(self, n: int) -> None:
        self.now -= n

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@dataclass(frozen=True)
class MemoryEstimate:
    size: str
    batch: int
    masks: str  # "ours", "ours, worst of N" or "reference" (the reference's token counts)
    setting: str  # setting_label(): "eager", "selective", "full", "recompute 50%", "selective + recompute 50%"
    selective_checkpointing: bool
    recompute_fraction: float
    weights_gib: float  # encoder, predictor and target, fp32
    optimizer_gib: float  # AdamW's two moments
    peak_gib: float  # the largest per-step peak over the timed steps
    step_peaks_gib: tuple[float, ...]  # per timed step
    tflop_per_sample: float  # of the last timed batch, recomputation included (what the GPU must do)
    context_tokens: tuple[int, ...]  # per timed step

    def as_dict(self) -> dict:
        return asdict(self)


def setting_label(selective: bool, recompute_fraction: float) -> str:
    if recompute_fraction >= 1.0:
        return "full"
    parts = (["selective"] if selective else []) + (
        [f"recompute {recompute_fraction:.0%}"] if recompute_fraction else []
    )
    return " + ".join(parts) or "eager"


def parse_setting(text: str) -> tuple[bool, float]:
    """'eager' | 'selective' | 'full' | 'recompute:F' | 'selective+recompute:F' -> (selective, fraction)."""
    selective, fraction = False, 0.0
    for part in text.replace(" ", "").split("+"):
        if part == "selective":
            selective = True
        elif part == "full":
            fraction = 1.0
        elif part.startswith("recompute:"):
            try:
                fraction = float(part.removeprefix("recompute:"))
            except ValueError:
                fraction = -1.0
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"setting '{text}': recompute:F needs a share F from 0 to 1")
        elif part != "eager":
            raise ValueError(f"setting '{text}': expected eager, selective, full, recompute:F or selective+recompute:F")
    return selective, fraction


def fake_parameters(model: torch.nn.Module, fake: FakeTensorMode) -> None:
    """Replace every parameter and buffer of `model` by a fake CPU tensor of its shape and dtype."""
    with fake:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad
                    )
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _fake_models(cfg: ModelConfig, fake: FakeTensorMode) -> JEPAModels:
    """JEPAModels whose parameters and buffers are fake CPU tensors (built on meta: no allocation)."""
    with torch.device("meta"):
        models = JEPAModels(cfg, torch.zeros(cfg.n_rois, cfg.gradient_components))
    fake_parameters(models, fake)
    return models


def heaviest_masks(cfg: MaskConfig, batch: int, n_rois: int, n_time: int, draws: int, seed: int = 0) -> Masks:
    """The batch masks with the most context tokens (then target tokens) among `draws` seeds.

    Block sizes are drawn once per batch and first from the generator, so one sample per draw shows
    the batch's token counts. The reference's masks truncate to the batch's smallest sample, which
    depends on the batch: there is no per-draw count to rank.
    """
    if cfg.reference_truncation:
        raise ValueError("worst-case masks: only for our masks (the reference's counts depend on the whole batch)")

    def weight(i: int) -> tuple[int, int]:
        m = sample_masks(cfg, 1, n_rois, n_time, torch.Generator().manual_seed(seed + i))
        return m.context.shape[1], m.target.shape[1]

    heaviest = max(range(draws), key=weight)
    return sample_masks(cfg, batch, n_rois, n_time, torch.Generator().manual_seed(seed + heaviest))


def estimate_step_memory(
    size: str = "base",
    batch: int = 16,
    n_rois: int = 450,
    n_frames: int = 160,
    steps: int = 5,
    warmup: int = 2,
    seed: int = 0,
    reference_masks: bool = False,
    selective_checkpointing: bool = False,
    recompute_fraction: float = 0.0,
    worst_of: int = 0,
    fake: bool = True,
) -> MemoryEstimate:
    """Peak bytes of bf16 training steps on the batches `brainjepa bench` times (same seed, same
    masks): `warmup` steps first (the first allocates AdamW's state), then the peak of each of `steps`.
    `recompute_fraction` is `perf.recompute_fraction` (1 = full activation checkpointing).
    `worst_of=N` times one step on the heaviest masks of N draws instead (`heaviest_masks`): what a
    long run meets sooner or later, so what a GPU must hold.
    `fake=False` runs the same count on real CPU tensors (slow; it checks the fake run)."""
    cfg = ModelConfig(size=size, n_rois=n_rois, n_frames=n_frames)
    mask_cfg = MaskConfig(reference_truncation=reference_masks)
    make = synthetic_batches(batch, n_rois, n_frames, cfg.n_time_patches, mask_cfg, seed)
    mode = FakeTensorMode() if fake else None
    if mode is None:
        models = JEPAModels(
            cfg, torch.randn(n_rois, cfg.gradient_components, generator=torch.Generator().manual_seed(seed))
        )
    else:
        models = _fake_models(cfg, mode)
    live = LiveBytes()
    for t in [*models.parameters(), *models.buffers()]:
        live.track(t)
    weights = live.now
    perf = PerfConfig(
        attention="default", selective_checkpointing=selective_checkpointing, recompute_fraction=recompute_fraction
    )
    step_fn = PretrainStep(
        models, OptimConfig(), total_steps=1000, device="cpu", fused=True, precision="bf16", perf=perf
    )
    batches = [make(s)[0] for s in range(1, 1 + warmup + (0 if worst_of else steps))]  # real: masks read values
    if worst_of:
        heavy = heaviest_masks(mask_cfg, batch, n_rois, cfg.n_time_patches, worst_of, seed)
        batches.append((torch.zeros(batch, n_rois, n_frames), heavy))
    peaks, contexts = [], []
    as_input = mode.from_tensor if mode is not None else (lambda t: t)
    with mode or nullcontext(), live:
        for s, (x, m) in enumerate(batches, start=1):
            masks = Masks(as_input(m.context), as_input(m.target), m.region_sizes)
            live.reset_peak()
            step_fn([(as_input(x), masks)], s)
            if s > warmup:
                peaks.append(live.peak / GIB)
                contexts.append(m.context.shape[1])
    with mode or nullcontext(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step_fn([(as_input(x), masks)], s + 1)  # once more, apart: the counter holds tensors of its own

    optimizer = sum(
        live.bytes_of(t)
        for st in step_fn.optimizer.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor) and t.ndim > 0
    )
    setting = setting_label(selective_checkpointing, recompute_fraction)
    masks = "reference" if reference_masks else f"ours, worst of {worst_of}" if worst_of else "ours"
    return MemoryEstimate(
        size=size,
        batch=batch,
        masks=masks,
        setting=setting,
        selective_checkpointing=selective_checkpointing,
        recompute_fraction=recompute_fraction,
        weights_gib=weights / GIB,
        optimizer_gib=optimizer / GIB,
        peak_gib=max(peaks),
        step_peaks_gib=tuple(round(p, 3) for p in peaks),
        context_tokens=tuple(contexts),
        tflop_per_sample=counter.get_total_flops() / batch / 1e12,
    )


# From least to most recomputation: the first setting whose peak fits is the fastest that fits.
LADDER = (
    "eager",
    "selective",
    "selective+recompute:0.25",
    "selective+recompute:0.5",
    "selective+recompute:0.75",
    "full",
)


def fit_setting(
    budget_gib: float, headroom: float = 0.15, **kwargs
) -> tuple[MemoryEstimate | None, list[MemoryEstimate]]:  # noqa: ANN003
    """Walk `LADDER` until the estimated peak is at most (1 - headroom) of `budget_gib`: the GPU's
    memory, less what the estimate leaves out (CUDA context, allocator rounding, workspaces).
    `kwargs` go to `estimate_step_memory`. Returns (the fitting estimate or None, all estimates tried)."""
    tried = []
    for text in LADDER:
        selective, fraction = parse_setting(text)
        e = estimate_step_memory(selective_checkpointing=selective, recompute_fraction=fraction, **kwargs)
        tried.append(e)
        if e.peak_gib <= budget_gib * (1.0 - headroom):
            return e, tried
    return None, tried


def perf_yaml(e: MemoryEstimate) -> str:
    """The `perf:` lines of a site or pretraining YAML that give estimate `e`'s setting."""
    selective = str(e.selective_checkpointing).lower()
    return f"perf:\n  selective_checkpointing: {selective}\n  recompute_fraction: {e.recompute_fraction:g}"


def format_estimates(estimates: list[MemoryEstimate], anchor: dict[tuple[str, int], float] | None = None) -> str:
    """Markdown table; with `anchor` ((size, batch) -> the reference's measured GiB), a ratio column."""
    anchor = anchor or {}
    rows = [
        "| model | batch | masks | setting | estimated peak | x reference | TFLOP/sample | weights | AdamW state "
        "| context tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        ref = anchor.get((e.size, e.batch))
        ratio = f"{e.peak_gib / ref:.2f}" if ref else "-"
        rows.append(
            f"| {e.size} | {e.batch} | {e.masks} | {e.setting} | {e.peak_gib:.2f} GiB | {ratio} | {e.tflop_per_sample:.2f} | "
            f"{e.weights_gib:.2f} GiB | {e.optimizer_gib:.2f} GiB | {min(e.context_tokens)}-{max(e.context_tokens)} |"
        )
    return "\n".join(rows)
