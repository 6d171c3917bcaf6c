"""The int8 downlink's reference on disk: the coordinator holds it in memory only a chunk at a time.

The reference (what in-sync sites hold, `server.downlink`) is read once per round, when the next round's
delta is made; for ViT-B it is 0.73 GB of fp32 that would otherwise stay in the coordinator's memory for
the whole round. It lives in the run folder instead, read and written CHUNK values at a time with plain
file reads and writes (no mmap: mapped pages count in the process's memory), and read back whole only as
the bytes of the fp32 resync message.

Layout (little-endian; nothing is unpickled):

    8 bytes   MAGIC
    8 bytes   n, the header's length (uint64)
    n bytes   JSON header, space-padded: {"format", "checksum", "sets": [{"name", "numel", "offset", "data"}]}
    per set, in name order, at its "offset": a .npy (version 1.0) header for a (numel,) '<f4' array, then
              the numel values at "data"

so a set's bytes from "offset" to its end are exactly the `Array` data Flower sends for that fp32 vector
(`np.save`'s bytes): the resync record is read straight from the file, one copy. "checksum" is
`compression.weights_checksum` of the sets (what the round record's `weights-checksum` says); every read
checks it, so a truncated, corrupted or foreign file is a DataError naming it, never a wrong reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from brainjepa.errors import DataError
from brainjepa.federation.compression import QUANT_BLOCK, SCALE_SUFFIX, dequantize_chunk, n_blocks, quantize
from brainjepa.federation.reply_sets import CHUNK

MAGIC = b"BJDLREF1"
FORMAT = "brainjepa-downlink-reference/1"
_LE_F32 = np.dtype("<f4")
_NO_CHECKSUM = "0" * 64  # the placeholder the header holds until the data is written: same length
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class SetEntry:
    name: str
    numel: int
    offset: int  # where its .npy bytes start
    data: int  # where its values start

    @property
    def end(self) -> int:
        return self.data + 4 * self.numel


def _npy_header(numel: int) -> bytes:
    """The .npy 1.0 header `np.save` writes for a (numel,) little-endian fp32 vector."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": _LE_F32.str, "fortran_order": False, "shape": (numel,)})
    return buf.getvalue()


def _header(entries: list[SetEntry], checksum: str, size: int) -> bytes:
    sets = [{"name": e.name, "numel": e.numel, "offset": e.offset, "data": e.data} for e in entries]
    text = json.dumps({"format": FORMAT, "checksum": checksum, "sets": sets}).encode()
    return MAGIC + size.to_bytes(8, "little") + text.ljust(size)


def _layout(sizes: Mapping[str, int]) -> tuple[list[SetEntry], int]:
    """The sets' places (name order) and the header's padded length."""
    draft = [SetEntry(name, int(sizes[name]), 0, 0) for name in sorted(sizes)]
    size = len(_header(draft, _NO_CHECKSUM, 0)) + 64 * len(draft) + 64  # room for the offsets' digits
    pos, entries = 16 + size, []
    for e in draft:
        data = pos + len(_npy_header(e.numel))
        entries.append(SetEntry(e.name, e.numel, pos, data))
        pos = data + 4 * e.numel
    return entries, size


class ReferenceWriter:
    """Writes a reference file set by set, chunk by chunk, and its checksum as it goes; `finish` puts the
    checksum in the header. Owner-only (0600); `path` is a temporary name the caller renames when the
    file is committed (`server.downlink`), removed here on `abort`."""

    def __init__(self, path: Path, sizes: Mapping[str, int]) -> None:
        self.path = path
        self.entries, self.size = _layout(sizes)
        self.sha = hashlib.sha256()
        self.file: BinaryIO = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        self.file.write(_header(self.entries, _NO_CHECKSUM, self.size))

    def begin(self, entry: SetEntry) -> None:
        self.sha.update(entry.name.encode())
        self.file.write(_npy_header(entry.numel))

    def write(self, chunk: torch.Tensor) -> None:
        """Values of the current set, in order: (m,) fp32."""
        arr = chunk.numpy().astype(_LE_F32, copy=False)
        self.sha.update(chunk.numpy())  # native bytes, as weights_checksum hashes them
        self.file.write(memoryview(arr).cast("B"))

    def finish(self) -> str:
        checksum = self.sha.hexdigest()
        self.file.seek(0)
        self.file.write(_header(self.entries, checksum, self.size))
        self.file.close()
        return checksum

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def write_reference(path: Path, sets: Mapping[str, torch.Tensor]) -> str:
    """Write `sets` ({name: (P,) fp32}) to `path`, CHUNK values at a time; their weights_checksum."""
    writer, done = ReferenceWriter(path, {k: v.numel() for k, v in sets.items()}), False
    try:
        for e in writer.entries:
            writer.begin(e)
            vec = sets[e.name].detach().reshape(-1)
            for lo in range(0, e.numel, CHUNK):
                writer.write(vec[lo : lo + CHUNK].float())  # (m,)
        done = True
    finally:
        if not done:
            writer.abort()
    return writer.finish()


