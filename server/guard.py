"""What the coordinator lets into a round's mean: each reply's checks against its per-set bounds
(`server.bounds`), pinned sample claims, the quarantine of sites it refused (`server.quarantine`), and
whom to blame when an aggregated round had to be rolled back.

A site is named by its registered name when a sites file is in use (its key proves it); without one a
name proves nothing (any node may claim "site_a"), so the quarantine then holds the node id only, and a
reply refused for a duplicate name quarantines nobody.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from brainjepa.federation.contract import RoundSpec
from brainjepa.federation.reply_sets import reply_stats, shape_of
from server.aggregate import check_update
from server.audit import AuditLog
from server.bounds import ClaimBook, NormHistory, SetBound, distance_bound, ema_share, target_bound
from server.config import FederationConfig
from server.exchange import SiteResult
from server.quarantine import Quarantine
from server.registry import RegisteredSite

log = logging.getLogger(__name__)


def norm_explosion(current: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor], factor: float) -> str:
    """Which global sets' norms grew by more than `factor` x (or are not finite), or "" (factor 0: off)."""
    if factor <= 0:
        return ""
    grown = [
        f"global {name} norm {float(candidate[name].norm()):.4g}, was {float(v.norm()):.4g}"
        for name, v in current.items()
        if not float(candidate[name].norm()) <= factor * float(v.norm())
    ]
    return "; ".join(grown)


class UpdateGuard:
    def __init__(
        self,
        cfg: FederationConfig,
        run_dir: Path,
        registry: Mapping[int, RegisteredSite],
        audit: AuditLog | None,
        state: Mapping[str, object] | None = None,
    ) -> None:
        """`state`: `state_dict()` of the run being resumed (None: a new run)."""
        state = state or {}
        self.cfg, self.registry, self.audit = cfg, registry, audit
        self.norms = NormHistory(cfg.max_norm_growth, cfg.norm_window, state.get("norms"))  # type: ignore[arg-type]
        self.claims = ClaimBook(state.get("claims"))  # type: ignore[arg-type]
        self.quarantine = Quarantine(run_dir, cfg.quarantine_rounds)
        self.events = 0  # sites quarantined so far by this process (a round is retried when it grew)
        self.moved: dict[int, tuple[str, float]] = {}  # node -> (site, farthest move / global norm), this round

    def label(self, res: SiteResult) -> str:
        """The name a quarantine holds a site by: registered, or the node (an unproven name is not used)."""
        reg = self.registry.get(res.node_id)
        return reg.site if reg is not None else f"node-{res.node_id}"

    def exclusion(self, rnd: int) -> tuple[frozenset[int], str]:
        """Nodes not to ask in 0-based round `rnd`, and their names for messages."""
        names = self.quarantine.names(rnd + 1)
        return self.quarantine.nodes(rnd + 1), ("quarantined: " + ", ".join(names) if names else "")

    def bounds(self, spec: RoundSpec, sets: Mapping[str, torch.Tensor]) -> dict[str, SetBound]:
        """Each set's bound this round: trained sets by max-update-ratio, the EMA target by its schedule
        (when the encoder travels with it), every set's norm by max-norm-growth."""
        ratio, out = self.cfg.max_update_ratio, {}
        for name, vec in sets.items():
            if name == "target" and "encoder" in sets:
                share = ema_share(spec)
                dist = target_bound(sets["encoder"], vec, ratio, share)
                out[name] = SetBound(dist, self.norms.max_norm(name, spec.round), share if ratio > 0 else 0.0)
            else:
                out[name] = SetBound(distance_bound(vec, ratio), self.norms.max_norm(name, spec.round))
        return out

    def check(
        self, res: SiteResult, rnd: int, current: Mapping[str, torch.Tensor], bounds: Mapping[str, SetBound]
    ) -> str | None:
        """Why the ok reply `res` of 0-based round `rnd` must not be averaged, or None (then it is noted
        as accepted: its sample claim pinned, its farthest move kept for `blame`)."""
        assert res.update is not None
        held = self.quarantine.holds(self.label(res), rnd + 1)
        if held:
            return held
        reg = self.registry.get(res.node_id)
        caps = [c for c in (self.cfg.max_site_samples, reg.max_samples if reg else 0) if c > 0]
        expected = {k: v.numel() for k, v in current.items()}
        u = res.update
        fits = all(k in u.sets and shape_of(u.sets, k) == (n,) for k, n in expected.items())
        stats = reply_stats(u.sets, current) if fits else None  # one chunked pass over the reply for every check
        reason = check_update(u, expected, current, bounds, min(caps) if caps else 0, stats)
        reason = reason or self.claims.check(self.label(res), u.num_examples)
        if reason is None:
            assert stats is not None
            self.claims.accept(self.label(res), u.num_examples)
            moves = [stats[k].distance / max(float(v.norm()), 1e-12) for k, v in current.items()]
            self.moved[res.node_id] = (res.site, max(moves, default=0.0))
        return reason

    def after_exchange(self, rnd: int, results: Sequence[SiteResult]) -> None:
        """Quarantine the sites whose replies were rejected in 0-based round `rnd`."""
        for r in results:
            if r.status == "rejected" and r.quarantine:
                self._quarantine(self.label(r), r.node_id, rnd, r.detail.splitlines()[-1] if r.detail else "rejected")

    def rollback(self, rnd: int, why: str) -> None:
        """The aggregate of 0-based round `rnd` was discarded (`why`): audit it and quarantine the accepted
        site whose update moved farthest (with secure aggregation no single update is seen: nobody)."""
        blamed = max(self.moved.items(), key=lambda kv: kv[1][1]) if self.moved else None
        site = blamed[1][0] if blamed else ""
        log.error("round %d rolled back (the global model stays at round %d): %s", rnd + 1, rnd, why)
        if self.audit is not None:
            self.audit.event("rollback", round=rnd + 1, reason=why, blamed_site=site)
        if blamed is not None:
            node, (_, move) = blamed
            label = self.registry[node].site if node in self.registry else f"node-{node}"
            self._quarantine(
                label,
                node,
                rnd,
                f"round {rnd + 1} rolled back ({why}); this site's update moved farthest ({move:.3g} x the global norm)",
            )

    def _quarantine(self, label: str, node: int, rnd: int, reason: str) -> None:
        self.quarantine.add(label, node, rnd + 1, reason)
        self.events += 1
        if self.audit is not None:
            self.audit.event("quarantine", round=rnd + 1, site=label, node_id=node, reason=reason)

    def start_round(self) -> None:
        self.moved = {}

    def state_dict(self) -> dict[str, object]:
        return {"norms": self.norms.state_dict(), "claims": dict(self.claims.claims)}
