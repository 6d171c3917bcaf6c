"""The round contract: a round record survives Flower's ConfigRecord, and every way it can disagree is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from brainjepa.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from brainjepa.downstream.config import DownstreamConfig, DownstreamTask, TaskSpec
from brainjepa.federation.contract import (
    MODEL_SET,
    SCALING_IQR,
    SCALING_MEDIAN,
    SKETCH_LEVELS,
    TASKS,
    ContractError,
    ErrorCode,
    Metric,
    RoundSpec,
    decode_update,
    eval_metric_key,
    eval_metrics,
    scaling_arrays,
    scaling_from_arrays,
    weight_sets,
)
from brainjepa.schedules import schedule_at
from brainjepa.weights import WEIGHT_SETS
from sites.scaling import RobustScaling


def _spec(**kw: object) -> RoundSpec:
    cfg = PretrainConfig(
        model=ModelConfig(n_rois=20, n_frames=32),
        optim=OptimConfig(lr=3e-4),
        train=TrainConfig(steps=40, batch_size=4, seed=7),
    )
    base = dict(
        task="pretrain",
        round=2,
        num_rounds=10,
        step_start=8,
        local_steps=4,
        wire_dtype="float16",
        model_checksum="m" * 64,
        gradient_checksum="g" * 64,
        task_config=cfg,
    )
    return RoundSpec(**{**base, **kw})  # type: ignore[arg-type]


def _downstream(task: str = "finetune", method: str = "finetune", **kw: object) -> RoundSpec:
    spec = TaskSpec(name="age", column="age", kind="regression")
    cfg = DownstreamTask(task=spec, recipe=DownstreamConfig(method=method, steps=30, eval_every=6), model_tr=1.5)  # type: ignore[arg-type]
    base = dict(
        task=task,
        round=1,
        num_rounds=5,
        step_start=6,
        local_steps=6,
        wire_dtype="float32",
        model_checksum="m" * 64,
        gradient_checksum="g" * 64,
        task_config=cfg,
        model_config=ModelConfig(n_rois=20, n_frames=32),
        target_center=61.5,
        target_scale=7.25,
    )
    return RoundSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_round_record_round_trips_through_a_flower_config_record() -> None:
    spec = _spec()
    back = RoundSpec.from_record(ConfigRecord(spec.to_record()))
    assert back == spec
    int8 = _spec(wire_dtype="int8", weights_checksum="w" * 64, wire_base="b" * 64)
    assert RoundSpec.from_record(ConfigRecord(int8.to_record())) == int8
    assert back.total_steps == 40 and back.task_config.train.seed == 7


def test_the_schedule_has_one_source_of_truth() -> None:
    """The record carries the round's position, never LR / weight decay / EMA values a site could disagree on."""
    spec = _spec()
    assert not {"lr", "weight-decay", "ema-momentum"} & set(spec.to_record())
    assert spec.schedule() == schedule_at(spec.task_config.optim, 8, 40)
    assert spec.schedule(39) == schedule_at(spec.task_config.optim, 39, 40)


def test_choices_are_checked_for_specs_built_in_code() -> None:
    with pytest.raises(ContractError, match="not supported"):
        _spec(task="probe")  # a probe round is described by a DownstreamTask, not a PretrainConfig
    with pytest.raises(Exception, match="round record.task"):
        _spec(task="distill")
    with pytest.raises(Exception, match="wire_dtype"):
        _spec(wire_dtype="int4")
    assert TASKS == ("pretrain", "finetune", "probe", "evaluate", "label-stats", "scaling-stats")
    with pytest.raises(ContractError, match="split '' with task 'evaluate'"):
        _downstream("evaluate")
    with pytest.raises(ContractError, match="no pretraining schedule"):
        _downstream().schedule()


@pytest.mark.parametrize(
    ("task", "method", "split"),
    [
        ("finetune", "finetune", ""),
        ("finetune", "scratch", ""),
        ("probe", "probe", ""),
        ("evaluate", "probe", "val"),
        ("evaluate", "finetune", "test"),
        ("label-stats", "finetune", ""),
    ],
)
def test_downstream_records_round_trip(task: str, method: str, split: str) -> None:
    spec = _downstream(task, method, split=split)
    record = spec.to_record()
    assert ("split" in record) == (task == "evaluate") and "model-config" in record
    back = RoundSpec.from_record(ConfigRecord(record))
    assert back == spec and type(back) is RoundSpec
    assert back.total_steps == 30 and back.model.n_rois == 20 and back.target_scale == 7.25
    assert back.task_config.task.kind == "regression" and back.task_config.model_tr == 1.5


def test_pretraining_records_carry_no_downstream_fields() -> None:
    assert not {"model-config", "target-center", "target-scale", "split", "scaling-checksum"} & set(_spec().to_record())


