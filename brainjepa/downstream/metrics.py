"""Downstream metrics (scikit-learn / numpy), model selection on the primary metric, and seed summaries.

Classification: accuracy, balanced accuracy, F1 (binary: of class 1; multi-class: macro over the classes
in y_true or the predictions, sklearn's default) and AUROC (binary: on the class-1 probability;
multi-class: one-vs-rest macro). AUROC is NaN, without an exception, when y_true holds a single class; in
a multi-class task it averages the one-vs-rest AUROCs of the classes present in y_true (equal to
sklearn's `multi_class="ovr"` macro when all are present). Regression: MSE, MAE, Pearson r (NaN when
either side is constant) and R^2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# The metrics of each task kind, the primary one (model selection on validation) first.
METRICS: dict[str, list[str]] = {
    "classification": ["balanced_acc", "acc", "f1", "auroc"],
    "regression": ["mse", "mae", "pearson_r", "r2"],
}
PRIMARY: dict[str, str] = {kind: names[0] for kind, names in METRICS.items()}
HIGHER_IS_BETTER: dict[str, bool] = {
    "acc": True,
    "balanced_acc": True,
    "f1": True,
    "auroc": True,
    "mse": False,
    "mae": False,
    "pearson_r": True,
    "r2": True,
}


def _finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(a)))} NaN/inf values (of {a.size})")


def _labels(y_true: Any, n: int | None, n_classes: int) -> np.ndarray:
    """(N,) int class indices in [0, n_classes), or a ValueError naming what came."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D class indices (N,), got shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"y_true has {y.shape[0]} entries but scores has {n} rows")
    if y.dtype.kind == "f":
        _finite("y_true", y)
        if not np.all(y == np.round(y)):
            raise ValueError("y_true must be integer class indices, got non-integer floats")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"y_true must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true holds class indices {y.min()}..{y.max()}, outside 0..{n_classes - 1}")
    return y


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, n_classes: int) -> dict[str, float]:
    """Metrics of class probabilities scores (N, C) against class indices y_true (N,); C = n_classes.

    Predictions are the argmax of scores. Keys: acc, balanced_acc, f1, auroc (see the module docstring).
    """
    from sklearn import metrics as skm  # here: sklearn costs ~1.4 s in every Flower site process that trains

    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, C) class probabilities, got shape {s.shape}")
    if s.shape[1] != n_classes:
        raise ValueError(f"scores has {s.shape[1]} columns but n_classes is {n_classes}")
    if s.shape[0] == 0:
        raise ValueError("scores has no rows (N = 0)")
    _finite("scores", s)
    y = _labels(y_true, s.shape[0], n_classes)
    pred = s.argmax(axis=1)  # (N,)
    present = np.unique(y)
    if present.size < 2:
        auroc = math.nan
    elif n_classes == 2:
        auroc = float(skm.roc_auc_score(y, s[:, 1]))
    else:  # one-vs-rest macro over the classes present in y_true
        auroc = float(np.mean([skm.roc_auc_score(y == c, s[:, c]) for c in present]))
    if n_classes == 2:
        f1 = skm.f1_score(y, pred, pos_label=1, average="binary", zero_division=0)
    else:
        f1 = skm.f1_score(y, pred, average="macro", zero_division=0)
    with warnings.catch_warnings():  # balanced accuracy averages the recall of the classes in y_true
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(skm.balanced_accuracy_score(y, pred))
    return {"acc": float(skm.accuracy_score(y, pred)), "balanced_acc": balanced, "f1": float(f1), "auroc": auroc}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """mse, mae, pearson_r (NaN when either side is constant or N < 2) and r2 of y_pred (N,) vs y_true (N,)."""
    from sklearn import metrics as skm  # here: sklearn costs ~1.4 s in every Flower site process that trains

    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D (N,), got shapes {t.shape} and {p.shape}")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} entries but y_pred has {p.shape[0]}")
    if t.size == 0:
        raise ValueError("y_true is empty (N = 0)")
    _finite("y_true", t)
    _finite("y_pred", p)
    constant = t.size < 2 or np.ptp(t) == 0 or np.ptp(p) == 0
    r = math.nan if constant else float(np.corrcoef(t, p)[0, 1])
    r2 = float(skm.r2_score(t, p)) if t.size > 1 else math.nan
    return {
        "mse": float(skm.mean_squared_error(t, p)),
        "mae": float(skm.mean_absolute_error(t, p)),
        "pearson_r": r,
        "r2": r2,
    }


def higher_is_better(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric '{metric}', expected one of {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def is_better(kind: str, new: float, old: float | None) -> bool:
    """Whether the primary metric value new beats old (None or NaN: anything finite beats it); ties: no."""
    if kind not in PRIMARY:
        raise ValueError(f"unknown task kind '{kind}', expected one of {sorted(PRIMARY)}")
    if new is None or math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if higher_is_better(PRIMARY[kind]) else new < old


def _value(v: Any) -> float:
    """A metric cell as a float; None and "" (absent) read as NaN."""
    return math.nan if v is None or v == "" else float(v)


def summarize(rows: Iterable[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Group rows by the keys `by` (first-seen order) and give, per metric m, `m_mean`, `m_std` (ddof=1
    when n > 1, else 0) and `m_n`, over the rows' finite values (absent or NaN cells are not counted;
    mean and std are NaN when none is left)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in by if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks the grouping keys {missing}: {sorted(row)}")
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        summary: dict[str, Any] = dict(zip(by, key, strict=True))
        for m in metrics:
            v = np.array([_value(r.get(m)) for r in members], dtype=np.float64)
            v = v[np.isfinite(v)]
            summary[f"{m}_mean"] = float(v.mean()) if v.size else math.nan
            summary[f"{m}_std"] = float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else math.nan)
            summary[f"{m}_n"] = int(v.size)
        out.append(summary)
    return out
