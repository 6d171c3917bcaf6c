"""The Flower ClientApp: one site's federated pretraining round.

Site settings come from the node config: `site-config` (the site YAML) and `gradients` (the federation's
gradient file). In a simulation (`flwr run .`) nodes only have a `partition-id`: the site is then the
partition-id-th site YAML of the run config's `sites-dir` (the demo sites the ServerApp generates).
A refusal (checksum mismatch, bad site config) is an error reply whose reason says what is wrong.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.state import load_optimizer, save_optimizer
from client.training import (
    WEIGHT_SETS,
    RoundRefused,
    RoundSpec,
    SiteTrainer,
    load_site_data,
    resolve_site_config,
)
from sites.errors import InputError

log = logging.getLogger(__name__)
app = ClientApp()

REFUSED = 4001  # error code of a refused round (the reason names the problem)
FAILED = 4002  # the round raised (bad data, ...)


def _demo_dir(context: Context, conf: dict) -> Path:
    """The demo sites' folder: as resolved by the server (absolute), else from the run config."""
    if conf.get("demo-sites-dir"):
        return Path(str(conf["demo-sites-dir"]))
    run = context.run_config
    sites_dir = str(run.get("sites-dir", "")) or str(Path(str(run.get("out-dir", "runs/federated"))) / "sites")
    return Path(sites_dir).resolve()


def site_paths(context: Context, conf: dict) -> tuple[Path, Path]:
    """(site YAML, gradient file) of this node."""
    node = context.node_config
    if "site-config" in node:
        site = Path(str(node["site-config"]))
        if "gradients" in node:
            grads = Path(str(node["gradients"]))
        elif str(context.run_config.get("gradients", "")):
            grads = Path(str(context.run_config["gradients"]))
        else:
            raise RoundRefused(f"site '{site}': no gradient file; start the site with --gradients FILE "
                               "(the federation's gradient file, the same as the server's)")  # fmt: skip
        return site, grads
    if "partition-id" in node:  # simulation
        demo = _demo_dir(context, conf)
        yamls = sorted(demo.glob("*/*.yaml"))
        pid = int(node["partition-id"])
        if pid >= len(yamls):
            raise RoundRefused(f"simulation node {pid}: only {len(yamls)} site YAML(s) under '{demo}' "
                               "(set num-supernodes to the number of demo sites)")  # fmt: skip
        grads = str(context.run_config.get("gradients", "")) or str(demo / "gradients.npy")
        return yamls[pid], Path(grads)
    raise RoundRefused("node config has no 'site-config' (start the site with `brainjepa-client --site FILE`)")


def decode_sets(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)).float() for k in record.keys()}


def encode_reply(sets: dict[str, torch.Tensor], received: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """fp32 weights, or fp16 deltas relative to what this site received (the server adds them to its fp32 copy)."""
    if wire_dtype == "float16":
        return ArrayRecord({k: Array((sets[k] - received[k]).to(torch.float16).numpy()) for k in WEIGHT_SETS})
    return ArrayRecord({k: Array(sets[k].numpy()) for k in WEIGHT_SETS})


def run_round(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    conf = dict(msg.content["config"])
    spec = RoundSpec.from_config(conf)
    site_yaml, grad_file = site_paths(context, conf)
    site_cfg = resolve_site_config(site_yaml)
    trainer = SiteTrainer(spec, grad_file, site_cfg.device, site_cfg.perf)
    received = decode_sets(msg.content["arrays"])
    trainer.load_sets(received)
    rounds_done = load_optimizer(context.state, trainer.step_fn.optimizer, spec.model_checksum)
    data = load_site_data(site_cfg, spec.pretrain)
    metrics = trainer.train(data)
    sets = trainer.sets()
    save_optimizer(context.state, trainer.step_fn.optimizer, spec.model_checksum, rounds_done + 1)
    arrays = encode_reply(sets, received, spec.wire_dtype)
    _maybe_dump(context, site_cfg.site, spec, arrays, data.n_subjects)
    metrics.update({"num-examples": float(data.n_subjects), "round-wall-s": time.perf_counter() - t0,
                    "bytes-received": float(msg.content["arrays"].count_bytes()),
                    "bytes-sent": float(arrays.count_bytes()), "rounds-done": float(rounds_done + 1)})  # fmt: skip
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": site_cfg.site})})  # fmt: skip
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
    except RoundRefused as e:
        return Message(Error(code=REFUSED, reason=f"site refused the round: {e}"), reply_to=msg)
    except InputError as e:
        return Message(Error(code=FAILED, reason=f"site failed: {e}"), reply_to=msg)
