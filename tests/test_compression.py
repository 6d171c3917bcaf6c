"""int8 transfer (wire-dtype int8): blockwise codec, bytes on Flower's records, error feedback, the
downlink reference kept in step on both ends, malformed payloads, and the combinations refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from brainjepa.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from brainjepa.demo import prepare_federation
from brainjepa.errors import ConfigError
from brainjepa.federation.compression import (
    QUANT_BLOCK,
    QUANT_LEVELS,
    SCALE_SUFFIX,
    dequantize,
    encode_deltas,
    feedback_step,
    quantize,
)
from brainjepa.federation.contract import ContractError, RoundSpec, decode_update, encode_global, encode_update
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.weights import WEIGHT_SETS, flat_parameters, model_checksum
from client.training import SiteTrainer, load_site_data, resolve_site
from client.wire import receive, send
from server.config import FederationConfig
from server.downlink import Downlink
from server.reference_file import read_reference

SIZES = {"encoder": 3 * QUANT_BLOCK + 17, "predictor": 1000, "target": 3 * QUANT_BLOCK + 17}


def _sets(rng: np.random.Generator, scale: float = 0.02) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy((rng.standard_normal(n) * scale).astype(np.float32)) for k, n in SIZES.items()}


def _spec(**kw: object) -> RoundSpec:
    cfg = PretrainConfig(model=ModelConfig(n_rois=20, n_frames=32), optim=OptimConfig(), train=TrainConfig(steps=40))
    base = dict(
        task="pretrain",
        round=0,
        num_rounds=10,
        step_start=0,
        local_steps=4,
        wire_dtype="int8",
        model_checksum="m" * 64,
        gradient_checksum="g" * 64,
        task_config=cfg,
    )
    return RoundSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_round_trip_is_within_half_a_step_of_each_block() -> None:
    rng = np.random.default_rng(0)
    # blocks of very different magnitudes, an all-zero block, a length that is no multiple of the block
    x = torch.from_numpy(rng.standard_normal(5 * QUANT_BLOCK + 301).astype(np.float32))
    x[:QUANT_BLOCK] *= 1e-6
    x[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0.0
    x[2 * QUANT_BLOCK : 3 * QUANT_BLOCK] *= 1e3
    codes, scales = quantize(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.shape == (6,)
    back = dequantize(codes, scales, x.numel())
    bound = torch.repeat_interleave(scales, QUANT_BLOCK)[: x.numel()] / 2  # max |x| of the block / 254
    assert bool(((back - x).abs() <= bound * (1 + 1e-5) + 1e-12).all())
    assert bool((back[QUANT_BLOCK : 2 * QUANT_BLOCK] == 0).all())
    assert int(codes.abs().max()) == QUANT_LEVELS  # every nonzero block uses the full range


def test_uploads_cost_a_quarter_of_fp32_on_flowers_records() -> None:
    """Counted by Flower's own `ArrayRecord.count_bytes()` (each array's data with its .npy header, and
    its key), for the pretraining sets as they travel: int8 codes + one fp32 scale per block."""
    rng = np.random.default_rng(1)
    sizes = {"encoder": 2_000_000, "predictor": 500_000, "target": 2_000_000}
    received = {k: torch.from_numpy((rng.standard_normal(n) * 0.02).astype(np.float32)) for k, n in sizes.items()}
    trained = {k: v + 1e-3 for k, v in received.items()}
    fp32 = ArrayRecord(encode_update(trained, received, "float32")).count_bytes()
    int8 = ArrayRecord(encode_update(trained, received, "int8")).count_bytes()
    ratio = int8 / fp32
    assert ratio <= (1 + 4 / QUANT_BLOCK) / 4 + 1e-4, ratio  # 0.2505: the scales cost 1 / 512 of the codes
    assert ratio <= 0.251


def test_error_feedback_keeps_the_sum_of_decoded_deltas_on_track() -> None:
    """A value far below its block's step (1/127 of the block's largest) rounds to 0 every round: without
    feedback its whole drift is lost; with it, the running sum stays within one round's error."""
    rounds, n = 200, 2 * QUANT_BLOCK
    rng = np.random.default_rng(2)
    true_sum = torch.zeros(n)
    sums = {"feedback": torch.zeros(n), "plain": torch.zeros(n)}
    residual = None
    for _ in range(rounds):
        d = torch.from_numpy((rng.standard_normal(n) * 1e-3).astype(np.float32))
        d[0] = 1.0  # sets block 0's step to 1/127
        d[1:200] = 0.003  # a steady drift below half a step
        true_sum += d
        payload, residual = feedback_step({"encoder": d}, residual)
        sums["feedback"] += dequantize(payload["encoder"], payload["encoder" + SCALE_SUFFIX], n)
        codes, scales = quantize(d)
        sums["plain"] += dequantize(codes, scales, n)
    step = 1.0 / QUANT_LEVELS
    err_fb = float((sums["feedback"] - true_sum).abs().max())
    err_plain = float((sums["plain"] - true_sum).abs().max())
    assert err_fb <= step / 2 + 1e-5  # bounded: what is owed is one round's rounding, never more
    assert err_fb == pytest.approx(float(residual["encoder"].abs().max()), abs=1e-5)
    assert err_plain >= 0.9 * rounds * 0.003  # the drift never crossed half a step: all of it lost


