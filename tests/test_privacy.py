"""Site-side DP-SGD: per-sample gradients, clipping, the accountant, the budget the site controls."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PretrainConfig, PrivacyConfig, TrainConfig
from brainjepa.demo import prepare_federation
from brainjepa.downstream.config import DownstreamConfig, DownstreamTask, TaskSpec
from brainjepa.downstream.fit import load_state_vector, state_vector
from brainjepa.downstream.model import Backbone, DownstreamModel
from brainjepa.federation.contract import MODEL_SET, Metric, RoundSpec
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.masks import sample_masks
from brainjepa.privacy.budget import BudgetExhausted, Ledger, calibrate, epsilon_of, grant
from brainjepa.privacy.dpsgd import (
    DownstreamForward,
    DPGradients,
    OnlineJEPA,
    jepa_sample_loss,
    per_sample_gradients,
    plain_eager,
)
from brainjepa.privacy.sampling import PoissonSubjects, unit_index
from brainjepa.vit import Encoder
from brainjepa.weights import WEIGHT_SETS, flat_parameters, model_checksum
from client.downstream import DownstreamSite
from client.training import SiteTrainer, load_site_data, private_train, resolve_site

MODEL = ModelConfig(size="tiny", n_rois=20, n_frames=32, patch_size=16, gradient_components=4)


def _batch(b: int = 4, seed: int = 0) -> tuple[JEPAModels, OnlineJEPA, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    models = JEPAModels(MODEL, torch.randn(20, 4))
    online = OnlineJEPA(models.encoder, models.predictor)
    plain_eager(online)
    x = torch.randn(b, 20, 32)  # (B, R, T)
    masks = sample_masks(MaskConfig(), b, 20, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        h = models.target(x, select=masks.target)
        y = F.layer_norm(h, (h.shape[-1],))  # (B, Nt, D)
    return models, online, (x, masks.context, masks.target, y)


def test_per_sample_gradients_equal_one_sample_at_a_time() -> None:
    """Every trained parameter (patch embedding, gradient projection, mask token, LayerNorms, attention,
    predictor) gets the gradient a batch of one would give it, with SDPA attention in the reference loop."""
    _, online, batch = _batch()
    grads, losses = per_sample_gradients(online, jepa_sample_loss("smooth_l1"), *batch)
    names = [n for n, p in online.named_parameters() if p.requires_grad]
    assert (
        set(grads) == set(names) and any("mask_token" in n for n in names) and any("spatial.proj" in n for n in names)
    )
    for sub in online.modules():  # the reference: the model as built (SDPA), one sample per backward
        if hasattr(sub, "use_sdpa"):
            sub.use_sdpa = True
    for i in range(len(batch[0])):
        online.zero_grad()
        pred = online(batch[0][i : i + 1], batch[1][i : i + 1], batch[2][i : i + 1])
        loss = F.smooth_l1_loss(pred, batch[3][i : i + 1])
        loss.backward()
        assert abs(loss.item() - float(losses[i])) < 1e-6
        for n, p in online.named_parameters():
            torch.testing.assert_close(grads[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=n)
            assert p.grad.abs().sum() > 0 or "bias" in n, n  # every parameter really gets a gradient


def test_no_clipped_per_sample_gradient_exceeds_the_bound() -> None:
    """Each sample's clipped contribution (added to Opacus' summed_grad one sample at a time) has norm <= C;
    samples with a larger gradient are scaled to C exactly, smaller ones untouched."""
    models, online, batch = _batch(b=6)
    grads, _ = per_sample_gradients(online, jepa_sample_loss("smooth_l1"), *batch)
    norms = torch.stack([g.reshape(6, -1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)  # (B,)
    bound = float(norms.median())  # half the samples above, half below
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    dp = DPGradients(online, opt, noise_multiplier=0.0, max_grad_norm=bound, generator=torch.Generator())
    params = dp.dp.params
    for i in range(6):
        before = [torch.zeros_like(p) if p.summed_grad is None else p.summed_grad.clone() for p in params]
        dp.accumulate({n: g[i : i + 1] for n, g in grads.items()})
        step = torch.cat([(p.summed_grad - b).reshape(-1) for p, b in zip(params, before, strict=True)]).norm()
        assert float(step) <= bound * (1 + 1e-5)
        expected = min(float(norms[i]), bound)
        assert abs(float(step) - expected) < 1e-4 * bound
    assert float(dp.last_norms[0]) == pytest.approx(float(norms[5]), rel=1e-5)


@pytest.mark.slow  # noise calibration and RDP accounting, round after round
def test_reported_epsilon_equals_an_independent_opacus_computation(tmp_path: Path) -> None:
    """Rounds at two sampling rates / noise levels: the ledger's epsilon is Opacus' RDP analysis of the
    same (q, sigma, steps), composed by hand here; and the ledger survives a site restart (re-read)."""
    cfg = PrivacyConfig(enabled=True, target_epsilon=50.0, delta=1e-5, noise_multiplier=1.1)
    ledger = Ledger.open(tmp_path / "l.json", "site_a")
    from brainjepa.privacy.session import PrivateRound

    for rnd, (q, k) in enumerate([(0.25, 4), (0.25, 4), (0.5, 3)]):
        dp = PrivateRound(cfg, ledger, "run-x", "pretrain", rnd, grant(ledger, cfg, "run-x", q, k, 100))
        metrics = dp.commit()
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.25, noise_multiplier=1.1, steps=8, orders=orders) + compute_rdp(
        q=0.5, noise_multiplier=1.1, steps=3, orders=orders
    )
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert metrics[Metric.EPSILON_SPENT] == pytest.approx(eps, rel=1e-9)
    assert metrics[Metric.DP_STEPS] == 11 and metrics[Metric.DELTA] == 1e-5
    again = Ledger.open(tmp_path / "l.json", "site_a")  # a restarted site reads its ledger back
    assert again.epsilon(1e-5) == pytest.approx(eps, rel=1e-12) and len(again.releases) == 3
    report = json.loads((tmp_path / "l-report.json").read_text())
    assert report["epsilon_spent"] == pytest.approx(eps) and report["steps"] == 11 and report["unit"] == "subject"
    assert "noise multiplier" in (tmp_path / "l-report.md").read_text()
    with pytest.raises(Exception, match="belongs to site 'site_a'"):
        Ledger.open(tmp_path / "l.json", "site_b")


@pytest.mark.slow  # noise calibration repeated until the budget runs out
def test_budget_is_refused_past_its_limit_and_the_server_cannot_loosen_it(tmp_path: Path) -> None:
    """Calibrated sigma is fixed at the run's first round: later rounds asking for more steps, another
    planned length or a larger batch (sampling rate) can only spend faster, and are declined past the
    budget; a new run key (a renamed run) composes with the old releases, it gets no new budget."""
    cfg = PrivacyConfig(enabled=True, target_epsilon=2.0, delta=1e-5)
    ledger = Ledger.open(tmp_path / "l.json", "s")
    first = grant(ledger, cfg, "run-a", 0.25, 5, planned_steps=20)
    assert epsilon_of([(first.noise_multiplier, 0.25, 20)], 1e-5) <= 2.0 + 1e-9
    assert first.noise_multiplier == pytest.approx(calibrate([], 0.25, 20, 2.0, 1e-5), rel=1e-9)
    assert epsilon_of([(first.noise_multiplier * 0.99, 0.25, 20)], 1e-5) > 2.0  # the smallest that fits
    from brainjepa.privacy.budget import release_of

    spent = 0
    while True:  # the server keeps asking, with larger rounds and a shorter claimed plan
        try:
            g = grant(ledger, cfg, "run-a", 0.25, 5 + spent, planned_steps=1)
        except BudgetExhausted as e:
            assert "declines" in str(e) and "budget 2.0" in str(e)
            break
        assert g.noise_multiplier == first.noise_multiplier  # the plan cannot lower the fixed noise
        ledger.record(release_of("run-a", "pretrain", spent, g, 1.0))
        spent += 1
    assert ledger.epsilon(1e-5) <= 2.0
    with pytest.raises(BudgetExhausted):  # a larger batch: a higher sampling rate spends faster
        grant(ledger, cfg, "run-a", 0.9, 1, planned_steps=1)
    # another run name: the ledger's releases still count; it only gets the noise the rest of the budget allows
    renamed = grant(ledger, cfg, "run-renamed", 0.25, 1, planned_steps=1)
    assert renamed.epsilon_before == pytest.approx(ledger.epsilon(1e-5)) and renamed.epsilon_after <= 2.0
    fixed = dataclasses.replace(cfg, noise_multiplier=first.noise_multiplier)  # a sigma set in the site YAML
    with pytest.raises(BudgetExhausted):
        grant(ledger, fixed, "run-renamed-again", 0.25, 50, planned_steps=50)


def test_poisson_sampling_draws_subjects_not_scans() -> None:
    """A subject with several scans is one unit: included with rate q, one window per included subject."""
    from sites.windows import pack

    series = [np.full((3, 40), i, np.float32) for i in range(6)]
    units = unit_index(["a", "a", "a", "b", "c", "c"])  # 3 subjects
    assert units.tolist() == [0, 0, 0, 1, 2, 2]
    sampler = PoissonSubjects(pack(series), units, 2, 32, 16, MaskConfig())
    assert sampler.sample_rate == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    sizes, subj_a = [], 0
    for _ in range(300):
        x, masks = sampler.draw(rng)
        if x is None:
            sizes.append(0)
            continue
        values = x[:, 0, 0].long().tolist()
        subjects = [units[v] for v in values]
        assert len(set(subjects)) == len(subjects)  # never two windows of one subject in a step
        assert masks is not None and masks.context.shape[0] == len(values)
        sizes.append(len(values))
        subj_a += 0 in subjects
    assert abs(np.mean(sizes) - 2.0) < 0.25 and abs(subj_a / 300 - 2 / 3) < 0.1


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dp_sites")
    demo = prepare_federation(root, n_sites=1, subjects=8, n_rois=20, n_frames=32, n_components=4)
    return demo.site_yamls[0], demo.gradients


def _spec(grads: Path, rnd: int, local_steps: int = 2, batch: int = 4) -> RoundSpec:
    cfg = PretrainConfig(
        model=MODEL, optim=OptimConfig(lr=1e-3), train=TrainConfig(steps=4 * local_steps, batch_size=batch, seed=0)
    )
    g = load_gradients(grads, 20, 4)
    models = JEPAModels(MODEL, torch.from_numpy(g))
    checksum = model_checksum(MODEL, {n: getattr(models, n) for n in WEIGHT_SETS})
    return RoundSpec(
        task="pretrain",
        round=rnd,
        num_rounds=4,
        step_start=rnd * local_steps,
        local_steps=local_steps,
        wire_dtype="float32",
        model_checksum=checksum,
        gradient_checksum=gradient_checksum(g),
        task_config=cfg,
    )


@pytest.mark.slow  # DP-SGD rounds at a site (Opacus) until its budget runs out
def test_a_dp_site_round_spends_reports_and_declines_at_its_budget(tmp_path: Path, site) -> None:
    """The ClientApp's pretraining round with `privacy.enabled`: epsilon in the reply grows round by round,
    the ledger and the report are on the site's disk, and the round past the budget is declined."""
    yaml, grads = site
    mine = yaml.with_name(f"dp_{tmp_path.name}.yaml")  # the same data, with a privacy section
    ledger = tmp_path / "ledger.json"
    mine.write_text(
        yaml.read_text() + f"privacy: {{enabled: true, target_epsilon: 4.0, delta: 1.0e-5, "
        f"noise_multiplier: 2.0, max_grad_norm: 0.5, clip_chunk: 2, ledger: '{ledger}'}}\n"
    )
    cfg, runtime = resolve_site(mine)
    g = load_gradients(grads, 20, 4)
    torch.manual_seed(0)
    models = JEPAModels(MODEL, torch.from_numpy(g))
    sets = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    spent = []
    for rnd in range(4):  # what client_app.pretrain_round does with privacy.enabled (minus context.state)
        spec = _spec(grads, rnd)
        trainer = SiteTrainer(spec, grads, runtime)
        trainer.load_sets({k: v.clone() for k, v in sets.items()})
        try:
            metrics = private_train(trainer, load_site_data(cfg, spec.task_config), cfg)
        except BudgetExhausted as e:
            assert "would take epsilon" in str(e)
            break
        out = trainer.sets()
        assert all(torch.isfinite(v).all() for v in out.values()) and not torch.equal(out["encoder"], sets["encoder"])
        spent.append(metrics[Metric.EPSILON_SPENT])
        assert metrics[Metric.EPSILON_BUDGET] == 4.0 and metrics[Metric.DP_NOISE_MULTIPLIER] == 2.0
        sets = out
    assert len(spent) >= 1 and spent == sorted(spent) and spent[-1] <= 4.0
    assert len(json.loads(ledger.read_text())["releases"]) == len(spent)
    assert (tmp_path / "ledger-report.md").exists()


