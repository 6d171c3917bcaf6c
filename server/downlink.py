"""The int8 downlink (run config `wire-dtype = "int8"`): the global sets as an int8 delta against the
reference that in-sync sites already hold.

The coordinator keeps `reference`: exactly what a site that decoded the last round's message holds (both
ends decode bit for bit alike: round-to-nearest codes times fp32 scales, added in fp32). Each round,
delta = global - reference is quantised (`brainjepa.federation.compression`) and the new reference =
reference + decoded delta is what every site of the round trains from; its checksum travels in the round
record (`weights-checksum`), with the old one (`wire-base`). A site that replied with weights last round
gets the delta (~1/4 of fp32); any other (the first round, a new or restarted site, one not sampled last
round, every site after a coordinator resume) gets the new reference in fp32: the resync. A site whose
copy does not match `wire-base` refuses the round and gets the fp32 form the next round.

The downlink needs no error feedback of its own: each delta is taken against the reference, so what one
round's rounding left out is in the next round's delta; the global master stays fp32 and the sites'
deltas are added to it (`contract.decode_update`), never to the reference.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from brainjepa.federation.compression import (
    QUANT_BLOCK,
    SCALE_SUFFIX,
    dequantize_chunk,
    n_blocks,
    quantize,
    weights_checksum,
)
from brainjepa.federation.contract import RoundSpec
from brainjepa.federation.reply_sets import CHUNK

log = logging.getLogger(__name__)


@dataclass
class DownlinkRound:
    """What one round sends: the new reference in fp32 (the resync form), the int8 delta (None without a
    reference; dropped by `sent` once Flower's record holds its bytes), and which nodes get the delta."""

    full: dict[str, torch.Tensor]  # {set: (P,) fp32}
    delta: dict[str, torch.Tensor] | None  # {set: (P,) int8, set.scale: (ceil(P / block),) fp32}
    checksum: str
    holders: frozenset[int]

    def payload(self, node_id: int) -> dict[str, torch.Tensor]:
        return self.delta if self.delta is not None and node_id in self.holders else self.full

    def sent(self) -> None:
        """The int8 codes are in the round's message record: this copy is not needed again."""
        self.delta = None


def step_set(target: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 delta target - ref (codes (P,), scales (ceil(P / QUANT_BLOCK),)) and the new reference
    ref + decoded delta (P,) fp32, CHUNK values at a time (whole blocks: the same bits as quantising and
    decoding the whole vector, without temporaries of its size)."""
    n = ref.numel()
    codes = torch.empty(n, dtype=torch.int8)
    scales = torch.empty(n_blocks(n), dtype=torch.float32)
    new = torch.empty(n, dtype=torch.float32)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        c, sc = quantize(target[lo:hi] - ref[lo:hi])  # (m,) int8, (ceil(m / QUANT_BLOCK),) fp32
        codes[lo:hi] = c
        scales[lo // QUANT_BLOCK : lo // QUANT_BLOCK + sc.numel()] = sc
        new[lo:hi] = dequantize_chunk(c, sc, 0, hi - lo).add_(ref[lo:hi])
    return codes, scales, new


class Downlink:
    """The coordinator's copy of what in-sync sites hold, and which nodes hold it (not checkpointed: a
    resumed coordinator resyncs every site in its first round)."""

    def __init__(self) -> None:
        self.reference: dict[str, torch.Tensor] | None = None
        self.checksum = ""
        self.holders: frozenset[int] = frozenset()

    def prepare(self, sets: Mapping[str, torch.Tensor], spec: RoundSpec) -> tuple[RoundSpec, DownlinkRound]:
        """The round's payloads for the global `sets`, and `spec` with their checksums."""
        ref, self.reference = self.reference, None
        # the old reference is not needed again: the next round's base is this one (after `commit`), and a
        # round that fails before it sends resyncs every site
        if ref is None or set(ref) != set(sets):
            # the global sets themselves, no copy: the coordinator never changes them in place (each round's
            # step makes new tensors, `server.pretraining`)
            full, delta, base = {k: v.detach().float() for k, v in sets.items()}, None, ""
        else:  # one set at a time, each old set dropped once its successor is made: one set's worth extra
            full, delta, base = {}, {}, self.checksum
            for k in sets:
                old = ref.pop(k)
                codes, scales, full[k] = step_set(sets[k].detach().float(), old)
                delta[k], delta[k + SCALE_SUFFIX] = codes, scales
                del old
        down = DownlinkRound(full, delta, weights_checksum(full), self.holders)
        return dataclasses.replace(spec, weights_checksum=down.checksum, wire_base=base), down

    def commit(self, down: DownlinkRound, replied: Iterable[int]) -> None:
        """After the round's exchange: its reference is what the `replied` nodes (a decoded reply with
        weights) now hold."""
        self.reference, self.checksum, self.holders = down.full, down.checksum, frozenset(replied)
        log.info("int8 downlink: %d site(s) in sync for the next round's delta", len(self.holders))
