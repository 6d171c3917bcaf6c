"""Downstream metrics, summaries, reports and the FC baseline, checked against values computed here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from brainjepa.downstream.baselines import (
    FC_GRID,
    fc_features,
    fit_fc_baseline,
    make_fc_pipeline,
    predict_scores,
    regularisation_strength,
)
from brainjepa.downstream.metrics import (
    METRICS,
    PRIMARY,
    classification_metrics,
    is_better,
    regression_metrics,
    summarize,
)
from brainjepa.downstream.report import (
    markdown_table,
    plot_methods,
    plot_per_site,
    plot_training_modes,
    read_csv,
    write_csv,
    write_markdown,
)


def test_binary_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.6, 0.8, 0.3, 0.9])  # predictions 0 0 1 1 0 1
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), n_classes=2)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["balanced_acc"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    assert m["auroc"] == pytest.approx(7 / 9)  # positive-negative pairs ranked right


def test_three_class_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 10)
    logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[y]
    s = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, s, n_classes=3)
    pred = s.argmax(1)
    assert m["acc"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s, multi_class="ovr", average="macro"))


def test_one_class_gives_nan_auroc_without_error() -> None:
    m = classification_metrics(np.ones(4, dtype=int), np.full((4, 2), 0.5), n_classes=2)
    assert math.isnan(m["auroc"]) and m["acc"] == 0.0
    assert math.isnan(classification_metrics(np.zeros(3, dtype=int), np.eye(3), n_classes=3)["auroc"])


def test_regression_metrics_equal_scipy_and_hand() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
    p = np.array([1.5, 1.5, 3.5, 3.0, 5.0])
    m = regression_metrics(t, p)
    assert m["mse"] == pytest.approx(np.mean((t - p) ** 2))
    assert m["mae"] == pytest.approx(np.mean(np.abs(t - p)))
    assert m["pearson_r"] == pytest.approx(pearsonr(t, p)[0])
    assert m["r2"] == pytest.approx(1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2))
    assert math.isnan(regression_metrics(t, np.full(5, 2.0))["pearson_r"])


def test_bad_inputs_name_what_came() -> None:
    with pytest.raises(ValueError, match=r"3 entries but scores has 2 rows"):
        classification_metrics(np.array([0, 1, 1]), np.full((2, 2), 0.5), 2)
    with pytest.raises(ValueError, match=r"2-D.*shape \(4,\)"):
        classification_metrics(np.array([0, 1, 1, 0]), np.full(4, 0.5), 2)
    with pytest.raises(ValueError, match=r"scores holds 1 NaN"):
        classification_metrics(np.array([0, 1]), np.array([[0.5, 0.5], [np.nan, 0.5]]), 2)
    with pytest.raises(ValueError, match=r"y_pred holds 1 NaN"):
        regression_metrics(np.arange(3.0), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"3 entries but y_pred has 2"):
        regression_metrics(np.arange(3.0), np.arange(2.0))


def test_primary_metric_and_model_selection_direction() -> None:
    assert PRIMARY == {"classification": "balanced_acc", "regression": "mse"}
    assert METRICS["classification"][0] == "balanced_acc" and METRICS["regression"][0] == "mse"
    assert is_better("classification", 0.8, 0.7) and not is_better("classification", 0.7, 0.7)
    assert is_better("regression", 1.0, 2.0) and not is_better("regression", 3.0, 2.0)
    assert is_better("regression", 3.0, None) and not is_better("classification", math.nan, 0.1)


def _rows() -> list[dict]:
    rows = []
    for method, base in (("finetune", 0.8), ("fc", 0.7)):
        for seed, d in enumerate((-0.1, 0.0, 0.1)):
            for site in ("A", "B"):
                rows.append(
                    {
                        "experiment": "e1",
                        "method": method,
                        "training": "centralized",
                        "task": "sex",
                        "seed": seed,
                        "site": site,
                        "balanced_acc": base + d,
                        "auroc": base + d / 2,
                    }
                )
                rows.append(
                    {
                        "experiment": "e1",
                        "method": method,
                        "training": "federated",
                        "task": "age",
                        "seed": seed,
                        "site": site,
                        "mse": 10 * base + d,
                    }
                )
    return rows


def test_summarize_mean_std_n() -> None:
    rows = [
        {"m": "a", "v": 0.7},
        {"m": "a", "v": 0.8},
        {"m": "a", "v": 0.9},
        {"m": "b", "v": 0.5},
        {"m": "b", "v": math.nan},
        {"m": "c"},
    ]
    s = summarize(rows, ["m"], ["v"])
    assert [r["m"] for r in s] == ["a", "b", "c"]
    assert s[0]["v_mean"] == pytest.approx(0.8) and s[0]["v_std"] == pytest.approx(0.1) and s[0]["v_n"] == 3
    assert s[1] == {"m": "b", "v_mean": 0.5, "v_std": 0.0, "v_n": 1}
    assert math.isnan(s[2]["v_mean"]) and s[2]["v_n"] == 0


def test_markdown_table_rows_methods_columns_tasks_bold_best(tmp_path: Path) -> None:
    s = summarize([r for r in _rows() if r["site"] == "A"], ["method", "task"], ["balanced_acc", "mse"])
    text = markdown_table(s, ["finetune", "fc"], ["sex", "age"], {"sex": "balanced_acc", "age": "mse"})
    lines = text.strip().splitlines()
    assert lines[0] == "| Method | sex | age |" and lines[1] == "|---|---|---|" and len(lines) == 6
    assert lines[2] == "| finetune | **80.0 ± 10.0** | 8.00 ± 0.100 |"
    assert lines[3] == "| fc | 70.0 ± 10.0 | **7.00 ± 0.100** |"  # lower MSE is better
    assert "balanced accuracy (%) (sex)" in lines[-1] and "MSE (age)" in lines[-1] and "3 seeds" in lines[-1]
    out = write_markdown(tmp_path / "r" / "table.md", [("Main results", text)], title="Downstream")
    assert out.read_text().startswith("# Downstream\n\n## Main results\n\n| Method |")


def test_csv_round_trip(tmp_path: Path) -> None:
    rows = _rows()
    path = write_csv(rows, tmp_path / "results.csv")
    assert not list(tmp_path.glob(".*tmp"))
    back = read_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(rows, back, strict=True):
        for k in ("experiment", "method", "training", "task", "seed", "site", "balanced_acc", "mse"):
            if k in a:
                assert b[k] == a[k]
            else:
                assert math.isnan(b[k])


def test_plots_write_pngs(tmp_path: Path) -> None:
    rows = _rows()
    s = summarize([r for r in rows if r["task"] == "sex"], ["method", "task"], ["balanced_acc"])
    modes = summarize(rows, ["method", "training", "task"], ["balanced_acc"])
    outs = [
        plot_methods(s, tmp_path / "methods.png", "balanced_acc"),
        plot_training_modes(modes, tmp_path / "modes.png", "balanced_acc"),
        plot_per_site(rows, tmp_path / "sites.png", "mse"),
    ]
    for p in outs:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fc_features_equal_corrcoef() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 25))
    b[1] = 2 * b[0] + 1  # r = 1: clipped, stays finite
    f = fc_features([a, b])
    iu = np.triu_indices(5, k=1)
    assert f.shape == (2, 10)
    np.testing.assert_allclose(f[0], np.arctanh(np.corrcoef(a)[iu]), rtol=1e-10)
    np.testing.assert_allclose(f[1], np.arctanh(np.clip(np.corrcoef(b)[iu], -0.999999, 0.999999)), rtol=1e-6)
    b[2] = 3.0
    with pytest.raises(ValueError, match=r"scan 1: ROIs \[2\] are constant"):
        fc_features([a, b])


def _toy(n: int, rng: np.random.Generator, r: np.ndarray) -> np.ndarray:
    """n subjects of (6, 60) noise whose ROI 0-1 correlation is about r[i]."""
    x = rng.normal(size=(n, 6, 60))
    x[:, 1] = r[:, None] * x[:, 0] + np.sqrt(1 - r[:, None] ** 2) * x[:, 1]
    return fc_features(list(x))


def test_fc_baseline_separates_and_selects_by_cross_validation_or_on_validation() -> None:
    """Default `select="cv"`: the strength with the best mean balanced accuracy over 5 stratified folds of
    the training subjects (recomputed here with scikit-learn), refitted on all of them; "validation": the
    best on the validation split."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(0)
    y = {k: rng.integers(0, 2, size=n) for k, n in (("train", 80), ("val", 40), ("test", 60))}
    X = {k: _toy(len(v), rng, 0.5 * v) for k, v in y.items()}
    grid = FC_GRID["classification"]
    est = fit_fc_baseline(X["train"], y["train"], X["val"], y["val"], "classification", seed=0)
    test = classification_metrics(y["test"], predict_scores(est, X["test"], "classification", 2), 2)
    assert test["balanced_acc"] > 0.9
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X["train"], y["train"]))
    cv = [
        np.mean(
            [
                balanced_accuracy_score(
                    y["train"][te],
                    make_fc_pipeline("classification", c, 0)
                    .fit(X["train"][tr], y["train"][tr])
                    .predict(X["train"][te]),
                )
                for tr, te in folds
            ]
        )
        for c in grid
    ]
    assert regularisation_strength(est) == grid[int(np.argmax(cv))]
    np.testing.assert_allclose(
        est.named_steps["model"].coef_,
        make_fc_pipeline("classification", grid[int(np.argmax(cv))], 0)
        .fit(X["train"], y["train"])
        .named_steps["model"]
        .coef_,
    )  # refitted on all training
    on_val = fit_fc_baseline(X["train"], y["train"], X["val"], y["val"], "classification", seed=0, select="validation")
    val = [
        balanced_accuracy_score(
            y["val"], make_fc_pipeline("classification", c, 0).fit(X["train"], y["train"]).predict(X["val"])
        )
        for c in grid
    ]
    assert regularisation_strength(on_val) == grid[int(np.argmax(val))]
    with pytest.raises(ValueError, match="select must be"):
        fit_fc_baseline(X["train"], y["train"], X["val"], y["val"], "classification", seed=0, select="test")


