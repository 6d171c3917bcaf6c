"""How the global model travels in a Flower message (server side).

Each weight set (encoder, predictor, target) is ONE flat 1-D array of the module's parameters in
`named_parameters()` order: three objects per message instead of ~400 (Flower moves every tensor as its
own object with its own HTTP request; per-object overhead dominated a round, docs/federation.md).
Downlink in fp32 or fp16; uplink fp32 weights, or, with fp16, fp16 *deltas* relative to what the site
received, added to the server's fp32 master copy (so the master never gets rounded to fp16).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from brainjepa.weights import flat_parameters, load_flat_parameters, model_checksum  # noqa: F401 (re-exported)

FP16_MAX = float(np.finfo(np.float16).max)


def encode_sets(sets: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """Flat fp32 vectors -> one ArrayRecord (fp32 or fp16 on the wire)."""
    out = {}
    for name, vec in sets.items():
        if wire_dtype == "float16":
            peak = float(vec.abs().max())
            if peak > FP16_MAX:
                raise ValueError(f"weight set '{name}' has |w| up to {peak:.3g}, beyond fp16 range: use wire-dtype float32")
            out[name] = Array(vec.detach().to(torch.float16).numpy())
        else:
            out[name] = Array(vec.detach().float().numpy())
    return ArrayRecord(out)


def sent_as(vec: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """What the site decodes from `encode_sets` (fp32): the base its fp16 deltas are relative to."""
    return vec.to(torch.float16).float() if wire_dtype == "float16" else vec


def decode_reply(record: ArrayRecord, wire_dtype: str, master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A site's reply -> full fp32 weight vectors (fp16 deltas are added to the fp32 master)."""
    out = {}
    for name in record.keys():
        arr = torch.from_numpy(np.array(record[name].numpy(), copy=True))
        if wire_dtype == "float16" and name in master:
            if arr.dtype != torch.float16:
                raise ValueError(f"weight set '{name}' arrived as {arr.dtype}, expected float16 deltas")
            out[name] = master[name] + arr.float()
        else:
            out[name] = arr.float()
    return out
