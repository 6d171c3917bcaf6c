"""Rank functions for the fault tests of `brainjepa.distributed` (tests/test_distributed.py): importable by
the spawned ranks, and light (no model code), so that each launch costs only the processes' start."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from brainjepa.distributed import RankGroup
from brainjepa.errors import DataError


def _note_pid(folder: str, group: RankGroup) -> None:
    Path(folder, f"pid-{group.rank}").write_text(str(os.getpid()))


def total(group: RankGroup, folder: str) -> float:
    """The sum of the ranks' numbers (1 + 2 + ...): a group that works."""
    _note_pid(folder, group)
    t = torch.tensor([float(group.rank + 1)])
    dist.all_reduce(t)
    return float(t)


def rank_one_dies(group: RankGroup, folder: str) -> None:
    """Rank 1 dies (a crash, no Python error) after the first collective; rank 0 waits in the second."""
    _note_pid(folder, group)
    t = torch.ones(1)
    dist.all_reduce(t)
    if group.rank == 1:
        os._exit(3)
    dist.all_reduce(t)


def rank_one_hangs(group: RankGroup, folder: str) -> None:
    """Rank 1 stops answering (stuck) after the first collective; rank 0 waits in the second."""
    _note_pid(folder, group)
    t = torch.ones(1)
    dist.all_reduce(t)
    if group.rank == 1:
        time.sleep(600)
    dist.all_reduce(t)


def rank_one_refuses(group: RankGroup, folder: str) -> None:
    """Rank 1 finds bad data (a known error: the launcher raises it as itself)."""
    _note_pid(folder, group)
    if group.rank == 1:
        raise DataError(f"file '{folder}/x.npy': 3 ROIs, expected 20")
    dist.all_reduce(torch.ones(1))
