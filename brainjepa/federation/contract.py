"""The round contract: what the server asks of a site in a round, and what the site sends back.

Both Flower apps import this module (and nothing of each other). One message each way per site and round:

    server -> site  RecordDict {ARRAYS: the global weight sets (`encode_global`),
                                CONFIG: `RoundSpec.to_record()`}
    site -> server  RecordDict {ARRAYS: the site's weight sets (`encode_update`),
                                METRICS: {`Metric.*`: float}, SITE: {"name": site name}}
                    or an error whose code is an `ErrorCode` and whose reason says why.

The round's `task` says what the site does. `pretrain`: K JEPA steps on three weight sets (encoder,
predictor, EMA target) described by a `PretrainConfig`. The downstream tasks are described by a
`DownstreamTask` (task spec, recipe, model TR, scaling) plus the backbone's `ModelConfig`
(`model_config`), and move ONE weight set, `model` (`brainjepa.downstream.fit.state_vector`: every
floating state entry of the `DownstreamModel`, BatchNorm statistics included):
`finetune` / `probe` train it K steps and send it back; `evaluate` sends it and gets back only the
metrics of the site's `split` (`eval-<metric>` keys) and the split's scan count, no weights;
`label-stats` (regression, once per run) sends no weights and gets back the count, sum and centred sum
of squares of the site's training labels, from which the server forms the target standardisation
(`target_center`, `target_scale`) that every later record carries.

Federation-wide scaling (run config `scaling-scope = "federation"`): a `scaling-stats` round (described
by the run's `PretrainConfig`, no weights sent) gets back each site's quantile sketch of its training
subjects' per-ROI time-means (`sites.scaling_sketch.summarize`: the arrays `SKETCH_LEVELS` (Q,) and
`SKETCH_QUANTILES` (Q, R), float64, in the reply's ARRAYS record; NUM_EXAMPLES = its subject count).
The server combines them once (`sites.scaling_sketch.combine`); every pretraining round then carries the
median / IQR as a second ArrayRecord, `SCALING` (`scaling_arrays`, float64, never wire-rounded), and
their checksum in the record (`scaling-checksum`), which the site verifies before applying them
instead of fitting its own.

A weight set (encoder, predictor, target) travels as ONE flat 1-D vector of the module's parameters in
`named_parameters()` order (`brainjepa.weights`): three objects per message instead of ~400. Downlink in
fp32 or fp16; uplink fp32 weights, or with fp16 the *deltas* to what the site received, added to the
server's fp32 master copy (never rounded). int8 (`brainjepa.federation.compression`): blockwise int8 deltas
both ways, the record carrying `weights-checksum` (what the site must train from) and `wire-base` (the
reference a downlink delta applies to). Payloads here are plain `{name: tensor}` dicts (the apps wrap them
in Flower's `ArrayRecord`).

The schedule (learning rate, weight decay, EMA momentum) has one source of truth: it is a pure function
of the task config, the step and the run's planned steps (`brainjepa.schedules`), so the record carries
only the round's position (`step_start`), never the values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, get_args

import numpy as np
import torch

from brainjepa.config import ModelConfig, PretrainConfig, WireDtype, to_dict
from brainjepa.downstream.config import DownstreamTask
from brainjepa.errors import ConfigError, InputError, Origin
from brainjepa.federation.compression import decode_deltas, feedback_step
from brainjepa.schedules import SchedulePoint, schedule_at
from brainjepa.schema import check_choices, from_mapping
from brainjepa.weights import WEIGHT_SETS
from sites.scaling import RobustScaling

# Bumped whenever a field changes meaning: a site and a server of different versions refuse each other.
CONTRACT_VERSION = 3

Task = Literal["pretrain", "finetune", "probe", "evaluate", "label-stats", "scaling-stats"]
# The config each task's site work is described by.
TASK_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "finetune": DownstreamTask,
    "probe": DownstreamTask,
    "evaluate": DownstreamTask,
    "label-stats": DownstreamTask,
    "scaling-stats": PretrainConfig,
}
DOWNSTREAM_TASKS = ("finetune", "probe", "evaluate", "label-stats")
EvalSplit = Literal["", "train", "val", "test"]  # evaluate rounds: the split scored ("" otherwise)
# The one weight set of downstream rounds: the DownstreamModel's floating state as a flat vector.
MODEL_SET = "model"

# Records of a message's RecordDict.
ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
# Pretraining with federation-wide scaling: the message's second ArrayRecord (server -> site).
SCALING = "scaling"
SCALING_MEDIAN, SCALING_IQR = "median", "iqr"  # (R,) float64 each
# scaling-stats replies: a site's quantile sketch (site -> server, in ARRAYS; never per-subject values).
SKETCH_LEVELS, SKETCH_QUANTILES = "scaling-levels", "scaling-quantiles"  # (Q,), (Q, R) float64
STAT_ARRAYS = (SKETCH_LEVELS, SKETCH_QUANTILES)

FP16_MAX = float(np.finfo(np.float16).max)


class Metric:
    """Keys of a site's reply MetricRecord (all values are floats)."""

    NUM_EXAMPLES = "num-examples"  # the sample count the server weights this update by
    LOSS = "loss"  # mean training loss of the round's local steps
    LOSS_FIRST = "loss-first"
    LOSS_LAST = "loss-last"
    LOCAL_STEPS = "local-steps"
    SAMPLES_SEEN = "samples-seen"
    WALL_S = "wall-s"  # seconds of local training
    ROUND_WALL_S = "round-wall-s"  # seconds of the whole round at the site (load, train, encode)
    BYTES_RECEIVED = "bytes-received"
    BYTES_SENT = "bytes-sent"
    ROUNDS_DONE = "rounds-done"  # rounds this site has trained in this run (its own count)
    PROCESSES = "processes"  # processes (devices) the site trained the round on (its `distributed.devices`)
    # Site-side differential privacy: the site's accountant, over the whole federation so far.
    EPSILON_SPENT = "epsilon-spent"
    EPSILON_BUDGET = "epsilon-budget"
    DELTA = "delta"
    DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # sigma of this round's steps
    DP_MAX_GRAD_NORM = "dp-max-grad-norm"  # C, the per-subject clip norm
    DP_SAMPLE_RATE = "dp-sample-rate"  # Poisson rate per subject per step
    DP_STEPS = "dp-steps"  # DP-SGD steps in the site's ledger, this round included
    # label-stats rounds (NUM_EXAMPLES = the training scans with a usable label): aggregate sums only.
    LABEL_SUM = "label-sum"
    LABEL_M2 = "label-m2"  # sum of squared deviations from the site's own label mean
    # evaluate rounds: `eval-<metric>` for each metric of the task kind (brainjepa.downstream.metrics);
    # NUM_EXAMPLES = the split's scans.
    EVAL_PREFIX = "eval-"


