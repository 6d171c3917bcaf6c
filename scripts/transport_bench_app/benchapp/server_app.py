"""ServerApp of the transport benchmark: one weight set out to every SuperNode and back, timed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from benchapp.shapes import random_weights
from brainjepa.federation.compression import decode_deltas, encode_deltas

log = logging.getLogger(__name__)
app = ServerApp()


def wait_for_nodes(grid: Grid, n: int, timeout_s: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n]
        time.sleep(0.5)
    raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {n} SuperNodes connected")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    wire = str(cfg["wire-dtype"])
    nodes = wait_for_nodes(grid, int(cfg["min-nodes"]))
    weights = random_weights(str(cfg["model"]), int(cfg["seed"]))
    rounds = []
    for rnd in range(int(cfg["rounds"])):
        t0 = time.perf_counter()
        if wire == "int8":  # brainjepa's int8 wire: per set int8 codes + fp32 block scales (quantised here)
            flat = {
                p: torch.from_numpy(
                    np.concatenate([v.reshape(-1) for k, v in weights.items() if k.startswith(p + ".")])
                )
                for p in ("encoder", "predictor", "target")
            }
            record = ArrayRecord({k: Array(v.numpy()) for k, v in encode_deltas(flat).items()})
        elif str(cfg["packing"]) == "flat":
            # One flat 1-D array per weight set (encoder., predictor., target.): 3 objects, not ~380.
            record = ArrayRecord(
                {
                    p: Array(
                        np.concatenate([v.reshape(-1) for k, v in weights.items() if k.startswith(p + ".")]).astype(
                            wire, copy=False
                        )
                    )
                    for p in ("encoder", "predictor", "target")
                }
            )
        else:
            record = ArrayRecord({k: Array(v.astype(wire, copy=False)) for k, v in weights.items()})
        t_ser = time.perf_counter() - t0
        n_bytes = record.count_bytes()
        msgs = [
            Message(
                RecordDict({"arrays": record, "config": ConfigRecord({"round": rnd})}),
                dst_node_id=node,
                message_type="train",
            )
            for node in nodes
        ]
        # As the brainjepa ServerApp does: push, then pull replies one at a time every 0.5 s, verify,
        # keep only the metrics (one reply's weights in memory at a time).
        t1, t1_epoch = time.perf_counter(), time.time()
        pending = set(grid.push_messages(msgs))
        ok, t_de, client = 0, 0.0, []
        first = next(iter(weights.values()))
        while pending:
            for mid in list(pending):
                for reply in grid.pull_messages([mid]):
                    pending.discard(reply.metadata.reply_to_message_id)
                    if reply.has_error():
                        raise RuntimeError(f"reply error: {reply.error}")
                    t2 = time.perf_counter()
                    if wire == "int8":  # decoded as the coordinator does; the site added 1 to every value
                        sizes = {k: v.numel() for k, v in flat.items()}
                        got = decode_deltas(reply.content["arrays"].to_torch_state_dict(), sizes)["encoder"]
                        want = flat["encoder"] + 1
                        ok += int(torch.allclose(got, want, atol=float(want.abs().max()) / 127))
                        del got
                        t_de += time.perf_counter() - t2
                        client.append(dict(reply.content["metrics"]))
                        continue
                    arrays = reply.content["arrays"].to_numpy_ndarrays()
                    got = arrays[0].reshape(-1)[: first.size].astype(np.float32)
                    ok += int(np.allclose(got, first.reshape(-1).astype(wire).astype(np.float32) + 1, atol=1e-2))
                    t_de += time.perf_counter() - t2
                    client.append(dict(reply.content["metrics"]))
                    del arrays, reply
            if pending:
                time.sleep(0.5)
        t_rt = time.perf_counter() - t1
        rounds.append(
            {
                "round": rnd,
                "serialize_s": t_ser,
                "roundtrip_s": t_rt,
                "t0_epoch": t1_epoch,
                "t1_epoch": time.time(),
                "deserialize_s": t_de,
                "bytes_per_site": n_bytes,
                "sites": len(client),
                "verified": ok,
                "client": client,
            }
        )
        log.info("round %d: %.1f MB per site, round trip %.1f s", rnd, n_bytes / 1e6, t_rt)
    out = str(cfg["result-path"])
    if out:
        Path(out).write_text(json.dumps(rounds, indent=1))
