"""Secure aggregation of pretraining rounds through Flower's SecAgg+ (run config `secure-aggregation`).

In flwr 1.42 `SecAggPlusWorkflow` runs only on the legacy server path: it needs a `LegacyContext` (a
legacy `Strategy` and a client manager) and speaks FitIns / FitRes. Rather than moving the whole run
onto `DefaultWorkflow` (which owns the round loop: our checkpoints, resume, reports and central DP
would have to live inside a legacy strategy), each pretraining round calls the workflow once itself:
`secure_exchange` builds that round's LegacyContext with a thin strategy (`RoundStrategy`: its
`configure_fit` hands every sampled site the round's FitIns, its `aggregate_fit` keeps what the
workflow unmasked) and our round loop (`server.pretraining`) stays the same around it.

The four SecAgg+ stages are four messages to each site (setup: public keys; share keys: encrypted
Shamir shares; collect: the round itself, the site replies with its masked, quantized, weighted
delta; unmask: shares of the survivors' mask seeds / the dropped sites' keys). The server learns only
the weighted SUM of the deltas and the sum of the weights, i.e. the weighted mean: sample-weighted
FedAvg stays exact because each site multiplies its delta by its weight n_i before masking and adds
n_i to the masked weight sum (Flower's `secaggplus_mod` does both; `max_weight` bounds n_i).

It protects the individual updates from the server (and from anyone reading the server's memory or
logs), as long as fewer than the reconstruction threshold of sites collude with it. It does not: hide
the aggregate (that is DP's job: central DP adds noise to this sum, the sites' DP-SGD bounds what any
update says about one subject), hide the reply metrics (loss, sample counts, epsilon), let the server
check one update (no norm bound, NaN check or robust aggregation of single updates: a site can poison
the sum unseen), or survive a round with fewer sites than the threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, bytes_to_ndarray, ndarray_to_bytes
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from brainjepa.federation.contract import ErrorCode, Metric, RoundSpec, encode_global
from brainjepa.federation.secure import (
    SECAGG_ARRAYS,
    SECAGG_CLIP_NORM,
    SECAGG_CLIP_RANGE,
    SECAGG_MAX_WEIGHT,
    SECAGG_SETS,
    SECAGG_WEIGHTING,
    SITE_NAME,
    TRAINED_SETS,
    Weighting,
)
from brainjepa.weights import WEIGHT_SETS
from server.aggregate import RunningMean, SiteUpdate
from server.central_dp import ClippedSum
from server.config import FederationConfig
from server.exchange import SiteResult, sample_nodes, wait_for_nodes

log = logging.getLogger(__name__)

# Shamir threshold as a share of the sampled sites (at least 2): the server plus fewer colluding sites
# cannot unmask one site; a round survives the loss of the others.
RECONSTRUCTION_THRESHOLD = 2 / 3


def _value_bytes(value: object) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8  # a number (int64 / float64) or a bool


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: arrays (their data), configs and metrics (keys and values; counted
    here because flwr 1.42's ConfigRecord.count_bytes fails on an empty list, which SecAgg+ sends)."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    for rec in (*content.config_records.values(), *content.metric_records.values()):
        total += sum(len(k) + _value_bytes(v) for k, v in rec.items())
    return total


POLL_S = 0.5  # seconds between pulls while a stage's replies are due


class RecordingGrid:
    """The run's Grid as the workflow sees it: every `send_and_receive` passes through, and the bytes sent
    to / received from each node and each node's error reply are kept."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_sent: dict[int, int] = {}
        self.bytes_received: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.error_codes: dict[int, int] = {}
        self.stages: list[dict[str, float]] = []  # per call (a SecAgg+ stage): seconds, bytes out, bytes in

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = list(messages)
        t0, sent, got = time.perf_counter(), 0, 0
        for m in out:
            node = m.metadata.dst_node_id
            n = content_bytes(m.content)
            self.bytes_sent[node] = self.bytes_sent.get(node, 0) + n
            sent += n
        replies = self._exchange(out, timeout)
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self.errors[node] = (r.error.reason or f"error code {r.error.code}").strip()
                self.error_codes[node] = int(r.error.code)
            else:
                n = content_bytes(r.content)
                self.bytes_received[node] = self.bytes_received.get(node, 0) + n
                got += n
        self.stages.append({"wall_s": time.perf_counter() - t0, "bytes_sent": sent, "bytes_received": got})
        return replies

    def _exchange(self, out: list[Message], timeout: float | None) -> list[Message]:
        """Push `out`, then pull replies every POLL_S until all came or `timeout` (Flower's own
        `send_and_receive` pulls every 3 s: up to 3 s lost in each of a SecAgg+ round's four stages)."""
        pending = set(self.grid.push_messages(out))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        return replies

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)


