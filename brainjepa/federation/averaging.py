"""Sample-weighted averaging of the sites' flat weight vectors (FedAvg's mean), one site at a time.

Used by the coordinator (`server.pretraining`) and by the in-process federation of the downstream harness
(`brainjepa.downstream.fit`), so both average the same way.
"""

from __future__ import annotations

import torch


class RunningMean:
    """Sample-weighted mean accumulated one site at a time (a round holds one update, not all of them).

    Sums n_i * w_i in float64 and divides by sum(n) at the end: with one site the result is w exactly
    (n * w is exact in float64 for n < 2**29), with several it is the mean rounded once to fp32.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0

    def add(self, sets: dict[str, torch.Tensor], n: int) -> None:
        """Add one site's flat vectors, weighted by its sample count `n`."""
        for name, vec in sets.items():
            acc = self.sums.get(name)
            if acc is None:
                self.sums[name] = vec.double() * n
            else:
                acc.add_(vec.double(), alpha=n)
        self.total += n

    def result(self) -> dict[str, torch.Tensor]:
        if self.total <= 0:
            raise ValueError("no updates to average")
        return {name: (acc / self.total).float() for name, acc in self.sums.items()}
