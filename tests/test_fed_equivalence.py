"""One site, R rounds x K local steps over real Flower == `brainjepa pretrain` for R*K steps.

Same seed, same data order (batch index = global step), AdamW moments carried across rounds in the
site's context state, FedAvg over one site = identity (coefficient exactly 1.0). Tolerance: exact
(max |difference| == 0) is expected; the test allows 1e-6 for BLAS thread-order differences. With
compression (wire-dtype int8) the same run stays within the quantisation bound of it, for a quarter of
the bytes.
"""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord
from harness import FLOWER_ENV

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import PretrainConfig
from brainjepa.demo import prepare_federation
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from brainjepa.gradients import load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.pretrain import pretrain
from brainjepa.schema import from_mapping
from brainjepa.weights import WEIGHT_SETS, flat_parameters
from server.config import FederationConfig, to_run_config

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes


ROUNDS, K = 2, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One site, ROUNDS x K steps: a float32 and an int8 run on ONE SuperLink and SuperNode (two `flwr run`s),
    and `brainjepa pretrain` on the same site for ROUNDS x K steps. Checkpoints as loaded, the run config,
    each run's folder."""
    tmp = tmp_path_factory.mktemp("equivalence")
    demo = prepare_federation(tmp / "sites", n_sites=1, subjects=10, n_rois=40, n_frames=64, seed=3)
    grads = demo.gradients
    cfg = FederationConfig(
        n_rois=40,
        n_frames=64,
        local_steps=K,
        num_rounds=ROUNDS,
        min_sites=1,
        batch_size=4,
        gradients=str(grads),
        out_dir=str(tmp / "runs" / "float32"),
        seed=3,
    )
    (site_yaml,) = demo.site_yamls
    app = write_app_dir(tmp / "app", to_run_config(cfg))
    out: dict[str, object] = {"cfg": cfg}
    with LocalFederation(tmp, [{"site-config": str(site_yaml), "gradients": str(grads)}], env_extra=FLOWER_ENV) as fed:
        for wire in ("float32", "int8"):
            res = fed.run(app, {"wire-dtype": wire, "out-dir": str(tmp / "runs" / wire)}, timeout_s=300)
            assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
            (ckpt,) = list((tmp / "runs" / wire).glob("*/checkpoint.pt"))
            out[wire], out[f"{wire}_dir"] = load_checkpoint(ckpt), ckpt.parent

    # Local pretraining on the same site (`data.site`: same loading, resampling and scaling).
    pcfg: PretrainConfig = from_mapping(PretrainConfig, out["float32"]["config"], "checkpoint")
    local_cfg = dataclasses.replace(
        pcfg,
        data=dataclasses.replace(pcfg.data, site=str(site_yaml), gradients=str(grads)),
        train=dataclasses.replace(pcfg.train, steps=ROUNDS * K, out_dir=str(tmp / "local"), checkpoint_every=100),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as in the site's process (FLOWER_ENV): both sides sum in one order
    try:
        local = pretrain(local_cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    out["local"] = load_checkpoint(local.checkpoint)
    assert out["float32"]["step"] == out["int8"]["step"] == out["local"]["step"] == ROUNDS * K
    return out


def test_one_site_federated_equals_local_pretraining(runs: dict) -> None:
    fed_state, local_state, cfg = runs["float32"], runs["local"], runs["cfg"]
    worst = 0.0
    for key, value in local_state["models"].items():
        diff = float((fed_state["models"][key].float() - value.float()).abs().max())
        worst = max(worst, diff)
    assert worst <= 1e-6, f"federated (1 site) and local pretraining differ by up to {worst:.3g}"
    # The run really trained: the weights moved away from the common initialisation.
    torch.manual_seed(cfg.seed)
    pcfg: PretrainConfig = from_mapping(PretrainConfig, fed_state["config"], "checkpoint")
    init = JEPAModels(pcfg.model, torch.from_numpy(load_gradients(cfg.gradients))).state_dict()
    moved = max(float((fed_state["models"][key] - init[key]).abs().max()) for key in init if key.startswith("encoder."))
    assert moved > 1e-4
    print(f"max |federated - local| = {worst:.3g} (weights moved by up to {moved:.3g})")


def test_one_site_int8_stays_within_the_quantisation_bound_for_a_quarter_of_the_bytes(runs: dict) -> None:
    """wire-dtype int8 over real Flower: round 1 downlink is the fp32 resync, round 2 an int8 delta; every
    upload is int8 with error feedback. The global weights stay within a few quantisation steps of the
    fp32 run (== local pretraining, the test above), and the coordinator receives <= 0.26 x the fp32 bytes
    (the fp32 reply's `count_bytes`, computed from the same sets)."""
    fed_state, local_state, cfg, run_dir = runs["int8"], runs["local"], runs["cfg"], runs["int8_dir"]
    pcfg: PretrainConfig = from_mapping(PretrainConfig, fed_state["config"], "checkpoint")
    torch.manual_seed(cfg.seed)
    models = JEPAModels(pcfg.model, torch.from_numpy(load_gradients(cfg.gradients)))
    init = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    sets = {}
    for state in (fed_state, local_state):
        models.load_state_dict(state["models"])
        sets[id(state)] = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    fed, local = sets[id(fed_state)], sets[id(local_state)]
    for name in WEIGHT_SETS:
        moved = float((local[name] - init[name]).abs().max())
        err = float((fed[name] - local[name]).abs().max())
        # one quantisation step of the run's largest move (its block's max / 127), a few times over: the
        # uplink's residual, the round-2 downlink's rounding, and the local steps taken from it
        assert 0.0 < err <= 4 * moved / 127, (name, err, moved)
        print(f"{name}: max |int8 - fp32| = {err:.3g}, moved up to {moved:.3g}")
    fp32_reply = ArrayRecord({n: v.float() for n, v in init.items()}).count_bytes()
    with open(run_dir / "round_metrics.csv", newline="") as f:
        rounds = list(csv.DictReader(f))
    assert [int(r["bytes_received"]) / fp32_reply <= 0.26 for r in rounds] == [True] * ROUNDS, rounds
    sent = [int(r["bytes_sent"]) / fp32_reply for r in rounds]
    assert sent[0] == pytest.approx(1.0, abs=1e-3) and sent[1] <= 0.26, sent  # resync, then the int8 delta
