"""The non-neural baselines (roi_spectrum, fc, fc_raw, fc_tangent), checked against nilearn / scipy /
scikit-learn computed directly here, on small seeded numpy cohorts."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from nilearn.connectome import ConnectivityMeasure
from nilearn.signal import clean
from scipy.signal import welch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, mean_squared_error
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainjepa.downstream.baselines import BASELINES, FC_GRID, fit_baseline
from brainjepa.downstream.config import BaselineConfig
from brainjepa.downstream.features import clean_series, fc_features, roi_spectrum_features
from brainjepa.downstream.metrics import classification_metrics, regression_metrics
from brainjepa.errors import ConfigError, DataError
from brainjepa.schema import from_mapping

TR = 2.205
CFG = BaselineConfig()
NO_Y = np.array([], dtype=np.int64)


def _cohort(
    rng: np.random.Generator, y: np.ndarray, n_rois: int = 6, n_frames: int = 150, r: float = 0.0, scale: float = 1.0
) -> list[np.ndarray]:
    """One white-noise (R, L) scan per label; class 1: ROI 0-1 correlation r (variances unchanged) and ROIs
    0-2 scaled by `scale`."""
    out = []
    for yi in y:
        x = rng.standard_normal((n_rois, n_frames))
        c = r * yi
        x[1] = c * x[0] + math.sqrt(1 - c * c) * x[1]
        x[:3] *= scale**yi
        out.append(x.astype(np.float32))
    return out


def _clean(x: np.ndarray) -> np.ndarray:
    """(L, R) nilearn-cleaned time series, the textbook recipe."""
    return clean(x.T.astype(np.float64), detrend=True, standardize=None, low_pass=0.1, high_pass=0.01, t_r=TR)


def _bacc(fitted, xs, y) -> float:
    return classification_metrics(y, fitted.predict_scores(xs, 2), 2)["balanced_acc"]


@pytest.mark.slow  # tangent-space FC cross-validated fold by fold, then again with nilearn + sklearn
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_fc_tangent_equals_nilearn_and_sklearn_with_the_reference_refitted_per_fold(kind: str) -> None:
    """Scores of every strength over the 5 folds (regression's MSE: continuous, so a reference fitted on
    more than a fold's training scans would show), the chosen strength, the training scans' reference and
    the test predictions all equal a direct nilearn + scikit-learn computation."""
    rng = np.random.default_rng(0)
    if kind == "classification":
        y_tr, y_te = np.tile([0, 1], 20), np.tile([0, 1], 10)
        tr, te = _cohort(rng, y_tr, r=0.4), _cohort(rng, y_te, r=0.4)
    else:  # the ROI 0-1 correlation is the target
        y_tr, y_te = rng.uniform(0, 0.8, 40), rng.uniform(0, 0.8, 20)
        tr, te = _cohort(rng, y_tr, r=1.0), _cohort(rng, y_te, r=1.0)
    fitted = fit_baseline("fc_tangent", tr, y_tr, [], y_te[:0], kind=kind, seed=0, tr=TR)
    c_tr, c_te = [_clean(x) for x in tr], [_clean(x) for x in te]  # (L, R) each

    def measure(cleaned):
        return ConnectivityMeasure(
            kind="tangent", vectorize=True, discard_diagonal=True, standardize="zscore_sample"
        ).fit(cleaned)

    def model(c, cm, cleaned, y):
        head = (
            LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
            if kind == "classification"
            else Ridge(alpha=c)
        )
        return make_pipeline(StandardScaler(), head).fit(cm.transform(cleaned), y)

    def predict(est, x):
        return est.predict_proba(x) if kind == "classification" else est.predict(x)

    # 5 folds (stratified for classification), the tangent reference fitted on each fold's training part
    grid = FC_GRID[kind]
    folds = (
        StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(40), y_tr)
        if kind == "classification"
        else KFold(5, shuffle=True, random_state=0).split(np.zeros(40))
    )
    cv: list[list[float]] = [[] for _ in grid]
    for fit, held in folds:
        cm = measure([c_tr[i] for i in fit])
        x_held = cm.transform([c_tr[i] for i in held])
        for j, c in enumerate(grid):
            p = predict(model(c, cm, [c_tr[i] for i in fit], y_tr[fit]), x_held)
            cv[j].append(
                balanced_accuracy_score(y_tr[held], p.argmax(1))
                if kind == "classification"
                else mean_squared_error(y_tr[held], p)
            )
    means = np.array([np.mean(s) for s in cv])
    np.testing.assert_allclose(fitted.scores, means, rtol=1e-9, atol=1e-12)
    assert fitted.strength == grid[int(np.argmax(means) if kind == "classification" else np.argmin(means))]
    # refitted on all training scans, the test scans only transformed
    cm = measure(c_tr)
    np.testing.assert_allclose(fitted.tangent.mean_, cm.mean_, rtol=1e-9, atol=1e-12)
    direct = predict(model(fitted.strength, cm, c_tr, y_tr), cm.transform(c_te))
    np.testing.assert_allclose(fitted.predict_scores(te, 2), direct, rtol=1e-6, atol=1e-9)
    if kind == "classification":
        assert _bacc(fitted, te, y_te) > 0.7
    else:
        assert regression_metrics(y_te, direct)["pearson_r"] > 0.7


def test_fc_is_cleaned_corrcoef_and_fc_raw_the_series_as_given() -> None:
    rng = np.random.default_rng(1)
    xs = _cohort(rng, np.array([0, 1, 1]), n_rois=5, n_frames=90, r=0.8)
    xs[2][3] = np.nan  # a missing ROI
    iu = np.triu_indices(5, k=1)
    got = fc_features(clean_series(xs, TR, CFG))
    for x, g in zip(xs, got, strict=True):
        keep = ~np.isnan(x).all(1)
        r = np.full((5, 5), np.nan)
        r[np.ix_(keep, keep)] = np.corrcoef(_clean(x[keep]).T)
        np.testing.assert_allclose(g, np.arctanh(r[iu]), rtol=1e-9, equal_nan=True)
    assert np.isnan(got[2]).sum() == 4 and np.isfinite(got[:2]).all()
    raw = np.arctanh(np.corrcoef(xs[0].astype(np.float64))[iu])
    np.testing.assert_allclose(fc_features(xs[:1])[0], raw, rtol=1e-9)
    off = BaselineConfig(detrend=False, high_pass=None, low_pass=0.0)  # None / 0: no cleaning at all
    np.testing.assert_allclose(fc_features(clean_series(xs, TR, off)), fc_features(xs), rtol=1e-9, equal_nan=True)
    assert not np.allclose(got[0], raw)


@pytest.mark.parametrize("n_frames", [150, 60])  # Welch segments of 91 frames; a short scan: one segment
def test_roi_spectrum_is_welch_band_power(n_frames: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, n_frames))
    x[0] += 3 * np.sin(2 * np.pi * 0.05 * TR * np.arange(n_frames))  # 0.05 Hz: slow-4 (0.027-0.073)
    x[2] = np.nan
    got = roi_spectrum_features([x], TR, CFG).reshape(4, 4)  # ROI-major (R, bands)
    nper = min(n_frames, math.ceil(2 / (0.01 * TR)))
    f, p = welch(x[[0, 1, 3]], fs=1 / TR, nperseg=nper, nfft=nper + nper % 2, detrend="linear")
    bands = [(0.01, 0.027), (0.027, 0.073), (0.073, 0.198), (0.198, 0.5 / TR)]  # the last clipped at Nyquist
    for b, (lo, hi) in enumerate(bands):
        fine = np.linspace(lo, hi, 200001)
        want = [np.log(np.trapezoid(np.interp(fine, f, pr), fine)) for pr in p]
        np.testing.assert_allclose(got[[0, 1, 3], b], want, rtol=1e-6)
    assert np.isnan(got[2]).all() and got[0].argmax() == 1
    linear = BaselineConfig(detrend=False)
    assert not np.allclose(roi_spectrum_features([x], TR, linear)[0, :4], got[0])


@pytest.mark.slow  # every baseline fitted (cross-validated) on two simulated cohorts
def test_each_baseline_reads_what_it_should() -> None:
    """Variance alone -> roi_spectrum far above chance; a correlation alone -> fc and fc_tangent above
    chance, roi_spectrum near it."""
    rng = np.random.default_rng(3)
    y_tr, y_te = np.tile([0, 1], 30), np.tile([0, 1], 30)
    var_tr, var_te = _cohort(rng, y_tr, scale=1.4), _cohort(rng, y_te, scale=1.4)
    spectrum = fit_baseline("roi_spectrum", var_tr, y_tr, [], NO_Y, kind="classification", seed=0, tr=TR)
    assert _bacc(spectrum, var_te, y_te) > 0.9
    cor_tr, cor_te = _cohort(rng, y_tr, r=0.6), _cohort(rng, y_te, r=0.6)
    got = {
        n: _bacc(fit_baseline(n, cor_tr, y_tr, [], NO_Y, kind="classification", seed=0, tr=TR), cor_te, y_te)
        for n in BASELINES
    }
    assert got["fc"] > 0.85 and got["fc_tangent"] > 0.85 and got["fc_raw"] > 0.85, got
    assert abs(got["roi_spectrum"] - 0.5) < 0.17, got


def test_regression_and_missing_rois_imputed_from_training_scans() -> None:
    rng = np.random.default_rng(4)
    t = rng.uniform(0, 1, 60)
    xs = [(rng.standard_normal((5, 100)) * np.exp(np.r_[ti, ti, 0, 0, 0])[:, None]).astype(np.float32) for ti in t]
    for i in (1, 7, 40):
        xs[i][2] = np.nan
    fitted = fit_baseline("roi_spectrum", xs[:40], t[:40], [], NO_Y, kind="regression", seed=0, tr=TR)
    pred = fitted.predict_scores(xs[40:])
    assert pred.shape == (20,) and regression_metrics(t[40:], pred)["pearson_r"] > 0.8
    assert fitted.strength in FC_GRID["regression"]
    y = (t > 0.5).astype(np.int64)
    fc = fit_baseline(
        "fc", xs[:40], y[:40], xs[40:50], y[40:50], kind="classification", seed=0, tr=TR, select="validation"
    )
    assert np.isfinite(fc.predict_scores(xs[40:], 2)).all()
    imputer = fc.estimator.named_steps["impute"]
    pair_12 = 4 + 1  # upper triangle of 5: (0,1..4), then (1,2)
    feats = fc_features(clean_series(xs[:40], TR, CFG))
    np.testing.assert_allclose(imputer.statistics_[pair_12], np.nanmean(feats[:, pair_12]))


def test_the_test_scans_never_shape_the_model() -> None:
    """Under cv the validation scans play no part; predicting reads scans without refitting anything; the
    tangent reference stays the training scans' even when the strength is chosen on validation."""
    rng = np.random.default_rng(5)
    y = np.tile([0, 1], 30)
    xs = _cohort(rng, y, r=0.5)
    a = fit_baseline("fc_tangent", xs[:30], y[:30], xs[30:40], y[30:40], kind="classification", seed=0, tr=TR)
    b = fit_baseline("fc_tangent", xs[:30], y[:30], xs[40:60], y[40:60], kind="classification", seed=0, tr=TR)
    np.testing.assert_array_equal(a.estimator.named_steps["model"].coef_, b.estimator.named_steps["model"].coef_)
    before = a.predict_scores(xs[40:50], 2)
    a.predict_scores(xs[30:60], 2)
    np.testing.assert_array_equal(a.predict_scores(xs[40:50], 2), before)
    v = fit_baseline(
        "fc_tangent", xs[:30], y[:30], xs[30:40], y[30:40], kind="classification", seed=0, tr=TR, select="validation"
    )
    np.testing.assert_allclose(v.tangent.mean_, a.tangent.mean_, rtol=1e-12)
    other = fit_baseline(
        "fc_tangent",
        xs[:30],
        y[:30],
        xs[30:40],
        y[30:40],
        kind="classification",
        seed=0,
        tr=TR,
        select="validation",
        config=BaselineConfig(c_grid=(0.01, 1.0)),
    )
    assert other.grid == (0.01, 1.0) and other.strength in other.grid


def test_bad_input_gets_clear_errors() -> None:
    rng = np.random.default_rng(6)
    y = np.tile([0, 1], 10)
    xs = _cohort(rng, y, n_frames=80)

    def fit(name, series, **kw):
        return fit_baseline(name, series, y, [], NO_Y, kind="classification", seed=0, tr=TR, **kw)

    with pytest.raises(ConfigError, match=r"unknown baseline 'fc_partial'.*roi_spectrum"):
        fit("fc_partial", xs)
    with pytest.raises(DataError, match=r"training scan 3: expected an \(R, L\) series with R = 6"):
        fit("fc", xs[:3] + [xs[3][:5]] + xs[4:])
    with pytest.raises(DataError, match=r"training scan 0: expected an \(R, L\)"):
        fit("roi_spectrum", [x[0] for x in xs])
    holed = [x.copy() for x in xs]
    holed[4][1, 10] = np.nan
    for name in BASELINES:
        with pytest.raises(DataError, match=r"training scan 4: ROIs \[1\] hold some NaN.*whole missing ROI"):
            fit(name, holed)
    holed[4][1] = np.nan
    with pytest.raises(DataError, match=r"training scan 4 has missing ROI\(s\) \[1\].*use the 'fc' baseline"):
        fit("fc_tangent", holed)
    fitted = fit("fc_tangent", xs)
    with pytest.raises(DataError, match=r"scan 4 has missing ROI\(s\) \[1\].*'fc'"):
        fitted.predict_scores(holed, 2)
    with pytest.raises(DataError, match=r"scan 0: expected an \(6, L\) series like the training scans"):
        fitted.predict_scores([xs[0][:4]], 2)
    with pytest.raises(ConfigError, match=r"bands: \[\[0.3, 0.4\]\] Hz start at or above the Nyquist"):
        fit("roi_spectrum", xs, config=BaselineConfig(bands=((0.01, 0.1), (0.3, 0.4))))
    with pytest.raises(ConfigError, match=r"low_pass: 0.3 Hz is at or above the Nyquist frequency 0.2268"):
        fit("fc", xs, config=BaselineConfig(low_pass=0.3))
    with pytest.raises(DataError, match=r"training scan 0: nilearn could not band-pass its 20 frames"):
        fit("fc", [x[:, :20] for x in xs])
    with pytest.raises(DataError, match="20 training / 0 validation scans but 19 / 0 labels"):
        fit_baseline("fc", xs, y[:19], [], NO_Y, kind="classification", seed=0, tr=TR)
    with pytest.raises(ConfigError, match="tr: expected a repetition time > 0"):
        fit_baseline("fc", xs, y, [], NO_Y, kind="classification", seed=0, tr=0.0)


def test_baseline_config_loads_as_a_nested_section_of_the_strict_loader() -> None:
    @dataclasses.dataclass(frozen=True)
    class Holder:
        baselines: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)

    got = from_mapping(
        Holder,
        {"baselines": {"low_pass": 0.08, "high_pass": None, "bands": [[0.01, 0.05], [0.05, 0.2]], "c_grid": [0.1, 1]}},
        "p.yaml",
    )
    assert got.baselines == BaselineConfig(
        low_pass=0.08, high_pass=None, bands=((0.01, 0.05), (0.05, 0.2)), c_grid=(0.1, 1.0)
    )
    assert from_mapping(Holder, {}, "p.yaml").baselines == BaselineConfig()
    with pytest.raises(ConfigError, match=r"p.yaml', field 'baselines.lowpass': unknown key"):
        from_mapping(Holder, {"baselines": {"lowpass": 0.08}}, "p.yaml")
    with pytest.raises(ConfigError, match=r"high_pass \(0.1 Hz\) must be below low_pass \(0.05 Hz\)"):
        from_mapping(Holder, {"baselines": {"high_pass": 0.1, "low_pass": 0.05}}, "p.yaml")
    with pytest.raises(ConfigError, match=r"bands\[1\]: expected 0 <= low < high"):
        BaselineConfig(bands=((0.01, 0.02), (0.1, 0.05)))
    with pytest.raises(ConfigError, match=r"field 'baselines.bands\[0\]'"):
        from_mapping(Holder, {"baselines": {"bands": [[0.01]]}}, "p.yaml")
