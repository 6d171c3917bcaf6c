"""Choosing a regularisation strength (the solved probe's C, the FC baseline's C / alpha) by k-fold
cross-validation over the training scans.

Why not the validation split: it holds ~10 % of the scans (20 on the harness's generated cohorts), so its
balanced accuracy moves in steps of several points and the choice falls wherever its noise puts it, often
at an end of the grid (the old experiment record (git history)). Cross-validation scores every candidate on every
training scan once. Folds split scans, never a scan's windows (its windows are correlated; a scan in two
folds leaks), stratified by class for classification; a scan's windows are scored by the mean of their
predictions, as `brainjepa.downstream.train.predict` does. The candidate with the best mean primary metric
over folds wins (ties: the first in grid order). `select: validation` (recipe) keeps the earlier rule, and
is what runs (with a warning) when the training scans cannot make 2 folds (a class with one scan).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from brainjepa.downstream.metrics import PRIMARY, classification_metrics, is_better, regression_metrics

log = logging.getLogger(__name__)

N_FOLDS = 5
# fit_predict(strength, x_train, y_train, x_test) -> (n_test, C) class probabilities or (n_test,) values
FitPredict = Callable[[float, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def can_cross_validate(y_scan: np.ndarray, kind: str) -> bool:
    """Whether the scans allow 2 folds: >= 2 scans of each of >= 2 classes (classification), >= 2 scans."""
    if kind != "classification":
        return len(y_scan) >= 2
    counts = np.unique(y_scan, return_counts=True)[1]
    return counts.size >= 2 and int(counts.min()) >= 2


def scan_folds(y_scan: np.ndarray, kind: str, seed: int, n_folds: int = N_FOLDS) -> list[np.ndarray]:
    """Test-fold scan indices: `n_folds` shuffled folds of the scans (stratified by class for
    classification, at most as many folds as the rarest class has scans, at least 2)."""
    n = len(y_scan)
    if kind == "classification":
        counts = np.unique(y_scan, return_counts=True)[1]
        k = min(n_folds, int(counts.min()))
        if k < 2 or counts.size < 2:
            raise ValueError(f"cross-validation needs >= 2 scans of each of >= 2 classes, got counts {counts.tolist()}")
        split = StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), y_scan)
    else:
        k = min(n_folds, n)
        if k < 2:
            raise ValueError(f"cross-validation needs >= 2 scans, got {n}")
        split = KFold(k, shuffle=True, random_state=seed).split(np.zeros(n))
    return [test for _, test in split]


def cv_scores(
    fit_predict: FitPredict,
    x: np.ndarray,
    y: np.ndarray,
    scan: np.ndarray,
    kind: str,
    grid: Sequence[float],
    seed: int,
    n_classes: int = 0,
) -> np.ndarray:
    """(len(grid),) the mean over folds of the primary metric of each strength.

    x (M, F) rows (a scan's windows, or one row per scan), y (M,) their labels, scan (M,) each row's scan
    index 0..N-1 (a scan's rows share its label)."""
    n_scans = int(scan.max()) + 1
    y_scan = np.zeros(n_scans, dtype=y.dtype)
    y_scan[scan] = y
    out: list[list[float]] = [[] for _ in grid]
    for test_scans in scan_folds(y_scan, kind, seed):
        test = np.isin(scan, test_scans)
        # the test rows' scans renumbered 0..n-1, so that a scan's rows are averaged into one prediction
        ids, rows = np.unique(scan[test], return_inverse=True)
        counts = np.bincount(rows).astype(np.float64)
        for i, strength in enumerate(grid):
            pred = fit_predict(strength, x[~test], y[~test], x[test])  # (m,) or (m, C)
            mean = np.zeros((ids.size, *pred.shape[1:]))
            np.add.at(mean, rows, pred)
            mean /= counts.reshape(-1, *([1] * (pred.ndim - 1)))
            if kind == "classification":
                out[i].append(classification_metrics(y_scan[ids], mean, n_classes)[PRIMARY[kind]])
            else:
                out[i].append(regression_metrics(y_scan[ids].astype(np.float64), mean)[PRIMARY[kind]])
    return np.array([np.nanmean(s) if np.isfinite(s).any() else np.nan for s in out])


def best_index(scores: np.ndarray, kind: str, grid: Sequence[float], what: str) -> int:
    """The index of the best score (ties: the first); a warning when it is an end of the grid."""
    best = 0
    for i in range(1, len(scores)):
        if is_better(kind, float(scores[i]), float(scores[best])):
            best = i
    if len(grid) > 2 and best in (0, len(grid) - 1):
        log.warning(
            "%s: the chosen strength %g is an end of the grid %s; the best may lie beyond it",
            what,
            grid[best],
            [f"{g:g}" for g in grid],
        )
    return best
