"""Cost of DP-SGD: the pretraining step's time and peak memory with and without DP (`brainjepa dp-bench`).

Each configuration runs in a fresh Python process (`python -m brainjepa.privacy.bench '<json>'`), so that
the CPU's process peak RSS belongs to that configuration alone (on CUDA: torch's max allocated). The same
random batches (B subjects, the default masks) feed both steps; the DP step is `DPPretrainStep` (per-sample
gradients of at most `chunk` samples at once, Opacus clipping and noise); the non-DP one the plain eager
`PretrainStep` (SDPA attention).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.masks import sample_masks
from brainjepa.privacy.dpsgd import DPPretrainStep


@dataclass(frozen=True)
class DPBenchResult:
    size: str
    batch: int
    mode: str  # "non-DP" or "DP chunk N" (N samples' per-sample gradients at once)
    device: str
    step_s: float
    peak_memory_gib: float
    memory_kind: str
    params: int  # trained parameters (encoder + predictor)


def measure(
    size: str,
    batch: int,
    dp: bool,
    chunk: int = 0,
    steps: int = 3,
    warmup: int = 1,
    rois: int = 450,
    frames: int = 160,
    device: str = "cpu",
    seed: int = 0,
) -> DPBenchResult:
    """Time `steps` optimizer steps after `warmup` (run it in a fresh process for a clean memory peak)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    cfg = ModelConfig(size=size, n_rois=rois, n_frames=frames)
    models = JEPAModels(cfg, torch.randn(rois, cfg.gradient_components))
    step = PretrainStep(
        models, OptimConfig(), total_steps=1000, device=dev, perf=PerfConfig(attention="default"), precision="fp32"
    )
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(batch, rois, frames, generator=g), sample_masks(MaskConfig(), batch, rois, cfg.n_time_patches, g))
        for _ in range(warmup + steps)
    ]
    if dp:
        dp_step = DPPretrainStep(step, 1.0, 1.0, float(batch), torch.Generator(device=dev).manual_seed(1), chunk)

        def run(i: int) -> None:
            dp_step(*batches[i], i)
    else:

        def run(i: int) -> None:
            step([batches[i]], i)

    for i in range(warmup):
        run(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        run(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**30, "cuda max allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
    mode = f"DP chunk {chunk or batch}" if dp else "non-DP"
    n = sum(p.numel() for m in (models.encoder, models.predictor) for p in m.parameters())
    return DPBenchResult(size, batch, mode, str(dev), (time.perf_counter() - t0) / steps, peak, kind, n)


def measure_isolated(**kwargs: object) -> DPBenchResult:
    """`measure` in a fresh Python process (its own peak memory)."""
    out = subprocess.run(
        [sys.executable, "-m", "brainjepa.privacy.bench", json.dumps(kwargs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"dp-bench {kwargs}: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}"
        )
    return DPBenchResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def format_table(results: list[DPBenchResult]) -> str:
    """Markdown; `x non-DP` is the step time over the non-DP row of the same size and batch."""
    base = {(r.size, r.batch): r.step_s for r in results if r.mode == "non-DP"}
    rows = ["| model | batch | mode | step | x non-DP | peak memory | trained params |", "|" + "---|" * 7]
    for r in results:
        ratio = f"{r.step_s / base[(r.size, r.batch)]:.2f}" if (r.size, r.batch) in base else "-"
        rows.append(
            f"| {r.size} | {r.batch} | {r.mode} | {r.step_s:.3f} s | {ratio} | {r.peak_memory_gib:.2f} GiB "
            f"({r.memory_kind}) | {r.params / 1e6:.1f} M |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(json.dumps(asdict(measure(**json.loads(sys.argv[1])))))
