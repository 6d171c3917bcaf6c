"""Metrics of subjects weighted by how often a resample draws them: the bootstrap's vectorised metrics.

A resample of n subjects is a row of draw counts w (B, n); every metric is a weighted sum over subjects,
so B resamples x S seeds are scored with a few matrix products instead of B x S scikit-learn calls. Each
equals `brainjepa.downstream.metrics` on the drawn subjects (tests/test_intervals.py checks them to 1e-9):
balanced accuracy, accuracy, F1, AUROC (Mann-Whitney form, ties 1/2; multi-class: one-vs-rest macro over
the classes present), MSE, MAE, R² and Pearson r.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray], np.ndarray]  # subject counts (B, n) -> metric (B, S)


def _wsum(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Weighted subject sums: counts w (B, n) and per-subject values a (S, n, K) -> (B, S, K)."""
    s, n, k = a.shape
    return (w @ a.transpose(1, 0, 2).reshape(n, s * k)).reshape(w.shape[0], s, k)


def _mean_present(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean over the last axis of values (B, S, K) where present (B, S, K) or (B, 1, K); NaN if none."""
    present = np.broadcast_to(present, values.shape)
    k = present.sum(axis=-1)
    total = np.where(present, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, total / k, np.nan)


def _auroc_fn(y: np.ndarray, s: np.ndarray) -> MetricFn:
    """AUROC (binary: of column 1; else one-vs-rest macro over the classes present), Mann-Whitney form."""
    n_seeds, n, n_classes = s.shape
    classes = [1] if n_classes == 2 else list(range(n_classes))
    ar = np.arange(n)
    prepared = []
    for c in classes:
        order = np.argsort(s[:, :, c], axis=1, kind="stable")  # (S, n)
        v = np.take_along_axis(s[:, :, c], order, axis=1)
        first = np.ones((n_seeds, n), dtype=bool)
        first[:, 1:] = v[:, 1:] != v[:, :-1]
        last = np.ones((n_seeds, n), dtype=bool)
        last[:, :-1] = first[:, 1:]
        start = np.maximum.accumulate(np.where(first, ar, 0), axis=1)  # first sorted index of the tie block
        end = np.minimum.accumulate(np.where(last, ar, n)[:, ::-1], axis=1)[:, ::-1] + 1  # one past its last
        pos = y[order] == c  # (S, n) the class-c subjects in sorted order
        prepared.append((order, start[None], end[None], pos, (y == c).astype(np.float64)))

    def fn(w: np.ndarray) -> np.ndarray:
        aucs, present = [], []
        total = w.sum(axis=1)  # (B,)
        for order, start, end, pos, onehot in prepared:
            ws = w[:, order]  # (B, S, n) counts in each seed's score order
            cum = np.zeros(ws.shape[:2] + (n + 1,))
            np.cumsum(np.where(pos, 0.0, ws), axis=2, out=cum[:, :, 1:])  # negatives up to each position
            below = np.take_along_axis(cum, np.broadcast_to(start, ws.shape), axis=2)
            tied = np.take_along_axis(cum, np.broadcast_to(end, ws.shape), axis=2) - below
            wins = np.where(pos, ws * (below + 0.5 * tied), 0.0).sum(axis=2)  # (B, S) pairs ranked right
            n_pos = w @ onehot  # (B,)
            n_neg = total - n_pos
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs.append(wins / (n_pos * n_neg)[:, None])
            present.append(n_pos > 0)
            if n_classes == 2:  # a single pass, on class 1: defined when both classes are drawn
                return np.where(((n_pos > 0) & (n_neg > 0))[:, None], aucs[0], np.nan)
        pres = np.stack(present, axis=1)[:, None, :]  # (B, 1, C) classes in the resample
        out = _mean_present(np.stack(aucs, axis=2), pres)
        return np.where(pres.sum(axis=2) >= 2, out, np.nan)

    return fn


def _classification_fn(metric: str, y: np.ndarray, s: np.ndarray) -> MetricFn:
    if metric == "auroc":
        return _auroc_fn(y, s)
    n_classes = s.shape[2]
    eye = np.eye(n_classes)
    pred = s.argmax(axis=2)  # (S, n)
    correct = (pred == y).astype(np.float64)  # (S, n)
    if metric == "acc":
        return lambda w: (w @ correct.T) / w.sum(axis=1, keepdims=True)
    true_1h = eye[y][None]  # (1, n, C)
    hits = correct[:, :, None] * true_1h  # (S, n, C) true positives per class
    if metric == "balanced_acc":

        def balanced(w: np.ndarray) -> np.ndarray:
            n_true = _wsum(w, true_1h)  # (B, 1, C)
            with np.errstate(invalid="ignore", divide="ignore"):
                recall = _wsum(w, hits) / n_true
            return _mean_present(recall, n_true > 0)

        return balanced
    pred_1h = eye[pred]  # (S, n, C)

    def f1(w: np.ndarray) -> np.ndarray:
        n_true, n_pred = _wsum(w, true_1h), _wsum(w, pred_1h)
        denom = n_true + n_pred  # (B, S, C) = 2 tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(denom > 0, 2.0 * _wsum(w, hits) / denom, 0.0)
        if n_classes == 2:
            return per_class[:, :, 1]
        return _mean_present(per_class, denom > 0)

    return f1


def _spread(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max - min of v (..., n) over the subjects drawn (w (B, n) > 0): (B, ...)."""
    drawn = (w > 0) if v.ndim == 1 else (w > 0)[:, None, :]
    return np.where(drawn, v, -np.inf).max(axis=-1) - np.where(drawn, v, np.inf).min(axis=-1)


def _regression_fn(metric: str, y: np.ndarray, p: np.ndarray) -> MetricFn:
    err = p - y  # (S, n)
    if metric == "mse":
        sq = (err**2).T
        return lambda w: (w @ sq) / w.sum(axis=1, keepdims=True)
    if metric == "mae":
        ab = np.abs(err).T
        return lambda w: (w @ ab) / w.sum(axis=1, keepdims=True)

    def centred(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = w.sum(axis=1, keepdims=True)  # (B, 1)
        dy = y - (w @ y)[:, None] / n  # (B, n)
        return dy, (w * dy**2).sum(axis=1)  # (B, n), (B,)

    if metric == "r2":
        sq = (err**2).T

        def r2(w: np.ndarray) -> np.ndarray:
            sse = w @ sq  # (B, S)
            _, sst = centred(w)
            const = (_spread(w, y) == 0)[:, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(const, 0.0, 1.0 - sse / sst[:, None])
            return np.where(sse == 0, 1.0, out)  # scikit-learn's r2_score when a sum is 0

        return r2

    def pearson(w: np.ndarray) -> np.ndarray:
        dy, syy = centred(w)
        n = w.sum(axis=1, keepdims=True)
        dp = p[None] - ((w @ p.T) / n)[:, :, None]  # (B, S, n)
        wy = (w * dy)[:, None, :]
        sxy = (wy * dp).sum(axis=2)
        spp = (w[:, None, :] * dp**2).sum(axis=2)
        const = (_spread(w, y) == 0)[:, None] | (_spread(w, p) == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.clip(sxy / np.sqrt(syy[:, None] * spp), -1.0, 1.0)
        return np.where(const, np.nan, r)

    return pearson


def metric_fn(kind: str, metric: str, y: np.ndarray, scores: np.ndarray) -> MetricFn:
    """The metric of scores (S, n, C) / (S, n) against y (n,) as a function of subject counts (B, n)."""
    if kind == "classification":
        return _classification_fn(metric, y, scores)
    return _regression_fn(metric, y, scores)


def counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Index rows (B, k) into n subjects -> how often each subject is drawn (B, n), as floats."""
    b = idx.shape[0]
    flat = (idx + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
