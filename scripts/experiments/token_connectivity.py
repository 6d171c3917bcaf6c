"""Issue 12 (docs/results.md 6b): does a token-space connectivity pooling read what `roi_std` misses?

Embeds every scan's 4 evaluation windows with a pretraining checkpoint's frozen EMA target and with the
same encoder at random init (three seeds), pools the tokens three ways, and scores class-balanced
logistic regression (three strengths C) trained on sites A + B (train + val) and tested on site C:

- `roi_std`: per ROI the mean and std over time of its tokens (the shipped pooling), R x 2D;
- `tokfc`: per window the ROI x ROI correlation of the ROIs' token sequences (W x D values each),
  Fisher z, upper triangle, R (R - 1) / 2;
- `std+tokfc`: both.

Features are averaged over the windows. Prints one line per (task, encoder, pooling): balanced accuracy
at each C.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/token_connectivity.py \\
        --data DATA --checkpoint RUN/checkpoint.pt --test-yaml site_c_test_only.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.downstream.model import load_backbone
from brainjepa.vit import Encoder
from sites.config import load_site_config
from sites.windows import multi_windows, pack

TASKS = [TaskSpec("sex", "sex", "classification", ("0", "1")),
         TaskSpec("diagnosis", "diagnosis", "classification", ("0", "1"))]  # fmt: skip
STRENGTHS = (1e-3, 1e-2, 1e-1)
N_WINDOWS = 4


def fisher_corr(v: torch.Tensor) -> torch.Tensor:
    """(n, R, S) -> (n, R (R - 1) / 2): Fisher-z correlation of every ROI pair over the S values."""
    v = v - v.mean(-1, keepdim=True)
    v = v / (v.norm(dim=-1, keepdim=True) + 1e-8)
    c = (v @ v.transpose(1, 2)).clamp(-0.999, 0.999)  # (n, R, R)
    i, j = torch.triu_indices(c.shape[1], c.shape[1], 1)
    return torch.atanh(c[:, i, j])


@torch.no_grad()
def pooled(enc: Encoder, series: list[np.ndarray], n_frames: int) -> dict[str, np.ndarray]:
    enc.eval()
    w = torch.from_numpy(multi_windows(pack(series), n_frames, N_WINDOWS))  # (N, W4, R, T)
    out: dict[str, list[torch.Tensor]] = {"roi_std": [], "tokfc": []}
    for part in w.split(16):
        n, _, R, _ = part.shape
        h = enc(part.reshape(-1, *part.shape[2:]))  # (n W4, N_tok, D), ROI-major tokens
        h = h.reshape(n * N_WINDOWS, R, -1, h.shape[-1])  # (n W4, R, W, D)
        out["roi_std"].append(torch.cat([h.mean(2), h.std(2)], -1).reshape(n, N_WINDOWS, -1).mean(1))
        out["tokfc"].append(fisher_corr(h.reshape(n * N_WINDOWS, R, -1)).reshape(n, N_WINDOWS, -1).mean(1))
    f = {k: torch.cat(v).numpy() for k, v in out.items()}
    f["std+tokfc"] = np.concatenate([f["roi_std"], f["tokfc"]], 1)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="brainjepa synth output (site_a, site_b, site_c)")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--test-yaml", default="site_c.yaml", help="site C's YAML (a test-only one scores all)")
    ap.add_argument("--scaling", default="centered")
    a = ap.parse_args()
    torch.set_num_threads(1)
    bb = load_backbone(a.checkpoint)
    grads = torch.from_numpy(bb.gradients)
    encoders = [("pretrained", Encoder(bb.model, grads))]
    encoders[0][1].load_state_dict(bb.weights)
    for seed in (10_000, 10_001, 10_002):
        torch.manual_seed(seed)
        encoders.append((f"random{seed}", Encoder(bb.model, grads)))
    n_frames = bb.model.n_frames

    def split_xy(site: str, yaml_name: str, splits: tuple[str, ...], task: TaskSpec, training: bool):
        s = load_labelled_site(load_site_config(a.data / site / yaml_name), task, 2.205, n_frames, a.scaling,
                               training=training)  # fmt: skip
        return [x for n in splits for x in s.splits[n].series], np.concatenate([s.splits[n].y for n in splits])

    for task in TASKS:
        xa, ya = split_xy("site_a", "site_a.yaml", ("train", "val"), task, True)
        xb, yb = split_xy("site_b", "site_b.yaml", ("train", "val"), task, True)
        xc, yc = split_xy("site_c", a.test_yaml, ("test",), task, False)
        ytr = np.concatenate([ya, yb])
        for name, enc in encoders:
            ftr, fte = pooled(enc, xa + xb, n_frames), pooled(enc, xc, n_frames)
            for pool in ftr:
                sc = StandardScaler().fit(ftr[pool])
                accs = []
                for c in STRENGTHS:
                    clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
                    clf.fit(sc.transform(ftr[pool]), ytr)
                    accs.append(round(balanced_accuracy_score(yc, clf.predict(sc.transform(fte[pool]))), 3))
                print(task.name, name, pool, accs, flush=True)


if __name__ == "__main__":
    main()
