"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the optimizer step.

Every schedule spans the planned optimizer steps of the whole run, so a federated server can tell a
site exactly where in the run a round sits (the reference advances its EMA once per 8 micro-steps and
ends at ~0.9965; ours reaches the configured end value at the last planned step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from brainjepa.config import OptimConfig


@dataclass(frozen=True)
class SchedulePoint:
    lr: float
    weight_decay: float
    momentum: float


def learning_rate(cfg: OptimConfig, step: int, total: int) -> float:
    """Linear warm-up start_lr -> lr, then cosine lr -> final_lr over the remaining steps."""
    warmup = max(1, round(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay(cfg: OptimConfig, step: int, total: int) -> float:
    """Cosine from weight_decay to final_weight_decay over the whole run."""
    progress = min(1.0, step / max(1, total))
    return cfg.final_weight_decay + (cfg.weight_decay - cfg.final_weight_decay) * 0.5 * (
        1.0 + math.cos(math.pi * progress)
    )


def ema_momentum(cfg: OptimConfig, step: int, total: int) -> float:
    """Linear from ema[0] to ema[1]; `step` counts EMA updates already made (0-based)."""
    return cfg.ema[0] + (cfg.ema[1] - cfg.ema[0]) * min(1.0, (step + 1) / max(1, total))


def schedule_at(cfg: OptimConfig, step: int, total: int) -> SchedulePoint:
    return SchedulePoint(
        learning_rate(cfg, step, total), weight_decay(cfg, step, total), ema_momentum(cfg, step, total)
    )