def test_fc_regression_baseline_and_padded_scores() -> None:
    rng = np.random.default_rng(1)
    t = {k: rng.uniform(-0.8, 0.8, size=n) for k, n in (("train", 80), ("val", 30), ("test", 30))}
    X = {k: _toy(len(v), rng, v) for k, v in t.items()}
    est = fit_fc_baseline(X["train"], t["train"], X["val"], t["val"], "regression", seed=0, pca=True)
    assert regression_metrics(t["test"], predict_scores(est, X["test"], "regression"))["pearson_r"] > 0.8
    y = np.where(rng.random(80) < 0.5, 0, 2)  # class 1 absent from training
    clf = fit_fc_baseline(X["train"], y, X["val"], np.zeros(30, dtype=int), "classification", seed=0)
    s = predict_scores(clf, X["test"], "classification", n_classes=3)
    assert s.shape == (30, 3) and np.all(s[:, 1] == 0) and np.allclose(s.sum(1), 1)


def test_fc_baseline_falls_back_to_validation_when_folds_are_impossible(caplog) -> None:
    """A class with a single training subject cannot be stratified into 2 folds: the strength is chosen on
    validation, with a warning, instead of failing."""
    rng = np.random.default_rng(3)
    y_tr = np.array([0] * 20 + [1] * 20 + [2])
    y_va = rng.integers(0, 3, size=30)
    X_tr, X_va = _toy(len(y_tr), rng, 0.5 * y_tr), _toy(len(y_va), rng, 0.5 * y_va)
    with caplog.at_level("WARNING"):
        est = fit_fc_baseline(X_tr, y_tr, X_va, y_va, "classification", seed=0)
    assert "cannot make 2 folds" in caplog.text
    on_val = fit_fc_baseline(X_tr, y_tr, X_va, y_va, "classification", seed=0, select="validation")
    assert regularisation_strength(est) == regularisation_strength(on_val)


