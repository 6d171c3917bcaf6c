"""Subject-level bootstrap intervals: the vectorised metrics against the reference ones, the resampling,
coverage on a known data-generating process, paired differences, formatting and bad input."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from brainjepa.downstream import intervals
from brainjepa.downstream.intervals import (
    Interval,
    batch_metric,
    bootstrap_interval,
    format_interval,
    paired_difference,
    resample_indices,
)
from brainjepa.downstream.metrics import METRICS, classification_metrics, regression_metrics
from brainjepa.downstream.report import format_value


def _probs(
    rng: np.random.Generator, y: np.ndarray, n_seeds: int, n_classes: int, signal: float, decimals: int | None = None
) -> np.ndarray:
    """Class probabilities (S, N, C) that favour the true class by signal; rounded to make ties."""
    logits = rng.normal(size=(n_seeds, y.size, n_classes)) + signal * np.eye(n_classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return np.round(p, decimals) if decimals is not None else p


def _reference(kind: str, metric: str, y: np.ndarray, s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric of each seed on each resample row through `brainjepa.downstream.metrics`: (B, S)."""
    with warnings.catch_warnings():  # scikit-learn warns about one-label resamples
        warnings.simplefilter("ignore", UserWarning)
        if kind == "classification":
            return np.array([[classification_metrics(y[i], si[i], s.shape[2])[metric] for si in s] for i in idx])
        return np.array([[regression_metrics(y[i], si[i])[metric] for si in s] for i in idx])


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("metric", METRICS["classification"])
def test_classification_batch_metrics_equal_reference(n_classes: int, metric: str) -> None:
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, size=37)
    s = _probs(rng, y, n_seeds=2, n_classes=n_classes, signal=1.0, decimals=1)  # many tied scores
    idx = rng.integers(0, y.size, size=(40, 25))  # plain resamples: class counts vary, some classes go
    idx[0] = 4  # one subject: a single class (AUROC NaN)
    idx[1] = rng.choice(np.flatnonzero(y == y[0]), size=25)  # one class only
    got = batch_metric(y, s, idx, kind="classification", metric=metric)
    want = _reference("classification", metric, y, s, idx)
    assert got.shape == (40, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)  # NaN where the reference is NaN
    assert np.isfinite(got[2:]).all() or metric == "auroc"


def test_binary_auroc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], 20)
    s = _probs(rng, y, n_seeds=2, n_classes=2, signal=0.8, decimals=1)
    idx = np.concatenate([rng.choice(20, size=(30, 20)), 20 + rng.choice(20, size=(30, 20))], axis=1)
    got = batch_metric(y, s, idx, kind="classification", metric="auroc")
    want = np.array([[roc_auc_score(y[i], si[i, 1]) for si in s] for i in idx])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS["regression"])
def test_regression_batch_metrics_equal_reference(metric: str) -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=31)
    y[3] = 2.0  # an exactly representable value: a resample of subject 3 alone has a constant truth
    p = y + rng.normal(scale=0.7, size=(4, 31))
    idx = rng.integers(0, y.size, size=(40, 31))
    idx[0] = 3
    got = batch_metric(y, p, idx, kind="regression", metric=metric)
    want = _reference("regression", metric, y, p, idx)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_batch_metric_does_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, size=40)
    s = _probs(rng, y, n_seeds=2, n_classes=3, signal=1.0)
    idx = rng.integers(0, 40, size=(100, 40))
    whole = batch_metric(y, s, idx, kind="classification", metric="auroc")
    monkeypatch.setattr(intervals, "CHUNK", 100)  # blocks of 2 resamples
    np.testing.assert_array_equal(batch_metric(y, s, idx, kind="classification", metric="auroc"), whole)


