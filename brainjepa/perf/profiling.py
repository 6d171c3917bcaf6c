"""Where a pretraining step's time goes: torch.profiler over a few steps, summarised by phase and op.

The step marks its phases with `record_function` ranges (`jepa/target`, `jepa/context_encoder`,
`jepa/predictor`, `jepa/loss`, `jepa/backward`, `jepa/optimizer`, `jepa/ema`, `jepa/to_device`);
this module runs the profiler, writes a Chrome trace (open it in https://ui.perfetto.dev) and two
Markdown tables: time per phase, and the ops that cost the most.
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from brainjepa.checkpoint import atomic_write_text
from brainjepa.prefetch import MicroBatches

PHASES = (
    "jepa/to_device",
    "jepa/target",
    "jepa/context_encoder",
    "jepa/predictor",
    "jepa/loss",
    "jepa/backward",
    "jepa/optimizer",
    "jepa/ema",
)


@dataclass(frozen=True)
class OpTime:
    name: str
    calls: int
    cpu_ms: float  # per profiled step, self time on the host
    device_ms: float  # per profiled step, self time of its kernels on the GPU (0 on CPU)


@dataclass(frozen=True)
class Profile:
    steps: int
    wall_ms: float  # per step
    phases: dict[str, tuple[float, float]]  # phase -> (host ms, device ms) per step, children included
    ops: list[OpTime]  # most expensive first

    def markdown(self, top: int = 20) -> str:
        on_gpu = any(d > 0 for _, d in self.phases.values())
        lines = [
            f"Profiled {self.steps} steps: {self.wall_ms:.1f} ms per step (wall).",
            "",
            "| phase | host ms / step | device ms / step |",
            "|---|---|---|",
        ]
        for name, (cpu, dev) in self.phases.items():
            lines.append(f"| {name} | {cpu:.2f} | {dev:.2f} |" if on_gpu else f"| {name} | {cpu:.2f} | - |")
        lines += ["", "| op | calls / step | self host ms / step | self device ms / step |", "|---|---|---|---|"]
        for op in self.ops[:top]:
            lines.append(f"| `{op.name}` | {op.calls} | {op.cpu_ms:.2f} | {op.device_ms:.2f} |")
        return "\n".join(lines) + "\n"


def _device_us(event: object, attr: str) -> float:
    """Kernel time of a profiler event (the attribute is `device_*` in new torch, `cuda_*` before)."""
    return float(getattr(event, f"device_{attr}", getattr(event, f"cuda_{attr}", 0.0)))


def profile_steps(
    step_fn: Callable[[MicroBatches, int], torch.Tensor],
    make: Callable[[int], MicroBatches],
    steps: range,
    device: torch.device,
    out_dir: Path | None = None,
) -> Profile:
    """Profile `step_fn` over `steps` (warm it up before: compilation would dominate). Batches are
    built before the profiler starts. With `out_dir`, writes trace.json.gz and profile.md there.
    Profiling adds host overhead per op: take wall times from `brainjepa bench`, not from here."""
    batches = [(s, make(s)) for s in steps]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for s, mb in batches:
            step_fn(mb, s)
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / len(batches)
    n = len(batches)
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}
    phases = {
        p: (by_name[p].cpu_time_total / 1e3 / n, _device_us(by_name[p], "time_total") / 1e3 / n)
        for p in PHASES
        if p in by_name
    }
    ops = [
        OpTime(e.key, round(e.count / n), e.self_cpu_time_total / 1e3 / n, _device_us(e, "self_time_total") / 1e3 / n)
        for e in averages
        if not e.key.startswith(("jepa/", "ProfilerStep"))
    ]
    ops.sort(key=lambda o: (o.device_ms, o.cpu_ms), reverse=True)
    result = Profile(n, wall, phases, ops)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / "trace.json.tmp"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(out_dir / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        atomic_write_text(out_dir / "profile.md", result.markdown())
    return result
