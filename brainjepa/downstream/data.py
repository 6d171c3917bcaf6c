"""A site's labelled scans for one task: train / val / test splits, scaled, with labels.

Scans come from the site's YAML through `sites.cohort.load_site_series` (resampled to the model TR,
scans shorter than the window handled per `data.on_short`); the label is the task's participants
column. Classification keeps only the task's `classes` (the class filter) and numbers them in that
order, so every site agrees on what class 1 is; regression keeps finite values. Rows without a usable
label are dropped and counted. Scaling: the site's own robust statistics from its training split (the
same recipe as pretraining, `sites.scaling`), applied to all three splits; the statistics never leave;
the scaled training split's typical spread is logged (a warning naming the site when far from 1).
A site that only tests (`training=False`) is scaled as the protocol says (`test_site_scaling`): with given
statistics (`scaling_stats`, e.g. those of the fine-tuning sites' training scans, `training_scaling`), or
with its own scans' (its training split if it has one, else all its scans: label-free, but fitted to the
data it is scored on).
Missing ROIs (`preprocess.missing_rois: mask`) stay NaN rows: the model fills them and pools without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from brainjepa.downstream.config import TaskSpec
from brainjepa.errors import DataError, where
from sites.cohort import SPLITS, load_site_series
from sites.config import SiteConfig
from sites.layout import read_site_participants
from sites.scaling import CenteredScaling, PerScanScaling, RobustScaling, check_spread, fit_method
from sites.windows import PackedSeries, multi_windows, pack, random_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    series: list[np.ndarray]  # N x (R, L_i) float32, scaled
    y: np.ndarray  # (N,) int64 class index | float32 target
    ids: list[str]

    def __len__(self) -> int:
        return len(self.series)

    def packed(self) -> PackedSeries:
        return pack(self.series, self.ids)


@dataclass(frozen=True)
class LabelledSite:
    site: str
    task: TaskSpec
    splits: dict[str, Split]  # train / val / test
    scaling: RobustScaling | PerScanScaling | CenteredScaling | None
    dropped: int  # rows without a usable label (missing, or a class the task does not keep)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def val(self) -> Split:
        return self.splits["val"]

    @property
    def test(self) -> Split:
        return self.splits["test"]


def encode_labels(values: np.ndarray, task: TaskSpec) -> np.ndarray:
    """(N,) raw column values -> (N,) labels; -1 (classification) or NaN (regression) where unusable."""
    if task.kind == "regression":
        try:
            y = np.asarray(values, dtype=np.float64)
        except ValueError as e:
            raise DataError(
                f"task '{task.name}': column '{task.column}' is not numeric, a regression needs numbers ({e})"
            ) from e
        return np.where(np.isfinite(y), y, np.nan)
    index = {c: i for i, c in enumerate(task.classes)}
    return np.array([index.get(_as_text(v), -1) for v in values], dtype=np.int64)


def _as_text(v: object) -> str:
    """A participants value as a class name: 1.0 -> '1', 'F' -> 'F', NaN / '' -> ''."""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):g}"
    return str(v).strip()


def training_scaling(
    sites: list[SiteConfig], model_tr: float, n_frames: int, scaling: str
) -> RobustScaling | PerScanScaling | CenteredScaling | None:
    """Scaling statistics fitted on the pooled training scans of `sites` (for a site that only tests)."""
    series = [x for s in sites for x in load_site_series(s, model_tr, split="train", min_frames=n_frames).series]
    return fit_method(series, scaling, "training sites " + "+".join(s.site for s in sites))


def load_labelled_site(
    site: SiteConfig,
    task: TaskSpec,
    model_tr: float,
    n_frames: int,
    scaling: str = "robust",
    training: bool = True,
    scaling_stats: RobustScaling | PerScanScaling | CenteredScaling | None | str = "own",
    splits: tuple[str, ...] = SPLITS,
) -> LabelledSite:
    """`training`: whether the site trains (fine-tuning, probes, FC). `scaling_stats`: "own" fits the
    scaling on the site's training split (a site with none: on all of its scans, label-free); a fitted
    scaling (or None: unscaled) is applied as given, only to a site that does not train. `splits`: the
    splits read (the others' files are never opened; their `Split`s are empty)."""
    if training and not isinstance(scaling_stats, str):
        raise ValueError(f"site {site.site}: a training site is scaled by its own training scans, not given statistics")
    series = load_site_series(site, model_tr, split=None if set(splits) == set(SPLITS) else splits, min_frames=n_frames)
    parts = read_site_participants(site, (task.column,))  # participants.runs: one row per run
    by_id = dict(zip(parts.ids, parts.column(task.column), strict=True))
    y_all = encode_labels(np.array([by_id[s] for s in series.subject_ids], dtype=object), task)
    usable = y_all >= 0 if task.kind == "classification" else np.isfinite(y_all)
    train_idx = np.flatnonzero(series.splits == "train")
    test_only = len(train_idx) == 0
    if test_only and training:
        raise DataError(
            f"{where(site.source)}: 'split' puts no scan in the training split, but the site trains "
            f"(task '{task.name}'); a test-only site can only be tested on"
        )
    if test_only and isinstance(scaling_stats, str):
        log.info(
            "site %s: no training scans (test only): scaling statistics from all %d of its scans",
            site.site,
            len(series.series),
        )
        train_idx = np.arange(len(series.series))
    if isinstance(scaling_stats, str):
        fitted = fit_method([series.series[i] for i in train_idx], scaling, str(site.source))
    else:
        fitted = scaling_stats
    parts_of: dict[str, Split] = {}
    for name in SPLITS:
        idx = np.flatnonzero((series.splits == name) & usable)
        xs = [series.series[i] for i in idx]
        xs = fitted.apply_all(xs) if fitted is not None else xs
        y = y_all[idx].astype(np.int64 if task.kind == "classification" else np.float32)
        parts_of[name] = Split(xs, y, [series.subject_ids[i] for i in idx])
    dropped = int((~usable).sum())
    if dropped:
        log.info(
            "site %s, task %s: %d scan(s) without a usable '%s' value left out",
            site.site,
            task.name,
            dropped,
            task.column,
        )
    if not test_only and len(parts_of["train"]) == 0:
        raise DataError(
            f"{where(site.source)}: no training scan has a usable '{task.column}' value for task "
            f"'{task.name}' (classes {list(task.classes)})"
        )
    seen = parts_of["test" if test_only else "train"].series
    check_spread(seen, str(site.source), scaling)  # what the model sees: logged, far from 1 warned
    return LabelledSite(site.site, task, parts_of, fitted, dropped)


class TrainBatches:
    """Deterministic training batches: batch `i` is a pure function of (seed, i), like pretraining's."""

    def __init__(self, split: Split, n_frames: int, batch_size: int, seed: int) -> None:
        self.packed, self.y = split.packed(), split.y
        self.n_frames, self.seed = n_frames, seed
        self.batch_size = min(batch_size, len(split))
        self.per_epoch = max(1, len(split) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(index, self.per_epoch)
        order = np.random.default_rng([self.seed, 3, epoch]).permutation(len(self.y))
        idx = order[pos * self.batch_size : (pos + 1) * self.batch_size]  # (B,)
        x, _ = random_windows(self.packed, idx, self.n_frames, np.random.default_rng([self.seed, 4, index]))
        return torch.from_numpy(x), torch.from_numpy(self.y[idx])  # (B, R, T), (B,)


def eval_windows(split: Split, n_frames: int, n_windows: int) -> torch.Tensor:
    """(N, W, R, T): `n_windows` evenly spaced windows per scan (predictions are averaged over W)."""
    return torch.from_numpy(multi_windows(split.packed(), n_frames, n_windows))