class RoundStrategy(Strategy):
    """The legacy strategy of one secure round: the sampled nodes get `fitins`; the unmasked aggregate
    (which the workflow puts into every FitRes) and the sites' metrics are kept in `results`."""

    def __init__(self, fitins: FitIns) -> None:
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, self.fitins) for proxy in client_manager.all().values()]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


@dataclass
class SecureRound:
    """What a secure round gives the server: per-site results without weights, and the weighted mean of
    the sites' deltas (`mean_delta`, float64) over `weight_sum`."""

    results: list[SiteResult]
    mean_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    sites: int = 0  # sites in the sum
    weight_sum: float = 0.0
    sampled: int = 0
    population: int = 0
    wall_s: float = 0.0
    stages: list[dict[str, float]] = field(default_factory=list)  # setup, share keys, collect, unmask


def round_fitins(
    spec: RoundSpec,
    sets: Mapping[str, torch.Tensor],
    records: Mapping[str, Mapping[str, torch.Tensor]],
    cfg: FederationConfig,
    weighting: Weighting,
    send: tuple[str, ...],
    clip_norm: float,
    max_weight: float,
) -> FitIns:
    """The round as legacy FitIns: the global sets (and extra records as `record.key`) as unnamed arrays,
    their names and the secure-aggregation settings next to the round record."""
    arrays = dict(encode_global(sets, spec.wire_dtype))
    for rec, tensors in records.items():
        arrays.update({f"{rec}.{k}": v for k, v in tensors.items()})
    config = {
        **spec.to_record(),
        SECAGG_ARRAYS: ",".join(arrays),
        SECAGG_SETS: ",".join(send),
        SECAGG_WEIGHTING: weighting,
        SECAGG_CLIP_NORM: float(clip_norm),
        SECAGG_CLIP_RANGE: cfg.secure_aggregation_clip_range,
        SECAGG_MAX_WEIGHT: max_weight,
    }
    tensors = [ndarray_to_bytes(v.detach().numpy()) for v in arrays.values()]
    return FitIns(Parameters(tensors=tensors, tensor_type="numpy.ndarray"), config)