def test_malformed_int8_payloads_are_refused_with_a_reason() -> None:
    rng = np.random.default_rng(3)
    master = _sets(rng)
    good = encode_deltas({k: torch.full_like(v, 1e-3) for k, v in master.items()})
    back = decode_update(good, "int8", master)
    assert all(torch.allclose(back[k], master[k] + 1e-3, atol=1e-8) for k in SIZES)
    cases = {
        "short codes": ({"encoder": good["encoder"][:-1]}, r"encoder': \(6160,\) codes, expected \(6161,\)"),
        "NaN scale": ({"encoder.scale": torch.full_like(good["encoder.scale"], float("nan"))}, "finite"),
        "negative scale": ({"predictor.scale": -good["predictor.scale"]}, "finite and >= 0"),
        "fp32 codes": ({"target": good["target"].float()}, "expected int8 / float32"),
        "code -128": ({"target": torch.full_like(good["target"], -128)}, "-128"),
        "scales missing": ({"target.scale": None}, "expected"),
    }
    for what, (change, reason) in cases.items():
        bad = {**good, **change}
        bad = {k: v for k, v in bad.items() if v is not None}
        with pytest.raises(ValueError, match=reason):
            decode_update(bad, "int8", master)
        assert what  # (named for the failure message)


def test_downlink_reference_stays_in_step_and_resyncs(tmp_path) -> None:
    """Coordinator and site hold the same reference bit for bit: deltas go to sites in sync, the fp32 form
    to any other; a delta for a reference the site lacks, or a corrupted one, is refused."""
    rng = np.random.default_rng(4)
    down = Downlink(tmp_path)
    a, b = RecordDict(), RecordDict()  # two sites' context.state
    glob = _sets(rng)
    spec, r0 = down.prepare(glob, _spec())
    assert r0.delta is None and not spec.wire_base
    wire = r0.records([1, 2])
    assert wire[1] is wire[2] and wire[1].count_bytes() == ArrayRecord(encode_global(glob, "int8")).count_bytes()
    for state in (a, b):
        got = receive(spec, wire[1].to_torch_state_dict(), state)
        assert all(torch.equal(got[k], glob[k]) for k in SIZES)  # the first round: exact fp32
    down.commit(r0, [1])  # only site 1 (state a) replied
    for rnd in range(1, 4):
        glob = {
            k: v + 1e-3 * torch.from_numpy(rng.standard_normal(v.numel()).astype(np.float32)) for k, v in glob.items()
        }
        spec, r = down.prepare(glob, _spec(round=rnd))
        assert not down.path.exists()  # the old reference is gone once the new one is made
        reference = read_reference(r.path, spec.weights_checksum)  # what the coordinator keeps (on disk)
        wire = r.records([1, 2])
        wire_a, wire_b = wire[1], wire[2]
        if rnd == 1:  # site 1 in sync: a delta; site 2 (no reply in round 0): fp32 (small sets: headers count)
            assert wire_a.count_bytes() < 0.3 * wire_b.count_bytes()
        else:  # both in sync
            assert wire_a is wire_b
        before = RecordDict(dict(a))  # site 1 as it held the round's base
        delta = wire_a.to_torch_state_dict()
        got = receive(spec, delta, a)
        assert all(torch.equal(got[k], reference[k]) for k in SIZES)
        assert max(float((got[k] - glob[k]).abs().max()) for k in SIZES) < 1e-3 * 5 / 254
        receive(spec, wire_b.to_torch_state_dict(), b)
        down.commit(r, [1, 2])
    stale = RecordDict()
    with pytest.raises(ContractError, match="needs the full-precision form"):
        receive(spec, delta, stale)
    tampered = dict(delta)
    tampered["encoder"] = tampered["encoder"].clone()
    tampered["encoder"][0] = 6 if int(tampered["encoder"][0]) == 5 else 5  # one code changed in transit
    with pytest.raises(ContractError, match="checksum"):
        receive(spec, tampered, before)
    assert torch.equal(receive(spec, delta, before)["encoder"], reference["encoder"])  # the untampered one
    down.close()
    assert not list(tmp_path.iterdir())


