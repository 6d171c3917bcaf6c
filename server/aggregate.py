"""Aggregation of the sites' weight sets: checks, sample-weighted mean, FedAvgM / FedAdam / FedYogi server steps.

Pure PyTorch, no Flower: each weight set (encoder, predictor, target) travels as ONE flat 1-D vector
(the module's parameters in `named_parameters()` order, `torch.nn.utils.parameters_to_vector`), so a
check of shape is a check of length, and the mean is one fused operation per set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from brainjepa.federation.averaging import RunningMean  # noqa: F401 (the server's averaging)
from brainjepa.federation.reply_sets import SetStats, reply_stats, shape_of
from server.bounds import SetBound, check_bounds
from server.config import ServerOptConfig

# Weight sets the server optimiser (FedAvgM / FedAdam / FedYogi) steps; the EMA target is always plainly
# averaged (it is a moving average of the encoders, not a trained quantity).
TRAINED_SETS = ("encoder", "predictor")


@dataclass
class SiteUpdate:
    """What one site sent back in a round (weights already decoded to fp32 flat vectors)."""

    site: str
    num_examples: int
    sets: Mapping[str, torch.Tensor]  # name -> (P_name,) float32 (a reply: `ReplySets`, decoded when read)
    metrics: dict[str, float] = field(default_factory=dict)


def check_update(
    update: SiteUpdate,
    expected: dict[str, int],
    current: Mapping[str, torch.Tensor] | None = None,
    bounds: Mapping[str, SetBound] | None = None,
    max_samples: int = 0,
    stats: Mapping[str, SetStats] | None = None,
) -> str | None:
    """Why `update` must not be averaged (missing / wrong-length set, NaN/Inf, no samples, more samples
    than `max_samples` (0: no cap), a set outside its bound against the `current` global set
    (`server.bounds`)), or None. `stats`: the update's `reply_stats` against `current` if already
    taken (each set is read once, one chunk at a time, for all checks)."""
    if not (isinstance(update.num_examples, int) and update.num_examples > 0):
        return f"num-examples must be a positive integer, got {update.num_examples!r}"
    if max_samples and update.num_examples > max_samples:
        return f"num-examples {update.num_examples} exceeds the cap of {max_samples} for this site"
    for name, n in expected.items():
        if name not in update.sets:
            return f"weight set '{name}' missing (got {sorted(update.sets)})"
        shape = shape_of(update.sets, name)
        if len(shape) != 1 or shape[0] != n:
            return f"weight set '{name}' has shape {shape}, expected ({n},)"
    extra = set(update.sets) - set(expected)
    if extra:
        return f"unexpected weight set(s) {sorted(extra)}"
    stats = stats if stats is not None else reply_stats(update.sets, current)
    for name in expected:
        if stats[name].nonfinite:
            return f"weight set '{name}' contains {stats[name].nonfinite} NaN/Inf value(s)"
    if bounds and current is not None:
        return check_bounds(update.sets, current, bounds, stats)
    return None


class ServerOptimizer:
    """Turns the sites' mean into the next global weights; its state is checkpointed."""

    def __init__(self, cfg: ServerOptConfig) -> None:
        self.cfg = cfg
        self.state: dict[str, torch.Tensor] = {}  # "m.encoder", "v.encoder", ...

    def step(self, current: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        out = dict(mean)
        if c.method == "fedavg":
            return out
        for name in TRAINED_SETS:
            delta = mean[name] - current[name]  # pseudo-gradient (negative)
            if c.method == "fedavgm":
                m = self.state.get(f"m.{name}")
                m = delta.clone() if m is None else m.mul_(c.momentum).add_(delta)
                self.state[f"m.{name}"] = m
                out[name] = current[name] + c.lr * m
            else:  # fedadam, fedyogi: Adam / Yogi on the pseudo-gradient (Reddi et al. 2021, Algorithm 2)
                m = self.state.get(f"m.{name}", torch.zeros_like(delta))
                v = self.state.get(f"v.{name}", torch.zeros_like(delta))
                m.mul_(c.beta1).add_(delta, alpha=1 - c.beta1)
                sq = delta * delta
                if c.method == "fedyogi":  # v - (1 - beta2) sq sign(v - sq): v grows no faster than additively
                    v.sub_(sq.mul_(torch.sign(v - sq)), alpha=1 - c.beta2)
                else:
                    v.mul_(c.beta2).add_(sq, alpha=1 - c.beta2)
                self.state[f"m.{name}"], self.state[f"v.{name}"] = m, v
                out[name] = current[name] + c.lr * m / (v.sqrt() + c.tau)
        return out

    def state_dict(self) -> dict:
        return {"cfg": self.cfg.__dict__, "state": {k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.state = {k: v.clone() for k, v in sd["state"].items()}
