"""scripts/paired_runs.py: two evaluations of one protocol compared on the same subjects."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_perf_scripts import SCRIPTS, _load

from brainjepa.errors import DataError

paired = _load("paired_runs")
FIELDS = [
    "experiment",
    "method",
    "training",
    "task",
    "seed",
    "cohort",
    "site",
    "trained_on",
    "subject",
    "y",
    "p0",
    "p1",
]


def write_predictions(path: Path, y: np.ndarray, p1: np.ndarray, sites: np.ndarray) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for i, (yi, pi, si) in enumerate(zip(y, p1, sites, strict=True)):
            w.writerow(
                dict(
                    zip(
                        FIELDS,
                        ["new sites", "probe", "centralized", "sex", 0, "-", si, "a+b", i, yi, 1 - pi, pi],
                        strict=True,
                    )
                )
            )
    return path


def test_a_run_against_itself_differs_by_zero_and_a_better_run_wins(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.tile([0.0, 1.0], 60)
    sites = np.repeat(["site_d", "site_e"], 60)
    noisy = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.25, y.size), 0, 1)  # AUROC ~ 0.75
    sharp = np.clip(0.5 + 0.8 * (y - 0.5) + rng.normal(0, 0.1, y.size), 0, 1)  # AUROC ~ 1
    a = write_predictions(tmp_path / "a.csv", y, sharp, sites)
    b = write_predictions(tmp_path / "b.csv", y, noisy, sites)

    same = paired.compare_runs(b, b, n_boot=200)
    assert {r["metric"] for r in same} == {"balanced_acc", "auroc"}
    for r in same:
        assert (r["a_minus_b"].estimate, r["a_minus_b"].lo, r["a_minus_b"].hi) == (0.0, 0.0, 0.0)

    (auroc,) = [r for r in paired.compare_runs(a, b, n_boot=200) if r["metric"] == "auroc"]
    assert auroc["a"].estimate > 0.95 and 0.6 < auroc["b"].estimate < 0.9
    d = auroc["a_minus_b"]
    assert d.estimate == pytest.approx(auroc["a"].estimate - auroc["b"].estimate) and d.lo > 0

    table = paired.markdown([auroc], "sharp", "noisy")
    assert (
        "| sharp | noisy | sharp - noisy (paired) |" in table and "| new sites | sex | probe · centralized |" in table
    )


def test_other_subjects_or_no_shared_method_are_refused(tmp_path: Path) -> None:
    y = np.tile([0.0, 1.0], 10)
    sites = np.repeat(["site_d"], 20)
    a = write_predictions(tmp_path / "a.csv", y, np.full(20, 0.5), sites)
    flipped = write_predictions(tmp_path / "b.csv", 1 - y, np.full(20, 0.5), sites)
    with pytest.raises(DataError, match="different subjects or truths"):
        paired.compare_runs(a, flipped, n_boot=50)
    with pytest.raises(DataError, match="no such predictions file"):
        paired.compare_runs(a, tmp_path / "missing.csv")


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "paired_runs.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    assert "--label-a" in out.stdout and "paired difference" in out.stdout
