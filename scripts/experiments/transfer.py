"""Issue 12, Deliver 3: do pretrained features beat random ones? One pretraining recipe per call.

Pretrains a tiny model on site A of the generated cohorts (`brainjepa.pretrain.pretrain`, overrides as
section.key=value), then embeds sites B + C with the frozen EMA target (4 windows per scan, averaged) and
with the same encoder at its random init, and scores 5-fold CV logistic regression (balanced accuracy)
on sex and diagnosis with three poolings: `mean` (all tokens, D), `roi` (mean over time per ROI, R x D),
`roi_std` (plus each ROI's token std over time). Appends one JSON line per (features, pooling, task).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/transfer.py --name base --out results.jsonl \
        --set train.steps=300 --set optim.lr=5e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import load_pretrain_config
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.monitor import read_rows
from brainjepa.pretrain import pretrain
from brainjepa.vit import Encoder
from sites.config import load_site_config
from sites.synth import generate_cohorts
from sites.windows import multi_windows, pack

TASKS = [TaskSpec("sex", "sex", "classification", ("0", "1")),
         TaskSpec("diagnosis", "diagnosis", "classification", ("0", "1"))]  # fmt: skip


def cohort(data: Path, scaling: str, n_frames: int, demean: bool = False) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    xs, ys = [], {t.name: [] for t in TASKS}
    for s in ("site_b", "site_c"):
        sites = [load_labelled_site(load_site_config(data / s / f"{s}.yaml"), t, 2.205, n_frames, scaling) for t in TASKS]
        for name in ("train", "val", "test"):
            xs += sites[0].splits[name].series
            for t, site in zip(TASKS, sites, strict=True):
                ys[t.name].append(site.splits[name].y)
    if demean:  # each scan's per-ROI time-mean removed (the robust scaling's global per-ROI scale kept)
        xs = [x - x.mean(1, keepdims=True) for x in xs]
    return xs, {k: np.concatenate(v) for k, v in ys.items()}


def demeaned_site_a(data: Path, out: Path, n_frames: int) -> Path:
    """Site A's series (robust-scaled, at the model TR) with each scan's per-ROI mean removed, as a
    folder of .npy files for `data.roi_dir`."""
    site = load_labelled_site(load_site_config(data / "site_a" / "site_a.yaml"), TASKS[0], 2.205, n_frames, "robust")
    out.mkdir(parents=True, exist_ok=True)
    for sp in site.splits.values():
        for x, sid in zip(sp.series, sp.ids, strict=True):
            np.save(out / f"{sid}.npy", (x - x.mean(1, keepdims=True)).astype(np.float32))
    return out


@torch.no_grad()
def tokens(enc: Encoder, xs: list[np.ndarray], n_frames: int, n_rois: int) -> torch.Tensor:
    """(N, 4, R, W, D): every scan's tokens in 4 windows (pooled per window, then averaged)."""
    enc.eval()
    w = torch.from_numpy(multi_windows(pack(xs), n_frames, 4))  # (N, 4, R, T)
    out = []
    for i in range(0, w.shape[0], 8):
        part = w[i : i + 8]
        h = enc(part.reshape(-1, *part.shape[2:]))  # (n*4, N_tok, D)
        out.append(h.reshape(part.shape[0], 4, n_rois, -1, h.shape[-1]))
    return torch.cat(out)


def pools(tok: torch.Tensor) -> dict[str, np.ndarray]:
    N, _, R, W, D = tok.shape  # pooled per window, then averaged over the 4 windows
    return {"mean": tok.mean((2, 3)).mean(1).numpy(),
            "roi": tok.mean(3).mean(1).reshape(N, R * D).numpy(),
            "roi_std": torch.cat([tok.mean(3), tok.std(3)], -1).mean(1).reshape(N, -1).numpy()}  # fmt: skip


