"""One DP round at a site: grant it against the ledger, then record it, report it and say what it spent.

The site's work modules (`client.training`, `client.downstream`) call `PrivateRound.open` before training
(it raises `BudgetExhausted` when the round would not fit), train with the granted noise multiplier, then
`commit`, which appends the release to the ledger (write-then-rename), rewrites the report and returns the
reply metrics (`Metric.EPSILON_SPENT`, ... of the round contract).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from brainjepa.config import PrivacyConfig
from brainjepa.federation.contract import Metric
from brainjepa.privacy.budget import Ledger, RoundBudget, grant, release_of
from brainjepa.privacy.report import write_report


def ledger_path(cfg: PrivacyConfig, site_yaml: Path, site: str) -> Path:
    """`privacy.ledger` (relative to the site YAML's folder), or `<YAML folder>/privacy/<site>-ledger.json`."""
    base = Path(site_yaml).resolve().parent
    if cfg.ledger:
        p = Path(cfg.ledger)
        return p if p.is_absolute() else base / p
    return base / "privacy" / f"{site}-ledger.json"


def run_key(task: str, model_checksum: str, gradient_checksum: str, total_steps: int, seed: int) -> str:
    """A federation run as the site sees it: stable across coordinator restarts and resumes (the ledger
    groups releases by it; the budget composes ALL runs, so a new key never frees budget)."""
    kind = "pretrain" if task == "pretrain" else "downstream"
    digest = hashlib.sha256(f"{model_checksum}|{gradient_checksum}|{total_steps}|{seed}".encode()).hexdigest()
    return f"{kind}-{digest[:12]}"


@dataclass
class PrivateRound:
    cfg: PrivacyConfig
    ledger: Ledger
    run: str
    task: str
    round_index: int
    granted: RoundBudget

    @classmethod
    def open(
        cls,
        cfg: PrivacyConfig,
        path: Path,
        site: str,
        run: str,
        task: str,
        round_index: int,
        sample_rate: float,
        steps: int,
        planned_steps: int,
    ) -> PrivateRound:
        """Grant the round or raise BudgetExhausted (nothing is trained then)."""
        ledger = Ledger.open(path, site)
        return cls(cfg, ledger, run, task, round_index, grant(ledger, cfg, run, sample_rate, steps, planned_steps))

    @property
    def noise_multiplier(self) -> float:
        return self.granted.noise_multiplier

    def commit(self) -> dict[str, float]:
        """Record the round's release on disk, rewrite the report; the reply's privacy metrics."""
        self.ledger.record(release_of(self.run, self.task, self.round_index, self.granted, self.cfg.max_grad_norm))
        write_report(self.ledger, self.cfg)
        return {
            Metric.EPSILON_SPENT: self.ledger.epsilon(self.cfg.delta, self.cfg.accountant),
            Metric.EPSILON_BUDGET: float(self.cfg.target_epsilon or 0.0),
            Metric.DELTA: self.cfg.delta,
            Metric.DP_NOISE_MULTIPLIER: self.granted.noise_multiplier,
            Metric.DP_MAX_GRAD_NORM: self.cfg.max_grad_norm,
            Metric.DP_SAMPLE_RATE: self.granted.sample_rate,
            Metric.DP_STEPS: float(sum(r.steps for r in self.ledger.releases)),
        }