def eval_metric_key(name: str) -> str:
    """`balanced_acc` -> `eval-balanced_acc`: the reply key of an evaluation metric."""
    return Metric.EVAL_PREFIX + name


def eval_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The evaluation metrics of a reply's MetricRecord, by metric name (`eval-` stripped)."""
    n = len(Metric.EVAL_PREFIX)
    return {k[n:]: float(v) for k, v in metrics.items() if k.startswith(Metric.EVAL_PREFIX)}


class ErrorCode(IntEnum):
    """Codes of a site's error reply (the reason text says what is wrong)."""

    REFUSED = 4001  # the site will not train this round: contract, checksum or config mismatch
    FAILED = 4002  # the round raised at the site (bad data, ...)
    BUDGET_EXHAUSTED = 4003  # the next round would exceed the site's privacy budget


class ContractError(InputError):
    """A round record this side cannot honour: the message says which field and why."""


@dataclass(frozen=True)
class RoundSpec:
    """One round as the server asks for it. `task_config` describes the work: a PretrainConfig whose
    `train.steps` is the run's planned optimizer steps (which the schedules span), or a DownstreamTask
    whose `recipe.steps` are. Downstream rounds also carry the backbone's shape (`model_config`), the
    regression target standardisation and, for `evaluate`, the split to score; these are written to the
    record only for the tasks that use them."""

    task: Task
    round: int  # 0-based index of this round
    num_rounds: int
    step_start: int  # global optimizer step this round's first local step has
    local_steps: int
    wire_dtype: WireDtype
    model_checksum: str
    gradient_checksum: str
    task_config: PretrainConfig | DownstreamTask
    model_config: ModelConfig | None = None  # downstream: the backbone's shape (pretraining: task_config.model)
    target_center: float = 0.0  # downstream regression: targets train as (y - center) / scale
    target_scale: float = 1.0
    split: EvalSplit = ""  # evaluate: the split each site scores
    scaling_checksum: str = ""  # pretrain: federation-wide scaling in the SCALING record ("" = site's own)
    weights_checksum: str = ""  # int8: compression.weights_checksum of the sets the site trains from
    wire_base: str = ""  # int8: weights-checksum of the reference an int8 downlink delta applies to

    def __post_init__(self) -> None:
        check_choices(self, "round record")
        expected = TASK_CONFIGS.get(self.task)
        if expected is None or not isinstance(self.task_config, expected):
            raise ContractError(
                f"round record: task '{self.task}' is not supported by this version (supported: {sorted(TASK_CONFIGS)})"
            )
        if not 0 <= self.round < self.num_rounds or self.local_steps < 1 or self.step_start < 0:
            raise ContractError(
                f"round record: round {self.round} of {self.num_rounds}, {self.local_steps} local "
                f"steps from step {self.step_start}: not a valid round"
            )
        downstream = self.task in DOWNSTREAM_TASKS
        if downstream != (self.model_config is not None):
            raise ContractError(
                f"round record: task '{self.task}' {'needs' if downstream else 'takes no'} "
                "model-config (downstream rounds carry the backbone's model config)"
            )
        if (self.task == "evaluate") != bool(self.split):
            raise ContractError(
                f"round record: split '{self.split}' with task '{self.task}' (an evaluate round "
                "names the split to score, other rounds none)"
            )
        if self.task in ("finetune", "probe") and (self.task == "probe") != self.task_config.recipe.frozen_backbone:
            raise ContractError(
                f"round record: task '{self.task}' with recipe method "
                f"'{self.task_config.recipe.method}' (probe rounds train a frozen backbone's head)"
            )
        if self.scaling_checksum and self.task != "pretrain":
            raise ContractError(
                f"round record: scaling-checksum with task '{self.task}' (only pretraining rounds "
                "carry federation-wide scaling)"
            )
        if not (self.target_scale > 0.0 and abs(self.target_center) < float("inf")):
            raise ContractError(f"round record: target scale {self.target_scale} / center {self.target_center}")

    @property
    def model(self) -> ModelConfig:
        """The backbone / JEPA model shape of this round."""
        if isinstance(self.task_config, PretrainConfig):
            return self.task_config.model
        assert self.model_config is not None  # __post_init__
        return self.model_config

    @property
    def total_steps(self) -> int:
        """Planned optimizer steps of the whole run (what the schedules span)."""
        if isinstance(self.task_config, PretrainConfig):
            return self.task_config.train.steps
        return self.task_config.recipe.steps

    def schedule(self, step: int | None = None) -> SchedulePoint:
        """Pretraining: LR, weight decay and EMA momentum at `step` (default: the round's first step)."""
        if not isinstance(self.task_config, PretrainConfig):
            raise ContractError(f"round record: task '{self.task}' has no pretraining schedule")
        at = self.step_start if step is None else step
        return schedule_at(self.task_config.optim, at, self.total_steps)

    def to_record(self) -> dict[str, int | float | str]:
        """The values of the message's CONFIG record (Flower ConfigRecord scalars)."""
        record: dict[str, int | float | str] = {
            "contract-version": CONTRACT_VERSION,
            "task": self.task,
            "round": self.round,
            "num-rounds": self.num_rounds,
            "step-start": self.step_start,
            "local-steps": self.local_steps,
            "wire-dtype": self.wire_dtype,
            "model-checksum": self.model_checksum,
            "gradient-checksum": self.gradient_checksum,
            "task-config": json.dumps(to_dict(self.task_config)),
        }
        if self.model_config is not None:
            record.update(
                {
                    "model-config": json.dumps(to_dict(self.model_config)),
                    "target-center": self.target_center,
                    "target-scale": self.target_scale,
                }
            )
        if self.split:
            record["split"] = self.split
        optional = {"scaling-checksum": self.scaling_checksum, "weights-checksum": self.weights_checksum}
        record.update({k: v for k, v in {**optional, "wire-base": self.wire_base}.items() if v})
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RoundSpec:
        """Inverse of `to_record`; a missing field, another contract version or a bad value is a ContractError."""
        version = record.get("contract-version")
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"round record: contract version {version!r}, this side speaks {CONTRACT_VERSION}: "
                "server and site run different brainjepa versions"
            )
        fields = dataclasses.fields(cls)
        required = {_key(f.name) for f in fields if f.default is dataclasses.MISSING}
        missing = sorted(required - set(record))
        if missing:
            raise ContractError(f"round record lacks {missing}: server and site run different brainjepa versions")
        task = str(record["task"])
        if task not in TASK_CONFIGS:
            raise ContractError(
                f"round record: task '{task}' is not supported by this version (supported: {sorted(TASK_CONFIGS)})"
            )
        values = {_key(f.name): record[_key(f.name)] for f in fields if _key(f.name) in record}
        for key in ("task-config", "model-config"):
            if key in values:
                try:
                    values[key] = json.loads(str(values[key]))
                except json.JSONDecodeError as e:
                    raise ContractError(f"round record: {key} is not JSON ({e})") from e
        try:
            parsed = from_mapping(_record_type(TASK_CONFIGS[task]), values, Origin("round record"), spell=_key)
        except ConfigError as e:
            raise ContractError(str(e)) from e
        return cls(**{f.name: getattr(parsed, f.name) for f in fields})


