"""The Flower ClientApp: one site's round of federated pretraining, fine-tuning, probing or evaluation.

Site settings come from the node config: `site-config` (the site YAML) and `gradients` (the federation's
gradient file). In a simulation (`flwr run .`) nodes only have a `partition-id`: the site is then the
partition-id-th site YAML (sorted) under the run config's `sites-dir`. The message format is the round
contract (`brainjepa.federation.contract`); this module only converts between Flower records and it,
and hands the round to its task's site work: `client.training` (pretrain) or `client.downstream`
(finetune, probe, evaluate, label-stats; `evaluate` / `label-stats` come as Flower "evaluate" messages);
`scaling-stats` (also an "evaluate" message) sends back the site's scaling sketch (`site_sketch`).
A refusal (contract or checksum mismatch, bad site config) is an error reply whose reason says what is wrong.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from brainjepa.config import SiteRuntime
from brainjepa.distributed import DistributedError
from brainjepa.errors import InputError
from brainjepa.federation.contract import (
    ARRAYS,
    CONFIG,
    METRICS,
    SCALING,
    SITE,
    ContractError,
    ErrorCode,
    Metric,
    RoundSpec,
    scaling_from_arrays,
)
from brainjepa.privacy.budget import BudgetExhausted
from client.redact import scrub
from client.secagg import is_secure, secure_train
from client.site_status import record_round
from client.state import snapshot, store
from client.training import RoundRefused, SiteRound, resolve_site, site_sketch
from client.wire import receive, send
from sites.config import SiteConfig
from sites.scaling import RobustScaling

log = logging.getLogger(__name__)
app = ClientApp()


def site_paths(context: Context) -> tuple[Path, Path]:
    """(site YAML, gradient file) of this node."""
    node, run = context.node_config, context.run_config
    run_gradients = str(run.get("gradients", ""))
    if "site-config" in node:
        site = Path(str(node["site-config"]))
        grads = str(node.get("gradients", "")) or run_gradients
        if not grads:
            raise RoundRefused(
                f"site '{site}': no gradient file; start the site with --gradients FILE "
                "(the federation's gradient file, the same as the server's)"
            )
        return site, Path(grads)
    if "partition-id" in node:  # simulation: one site YAML per simulated node
        sites_dir = str(run.get("sites-dir", ""))
        if not sites_dir or not run_gradients:
            raise RoundRefused(
                "simulation node: the run config needs 'sites-dir' (a folder of site folders) and "
                "'gradients' (`brainjepa-server simulate` prepares both)"
            )
        yamls = sorted(Path(sites_dir).glob("*/*.yaml"))
        pid = int(node["partition-id"])
        if pid >= len(yamls):
            raise RoundRefused(
                f"simulation node {pid}: only {len(yamls)} site YAML(s) under '{sites_dir}' "
                "(set num-supernodes to the number of sites)"
            )
        return yamls[pid], Path(run_gradients)
    raise RoundRefused("node config has no 'site-config' (start the site with `brainjepa-client --site FILE`)")


def run_round(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    spec = RoundSpec.from_record(msg.content[CONFIG])
    site_yaml, grad_file = site_paths(context)
    site, runtime = resolve_site(site_yaml)
    received = receive(spec, msg.content[ARRAYS].to_torch_state_dict(), context.state)  # int8: vs its reference
    if spec.task == "scaling-stats":  # statistics, not weights: float64 as computed, no wire encoding
        sets, metrics = site_sketch(site, spec.task_config)
        arrays = ArrayRecord(sets)
    else:
        if spec.task == "pretrain":
            scaling = federation_scaling(spec, msg.content)
            sets, metrics = pretrain_round(spec, site, runtime, grad_file, received, context.state, scaling)
        else:
            from client.downstream import DownstreamRound, site_work  # here: pretraining never imports sklearn

            sets, metrics = site_work(DownstreamRound(spec, site, runtime, grad_file, received))
        arrays = ArrayRecord(send(spec, sets, received, context.state))  # int8: with error feedback
    metrics.update(
        {
            Metric.ROUND_WALL_S: time.perf_counter() - t0,
            Metric.BYTES_RECEIVED: float(msg.content[ARRAYS].count_bytes()),
            Metric.BYTES_SENT: float(arrays.count_bytes()),
        }
    )
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": site.site})})
    _maybe_dump(context, site.site, spec, content)
    record_round(site, spec, metrics)
    return Message(content, reply_to=msg)


def federation_scaling(spec: RoundSpec, content: RecordDict) -> RobustScaling | None:
    """The federation-wide median / IQR the round carries (checked against its checksum), or None: the
    site fits its own."""
    if not spec.scaling_checksum:
        return None
    if SCALING not in content.array_records:
        raise ContractError(f"round record: scaling-checksum {spec.scaling_checksum} but no '{SCALING}' record")
    return scaling_from_arrays(content[SCALING].to_torch_state_dict(), spec.scaling_checksum)


def pretrain_round(
    spec: RoundSpec,
    site: SiteConfig,
    runtime: SiteRuntime,
    grad_file: Path,
    received: dict[str, torch.Tensor],
    state: RecordDict,
    scaling: RobustScaling | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """K JEPA steps from the received sets, AdamW moments carried in the run's `context.state`; the data
    scaled with the federation's `scaling`, or the site's own statistics (None). Over the site's
    `distributed.devices` processes when it has several (`client.training.SiteRound`)."""
    sets, metrics, optimizer = SiteRound(spec, site, runtime, grad_file, received, snapshot(state), scaling).run()
    store(state, optimizer)
    return sets, metrics


def _maybe_dump(context: Context, site: str, spec: RoundSpec, content: RecordDict) -> None:
    """Node config `dump-updates-dir`: keep exactly what this site sends (integration tests, audits):
    `[<task>[-<split>]/]round-NNN/<site>.npz` (the weight sets, num_examples) and `.json` (every record
    of the reply with its keys, and the metric values)."""
    out = str(context.node_config.get("dump-updates-dir", ""))
    if not out:
        return
    folder = Path(out) if spec.task == "pretrain" else Path(out) / "-".join(filter(None, (spec.task, spec.split)))
    path = folder / f"round-{spec.round + 1:03d}" / f"{site}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, metrics = content[ARRAYS], content[METRICS]
    np.savez(path, num_examples=int(metrics[Metric.NUM_EXAMPLES]), **{k: arrays[k].numpy() for k in arrays.keys()})
    layout = {
        "records": {name: sorted(record.keys()) for name, record in content.items()},
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    path.with_suffix(".json").write_text(json.dumps(layout, indent=1))


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure(msg):  # a SecAgg+ stage (run config secure-aggregation): Flower's secaggplus_mod around handle
        return secure_train(msg, context, handle)
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context)


def handle(msg: Message, context: Context) -> Message:
    """The round, or an error reply: REFUSED (contract, checksum, config) or FAILED (the site's data)."""
    try:
        return run_round(msg, context)
    except BudgetExhausted as e:
        return Message(Error(code=ErrorCode.BUDGET_EXHAUSTED, reason=f"site declined the round: {e}"), reply_to=msg)
    except (RoundRefused, ContractError) as e:
        return Message(Error(code=ErrorCode.REFUSED, reason=site_error("site refused the round", e)), reply_to=msg)
    except (InputError, DistributedError) as e:  # bad data; a process of a multi-device round died or hung
        return Message(Error(code=ErrorCode.FAILED, reason=site_error("site failed", e)), reply_to=msg)


def site_error(what: str, e: Exception) -> str:
    """The full message on this site's console (the SuperNode log); the reply's text with subject ids and
    paths masked (`client.redact.scrub`)."""
    log.error("%s: %s", what, e)
    return f"{what}: {scrub(str(e))}"
