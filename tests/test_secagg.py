"""Secure aggregation through Flower's SecAgg+ over real processes (SuperLink + SuperNodes on loopback,
`flwr run` of the project's own apps), two runs on the same federation:

1. central DP on top of `secure-aggregation = true`, 2 sites, 1 round x 2 steps: the sites clip their
   deltas (encoder + predictor) to C and weigh 1, the server adds noise to the unmasked sum: the released
   encoder minus (global + mean clipped delta, recomputed from the sites' own dumps) is Gaussian noise of
   std z C / 2; the target is the EMA of the noisy encoder; the reported epsilon equals Opacus' RDP analysis
   for (q = 1, z, 1 round).
2. `secure-aggregation = true` without DP, and a third site that joins and drops out mid-round (its
   machine dies after the key exchange, while it trains): SecAgg+ reconstructs its masks from the others'
   shares (threshold 2 of 3) and the round completes over site_a and site_b (different training-subject
   counts). The global weights equal the SAMPLE-WEIGHTED FedAvg of what those two trained (their dumps,
   recomputed here in float64) within SecAgg+'s quantization bound (`secagg_tolerance`), and not the
   unweighted mean; the dropped site is reported as not in the sum; the server never held a site's
   weights (no `updates/` with save-updates on); privacy.json / privacy.md say secure aggregation is on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import FLOWER_ENV
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch.nn.utils import parameters_to_vector

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import ModelConfig
from brainjepa.demo import DemoFederation, prepare_federation
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from brainjepa.federation.processes import ManagedProcess
from brainjepa.federation.secure import secagg_tolerance
from brainjepa.gradients import load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.schedules import schedule_at
from brainjepa.schema import from_mapping
from server.config import FederationConfig, to_run_config
from sites.temporal import DEFAULT_MODEL_TR

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes

N_ROIS, N_FRAMES = 40, 64
SETS = ("encoder", "predictor", "target")

# The real ClientApp, except that a node with `fault-marker` touches it and hangs while it trains (inside
# SecAgg+'s collect stage, after the key exchange), so that the test can kill its machine there.
DROPPING_CLIENT = """
import time
from pathlib import Path
from flwr.clientapp import ClientApp
from client.client_app import handle
from client.secagg import is_secure, secure_train

app = ClientApp()

def hanging(msg, context):
    if "fault-marker" in context.node_config:
        Path(str(context.node_config["fault-marker"])).touch()
        time.sleep(600)
    return handle(msg, context)

@app.train()
def train(msg, context):
    return secure_train(msg, context, hanging) if is_secure(msg) else hanging(msg, context)
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoFederation:
    fed = prepare_federation(
        tmp_path_factory.mktemp("secagg") / "sites",
        n_sites=2,
        subjects=12,
        n_rois=N_ROIS,
        n_frames=N_FRAMES,
        seed=5,
        site_tr=DEFAULT_MODEL_TR,
    )
    site_b = fed.site_yamls[1]  # fewer training subjects at site_b: the weighting matters
    site_b.write_text(
        site_b.read_text().replace("train: 0.8\n  val: 0.1\n  test: 0.1", "train: 0.5\n  val: 0.25\n  test: 0.25")
    )
    return fed


def flat_sets(ckpt: dict, grads: np.ndarray) -> dict[str, np.ndarray]:
    models = JEPAModels(from_mapping(ModelConfig, ckpt["model_config"], "checkpoint"), torch.from_numpy(grads))
    models.load_state_dict(ckpt["models"])
    return {n: parameters_to_vector(getattr(models, n).parameters()).detach().double().numpy() for n in SETS}


def initial_sets(cfg: FederationConfig, grads: np.ndarray) -> dict[str, np.ndarray]:
    """The run's round-0 global weights (seeded exactly as the server seeds them)."""
    torch.manual_seed(cfg.seed)
    models = JEPAModels(cfg.pretrain().model, torch.from_numpy(grads))
    return {n: parameters_to_vector(getattr(models, n).parameters()).detach().double().numpy() for n in SETS}


def dumped(dumps: Path) -> list[dict[str, np.ndarray]]:
    """What site_a and site_b trained in round 1 (their own dumps: full fp32 weights, num_examples)."""
    out = []
    for site in ("site_a", "site_b"):
        with np.load(dumps / "round-001" / f"{site}.npz") as z:
            out.append({k: z[k].astype(np.float64) for k in z.files})
    return out


def kill_when_training(site: ManagedProcess, marker: Path, run: ManagedProcess) -> None:
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert time.monotonic() < deadline and run.alive(), run.log_tail()
        time.sleep(0.3)
    site.kill()


