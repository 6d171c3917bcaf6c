"""Issue 12: the frozen probe's balanced accuracy along pretraining runs (docs/results.md section 7).

Each run is a `brainjepa evaluate` summary.csv of a protocol whose experiments are named "step N", one per
checkpoint kept along a pretraining run (`train.keep_every`); the baseline summary holds the random-init
probe and FC rows of the same test set. One panel per task: probe mean +- std over seeds per step, the
random-init probe as a band (mean +- std), random init + 10 points (the acceptance line) and FC.

    .venv/bin/python scripts/experiments/probe_curve.py --out docs/results/issue12/session6/probe_curve.png \\
        --baseline docs/results/issue12/session6/cv/summary.csv \\
        --run "4,000-step run=docs/results/issue12/session6/curve/summary.csv" \\
        --run "8,000-step run=docs/results/issue12/session6/curve_long/summary.csv"
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def curve(rows: list[dict[str, str]], task: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean %, std %) of the probe rows of experiments named 'step N', in step order."""
    pts = sorted((int(r["experiment"].split()[-1]), 100 * float(r["balanced_acc_mean"]), 100 * float(r["balanced_acc_std"]))
                 for r in rows if r["method"] == "probe" and r["task"] == task and r["experiment"].startswith("step "))  # fmt: skip
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=summary.csv of a 'step N' protocol")
    ap.add_argument("--baseline", type=Path, required=True, help="summary.csv with random_probe and fc rows")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base = read(args.baseline)
    tasks = sorted({r["task"] for r in base}, reverse=True)  # sex, diagnosis
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), sharey=True)
    for ax, task in zip(axes, tasks, strict=True):
        for spec in args.run:
            label, path = spec.split("=", 1)
            steps, mean, std = curve(read(Path(path)), task)
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=f"probe, {label}")
        for r in base:
            if r["task"] != task:
                continue
            m, s = 100 * float(r["balanced_acc_mean"]), 100 * float(r["balanced_acc_std"])
            if r["method"] == "random_probe":
                ax.axhspan(m - s, m + s, color="grey", alpha=0.25, label="random init (mean +- std)")
                ax.axhline(m + 10, color="grey", ls="--", label="random init + 10")
            elif r["method"] == "fc":
                ax.axhline(m, color="black", ls=":", label="FC")
        ax.set(title=task, xlabel="pretraining step", ylabel="balanced accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
