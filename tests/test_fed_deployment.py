"""Federated pretraining over Flower's real network transport: a SuperLink and SuperNodes as separate
processes on loopback (brainjepa.federation.launcher.LocalFederation), `flwr run ... --stream` submitting the app.

Tiny model (50 ROIs x 64 frames), few steps: each test takes ~20-60 s on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import FLOWER_ENV, crash_superlink
from torch.nn.utils import parameters_to_vector

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import ModelConfig, PretrainConfig
from brainjepa.demo import prepare_federation
from brainjepa.federation.contract import Metric, RoundSpec
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from brainjepa.gradients import gradient_checksum, load_gradients, save_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.schema import from_mapping
from brainjepa.weights import WEIGHT_SETS, flat_parameters, model_checksum
from client.training import SiteRound, resolve_site
from server.config import FederationConfig, to_run_config
from sites.temporal import DEFAULT_MODEL_TR

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes

BASE = dict(n_rois=50, n_frames=64, local_steps=2, batch_size=4)

# A ClientApp wrapping the real one, for fault tests only: node config `inject-nan` poisons the reply,
# `fault-sleep-s` makes the site hang (after touching `fault-marker`) so that the test can kill it,
# `poison` ("encoder,target", ...) multiplies those weight sets by `poison-factor` and claims
# `poison-claim` samples (0: the real count), from round `poison-from` (1-based) on.
FAULTY_CLIENT = """
import time
from pathlib import Path
import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.clientapp import ClientApp
from client.client_app import train as real_train

app = ClientApp()

@app.train()
def train(msg, context):
    node = context.node_config
    if float(node.get("fault-sleep-s", 0)) > 0:
        Path(str(node["fault-marker"])).touch()
        time.sleep(float(node["fault-sleep-s"]))
    reply = real_train(msg, context)
    poisoned = str(node.get("poison", "")).split(",") if node.get("poison") else []
    rnd = int(msg.content["config"]["round"]) + 1
    if poisoned and rnd >= int(node.get("poison-from", 1)) and not reply.has_error():
        arrays, factor = reply.content["arrays"], float(node.get("poison-factor", 1e4))
        reply.content["arrays"] = ArrayRecord(
            {k: Array(arrays[k].numpy() * (factor if k in poisoned else 1.0)) for k in arrays.keys()}
        )
        if float(node.get("poison-claim", 0)) > 0:
            claim = float(node["poison-claim"])
            reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "num-examples": claim})
    if bool(node.get("inject-nan", False)) and not reply.has_error():
        arrays = reply.content["arrays"]
        poisoned = {}
        for k in arrays.keys():
            a = arrays[k].numpy().copy()
            if k == "encoder":
                a[::97] = np.nan
            poisoned[k] = Array(a)
        reply.content["arrays"] = ArrayRecord(poisoned)
    return reply
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Three generated sites and the federation's gradient file (from their FC sums)."""
    root = tmp_path_factory.mktemp("fed_sites")
    demo = prepare_federation(
        root, n_sites=3, subjects=10, n_rois=BASE["n_rois"], n_frames=BASE["n_frames"], site_tr=DEFAULT_MODEL_TR
    )
    return sorted(root.glob("*/*.yaml")), demo.gradients


def run_config(tmp: Path, grads: Path, **kw: object) -> dict[str, object]:
    cfg = FederationConfig(**{**BASE, "out_dir": str(tmp / "runs"), "gradients": str(grads), **kw})
    return to_run_config(cfg)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def the_run_dir(tmp: Path) -> Path:
    (run_dir,) = list((tmp / "runs").glob("*-run*"))
    return run_dir


def flat_sets(state: dict, model_cfg: dict, grads: np.ndarray) -> dict[str, torch.Tensor]:
    """Flatten a checkpoint's models the way the wire does (independently of server code)."""
    models = JEPAModels(from_mapping(ModelConfig, model_cfg, "checkpoint"), torch.from_numpy(grads))
    models.load_state_dict(state)
    return {
        n: parameters_to_vector(getattr(models, n).parameters()).detach() for n in ("encoder", "predictor", "target")
    }


