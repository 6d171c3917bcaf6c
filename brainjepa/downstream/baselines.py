"""Non-neural baselines, held to the same splits as the neural methods.

Each is per-scan features (`brainjepa.downstream.features`) then a scikit-learn Pipeline: SimpleImputer
(mean) + StandardScaler (+ optional PCA) + LogisticRegression(class_weight="balanced") (classification) or
Ridge (regression):

- `roi_spectrum`: per-ROI log band power (Welch) in each `BaselineConfig.bands` band: amplitude and
  spectrum, ROI by ROI, no interaction between ROIs.
- `fc`: Fisher-z correlations of the series cleaned by nilearn (detrend + band-pass, `BaselineConfig`).
- `fc_raw`: Fisher-z correlations of the series as given (the earlier FC baseline; older tables' "fc").
- `fc_tangent`: nilearn's tangent-space connectivity of the cleaned series. Its reference (the geometric
  mean of covariances) is fitted on the training scans only; validation and test scans are only
  transformed. Inside cross-validation it is refitted on each fold's training part, so that a held-out
  fold never shapes the reference that whitens it (the honest choice; the fits are cached per fold).

Missing ROIs (NaN rows, `sites.missing`): roi_spectrum's and fc's features of a missing ROI are NaN and
imputed by the mean over the training scans holding them (pairwise-complete FC; the imputer is the
pipeline's first step, so it is refitted inside each fold). A scan with a missing ROI cannot enter the
tangent space: fc_tangent raises a DataError naming it.

Strength (C / alpha, grid `FC_GRID` or `BaselineConfig.c_grid` / `alpha_grid`): chosen by 5-fold
cross-validation over the training scans (`select="cv"`, the default, `brainjepa.downstream.selection`)
or on the validation split (`select="validation"`, and the fallback when the training labels cannot make
2 folds), by the primary metric (balanced accuracy / MSE); the chosen one is refitted on all training
scans. Under cv the validation scans are not used; the test split is never seen here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from nilearn.connectome import ConnectivityMeasure
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from brainjepa.downstream.config import BASELINES, BaselineConfig
from brainjepa.downstream.features import (
    Z_CLIP,
    check_series,
    clean_series,
    fc_features,
    fit_tangent,
    require_complete,
    roi_spectrum_features,
    tangent_features,
)
from brainjepa.downstream.metrics import PRIMARY, classification_metrics, regression_metrics
from brainjepa.downstream.selection import best_index, can_cross_validate, cv_scores
from brainjepa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "FC_GRID",
    "Z_CLIP",
    "FittedBaseline",
    "fc_features",
    "fit_baseline",
    "fit_fc_baseline",
    "make_fc_pipeline",
    "predict_scores",
    "regularisation_strength",
]

# Candidate C (LogisticRegression, inverse strength) and alpha (Ridge, strength) per task kind.
FC_GRID: dict[str, tuple[float, ...]] = {
    "classification": tuple(np.logspace(-5, 4, 10).tolist()),
    "regression": tuple(np.logspace(-3, 6, 10).tolist()),
}
PCA_MAX = 64
# rows(fit_idx, test_idx) -> (X_fit, X_test): features of scans by index, any fitted part fitted on fit_idx
Rows = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def make_fc_pipeline(kind: str, strength: float, seed: int, n_components: int | None = None) -> Pipeline:
    """SimpleImputer + StandardScaler (+ PCA to n_components) + LogisticRegression(C=strength) or
    Ridge(alpha=strength)."""
    steps: list[tuple[str, object]] = [
        ("impute", SimpleImputer(strategy="mean", keep_empty_features=True)),
        ("scale", StandardScaler()),
    ]
    if n_components is not None:
        steps.append(("pca", PCA(n_components=n_components, random_state=seed)))
    if kind == "classification":
        steps.append(
            ("model", LogisticRegression(C=strength, max_iter=5000, random_state=seed, class_weight="balanced"))
        )
    elif kind == "regression":
        steps.append(("model", Ridge(alpha=strength, random_state=seed)))
    else:
        raise ValueError(f"unknown task kind '{kind}', expected classification or regression")
    return Pipeline(steps)


def regularisation_strength(est: Pipeline) -> float:
    """The C (LogisticRegression) or alpha (Ridge) of a fitted pipeline."""
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


@dataclass(frozen=True)
class FittedBaseline:
    """A baseline fitted on training scans; `predict_scores` reads new (R, L_i) series the same way."""

    name: str
    kind: str
    estimator: Pipeline
    tr: float
    config: BaselineConfig
    n_rois: int
    n_classes: int  # classification: 1 + the largest training / validation label; regression: 0
    grid: tuple[float, ...]  # the candidate strengths
    scores: tuple[float, ...]  # each one's primary metric: mean over CV folds, or on validation
    tangent: ConnectivityMeasure | None = field(default=None, repr=False)  # fc_tangent: training reference

    @property
    def strength(self) -> float:
        """The chosen C (LogisticRegression) or alpha (Ridge)."""
        return regularisation_strength(self.estimator)

    def features(self, series: Sequence[np.ndarray], what: str = "scan") -> np.ndarray:
        """(N, F) features of series, the way the training scans were read (nothing is refitted)."""
        for i, s in enumerate(series):
            if np.ndim(s) != 2 or np.shape(s)[0] != self.n_rois:
                raise DataError(
                    f"{what} {i}: expected an ({self.n_rois}, L) series like the training scans, "
                    f"got shape {np.shape(s)}"
                )
        if self.tangent is not None:
            require_complete(series, what)
            return tangent_features(self.tangent, clean_series(series, self.tr, self.config, what), what)
        return _series_features(self.name, series, self.tr, self.config, what)

    def predict_scores(self, series: Sequence[np.ndarray], n_classes: int | None = None) -> np.ndarray:
        """Classification: (N, C) probabilities, C = n_classes (default: the training's); regression: (N,)."""
        if len(series) == 0:
            raise DataError(f"baseline {self.name}: no scans to predict")
        n = self.n_classes if n_classes is None else n_classes
        return predict_scores(self.estimator, self.features(series), self.kind, n)


def _series_features(
    name: str, series: Sequence[np.ndarray], tr: float, config: BaselineConfig, what: str
) -> np.ndarray:
    """(N, F) features of the baselines without a fitted part (not fc_tangent)."""
    if name == "roi_spectrum":
        return roi_spectrum_features(series, tr, config, what)
    if name == "fc":
        return fc_features(clean_series(series, tr, config, what), what)
    if name == "fc_raw":
        return fc_features(series, what)
    raise ConfigError(f"baseline '{name}' has no fixed feature map; expected one of {list(BASELINES)}")


class _TangentRows:
    """Tangent features of pooled cleaned scans: the reference fitted on the fit scans only, cached per
    fit set (cross-validation scores every strength on the same folds)."""

    def __init__(self, cleaned: list[np.ndarray]) -> None:
        self.cleaned = cleaned  # M x (R, L_i)
        self._fits: dict[bytes, tuple[ConnectivityMeasure, np.ndarray]] = {}
        self._tests: dict[tuple[bytes, bytes], np.ndarray] = {}

    def fitted(self, fit_idx: np.ndarray) -> tuple[ConnectivityMeasure, np.ndarray]:
        key = np.asarray(fit_idx, dtype=np.int64).tobytes()
        if key not in self._fits:
            self._fits[key] = fit_tangent([self.cleaned[i] for i in fit_idx])
        return self._fits[key]

    def __call__(self, fit_idx: np.ndarray, test_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        measure, x_fit = self.fitted(fit_idx)
        key = (np.asarray(fit_idx, dtype=np.int64).tobytes(), np.asarray(test_idx, dtype=np.int64).tobytes())
        if key not in self._tests:
            self._tests[key] = tangent_features(measure, [self.cleaned[i] for i in test_idx])
        return x_fit, self._tests[key]


def _labels(y_train: np.ndarray, y_val: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Checked (N,) labels and n_classes (0 for regression)."""
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    if kind not in FC_GRID:
        raise ValueError(f"unknown task kind '{kind}', expected classification or regression")
    if y_train.ndim != 1 or y_val.ndim != 1 or y_train.size == 0:
        raise DataError(
            f"expected 1-D labels (N,) with N >= 1 training scans, got shapes {y_train.shape} and {y_val.shape}"
        )
    if not np.all(np.isfinite(np.concatenate([y_train, y_val]).astype(np.float64))):
        raise DataError("the labels hold NaN/inf values")
    if kind == "regression":
        return y_train.astype(np.float64), y_val.astype(np.float64), 0
    y_train, y_val = y_train.astype(np.int64), y_val.astype(np.int64)
    if np.unique(y_train).size < 2:
        raise DataError(f"training split holds a single class ({np.unique(y_train).tolist()})")
    return y_train, y_val, int(max(y_train.max(), y_val.max(initial=0))) + 1


def _resolve_select(select: str, y_train: np.ndarray, kind: str, what: str) -> str:
    if select not in ("cv", "validation"):
        raise ConfigError(f"select must be 'cv' or 'validation', got '{select}'")
    if select == "cv" and not can_cross_validate(y_train, kind):
        log.warning(
            "%s %s: the training scans cannot make 2 folds (a class with one scan): strength chosen on validation",
            what,
            kind,
        )
        return "validation"
    return select


def _choose(
    rows: Rows,
    y_train: np.ndarray,
    y_val: np.ndarray,
    kind: str,
    seed: int,
    grid: Sequence[float],
    select: str,
    pca: bool,
    n_classes: int,
    what: str,
) -> tuple[Pipeline, np.ndarray]:
    """The pipeline with the best strength of grid, fitted on the training rows 0..n_train-1 (validation
    rows follow them), and (len(grid),) each strength's score."""
    if not grid:
        raise ConfigError(f"{what}: the strength grid is empty")
    train = np.arange(len(y_train))

    def pipeline(strength: float, x_fit: np.ndarray) -> Pipeline:
        n_components = min(PCA_MAX, x_fit.shape[0] - 1, x_fit.shape[1]) if pca else None
        return make_fc_pipeline(kind, strength, seed, n_components)

    if select == "cv":

        def fit_predict(strength: float, xi_fit: np.ndarray, y_fit: np.ndarray, xi_test: np.ndarray) -> np.ndarray:
            x_fit, x_test = rows(xi_fit[:, 0], xi_test[:, 0])
            return predict_scores(pipeline(strength, x_fit).fit(x_fit, y_fit), x_test, kind, n_classes)

        scores = cv_scores(fit_predict, train[:, None], y_train, train, kind, grid, seed, n_classes)
        chosen = best_index(scores, kind, grid, f"{what} {kind}")
        x_fit, _ = rows(train, train[:0])
        log.info(
            "%s %s: strength %.3g chosen by %d-scan cross-validation (%s = %.4f)",
            what,
            kind,
            grid[chosen],
            len(y_train),
            PRIMARY[kind],
            scores[chosen],
        )
        return pipeline(grid[chosen], x_fit).fit(x_fit, y_train), scores
    if len(y_val) == 0:
        raise DataError(f"{what}: choosing the strength on validation needs validation scans, got none")
    x_fit, x_val = rows(train, np.arange(len(y_train), len(y_train) + len(y_val)))
    fitted, scores = [], []
    for strength in grid:
        est = pipeline(strength, x_fit).fit(x_fit, y_train)
        out = predict_scores(est, x_val, kind, n_classes)
        if kind == "classification":
            score = classification_metrics(y_val, out, n_classes)[PRIMARY[kind]]
        else:
            score = regression_metrics(y_val, out)[PRIMARY[kind]]
        log.debug("%s %s, strength %.3g: validation %s = %.4f", what, kind, strength, PRIMARY[kind], score)
        fitted.append(est)
        scores.append(score)
    chosen = best_index(np.array(scores), kind, grid, f"{what} {kind}")
    log.info(
        "%s %s: strength %.3g chosen on validation (%s = %.4f)", what, kind, grid[chosen], PRIMARY[kind], scores[chosen]
    )
    return fitted[chosen], np.array(scores)


def fit_baseline(
    name: str,
    train_series: Sequence[np.ndarray],
    y_train: np.ndarray,
    val_series: Sequence[np.ndarray],
    y_val: np.ndarray,
    *,
    kind: str,
    seed: int,
    tr: float,
    config: BaselineConfig | None = None,
    select: str = "cv",
    pca: bool = False,
) -> FittedBaseline:
    """Baseline `name` (one of BASELINES) fitted on the training scans, its strength chosen per `select`.

    *_series: N x (R, L_i) series at TR tr (seconds); y_*: (N,) class indices or targets; kind:
    classification | regression; pca: reduce to min(PCA_MAX, n - 1, F) components after scaling.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline '{name}', expected one of {list(BASELINES)}")
    config = BaselineConfig() if config is None else config
    y_train, y_val, n_classes = _labels(y_train, y_val, kind)
    if len(train_series) != len(y_train) or len(val_series) != len(y_val):
        raise DataError(
            f"baseline {name}: {len(train_series)} training / {len(val_series)} validation scans but "
            f"{len(y_train)} / {len(y_val)} labels"
        )
    what = f"baseline {name}"
    select = _resolve_select(select, y_train, kind, what)
    grid = (config.c_grid if kind == "classification" else config.alpha_grid) or FC_GRID[kind]
    n_rois = check_series(train_series, "training scan")[0].shape[0]
    # under cv the validation scans play no part: they are not even read
    used_val = list(val_series) if select == "validation" else []
    check_series(used_val, "validation scan", n_rois=n_rois)
    tangent = None
    rows: Rows
    if name == "fc_tangent":
        require_complete(train_series, "training scan")
        require_complete(used_val, "validation scan")
        cleaned = clean_series(train_series, tr, config, "training scan")
        cleaned += clean_series(used_val, tr, config, "validation scan")
        rows = tangent_rows = _TangentRows(cleaned)
        tangent = tangent_rows.fitted(np.arange(len(y_train)))[0]
    else:
        x = _series_features(name, train_series, tr, config, "training scan")  # (N, F)
        if used_val:
            x = np.vstack([x, _series_features(name, used_val, tr, config, "validation scan")])
        rows = _matrix_rows(x)
    est, scores = _choose(rows, y_train, y_val, kind, seed, grid, select, pca, n_classes, what)
    return FittedBaseline(
        name, kind, est, float(tr), config, n_rois, n_classes, tuple(grid), tuple(float(s) for s in scores), tangent
    )


def _matrix_rows(x: np.ndarray) -> Rows:
    return lambda fit_idx, test_idx: (x[fit_idx], x[test_idx])


def _check_xy(name: str, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise DataError(f"{name}: expected X (N, F) and y (N,), got shapes {X.shape} and {y.shape}")
    if np.isinf(X).any():
        raise DataError(f"{name}: X holds inf values (NaN features = missing ROIs' pairs)")
    return X, y


def fit_fc_baseline(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    kind: str,
    seed: int,
    *,
    pca: bool = False,
    grid: Sequence[float] | None = None,
    select: str = "cv",
) -> Pipeline:
    """The pipeline of feature matrices X_* (N, F) (e.g. `fc_features`), y_* (N,), with the best strength
    of grid (default FC_GRID[kind]) fitted on the training split; see `fit_baseline` for series."""
    X_train, y_train = _check_xy("training split", X_train, y_train)
    X_val, y_val = _check_xy("validation split", X_val, y_val)
    if X_val.shape[0] and X_train.shape[1] != X_val.shape[1]:
        raise DataError(f"training split has {X_train.shape[1]} features, validation split {X_val.shape[1]}")
    y_train, y_val, n_classes = _labels(y_train, y_val, kind)
    grid = FC_GRID[kind] if grid is None else tuple(grid)
    select = _resolve_select(select, y_train, kind, "FC baseline")
    rows = _matrix_rows(np.vstack([X_train, X_val]) if X_val.shape[0] else X_train)
    return _choose(rows, y_train, y_val, kind, seed, grid, select, pca, n_classes, "FC baseline")[0]
