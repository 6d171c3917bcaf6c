"""One site, R rounds x K local steps over real Flower == `brainjepa pretrain` for R*K steps.

Same seed, same data order (batch index = global step), AdamW moments carried across rounds in the
site's context state, FedAvg over one site = identity (coefficient exactly 1.0). Tolerance: exact
(max |difference| == 0) is expected; the test allows 1e-6 for BLAS thread-order differences.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from harness import FLOWER_ENV

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import PretrainConfig
from brainjepa.demo import prepare_federation
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from brainjepa.gradients import load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.pretrain import pretrain
from brainjepa.schema import from_mapping
from server.config import FederationConfig, to_run_config

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes


def test_one_site_federated_equals_local_pretraining(tmp_path: Path) -> None:
    rounds, k = 2, 2
    demo = prepare_federation(tmp_path / "sites", n_sites=1, subjects=10, n_rois=40, n_frames=64, seed=3)
    grads = demo.gradients
    cfg = FederationConfig(
        n_rois=40,
        n_frames=64,
        local_steps=k,
        num_rounds=rounds,
        min_sites=1,
        batch_size=4,
        gradients=str(grads),
        out_dir=str(tmp_path / "runs"),
        seed=3,
    )
    (site_yaml,) = sorted((tmp_path / "sites").glob("*/*.yaml"))
    app = write_app_dir(tmp_path / "app", to_run_config(cfg))
    with LocalFederation(
        tmp_path, [{"site-config": str(site_yaml), "gradients": str(grads)}], env_extra=FLOWER_ENV
    ) as fed:
        res = fed.run(app, timeout_s=300)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    (fed_ckpt,) = list((tmp_path / "runs").glob("*/checkpoint.pt"))
    fed_state = load_checkpoint(fed_ckpt)

    # Local pretraining on the same site (`data.site`: same loading, resampling and scaling).
    pcfg: PretrainConfig = from_mapping(PretrainConfig, fed_state["config"], "checkpoint")
    local_cfg = dataclasses.replace(
        pcfg,
        data=dataclasses.replace(pcfg.data, site=str(site_yaml), gradients=str(grads)),
        train=dataclasses.replace(pcfg.train, steps=rounds * k, out_dir=str(tmp_path / "local"), checkpoint_every=100),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as in the site's process (FLOWER_ENV): both sides sum in one order
    try:
        local = pretrain(local_cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    local_state = load_checkpoint(local.checkpoint)

    assert fed_state["step"] == local_state["step"] == rounds * k
    worst = 0.0
    for key, value in local_state["models"].items():
        diff = float((fed_state["models"][key].float() - value.float()).abs().max())
        worst = max(worst, diff)
    assert worst <= 1e-6, f"federated (1 site) and local pretraining differ by up to {worst:.3g}"
    # The run really trained: the weights moved away from the common initialisation.
    torch.manual_seed(cfg.seed)
    init = JEPAModels(pcfg.model, torch.from_numpy(load_gradients(grads))).state_dict()
    moved = max(float((fed_state["models"][key] - init[key]).abs().max()) for key in init if key.startswith("encoder."))
    assert moved > 1e-4
    print(f"max |federated - local| = {worst:.3g} (weights moved by up to {moved:.3g})")
