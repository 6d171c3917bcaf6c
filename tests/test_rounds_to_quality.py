"""scripts/rounds_to_quality.py: its --help, FedEMA's round start, and the report from a folder of runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_perf_scripts import SCRIPTS, _load
from typer.testing import CliRunner

from brainjepa.demo import prepare_federation
from brainjepa.pretrain import pretrain

rtq = _load("rounds_to_quality")


def test_help_names_the_schemes_and_the_equal_sample_budget() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "rounds_to_quality.py"), "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    for option in ("--partition", "--scheme", "--rounds", "--local-steps", "--samples-steps", "--tau"):
        assert option in out.stdout, option


def test_fedema_start_mixes_by_the_divergence_and_fixes_lambda_at_first_sight() -> None:
    glob = {"encoder": torch.zeros(4), "predictor": torch.zeros(2), "target": torch.ones(4)}
    own = {"encoder": torch.full((4,), 1.0), "predictor": torch.zeros(2)}  # divergence 2
    start, lam = rtq.fedema_start(glob, own, None, tau=0.5)
    assert lam == 0.25  # tau / the first divergence: mu = tau the first time
    assert torch.allclose(start["encoder"], torch.full((4,), 0.5)) and torch.equal(start["target"], glob["target"])
    far = {"encoder": torch.full((4,), 5.0), "predictor": torch.zeros(2)}  # divergence 10: mu capped at 1
    start, again = rtq.fedema_start(glob, far, lam, tau=0.5)
    assert again == lam and torch.equal(start["encoder"], far["encoder"])


def test_report_compares_each_run_with_the_central_one(tmp_path: Path) -> None:
    part = tmp_path / "iid"
    part.mkdir()
    runs = {
        ("central", 4, 50): [0.5, 0.45, 0.4, 0.3],
        ("fedavg", 4, 25): [0.6, 0.5, 0.45, 0.4],
        ("fedema", 4, 25): [0.35, 0.33, 0.31, 0.29],
    }
    for (scheme, rounds, k), losses in runs.items():
        with open(part / f"iid_{scheme}_r{rounds}_k{k}_s0.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["round", "val_loss"])
            w.writeheader()
            w.writerows({"round": i + 1, "val_loss": v} for i, v in enumerate(losses))
        row = {"partition": "iid", "scheme": scheme, "rounds": rounds, "local_steps": k, "seed": 0}
        row |= {"final_val_loss": losses[-1], "auroc": 0.8, "auroc_lo": 0.7, "auroc_hi": 0.9}
        row |= {"feature_rank": 12.0, "seconds": 3.0}
        with open(part / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    rtq.report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert (
        "| iid | 0 | fedavg | 4 x 25 | 0.4000 | +0.1000 | 80.0 [70.0, 90.0] | 12.0 | 0.600, 0.500, 0.450 | 3 |" in table
    )
    assert "| iid | 0 | fedema | 4 x 25 | 0.2900 | -0.0100 |" in table
    assert "| iid | 0 | central | 4 x 50 | 0.3000 | +0.0000 |" in table


@pytest.mark.slow  # generates a site and pretrains 2 steps
def test_checkpoint_measures_a_finished_run_on_the_validation_splits(tmp_path: Path) -> None:
    demo = prepare_federation(tmp_path / "sites", n_sites=1, subjects=60, n_rois=rtq.N_ROIS, n_frames=rtq.N_FRAMES)
    cfg = rtq.pretrain_config(demo.site_yamls, demo.gradients, steps=2, seed=0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4, out_dir=str(tmp_path / "run")))
    result = pretrain(cfg, progress=False)
    args = [
        "checkpoint",
        str(result.checkpoint),
        "--sites",
        str(tmp_path / "sites"),
        "--task",
        "sex",
        "--task",
        "diagnosis",
    ]
    out = CliRunner().invoke(rtq.app, args)
    assert out.exit_code == 0, out.output
    row = json.loads(out.output.strip().splitlines()[-1])
    assert row["step"] == 2 and 0 < row["val_loss"] < 10
    for name in ("sex", "diagnosis"):
        assert row[f"{name}_auroc_lo"] <= row[f"{name}_auroc"] <= row[f"{name}_auroc_hi"]
    assert row["feature_rank"] > 1 and 0 <= row["position_share"] <= 1 and row["context_gain"] > 0
    wrong = CliRunner().invoke(
        rtq.app, ["checkpoint", str(result.checkpoint), "--sites", str(tmp_path / "none")], env={"COLUMNS": "300"}
    )
    assert wrong.exit_code != 0 and "no site folder" in wrong.output
