"""ClientApp of the transport benchmark: returns every array + 1 (new content, same shapes and dtype)."""

from __future__ import annotations

import time

import torch  # noqa: F401  (as brainjepa's ClientApp: every wire dtype pays the same process start)
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from brainjepa.federation.compression import SCALE_SUFFIX, decode_deltas, encode_deltas

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    record = msg.content["arrays"]
    out = {}
    if any(k.endswith(SCALE_SUFFIX) for k in record.keys()):  # int8: decode, add 1, encode (as a site does)
        payload = record.to_torch_state_dict()
        sizes = {k: v.numel() for k, v in payload.items() if not k.endswith(SCALE_SUFFIX)}
        decoded = decode_deltas(payload, sizes)
        out = {k: Array(v.numpy()) for k, v in encode_deltas({k: v + 1 for k, v in decoded.items()}).items()}
    else:
        for key in list(record.keys()):
            arr = record[key].numpy()
            out[key] = Array(arr + arr.dtype.type(1))
    t1 = time.perf_counter()
    reply = ArrayRecord(out)
    t2 = time.perf_counter()
    return Message(
        RecordDict({"arrays": reply, "metrics": MetricRecord({"deserialize_s": t1 - t0, "serialize_s": t2 - t1})}),
        reply_to=msg,
    )
