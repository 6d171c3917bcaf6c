"""Issue 12, Deliver 2: why a tiny ViT trained from scratch on labels stays at chance.

Generated cohorts (3 sites x 80 subjects, 100 ROIs), train on sites A + B, test on site C. The same tiny
encoder (random init) with several poolings / inputs / LRs, trained on the labels; per-ROI std +
logistic regression as the reference point. Writes one JSON line per variant to --out.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/learnability.py --out docs/results/learnability.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from brainjepa.config import ModelConfig
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.gradients import gradients_for
from brainjepa.vit import Encoder, init_weights
from sites.config import load_site_config
from sites.synth import generate_cohorts
from sites.windows import multi_windows, pack, random_windows


def load(data: Path, task: TaskSpec, scaling: str, n_frames: int):
    out = {}
    for s in ("site_a", "site_b", "site_c"):
        site = load_labelled_site(load_site_config(data / s / f"{s}.yaml"), task, 2.205, n_frames, scaling)
        xs = [x for sp in site.splits.values() for x in sp.series]
        ys = np.concatenate([sp.y for sp in site.splits.values()])
        out[s] = (xs, ys)
    return out


class Head(nn.Module):
    """Encoder + pooling + head. pool: mean (all tokens) | roi (mean over time per ROI, flatten R*D) |
    roi_lin (mean over time per ROI, Linear(D->1) per token then Linear(R -> C))."""

    def __init__(self, cfg: ModelConfig, grads: torch.Tensor, pool: str, n_out: int = 2) -> None:
        super().__init__()
        self.enc, self.pool, self.cfg = Encoder(cfg, grads), pool, cfg
        D, R = cfg.embed_dim, cfg.n_rois
        if pool == "mean":
            self.head = nn.Sequential(nn.LayerNorm(D, eps=1e-6), nn.Linear(D, n_out))
        elif pool == "roi":
            self.head = nn.Sequential(nn.LayerNorm(D, eps=1e-6), nn.Flatten(), nn.Linear(R * D, n_out))
        elif pool == "roistd":  # per ROI: mean and std over time of its tokens
            self.head = nn.Sequential(nn.LayerNorm(2 * D, eps=1e-6), nn.Flatten(), nn.Linear(R * 2 * D, n_out))
        elif pool == "std":  # per ROI: std over time of its tokens
            self.head = nn.Sequential(nn.LayerNorm(D, eps=1e-6), nn.Flatten(), nn.Linear(R * D, n_out))
        elif pool == "meanstd":
            self.head = nn.Sequential(nn.LayerNorm(2 * D, eps=1e-6), nn.Linear(2 * D, n_out))
        self.head.apply(init_weights)

    def forward(self, x):
        h = self.enc(x)  # (B, N, D)
        B, N, D = h.shape
        if self.pool == "mean":
            return self.head(h.mean(1))
        if self.pool == "meanstd":
            return self.head(torch.cat([h.mean(1), h.std(1)], -1))
        h = h.reshape(B, self.cfg.n_rois, -1, D)  # (B, R, W, D)
        if self.pool == "roistd":
            return self.head(torch.cat([h.mean(2), h.std(2)], -1))  # (B, R, 2D)
        if self.pool == "std":
            return self.head(h.std(2))  # (B, R, D)
        return self.head(h.mean(2))  # (B, R, D)


def run_variant(name, data, cfg, grads, pool, lr, steps, seed, demean, batch=16):
    torch.manual_seed(seed)
    model = Head(cfg, grads, pool)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    xs = data["site_a"][0] + data["site_b"][0]
    ys = np.concatenate([data["site_a"][1], data["site_b"][1]])
    if demean:
        xs = [x - x.mean(1, keepdims=True) for x in xs]
    packed = pack(xs)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(len(xs), batch, replace=False)
        x, _ = random_windows(packed, idx, cfg.n_frames, rng)
        model.train()
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(ys[idx]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 50 == 49:
            print(f"{name} step {step + 1}: loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    test_x = data["site_c"][0]
    if demean:
        test_x = [x - x.mean(1, keepdims=True) for x in test_x]
    w = torch.from_numpy(multi_windows(pack(test_x), cfg.n_frames, 2))  # (N, W, R, T)
    model.eval()
    with torch.no_grad():
        p = model(w.reshape(-1, *w.shape[2:])).softmax(-1).reshape(w.shape[0], w.shape[1], -1).mean(1)
    bacc = balanced_accuracy_score(data["site_c"][1], p.argmax(-1).numpy())
    return {"variant": name, "pool": pool, "lr": lr, "steps": steps, "batch": batch, "demean": demean, "seed": seed,
            "bacc_test_c": round(float(bacc), 4), "loss_first50": round(float(np.mean(losses[:50])), 4),
            "loss_last50": round(float(np.mean(losses[-50:])), 4), "seconds": round(time.perf_counter() - t0, 1)}


def roi_std_baseline(data):
    def feats(xs):
        return np.stack([x.std(1) for x in xs])
    Xtr = feats(data["site_a"][0] + data["site_b"][0])
    ytr = np.concatenate([data["site_a"][1], data["site_b"][1]])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(Xtr, ytr)
    return float(balanced_accuracy_score(data["site_c"][1], clf.predict(feats(data["site_c"][0]))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/p12/synth")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="sex")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default="all")
    ap.add_argument("--scaling", default="robust")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data_dir = Path(a.data)
    if not (data_dir / "site_c").exists():
        generate_cohorts(data_dir, n_sites=3, subjects_per_site=80, n_rois=100, seed=0, duration_s=600)
    task = TaskSpec(a.task, a.task, "classification", ("0", "1"))
    cfg = ModelConfig(size="tiny", n_rois=100, n_frames=160, patch_size=16, gradient_components=30)
    data = load(data_dir, task, a.scaling, cfg.n_frames)
    grads, _ = gradients_for("", data["site_a"][0], 30, "site_a")
    grads = torch.from_numpy(grads)
    out = open(a.out, "a")
    out.write(json.dumps({"variant": "roi_std_logreg", "task": a.task, "scaling": a.scaling,
                          "bacc_test_c": round(roi_std_baseline(data), 4)}) + "\n")
    out.flush()
    variants = [
        ("roi_lr1e-3", "roi", 1e-3, False), ("roistd_lr1e-3_demean", "roistd", 1e-3, True),
        ("std_lr1e-3_demean", "std", 1e-3, True), ("mean_lr1e-3", "mean", 1e-3, False),
        ("mean_lr3e-4", "mean", 3e-4, False), ("meanstd_lr1e-3", "meanstd", 1e-3, False),
        ("roi_lr1e-3_demean", "roi", 1e-3, True), ("mean_lr1e-3_demean", "mean", 1e-3, True),
    ]
    for name, pool, lr, demean in variants:
        if a.variants != "all" and name not in a.variants.split(","):
            continue
        r = run_variant(name, data, cfg, grads, pool, lr, a.steps, 0, demean)
        r.update(task=a.task, scaling=a.scaling)
        out.write(json.dumps(r) + "\n")
        out.flush()
        print(r, flush=True)


if __name__ == "__main__":
    main()
