"""The collapse monitor's content measures of a protocol's pretraining runs, measured after the fact.

For every generated cohort of the protocol, the checkpoint of its pretraining run (OUT/pretrain/, the key
`brainjepa evaluate` caches it under) is measured on a fixed probe batch of its pretraining scans (the
centred window of the first N training scans, masks drawn with seed 0, as `brainjepa.monitor` does):
`position_share` (the share of the LayerNorm-ed target features' variance that the token position alone
explains) and `context_gain` (the loss with another scan's context over the loss with the scan's own,
for the targets the run trained on, `optim.target_norm`). Runs pretrained before the monitor measured
these are measured the same way as new ones. Prints a Markdown table (one row per cohort, then the mean):

    .venv/bin/python scripts/pretext_content.py --protocol experiments/what_each_method_reads/coupling.yaml \\
        --out-dir experiments/what_each_method_reads/coupling --probe-scans 32
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import load_pretrain_config
from brainjepa.data import load_pretraining_cohort, pretraining_stream
from brainjepa.downstream.generated_cohorts import protocol_cohorts
from brainjepa.downstream.protocol import load_protocol, pretrain_key
from brainjepa.jepa import JEPAModels
from brainjepa.masks import sample_masks
from brainjepa.monitor import content_stats, probe_batch


def measure(protocol: Path, out_dir: Path, probe_scans: int) -> list[tuple[str, float, float]]:
    p = load_protocol(protocol)
    exp = p.experiments[0]
    rows = []
    for cp in protocol_cohorts(p, out_dir, progress=False):
        ckpt_path = out_dir / "pretrain" / pretrain_key(cp, exp.pretrain, None) / "checkpoint.pt"
        if not ckpt_path.is_file():
            raise SystemExit(f"{ckpt_path}: no pretraining run; run `brainjepa evaluate` on the protocol first")
        ckpt = load_checkpoint(ckpt_path)
        sites = [str(cp.site_config(s).source) for s in exp.pretrain]
        cfg = load_pretrain_config(
            p.source.parent / p.pretrain.config, {"data.site": "", "data.roi_dir": "", "data.sites": sites}
        )
        stream = pretraining_stream(load_pretraining_cohort(cfg), cfg)
        probe = torch.nan_to_num(probe_batch(stream.packed, cfg.model.n_frames, probe_scans))  # (B, R, T)
        models = JEPAModels(cfg.model, torch.from_numpy(ckpt["gradients"]).float())
        models.load_state_dict(ckpt["models"])
        B, R, T = probe.shape
        masks = sample_masks(cfg.mask, B, R, T // cfg.model.patch_size, torch.Generator().manual_seed(0))
        share, gain = content_stats(models, probe, masks, cfg.optim.loss, cfg.optim.target_norm)
        rows.append((cp.cohort, share, gain))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", type=Path, required=True, help="a protocol with generated cohorts")
    ap.add_argument("--out-dir", type=Path, required=True, help="the folder `brainjepa evaluate` cached its runs in")
    ap.add_argument("--probe-scans", type=int, default=32, help="training scans in the probe batch")
    args = ap.parse_args()
    rows = measure(args.protocol, args.out_dir, args.probe_scans)
    print("| cohort | position_share | context_gain |\n|---|---|---|")
    for cohort, share, gain in rows:
        print(f"| {cohort} | {share:.3f} | {gain:.3f} |")
    mean = [math.fsum(r[i] for r in rows) / len(rows) for i in (1, 2)]
    print(f"| mean | {mean[0]:.3f} | {mean[1]:.3f} |")


if __name__ == "__main__":
    main()
