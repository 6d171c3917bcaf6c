"""The round contract: a round record survives Flower's ConfigRecord, and every way it can disagree is refused."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord

from brainjepa.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from brainjepa.federation.contract import TASKS, ContractError, ErrorCode, Metric, RoundSpec
from brainjepa.schedules import schedule_at


def _spec(**kw: object) -> RoundSpec:
    cfg = PretrainConfig(model=ModelConfig(n_rois=20, n_frames=32), optim=OptimConfig(lr=3e-4),
                         train=TrainConfig(steps=40, batch_size=4, seed=7))  # fmt: skip
    base = dict(task="pretrain", round=2, num_rounds=10, step_start=8, local_steps=4, wire_dtype="float16",
                model_checksum="m" * 64, gradient_checksum="g" * 64, task_config=cfg)  # fmt: skip
    return RoundSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_round_record_round_trips_through_a_flower_config_record() -> None:
    spec = _spec()
    back = RoundSpec.from_record(ConfigRecord(spec.to_record()))
    assert back == spec
    assert back.total_steps == 40 and back.task_config.train.seed == 7


def test_the_schedule_has_one_source_of_truth() -> None:
    """The record carries the round's position, never LR / weight decay / EMA values a site could disagree on."""
    spec = _spec()
    assert not {"lr", "weight-decay", "ema-momentum"} & set(spec.to_record())
    assert spec.schedule() == schedule_at(spec.task_config.optim, 8, 40)
    assert spec.schedule(39) == schedule_at(spec.task_config.optim, 39, 40)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda r: r.pop("gradient-checksum"), "lacks ['gradient-checksum']"),
        (lambda r: r.update({"contract-version": 0}), "different brainjepa versions"),
        (lambda r: r.update({"task": "finetune"}), "task 'finetune' is not supported"),
        (lambda r: r.update({"wire-dtype": "bfloat16"}), "'wire-dtype'"),
        (lambda r: r.update({"local-steps": "4"}), "'local-steps': expected an integer"),
        (lambda r: r.update({"round": 10}), "not a valid round"),
        (lambda r: r.update({"task-config": "{not json"}), "not JSON"),
        (lambda r: r.update({"task-config": '{"model": {"n_roiz": 3}}'}), "model.n_roiz"),
    ],
)
def test_a_record_this_side_cannot_honour_is_refused_with_the_field(edit, needle: str) -> None:
    record = _spec().to_record()
    edit(record)
    with pytest.raises(ContractError) as e:
        RoundSpec.from_record(record)
    assert needle in str(e.value)


def test_choices_are_checked_for_specs_built_in_code() -> None:
    with pytest.raises(ContractError, match="not supported"):
        _spec(task="probe")  # a declared task whose site side does not exist yet
    with pytest.raises(Exception, match="wire_dtype"):
        _spec(wire_dtype="int8")
    assert TASKS == ("pretrain", "finetune", "probe", "evaluate")


def test_metric_keys_and_error_codes_are_distinct() -> None:
    keys = [v for k, v in vars(Metric).items() if k.isupper()]
    assert len(keys) == len(set(keys)) and Metric.NUM_EXAMPLES == "num-examples"
    assert len({int(c) for c in ErrorCode}) == len(ErrorCode)
    assert dataclasses.is_dataclass(RoundSpec)
