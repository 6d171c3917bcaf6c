"""A site's reply as weight sets decoded on demand, one chunk at a time, and the reply's norms and distances.

`contract.decode_update` turns a reply into whole fp32 vectors: for ViT-B 0.73 GB per reply, on top of
the wire form it came in. The coordinator needs less: checks (finite values, lengths, norms and
distances to the global sets, `server.bounds`) and the running mean (`averaging.RunningMean`) all work
through a set CHUNK values at a time. `ReplySets` keeps only the reply's payload (int8 codes and scales,
fp16 or fp32 arrays) and the server's fp32 master it is decoded against, and decodes a chunk when asked
(`chunks`): a chunk holds the same bits as the same values of `decode_update`'s result. Indexing a set
(`sets[name]`) still gives the whole decoded set, for callers that need it (robust aggregation, saved
updates, downstream's head slice).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from brainjepa.federation.compression import QUANT_BLOCK, SCALE_SUFFIX, check_codes, dequantize_chunk
from brainjepa.federation.contract import STAT_ARRAYS as STAT_KEYS  # statistics, not weights

CHUNK = 128 * QUANT_BLOCK  # values decoded at a time: 1 MiB of fp32, whole quantisation blocks


class ReplySets(Mapping[str, torch.Tensor]):
    """A reply's sets {name: (P,) fp32}, decoded from `payload` when read. The payload is checked here as
    `decode_update` checks it (a ValueError naming the set: an undecodable reply); `master` must not
    change while this object is read."""

    def __init__(
        self, payload: Mapping[str, torch.Tensor], wire_dtype: str, master: Mapping[str, torch.Tensor]
    ) -> None:
        self.wire_dtype = wire_dtype
        self.master = master
        self.payload = dict(payload)
        self.int8 = wire_dtype == "int8" and bool(master)
        if self.int8:  # every set of `master`, as int8 codes + scales
            expected = {k for name in master for k in (name, name + SCALE_SUFFIX)}
            got = {k for k in self.payload if k not in STAT_KEYS}
            if got != expected:
                raise ValueError(f"int8 payload holds {sorted(got)}, expected {sorted(expected)}")
            for name, ref in master.items():
                check_codes(self.payload[name], self.payload[name + SCALE_SUFFIX], ref.numel(), name)
            self.names = [*master, *(k for k in self.payload if k in STAT_KEYS)]
        else:
            for name, vec in self.payload.items():
                if wire_dtype == "float16" and name in master and name not in STAT_KEYS:
                    if vec.dtype != torch.float16:
                        raise ValueError(f"weight set '{name}' arrived as {vec.dtype}, expected float16 deltas")
                    if vec.shape != master[name].shape:
                        raise ValueError(
                            f"weight set '{name}': {tuple(vec.shape)} deltas, expected {tuple(master[name].shape)}"
                        )
            self.names = list(self.payload)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:  # Mapping's default would decode the set to find out
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole set, decoded (a fresh tensor; statistics arrays in float64)."""
        if name not in self.names:
            raise KeyError(name)
        if name in STAT_KEYS:
            return self.payload[name].double().clone()
        if not self._decoded(name):
            return self.payload[name].float().clone()
        out = torch.empty(self.numel(name), dtype=torch.float32)
        for lo, chunk in self.chunks(name):
            out[lo : lo + chunk.numel()] = chunk
        return out

    def _decoded(self, name: str) -> bool:
        """Whether the set is a delta against the master (int8 / fp16), not fp32 weights as they came."""
        return name in self.master and (self.int8 or self.wire_dtype == "float16")

    def shape(self, name: str) -> tuple[int, ...]:
        return (self.master[name].numel(),) if self.int8 and name in self.master else tuple(self.payload[name].shape)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, (m,) fp32) pieces of the decoded set, `size` values each (read-only: a piece of an
        fp32 payload is a view of it)."""
        n = self.numel(name)
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            if self.int8 and name in self.master:
                codes, scales = self.payload[name], self.payload[name + SCALE_SUFFIX]
                yield lo, dequantize_chunk(codes, scales, lo, hi).add_(self.master[name][lo:hi])
            elif self._decoded(name):
                yield lo, self.master[name][lo:hi] + self.payload[name][lo:hi].float()
            else:
                yield lo, self.payload[name].reshape(-1)[lo:hi].float()


def chunks(sets: Mapping[str, torch.Tensor], name: str, size: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, (m,) fp32) pieces of set `name`: decoded on the fly from a `ReplySets`, sliced from a tensor."""
    if isinstance(sets, ReplySets):
        yield from sets.chunks(name, size)
        return
    vec = sets[name].reshape(-1)
    for lo in range(0, vec.numel(), size):
        yield lo, vec[lo : lo + size].float()


def shape_of(sets: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return sets.shape(name) if isinstance(sets, ReplySets) else tuple(sets[name].shape)


@dataclass(frozen=True)
class SetStats:
    """One pass over a set: how many values are not finite, its norm, its distance to a reference set
    (NaN without one, or when the lengths differ)."""

    nonfinite: int
    norm: float
    distance: float


def set_stats(sets: Mapping[str, torch.Tensor], name: str, ref: torch.Tensor | None = None) -> SetStats:
    """`SetStats` of set `name`, read one chunk at a time (norms summed in float64 over the chunks)."""
    ref = ref.reshape(-1) if ref is not None and ref.numel() == math.prod(shape_of(sets, name)) else None
    bad, sq, dsq = 0, 0.0, 0.0
    for lo, chunk in chunks(sets, name):  # (m,) fp32
        bad += int((~torch.isfinite(chunk)).sum())
        sq += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
        if ref is not None:
            dsq += float(torch.linalg.vector_norm(chunk - ref[lo : lo + chunk.numel()], dtype=torch.float64)) ** 2
    return SetStats(bad, math.sqrt(sq), math.sqrt(dsq) if ref is not None else math.nan)


def reply_stats(sets: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor] | None) -> dict[str, SetStats]:
    """`set_stats` of every weight set of a reply, against the `current` set of the same name."""
    current = current or {}
    return {name: set_stats(sets, name, current.get(name)) for name in sets if name not in STAT_KEYS}
