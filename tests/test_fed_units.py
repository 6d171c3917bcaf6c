"""Federation pieces without processes: checks, averaging, server optimisers, wire format, site state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from brainjepa.config import ModelConfig, OptimConfig
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.downstream.fit import load_state_vector, state_vector
from brainjepa.downstream.model import Backbone, DownstreamModel
from brainjepa.downstream.train import TargetScale
from brainjepa.errors import ConfigError
from brainjepa.federation.contract import (
    MODEL_SET,
    decode_global,
    decode_update,
    encode_global,
    encode_update,
    eval_metric_key,
)
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.vit import Encoder
from brainjepa.weights import model_checksum
from client.downstream import UNLOADED
from client.state import load_optimizer, save_optimizer
from server.aggregate import RunningMean, ServerOptimizer, SiteUpdate, check_update
from server.config import FederationConfig, ServerOptConfig, from_run_config, load_downstream_task, to_run_config
from server.downstream import check_evaluation, pooled_target


def _update(site: str, n: int, rng: np.random.Generator, sizes: dict[str, int]) -> SiteUpdate:
    return SiteUpdate(
        site, n, {k: torch.from_numpy(rng.standard_normal(v).astype(np.float32)) for k, v in sizes.items()}
    )


SIZES = {"encoder": 300, "predictor": 120, "target": 300}


def test_weighted_mean_matches_float64_recomputation() -> None:
    rng = np.random.default_rng(0)
    ups = [_update(f"s{i}", n, rng, SIZES) for i, n in enumerate([3, 10, 7])]
    running = RunningMean()
    for u in ups:
        running.add(u.sets, u.num_examples)
    got = running.result()
    for k in SIZES:
        ref = sum(u.num_examples * u.sets[k].double().numpy() for u in ups) / 20
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=0, atol=1e-6)


def test_one_site_mean_is_exact_identity() -> None:
    u = _update("a", 37, np.random.default_rng(1), SIZES)
    running = RunningMean()
    running.add(u.sets, u.num_examples)
    for k, v in running.result().items():
        assert torch.equal(v, u.sets[k])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: u.sets["encoder"].__setitem__(5, float("nan")), "NaN/Inf"),
        (lambda u: u.sets["predictor"].__setitem__(0, float("inf")), "NaN/Inf"),
        (lambda u: u.sets.__setitem__("target", torch.zeros(299)), "shape (299,), expected (300,)"),
        (lambda u: u.sets.pop("predictor"), "'predictor' missing"),
        (lambda u: setattr(u, "num_examples", 0), "positive integer"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(mutate, reason: str) -> None:
    u = _update("a", 5, np.random.default_rng(2), SIZES)
    assert check_update(u, SIZES) is None
    mutate(u)
    got = check_update(u, SIZES)
    assert got is not None and reason in got


def test_fedavgm_and_fedadam_move_towards_the_mean() -> None:
    cur = {k: torch.zeros(v) for k, v in SIZES.items()}
    mean = {k: torch.ones(v) for k, v in SIZES.items()}
    avg = ServerOptimizer(ServerOptConfig("fedavg")).step(cur, mean)
    assert all(torch.equal(avg[k], mean[k]) for k in SIZES)
    m = ServerOptimizer(ServerOptConfig("fedavgm", lr=1.0, momentum=0.5))
    first = m.step(cur, mean)
    second = m.step(cur, mean)  # same pseudo-gradient again: momentum 1 + 0.5
    assert torch.allclose(first["encoder"], torch.ones(300)) and torch.allclose(
        second["encoder"], torch.full((300,), 1.5)
    )
    assert torch.equal(second["target"], mean["target"])  # the EMA target is plainly averaged
    adam = ServerOptimizer(ServerOptConfig("fedadam", lr=0.1))
    out = adam.step(cur, mean)
    assert float(out["encoder"].min()) > 0 and float(out["encoder"].max()) <= 0.1 + 1e-6
    state = adam.state_dict()
    again = ServerOptimizer(ServerOptConfig("fedadam", lr=0.1))
    again.load_state_dict(state)
    assert torch.equal(again.step(out, mean)["encoder"], adam.step(out, mean)["encoder"])


def test_fedyogi_follows_reddi_et_al_and_differs_from_fedadam() -> None:
    """Yogi: v <- v - (1 - b2) d^2 sign(v - d^2); Adam: v <- b2 v + (1 - b2) d^2 (Reddi et al. 2021)."""
    cur = {k: torch.zeros(v) for k, v in SIZES.items()}
    rng = np.random.default_rng(0)
    means = [
        {k: torch.from_numpy(rng.standard_normal(v).astype(np.float32)) for k, v in SIZES.items()} for _ in range(3)
    ]
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    yogi, adam = (
        ServerOptimizer(ServerOptConfig(m, lr=lr, beta1=b1, beta2=b2, tau=tau)) for m in ("fedyogi", "fedadam")
    )
    m = v = np.zeros(300)
    x = np.zeros(300)
    for mean in means:
        d = mean["encoder"].double().numpy() - x
        m = b1 * m + (1 - b1) * d
        v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)
        got_y = yogi.step(cur, mean)
        got_a = adam.step(cur, mean)
        cur = {k: torch.from_numpy(x.astype(np.float32)) if k == "encoder" else got_y[k] for k in SIZES}
    np.testing.assert_allclose(got_y["encoder"].numpy(), x, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_a["encoder"].numpy(), x, atol=1e-4)  # Adam's second moment decays: another step
    assert torch.equal(got_y["target"], means[-1]["target"])  # the EMA target is plainly averaged


def test_fp16_wire_uplink_deltas_keep_the_fp32_master() -> None:
    rng = np.random.default_rng(3)
    master = {k: torch.from_numpy((rng.standard_normal(v) * 0.02).astype(np.float32)) for k, v in SIZES.items()}
    down = ArrayRecord(encode_global(master, "float16"))  # as Flower carries it
    assert all(down[k].dtype == "float16" for k in SIZES)
    received = decode_global(down.to_torch_state_dict())
    assert all(torch.equal(received[k], master[k].half().float()) for k in SIZES)
    trained = {
        k: received[k] + 1e-3 * torch.from_numpy(rng.standard_normal(v).astype(np.float32)) for k, v in SIZES.items()
    }
    up = ArrayRecord(encode_update(trained, received, "float16"))
    assert all(up[k].dtype == "float16" for k in SIZES)
    full = decode_update(up.to_torch_state_dict(), "float16", master)
    for k in SIZES:  # master + fp16(delta): error ~ |delta| * 2**-11, not |w| * 2**-11
        err = float((full[k] - (master[k] + (trained[k] - received[k]))).abs().max())
        assert err < 1e-3 * 5 * 2**-11
    with pytest.raises(ValueError, match="beyond fp16 range"):
        encode_global({"encoder": torch.full((3,), 1e6)}, "float16")
    with pytest.raises(ValueError, match="expected float16 deltas"):
        decode_update({k: v.float() for k, v in up.to_torch_state_dict().items()}, "float16", master)


def test_fp32_wire_is_bit_exact_both_ways() -> None:
    rng = np.random.default_rng(4)
    master = {k: torch.from_numpy(rng.standard_normal(v).astype(np.float32)) for k, v in SIZES.items()}
    received = decode_global(ArrayRecord(encode_global(master, "float32")).to_torch_state_dict())
    back = decode_update(
        ArrayRecord(encode_update(received, received, "float32")).to_torch_state_dict(), "float32", master
    )
    assert all(torch.equal(back[k], master[k]) and back[k].dtype == torch.float32 for k in SIZES)


def test_model_checksum_identifies_config_and_layout() -> None:
    cfg = ModelConfig(size="tiny", n_rois=12, n_frames=32)
    models = JEPAModels(cfg, torch.randn(12, 30))
    mods = {n: getattr(models, n) for n in ("encoder", "predictor", "target")}
    again = JEPAModels(cfg, torch.randn(12, 30))  # other weights, same layout: same checksum
    assert model_checksum(cfg, mods) == model_checksum(cfg, {n: getattr(again, n) for n in mods})
    other = ModelConfig(size="tiny", n_rois=12, n_frames=48)
    assert model_checksum(other, mods) != model_checksum(cfg, mods)
    assert model_checksum(cfg, {"encoder": models.encoder}) != model_checksum(cfg, mods)


def test_optimizer_state_survives_the_context_round_trip() -> None:
    cfg = ModelConfig(size="tiny", n_rois=8, n_frames=32)
    models = JEPAModels(cfg, torch.randn(8, 30))
    step = PretrainStep(models, OptimConfig(), total_steps=10)
    for p in models.encoder.parameters():  # give AdamW some moments
        p.grad = torch.randn_like(p)
    step.optimizer.step()
    state = RecordDict()
    save_optimizer(state, step.optimizer, "abc", rounds_done=1)
    fresh = PretrainStep(JEPAModels(cfg, torch.randn(8, 30)), OptimConfig(), total_steps=10)
    assert load_optimizer(state, fresh.optimizer, "other-model") == 0  # another model: not restored
    assert load_optimizer(state, fresh.optimizer, "abc") == 1
    a, b = step.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for i in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_run_config_round_trip_and_errors() -> None:
    cfg = FederationConfig(num_rounds=5, wire_dtype="float16")
    assert from_run_config(to_run_config(cfg)) == cfg
    with pytest.raises(ConfigError, match="'num-roundz': unknown"):
        from_run_config({"num-roundz": 3})
    with pytest.raises(ConfigError, match="'local-steps': expected an integer"):
        from_run_config({"local-steps": "4"})
    with pytest.raises(ConfigError, match="wire-dtype"):
        from_run_config({"wire-dtype": "bfloat16"})
    assert cfg.pretrain().train.steps == 5 * cfg.local_steps


def _downstream_model(method: str, seed: int = 0) -> DownstreamModel:
    cfg = ModelConfig(size="tiny", n_rois=12, n_frames=32)
    torch.manual_seed(seed)
    grads = torch.randn(12, 30).numpy()
    backbone = Backbone(cfg, grads, Encoder(cfg, torch.from_numpy(grads)).state_dict(), "test")
    task = TaskSpec(name="dx", column="dx", classes=("0", "1", "2"))
    return DownstreamModel(backbone, task, DownstreamConfig(method=method))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["finetune", "probe"])
def test_a_site_builds_the_servers_downstream_layout_without_the_checkpoint(method: str) -> None:
    """The site builds the architecture unloaded (weights arrive in the `model` vector): same checksum,
    same vector length, and the vector (BatchNorm statistics included) carries the whole model."""
    server, site = _downstream_model(method, seed=0), _downstream_model(UNLOADED[method], seed=1)
    cfg = ModelConfig(size="tiny", n_rois=12, n_frames=32)
    assert model_checksum(cfg, {MODEL_SET: server}) == model_checksum(cfg, {MODEL_SET: site})
    for buf in server.buffers():  # non-trivial BatchNorm statistics (probe) must travel too
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    vec = state_vector(server)
    received = decode_global(ArrayRecord(encode_global({MODEL_SET: vec}, "float32")).to_torch_state_dict())
    load_state_vector(site, received[MODEL_SET])
    assert all(
        torch.equal(a, b)
        for a, b in zip(server.state_dict().values(), site.state_dict().values(), strict=True)
        if a.is_floating_point()
    )
    up = ArrayRecord(encode_update({MODEL_SET: received[MODEL_SET] + 1e-3}, received, "float16"))
    back = decode_update(up.to_torch_state_dict(), "float16", {MODEL_SET: vec})[MODEL_SET]
    assert float((back - (vec + 1e-3)).abs().max()) < 1e-3 * 2**-10


def test_regression_target_from_site_sums_equals_the_pooled_labels() -> None:
    rng = np.random.default_rng(5)
    labels = [rng.normal(60.0, 8.0, n).astype(np.float32) for n in (13, 1, 40)]
    stats = [
        (
            y.size,
            float(y.astype(np.float64).sum()),
            float(((y.astype(np.float64) - y.astype(np.float64).mean()) ** 2).sum()),
        )
        for y in labels
    ]
    ref = TargetScale.of(TaskSpec(name="age", column="age", kind="regression"), labels)
    got = pooled_target(stats)
    assert got.center == pytest.approx(ref.center, rel=1e-14) and got.scale == pytest.approx(ref.scale, rel=1e-12)
    assert pooled_target([(3, 6.0, 0.0)]) == TargetScale(2.0, 1.0)  # one value: scale 1, as TargetScale.of


def test_evaluation_replies_carry_metrics_only() -> None:
    full = {eval_metric_key(m): 0.5 for m in ("balanced_acc", "acc", "f1", "auroc")}
    assert check_evaluation(SiteUpdate("a", 4, {}, full), "classification") is None
    assert check_evaluation(SiteUpdate("a", 0, {}, {}), "classification") is None  # an empty split
    assert "carries no weights" in str(
        check_evaluation(SiteUpdate("a", 4, {MODEL_SET: torch.zeros(3)}, full), "classification")
    )
    assert "missing: ['mse'" in str(check_evaluation(SiteUpdate("a", 4, {}, full), "regression"))
    assert "count" in str(check_evaluation(SiteUpdate("a", -1, {}, full), "classification"))


def test_downstream_run_config_and_task_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task 'finetune' needs 'checkpoint'"):
        from_run_config({"task": "finetune"})
    with pytest.raises(ConfigError, match="'task'"):
        from_run_config({"task": "evaluate"})  # a round kind, not a run
    path = tmp_path / "downstream.yaml"
    path.write_text("task: {name: sex, column: sex, classes: ['0', '1']}\nrecipe: {method: probe, steps: 8}\n")
    dt = load_downstream_task(path, {"model_tr": 1.5, "scaling": "none"})
    assert dt.recipe.frozen_backbone and dt.model_tr == 1.5 and dt.scaling == "none" and dt.task.classes == ("0", "1")
    path.write_text("task: {name: sex, column: sex, classes: ['0', '1']}\nrecipe: {stepz: 8}\n")
    with pytest.raises(ConfigError, match="recipe.stepz"):
        load_downstream_task(path, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_downstream_task(tmp_path / "missing.yaml", {})