def test_two_rounds_weighted_mean_nan_rejected_wrong_gradients_refused(tmp_path: Path, demo) -> None:
    """Five sites over real transport, two rounds: site_a (on 2 processes: `distributed.devices: 2`) and
    site_b (1 process) train normally, site_c sends NaN (rejected), a fourth site uses another gradient file
    (refused), a fifth sends its EMA target x 1e4 claiming 500 samples (rejected by the target's bound; each
    other per-set bound is refused in process by test_update_bounds.py, through the same guard). The
    rejected sites are quarantined: round 2 does not ask them. The global weights must equal the sample-weighted
    mean of what site_a and site_b sent (dumped by the sites, recomputed here), and what site_a sent in
    round 1 equals its round in one process."""
    yamls, grads = demo
    other = tmp_path / "other_gradients.npy"
    g = load_gradients(grads)
    save_gradients(other, g[:, ::-1].copy())  # same shape, other content
    dumps = tmp_path / "dumps"
    two = yamls[0].with_name(f"site_a_two_processes_{tmp_path.name}.yaml")  # site_a's data, 2 gloo processes
    two.write_text(yamls[0].read_text() + "distributed: {devices: 2, timeout_s: 120}\n")
    nodes = [
        {"site-config": str(two), "gradients": str(grads), "dump-updates-dir": str(dumps)},
        {"site-config": str(yamls[1]), "gradients": str(grads), "dump-updates-dir": str(dumps)},
        {"site-config": str(yamls[2]), "gradients": str(grads), "inject-nan": True},
        {"site-config": str(yamls[0]), "gradients": str(other)},
        {"site-config": str(yamls[2]), "gradients": str(grads), "poison": "target", "poison-claim": 500},
    ]
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "faulty_client.py").write_text(FAULTY_CLIENT)
    app = write_app_dir(
        tmp_path / "app", run_config(tmp_path, grads, num_rounds=2, min_sites=2), clientapp="faulty_client:app"
    )
    with LocalFederation(tmp_path, nodes, env_extra=FLOWER_ENV) as fed:
        res = fed.run(app, timeout_s=400)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = the_run_dir(tmp_path)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["round"] == 2 and ckpt["federated"] and ckpt["kind"] == "pretrain"
    final = flat_sets(ckpt["models"], ckpt["model_config"], g)
    # What site_a and site_b sent in round 2, as dumped by the sites; mean recomputed here in float64.
    sent = [np.load(dumps / "round-002" / f"{site}.npz") for site in ("site_a", "site_b")]
    n = np.array([float(s["num_examples"]) for s in sent])
    for name in ("encoder", "predictor", "target"):
        expected = sum(ni * s[name].astype(np.float64) for ni, s in zip(n, sent, strict=True)) / n.sum()
        np.testing.assert_allclose(final[name].numpy(), expected, rtol=0, atol=2e-6)
        assert not np.allclose(sent[0][name], sent[1][name])  # the sites really differ

    rows = read_csv(run_dir / "site_metrics.csv")
    by_round = {rnd: sorted((r["status"], r["site"]) for r in rows if r["round"] == rnd) for rnd in ("1", "2")}
    assert [st for st, _ in by_round["1"]] == ["failed", "ok", "ok", "rejected", "rejected"], by_round
    assert [st for st, _ in by_round["2"]] == ["failed", "ok", "ok"], by_round  # the rejected: quarantined
    for listing in by_round.values():
        assert ("ok", "site_a") in listing and ("ok", "site_b") in listing
    assert ("rejected", "site_c") in by_round["1"]
    rejected = sorted(r["detail"] for r in rows if r["status"] == "rejected")
    assert sum("NaN" in d for d in rejected) == 1
    assert sum("'target' moved" in d and "EMA schedule" in d for d in rejected) == 1, rejected
    quarantined = json.loads((run_dir / "quarantine.json").read_text())["sites"]
    assert len(quarantined) == 2 and all(e["round"] == 1 and e["until"] == 0 for e in quarantined.values())
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "quarantine" for e in events) == 2
    refused = [r for r in rows if r["status"] == "failed"]
    for r in refused:  # the site's file path is masked in what the site sends (its own console has it)
        assert "refused" in r["detail"] and "gradient file" in r["detail"] and str(other) not in r["detail"]
        assert "checksum" in r["detail"]
    assert "rejected" in res.stdout and "NaN" in res.stdout
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(int(r["bytes_sent"]) > 0 and int(r["bytes_received"]) > 0 and float(r["loss"]) > 0 for r in ok)
    rounds = read_csv(run_dir / "round_metrics.csv")
    assert [(r["sites_ok"], r["sites_rejected"], r["sites_failed"]) for r in rounds] == [
        ("2", "2", "1"),
        ("2", "0", "1"),
    ]
    assert float(rounds[1]["loss"]) < float(rounds[0]["loss"])
    assert (run_dir / "loss_per_round.png").stat().st_size > 1000

    # site_a trained on 2 processes, site_b on 1; site_a's round-1 update is its round in one process.
    sent_metrics = {
        s: json.loads((dumps / "round-001" / f"{s}.json").read_text())["metrics"] for s in ("site_a", "site_b")
    }
    assert (sent_metrics["site_a"][Metric.PROCESSES], sent_metrics["site_b"][Metric.PROCESSES]) == (2.0, 1.0)
    pcfg = from_mapping(PretrainConfig, ckpt["config"], "checkpoint")
    torch.manual_seed(pcfg.train.seed)  # the server's initial weights
    init = JEPAModels(pcfg.model, torch.from_numpy(g))
    sets = {n: flat_parameters(getattr(init, n)) for n in WEIGHT_SETS}
    spec = RoundSpec(
        task="pretrain",
        round=0,
        num_rounds=2,
        step_start=0,
        local_steps=BASE["local_steps"],
        wire_dtype="float32",
        model_checksum=model_checksum(pcfg.model, {n: getattr(init, n) for n in WEIGHT_SETS}),
        gradient_checksum=gradient_checksum(g),
        task_config=pcfg,
    )
    site, runtime = resolve_site(yamls[0])  # one process
    alone, _, _ = SiteRound(spec, site, runtime, grads, sets, None).run()
    first = np.load(dumps / "round-001" / "site_a.npz")
    for name in WEIGHT_SETS:
        np.testing.assert_allclose(first[name], alone[name].numpy(), rtol=0, atol=2e-5)


