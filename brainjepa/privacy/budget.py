"""The site's privacy ledger: one accountant over everything the site has released, kept on its own disk.

Every DP round a site trains appends one entry (federation run, task, round, noise multiplier, sampling
rate, steps) to a JSON file on the site's disk, written write-then-rename. The epsilon spent is the
composition of ALL entries of the file by Opacus' accountant (RDP or PRV), so it survives a site
restart and a coordinator restart (Flower's `context.state` survives neither), spans pretraining and
fine-tuning rounds alike, and a new federation run (or a server that renames its run) starts no new
budget: only the site admin can, by pointing `privacy.ledger` at another file.

Before a round the site checks that the round's steps would keep the composed epsilon within
`privacy.target_epsilon`; otherwise it declines (`BudgetExhausted`). A calibrated noise multiplier is
fixed at a run's first round at this site (the smallest sigma whose planned steps fit the remaining
budget) and stored in the ledger, so later rounds of the run cannot be sent with less noise.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brainjepa.config import PrivacyConfig
from brainjepa.errors import DataError, InputError

LEDGER_VERSION = 1


class BudgetExhausted(InputError):
    """The site's next round would exceed its privacy budget: it declines to train."""


@dataclass(frozen=True)
class Release:
    """Steps of DP-SGD at one (noise multiplier, sampling rate): one round of one task at the site."""

    run: str  # the federation run (`run_key`)
    task: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    time: float = 0.0  # unix seconds when recorded


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Composed epsilon of (noise multiplier, sampling rate, steps) entries by Opacus' accountant."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # here: importing opacus costs ~1.4 s per Flower app process

    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate(
    history: list[tuple[float, float, int]],
    sample_rate: float,
    steps: int,
    target: float,
    delta: float,
    accountant: str = "rdp",
    tol: float = 1e-3,
) -> float | None:
    """The smallest noise multiplier (to `tol` relative) for which `history` plus `steps` at `sample_rate`
    stays within `target` epsilon; None when even sigma = 1e3 does not fit."""

    def fits(sigma: float) -> bool:
        with warnings.catch_warnings():  # extreme trial sigmas sit at the ends of the accountant's orders
            warnings.simplefilter("ignore", UserWarning)
            return epsilon_of([*history, (sigma, sample_rate, steps)], delta, accountant) <= target

    lo, hi = 0.05, 1e3
    if not fits(hi):
        return None
    if fits(lo):
        return lo
    while hi / lo > 1.0 + tol:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@dataclass
class Ledger:
    """The JSON file behind a site's budget: its releases and the noise multipliers fixed per run."""

    path: Path
    site: str
    releases: list[Release] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)  # run -> calibrated sigma (fixed at its first round)

    @classmethod
    def open(cls, path: Path, site: str) -> Ledger:
        if not path.exists():
            return cls(path, site)
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != LEDGER_VERSION:
                raise DataError(f"privacy ledger '{path}': version {raw.get('version')!r}, expected {LEDGER_VERSION}")
            releases = [Release(**r) for r in raw["releases"]]
            noise = {str(k): float(v) for k, v in raw.get("noise", {}).items()}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"privacy ledger '{path}': unreadable ({e}); the site's budget cannot be known: "
                "restore the file from a backup (never delete it to reset the budget)"
            ) from e
        if raw.get("site") != site:
            raise DataError(f"privacy ledger '{path}' belongs to site '{raw.get('site')}', not '{site}'")
        return cls(path, site, releases, noise)

    def history(self) -> list[tuple[float, float, int]]:
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.releases]

    def epsilon(self, delta: float, accountant: str = "rdp", run: str | None = None) -> float:
        """Epsilon of every release (or of one run's) composed."""
        rel = [r for r in self.releases if run is None or r.run == run]
        return epsilon_of([(r.noise_multiplier, r.sample_rate, r.steps) for r in rel], delta, accountant)

    def record(self, release: Release) -> None:
        self.releases.append(release)
        self.save()

    def save(self) -> None:
        """Write-then-rename: a crash leaves the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "noise": self.noise,
            "releases": [asdict(r) for r in self.releases],
        }
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class RoundBudget:
    """What the site grants a round: its noise multiplier and the epsilon before and after it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float


def grant(
    ledger: Ledger, cfg: PrivacyConfig, run: str, sample_rate: float, steps: int, planned_steps: int
) -> RoundBudget:
    """The round's noise multiplier, or BudgetExhausted when `steps` at `sample_rate` would take the
    site's composed epsilon past `cfg.target_epsilon`. Only the site's YAML and ledger decide: the server
    chooses `steps`, `sample_rate` (through the batch size) and `planned_steps`, and each can only make the
    site spend faster or decline sooner."""
    assert cfg.target_epsilon is not None  # PrivacyConfig checks it when enabled
    if not 0.0 < sample_rate <= 1.0:
        raise BudgetExhausted(
            f"sampling rate {sample_rate:.4g} is not in (0, 1]: the batch is larger than the site's subjects"
        )
    history = ledger.history()
    before = epsilon_of(history, cfg.delta, cfg.accountant)
    sigma = cfg.noise_multiplier or ledger.noise.get(run)
    if sigma is None:
        sigma = calibrate(
            history, sample_rate, max(steps, planned_steps), cfg.target_epsilon, cfg.delta, cfg.accountant
        )
        if sigma is None:
            raise BudgetExhausted(
                f"site '{ledger.site}': epsilon {before:.3f} of its budget {cfg.target_epsilon} is "
                f"spent; no noise level lets {planned_steps} more steps fit (ledger "
                f"'{ledger.path}')"
            )
        ledger.noise[run] = sigma
        ledger.save()
    after = epsilon_of([*history, (sigma, sample_rate, steps)], cfg.delta, cfg.accountant)
    if after > cfg.target_epsilon:
        raise BudgetExhausted(
            f"site '{ledger.site}': this round's {steps} steps (noise multiplier {sigma:.3g}, "
            f"sampling rate {sample_rate:.3g}) would take epsilon from {before:.3f} to {after:.3f}, "
            f"past its budget {cfg.target_epsilon} (delta {cfg.delta}); it declines to train "
            f"(ledger '{ledger.path}')"
        )
    return RoundBudget(sigma, sample_rate, steps, before, after)


def release_of(run: str, task: str, round_index: int, granted: RoundBudget, max_grad_norm: float) -> Release:
    return Release(
        run, task, round_index, granted.noise_multiplier, granted.sample_rate, granted.steps, max_grad_norm, time.time()
    )