def test_cross_validation_keeps_a_scans_windows_in_one_fold_and_averages_them() -> None:
    """Every scan is tested exactly once per strength, all its windows in the same fold and none of them
    in that fold's training rows; the score is the balanced accuracy of the windows' mean prediction."""
    from brainjepa.downstream.selection import cv_scores

    rng = np.random.default_rng(5)
    n_scans, w = 30, 3
    y_scan = np.arange(n_scans) % 2
    scan = np.repeat(np.arange(n_scans), w)  # (90,)
    x = np.column_stack([scan, rng.normal(size=scan.size)]).astype(np.float64)  # column 0 names the scan
    tested: list[int] = []

    def fit_predict(strength: float, x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray) -> np.ndarray:
        fit_scans, test_scans = set(x_fit[:, 0].astype(int)), x_test[:, 0].astype(int)
        assert not fit_scans & set(test_scans.tolist())
        assert np.all(np.bincount(test_scans)[np.unique(test_scans)] == w)  # all windows of a scan together
        tested.extend(np.unique(test_scans).tolist())
        # window 0 of every scan votes for the wrong class, windows 1-2 for the right one: the mean is right
        truth = y_scan[test_scans]
        first = np.r_[True, test_scans[1:] != test_scans[:-1]]
        p1 = np.where(first, 1.0 - truth, 0.8 * truth + 0.1)
        return np.column_stack([1 - p1, p1])

    scores = cv_scores(fit_predict, x, np.repeat(y_scan, w), scan, "classification", [1.0, 2.0], seed=0, n_classes=2)
    assert sorted(tested) == sorted(list(range(n_scans)) * 2)
    np.testing.assert_allclose(scores, [1.0, 1.0])