def score(X: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    steps = [StandardScaler()]
    if X.shape[1] > 64:
        steps.append(PCA(64, random_state=seed))
    clf = make_pipeline(*steps, LogisticRegression(C=1.0, max_iter=3000))
    accs = []
    for rep in range(3):
        cv = StratifiedKFold(5, shuffle=True, random_state=seed + rep)
        accs.append(balanced_accuracy_score(y, cross_val_predict(clf, X, y, cv=cv)))
    return float(np.mean(accs)), float(np.std(accs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="/tmp/p12/synth")
    ap.add_argument("--base", default="configs/demo_pretrain.yaml")
    ap.add_argument("--set", action="append", default=[], help="section.key=value (YAML value)")
    ap.add_argument("--random", action="store_true", help="also score the random-init encoder")
    ap.add_argument("--patch-gain", type=float, default=1.0,
                    help="ablation: multiply the patch embedding's initial weights (data term vs positions)")
    ap.add_argument("--demean", action="store_true", help="pretrain and probe on offset-free series")
    ap.add_argument("--target-center", action="store_true",
                    help="ablation: regress batch-centred, batch-standardised target tokens (per position)")
    ap.add_argument("--pixel-target", action="store_true",
                    help="ablation: regress the masked patches' values (standardised) instead of target tokens")
    ap.add_argument("--reuse", action="store_true", help="score the run's existing checkpoint (no pretraining)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.patch_gain != 1.0:  # experiment-only: scale the patch embedding at init (encoder, hence target)
        init = Encoder.__init__

        def scaled_init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
            init(self, *args, **kwargs)
            with torch.no_grad():
                self.patch_embed.proj.weight.mul_(a.patch_gain)

        Encoder.__init__ = scaled_init
    if a.target_center:
        import torch.nn.functional as F

        import brainjepa.jepa as jepa_mod
        from brainjepa.vit import gather_tokens

        def centred_loss(models, x, masks, loss="smooth_l1", target_forward=None):  # noqa: ANN001
            with torch.no_grad():
                h = F.layer_norm(models.target(x), (models.cfg.embed_dim,))  # (B, N, D)
                h = (h - h.mean(0)) / (h.std(0) + 1e-3)  # each position's shared part removed
                target = gather_tokens(h, masks.target)  # (B, Nt, D)
            z = models.encoder(x, masks.context)
            pred = models.predictor(z, masks.context, masks.target)
            return F.smooth_l1_loss(pred.float(), target.float(), beta=1.0)

        jepa_mod.jepa_loss = centred_loss
    if a.pixel_target:
        import torch.nn.functional as F

        import brainjepa.jepa as jepa_mod
        from brainjepa.vit import gather_tokens

        def pixel_loss(models, x, masks, loss="smooth_l1", target_forward=None):  # noqa: ANN001
            p = models.cfg.patch_size
            patches = x.reshape(x.shape[0], -1, p)  # (B, N, p) ROI-major, as the patch embedding
            patches = (patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-2)
            target = gather_tokens(patches, masks.target)  # (B, Nt, p)
            z = models.encoder(x, masks.context)
            pred = models.predictor(z, masks.context, masks.target)[..., :p]
            return F.mse_loss(pred.float(), target.float())

        jepa_mod.jepa_loss = pixel_loss
    data = Path(a.data)
    if not (data / "site_c").exists():
        generate_cohorts(data, n_sites=3, subjects_per_site=80, n_rois=100, seed=0, duration_s=600)
    run_dir = Path("/tmp/p12/runs") / a.name
    overrides = {"data.site": str(data / "site_a" / "site_a.yaml"), "train.out_dir": str(run_dir),
                 "train.device": "cpu", "train.log_every": 10, "monitor.every": 20}  # fmt: skip
    if a.demean:
        roi_dir = demeaned_site_a(data, run_dir.parent / f"{a.name}_rois", 160)
        overrides.update({"data.site": "", "data.roi_dir": str(roi_dir), "data.scaling": "none"})
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    cfg = load_pretrain_config(a.base, overrides)
    t0 = time.perf_counter()
    if a.reuse:
        res = argparse.Namespace(checkpoint=run_dir / "checkpoint.pt", metrics=run_dir / "metrics.csv")
    else:
        res = pretrain(cfg, progress=False)
    secs = time.perf_counter() - t0
    ck = load_checkpoint(res.checkpoint)
    grads = torch.from_numpy(np.asarray(ck["gradients"], dtype=np.float32))
    target = Encoder(cfg.model, grads)
    target.load_state_dict({k.removeprefix("target."): v for k, v in ck["models"].items() if k.startswith("target.")})
    xs, ys = cohort(data, "robust" if a.demean else cfg.data.scaling, cfg.model.n_frames, a.demean)
    encs = {"pretrained": target}
    if a.random:
        torch.manual_seed(cfg.train.seed)
        encs["random"] = Encoder(cfg.model, grads)
    mon = read_rows(run_dir / "monitor.csv")
    with open(res.metrics) as f:
        import csv

        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    with open(a.out, "a") as out:
        for fname, enc in encs.items():
            feats = pools(tokens(enc, xs, cfg.model.n_frames, cfg.model.n_rois))
            for pname, X in feats.items():
                for task in TASKS:
                    m, s = score(X, ys[task.name])
                    row = {"name": a.name, "features": fname, "pool": pname, "task": task.name,
                           "bacc": round(m, 4), "cv_std": round(s, 4), "overrides": a.set,
                           "loss_first": round(float(np.mean(losses[:10])), 4),
                           "loss_last": round(float(np.mean(losses[-10:])), 4),
                           "rank_first": round(mon[0]["rank"], 2), "rank_last": round(mon[-1]["rank"], 2),
                           "spread_last": round(mon[-1]["spread"], 4), "pretrain_s": round(secs, 1)}  # fmt: skip
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(row, flush=True)


if __name__ == "__main__":
    main()
