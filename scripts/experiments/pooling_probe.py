"""Issue 12, Deliver 2 (diagnostic, forward passes only): what a random-init tiny encoder's features
keep of the label signal under each pooling, and how large the positional term is against the patch
embedding. Generated cohorts (3 sites x 80 subjects, 100 ROIs); train on sites A + B, test on site C;
StandardScaler (+ PCA 64 when wider) + logistic regression; balanced accuracy. One JSON line per row.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/pooling_probe.py --out docs/results/issue12/pooling_probe.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainjepa.config import ModelConfig
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.gradients import gradients_for
from brainjepa.vit import Encoder
from sites.config import load_site_config
from sites.synth import generate_cohorts
from sites.windows import multi_windows, pack

TASKS = [TaskSpec("sex", "sex", "classification", ("0", "1")),
         TaskSpec("diagnosis", "diagnosis", "classification", ("0", "1"))]  # fmt: skip


def site_data(data: Path, site: str, scaling: str) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    xs, ys = [], {}
    for t in TASKS:
        s = load_labelled_site(load_site_config(data / site / f"{site}.yaml"), t, 2.205, 160, scaling)
        xs = [x for sp in s.splits.values() for x in sp.series]
        ys[t.name] = np.concatenate([sp.y for sp in s.splits.values()])
    return xs, ys


@torch.no_grad()
def pooled(enc: Encoder, xs: list[np.ndarray], demean: bool) -> dict[str, np.ndarray]:
    if demean:
        xs = [x - x.mean(1, keepdims=True) for x in xs]
    w = torch.from_numpy(multi_windows(pack(xs), 160, 2))  # (N, 2, R, T)
    toks = []
    for i in range(0, w.shape[0], 8):
        part = w[i : i + 8]
        h = enc(part.reshape(-1, *part.shape[2:]))  # (n*2, R*W, D)
        toks.append(h.reshape(part.shape[0], 2, 100, -1, h.shape[-1]))  # (n, 2, R, W, D)
    h = torch.cat(toks)
    N = h.shape[0]
    return {"mean": h.mean((2, 3)).mean(1).numpy(),
            "roi_mean": h.mean(3).mean(1).reshape(N, -1).numpy(),
            "roi_std": torch.cat([h.mean(3), h.std(3)], -1).mean(1).reshape(N, -1).numpy(),
            "roi_std_only": h.std(3).mean(1).reshape(N, -1).numpy()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/p12/synth")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = Path(a.data)
    if not (data / "site_c").exists():
        generate_cohorts(data, n_sites=3, subjects_per_site=80, n_rois=100, seed=0, duration_s=600)
    cfg = ModelConfig(size="tiny", n_rois=100, n_frames=160, patch_size=16, gradient_components=30)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(a.out, "a")
    for scaling in ("robust", "scan"):
        sites = {s: site_data(data, s, scaling) for s in ("site_a", "site_b", "site_c")}
        grads, _ = gradients_for("", sites["site_a"][0], 30, "site_a")
        torch.manual_seed(0)
        enc = Encoder(cfg, torch.from_numpy(grads)).eval()
        x = torch.from_numpy(multi_windows(pack(sites["site_a"][0][:32]), 160, 1)[:, 0])
        with torch.no_grad():
            pe, pos, h = enc.patch_embed(x), enc.pos_embed(), enc(x)
        row = {"kind": "magnitudes", "scaling": scaling, "patch_embed_rms": float(pe.pow(2).mean().sqrt()),
               "pos_embed_rms": float(pos.pow(2).mean().sqrt()),
               "pooled_between_scan_std": float(h.mean(1).std(0).mean()),
               "token_std": float(h.reshape(-1, h.shape[-1]).std(0).mean())}  # fmt: skip
        out.write(json.dumps(row) + "\n")
        print(row, flush=True)
        for demean in (False, True):
            feats = {s: pooled(enc, sites[s][0], demean) for s in sites}
            for pool in feats["site_a"]:
                Xtr = np.concatenate([feats["site_a"][pool], feats["site_b"][pool]])
                for t in TASKS:
                    ytr = np.concatenate([sites["site_a"][1][t.name], sites["site_b"][1][t.name]])
                    steps = [StandardScaler()] + ([PCA(64, random_state=0)] if Xtr.shape[1] > 64 else [])
                    clf = make_pipeline(*steps, LogisticRegression(C=0.1, max_iter=3000)).fit(Xtr, ytr)
                    b = balanced_accuracy_score(sites["site_c"][1][t.name], clf.predict(feats["site_c"][pool]))
                    row = {"kind": "random_init_probe", "scaling": scaling, "demean": demean, "pool": pool,
                           "task": t.name, "bacc_site_c": round(float(b), 4)}  # fmt: skip
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(row, flush=True)
        for t in TASKS:  # the per-ROI std reference point
            f = {s: np.stack([x.std(1) for x in sites[s][0]]) for s in sites}
            ytr = np.concatenate([sites["site_a"][1][t.name], sites["site_b"][1][t.name]])
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
            clf.fit(np.concatenate([f["site_a"], f["site_b"]]), ytr)
            b = balanced_accuracy_score(sites["site_c"][1][t.name], clf.predict(f["site_c"]))
            out.write(json.dumps({"kind": "roi_std_of_input", "scaling": scaling, "task": t.name,
                                  "bacc_site_c": round(float(b), 4)}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