def _key(field_name: str) -> str:
    """A RoundSpec field as the record spells it (`step_start` -> `step-start`)."""
    return field_name.replace("_", "-")


@functools.cache
def _record_type(config_type: type) -> type:
    """RoundSpec with `task_config` narrowed to one task's config type: what the strict loader reads."""
    return dataclasses.make_dataclass("RoundSpec", [("task_config", config_type)], bases=(RoundSpec,), frozen=True)


def weight_sets(task: str) -> tuple[str, ...]:
    """The weight sets a round of `task` sends to the site (a site sends back those it trains:
    pretrain and finetune / probe all of them, evaluate, label-stats and scaling-stats none)."""
    if task == "pretrain":
        return WEIGHT_SETS
    return () if task in ("label-stats", "scaling-stats") else (MODEL_SET,)


# ---------------------------------------------------------------------------------------- scaling
def scaling_arrays(scaling: RobustScaling) -> dict[str, torch.Tensor]:
    """Server -> site: the federation's median / IQR as the SCALING record's float64 arrays."""
    return {
        SCALING_MEDIAN: torch.from_numpy(np.asarray(scaling.median, np.float64).copy()),
        SCALING_IQR: torch.from_numpy(np.asarray(scaling.iqr, np.float64).copy()),
    }


def scaling_from_arrays(arrays: Mapping[str, torch.Tensor], checksum: str) -> RobustScaling:
    """The statistics a pretraining round carries, refused unless well formed and of `checksum`."""
    try:
        med, iqr = (np.asarray(arrays[k].double().numpy(), np.float64) for k in (SCALING_MEDIAN, SCALING_IQR))
    except KeyError as e:
        raise ContractError(f"round record: scaling-checksum {checksum} but the '{SCALING}' record lacks {e}") from e
    if med.ndim != 1 or med.shape != iqr.shape or not (np.isfinite(med).all() and (iqr > 0).all()):
        raise ContractError(
            f"round record: federation scaling median {med.shape} / iqr {iqr.shape}: not R finite "
            "values and R positive IQRs"
        )
    scaling = RobustScaling(median=med, iqr=iqr, n_subjects=0, method="federated-sketch")
    if scaling.checksum() != checksum:
        raise ContractError(
            f"federation scaling: received statistics have checksum {scaling.checksum()}, the "
            f"record says {checksum} (corrupted in transit)"
        )
    return scaling


