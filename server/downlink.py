"""The int8 downlink (run config `wire-dtype = "int8"`): the global sets as an int8 delta against the
reference that in-sync sites already hold.

The coordinator keeps `reference`: exactly what a site that decoded the last round's message holds (both
ends decode bit for bit alike: round-to-nearest codes times fp32 scales, added in fp32). It keeps it in
the run folder (`server.reference_file`, `downlink-reference.f32`), not in memory: each round,
delta = global - reference is quantised (`brainjepa.federation.compression`) chunk by chunk as the
reference is read, and the new reference = reference + decoded delta, what every site of the round
trains from, is written to a temporary name next to it, renamed over it when the round's replies are in
(`commit`). Its checksum travels in the round record (`weights-checksum`), with the old one
(`wire-base`). A site that replied with weights last round gets the delta (~1/4 of fp32); any other (the
first round, a new or restarted site, one not sampled last round, every site after a coordinator
resume) gets the new reference in fp32, read from the file: the resync. A site whose copy does not
match `wire-base` refuses the round and gets the fp32 form the next round.

A resumed coordinator does not reuse the file: the sites keep their copy in Flower's `context.state`,
which belongs to a Flower run, and a resume is a new run, so no site holds it any more (a previous
process's file is removed at the start). A reference file that fails its checks (truncated, corrupted)
costs one round of fp32 to every site, never a wrong delta.

The downlink needs no error feedback of its own: each delta is taken against the reference, so what one
round's rounding left out is in the next round's delta; the global master stays fp32 and the sites'
deltas are added to it (`contract.decode_update`), never to the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from brainjepa.errors import DataError
from brainjepa.federation.contract import RoundSpec
from server.reference_file import reference_record, step_reference, write_reference

log = logging.getLogger(__name__)

REFERENCE_FILE = "downlink-reference.f32"


@dataclass
class DownlinkRound:
    """What one round sends: the new reference (in the file `path`: the resync form), the int8 delta (None
    without a reference; dropped once its record is made), and which nodes get the delta."""

    path: Path
    delta: dict[str, torch.Tensor] | None  # {set: (P,) int8, set.scale: (ceil(P / block),) fp32}
    checksum: str
    holders: frozenset[int]

    def in_sync(self, node_id: int) -> bool:
        return self.delta is not None and node_id in self.holders

    def records(self, nodes: Iterable[int]) -> dict[int, ArrayRecord]:
        """Each node's weights record, shared: the delta's to nodes in sync, the fp32 reference's (read from
        the file) to the others; each made only when a node needs it. The int8 codes are dropped here:
        from now on the record holds their bytes."""
        nodes = list(nodes)
        delta, full = None, None
        if any(self.in_sync(n) for n in nodes):
            delta = ArrayRecord(self.delta, keep_input=False)  # type: ignore[arg-type]  (each set freed as converted)
        if not all(self.in_sync(n) for n in nodes):
            full = reference_record(self.path, self.checksum)
        out = {n: delta if self.in_sync(n) else full for n in nodes}
        self.delta = None
        return out  # type: ignore[return-value]


class Downlink:
    """The coordinator's record of what in-sync sites hold: the reference file in `folder`, its checksum,
    and which nodes hold it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / REFERENCE_FILE
        self.pending = folder / f".{REFERENCE_FILE}.pending"
        self.checksum = ""  # of the committed reference ("": none, every site gets the fp32 form)
        self.holders: frozenset[int] = frozenset()
        for stale in (self.path, self.pending):  # a previous process's: its sites are in another Flower run
            if stale.exists():
                log.info("int8 downlink: removing %s (a resumed run resyncs every site)", stale)
                stale.unlink()

    def prepare(self, sets: Mapping[str, torch.Tensor], spec: RoundSpec) -> tuple[RoundSpec, DownlinkRound]:
        """The round's payloads for the global `sets` ({set: (P,) fp32}), and `spec` with their checksums."""
        base, holders = self.checksum, self.holders
        # the old reference is not needed again: the next round's base is this one (after `commit`), and a
        # round that fails before it resyncs every site
        self.checksum, self.holders = "", frozenset()
        delta = None
        if base:
            try:
                delta, checksum = step_reference(self.path, base, sets, self.pending)
            except DataError as e:
                log.warning("int8 downlink: %s; every site of this round gets the fp32 form", e)
                base = ""
        if delta is None:
            checksum = write_reference(self.pending, sets)
        self.path.unlink(missing_ok=True)
        down = DownlinkRound(self.pending, delta, checksum, holders if delta is not None else frozenset())
        return dataclasses.replace(spec, weights_checksum=down.checksum, wire_base=base), down

    def commit(self, down: DownlinkRound, replied: Iterable[int]) -> None:
        """After the round's exchange: its reference is what the `replied` nodes (a decoded reply with
        weights) now hold."""
        os.replace(down.path, self.path)
        self.checksum, self.holders = down.checksum, frozenset(replied)
        log.info("int8 downlink: %d site(s) in sync for the next round's delta", len(self.holders))

    def close(self) -> None:
        """The run is over: no round will read the reference again."""
        self.checksum, self.holders = "", frozenset()
        for path in (self.path, self.pending):
            path.unlink(missing_ok=True)