def test_site_killed_mid_round_then_server_killed_and_resumed(tmp_path: Path, demo) -> None:
    """Round 1: site_b's machine dies mid-round; the round completes with site_a. Then the coordinator's
    machine dies (SuperLink + ServerApp killed, right after round 2's message went out); a new SuperLink on
    the same address and `resume-dir` finish the run with site_a's SuperNode restarted. (A SuperNode that
    lives through a SuperLink crash and reconnects by itself: test_privacy_fed.py. Here the one alive
    would first sit out round 2's stale message of the dead run, ~1 min of Flower's retries.)"""
    yamls, grads = demo
    marker = tmp_path / "site_b_is_training"
    nodes = [
        {"site-config": str(yamls[0]), "gradients": str(grads)},
        {"site-config": str(yamls[1]), "gradients": str(grads), "fault-sleep-s": 300, "fault-marker": str(marker)},
    ]
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "faulty_client.py").write_text(FAULTY_CLIENT)
    rc = run_config(tmp_path, grads, num_rounds=2, min_sites=1, round_timeout_s=25.0, wait_for_sites_s=60.0)
    app = write_app_dir(tmp_path / "app", rc, clientapp="faulty_client:app")
    with LocalFederation(tmp_path, nodes, env_extra=FLOWER_ENV) as fed:
        run = fed.start_run(app)
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert marker.exists(), run.log_tail()
        t_kill = time.monotonic()
        fed.supernodes[1].kill()  # site_b's machine dies mid-round
        ckpt = None
        while time.monotonic() < deadline + 60:
            found = list((tmp_path / "runs").glob("*/checkpoint.pt"))
            if found and load_checkpoint(found[0])["round"] >= 1:
                ckpt = found[0]
                break
            time.sleep(0.3)
        assert ckpt is not None, run.log_tail()
        assert time.monotonic() - t_kill < 60, "the round waited too long for a dead site"
        crash_superlink(fed)  # the coordinator's machine dies (SuperLink + ServerApp)
        run.kill()
        first = read_csv(ckpt.parent / "site_metrics.csv")
        done = load_checkpoint(ckpt)["round"]
        assert done == 1
        fed.supernodes[0].kill()
        fed.restart_superlink()
        fed.add_supernode(nodes[0], "supernode0-restarted")
        res = fed.run(app, {"resume-dir": str(ckpt.parent), "round-timeout-s": 60.0}, timeout_s=400)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(r["status"] for r in first) == ["ok", "timeout"] or sorted(r["status"] for r in first) == [
        "failed",
        "ok",
    ]
    assert [r["site"] for r in first if r["status"] == "ok"] == ["site_a"]
    assert f"resuming {ckpt.parent} after round 1" in res.stdout
    assert load_checkpoint(ckpt)["round"] == 2
    rounds = [int(r["round"]) for r in read_csv(ckpt.parent / "round_metrics.csv")]
    assert rounds == [1, 2]


