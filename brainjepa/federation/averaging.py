"""Sample-weighted averaging of the sites' flat weight vectors (FedAvg's mean), one site at a time.

Used by the coordinator (`server.pretraining`, `server.downstream`) and by the in-process federation of
the downstream harness (`brainjepa.downstream.fit`), so all average the same way.

The accumulator is the running mean itself, in fp32 (4 bytes a parameter: for ViT-B's 181 M parameters
of encoder + predictor + target 0.73 GB, where a float64 sum of n_i * w_i took 1.45 GB). After sites
1..k with sample counts n_1..n_k (N_k = n_1 + ... + n_k) it holds

    m_1 = w_1 (a copy: bit for bit)
    m_k = fp32((N_{k-1} * m_{k-1} + n_k * w_k) / N_k), the bracket in float64, one chunk at a time

so one site gives its weights back exactly and two sites give exactly the float64 mean rounded once to
fp32 (N_1 * m_1 = n_1 * w_1 and n_2 * w_2 are exact in float64 for counts < 2**29: the same bits as
summing both in float64, in either order). From the third site on each add rounds once more to fp32.
The rounding of add k (<= u |m_k| <= u max_i |w_i|, u = 2**-24 the unit roundoff: u |x| is between
half an ulp and one ulp of x) reaches the final mean scaled by N_k / N, so per coordinate
(`error_bound`)

    |m_K - mean| <= u x (N_2 + ... + N_K) / N x max_i |w_i|   (+ the float64 steps, ~2**-52 each)

against the exact mean: u |mean|-ish for two sites (the rounding any fp32 result has), at most
(K - 1) u max_i |w_i| (K - 1 ulps of the largest weight) for K sites. Measured on random sets of 3-8 sites
(tests/test_fed_units.py) the error stays within a fraction of that bound. Unlike a float64 sum, three
or more sites can give a result that depends on their order of arrival in the last bit.

A reply may come as plain tensors or as lazily decoded sets (`brainjepa.federation.reply_sets`): `add`
takes each set CHUNK values at a time (`reply_sets.chunks`), so a whole decoded reply is never held.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from brainjepa.federation.reply_sets import chunks

FP32_UNIT = 2.0**-24  # unit roundoff of fp32 (half an ulp relative)
FLOAT64_SLACK = 4 * 2.0**-53  # the float64 bracket's own roundings, relative


def error_bound(counts: list[int], max_abs: torch.Tensor) -> torch.Tensor:
    """Per-coordinate bound on |RunningMean - exact weighted mean| after sites with sample `counts` in that
    order, for weights whose largest magnitude over the sites is `max_abs` ((P,) or a scalar)."""
    total = sum(counts)
    partial, scale = 0, 0.0
    for k, n in enumerate(counts):
        partial += n
        if k >= 1:  # add 1 is a copy; each later one rounds to fp32 once
            scale += partial / total
    return (scale * FP32_UNIT + len(counts) * FLOAT64_SLACK) * max_abs


class RunningMean:
    """Sample-weighted mean accumulated one site at a time in fp32 (module docstring: exact for one
    and two sites, within `error_bound` for more)."""

    def __init__(self) -> None:
        self.mean: dict[str, torch.Tensor] = {}  # name -> (P_name,) float32
        self.total = 0

    def add(self, sets: Mapping[str, torch.Tensor], n: int) -> None:
        """Add one site's flat vectors, weighted by its sample count `n` (> 0). `sets` may be a lazily
        decoded reply: each set is read one chunk at a time."""
        if n <= 0:
            raise ValueError(f"sample count must be positive, got {n}")
        if self.total and set(sets) != set(self.mean):
            raise ValueError(f"weight sets {sorted(sets)} differ from the earlier sites' {sorted(self.mean)}")
        for name, acc in self.mean.items():
            if acc.numel() != _numel(sets, name):
                raise ValueError(f"weight set '{name}': {_numel(sets, name)} values, the mean has {acc.numel()}")
        before, self.total = self.total, self.total + n
        for name in sets:
            if not before:  # the first site: a copy
                acc = self.mean[name] = torch.empty(_numel(sets, name), dtype=torch.float32)
                for lo, chunk in chunks(sets, name):  # (m,) fp32
                    acc[lo : lo + chunk.numel()].copy_(chunk)
                continue
            for lo, chunk in chunks(sets, name):
                part = self.mean[name][lo : lo + chunk.numel()]  # (m,) view of the mean
                mixed = part.double().mul_(before).add_(chunk.double(), alpha=n).div_(self.total)  # (m,) float64
                part.copy_(mixed)

    def result(self) -> dict[str, torch.Tensor]:
        """The mean (the accumulator's own tensors: no copy; do not add to it afterwards)."""
        if self.total <= 0:
            raise ValueError("no updates to average")
        return dict(self.mean)


def _numel(sets: Mapping[str, torch.Tensor], name: str) -> int:
    numel = getattr(sets, "numel", None)
    return int(numel(name)) if callable(numel) else int(sets[name].numel())
