"""Robust aggregation: coordinate-wise median / trimmed mean of the sites' flat weight vectors.

Uses Flower's own FedMedian / FedTrimmedAvg arithmetic (`flwr.server.strategy.aggregate`) on the flat
vectors. Unlike the running mean (one reply held at a time), both need every accepted reply of a round
at once: sites x parameters x 4 bytes (fp32) plus one stacked copy while computing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from brainjepa.federation.reply_sets import ReplySets
from server.config import ROBUST_METHODS


class RobustAggregate:
    """Collects accepted replies; `result()` is their coordinate-wise median or trimmed mean per set
    (unweighted: a site's claimed sample count cannot pull the result)."""

    def __init__(self, method: str, trim_fraction: float) -> None:
        if method not in ROBUST_METHODS:
            raise ValueError(f"robust aggregation: expected one of {ROBUST_METHODS}, got {method!r}")
        self.method, self.trim_fraction = method, trim_fraction
        self.replies: list[dict[str, torch.Tensor]] = []

    @property
    def count(self) -> int:
        return len(self.replies)

    def add(self, sets: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        fresh = isinstance(sets, ReplySets)  # decoded on reading: already a copy of its own
        self.replies.append({k: v if fresh else v.detach().to(torch.float32).clone() for k, v in sets.items()})

    def result(self) -> dict[str, torch.Tensor]:
        if not self.replies:
            raise ValueError("robust aggregation of zero replies")
        names = sorted(self.replies[0])
        results = [([r[n].numpy() for n in names], 1) for r in self.replies]
        if self.method == "median":
            out = aggregate_median(results)
        else:
            out = aggregate_trimmed_avg(results, self.trim_fraction)
        self.replies = []
        return {n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in zip(names, out, strict=True)}
