"""The three weight sets as flat vectors, and the checksum of their layout.

A federated round moves each of encoder, predictor and EMA target as ONE flat fp32 vector (one object
for Flower's transport instead of one per tensor); both ends know the layout from the model config,
and `model_checksum` proves they agree on it.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from brainjepa.config import ModelConfig, to_dict

WEIGHT_SETS = ("encoder", "predictor", "target")


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """(P,) fp32 copy of a module's parameters in named_parameters() order (the wire layout): the
    concatenation is the copy (no second one)."""
    return parameters_to_vector([p.detach() for p in module.parameters()]).float()


def load_flat_parameters(module: nn.Module, vec: torch.Tensor) -> None:
    """Point the module's parameters at a flat (P,) vector (same order). No copy when `vec` has their
    dtype: the parameters become views of `vec` (torch's vector_to_parameters), so training then writes
    into `vec` and the parameters take `vec`'s device; pass a copy that nothing else reads."""
    with torch.no_grad():
        vector_to_parameters(vec.to(next(module.parameters()).dtype), list(module.parameters()))


def model_checksum(cfg: ModelConfig, modules: dict[str, nn.Module]) -> str:
    """SHA-256 of the model config and every parameter's name, shape and dtype (the wire layout)."""
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    for set_name, module in modules.items():
        for name, p in module.named_parameters():
            h.update(f"{set_name}.{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()