# ---------------------------------------------------------------------------------------- weight sets
def encode_global(sets: Mapping[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """Server -> site: the global flat fp32 vectors as they travel (fp32, or fp16 after a range check;
    int8's full-precision form, its resync, is fp32: its deltas come from `server.downlink`)."""
    out = {}
    for name, vec in sets.items():
        vec = vec.detach()
        if wire_dtype == "float16":
            peak = float(vec.abs().max())
            if peak > FP16_MAX:
                raise ValueError(
                    f"weight set '{name}' has |w| up to {peak:.3g}, beyond fp16 range: use wire-dtype float32"
                )
            out[name] = vec.to(torch.float16)
        else:
            out[name] = vec.float()
    return out


def decode_global(payload: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a site trains from: each received set as an fp32 vector (the base of its fp16 deltas)."""
    return {name: vec.float().clone() for name, vec in payload.items()}


def encode_update(
    trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], wire_dtype: str
) -> dict[str, torch.Tensor]:
    """Site -> server: fp32 weights, or fp16 / int8 deltas to what the site received (every set in
    `trained`; int8 here without error feedback, which `client.wire` adds)."""
    if wire_dtype == "int8":
        return feedback_step({k: trained[k] - received[k] for k in trained}, None)[0]
    if wire_dtype == "float16":
        return {k: (trained[k] - received[k]).to(torch.float16) for k in trained}
    return {k: trained[k].float() for k in trained}


def decode_update(
    payload: Mapping[str, torch.Tensor], wire_dtype: str, master: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A site's reply -> full fp32 vectors (fp16 / int8 deltas are added to the server's fp32 master copy)."""
    out = {}
    if wire_dtype == "int8" and master:  # every set of `master`, as int8 codes + scales
        sets = {k: v for k, v in payload.items() if k not in STAT_ARRAYS}
        deltas = decode_deltas(sets, {k: v.numel() for k, v in master.items()})
        out = {name: d.add_(master[name]) for name, d in deltas.items()}  # in place: no second copy
        payload = {k: v for k, v in payload.items() if k in STAT_ARRAYS}
    for name, vec in payload.items():
        if name in STAT_ARRAYS:  # a scaling sketch: statistics, kept in float64
            out[name] = vec.double().clone()
        elif wire_dtype == "float16" and name in master:
            if vec.dtype != torch.float16:
                raise ValueError(f"weight set '{name}' arrived as {vec.dtype}, expected float16 deltas")
            out[name] = master[name] + vec.float()
        else:
            out[name] = vec.float().clone()
    return out


TASKS: tuple[str, ...] = get_args(Task)
