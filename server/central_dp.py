"""Central differential privacy on the server (run config `central-dp`): DP-FedAvg with fixed clipping.

The privacy unit is a SITE: the guarantee covers adding or removing one site's whole contribution to a
round (its update), not one subject (that is the sites' own DP-SGD, `brainjepa.privacy`). Each round:

1. each accepted site's update is clipped: its delta to the global weights, over the trained sets
   (encoder and predictor, one L2 norm over both), scaled to norm <= `central-dp-clip-norm` (C);
2. the clipped deltas are SUMMED with fixed weights (each site 1, not its sample count: with
   sample-weighted averaging one site's influence n_i / sum(n) would depend on the others' data and the
   sensitivity would not be C); the sum's sensitivity is C;
3. Gaussian noise N(0, (z C)^2) is added to every coordinate of the sum, which is divided by the number
   of sites SAMPLED (m, fixed before the round: a site that fails or is rejected contributes a zero
   delta, so the divisor does not depend on who replied) -- Flower's `compute_stdv` z C / m on the mean;
4. the EMA target is not taken from the sites (their targets are a function of their unclipped
   encoders): the server recomputes it from the noisy global encoder, target <- mu target + (1 - mu)
   encoder with mu the product of the round's EMA momenta -- post-processing of the DP release, so it
   costs no privacy (it equals the sites' K-step EMA if the encoder had reached its new value at the
   round's first step);
5. the round is one sampled Gaussian mechanism for the accountant: Opacus' RDP accountant with noise
   multiplier z and sampling rate q = m / (connected sites). Opacus' RDP analysis assumes Poisson
   sampling; the server samples a fixed number of sites without replacement, so for q < 1 the reported
   epsilon is the usual DP-FedAvg approximation, at q = 1 (the default `fraction-sites` 1.0) it is exact.

Flower's `DifferentialPrivacyServerSideFixedClipping` wraps a strategy's `aggregate_train`, which takes
every reply of the round at once; our rounds add one decoded reply at a time to a running sum and drop
it (`server.pretraining`), so the same arithmetic is done here on the flat vectors, and the accounting by
Opacus (Flower's own accountant needs `dp-accounting`, not installed, and equal example counts).
What central DP does not protect: the server itself sees each site's update (unless secure aggregation
is on, then the sites clip and the server sees only the sum) and the reply metrics (loss, counts).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from brainjepa.federation.secure import TRAINED_SETS, clip_delta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CentralDPParams:
    noise_multiplier: float  # z: noise std on the sum of clipped deltas = z * clip_norm
    clip_norm: float  # C: L2 bound of one site's delta over the trained sets
    delta: float  # the delta at which epsilon is reported


class ClippedSum:
    """Sum of the sites' clipped deltas (float64), one site at a time: the central-DP counterpart of
    `RunningMean` (same `add(sets, n)`; `n` is ignored: every site weighs 1)."""

    def __init__(self, current: Mapping[str, torch.Tensor], clip_norm: float) -> None:
        self.current = current
        self.clip_norm = clip_norm
        self.sums = {n: torch.zeros(current[n].numel(), dtype=torch.float64) for n in TRAINED_SETS}
        self.count = 0
        self.norms: list[float] = []  # each site's delta norm before clipping (server-side bookkeeping)

    def add(self, sets: Mapping[str, torch.Tensor], n: int = 1) -> None:
        delta = {k: sets[k] - self.current[k] for k in TRAINED_SETS}  # (P_k,)
        clipped, norm = clip_delta(delta, self.clip_norm)
        for k in TRAINED_SETS:
            self.sums[k].add_(clipped[k].double())
        self.count += 1
        self.norms.append(norm)

    def add_sum(self, sums: Mapping[str, torch.Tensor], count: int) -> None:
        """Sites' deltas clipped at the sites and summed elsewhere (secure aggregation)."""
        for k in TRAINED_SETS:
            self.sums[k].add_(sums[k].double())
        self.count += count