def test_site_keeps_its_residual_between_rounds() -> None:
    rng = np.random.default_rng(5)
    state = RecordDict()
    received = _sets(rng)
    trained = {
        k: v + 1e-4 * torch.from_numpy(rng.standard_normal(v.numel()).astype(np.float32)) for k, v in received.items()
    }
    first = send(_spec(), trained, received, state)
    second = send(_spec(round=1), trained, received, state)  # same delta, now plus the kept residual
    assert any(not torch.equal(first[k], second[k]) for k in SIZES)
    assert "site.wire-residual" in state.array_records


def test_int8_is_refused_with_secure_aggregation_and_downstream_runs() -> None:
    with pytest.raises(ConfigError, match="'wire-dtype' = 'int8' with 'secure-aggregation'"):
        FederationConfig(wire_dtype="int8", secure_aggregation=True)
    with pytest.raises(ConfigError, match="int8' applies to pretraining runs"):
        FederationConfig(wire_dtype="int8", task="finetune", checkpoint="c.pt", downstream_config="d.yaml")
    FederationConfig(wire_dtype="int8", central_dp=True, strategy="fedavg")  # composes: decoded before the clip
    FederationConfig(wire_dtype="int8", strategy="median")
    assert encode_global(_sets(np.random.default_rng(6)), "int8")["encoder"].dtype == torch.float32  # the resync form


@pytest.mark.slow  # a generated site and one training step in-process
def test_training_leaves_the_received_weights_untouched(tmp_path) -> None:
    """The site's deltas (fp16, int8) are trained - received: training must not write into `received`
    (the parameters are views of what they were loaded from)."""
    demo = prepare_federation(tmp_path, n_sites=1, subjects=4, n_rois=20, n_frames=32, n_components=4, seed=1)
    (site_yaml,) = sorted(tmp_path.glob("*/*.yaml"))
    model = ModelConfig(n_rois=20, n_frames=32, gradient_components=4)
    cfg = PretrainConfig(model=model, optim=OptimConfig(lr=1e-3), train=TrainConfig(steps=2, batch_size=2))
    g = load_gradients(demo.gradients, 20, 4)
    models = JEPAModels(model, torch.from_numpy(g))
    checksum = model_checksum(model, {n: getattr(models, n) for n in WEIGHT_SETS})
    spec = _spec(
        wire_dtype="float16",
        task_config=cfg,
        num_rounds=2,
        local_steps=1,
        model_checksum=checksum,
        gradient_checksum=gradient_checksum(g),
    )
    received = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    kept = {k: v.clone() for k, v in received.items()}
    site, runtime = resolve_site(site_yaml)
    trainer = SiteTrainer(spec, demo.gradients, runtime)
    trainer.load_sets(received)
    trainer.train(load_site_data(site, cfg))
    assert all(torch.equal(received[k], kept[k]) for k in WEIGHT_SETS)
    delta = encode_update(trainer.sets(), received, "float16")
    assert float(delta["encoder"].abs().max()) > 0 and float(delta["target"].abs().max()) > 0