def _two_sites(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y (N,), scores (S, N, 2) and group (N,): group 5 holds 30 subjects, group 2 holds 18."""
    group = np.r_[np.full(30, 5), np.full(18, 2)]
    y = np.r_[np.arange(30) % 2, (np.arange(18) % 3 == 0).astype(int)]
    perm = rng.permutation(y.size)  # groups interleaved
    return y[perm], _probs(rng, y[perm], n_seeds=3, n_classes=2, signal=1.0), group[perm]


def test_estimate_is_the_group_weighted_seed_mean() -> None:
    rng = np.random.default_rng(11)
    y, s, group = _two_sites(rng)
    for metric in ("auroc", "balanced_acc"):
        iv = bootstrap_interval(y, s, group, kind="classification", metric=metric, n_boot=50)
        want = 0.0
        for g in (5, 2):
            m = group == g
            per_seed = [classification_metrics(y[m], si[m], 2)[metric] for si in s]
            want += m.sum() / y.size * np.mean(per_seed)
        assert iv.estimate == pytest.approx(want, abs=1e-12)
        assert iv.lo <= iv.estimate <= iv.hi


def test_resamples_keep_class_counts_per_group() -> None:
    rng = np.random.default_rng(2)
    y, _, group = _two_sites(rng)
    idx = resample_indices(y, group, kind="classification", n_boot=300, seed=4)
    assert idx.shape == (300, y.size)
    np.testing.assert_array_equal(y[idx], np.broadcast_to(y, idx.shape))  # each slot keeps its class
    np.testing.assert_array_equal(group[idx], np.broadcast_to(group, idx.shape))  # and its group
    assert all(np.unique(row).size < y.size for row in idx[:20])  # with replacement
    assert np.unique(idx, axis=0).shape[0] == 300  # resamples differ
    plain = resample_indices(y + 0.5, group, kind="regression", n_boot=300, seed=4)
    np.testing.assert_array_equal(group[plain], np.broadcast_to(group, plain.shape))
    assert (y[plain].sum(axis=1) != y.sum()).any()  # regression draws ignore the class


def test_interval_is_the_percentile_of_the_resampled_metric() -> None:
    rng = np.random.default_rng(12)
    y, s, group = _two_sites(rng)
    iv = bootstrap_interval(y, s, group, kind="classification", metric="auroc", n_boot=400, level=0.9, seed=8)
    idx = resample_indices(y, group, kind="classification", n_boot=400, seed=8)
    reps = np.zeros(400)
    for g in (2, 5):
        slots = np.flatnonzero(group == g)
        reps += (
            slots.size / y.size * batch_metric(y, s, idx[:, slots], kind="classification", metric="auroc").mean(axis=1)
        )
    lo, hi = np.quantile(reps, [0.05, 0.95])
    assert (iv.lo, iv.hi, iv.n_boot, iv.level) == (pytest.approx(lo), pytest.approx(hi), 400, 0.9)


def test_same_seed_same_interval() -> None:
    rng = np.random.default_rng(13)
    y, s, group = _two_sites(rng)
    kw = {"kind": "classification", "metric": "balanced_acc", "n_boot": 200}
    assert bootstrap_interval(y, s, group, seed=3, **kw) == bootstrap_interval(y, s, group, seed=3, **kw)
    assert bootstrap_interval(y, s, group, seed=3, **kw) != bootstrap_interval(y, s, group, seed=4, **kw)


def test_auroc_interval_coverage_on_a_known_process() -> None:
    """Scores N(0, 1) for class 0 and N(d, 1) for class 1: the true AUROC is Phi(d / sqrt 2)."""
    rng = np.random.default_rng(21)
    d, n_per_class, reps = 1.0, 40, 400
    truth = norm.cdf(d / math.sqrt(2))
    y = np.repeat([0, 1], n_per_class)
    group = np.zeros(y.size, dtype=int)
    hits, widths = 0, []
    for r in range(reps):
        z = rng.normal(size=(1, y.size)) + d * y
        s = np.stack([-z, z], axis=2)  # (1, N, 2) a monotone score per class
        iv = bootstrap_interval(y, s, group, kind="classification", metric="auroc", n_boot=300, seed=r)
        hits += iv.lo <= truth <= iv.hi
        widths.append(iv.hi - iv.lo)
    coverage = hits / reps
    assert 0.90 <= coverage <= 0.99, coverage  # about 0.95 +- 0.011
    assert 0.15 < np.mean(widths) < 0.26  # about 2 x 1.96 x its standard error (~0.05)


def test_identical_methods_have_a_zero_difference() -> None:
    rng = np.random.default_rng(17)
    y, s, group = _two_sites(rng)
    for metric in METRICS["classification"]:
        iv = paired_difference(y, s, s, group, kind="classification", metric=metric, n_boot=200)
        assert (iv.estimate, iv.lo, iv.hi) == (0.0, 0.0, 0.0)


def test_a_better_method_on_every_subject_has_a_difference_above_zero() -> None:
    rng = np.random.default_rng(19)
    y, _, group = _two_sites(rng)
    good = _probs(rng, y, n_seeds=2, n_classes=2, signal=30.0)  # right on every subject
    poor = _probs(rng, y, n_seeds=3, n_classes=2, signal=0.3)  # S differs between the methods
    for metric in ("balanced_acc", "auroc"):
        iv = paired_difference(y, good, poor, group, kind="classification", metric=metric, n_boot=300)
        assert 0 < iv.lo <= iv.estimate <= iv.hi
        back = paired_difference(y, poor, good, group, kind="classification", metric=metric, n_boot=300)
        assert (back.estimate, back.lo, back.hi) == pytest.approx((-iv.estimate, -iv.hi, -iv.lo))
    t = rng.normal(size=y.size)
    err = rng.normal(size=(3, y.size))
    a, b = t + 0.5 * err[:2], t + err  # |error of a| < |error of b| on every subject and seed pair
    for metric in ("mse", "mae"):  # lower is better: a - b is negative
        iv = paired_difference(t, a, b, group, kind="regression", metric=metric, n_boot=300)
        assert iv.lo <= iv.estimate <= iv.hi < 0


def test_bad_input_gets_clear_errors() -> None:
    rng = np.random.default_rng(23)
    y, s, group = _two_sites(rng)
    kw = {"kind": "classification", "metric": "auroc", "n_boot": 10}
    with pytest.raises(ValueError, match="subjects"):
        bootstrap_interval(y[:-1], s, group[:-1], **kw)
    with pytest.raises(ValueError, match="group must have shape"):
        bootstrap_interval(y, s, group[:-1], **kw)
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        bootstrap_interval(y, s[0], group, **kw)
    with pytest.raises(ValueError, match="single class"):
        bootstrap_interval(y, s, np.where(y == 1, 9, group), **kw)
    bad = s.copy()
    bad[1, 4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval(y, bad, group, **kw)
    with pytest.raises(ValueError, match="NaN"):
        paired_difference(y, s, bad, group, **kw)
    with pytest.raises(ValueError, match="class counts differ"):
        paired_difference(y, s, np.concatenate([s, s[:, :, :1]], axis=2), group, **kw)
    with pytest.raises(ValueError, match="class index 2"):
        bootstrap_interval(np.where(y == 1, 2, y), s, group, **kw)
    with pytest.raises(ValueError, match="not a classification metric"):
        bootstrap_interval(y, s, group, kind="classification", metric="mse")
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(y, s, group, kind="classification", metric="acc", level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval(y, s, group, kind="classification", metric="acc", n_boot=0)
    with pytest.raises(ValueError, match="single subject"):
        bootstrap_interval(np.arange(5.0), np.ones((2, 5)), np.r_[0, 0, 0, 0, 1], kind="regression", metric="mae")
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval(np.r_[np.nan, 1.0], np.ones((1, 2)), np.zeros(2, int), kind="regression", metric="mae")


def test_format_interval() -> None:
    for metric in (*METRICS["classification"], *METRICS["regression"]):  # the estimate as the tables show it
        for v in (0.8765, -0.04321, 12.345):
            cell = format_value(metric, v, 0.0).split(" ± ")[0]
            assert format_interval(metric, Interval(v, v - 1, v + 1, 10, 0.95)).split(" [")[0] == cell
    assert format_interval("auroc", Interval(0.912, 0.86, 0.951, 2000, 0.95)) == "91.2 [86.0, 95.1]"
    diff = Interval(0.031, -0.012, 0.074, 2000, 0.95)
    assert format_interval("balanced_acc", diff, signed=True) == "+3.1 [-1.2, 7.4]"
    assert format_interval("r2", Interval(-0.1234, -0.3, 0.05, 10, 0.95), signed=True) == "-0.12 [-0.30, 0.05]"
    assert format_interval("mse", Interval(0.08941, 0.07123, 0.11, 10, 0.95)) == "0.0894 [0.0712, 0.110]"
    assert format_interval("mae", Interval(1.5, 1.0, 2.0, 10, 0.95), signed=True) == "+1.50 [1.00, 2.00]"
    assert format_interval("acc", Interval(math.nan, math.nan, math.nan, 0, 0.95)) == "–"
    assert format_interval("acc", Interval(0.5, math.nan, math.nan, 0, 0.95)) == "50.0 [–, –]"


def test_one_interval_at_the_target_size_is_fast() -> None:
    """2000 resamples, S = 5, N = 200, binary AUROC: well under a second (generous bound for busy CPUs)."""
    rng = np.random.default_rng(29)
    y = np.repeat([0, 1], 100)
    s = _probs(rng, y, n_seeds=5, n_classes=2, signal=1.0)
    start = time.perf_counter()
    iv = bootstrap_interval(y, s, np.zeros(200, dtype=int), kind="classification", metric="auroc")
    assert time.perf_counter() - start < 3.0
    assert iv.n_boot == 2000 and iv.lo < iv.estimate < iv.hi


def test_singleton_classes_are_resampled_without_strata_so_the_interval_is_not_a_point() -> None:
    """Subject identification: one test scan per class. Stratified draws would repeat the sample."""
    rng = np.random.default_rng(0)
    y = np.arange(12)
    scores = rng.dirichlet(np.ones(12), size=(2, 12))  # (S, N, C)
    scores[:, np.arange(8), np.arange(8)] += 1.0  # 8 of 12 identified
    scores /= scores.sum(-1, keepdims=True)
    iv = bootstrap_interval(y, scores, np.zeros(12, dtype=int), kind="classification", metric="acc", n_boot=500)
    assert iv.estimate == pytest.approx(np.mean([(s.argmax(1) == y).mean() for s in scores]))
    assert iv.lo < iv.estimate < iv.hi
