"""What a site keeps between rounds, in Flower's persistent `context.state` (never in module globals).

Every round runs in a fresh `flwr-clientapp` process, so the AdamW moments, the optimizer's step counts
and the torch RNG state are packed into the context: the moments as two flat arrays (one object each on
the wire, like the weights), the rest in a config record. `pack` / `restore` hold them as plain values in between (a round run over
several processes brings them back from its rank 0).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

OPT_KEY, META_KEY = "site.optimizer", "site.meta"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the index order of `optimizer.state_dict()`."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def pack(optimizer: torch.optim.Optimizer, model_checksum: str, rounds_done: int) -> dict:
    """The optimizer's moments, step counts and the torch RNG as plain values (picklable: a round run over
    several processes, `brainjepa.distributed`, brings it back from its rank 0)."""
    sd = optimizer.state_dict()
    params = _ordered_params(optimizer)
    have = [i for i in range(len(params)) if i in sd["state"]]
    moments = {}
    for moment in MOMENTS:
        flat = [sd["state"][i][moment].reshape(-1) for i in have]
        moments[moment] = torch.cat(flat).float().cpu().numpy() if flat else np.zeros(0, np.float32)
    meta = {
        "model-checksum": model_checksum,
        "rounds-done": rounds_done,
        "param-index": have,
        "param-steps": [float(sd["state"][i]["step"]) for i in have],
        "param-groups": json.dumps([{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]),
        "torch-rng": torch.get_rng_state().numpy().tobytes(),
    }
    return {"moments": moments, "meta": meta}


def store(state: RecordDict, packed: dict) -> None:
    """Keep a `pack` in the run's context state."""
    state[OPT_KEY] = ArrayRecord({m: Array(packed["moments"][m]) for m in MOMENTS})
    state[META_KEY] = ConfigRecord(packed["meta"])


def snapshot(state: RecordDict) -> dict | None:
    """The `pack` the context state holds (None: a fresh run)."""
    if META_KEY not in state.config_records:
        return None
    meta = state[META_KEY]
    return {
        "moments": {m: np.array(state[OPT_KEY][m].numpy(), copy=True) for m in MOMENTS},
        "meta": {k: meta[k] for k in meta.keys()},
    }


def restore(packed: dict | None, optimizer: torch.optim.Optimizer, model_checksum: str) -> int:
    """Restore AdamW moments and the RNG from a `pack` (None: nothing); returns rounds done (0: fresh)."""
    if packed is None:
        return 0
    meta = packed["meta"]
    if str(meta["model-checksum"]) != model_checksum:
        return 0  # another model (should not happen within one run): start the moments afresh
    params = _ordered_params(optimizer)
    moments = {m: torch.from_numpy(np.array(packed["moments"][m], copy=True)) for m in MOMENTS}
    sd = optimizer.state_dict()
    offset = 0
    new_state = {}
    for i, step in zip(meta["param-index"], meta["param-steps"], strict=True):
        p = params[int(i)]
        n = p.numel()
        new_state[int(i)] = {
            "step": torch.tensor(float(step)),
            **{m: moments[m][offset : offset + n].view_as(p).clone().to(p.device) for m in MOMENTS},
        }
        offset += n
    groups = json.loads(str(meta["param-groups"]))
    for g, saved in zip(sd["param_groups"], groups, strict=True):
        g.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict({"state": new_state, "param_groups": sd["param_groups"]})
    torch.set_rng_state(torch.from_numpy(np.frombuffer(bytes(meta["torch-rng"]), dtype=np.uint8).copy()))
    return int(meta["rounds-done"])


def save_optimizer(state: RecordDict, optimizer: torch.optim.Optimizer, model_checksum: str, rounds_done: int) -> None:
    store(state, pack(optimizer, model_checksum, rounds_done))


def load_optimizer(state: RecordDict, optimizer: torch.optim.Optimizer, model_checksum: str) -> int:
    """Restore AdamW moments and the RNG if this run's context holds them; returns rounds done (0: fresh)."""
    return restore(snapshot(state), optimizer, model_checksum)
