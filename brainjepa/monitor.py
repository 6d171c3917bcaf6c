"""Collapse monitor: how spread out and how many-dimensional the EMA target's features are.

JEPA training can collapse: the target encoder learns to give every token (nearly) the same vector,
the loss falls and the features carry nothing. `feature_stats` measures, on a FIXED probe batch (the
same scans and windows at every measurement, so numbers are comparable along a run):

- `rank`: the effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular
  values) of the centred token features (B * N, D); D means every direction is used, 1 a line;
- `spread`: the mean over the D dimensions of each dimension's standard deviation over the tokens;
- `scan_spread`: the same over the per-scan mean features (B, D): how much pooled features differ
  between scans (a pooled probe sees only this).

Two more numbers say whether the pretext needs the scans' content (measured when the monitor is given
the mask config and the three networks):

- `position_share`: the share of the LayerNorm-ed target features' variance (what the predictor
  regresses) explained by the token position alone, across the probe scans at each fixed token: an
  intraclass correlation, corrected for the few scans per position (0: positions say nothing, 1: every
  scan has the same target at a position, so the targets are predictable from positions alone);
- `context_gain`: the JEPA loss on the probe batch with the context tokens' content taken from another
  scan (the batch rolled by one) divided by the loss with the scan's own context, on fixed masks. Near 1:
  the predictor does not use what it sees.

`CollapseMonitor` keeps the first measurement as the baseline and logs a warning when `rank` falls
below `rank_floor * D`, `spread` below `spread_floor`, or either below `(1 - drop)` x its baseline, and
when `position_share` rises above `position_ceiling` or `context_gain` stays below `context_gain_floor`
(both after the first measurement: an untrained predictor uses nothing).

Explosion is the opposite failure, and the one a hostile federated site causes (weights scaled up):
`measure` raises `Explosion`, recording nothing, when the target's weight norm (`weight_norm`), `spread`
or `scan_spread` grew by more than `explode` x since the previous measurement, or one is not finite.
`brainjepa pretrain` stops there; the federated server rolls the round back and quarantines the site.

Where the probe batch comes from: `brainjepa pretrain` takes one centred window of the first
`probe_scans` subjects of its cohort (`probe_batch`). The federated server holds no data, so it
measures the global target after every round on a batch generated from a fixed seed
(`synthetic_probe`: AR(1) series with per-ROI amplitudes, scaled like model input); a drop there
shows a collapse of the network's function, though not of its response to the sites' own data.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainjepa.config import MaskConfig, MonitorConfig
from brainjepa.jepa import jepa_loss
from brainjepa.masks import Masks, sample_masks
from brainjepa.vit import gather_tokens
from sites.windows import PackedSeries, multi_windows

log = logging.getLogger(__name__)

FIELDS = ["step", "rank", "spread", "scan_spread", "position_share", "context_gain", "weight_norm"]
NAN = float("nan")


@dataclass(frozen=True)
class FeatureStats:
    rank: float  # effective rank of the centred token features, 1 .. D
    spread: float  # mean per-dimension std over tokens
    scan_spread: float  # mean per-dimension std over the scans' mean features
    position_share: float = NAN  # share of the normalised targets' variance explained by position, 0 .. 1
    context_gain: float = NAN  # loss with another scan's context / loss with the scan's own context
    weight_norm: float = NAN  # L2 norm of the measured encoder's parameters


class Explosion(RuntimeError):
    """The target's weights or features grew by more than `monitor.explode` x in one measurement interval."""


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank of the rows of x (M, D) after centring: exp(entropy of s / sum(s)), s the singular
    values. Computed in float64 from the smaller of the D x D covariance and the M x M Gram matrix (their
    nonzero eigenvalues are the same s ** 2): wide features (M << D, e.g. per-ROI readouts) stay cheap."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T  # (D, D) or (M, M)
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)  # s ** 2 (and zeros)
    s = eig.sqrt()
    total = s.sum()
    if total <= 0:
        return 1.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def token_stats(tokens: torch.Tensor) -> FeatureStats:
    """tokens (B, N, D) -> FeatureStats."""
    B, N, D = tokens.shape
    flat = tokens.reshape(B * N, D).double()  # (B*N, D)
    pooled = tokens.double().mean(1)  # (B, D)
    return FeatureStats(
        rank=effective_rank(flat), spread=float(flat.std(0).mean()), scan_spread=float(pooled.std(0).mean())
    )


