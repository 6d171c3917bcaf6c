"""Self-describing checkpoints written atomically (temporary file, fsync, rename)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sites.errors import DataError

FORMAT = "brainjepa-checkpoint/1"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to `path` so that a crash at any moment leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    done = False
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
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
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"checkpoint '{path}': not a brainjepa checkpoint (expected format '{FORMAT}')")
    return ckpt


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON, YAML) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
