"""`brainjepa-server simulate` (Flower's Ray simulation): it prepares its sites first, trains, loss falls."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import FLOWER_ENV

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes


def _live_cmdlines() -> list[str]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                out.append(Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return out


def test_simulation_demo_three_sites(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "brainjepa-server"
    cmd = [
        str(cli),
        "simulate",
        "--sites",
        "3",
        "--subjects",
        "10",
        "--rounds",
        "3",
        "--local-steps",
        "2",
        "--out-dir",
        str(tmp_path / "runs"),
        "--run-config",
        "n-rois=50",
        "--run-config",
        "n-frames=64",
        "--run-config",
        "batch-size=4",
    ]
    res = subprocess.run(
        cmd, env={**os.environ, **FLOWER_ENV}, capture_output=True, text=True, timeout=500, check=False
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "outputs under" in out, out[-4000:]
    assert len(list((tmp_path / "runs" / "sites").glob("*/*.yaml"))) == 3  # prepared before Flower started
    # The detached simulation SuperLink (its --log-file lies under our FLWR_HOME) was stopped.
    assert not [p for p in _live_cmdlines() if str(tmp_path) in p]
    (run_dir,) = [p for p in (tmp_path / "runs").glob("*-run*") if p.is_dir()]
    with open(run_dir / "round_metrics.csv", newline="") as f:
        rounds = list(csv.DictReader(f))
    assert [r["sites_ok"] for r in rounds] == ["3", "3", "3"]
    losses = [float(r["loss"]) for r in rounds]
    assert losses[-1] < losses[0], losses
    with open(run_dir / "site_metrics.csv", newline="") as f:
        assert {r["site"] for r in csv.DictReader(f)} == {"site_a", "site_b", "site_c"}
    assert (run_dir / "loss_per_round.png").exists() and (run_dir / "checkpoint.pt").exists()
    with open(run_dir / "monitor.csv", newline="") as f:  # the collapse monitor on the global target
        monitor = list(csv.DictReader(f))
    assert [r["round"] for r in monitor] == ["1", "2", "3"] and all(float(r["rank"]) > 1.0 for r in monitor)
    assert (run_dir / "collapse_per_round.png").exists()