@torch.no_grad()
def target_tokens(encoder: nn.Module, probe: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """The encoder's (eval mode, no gradients) token features on probe (B, R, T) -> (B, N, D) float32 on
    the CPU, computed `chunk` scans at a time (a smaller chunk holds fewer activations at once)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    try:
        return torch.cat(
            [encoder(probe[i : i + chunk].to(device)).float().cpu() for i in range(0, probe.shape[0], chunk)]
        )  # (B, N, D)
    finally:
        encoder.train(was_training)


def feature_stats(encoder: nn.Module, probe: torch.Tensor, chunk: int = 8) -> FeatureStats:
    """The encoder's token features on probe (B, R, T) (`target_tokens`), summarised."""
    return token_stats(target_tokens(encoder, probe, chunk))


def position_share(tokens: torch.Tensor) -> float:
    """tokens (B, N, D) -> the share of their variance explained by the token position (ANOVA estimate:
    the between-position variance, less the within-position noise its B-scan means carry, over the sum)."""
    t = tokens.double()
    B = t.shape[0]
    per_position = t.mean(0)  # (N, D)
    within = ((t - per_position) ** 2).sum(-1).sum(0).mean() / (B - 1)  # mean within-position variance
    between = ((per_position - per_position.mean(0)) ** 2).sum(-1).mean() - within / B
    between = between.clamp_min(0.0)
    total = between + within
    return float(between / total) if total > 0 else NAN


@torch.no_grad()
def content_stats(
    models: nn.Module,
    probe: torch.Tensor,
    masks: Masks,
    loss: str = "smooth_l1",
    target_norm: str = "layer_norm",
    chunk: int = 8,
    tokens: torch.Tensor | None = None,
) -> tuple[float, float]:
    """(position_share of the LayerNorm-ed target features, context_gain) of `models` (a JEPAModels: encoder,
    predictor, target) on the probe batch (B, R, T) with fixed masks; the gain is of the loss trained
    (`optim.loss`, `optim.target_norm`), the share of the target features before any centring.

    One target pass serves both (`tokens`: the target's features on the probe when the caller has them,
    `target_tokens`); the context encoder and the predictor then run `chunk` scans at a time, with the scan's
    own context and with the previous scan's (the batch rolled by one). The same numbers as `jepa_loss` on the
    whole batch, to float rounding, with one chunk's activations held at a time."""
    nets = (models.encoder, models.predictor, models.target)
    was = [n.training for n in nets]
    for n in nets:
        n.eval()
    device = next(models.parameters()).device
    B = probe.shape[0]
    try:
        h = target_tokens(models.target, probe, chunk) if tokens is None else tokens  # (B, N, D)
        t = F.layer_norm(h, (h.shape[-1],))
        share = position_share(t)
        if target_norm == "centered":  # less each position's mean over the batch, as `jepa_targets` does
            if B < 2:
                raise ValueError(f"target_norm 'centered' needs at least 2 scans per batch, got {B}")
            t = t - t.mean(0, keepdim=True)
        targets = gather_tokens(t, masks.target)  # (B, Nt, D)
        previous = torch.arange(B).roll(1)  # scan i reads scan i - 1's context: x.roll(1, dims=0)
        own = other = 0.0
        for i in range(0, B, chunk):
            rows = slice(i, i + chunk)
            m, target = masks.rows(rows).to(device), targets[rows].to(device)
            x, shown = probe[rows].to(device), probe[previous[rows]].to(device)
            own += float(jepa_loss(models, x, m, loss, target=target, reduction="sum"))
            other += float(jepa_loss(models, x, m, loss, context_input=shown, target=target, reduction="sum"))
    finally:
        for n, w in zip(nets, was, strict=True):
            n.train(w)
    return share, other / own if own > 0 else NAN


def probe_batch(packed: PackedSeries, n_frames: int, n_scans: int) -> torch.Tensor:
    """The fixed probe batch of a cohort: the centred window of its first `n_scans` subjects (B, R, T)."""
    idx = np.arange(min(n_scans, len(packed)))
    return torch.from_numpy(multi_windows(packed, n_frames, 1, idx)[:, 0])  # (B, R, T)


def synthetic_probe(n_scans: int, n_rois: int, n_frames: int, seed: int = 0) -> torch.Tensor:
    """A data-free probe batch (B, R, T) from a fixed seed: per ROI an AR(1) process (coefficient 0.9,
    BOLD-like autocorrelation at TR ~2 s) with a log-normal amplitude (median 0.5) and a small offset,
    roughly the range of robust-scaled input. Vectorised over scans and ROIs; a loop over time only."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_scans, n_rois, n_frames, generator=g)  # (B, R, T)
    rho = 0.9
    x = torch.empty_like(noise)
    x[..., 0] = noise[..., 0]
    for t in range(1, n_frames):
        x[..., t] = rho * x[..., t - 1] + math.sqrt(1 - rho**2) * noise[..., t]
    amp = 0.5 * torch.exp(0.5 * torch.randn(n_scans, n_rois, 1, generator=g))  # (B, R, 1)
    offset = 0.5 * torch.randn(n_scans, n_rois, 1, generator=g)  # (B, R, 1)
    return x * amp + offset


class CollapseMonitor:
    """Measures the target on a fixed probe batch, appends to a CSV, warns on a collapse."""

    def __init__(
        self,
        cfg: MonitorConfig,
        probe: torch.Tensor,
        embed_dim: int,
        csv_path: str | Path,
        keep_below: int = 0,
        label: str = "step",
        mask_cfg: MaskConfig | None = None,
        patch_size: int = 16,
        loss: str = "smooth_l1",
        target_norm: str = "layer_norm",
        chunk: int = 8,
    ) -> None:
        """`keep_below`: on resume, the CSV's rows with `label` below it are kept (the others rewritten).
        `mask_cfg`: measure `position_share` and `context_gain` too, on masks drawn once from a fixed seed.
        `chunk`: probe scans per forward pass (memory only: the measures do not depend on it)."""
        self.cfg, self.probe, self.embed_dim, self.label, self.loss = cfg, probe, embed_dim, label, loss
        self.target_norm, self.chunk = target_norm, chunk
        self.masks = None
        if mask_cfg is not None:
            B, R, T = probe.shape
            self.masks = sample_masks(mask_cfg, B, R, T // patch_size, torch.Generator().manual_seed(0))
        self.path = Path(csv_path)
        self.fields = [label, *FIELDS[1:]]
        rows = read_rows(self.path, label)
        rows = [r for r in rows if r[label] < keep_below]
        self.baseline = FeatureStats(**{k: rows[0][k] for k in FIELDS[1:]}) if rows else None
        self.last = FeatureStats(**{k: rows[-1][k] for k in FIELDS[1:]}) if rows else None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:  # resume: keep the rows of the completed steps only
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows({k: r[k] for k in self.fields} for r in rows)
        tmp.replace(self.path)

    def due(self, step: int, last: bool = False) -> bool:
        """At step 0 (after the first update), every `every` steps, and at the end; never when off."""
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or last)

    def stats(self, encoder: nn.Module, models: nn.Module | None = None) -> FeatureStats:
        """The target `encoder`'s statistics (nothing recorded); with `models` (its JEPAModels) and a mask
        config, the content measures too."""
        tokens = target_tokens(encoder, self.probe, self.chunk)  # (B, N, D): one pass, for every measure
        stats = token_stats(tokens)
        share, gain = NAN, NAN
        if models is not None and self.masks is not None:
            if models.target is not encoder:
                raise ValueError("CollapseMonitor.stats: `encoder` must be `models.target` (the EMA target)")
            share, gain = content_stats(
                models, self.probe, self.masks, self.loss, self.target_norm, self.chunk, tokens=tokens
            )
        norm = float(torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in encoder.parameters()])))
        return replace(stats, position_share=share, context_gain=gain, weight_norm=norm)

    def measure(self, encoder: nn.Module, step: int, models: nn.Module | None = None) -> FeatureStats:
        """Measure and record the target `encoder`'s statistics (`stats`); raises `Explosion` (nothing
        recorded) when they grew by more than `monitor.explode` x since the previous measurement."""
        stats = self.stats(encoder, models)
        reasons = self.explosion(stats)
        if reasons:
            raise Explosion(f"collapse monitor, {self.label} {step}: " + "; ".join(reasons))
        self.record(stats, step)
        return stats

    def record(self, stats: FeatureStats, step: int) -> None:
        """Append `stats` to the CSV and log them (a warning per `check` reason)."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(
                {self.label: step, **{k: f"{v:.6g}" for k, v in asdict(stats).items()}}
            )
        log.info(
            "collapse monitor, %s %d: effective rank %.2f of %d, spread %.4f, per-scan spread %.4f, "
            "position share %.3f, context gain %.3f",
            self.label,
            step,
            stats.rank,
            self.embed_dim,
            stats.spread,
            stats.scan_spread,
            stats.position_share,
            stats.context_gain,
        )
        for reason in self.check(stats):
            log.warning("collapse monitor, %s %d: %s", self.label, step, reason)
        if self.baseline is None:
            self.baseline = stats
        self.last = stats

    def explosion(self, stats: FeatureStats) -> list[str]:
        """Why `stats` look like an explosion against the previous measurement (empty: none, or off)."""
        factor, before = self.cfg.explode, self.last
        if factor <= 0 or before is None:
            return []
        reasons = []
        for name, now, then in (
            ("target weight norm", stats.weight_norm, before.weight_norm),
            ("feature spread", stats.spread, before.spread),
            ("per-scan spread", stats.scan_spread, before.scan_spread),
            ("effective rank", stats.rank, before.rank),
        ):
            if not math.isfinite(now):
                reasons.append(f"{name} is {now}")
            elif then > 0 and math.isfinite(then) and now > factor * then:
                reasons.append(f"{name} went from {then:.4g} to {now:.4g} (more than monitor.explode {factor:g} x)")
        return reasons

    def check(self, stats: FeatureStats) -> list[str]:
        """The reasons to warn about (empty: healthy)."""
        c, reasons = self.cfg, []
        floor = c.rank_floor * self.embed_dim
        if stats.rank < floor:
            reasons.append(
                f"effective rank {stats.rank:.2f} of {self.embed_dim} dimensions is below the floor "
                f"{floor:.2f} (monitor.rank_floor {c.rank_floor})"
            )
        if stats.spread < c.spread_floor:
            reasons.append(
                f"feature spread {stats.spread:.4f} is below the floor {c.spread_floor} (monitor.spread_floor)"
            )
        b = self.baseline
        if b is not None and stats.position_share > c.position_ceiling:
            reasons.append(
                f"position alone explains {stats.position_share:.0%} of the target features' variance "
                f"(above monitor.position_ceiling {c.position_ceiling}): the targets carry little "
                f"scan-specific content"
            )
        if b is not None and stats.context_gain < c.context_gain_floor:
            reasons.append(
                f"another scan's context raises the loss only x{stats.context_gain:.3f} (below "
                f"monitor.context_gain_floor {c.context_gain_floor}): the predictor barely uses what "
                f"it sees"
            )
        if b is not None:
            for name, now, then in (("effective rank", stats.rank, b.rank), ("feature spread", stats.spread, b.spread)):
                if now < (1.0 - c.drop) * then:
                    reasons.append(
                        f"{name} fell from {then:.4g} to {now:.4g}, by more than {c.drop:.0%} (monitor.drop)"
                    )
        return reasons


def read_rows(path: str | Path, label: str = "step") -> list[dict]:
    """The rows of a monitor CSV as numbers ([] when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            {label: int(r[label]), **{k: float(r.get(k) or NAN) for k in FIELDS[1:]}} for r in csv.DictReader(f)
        ]  # older files lack the content columns