def noisy_mean(
    sums: Mapping[str, torch.Tensor], sampled: int, params: CentralDPParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """(sum + N(0, (z C)^2 I)) / sampled for each set: the released mean delta (float32)."""
    std = params.noise_multiplier * params.clip_norm
    out = {}
    for k, s in sums.items():
        noise = torch.randn(s.shape, generator=generator, dtype=torch.float64) * std  # (P_k,)
        out[k] = ((s + noise) / sampled).float()
    return out


def ema_target(target: torch.Tensor, encoder: torch.Tensor, momenta: Sequence[float]) -> torch.Tensor:
    """The target after a round's EMA steps toward a fixed `encoder`: mu target + (1 - mu) encoder with
    mu = prod(momenta)."""
    mu = math.prod(momenta)
    return target * mu + encoder * (1.0 - mu)


class CentralDP:
    """The run's central DP: clipping sums, noise, target recomputation and the accountant (its history
    is checkpointed with the run, so a resumed run keeps counting)."""

    def __init__(self, params: CentralDPParams, generator: torch.Generator | None = None) -> None:
        self.params = params
        # The noise must be unpredictable: a seed from the run config would let anyone subtract it.
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        from opacus.accountants import RDPAccountant  # here: a run without central DP never imports opacus

        self.accountant = RDPAccountant()
        self.rounds: list[dict[str, float]] = []
        self._eps: tuple[tuple, float] | None = None  # (accountant history, epsilon)

    def new_sum(self, current: Mapping[str, torch.Tensor]) -> ClippedSum:
        return ClippedSum(current, self.params.clip_norm)

    def release(
        self,
        clipped: ClippedSum,
        current: Mapping[str, torch.Tensor],
        sampled: int,
        population: int,
        momenta: Sequence[float],
    ) -> dict[str, torch.Tensor]:
        """The round's new global sets from the clipped sum (noise added, divided by `sampled`), the
        target recomputed; the round is composed into the accountant."""
        if sampled < 1 or population < sampled:
            raise ValueError(f"central DP: {sampled} site(s) sampled out of {population} connected")
        mean = noisy_mean(clipped.sums, sampled, self.params, self.generator)
        new = {k: current[k] + mean[k] for k in TRAINED_SETS}
        new["target"] = ema_target(current["target"], new["encoder"], momenta)
        rate = sampled / population
        self.accountant.step(noise_multiplier=self.params.noise_multiplier, sample_rate=rate)
        # the sites clipped under secure aggregation: the server never learns whose update was clipped
        clipped_sites = (
            sum(n > self.params.clip_norm for n in clipped.norms) if len(clipped.norms) == clipped.count else None
        )
        self.rounds.append(
            {
                "sampled": sampled,
                "population": population,
                "sample_rate": rate,
                "sites_summed": clipped.count,
                "sites_clipped": clipped_sites,
                "epsilon": self.epsilon(),
            }
        )
        log.info(
            "central DP: %d site(s) summed (%s clipped to %.3g), noise std %.3g on the mean; epsilon %.3f "
            "at delta %.1e after %d round(s)",
            clipped.count,
            clipped_sites,
            self.params.clip_norm,
            self.params.noise_multiplier * self.params.clip_norm / sampled,
            self.epsilon(),
            self.params.delta,
            len(self.rounds),
        )
        return new

    def epsilon(self) -> float:
        """Epsilon spent so far at the run's delta (computed once per accounted round)."""
        history = tuple(self.accountant.history)
        if self._eps is None or self._eps[0] != history:
            self._eps = (history, float(self.accountant.get_epsilon(delta=self.params.delta)) if history else 0.0)
        return self._eps[1]

    def summary(self) -> dict[str, object]:
        """The report's central-DP block."""
        p = self.params
        return {
            "enabled": True,
            "privacy_unit": "site (its whole update in a round)",
            "noise_multiplier": p.noise_multiplier,
            "clip_norm": p.clip_norm,
            "delta": p.delta,
            "weighting": "uniform (each site 1), divided by the sites sampled",
            "accountant": "opacus rdp",
            "rounds": len(self.rounds),
            "epsilon": self.epsilon(),
            "per_round": self.rounds,
        }

    def state_dict(self) -> dict[str, object]:
        return {"history": [list(h) for h in self.accountant.history], "rounds": list(self.rounds)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        history = state["history"]
        assert isinstance(history, list)
        self.accountant.history = [(float(z), float(q), int(n)) for z, q, n in history]
        rounds = state["rounds"]
        assert isinstance(rounds, list)
        self.rounds = [dict(r) for r in rounds]
