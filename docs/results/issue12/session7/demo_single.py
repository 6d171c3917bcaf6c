"""Single-machine pretraining on the demo's sites (train splits of all three), keeping checkpoints."""
import logging
import sys
from pathlib import Path

import brainjepa.pretrain as pt
from brainjepa.config import load_pretrain_config

logging.basicConfig(level=logging.INFO)
root = Path("/work/main/runs/fed_demo200/sites")
sites = [str(root / f"{s}/{s}.yaml") for s in ("site_a", "site_b", "site_c")]
cfg = load_pretrain_config(Path("/tmp/p18/pretrain_small_cohorts.yaml"), {
    "data.site": "", "data.roi_dir": "", "data.sites": sites, "data.gradients": str(root / "gradients.npy"),
    "train.steps": int(sys.argv[2]), "train.seed": 0, "train.out_dir": sys.argv[1],
    "train.checkpoint_every": 500, "train.keep_every": int(sys.argv[3])})
pt.pretrain(cfg, progress=False)
