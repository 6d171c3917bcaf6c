"""Per-set bounds on what a site sends (server.bounds, server.guard), checked against a REAL local round:
an honest site's encoder, predictor and EMA target after real JEPA steps pass every bound; the attacks a
registered site can mount (target x 1e4 or x 1.01, predictor x 1.45, compounding growth, a changed sample
claim, a downstream head x 20) do not. The quarantine file survives a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import structured_cohort

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.downstream.fit import state_vector
from brainjepa.downstream.model import Backbone, DownstreamModel
from brainjepa.federation.contract import RoundSpec
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.masks import sample_masks
from brainjepa.weights import WEIGHT_SETS, flat_parameters
from server.aggregate import SiteUpdate
from server.bounds import ClaimBook, NormHistory, SetBound, adam_reach, check_bounds, distance_bound, ema_share
from server.config import FederationConfig
from server.downstream import head_weights
from server.exchange import SiteResult
from server.guard import UpdateGuard
from server.quarantine import Quarantine

MODEL = ModelConfig(size="tiny", n_rois=32, n_frames=64, gradient_components=8)
LOCAL_STEPS = 4


def _spec(rnd: int = 0, total_rounds: int = 10) -> RoundSpec:
    cfg = PretrainConfig(
        model=MODEL, optim=OptimConfig(lr=1e-3), train=TrainConfig(steps=total_rounds * LOCAL_STEPS, batch_size=4)
    )
    return RoundSpec(
        task="pretrain",
        round=rnd,
        num_rounds=total_rounds,
        step_start=rnd * LOCAL_STEPS,
        local_steps=LOCAL_STEPS,
        wire_dtype="float32",
        model_checksum="m" * 64,
        gradient_checksum="g" * 64,
        task_config=cfg,
    )


@pytest.fixture(scope="module")
def honest_round() -> tuple[RoundSpec, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(spec, global sets, an honest site's sets after LOCAL_STEPS real JEPA steps on real-structured data)."""
    spec = _spec()
    torch.manual_seed(0)
    grads = torch.randn(MODEL.n_rois, MODEL.gradient_components, generator=torch.Generator().manual_seed(1))
    models = JEPAModels(MODEL, grads)
    before = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    x = torch.from_numpy(structured_cohort(8, MODEL.n_rois, MODEL.n_frames, seed=3)).float()  # (B, R, T)
    step = PretrainStep(models, spec.task_config.optim, spec.total_steps)
    g = torch.Generator().manual_seed(5)
    for i in range(LOCAL_STEPS):
        masks = sample_masks(MaskConfig(), 8, MODEL.n_rois, MODEL.n_frames // MODEL.patch_size, g)
        step([(x, masks)], spec.step_start + i)
    after = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    assert all(not torch.equal(before[n], after[n]) for n in WEIGHT_SETS)  # the round really trained
    return spec, before, after


def _guard(tmp: Path, **kw: object) -> UpdateGuard:
    return UpdateGuard(FederationConfig(local_steps=LOCAL_STEPS, **kw), tmp, {}, None)  # type: ignore[arg-type]


def test_ema_share_is_one_minus_the_product_of_the_rounds_momenta() -> None:
    spec = _spec(rnd=3)
    prod = math.prod(spec.schedule(spec.step_start + i).momentum for i in range(LOCAL_STEPS))
    assert ema_share(spec) == pytest.approx(1 - prod) and 0 < ema_share(spec) < 0.02


def test_an_honest_round_passes_every_set_bound_and_each_attack_is_refused(tmp_path: Path, honest_round) -> None:
    spec, current, honest = honest_round
    guard = _guard(tmp_path)
    guard.norms.record(0, current)
    bounds = guard.bounds(spec, current)
    assert check_bounds(honest, current, bounds) is None
    # the target may move far less than the trained sets: the EMA schedule bounds it
    assert bounds["target"].max_distance < 0.1 * bounds["encoder"].max_distance
    attacks = {
        "target x 1e4": ({"target": honest["target"] * 1e4}, "'target' moved"),
        "target x 1.01": ({"target": honest["target"] * 1.01}, "derived from the EMA schedule and the encoder sent"),
        "predictor x 1.45 (inside max-update-ratio)": ({"predictor": honest["predictor"] * 1.45}, "max-norm-growth"),
        "encoder x 3": ({"encoder": honest["encoder"] * 3}, "'encoder' moved"),
    }
    for name, (change, reason) in attacks.items():
        why = check_bounds({**honest, **change}, current, bounds)
        assert why is not None and reason in why, (name, why)
    assert (
        check_bounds(
            {**honest, "predictor": honest["predictor"] * 1.45},
            current,
            _guard(tmp_path, max_norm_growth=0.0).bounds(spec, current),
        )
        is None
    )


def test_growth_cannot_compound_over_rounds() -> None:
    """A site scaling by 1.2 each round (inside the per-round bound of 1.25): the reference trails by
    norm-window rounds, so the global norm cannot grow past 1.25 x within a window."""
    history, norm = NormHistory(growth=0.25, window=10), 10.0
    history.record(0, {"encoder": torch.full((4,), norm / 2)})
    accepted = 0
    for rnd in range(6):
        proposal = 1.2 * norm
        if proposal <= history.max_norm("encoder", rnd):
            accepted, norm = accepted + 1, proposal
        history.record(rnd + 1, {"encoder": torch.full((4,), norm / 2)})
    assert accepted == 1 and norm == pytest.approx(12.0)
    assert NormHistory(growth=0.0, window=10).max_norm("encoder", 3) == math.inf


def test_a_changed_sample_claim_is_refused_and_the_guard_quarantines_rejected_sites(
    tmp_path: Path, honest_round
) -> None:
    spec, current, honest = honest_round
    guard = _guard(tmp_path)
    guard.norms.record(0, current)
    bounds = guard.bounds(spec, current)
    ok = SiteResult(7, "ok", "site_a", update=SiteUpdate("site_a", 19, dict(honest)))
    assert guard.check(ok, 0, current, bounds) is None
    inflated = SiteResult(7, "ok", "site_a", update=SiteUpdate("site_a", 500, dict(honest)))
    why = guard.check(inflated, 1, current, bounds)
    assert why is not None and "num-examples 500 differs from the 19" in why
    assert ClaimBook({"a": 3}).check("a", 3) is None
    # a rejected reply quarantines its node (no registry: the name proves nothing, the node id is held)
    inflated.status, inflated.detail = "rejected", why
    guard.after_exchange(1, [inflated, SiteResult(8, "rejected", "site_b", "dup", quarantine=False)])
    exclude, names = guard.exclusion(2)
    assert exclude == {7} and names == "quarantined: node-7" and guard.events == 1
    held = guard.check(SiteResult(7, "ok", "x", update=SiteUpdate("x", 19, dict(honest))), 2, current, bounds)
    assert held is not None and "quarantined since round 2" in held


def test_quarantine_persists_for_a_resume_and_expires_after_n_rounds(tmp_path: Path) -> None:
    q = Quarantine(tmp_path, rounds=0)
    q.add("site_x", 11, 3, "weight set 'target' moved")
    assert (tmp_path / "quarantine.json").stat().st_mode & 0o777 == 0o600
    again = Quarantine(tmp_path, rounds=0)  # a resumed run reads the file
    assert again.nodes(50) == {11} and again.holds("site_x", 50) and again.names(4) == ["site_x"]
    assert json.loads((tmp_path / "quarantine.json").read_text())["sites"]["site_x"]["until"] == 0
    brief = Quarantine(tmp_path / "b", rounds=2)
    brief.add("site_y", 12, 3, "NaN")
    assert brief.nodes(5) == {12} and brief.nodes(6) == frozenset() and brief.holds("site_y", 6) is None


def test_a_downstream_head_is_bounded_apart_from_the_backbone() -> None:
    """A head beside the backbone: scaled x 2 it stays inside the model's bound but not its own."""
    torch.manual_seed(0)
    grads = torch.randn(MODEL.n_rois, MODEL.gradient_components, generator=torch.Generator().manual_seed(1))
    backbone_weights = {k: v for k, v in JEPAModels(MODEL, grads).target.state_dict().items()}
    backbone = Backbone(MODEL, grads.numpy(), backbone_weights, "generated")
    task = TaskSpec(name="sex", column="sex", classes=("0", "1"))
    model = DownstreamModel(backbone, task, DownstreamConfig())
    vec, head = state_vector(model), head_weights(model)
    expected = torch.cat([p.detach().reshape(-1) for p in model.head.parameters()])
    assert torch.equal(vec[head], expected)
    current = {"model": vec, "head": vec[head]}
    bounds = {
        "model": SetBound(distance_bound(vec, 0.5)),
        "head": SetBound(max(distance_bound(vec[head], 0.5), adam_reach(head.numel(), 1e-3, 4))),
    }
    attacked = vec.clone()
    attacked[head] *= 2
    assert check_bounds({"model": attacked}, {"model": vec}, {"model": bounds["model"]}) is None  # hidden in the model
    why = check_bounds({"model": attacked, "head": attacked[head]}, current, bounds)
    assert why is not None and "'head' moved" in why
    trained = vec.clone()
    trained[head] += (
        1e-3 * torch.randn(head.numel(), generator=torch.Generator().manual_seed(2)).sign()
    )  # 4 steps' worth
    assert check_bounds({"model": trained, "head": trained[head]}, current, bounds) is None
