"""Methods compared from per-subject predictions: strata, pooled single-class test sites, the report text."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from brainjepa.downstream import comparison


def _rows(method: str, cohort: str, site: str, y: np.ndarray, p1: np.ndarray) -> list[dict]:
    return [
        {
            "experiment": "e",
            "task": "t",
            "method": method,
            "training": "centralized",
            "seed": 0,
            "cohort": cohort,
            "site": site,
            "trained_on": "x",
            "subject": i,
            "y": float(y[i]),
            "p0": float(1 - p1[i]),
            "p1": float(p1[i]),
        }
        for i in range(y.size)
    ]


def _cohort(rng: np.random.Generator, method: str, ya: np.ndarray, yb: np.ndarray) -> list[dict]:
    pa = np.clip(0.3 * ya + 0.7 * rng.random(ya.size), 0, 1)
    pb = np.clip(0.3 * yb + 0.7 * rng.random(yb.size), 0, 1)
    return _rows(method, "gen0", "site_a", ya, pa) + _rows(method, "gen0", "site_b", yb, pb)


def test_sites_are_strata_when_each_holds_both_classes() -> None:
    rng = np.random.default_rng(0)
    ya, yb = np.array([0, 1] * 8), np.array([0, 0, 1] * 6)
    preds = _cohort(rng, "fc", ya, yb)
    cmp = comparison.compare(preds, {"t": "classification"}, n_boot=50, baselines=["fc"])
    est = next(r["estimate"] for r in cmp.rows if r["metric"] == "auroc" and not r["versus"])
    pa = np.array([r["p1"] for r in preds if r["site"] == "site_a"])
    pb = np.array([r["p1"] for r in preds if r["site"] == "site_b"])
    want = (ya.size * roc_auc_score(ya, pa) + yb.size * roc_auc_score(yb, pb)) / (ya.size + yb.size)
    assert abs(est - want) < 1e-12
    assert cmp.pooled == {}


def test_a_single_class_test_site_pools_its_cohort_into_one_stratum_and_the_report_says_so() -> None:
    rng = np.random.default_rng(1)
    ya, yb = np.zeros(16, dtype=int), np.array([0, 1] * 8)  # site_a: a single class, no AUROC of its own
    preds = _cohort(rng, "fc", ya, yb) + _cohort(np.random.default_rng(2), "probe", ya, yb)
    cmp = comparison.compare(preds, {"t": "classification"}, n_boot=50, baselines=["fc"])
    assert cmp.pooled == {("e", "t"): ("gen0",)}
    fc = [r for r in preds if r["method"] == "fc"]
    want = roc_auc_score([r["y"] for r in fc], [r["p1"] for r in fc])
    est = next(r["estimate"] for r in cmp.rows if (r["method"], r["metric"], r["versus"]) == ("fc", "auroc", ""))
    assert abs(est - want) < 1e-12
    lo, hi = next(
        (r["lo"], r["hi"]) for r in cmp.rows if (r["method"], r["metric"], r["versus"]) == ("fc", "auroc", "")
    )
    assert lo < est < hi
    text = comparison.markdown(cmp, "e", ["t"], {"t": "classification"})
    assert "gen0 holds a single class" in text and "one stratum" in text