def test_scaling_stats_and_federation_scaling_records_round_trip() -> None:
    stats = _spec(task="scaling-stats", round=0)
    assert RoundSpec.from_record(ConfigRecord(stats.to_record())) == stats
    spec = _spec(scaling_checksum="c" * 16)
    assert RoundSpec.from_record(ConfigRecord(spec.to_record())) == spec
    with pytest.raises(ContractError, match="only pretraining rounds"):
        _spec(task="scaling-stats", scaling_checksum="c" * 16)


def test_federation_scaling_travels_in_float64_and_is_checked() -> None:
    """The statistics survive a real ArrayRecord bit for bit (never wire-rounded), their checksum is verified;
    a sketch reply is decoded in float64 even on an fp16 wire."""
    rng = np.random.default_rng(0)
    s = RobustScaling(
        median=rng.normal(size=7), iqr=rng.uniform(0.5, 2, size=7), n_subjects=30, method="federated-sketch"
    )
    arrays = ArrayRecord(scaling_arrays(s)).to_torch_state_dict()
    back = scaling_from_arrays(arrays, s.checksum())
    assert np.array_equal(back.median, s.median) and np.array_equal(back.iqr, s.iqr)
    with pytest.raises(ContractError, match="checksum"):
        scaling_from_arrays(arrays, "0" * 16)
    with pytest.raises(ContractError, match="positive IQRs"):
        scaling_from_arrays({SCALING_MEDIAN: arrays[SCALING_MEDIAN], SCALING_IQR: -arrays[SCALING_IQR]}, s.checksum())
    with pytest.raises(ContractError, match="lacks"):
        scaling_from_arrays({SCALING_MEDIAN: arrays[SCALING_MEDIAN]}, s.checksum())
    levels = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64) + 1e-12
    assert decode_update({SKETCH_LEVELS: levels}, "float16", {})[SKETCH_LEVELS].equal(levels)


@pytest.mark.parametrize(
    ("make", "edit", "needle"),
    [
        (_spec, lambda r: r.pop("gradient-checksum"), "lacks ['gradient-checksum']"),
        (_spec, lambda r: r.update({"contract-version": 1}), "different brainjepa versions"),
        (_spec, lambda r: r.update({"task": "distill"}), "task 'distill' is not supported"),
        (_spec, lambda r: r.update({"task": "finetune"}), "task-config.model"),  # a PretrainConfig is no DownstreamTask
        (_spec, lambda r: r.update({"wire-dtype": "bfloat16"}), "'wire-dtype'"),
        (_spec, lambda r: r.update({"local-steps": "4"}), "'local-steps': expected an integer"),
        (_spec, lambda r: r.update({"round": 10}), "not a valid round"),
        (_spec, lambda r: r.update({"task-config": "{not json"}), "not JSON"),
        (_spec, lambda r: r.update({"task-config": '{"model": {"n_roiz": 3}}'}), "model.n_roiz"),
        (_spec, lambda r: r.update({"model-config": '{"n_rois": 20, "n_frames": 32}'}), "takes no model-config"),
        (_downstream, lambda r: r.pop("model-config"), "needs model-config"),
        (_downstream, lambda r: r.update({"split": "val"}), "split 'val' with task 'finetune'"),
        (_downstream, lambda r: r.update({"split": "holdout"}), "'split'"),
        (_downstream, lambda r: r.update({"task": "probe"}), "recipe method 'finetune'"),
        (_downstream, lambda r: r.update({"target-scale": 0.0}), "target scale"),
        (_downstream, lambda r: r.update({"model-config": "{"}), "model-config is not JSON"),
        (
            _downstream,
            lambda r: r.update(
                {"task-config": '{"task": {"name": "x", "column": "x", "kind": "regression"}, "recipe": {"stepz": 1}}'}
            ),
            "task-config.recipe.stepz",
        ),
    ],
)
def test_a_record_this_side_cannot_honour_is_refused_with_the_field(make, edit, needle: str) -> None:
    record = make().to_record()
    edit(record)
    with pytest.raises(ContractError) as e:
        RoundSpec.from_record(record)
    assert needle in str(e.value)


def test_weight_sets_and_evaluation_metric_keys() -> None:
    assert weight_sets("pretrain") == WEIGHT_SETS
    assert weight_sets("finetune") == weight_sets("probe") == weight_sets("evaluate") == (MODEL_SET,)
    assert weight_sets("label-stats") == weight_sets("scaling-stats") == ()
    reply = {eval_metric_key("auroc"): 0.5, eval_metric_key("acc"): 0.75, Metric.NUM_EXAMPLES: 4.0}
    assert eval_metrics(reply) == {"auroc": 0.5, "acc": 0.75}


def test_metric_keys_and_error_codes_are_distinct() -> None:
    keys = [v for k, v in vars(Metric).items() if k.isupper()]
    assert len(keys) == len(set(keys)) and Metric.NUM_EXAMPLES == "num-examples"
    assert len({int(c) for c in ErrorCode}) == len(ErrorCode)
    assert dataclasses.is_dataclass(RoundSpec)
