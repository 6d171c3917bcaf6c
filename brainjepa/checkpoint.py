"""Self-describing checkpoints written atomically (temporary file, fsync, rename), owner-only (0600).

Checkpoints hold tensors and plain containers only, so that they load with `torch.load(weights_only=True)`
(no unpickling of arbitrary objects: the checkpoint is also the file released for fine-tuning). NumPy
arrays and scalars are stored as tensors under a marker and given back as NumPy on load.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainjepa.errors import DataError

FORMAT = "brainjepa-checkpoint/1"
NDARRAY = "__ndarray__"  # {NDARRAY: tensor}: a NumPy array stored as a tensor (weights_only-loadable)


def to_safe(obj: Any) -> Any:
    """`obj` with NumPy arrays / scalars replaced by tensors / Python scalars (recursively)."""
    if isinstance(obj, np.ndarray):
        return {NDARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_safe(v) for v in obj)
    return obj


def from_safe(obj: Any) -> Any:
    """The inverse of `to_safe`."""
    if isinstance(obj, dict):
        if set(obj) == {NDARRAY} and isinstance(obj[NDARRAY], torch.Tensor):
            return obj[NDARRAY].numpy()
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    return obj


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to `path` so that a crash at any moment leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    done = False
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            torch.save(to_safe(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(path: str | Path, **payload: Any) -> Path:
    """Write a checkpoint dict; `payload` holds config, gradient checksum, step and state dicts."""
    return atomic_save({"format": FORMAT, **payload}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = from_safe(torch.load(path, map_location=map_location, weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise DataError(
            f"checkpoint '{path}': cannot be read with torch.load(weights_only=True) (only tensors and "
            f"plain containers are accepted; a truncated file or one holding other objects is "
            f"refused): {str(e).splitlines()[0][:300]}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"checkpoint '{path}': not a brainjepa checkpoint (expected format '{FORMAT}')")
    return ckpt


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON, YAML) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