def test_hostile_site_rolled_back_quarantined_and_cannot_halt_a_resumed_run(tmp_path: Path, demo) -> None:
    """With the per-set bounds off (max-update-ratio 0, max-norm-growth 0), only the explosion check is
    left. Round 1 is honest; in round 2 a site sends its EMA target x 1e4 (500 samples claimed): the global
    target would explode, so the coordinator rolls round 2 back, quarantines that site (audit-logged)
    and asks again. With one honest site left and min-sites 2 it waits wait-for-sites-s and stops with a
    line naming the quarantine, the round-1 checkpoint intact. Resumed after a second honest site joins,
    the quarantined site (still connected) is not asked, and the run finishes with a sane target."""
    yamls, grads = demo
    nodes = [
        {"site-config": str(yamls[0]), "gradients": str(grads)},
        {"site-config": str(yamls[2]), "gradients": str(grads), "poison": "target", "poison-from": 2},
    ]
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "faulty_client.py").write_text(FAULTY_CLIENT)
    rc = run_config(
        tmp_path, grads, num_rounds=2, min_sites=2, max_update_ratio=0.0, max_norm_growth=0.0, wait_for_sites_s=8.0
    )
    app = write_app_dir(tmp_path / "app", rc, clientapp="faulty_client:app")
    with LocalFederation(tmp_path, nodes, env_extra=FLOWER_ENV) as fed:
        first = fed.run(app, timeout_s=300)
        run_dir = the_run_dir(tmp_path)
        out = first.stdout + first.stderr
        assert first.returncode != 0 and "rolled back" in out, out[-3000:]
        assert "only 1 eligible site(s) connected after 8 s (not counting quarantined: node-" in out, out[-3000:]
        ckpt = load_checkpoint(run_dir / "checkpoint.pt")
        assert ckpt["round"] == 1
        events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
        (rollback,) = [e for e in events if e["event"] == "rollback"]
        (held,) = [e for e in events if e["event"] == "quarantine"]
        assert rollback["round"] == 2 and "target" in rollback["reason"] and held["round"] == 2
        assert "moved farthest" in held["reason"]
        fed.add_supernode({"site-config": str(yamls[1]), "gradients": str(grads)}, "site_b_late")
        second = fed.run(app, {"resume-dir": str(run_dir)}, timeout_s=300)
    assert second.returncode == 0 and "outputs under" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]
    final = load_checkpoint(run_dir / "checkpoint.pt")
    assert final["round"] == 2
    g = load_gradients(grads)
    before, after = (
        flat_sets(ckpt["models"], ckpt["model_config"], g),
        flat_sets(final["models"], final["model_config"], g),
    )
    assert float(after["target"].norm()) < 1.1 * float(before["target"].norm())  # no x 1e4 got in
    resumed = [r for r in read_csv(run_dir / "site_metrics.csv") if r["round"] == "2" and r["status"] == "ok"]
    assert sorted(r["site"] for r in resumed) == ["site_a", "site_b"]
