"""The Flower ClientApp: one site's federated pretraining round.

Site settings come from the node config: `site-config` (the site YAML) and `gradients` (the federation's
gradient file). In a simulation (`flwr run .`) nodes only have a `partition-id`: the site is then the
partition-id-th site YAML (sorted) under the run config's `sites-dir`. The message format is the round
contract (`brainjepa.federation.contract`); this module only converts between Flower records and it.
A refusal (contract or checksum mismatch, bad site config) is an error reply whose reason says what is wrong.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from brainjepa.federation.contract import (
    ARRAYS,
    CONFIG,
    METRICS,
    SITE,
    ContractError,
    ErrorCode,
    Metric,
    RoundSpec,
    decode_global,
    encode_update,
)
from client.state import load_optimizer, save_optimizer
from client.training import RoundRefused, SiteTrainer, load_site_data, resolve_site
from sites.errors import InputError

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
            raise RoundRefused(f"site '{site}': no gradient file; start the site with --gradients FILE "
                               "(the federation's gradient file, the same as the server's)")  # fmt: skip
        return site, Path(grads)
    if "partition-id" in node:  # simulation: one site YAML per simulated node
        sites_dir = str(run.get("sites-dir", ""))
        if not sites_dir or not run_gradients:
            raise RoundRefused("simulation node: the run config needs 'sites-dir' (a folder of site folders) and "
                               "'gradients' (`brainjepa-server simulate` prepares both)")  # fmt: skip
        yamls = sorted(Path(sites_dir).glob("*/*.yaml"))
        pid = int(node["partition-id"])
        if pid >= len(yamls):
            raise RoundRefused(f"simulation node {pid}: only {len(yamls)} site YAML(s) under '{sites_dir}' "
                               "(set num-supernodes to the number of sites)")  # fmt: skip
        return yamls[pid], Path(run_gradients)
    raise RoundRefused("node config has no 'site-config' (start the site with `brainjepa-client --site FILE`)")


def run_round(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    spec = RoundSpec.from_record(msg.content[CONFIG])
    site_yaml, grad_file = site_paths(context)
    site, runtime = resolve_site(site_yaml)
    trainer = SiteTrainer(spec, grad_file, runtime)
    received = decode_global(msg.content[ARRAYS].to_torch_state_dict())
    trainer.load_sets(received)
    rounds_done = load_optimizer(context.state, trainer.step_fn.optimizer, spec.model_checksum)
    data = load_site_data(site, spec.task_config)
    metrics = trainer.train(data)
    save_optimizer(context.state, trainer.step_fn.optimizer, spec.model_checksum, rounds_done + 1)
    arrays = ArrayRecord(encode_update(trainer.sets(), received, spec.wire_dtype))
    _maybe_dump(context, site.site, spec, arrays, data.n_subjects)
    metrics.update({Metric.NUM_EXAMPLES: float(data.n_subjects), Metric.ROUND_WALL_S: time.perf_counter() - t0,
                    Metric.BYTES_RECEIVED: float(msg.content[ARRAYS].count_bytes()),
                    Metric.BYTES_SENT: float(arrays.count_bytes()), Metric.ROUNDS_DONE: float(rounds_done + 1)})  # fmt: skip
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": site.site})})
    return Message(content, reply_to=msg)


def _maybe_dump(context: Context, site: str, spec: RoundSpec, arrays: ArrayRecord, n: int) -> None:
    """Node config `dump-updates-dir`: keep exactly what this site sends (integration tests, audits)."""
    out = str(context.node_config.get("dump-updates-dir", ""))
    if out:
        path = Path(out) / f"round-{spec.round + 1:03d}" / f"{site}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, num_examples=n, **{k: arrays[k].numpy() for k in arrays.keys()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return run_round(msg, context)
    except (RoundRefused, ContractError) as e:
        return Message(Error(code=ErrorCode.REFUSED, reason=f"site refused the round: {e}"), reply_to=msg)
    except InputError as e:
        return Message(Error(code=ErrorCode.FAILED, reason=f"site failed: {e}"), reply_to=msg)
