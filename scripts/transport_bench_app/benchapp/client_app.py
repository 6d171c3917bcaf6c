"""ClientApp of the transport benchmark: returns every array + 1 (new content, same shapes and dtype)."""

from __future__ import annotations

import time

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    record = msg.content["arrays"]
    out = {}
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
