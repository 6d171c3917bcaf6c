"""`flwr run APP local` (Flower's Ray simulation): the demo generates its sites, trains, loss falls."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from brainjepa.federation.flower import run_simulation, write_app_dir
from server.config import FederationConfig, to_run_config

REPO = Path(__file__).resolve().parents[1]
# One BLAS thread per Flower process: several sites share the 2 test cores.
ENV = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


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
    cfg = FederationConfig(out_dir=str(tmp_path / "runs"), n_rois=50, n_frames=64, batch_size=4, demo_sites=3,
                           demo_subjects=10, num_rounds=3, local_steps=2, min_sites=3)  # fmt: skip
    app = write_app_dir(tmp_path / "app", to_run_config(cfg))
    res = run_simulation(app, tmp_path, num_supernodes=3, env_extra=ENV, timeout_s=400)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "outputs under" in out, out[-4000:]
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