# two flwr runs of 4 SecAgg+ stages each (each stage spawns a ClientApp per site)
def test_secagg_central_dp_then_a_weighted_fedavg_that_survives_a_dropout(demo: DemoFederation, tmp_path: Path) -> None:
    grads = load_gradients(demo.gradients)
    cfg = FederationConfig(
        n_rois=N_ROIS,
        n_frames=N_FRAMES,
        local_steps=2,
        num_rounds=1,
        batch_size=4,
        gradients=str(demo.gradients),
        out_dir=str(tmp_path / "runs1"),
        secure_aggregation=True,
        secure_aggregation_clip_range=0.05,
        secure_aggregation_max_weight=16.0,
        save_updates=True,
    )
    dumps = tmp_path / "dumps"
    nodes = [
        {"site-config": str(y), "gradients": str(demo.gradients), "dump-updates-dir": str(dumps)}
        for y in demo.site_yamls
    ]
    start = initial_sets(cfg, grads)
    z, clip = 0.8, 0.05
    with LocalFederation(tmp_path / "flower", nodes, env_extra=FLOWER_ENV) as fed:
        # ---- 1: central DP + secure aggregation
        cfg1 = dataclasses.replace(
            cfg,
            out_dir=str(tmp_path / "runs1"),
            central_dp=True,
            central_dp_noise_multiplier=z,
            central_dp_clip_norm=clip,
        )
        res1 = fed.run(write_app_dir(tmp_path / "app1", to_run_config(cfg1)), timeout_s=300)
        assert res1.returncode == 0 and "outputs under" in res1.stdout, res1.stdout[-4000:] + res1.stderr[-2000:]
        sent1 = dumped(dumps)

        # ---- 2: plain secure aggregation; a third site drops out mid-round
        marker = tmp_path / "site_c_is_training"
        site_c = fed.add_supernode(
            {"site-config": str(demo.site_yamls[0]), "gradients": str(demo.gradients), "fault-marker": str(marker)},
            "site_c",
        )
        deadline = time.monotonic() + 60
        while "SuperNode ID:" not in site_c.log_tail():  # registered with the SuperLink: it will be sampled
            assert time.monotonic() < deadline and site_c.alive(), site_c.log_tail()
            time.sleep(0.3)
        # every SecAgg+ stage waits up to round-timeout-s: long enough for the live sites' ClientApps to start
        # and train on a loaded test machine; the dead site costs one such wait
        cfg2 = dataclasses.replace(cfg, out_dir=str(tmp_path / "runs2"), round_timeout_s=30.0)
        app2 = write_app_dir(tmp_path / "app2", to_run_config(cfg2), clientapp="dropping_client:app")
        (app2 / "dropping_client.py").write_text(DROPPING_CLIENT)
        run2 = fed.start_run(app2, name="flwr_run2")
        kill_when_training(site_c, marker, run2)
        assert run2.wait(timeout=240) == 0, run2.log_tail()
        log2 = run2.log_tail(200_000)
        sent2 = dumped(dumps)

    # ---- 1: the released encoder = global + mean of the sites' clipped deltas + N(0, (z C / 2)^2)
    (run1,) = list((tmp_path / "runs1").glob("*"))
    released = flat_sets(load_checkpoint(run1 / "checkpoint.pt"), grads)
    deltas = [{k: s[k] - start[k] for k in ("encoder", "predictor")} for s in sent1]
    clipped_mean = {k: np.zeros_like(start[k]) for k in ("encoder", "predictor")}
    for d in deltas:
        norm = math.sqrt(sum(float(np.square(v).sum()) for v in d.values()))
        assert norm > clip  # the clip binds: both sites' updates were scaled down
        for k in clipped_mean:
            clipped_mean[k] += d[k] * min(1.0, clip / norm) / 2
    noise = np.concatenate([released[k] - start[k] - clipped_mean[k] for k in ("encoder", "predictor")])
    assert abs(noise.std() / (z * clip / 2) - 1) < 0.02 and abs(noise.mean()) < 1e-3, noise.std()
    optim = cfg1.pretrain().optim  # the round's EMA momenta, from the schedule
    mu = math.prod(schedule_at(optim, s, cfg1.total_steps).momentum for s in range(cfg1.local_steps))
    np.testing.assert_allclose(released["target"], mu * start["target"] + (1 - mu) * released["encoder"], atol=1e-6)
    central = json.loads((run1 / "privacy.json").read_text())["central_dp"]
    orders = RDPAccountant.DEFAULT_ALPHAS
    want_eps = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders), delta=cfg1.central_dp_delta
    )[0]
    assert central["epsilon"] == pytest.approx(want_eps, rel=1e-9) and central["per_round"][0]["sites_clipped"] is None

    # ---- 2: the round completed over site_a and site_b; site_c is reported as not in the sum
    (run2,) = list((tmp_path / "runs2").glob("*"))
    assert "outputs under" in log2 and "2 of 3 site(s) in the sum" in log2, log2[-4000:]
    rows = {r["site"]: r for r in csv.DictReader((run2 / "site_metrics.csv").read_text().splitlines())}
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == ["site_a", "site_b"]
    (dropped,) = [r for r in rows.values() if r["status"] != "ok"]
    assert dropped["status"] == "failed" and dropped["detail"], dropped
    # sample-weighted FedAvg of what site_a and site_b trained, within the quantization bound
    final = flat_sets(load_checkpoint(run2 / "checkpoint.pt"), grads)
    n = [float(s["num_examples"]) for s in sent2]
    assert n[0] != n[1], n
    tol = secagg_tolerance(0.05, n, 16.0) + 1e-6  # + fp32 rounding of the weights themselves
    for name in SETS:
        want = sum(ni * s[name] for ni, s in zip(n, sent2, strict=True)) / sum(n)
        np.testing.assert_allclose(final[name], want, rtol=0, atol=tol, err_msg=name)
        if name != "target":  # (the EMA target moves ~1e-7 in 2 steps: too little to tell the weightings apart)
            unweighted = (sent2[0][name] + sent2[1][name]) / 2
            assert np.abs(final[name] - unweighted).max() > 20 * tol, name  # the weights are inside the sum
            assert np.abs(final[name] - start[name]).max() > 100 * tol, name  # the round moved the weights
    assert not (run2 / "updates").exists()  # save-updates: the server had no single update to save
    report = json.loads((run2 / "privacy.json").read_text())
    assert report["secure_aggregation"] is True and report["central_dp"] == {"enabled": False}
    assert set(report["sites"]) >= {"site_a", "site_b"} and "Flower SecAgg+" in (run2 / "privacy.md").read_text()