def _finetune_model(
    method: str = "finetune", pool: str = "mean", n_frames: int = 32
) -> tuple[DownstreamModel, ModelConfig, np.ndarray]:
    cfg = ModelConfig(size="tiny", n_rois=20, n_frames=n_frames, gradient_components=4)
    torch.manual_seed(0)
    grads = torch.randn(20, 4).numpy()
    backbone = Backbone(cfg, grads, Encoder(cfg, torch.from_numpy(grads)).state_dict(), "test")
    task = TaskSpec(name="age", column="age", kind="regression")
    recipe = DownstreamConfig(method=method, steps=8, batch_size=4, eval_every=4, pool=pool)  # type: ignore[arg-type]
    return DownstreamModel(backbone, task, recipe), cfg, grads


@pytest.mark.parametrize("pool", ["mean", "roi_std", "roi_fc", "roi_std_fc"])
def test_fine_tuning_per_sample_gradients_equal_one_sample_at_a_time(pool: str) -> None:
    """Backbone + head (the fine-tuning networks) under DP: vmap per-sample gradients == one-sample backward,
    with each pooling (the reference's mean, per-ROI mean + std, feature connectivity over 6 time patches)."""
    frames = 96 if pool in ("roi_fc", "roi_std_fc") else 32
    model, _, _ = _finetune_model(pool=pool, n_frames=frames)
    plain_eager(model)
    model.train()
    x, y = torch.randn(3, 20, frames), torch.randn(3)
    x[1, 4] = float("nan")  # a missing ROI (sites.missing): left out of the pooled features
    wrapped = DownstreamForward(model)
    grads, _ = per_sample_gradients(wrapped, lambda f, xi, yi: F.mse_loss(f(xi)[:, 0], yi), x, y)
    for sub in model.modules():
        if hasattr(sub, "use_sdpa"):
            sub.use_sdpa = True
    for i in range(3):  # the model as built, one sample per backward
        model.zero_grad()
        F.mse_loss(model(x[i : i + 1])[:, 0], y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            # fp32: SDPA (here) and explicit attention (the DP path) round differently, and the std over time
            # of roi_std pooling amplifies that (measured: ~2e-5 of the gradient's size)
            tol = 1e-4 if pool == "mean" else 2e-3
            scale = max(1.0, float(p.grad.abs().max()))
            torch.testing.assert_close(grads["model." + n][i], p.grad, rtol=tol, atol=tol * 1e-2 * scale, msg=n)


@pytest.mark.slow  # a DP-SGD round at a site (Opacus)
@pytest.mark.parametrize("method", ["finetune", "probe"])
def test_a_dp_fine_tuning_round_at_a_site_spends_from_the_same_ledger(tmp_path: Path, site, method: str) -> None:
    """A fine-tuning / probing round with privacy.enabled trains (weights move), reports epsilon and
    appends to the ledger; the probe's BatchNorm statistics stay untouched (they would leak the data)."""
    yaml, grads_path = site
    mine = yaml.with_name(f"dp_ft_{tmp_path.name}.yaml")
    ledger = tmp_path / "ledger.json"
    mine.write_text(
        yaml.read_text() + f"privacy: {{enabled: true, target_epsilon: 8.0, max_grad_norm: 1.0, ledger: '{ledger}'}}\n"
    )
    cfg, runtime = resolve_site(mine)
    g = load_gradients(grads_path, 20, 4)
    mcfg = ModelConfig(size="tiny", n_rois=20, n_frames=32, gradient_components=4)
    backbone = Backbone(mcfg, g, Encoder(mcfg, torch.from_numpy(g)).state_dict(), "test")
    task = TaskSpec(name="age", column="age", kind="regression")
    recipe = DownstreamConfig(method=method, steps=8, batch_size=3, eval_every=4)  # type: ignore[arg-type]
    server = DownstreamModel(backbone, task, recipe)
    vec = state_vector(server)
    spec = RoundSpec(
        task=method,
        round=0,
        num_rounds=2,
        step_start=0,
        local_steps=2,
        wire_dtype="float32",  # type: ignore[arg-type]
        model_checksum=model_checksum(mcfg, {MODEL_SET: server}),
        gradient_checksum=gradient_checksum(g),
        task_config=DownstreamTask(task=task, recipe=recipe, model_tr=2.205, scaling="values"),
        model_config=mcfg,
        target_center=30.0,
        target_scale=10.0,
    )
    sets, metrics = DownstreamSite(spec, cfg, runtime, grads_path).run({MODEL_SET: vec.clone()})
    assert not torch.equal(sets[MODEL_SET], vec) and torch.isfinite(sets[MODEL_SET]).all()
    assert 0 < metrics[Metric.EPSILON_SPENT] <= 8.0 and metrics[Metric.DP_STEPS] == 2
    assert json.loads(ledger.read_text())["releases"][0]["task"] == method
    if method == "probe":  # running mean / var of the BatchNorm: still the initial 0 / 1
        after = DownstreamModel(backbone, task, recipe)
        load_state_vector(after, sets[MODEL_SET])
        bn = after.head[0]
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
