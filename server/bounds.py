"""How far a site's update may go: per-set bounds the coordinator derives each round, and sample claims.

A hostile but registered site can send any numbers. Each weight set is checked against its own bound:

- **Trained sets** (encoder, predictor, a downstream model): `||site - global|| <= max-update-ratio x
  ||global||`. A downstream model's head is also bounded on its own (it is tiny next to the backbone,
  so a head scaled x 2 can hide inside the model's bound): by the larger of that and `adam_reach`.
- **The EMA target** is not trained, so the server derives its bound from the round's own schedule and
  the encoder the site sent. A round's k EMA updates `T <- m_i T + (1 - m_i) E_i` give
  `T_k - T_0 = sum_i w_i (E_i - T_0)` with `sum_i w_i = 1 - prod_i m_i` (`ema_share`), so
  `||T_k - T_0|| <= ema_share x max_i ||E_i - T_0||`. The local encoders E_i ran from the global E_g to
  the E_k the site sent; the check allows `TARGET_SLACK` x ema_share x the farther of the two from T_0
  (the path need not be straight), and never more than what any encoder inside its own bound allows.
  An honest site's target uses a small part of that; a target scaled by 1.01 alone is refused.
- **Growth that cannot compound.** Every set's norm `||site||` must stay within `1 + max-norm-growth` x
  the global set's norm `norm-window` rounds ago (`NormHistory`). A site that scales its weights by
  1.45 (inside max-update-ratio 0.5) is refused at once, and a smaller factor cannot be repeated round
  after round: the reference trails by `norm-window` rounds, not one.
- **Sample claims.** A site's `num-examples` is its subject count, which does not change during a run:
  its first accepted claim is pinned (`ClaimBook`), a later different claim is refused (the registry's
  `max-samples` caps the first one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from brainjepa.federation.contract import RoundSpec
from brainjepa.federation.reply_sets import SetStats, chunks, reply_stats, set_stats

TARGET_SLACK = 2.0
ADAM_SLACK = 4.0
_TOLERANCE = 1e-6  # relative: float32 round-off of a set that did not move


@dataclass(frozen=True)
class SetBound:
    """||site - global|| <= max_distance and ||site|| <= max_norm (inf: that check is off). The EMA
    target's bound also depends on the site's own encoder: `ema_share` > 0 turns that on."""

    max_distance: float = math.inf
    max_norm: float = math.inf
    ema_share: float = 0.0


def ema_share(spec: RoundSpec) -> float:
    """1 - prod of the round's EMA momenta: the share of the target the round's EMA updates may replace."""
    prod = 1.0
    for step in range(spec.step_start, spec.step_start + spec.local_steps):
        prod *= spec.schedule(step).momentum
    return 1.0 - prod


def distance_bound(current: torch.Tensor, max_ratio: float) -> float:
    """A trained set's bound: max_ratio x its global norm (0: no bound)."""
    return max_ratio * float(current.norm()) if max_ratio > 0 else math.inf


def target_bound(encoder: torch.Tensor, target: torch.Tensor, max_ratio: float, share: float) -> float:
    """The EMA target's bound derived from the round's schedule, for any encoder inside its own bound
    (module docstring); 0 ratio: no bound."""
    if max_ratio <= 0:
        return math.inf
    reach = _distance(encoder, target) + max_ratio * float(encoder.norm())
    return TARGET_SLACK * share * reach + _TOLERANCE * float(target.norm())


