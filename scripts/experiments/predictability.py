"""Issue 12, section 4a: how much of a masked token's content the context can predict at all.

Cross-ROI: each ROI's frame from all other ROIs at the same frame (one ridge map for the cohort, fitted
on 60 scans of site A, scored on the rest). Cross-time: the correlation of a ROI's frame with the same
ROI one patch (16 frames) later, against one frame later.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/experiments/predictability.py --data /tmp/p12/synth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV

from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from sites.config import load_site_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/p12/synth", help="generated cohorts (transfer.py makes them)")
    ap.add_argument("--frames", type=int, default=160)
    a = ap.parse_args()
    task = TaskSpec("sex", "sex", "classification", ("0", "1"))
    for scaling in ("scan", "robust"):
        site = load_labelled_site(load_site_config(Path(a.data) / "site_a" / "site_a.yaml"), task, 2.205, a.frames, scaling)
        xs = [x - x.mean(1, keepdims=True) for sp in site.splits.values() for x in sp.series]  # (R, L) each
        fit, held = np.concatenate([x.T for x in xs[:60]]), np.concatenate([x.T for x in xs[60:]])  # (frames, R)
        r2 = []
        for r in range(0, fit.shape[1], 5):
            others = np.delete(np.arange(fit.shape[1]), r)
            pred = RidgeCV(alphas=[0.1, 1, 10, 100]).fit(fit[:, others], fit[:, r]).predict(held[:, others])
            r2.append(1 - ((held[:, r] - pred) ** 2).mean() / held[:, r].var())
        lag = {k: np.mean([np.corrcoef(x[:, :-k].ravel(), x[:, k:].ravel())[0, 1] for x in xs[60:]]) for k in (1, 16)}
        print(f"{scaling}: cross-ROI R2 median {np.median(r2):.3f} (10-90 %: {np.quantile(r2, 0.1):.3f}-"
              f"{np.quantile(r2, 0.9):.3f}); lag 1 frame r {lag[1]:.3f}, lag 16 frames r {lag[16]:.3f}")


if __name__ == "__main__":
    main()