def secure_exchange(
    grid: Grid,
    cfg: FederationConfig,
    spec: RoundSpec,
    sets: Mapping[str, torch.Tensor],
    records: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    clip_norm: float = 0.0,
    exclude: frozenset[int] = frozenset(),
    why: str = "",
) -> SecureRound:
    """One pretraining round through SecAgg+. Sites are sampled as `server.exchange` samples them. With
    `clip_norm` > 0 (central DP) each site clips its encoder + predictor delta to that norm and weighs 1;
    otherwise it sends all three sets' deltas weighted by its sample count."""
    t0 = time.perf_counter()
    nodes = wait_for_nodes(grid, cfg.min_sites, cfg.wait_for_sites_s, exclude, why)
    sampled = sample_nodes(nodes, cfg.fraction_sites, cfg.min_sites, np.random.default_rng([cfg.seed, spec.round]))
    weighting: Weighting = "uniform" if clip_norm > 0 else "samples"
    send = TRAINED_SETS if clip_norm > 0 else WEIGHT_SETS
    # weight 1 each (central DP): max_weight 1, the full quantization range for the delta itself
    max_weight = 1.0 if clip_norm > 0 else cfg.secure_aggregation_max_weight
    fitins = round_fitins(spec, sets, records or {}, cfg, weighting, send, clip_norm, max_weight)
    strategy = RoundStrategy(fitins)
    manager = SimpleClientManager()
    for node in sampled:
        manager.register(GridClientProxy(node, grid, 0))
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: spec.round + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=max_weight,
        clipping_range=cfg.secure_aggregation_clip_range,
        timeout=cfg.round_timeout_s,
    )
    recording = RecordingGrid(grid)
    log.info(
        "%s round %d/%d: SecAgg+ with %d site(s) (%s weights, deltas of %s, clip range %.3g, threshold %.2f)",
        spec.task,
        spec.round + 1,
        spec.num_rounds,
        len(sampled),
        weighting,
        ",".join(send),
        cfg.secure_aggregation_clip_range,
        RECONSTRUCTION_THRESHOLD,
    )
    workflow(recording, context)  # type: ignore[arg-type]
    out = SecureRound(results=[], sampled=len(sampled), population=len(nodes))
    by_node = {proxy.node_id: fitres for proxy, fitres in strategy.results}  # type: ignore[attr-defined]
    for node in sampled:
        res = SiteResult(
            node,
            "failed",
            bytes_sent=recording.bytes_sent.get(node, 0),
            bytes_received=recording.bytes_received.get(node, 0),
        )
        fitres = by_node.get(node)
        if fitres is not None:
            metrics = {k: float(v) for k, v in fitres.metrics.items() if isinstance(v, (int, float))}
            res.site = str(fitres.metrics.get(SITE_NAME, f"node-{node}"))
            n = metrics.get(Metric.NUM_EXAMPLES, 0.0)
            res.status = "ok"
            res.update = SiteUpdate(res.site, int(n) if float(n).is_integer() else -1, {}, metrics)
            out.weight_sum += fitres.num_examples
        else:
            res.detail = recording.errors.get(node, "no part in the unmasked sum (SecAgg+ halted or the site dropped)")
            if recording.error_codes.get(node) == ErrorCode.BUDGET_EXHAUSTED:
                res.status = "declined"  # out of its privacy budget: the sum goes on without it (>= threshold left)
            log.warning("site node %d: not in the secure sum: %s", node, res.detail.splitlines()[-1][:300])
        out.results.append(res)
    if strategy.results:
        agg = strategy.results[0][1].parameters.tensors
        out.mean_delta = {
            k: torch.from_numpy(np.asarray(bytes_to_ndarray(t), np.float64)) for k, t in zip(send, agg, strict=True)
        }
        out.sites = len(strategy.results)
    out.wall_s, out.stages = time.perf_counter() - t0, recording.stages
    log.info(
        "SecAgg+ round %d: %d of %d site(s) in the sum, %.1f s, %.1f MB sent, %.1f MB received",
        spec.round + 1,
        out.sites,
        len(sampled),
        out.wall_s,
        sum(recording.bytes_sent.values()) / 1e6,
        sum(recording.bytes_received.values()) / 1e6,
    )
    return out


def add_secure_sum(acc: RunningMean | ClippedSum, sec: SecureRound, current: Mapping[str, torch.Tensor]) -> None:
    """The unmasked result into the round's accumulator: a `ClippedSum` (central DP) gets the sum of the
    sites' clipped deltas (mean x sites: each weighed 1), a `RunningMean` the mean weights with the total
    sample count (one add: its result is exactly those weights)."""
    if sec.sites == 0:
        return
    if isinstance(acc, ClippedSum):
        acc.add_sum({k: v * sec.sites for k, v in sec.mean_delta.items()}, sec.sites)
    else:
        samples = sum(r.update.num_examples for r in sec.results if r.status == "ok" and r.update is not None)
        acc.add({k: (current[k].double() + sec.mean_delta[k]).float() for k in WEIGHT_SETS}, samples)
