"""Does the fast path train the same model? Loss curves of eager vs fast from one seed and data.

Both runs start from identical weights and see identical batches (pure functions of the step), in
the same precision (fp32 on CPU, bf16 autocast on CUDA); only the kernels differ. Float rounding
makes the runs drift apart slowly; the figures below say how far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from brainjepa.bench import describe, synthetic_batches
from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.jepa import JEPAModels, PretrainStep

# Stated tolerances (docs/performance.md), as the largest relative loss difference over the run.
# CPU fp32: the compiler only reorders float sums (measured ~6e-7 over 200 steps).
# CUDA bf16: fused kernels keep intermediates in fp32 where eager rounds them to bf16.
TOLERANCE = {"cpu": 1e-4, "cuda": 5e-2}


@dataclass(frozen=True)
class NumericsResult:
    device: str
    fast: str  # what the fast path switched on
    steps: int
    eager_loss: list[float]
    fast_loss: list[float]
    max_rel_loss_diff: float
    mean_rel_loss_diff: float
    max_rel_param_diff: float  # over every encoder / predictor / target tensor at the end
    graphs: int  # distinct graphs the compiler built over the whole run (shapes vary per batch)

    @property
    def tolerance(self) -> float:
        return TOLERANCE["cuda" if self.device.startswith("cuda") else "cpu"]

    @property
    def ok(self) -> bool:
        return self.max_rel_loss_diff <= self.tolerance

    def summary(self) -> dict:
        d = asdict(self)
        del d["eager_loss"], d["fast_loss"]
        return d | {"loss_first": self.eager_loss[0], "loss_last_eager": self.eager_loss[-1],
                    "loss_last_fast": self.fast_loss[-1], "tolerance": self.tolerance, "ok": self.ok}  # fmt: skip


def _train(cfg: ModelConfig, grads: torch.Tensor, perf: PerfConfig, batch: int, steps: int,
           device: torch.device, seed: int) -> tuple[torch.Tensor, JEPAModels]:  # fmt: skip
    torch.manual_seed(seed)  # identical initial weights in both runs
    models = JEPAModels(cfg, grads)
    step_fn = PretrainStep(models, OptimConfig(), steps, device, perf=perf)
    make = synthetic_batches(batch, cfg.n_rois, cfg.n_frames, cfg.n_time_patches, MaskConfig(), seed)
    losses = [step_fn(make(s), s) for s in range(steps)]
    return torch.stack(losses).float().cpu(), models


def compare_paths(fast: PerfConfig, size: str = "tiny", batch: int = 8, steps: int = 200, n_rois: int = 32,
                  n_frames: int = 64, device: str = "cpu", seed: int = 0) -> NumericsResult:  # fmt: skip
    """Train twice from the same seed and batches, eager and `fast`, and compare."""
    import torch._dynamo

    dev = torch.device(device)
    cfg = ModelConfig(size=size, n_rois=n_rois, n_frames=n_frames, gradient_components=8)
    grads = torch.randn(n_rois, 8, generator=torch.Generator().manual_seed(seed))
    eager_loss, eager = _train(cfg, grads, PerfConfig(attention="default"), batch, steps, dev, seed)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast_loss, quick = _train(cfg, grads, fast, batch, steps, dev, seed)
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    rel = (eager_loss - fast_loss).abs() / eager_loss.abs()
    params = [((p - q).norm() / p.norm()).item() for p, q in zip(eager.parameters(), quick.parameters(), strict=True)]
    return NumericsResult(
        device=str(dev), fast=describe(fast, dev), steps=steps, eager_loss=eager_loss.tolist(),
        fast_loss=fast_loss.tolist(), max_rel_loss_diff=rel.max().item(), mean_rel_loss_diff=rel.mean().item(),
        max_rel_param_diff=max(params), graphs=graphs,
    )  # fmt: skip
