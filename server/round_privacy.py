"""Central DP, secure aggregation and the privacy report as the pretraining round loop uses them.

`server.pretraining.FederatedRun` asks this object for the round's accumulator (a `RunningMean`, or a
`ClippedSum` under central DP), lets it run the exchange (plain `server.exchange.exchange`, or
`server.secagg.secure_exchange` with `secure-aggregation`), then for the new global sets (the mean, or
central DP's noisy release), and after the round to rewrite the run folder's privacy report. Its state
(central DP's accountant) is saved in the checkpoint, so a resumed run keeps counting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.serverapp import Grid

from brainjepa.federation.contract import RoundSpec
from server.aggregate import RunningMean
from server.central_dp import CentralDP, CentralDPParams, ClippedSum
from server.config import FederationConfig
from server.downlink import DownlinkRound
from server.exchange import SiteResult, exchange
from server.privacy_report import PrivacyReport
from server.secagg import add_secure_sum, secure_exchange

log = logging.getLogger(__name__)


class RoundPrivacy:
    def __init__(self, cfg: FederationConfig, run_dir: Path, generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        self.central = (
            CentralDP(
                CentralDPParams(cfg.central_dp_noise_multiplier, cfg.central_dp_clip_norm, cfg.central_dp_delta),
                generator,
            )
            if cfg.central_dp
            else None
        )
        self.report = PrivacyReport(run_dir, cfg.secure_aggregation)
        self.sampled = self.population = 0

    def accumulator(self, default: RunningMean, current: Mapping[str, torch.Tensor]) -> RunningMean | ClippedSum:
        return self.central.new_sum(current) if self.central is not None else default

    def exchange(
        self,
        grid: Grid,
        spec: RoundSpec,
        sets: Mapping[str, torch.Tensor],
        records: Mapping[str, Mapping[str, torch.Tensor]] | None,
        acc: RunningMean | ClippedSum,
        on_result: Callable[[SiteResult], None],
        exclude: frozenset[int] = frozenset(),
        why: str = "",
        downlink: DownlinkRound | None = None,
    ) -> list[SiteResult]:
        """The round's exchange (never with the `exclude`d nodes, which `why` names; an int8 `downlink`
        under central DP: FederationConfig refuses it with secure aggregation); under secure
        aggregation the unmasked sum goes into `acc` here, otherwise `on_result` adds each reply."""
        if self.cfg.secure_aggregation:
            clip = self.central.params.clip_norm if self.central is not None else 0.0
            sec = secure_exchange(grid, self.cfg, spec, sets, records, clip, exclude, why)
            add_secure_sum(acc, sec, sets)
            self.sampled, self.population = sec.sampled, sec.population
            return sec.results
        connected = len(grid.get_node_ids())
        results = exchange(
            grid, self.cfg, spec, sets, on_result, records=records, exclude=exclude, why=why, downlink=downlink
        )
        # every sampled site has a result (ok, failed, rejected, timeout); the population is the connected
        # sites when sampling (at least the sampled ones: the sampling rate is never understated above 1)
        self.sampled, self.population = len(results), max(connected, len(results))
        return results

    def new_sets(
        self, acc: RunningMean | ClippedSum, current: Mapping[str, torch.Tensor], spec: RoundSpec
    ) -> dict[str, torch.Tensor]:
        """The aggregate the server optimiser steps to: the mean, or central DP's noisy release."""
        if self.central is None or not isinstance(acc, ClippedSum):
            return acc.result()  # type: ignore[union-attr]
        momenta = [spec.schedule(step).momentum for step in range(spec.step_start, spec.step_start + spec.local_steps)]
        return self.central.release(acc, current, self.sampled, self.population, momenta)

    def after_round(self, rnd: int, results: list[SiteResult]) -> None:
        self.report.update(rnd, results, self.central.summary() if self.central is not None else None)

    def state_dict(self) -> dict[str, object] | None:
        return self.central.state_dict() if self.central is not None else None

    def load_state_dict(self, state: Mapping[str, object] | None) -> None:
        if self.central is not None and state is not None:
            self.central.load_state_dict(state)
            log.info(
                "central DP: %d round(s) already accounted, epsilon %.3f",
                len(self.central.rounds),
                self.central.epsilon(),
            )
