"""Functional-connectivity baselines, held to the same splits as the neural methods.

Features: the Fisher-z transformed upper triangle of each subject's ROI-by-ROI Pearson correlation matrix.
Model: StandardScaler (+ optional PCA) then LogisticRegression (classification) or Ridge (regression), a
scikit-learn Pipeline. Missing ROIs (NaN rows, `sites.missing`): a scan's pairs with a missing ROI are NaN
features, imputed by the training split's mean of that pair over the scans holding both ROIs (pairwise-
complete FC, scikit-learn's SimpleImputer as the pipeline's first step). The regularisation strength is
chosen by 5-fold cross-validation over the training split (`select="cv"`, the default,
`brainjepa.downstream.selection`) or on the validation split (`select="validation"`), by the primary metric
(balanced accuracy / MSE); the chosen one is refitted on the training split, and the test split is never
seen here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from brainjepa.downstream.metrics import PRIMARY, classification_metrics, regression_metrics
from brainjepa.downstream.selection import best_index, can_cross_validate, cv_scores

log = logging.getLogger(__name__)

Z_CLIP = 0.999999  # |r| clip before arctanh, so that r = +-1 gives a finite z
# Candidate C (LogisticRegression, inverse strength) and alpha (Ridge, strength) per task kind.
FC_GRID: dict[str, tuple[float, ...]] = {
    "classification": tuple(np.logspace(-4, 3, 8).tolist()),
    "regression": tuple(np.logspace(-2, 5, 8).tolist()),
}
PCA_MAX = 64


def fc_features(series: Sequence[np.ndarray]) -> np.ndarray:
    """(N, R*(R-1)/2) float64: per subject, arctanh(clip(r, +-Z_CLIP)) of the upper triangle (k=1, row
    major) of the Pearson correlation matrix of its (R, L_i) ROI series; L_i may differ across subjects.
    A missing ROI (a NaN row) makes its pairs NaN (the pipeline imputes them pairwise-complete)."""
    if len(series) == 0:
        raise ValueError("fc_features got no subjects")
    n_rois = np.asarray(series[0]).shape[0] if np.ndim(series[0]) == 2 else None
    if n_rois is None or n_rois < 2:
        raise ValueError(f"subject 0: expected an (R, L) series with R >= 2, got shape {np.shape(series[0])}")
    iu = np.triu_indices(n_rois, k=1)
    out = np.empty((len(series), iu[0].size), dtype=np.float64)  # (N, R*(R-1)/2)
    for i, s in enumerate(series):
        x = np.asarray(s, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != n_rois or x.shape[1] < 2:
            raise ValueError(f"subject {i}: expected an ({n_rois}, L >= 2) series like subject 0, got {x.shape}")
        present = np.isfinite(x).all(axis=1)  # (R,)
        if not (present | ~np.isfinite(x).any(axis=1)).all():
            raise ValueError(f"subject {i}: the series holds NaN/inf values (only a whole missing ROI may be NaN)")
        xc = x - x.mean(axis=1, keepdims=True)  # (R, L)
        norm = np.linalg.norm(xc, axis=1)  # (R,)
        if np.any(norm[present] == 0):
            raise ValueError(f"subject {i}: ROIs {np.flatnonzero(present & (norm == 0)).tolist()} are constant "
                             "(no correlation is defined)")  # fmt: skip
        xc /= norm[:, None]
        r = (xc @ xc.T)[iu]  # (R*(R-1)/2,)
        out[i] = np.arctanh(np.clip(r, -Z_CLIP, Z_CLIP))
    return out


def make_fc_pipeline(kind: str, strength: float, seed: int, n_components: int | None = None) -> Pipeline:
    """StandardScaler (+ PCA to n_components) + LogisticRegression(C=strength) or Ridge(alpha=strength)."""
    steps: list[tuple[str, object]] = [("impute", SimpleImputer(strategy="mean", keep_empty_features=True)),
                                       ("scale", StandardScaler())]  # fmt: skip
    if n_components is not None:
        steps.append(("pca", PCA(n_components=n_components, random_state=seed)))
    if kind == "classification":
        steps.append(("model", LogisticRegression(C=strength, max_iter=5000, random_state=seed, class_weight="balanced")))
    elif kind == "regression":
        steps.append(("model", Ridge(alpha=strength, random_state=seed)))
    else:
        raise ValueError(f"unknown task kind '{kind}', expected classification or regression")
    return Pipeline(steps)


def _check_xy(name: str, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: expected X (N, F) and y (N,), got shapes {X.shape} and {y.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: no subjects")
    if np.isinf(X).any() or not np.all(np.isfinite(y.astype(np.float64))):
        raise ValueError(f"{name}: X holds inf values or y NaN/inf values (NaN features = missing ROIs' pairs)")
    return X, y


def fit_fc_baseline(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                    kind: str, seed: int, *, pca: bool = False,
                    grid: Sequence[float] | None = None, select: str = "cv") -> Pipeline:  # fmt: skip
    """The pipeline with the best strength of grid (default FC_GRID[kind]) fitted on the training split.
    select="cv": each strength scored by 5-fold cross-validation over the training subjects; "validation":
    each fitted on the training split and scored on the validation split's primary metric (ties: the
    first in grid order).

    X_* (N, F) features (e.g. `fc_features`); y_* (N,) class indices or targets. pca: reduce to
    min(PCA_MAX, n_train - 1, F) components after scaling.
    """
    X_train, y_train = _check_xy("training split", X_train, y_train)
    X_val, y_val = _check_xy("validation split", X_val, y_val)
    if X_train.shape[1] != X_val.shape[1]:
        raise ValueError(f"training split has {X_train.shape[1]} features, validation split {X_val.shape[1]}")
    grid = FC_GRID.get(kind, ()) if grid is None else tuple(grid)
    if kind not in FC_GRID or not grid:
        raise ValueError(f"kind must be classification or regression with a non-empty grid, got '{kind}'")
    n_classes = 0
    if kind == "classification":
        y_train, y_val = y_train.astype(np.int64), y_val.astype(np.int64)
        if np.unique(y_train).size < 2:
            raise ValueError(f"training split holds a single class ({np.unique(y_train).tolist()})")
        n_classes = int(max(y_train.max(), y_val.max())) + 1
    n_components = min(PCA_MAX, X_train.shape[0] - 1, X_train.shape[1]) if pca else None
    if select == "cv" and not can_cross_validate(y_train, kind):
        log.warning("FC baseline %s: the training subjects cannot make 2 folds (a class with one subject): "
                    "strength chosen on validation", kind)  # fmt: skip
        select = "validation"
    if select == "cv":
        def fit_predict(strength: float, x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray) -> np.ndarray:
            est = make_fc_pipeline(kind, strength, seed, n_components).fit(x_fit, y_fit)
            return predict_scores(est, x_test, kind, n_classes)

        scores = cv_scores(fit_predict, X_train, y_train, np.arange(len(y_train)), kind, grid, seed, n_classes)
        chosen = best_index(scores, kind, grid, f"FC baseline {kind}")
        best = make_fc_pipeline(kind, grid[chosen], seed, n_components).fit(X_train, y_train)
        log.info("FC baseline %s: strength %.3g chosen by %d-subject cross-validation (%s = %.4f)",
                 kind, grid[chosen], len(y_train), PRIMARY[kind], scores[chosen])  # fmt: skip
        return best
    if select != "validation":
        raise ValueError(f"select must be 'cv' or 'validation', got '{select}'")
    fitted, scores = [], []
    for strength in grid:
        est = make_fc_pipeline(kind, strength, seed, n_components).fit(X_train, y_train)
        out = predict_scores(est, X_val, kind, n_classes)
        if kind == "classification":
            score = classification_metrics(y_val, out, n_classes)[PRIMARY[kind]]
        else:
            score = regression_metrics(y_val, out)[PRIMARY[kind]]
        log.debug("FC baseline %s, strength %.3g: validation %s = %.4f", kind, strength, PRIMARY[kind], score)
        fitted.append(est)
        scores.append(score)
    chosen = best_index(np.array(scores), kind, grid, f"FC baseline {kind}")
    log.info("FC baseline %s: strength %.3g chosen on validation (%s = %.4f)",
             kind, grid[chosen], PRIMARY[kind], scores[chosen])  # fmt: skip
    return fitted[chosen]


def regularisation_strength(est: Pipeline) -> float:
    """The C (LogisticRegression) or alpha (Ridge) of a fitted FC pipeline."""
    model = est.named_steps["model"]
    return float(model.C if isinstance(model, LogisticRegression) else model.alpha)


def predict_scores(est: Pipeline, X: np.ndarray, kind: str, n_classes: int = 0) -> np.ndarray:
    """Classification: (N, n_classes) probabilities, columns = classes 0..n_classes-1 (a class absent from
    the training labels gets a column of zeros). Regression: (N,) predictions."""
    X = np.asarray(X, dtype=np.float64)
    if kind == "regression":
        return est.predict(X)
    if kind != "classification":
        raise ValueError(f"unknown task kind '{kind}', expected classification or regression")
    classes = np.asarray(est.classes_).astype(np.int64)
    if n_classes < 2 or classes.max() >= n_classes:
        raise ValueError(f"n_classes is {n_classes} but the model was trained on classes {classes.tolist()}")
    proba = est.predict_proba(X)  # (N, len(classes))
    out = np.zeros((X.shape[0], n_classes), dtype=np.float64)
    out[:, classes] = proba
    return out
