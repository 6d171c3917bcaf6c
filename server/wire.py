"""How the global model travels in a Flower message (server side).

Each weight set (encoder, predictor, target) is ONE flat 1-D array of the module's parameters in
`named_parameters()` order: three objects per message instead of ~400 (Flower moves every tensor as its
own object with its own HTTP request; per-object overhead dominated a round, docs/federation.md).
Downlink in fp32 or fp16; uplink fp32 weights, or, with fp16, fp16 *deltas* relative to what the site
received, added to the server's fp32 master copy (so the master never gets rounded to fp16).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from brainjepa.config import ModelConfig, to_dict

FP16_MAX = float(np.finfo(np.float16).max)


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """(P,) fp32 copy of a module's parameters in named_parameters() order."""
    return parameters_to_vector([p.detach() for p in module.parameters()]).float().clone()


def load_flat_parameters(module: nn.Module, vec: torch.Tensor) -> None:
    with torch.no_grad():
        vector_to_parameters(vec.to(next(module.parameters()).dtype), list(module.parameters()))


def model_checksum(cfg: ModelConfig, modules: dict[str, nn.Module]) -> str:
    """SHA-256 of the model config and every parameter's name, shape and dtype (the wire layout)."""
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    for set_name, module in modules.items():
        for name, p in module.named_parameters():
            h.update(f"{set_name}.{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


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
