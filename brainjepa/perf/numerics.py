"""Does the fast path train the same model? Loss curves of eager vs fast from one seed and data.

Both runs start from identical weights and see identical batches (pure functions of the step), in
the same precision (fp32, or bf16 autocast: the default on CUDA); only the kernels differ. Float rounding
makes the runs drift apart slowly; the figures below say how far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.jepa import JEPAModels, PretrainStep, resolve_precision
from brainjepa.perf.bench import describe, synthetic_batches

# Stated tolerances (docs/performance.md): (largest, mean) relative loss difference over the run.
# fp32: the compiler only reorders float sums (measured on CPU: ~7e-7 largest over 200 steps).
# bf16: fused kernels keep intermediates in fp32 where eager rounds them to bf16, and the runs drift
# apart chaotically (measured with bf16 autocast on CPU: 3.5e-2 largest, 7.0e-3 mean over 200 steps).
TOLERANCE = {"fp32": (1e-4, 1e-5), "bf16": (5e-2, 1e-2)}


@dataclass(frozen=True)
class NumericsResult:
    device: str
    precision: str  # fp32 or bf16 (autocast), the same on both paths
    fast: str  # what the fast path switched on
    steps: int
    eager_loss: list[float]
    fast_loss: list[float]
    max_rel_loss_diff: float
    mean_rel_loss_diff: float
    max_rel_param_diff: float  # over every encoder / predictor / target tensor at the end
    graphs: int  # distinct graphs the compiler built over the whole run (shapes vary per batch)

    @property
    def tolerance(self) -> tuple[float, float]:
        return TOLERANCE[self.precision]

    @property
    def ok(self) -> bool:
        return self.max_rel_loss_diff <= self.tolerance[0] and self.mean_rel_loss_diff <= self.tolerance[1]

    def summary(self) -> dict:
        d = asdict(self)
        del d["eager_loss"], d["fast_loss"]
        return d | {
            "loss_first": self.eager_loss[0],
            "loss_last_eager": self.eager_loss[-1],
            "loss_last_fast": self.fast_loss[-1],
            "tolerance_max_mean": self.tolerance,
            "ok": self.ok,
        }


def _train(
    cfg: ModelConfig,
    grads: torch.Tensor,
    perf: PerfConfig,
    batch: int,
    steps: int,
    device: torch.device,
    seed: int,
    precision: str,
) -> tuple[torch.Tensor, JEPAModels]:
    torch.manual_seed(seed)  # identical initial weights in both runs
    models = JEPAModels(cfg, grads)
    step_fn = PretrainStep(models, OptimConfig(), steps, device, perf=perf, precision=precision)
    make = synthetic_batches(batch, cfg.n_rois, cfg.n_frames, cfg.n_time_patches, MaskConfig(), seed)
    losses = [step_fn(make(s), s) for s in range(steps)]
    return torch.stack(losses).float().cpu(), models


def compare_paths(
    fast: PerfConfig,
    size: str = "tiny",
    batch: int = 8,
    steps: int = 200,
    n_rois: int = 32,
    n_frames: int = 64,
    device: str = "cpu",
    seed: int = 0,
    precision: str = "auto",
) -> NumericsResult:
    """Train twice from the same seed and batches, eager and `fast`, in the same precision, and compare.
    `precision` auto is bf16 autocast on CUDA and fp32 on CPU; bf16 on a CPU emulates the GPU's rounding."""
    import torch._dynamo

    dev = torch.device(device)
    cfg = ModelConfig(size=size, n_rois=n_rois, n_frames=n_frames, gradient_components=8)
    grads = torch.randn(n_rois, 8, generator=torch.Generator().manual_seed(seed))
    precision = resolve_precision(precision, dev)
    eager_loss, eager = _train(cfg, grads, PerfConfig(attention="default"), batch, steps, dev, seed, precision)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast_loss, quick = _train(cfg, grads, fast, batch, steps, dev, seed, precision)
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    rel = (eager_loss - fast_loss).abs() / eager_loss.abs()
    params = [((p - q).norm() / p.norm()).item() for p, q in zip(eager.parameters(), quick.parameters(), strict=True)]
    return NumericsResult(
        device=str(dev),
        precision=precision,
        fast=describe(fast, dev),
        steps=steps,
        eager_loss=eager_loss.tolist(),
        fast_loss=fast_loss.tolist(),
        max_rel_loss_diff=rel.max().item(),
        mean_rel_loss_diff=rel.mean().item(),
        max_rel_param_diff=max(params),
        graphs=graphs,
    )
