"""Site-side DP-SGD in a real 2-site federation on loopback (SuperLink + 2 SuperNodes + `flwr run`).

1. Federated pretraining, the same rounds at site budgets epsilon = inf (no DP), 8 and 2 (noise calibrated
   to each budget over the planned steps): the loss per round (the server's round_metrics.csv) and each
   site's epsilon spent (its reply metrics).
2. Federated fine-tuning of the epsilon-8 backbone on `sex` (generated cohort) with DP at the sites
   (a fresh budget of 8) and without: the test metrics (`test_metrics.json`).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/privacy_budget.py --out runs/privacy_budget
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.demo import prepare_federation
from brainjepa.federation.flower import LocalFederation, write_app_dir
from server.config import FederationConfig, to_run_config

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
log = logging.getLogger("privacy_budget")


def site_yamls(demo_yamls: list[Path], tag: str, epsilon: float, ledger_dir: Path) -> list[Path]:
    """A copy of each site YAML (same folder, same data) with a privacy section (none for epsilon inf)."""
    out = []
    for y in demo_yamls:
        p = y.with_name(f"{tag}.yaml")
        extra = "" if math.isinf(epsilon) else (
            f"privacy: {{enabled: true, target_epsilon: {epsilon}, delta: 1.0e-5, max_grad_norm: 1.0, "
            f"ledger: '{ledger_dir / (y.parent.name + '-ledger.json')}'}}\n")  # fmt: skip
        p.write_text(y.read_text() + extra)
        out.append(p)
    return out


def federate(work: Path, yamls: list[Path], gradients: Path, run_config: dict) -> tuple[Path, Path]:
    dumps = work / "dumps"
    nodes = [{"site-config": str(y), "gradients": str(gradients), "dump-updates-dir": str(dumps)} for y in yamls]
    app = write_app_dir(work / "app", run_config)
    with LocalFederation(work, nodes, env_extra=ENV) as fed:
        res = fed.run(app, timeout_s=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-3000:])
    (run_dir,) = list((work / "runs").glob("*-run*"))
    return run_dir, dumps


def main(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/privacy_budget"),
         rounds: int = 6, local_steps: int = 4, subjects: int = 40, batch: int = 8, ft_steps: int = 40,
         budgets: str = "inf,8,2", ft_method: str = "finetune") -> None:  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = out.resolve()
    demo = prepare_federation(out / "sites", n_sites=2, subjects=subjects, n_rois=50, n_frames=64)
    results: dict = {"pretrain": {}, "finetune": {}}
    base = dict(n_rois=50, n_frames=64, local_steps=local_steps, batch_size=batch, num_rounds=rounds, min_sites=2)
    for eps in (float(b) for b in budgets.split(",")):
        tag = "eps-inf" if math.isinf(eps) else f"eps-{eps:g}"
        work = out / tag
        yamls = site_yamls(demo.site_yamls, tag, eps, work / "ledgers")
        cfg = FederationConfig(**base, out_dir=str(work / "runs"), gradients=str(demo.gradients))  # type: ignore[arg-type]
        run_dir, dumps = federate(work, yamls, demo.gradients, to_run_config(cfg))
        with open(run_dir / "round_metrics.csv", newline="") as f:
            losses = [float(r["loss"]) for r in csv.DictReader(f)]
        last = sorted(dumps.glob(f"round-{rounds:03d}/*.json"))
        metrics = [json.loads(p.read_text())["metrics"] for p in last]
        results["pretrain"][tag] = {"loss_per_round": losses, "run_dir": str(run_dir),
                                    "epsilon_spent": [m.get("epsilon-spent") for m in metrics],
                                    "noise_multiplier": [m.get("dp-noise-multiplier") for m in metrics],
                                    "sample_rate": [m.get("dp-sample-rate") for m in metrics]}  # fmt: skip
        log.info("%s: loss per round %s, epsilon %s", tag, [f"{v:.4f}" for v in losses],
                 results["pretrain"][tag]["epsilon_spent"])  # fmt: skip
    ckpt = Path(results["pretrain"]["eps-8"]["run_dir"]) / "checkpoint.pt"
    ds = out / "downstream.yaml"
    ds.write_text("task: {name: sex, column: sex, kind: classification, classes: ['0', '1']}\n"
                  f"recipe: {{method: {ft_method}, steps: {ft_steps}, batch_size: {batch}, lr: 1.0e-3, "
                  f"eval_every: {ft_steps // 2}}}\n")  # fmt: skip
    for eps in (math.inf, 8.0):
        tag = "ft-eps-inf" if math.isinf(eps) else f"ft-eps-{eps:g}"
        work = out / tag
        yamls = site_yamls(demo.site_yamls, tag, eps, work / "ledgers")
        cfg = FederationConfig(**{**base, "local_steps": 10}, task="probe" if ft_method == "probe" else "finetune", checkpoint=str(ckpt),  # type: ignore[arg-type]
                               downstream_config=str(ds), out_dir=str(work / "runs"), gradients=str(demo.gradients))
        run_dir, dumps = federate(work, yamls, demo.gradients, to_run_config(cfg))
        test = json.loads((run_dir / "test_metrics.json").read_text())
        eps_spent = [json.loads(p.read_text())["metrics"].get("epsilon-spent")
                     for p in sorted(dumps.glob(f"{ft_method}/round-*/*.json"))[-2:]]  # fmt: skip
        results["finetune"][tag] = {"test": test, "epsilon_spent": eps_spent, "run_dir": str(run_dir)}
        log.info("%s: test %s, epsilon %s", tag, test, eps_spent)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    typer.echo(json.dumps(results, indent=1))


if __name__ == "__main__":
    typer.run(main)