def site_target_bound(site_to_target: float, encoder: torch.Tensor, target: torch.Tensor, share: float) -> float:
    """The target's bound from the encoder this site sent (`site_to_target` = ||site encoder - global
    target||): its local encoders ran from the global `encoder` to the site's, so the target moved at most
    ~share x the farther of the two from `target`."""
    reach = max(site_to_target, _distance(encoder, target))
    return TARGET_SLACK * share * reach + _TOLERANCE * float(target.norm())


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| one chunk at a time (no temporary of the sets' size)."""
    sq = 0.0
    for lo, chunk in chunks({"a": a}, "a"):
        sq += float(torch.linalg.vector_norm(chunk - b.reshape(-1)[lo : lo + chunk.numel()], dtype=torch.float64)) ** 2
    return math.sqrt(sq)


def adam_reach(n: int, lr: float, steps: int) -> float:
    """How far `steps` fresh AdamW steps at learning rate <= `lr` can move `n` weights: each step moves a
    weight by at most ~lr (bias-corrected Adam, up to (1 - beta1) / sqrt(1 - beta2) = 3.2 at the default
    betas), so ADAM_SLACK x steps x lr x sqrt(n). A head trained from a small initialisation would fail
    a bound relative to its own norm; this one holds from the first round."""
    return ADAM_SLACK * steps * lr * math.sqrt(n)


def check_bounds(
    sets: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    bounds: Mapping[str, SetBound],
    stats: Mapping[str, SetStats] | None = None,
) -> str | None:
    """Why `sets` break a bound (the first one found), or None. `stats`: their `reply_stats` against
    `current`, if already taken."""
    stats = stats if stats is not None else reply_stats(sets, current)
    for name, bound in bounds.items():
        ref = current.get(name)
        if name not in sets or ref is None:
            continue
        limit, how = bound.max_distance, "max-update-ratio"
        if bound.ema_share > 0 and "encoder" in sets and "encoder" in current:
            to_target = set_stats(sets, "encoder", ref).distance  # ||site encoder - global target||
            limit = min(limit, site_target_bound(to_target, current["encoder"], ref, bound.ema_share))
            how = "derived from the EMA schedule and the encoder sent"
        dist = stats[name].distance
        if not dist <= limit:
            return (
                f"weight set '{name}' moved {dist:.4g} from the global weights (norm {float(ref.norm()):.4g}); "
                f"its bound this round is {limit:.4g} ({how})"
            )
        norm = stats[name].norm
        if norm > bound.max_norm:
            return (
                f"weight set '{name}' has norm {norm:.4g}, above its bound {bound.max_norm:.4g} "
                f"(max-norm-growth over the global norm norm-window rounds ago)"
            )
    return None


class NormHistory:
    """The global sets' norms after each round: the trailing reference of the growth bound."""

    def __init__(self, growth: float, window: int, norms: list[dict[str, float]] | None = None) -> None:
        self.growth, self.window = growth, window
        self.norms: list[dict[str, float]] = list(norms or [])  # index r: after round r (0: the start)

    def record(self, rnd: int, sets: Mapping[str, torch.Tensor]) -> None:
        """The global norms after round `rnd` (0: the run's start); later entries are dropped (a resume)."""
        del self.norms[rnd:]
        if len(self.norms) < rnd:  # resumed from a checkpoint without history: this is the earliest known
            self.norms.extend([{}] * (rnd - len(self.norms)))
        self.norms.append({k: float(v.norm()) for k, v in sets.items()})

    def max_norm(self, name: str, rnd: int) -> float:
        """The bound on a set's norm in round `rnd` (0-based): 1 + growth x its norm `window` rounds back."""
        if self.growth <= 0:
            return math.inf
        known = [n for n in self.norms[max(0, rnd - self.window) : rnd + 1] if name in n]
        return (1.0 + self.growth) * known[0][name] if known else math.inf

    def state_dict(self) -> list[dict[str, float]]:
        return [dict(n) for n in self.norms]


class ClaimBook:
    """Each site's first accepted sample claim; a later, different claim is refused."""

    def __init__(self, claims: Mapping[str, int] | None = None) -> None:
        self.claims: dict[str, int] = dict(claims or {})

    def check(self, site: str, n: int) -> str | None:
        first = self.claims.get(site)
        if first is not None and n != first:
            return (
                f"num-examples {n} differs from the {first} this site claimed before (a site's subject "
                f"count does not change during a run)"
            )
        return None

    def accept(self, site: str, n: int) -> None:
        self.claims.setdefault(site, n)
