"""The site's privacy accountant over real Flower processes: it survives a SuperNode (site) restart and a
SuperLink (coordinator) restart, because it lives in the site's ledger on disk, not in `context.state`;
a site out of budget declines (ErrorCode.BUDGET_EXHAUSTED) and the server goes on without it.

Tiny model (50 ROIs x 64 frames), 1 local step per round: ~60-90 s on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml as pyyaml
from harness import FLOWER_ENV, crash_superlink

from brainjepa.demo import prepare_federation
from brainjepa.federation.contract import Metric
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from brainjepa.privacy.budget import Ledger, epsilon_of
from server.config import FederationConfig, to_run_config
from sites.temporal import DEFAULT_MODEL_TR

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes


def _reply_metrics(dumps: Path, rnd: int, site: str) -> dict[str, float]:
    return json.loads((dumps / f"round-{rnd:03d}" / f"{site}.json").read_text())["metrics"]


def test_epsilon_continues_after_a_site_restart_and_a_coordinator_restart(tmp_path: Path) -> None:
    demo = prepare_federation(
        tmp_path / "sites", n_sites=2, subjects=8, n_rois=50, n_frames=64, site_tr=DEFAULT_MODEL_TR
    )
    ledgers = {}
    for y in demo.site_yamls:
        ledgers[y.parent.name] = tmp_path / f"{y.parent.name}-ledger.json"
        y.write_text(
            y.read_text() + f"privacy: {{enabled: true, target_epsilon: 50.0, noise_multiplier: 1.5, "
            f"max_grad_norm: 1.0, ledger: '{ledgers[y.parent.name]}'}}\n"
        )
    first, second = tmp_path / "dumps1", tmp_path / "dumps2"
    nodes = [
        {"site-config": str(y), "gradients": str(demo.gradients), "dump-updates-dir": str(first)}
        for y in demo.site_yamls
    ]
    cfg = FederationConfig(
        n_rois=50,
        n_frames=64,
        local_steps=1,
        batch_size=4,
        num_rounds=2,
        min_sites=1,
        keep_checkpoints=2,
        out_dir=str(tmp_path / "runs"),
        gradients=str(demo.gradients),
    )
    app = write_app_dir(tmp_path / "app", to_run_config(cfg))
    with LocalFederation(tmp_path, nodes, env_extra=FLOWER_ENV, database=str(tmp_path / "superlink.db")) as fed:
        res = fed.run(app, timeout_s=300)
        assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
        (run_dir,) = list((tmp_path / "runs").glob("*-run*"))
        before = {s: _reply_metrics(first, 2, s)[Metric.EPSILON_SPENT] for s in ledgers}
        assert len(Ledger.open(ledgers["site_a"], "site_a").releases) == 2
        # site_b's admin lowers its budget to what it has spent plus less than one more round: it must decline
        b = Ledger.open(ledgers["site_b"], "site_b")
        spent_b, one_more = b.epsilon(1e-5), epsilon_of([*b.history(), b.history()[-1]], 1e-5)
        yaml_b = demo.site_yamls[1]
        doc = pyyaml.safe_load(yaml_b.read_text())
        doc["privacy"]["target_epsilon"] = (spent_b + one_more) / 2
        yaml_b.write_text(pyyaml.safe_dump(doc))
        # site_a's admin restarts its SuperNode (its context.state is gone; the clean shutdown signs the node off,
        # so the restarted coordinator does not wait a heartbeat timeout for it), then the coordinator's
        # machine dies; site_b's SuperNode lives on and reconnects to the new SuperLink by itself
        fed.supernodes[0].stop()
        crash_superlink(fed)
        fed.restart_superlink()
        fed.add_supernode({**nodes[0], "dump-updates-dir": str(second)}, "supernode0-restarted")
        res = fed.run(app, {"resume-dir": str(run_dir), "resume-round": 1, "wait-for-sites-s": 120.0}, timeout_s=300)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # round 2 is trained again after the resume: a third release, composed with the first two
    after = _reply_metrics(second, 2, "site_a")
    ledger = Ledger.open(ledgers["site_a"], "site_a")
    assert len(ledger.releases) == 3 and len({r.run for r in ledger.releases}) == 1
    assert after[Metric.EPSILON_SPENT] == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)
    assert after[Metric.EPSILON_SPENT] > before["site_a"] > 0  # continued, not reset
    assert after[Metric.DP_STEPS] == 3 and after[Metric.EPSILON_BUDGET] == 50.0
    assert len(Ledger.open(ledgers["site_b"], "site_b").releases) == len(b.releases)  # declined: nothing spent
    with open(run_dir / "site_metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["round"] == "2"]
    declined = [r for r in rows if r["status"] == "declined"]
    assert len(declined) == 1 and "'site_b'" in declined[0]["detail"] and "past its budget" in declined[0]["detail"], (
        rows
    )
    assert any(r["site"] == "site_a" and r["status"] == "ok" for r in rows)  # the round went on without it
