"""Benchmark ClientApp: the site's secure path (`client.secagg.secure_train`, Flower's secaggplus_mod)
around a stand-in for training: the trained sets are the received ones plus a delta drawn from the
site's seed (N(0, 1e-3)), so the server can recompute the exact weighted mean."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from brainjepa.federation.contract import ARRAYS, METRICS, SITE, Metric, decode_global, encode_update
from client.secagg import is_secure, secure_train

app = ClientApp()
DELTA_STD = 1e-3


def site_delta(site_id: int, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + site_id)
    return {k: torch.randn(v.shape, generator=g) * DELTA_STD for k, v in received.items()}


def site_weight(site_id: int) -> int:
    return 10 + 7 * site_id


def handle(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    site_id = int(context.node_config["site-id"])
    received = decode_global(msg.content[ARRAYS].to_torch_state_dict())
    delta = site_delta(site_id, received)
    trained = {k: received[k] + delta[k] for k in received}
    metrics = {Metric.NUM_EXAMPLES: float(site_weight(site_id)), "bench-site-s": time.perf_counter() - t0}
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(encode_update(trained, received, "float32")),
            METRICS: MetricRecord(metrics),
            SITE: ConfigRecord({"name": f"site{site_id}"}),
        }
    )
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure(msg):
        return secure_train(msg, context, handle)
    return handle(msg, context)
