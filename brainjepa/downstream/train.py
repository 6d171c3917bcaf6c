"""Downstream training and evaluation of one model: the optimizer step, prediction, per-site metrics.

`DownstreamStep` is one AdamW step at an explicit position of the schedule (linear warm-up, cosine to
zero over the run's planned steps; per-layer LR scales from `model.param_groups`). Regression targets
are trained standardised (`TargetScale`, from the training labels) and predicted back in their units.
`evaluate` predicts `eval_windows` windows per scan, averages them (probabilities or values) and scores
each site on its own: across sites a metric is the scan-weighted mean of the sites' values, so at
evaluation only metrics and a scan count ever leave a site.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from brainjepa.distributed import RankGroup
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.downstream.data import Split, eval_windows
from brainjepa.downstream.metrics import METRICS, classification_metrics, regression_metrics
from brainjepa.downstream.model import DownstreamModel, param_groups
from brainjepa.errors import ConfigError
from brainjepa.vit import set_batch_rows


@dataclass(frozen=True)
class TargetScale:
    """Regression targets are trained as (y - center) / scale; classification uses (0, 1)."""

    center: float = 0.0
    scale: float = 1.0

    @classmethod
    def of(cls, task: TaskSpec, labels: list[np.ndarray]) -> TargetScale:
        if task.kind != "regression":
            return cls()
        y = np.concatenate(labels).astype(np.float64)
        return cls(float(y.mean()), float(y.std()) or 1.0)


def lr_at(recipe: DownstreamConfig, step: int, total: int) -> float:
    """Linear warm-up to the base LR over `warmup_fraction` of the run, then cosine to 0."""
    base = recipe.probe_lr if recipe.frozen_backbone else recipe.lr
    warmup = max(1, round(recipe.warmup_fraction * total))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def class_weights(task: TaskSpec, recipe: DownstreamConfig, labels: np.ndarray) -> torch.Tensor | None:
    """(K,) n / (K x count_k) over the training labels (`recipe.class_weight: balanced`; scikit-learn's rule,
    a class absent from them gets weight 1), or None (plain cross-entropy, the reference)."""
    if task.kind != "classification" or recipe.class_weight == "none":
        return None
    k = task.n_outputs
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k].astype(np.float64)  # (K,)
    w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1.0)), 1.0)
    return torch.tensor(w, dtype=torch.float32)


class DownstreamStep:
    def __init__(
        self,
        model: DownstreamModel,
        task: TaskSpec,
        total_steps: int,
        target: TargetScale,
        device: torch.device | str,
        labels: np.ndarray,
        group: RankGroup | None = None,
    ) -> None:
        """`labels`: (N,) the training labels this optimizer sees, for the class weights (`class_weights`).
        With a `group` (`brainjepa.distributed`), each rank trains on its rows of the global batch and the
        gradients are summed over the ranks: one process's step on the whole batch, to float rounding."""
        self.model, self.task, self.total_steps, self.target, self.group = model, task, total_steps, target, group
        self.device = torch.device(device)
        model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(model), lr=0.0)
        if group is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ConfigError(
                "a probe's BatchNorm head normalises with its batch's statistics: probe rounds train in one process"
            )
        w = class_weights(task, model.recipe, labels)
        self.weight = None if w is None else w.to(self.device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task.kind == "classification":
            if self.weight is None:
                return F.cross_entropy(out, y)  # out (B, C), y (B,)
            # per-sample weights, then the mean: the same loss per sample under DP-SGD's per-sample gradients
            return (F.cross_entropy(out, y, reduction="none") * self.weight[y]).mean()
        return F.mse_loss(out[:, 0], (y.float() - self.target.center) / self.target.scale)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One optimizer step on a batch x (B, R, T), y (B,); returns the loss (a device tensor, no sync)."""
        lr = lr_at(self.model.recipe, step, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.model.train()
        if self.group is None:
            loss = self.loss(self.model(x.to(self.device)), y.to(self.device))
            loss.backward()
        else:  # this rank's rows; stochastic depth draws the whole batch's masks and keeps its rows
            rows, share = self.group.rows(len(x)), self.group.share(len(x))
            if not share:
                raise ConfigError(f"a batch of {len(x)} cannot be split over {self.group.world} processes")
            set_batch_rows(self.model, (rows.start, rows.stop, len(x)))
            loss = self.loss(self.model(x[rows].to(self.device)), y[rows].to(self.device)) * share  # x (b, R, T)
            loss.backward()
            set_batch_rows(self.model, None)
            loss = loss.detach()
            self.group.sum_grads([p for g in self.optimizer.param_groups for p in g["params"]], extra=[loss])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def window_chunks(split: Split, n_frames: int, n_windows: int, chunk: int = 32) -> Iterator[torch.Tensor]:
    """The split's evaluation windows, `chunk` scans at a time: (n, W, R, T) each."""
    for i in range(0, len(split), chunk):
        part = Split(split.series[i : i + chunk], split.y[i : i + chunk], split.ids[i : i + chunk])
        yield eval_windows(part, n_frames, n_windows)


@torch.no_grad()
def predict(
    model: DownstreamModel,
    split: Split,
    task: TaskSpec,
    target: TargetScale,
    n_frames: int,
    n_windows: int,
    chunk: int = 32,
) -> np.ndarray:
    """(N, C) class probabilities or (N,) values for every scan, averaged over `n_windows` windows."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x in window_chunks(split, n_frames, n_windows, chunk):  # (n, W, R, T)
        n, w = x.shape[:2]
        y = model(x.reshape(n * w, *x.shape[2:]).to(device)).float().reshape(n, w, -1)  # (n, W, C)
        if task.kind == "classification":
            out.append(y.softmax(-1).mean(1).cpu().numpy())  # (n, C)
        else:
            out.append((y[..., 0].mean(1) * target.scale + target.center).cpu().numpy())  # (n,)
    return np.concatenate(out)


def split_metrics(
    model: DownstreamModel, split: Split, task: TaskSpec, target: TargetScale, n_frames: int, n_windows: int
) -> dict[str, float]:
    """This split's metrics (at the site that holds it)."""
    scores = predict(model, split, task, target, n_frames, n_windows)
    if task.kind == "classification":
        return classification_metrics(split.y, scores, task.n_outputs)
    return regression_metrics(split.y.astype(np.float64), scores.astype(np.float64))


def weighted_metrics(per_site: list[tuple[dict[str, float], int]], kind: str) -> dict[str, float]:
    """Scan-weighted mean of the sites' metrics (NaN values, e.g. a one-class site's AUROC, left out)."""
    out = {}
    for name in METRICS[kind]:
        pairs = [(m[name], n) for m, n in per_site if n > 0 and np.isfinite(m[name])]
        total = sum(n for _, n in pairs)
        out[name] = sum(v * n for v, n in pairs) / total if total else float("nan")
    out["n"] = float(sum(n for _, n in per_site))
    return out