def read_layout(path: Path) -> tuple[str, list[SetEntry]]:
    """The file's checksum and set entries; DataError naming the file and the field for anything that is
    not a complete reference file."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = int.from_bytes(head[8:16], "little") if len(head) == 16 else -1
            if head[:8] != MAGIC or not 0 < size <= _MAX_HEADER:
                raise DataError(f"file '{path}': not a downlink reference file (expected magic {MAGIC!r} and a header)")
            meta = json.loads(f.read(size))
            total = os.fstat(f.fileno()).st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"file '{path}': downlink reference unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"file '{path}', field 'format': expected '{FORMAT}', got {got!r}")
    checksum, sets = meta.get("checksum"), meta.get("sets")
    if not isinstance(checksum, str) or len(checksum) != 64 or checksum == _NO_CHECKSUM:
        raise DataError(f"file '{path}', field 'checksum': expected a SHA-256 (64 hex digits), got {checksum!r}")
    try:
        entries = [SetEntry(str(s["name"]), int(s["numel"]), int(s["offset"]), int(s["data"])) for s in sets]
    except (TypeError, KeyError, ValueError) as e:
        raise DataError(f"file '{path}', field 'sets': expected name / numel / offset / data entries: {e}") from e
    expected, _ = _layout({e.name: e.numel for e in entries})
    if entries != expected or not entries:
        raise DataError(f"file '{path}', field 'sets': expected the layout {expected}, got {entries}")
    if total != entries[-1].end:
        raise DataError(f"file '{path}': {total} bytes, expected {entries[-1].end} (truncated or appended to)")
    return checksum, entries


def _check_sets(path: Path, entries: list[SetEntry], sizes: Mapping[str, int]) -> None:
    got = {e.name: e.numel for e in entries}
    if got != dict(sizes):
        raise DataError(f"file '{path}', field 'sets': holds {got}, expected {dict(sizes)}")


def _read_into(f: BinaryIO, buf: np.ndarray, path: Path) -> torch.Tensor:
    """Fill `buf` ((m,) '<f4') from `f`; as (m,) native fp32."""
    got = f.readinto(memoryview(buf).cast("B"))
    if got != buf.nbytes:
        raise DataError(f"file '{path}': ends early (read {got} of {buf.nbytes} bytes of a chunk)")
    return torch.from_numpy(buf.astype(np.float32, copy=False))


def step_reference(
    src: Path, base: str, target: Mapping[str, torch.Tensor], dst: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """The int8 delta target - reference (read from `src`, whose checksum must be `base`) and the new
    reference = reference + decoded delta, written to `dst`: ({set: (P,) int8, set.scale: (ceil(P /
    QUANT_BLOCK),) fp32}, the new reference's checksum). CHUNK values at a time, whole quantisation blocks:
    the same bits as quantising and decoding whole vectors. DataError naming `src` when it is not the
    reference `base` (its header or its values)."""
    checksum, entries = read_layout(src)
    _check_sets(src, entries, {k: v.numel() for k, v in target.items()})
    if checksum != base:
        raise DataError(
            f"file '{src}', field 'checksum': expected {base[:16]}... (the round base), got {checksum[:16]}..."
        )
    writer, done = ReferenceWriter(dst, {e.name: e.numel for e in entries}), False
    old_sha, out, buf = hashlib.sha256(), {}, np.empty(CHUNK, _LE_F32)
    try:
        with open(src, "rb") as f:
            for e, w in zip(entries, writer.entries, strict=True):
                old_sha.update(e.name.encode())
                writer.begin(w)
                f.seek(e.data)
                vec = target[e.name].detach().reshape(-1)
                codes, scales = torch.empty(e.numel, dtype=torch.int8), torch.empty(n_blocks(e.numel))
                for lo in range(0, e.numel, CHUNK):
                    hi = min(e.numel, lo + CHUNK)
                    old = _read_into(f, buf[: hi - lo], src)  # (m,) fp32
                    old_sha.update(old.numpy())
                    c, sc = quantize(vec[lo:hi].float() - old)  # (m,) int8, (ceil(m / QUANT_BLOCK),) fp32
                    codes[lo:hi] = c
                    scales[lo // QUANT_BLOCK : lo // QUANT_BLOCK + sc.numel()] = sc
                    writer.write(dequantize_chunk(c, sc, 0, hi - lo).add_(old))
                out[e.name], out[e.name + SCALE_SUFFIX] = codes, scales
        if old_sha.hexdigest() != checksum:
            raise DataError(
                f"file '{src}': its values have checksum {old_sha.hexdigest()[:16]}..., its header says "
                f"{checksum[:16]}... (corrupted)"
            )
        done = True
    finally:
        if not done:
            writer.abort()
    return out, writer.finish()


def reference_record(path: Path, checksum: str) -> ArrayRecord:
    """The file's sets as Flower's fp32 record (the resync payload): each set's .npy bytes as read, checked
    against `checksum`."""
    file_checksum, entries = read_layout(path)
    if file_checksum != checksum:
        raise DataError(f"file '{path}', field 'checksum': expected {checksum[:16]}..., got {file_checksum[:16]}...")
    sha, arrays = hashlib.sha256(), {}
    with open(path, "rb") as f:
        for e in entries:
            f.seek(e.offset)
            data = f.read(e.end - e.offset)  # the .npy bytes: header and values
            if len(data) != e.end - e.offset:
                raise DataError(f"file '{path}': ends early in set '{e.name}'")
            values = np.frombuffer(data, _LE_F32, offset=e.data - e.offset).astype(np.float32, copy=False)
            sha.update(e.name.encode())
            sha.update(values)
            arrays[e.name] = Array(dtype="float32", shape=(e.numel,), stype="numpy.ndarray", data=data)
    if sha.hexdigest() != checksum:
        raise DataError(
            f"file '{path}': its values have checksum {sha.hexdigest()[:16]}..., expected {checksum[:16]}..."
        )
    return ArrayRecord(arrays)


def read_reference(path: Path, checksum: str) -> dict[str, torch.Tensor]:
    """The whole reference {set: (P,) fp32}, checked (for tests and inspection; the rounds read chunks)."""
    return {
        k: torch.from_numpy(a.numpy().astype(np.float32, copy=False))
        for k, a in reference_record(path, checksum).items()
    }
