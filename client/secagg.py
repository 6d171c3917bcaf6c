"""A site's side of secure aggregation: Flower's `secaggplus_mod` around the site's ordinary round.

A secure round (`server.secagg`) reaches the site as four "train" messages carrying Flower's SecAgg+
config record; `secure_train` passes each to `secaggplus_mod`, which answers the key-exchange stages
itself and, in the collect stage, calls `legacy_round`: the legacy FitIns are turned back into the
round contract's message (arrays by name, the round record), the site's ordinary round handler runs
(same checks, data, training, privacy budget and dumps as a plain round), and its reply becomes the
FitRes the mod masks: the DELTA of each requested weight set to the received global set (optionally
clipped to an L2 norm: central DP, where the server cannot clip one site), with the site's weight
(its sample count, or 1) as `num_examples`. The mod multiplies the delta by that weight, quantizes it,
masks it and sends only the masked vector. What a site sends is checked first: a weight above the
federation's `max_weight` or a weighted value outside the quantization range would be silently
clipped by Flower, so the site refuses instead, saying which and by how much.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from brainjepa.federation.contract import ARRAYS, CONFIG, METRICS, SITE, ErrorCode, Metric, decode_update
from brainjepa.federation.secure import (
    SECAGG_ARRAYS,
    SECAGG_CLIP_NORM,
    SECAGG_CLIP_RANGE,
    SECAGG_KEYS,
    SECAGG_MAX_WEIGHT,
    SECAGG_SETS,
    SECAGG_WEIGHTING,
    SITE_NAME,
    clip_delta,
)

Handler = Callable[[Message, Context], Message]


class SecureRoundError(RuntimeError):
    """The site's round failed or was refused inside a secure round: `code` and `reason` as in a plain
    round's error reply."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def is_secure(msg: Message) -> bool:
    """A SecAgg+ stage message (it carries Flower's SecAgg+ config record)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_train(msg: Message, context: Context, handle: Handler) -> Message:
    """One SecAgg+ stage: `secaggplus_mod` with the site's round (`handle`) in its collect stage. A round
    the site refused or failed is the same error reply as in a plain round."""
    try:
        return secaggplus_mod(msg, context, lambda m, c: legacy_round(m, c, handle))
    except SecureRoundError as e:
        return Message(Error(code=e.code, reason=str(e)), reply_to=msg)


def legacy_round(msg: Message, context: Context, handle: Handler) -> Message:
    """FitIns -> the contract's message -> `handle` -> FitRes of the weighted deltas (see module doc)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    try:
        names = str(config[SECAGG_ARRAYS]).split(",")
        send = str(config[SECAGG_SETS]).split(",")
        weighting = str(config[SECAGG_WEIGHTING])
        clip_norm, clip_range = float(config[SECAGG_CLIP_NORM]), float(config[SECAGG_CLIP_RANGE])  # type: ignore[arg-type]
        max_weight = float(config[SECAGG_MAX_WEIGHT])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise SecureRoundError(ErrorCode.REFUSED, f"site refused the round: secure-aggregation settings: {e!r}") from e
    if len(names) != len(fitins.parameters.tensors) or weighting not in ("samples", "uniform"):
        raise SecureRoundError(
            ErrorCode.REFUSED,
            f"site refused the round: {len(fitins.parameters.tensors)} arrays "
            f"for names {names}, weighting '{weighting}'",
        )
    records: dict[str, dict[str, torch.Tensor]] = {ARRAYS: {}}
    for name, blob in zip(names, fitins.parameters.tensors, strict=True):
        rec, _, key = name.rpartition(".")
        records.setdefault(rec or ARRAYS, {})[key] = torch.from_numpy(bytes_to_ndarray(blob).copy())
    msg.content = RecordDict(
        {
            CONFIG: ConfigRecord({k: v for k, v in config.items() if k not in SECAGG_KEYS}),
            **{rec: ArrayRecord(tensors) for rec, tensors in records.items()},
        }
    )
    reply = handle(msg, context)
    if reply.has_error():
        raise SecureRoundError(reply.error.code, reply.error.reason or "")
    content = reply.content
    received = {k: v.float() for k, v in records[ARRAYS].items()}
    wire = str(config.get("wire-dtype", "float32"))
    trained = decode_update(content[ARRAYS].to_torch_state_dict(), wire, received)
    delta = {k: trained[k] - received[k] for k in send}  # (P_k,) each
    metrics: dict[str, float | str] = {k: float(v) for k, v in content[METRICS].items()}
    if clip_norm > 0:
        delta, _ = clip_delta(delta, clip_norm, tuple(send))  # its norm is not reported: the server sees sums only
    weight = float(metrics[Metric.NUM_EXAMPLES]) if weighting == "samples" else 1.0
    check_secure_payload(delta, weight, max_weight, clip_range)
    metrics[SITE_NAME] = str(content[SITE]["name"]) if SITE in content.config_records else ""
    tensors = [ndarray_to_bytes(delta[k].numpy()) for k in send]
    fitres = FitRes(
        Status(Code.OK, "ok"),
        Parameters(tensors=tensors, tensor_type="numpy.ndarray"),
        num_examples=int(weight),
        metrics=metrics,
    )  # type: ignore[arg-type]
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def check_secure_payload(delta: dict[str, torch.Tensor], weight: float, max_weight: float, clip_range: float) -> None:
    """Refuse what Flower's SecAgg+ would silently clip: a weight above `max_weight`, or a weighted delta
    value (weight / max_weight x delta) outside [-clip_range, clip_range]."""
    if not (weight >= 1 and float(weight).is_integer() and weight <= max_weight):
        raise SecureRoundError(
            ErrorCode.REFUSED,
            f"site refused the round: its weight (num-examples) {weight:g} is "
            f"above the federation's secure-aggregation-max-weight {max_weight:g} (raise it)",
        )
    peak = max(float(v.abs().max()) for v in delta.values()) * weight / max_weight
    if not peak <= clip_range:
        raise SecureRoundError(
            ErrorCode.FAILED,
            f"site failed: its weighted update reaches {peak:.4g}, outside the "
            f"secure-aggregation-clip-range {clip_range:g} (SecAgg+ would clip it; raise the "
            "range or lower the learning rate)",
        )
