"""The int8 downlink's reference file (`server/reference_file.py`): bit-exact round trips, the delta made
chunk by chunk from the file equal to the whole-vector one, Flower's own bytes for the resync record, and
every damaged or foreign file refused by name, without unpickling anything."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict

from brainjepa.errors import DataError
from brainjepa.federation.compression import QUANT_BLOCK, SCALE_SUFFIX, dequantize, quantize, weights_checksum
from brainjepa.federation.reply_sets import CHUNK
from client.wire import receive
from server.downlink import Downlink
from server.reference_file import read_layout, read_reference, reference_record, step_reference, write_reference
from tests.test_compression import _spec

SIZES = {"encoder": 2 * CHUNK + 3 * QUANT_BLOCK + 5, "predictor": 1000, "target": CHUNK}  # chunk edges, a short set


def _sets(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {k: torch.from_numpy((rng.standard_normal(n) * 0.02).astype(np.float32)) for k, n in SIZES.items()}
    out["predictor"][:4] = torch.tensor([-0.0, 1e-42, 3.4e38, -1.17e-38])  # signed zero, subnormal, extremes
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def test_round_trip_is_bit_exact_with_the_weights_checksum(tmp_path) -> None:
    sets = _sets(0)
    path = tmp_path / "ref.f32"
    checksum = write_reference(path, sets)
    assert checksum == weights_checksum(sets)
    back = read_reference(path, checksum)
    assert set(back) == set(SIZES) and all(torch.equal(_bits(back[k]), _bits(sets[k])) for k in SIZES)
    assert path.stat().st_mode & 0o777 == 0o600
    record = reference_record(path, checksum)  # the resync payload: np.save's bytes, read straight from the file
    assert all(record[k].data == Array(sets[k]).data for k in SIZES)


def test_step_from_the_file_equals_the_whole_vector_step(tmp_path) -> None:
    old, target = _sets(1), _sets(2)
    src, dst = tmp_path / "ref.f32", tmp_path / "next.f32"
    base = write_reference(src, old)
    delta, checksum = step_reference(src, base, target, dst)
    new = read_reference(dst, checksum)
    for k, n in SIZES.items():
        codes, scales = quantize(target[k] - old[k])  # the whole vector at once
        assert torch.equal(delta[k], codes) and torch.equal(delta[k + SCALE_SUFFIX], scales)
        assert torch.equal(_bits(new[k]), _bits(dequantize(codes, scales, n, k).add_(old[k])))
    assert checksum == weights_checksum(new)


def test_damaged_or_foreign_files_are_refused_by_name(tmp_path) -> None:
    sets = _sets(3)
    path = tmp_path / "ref.f32"
    checksum = write_reference(path, sets)
    good = path.read_bytes()
    _, entries = read_layout(path)
    dst = tmp_path / "next.f32"

    path.write_bytes(good[:-7])  # truncated
    for read in (lambda: read_layout(path), lambda: reference_record(path, checksum)):
        with pytest.raises(DataError, match=f"'{path}'.*truncated"):
            read()

    flipped = bytearray(good)
    flipped[entries[0].data + 4 * 12345] ^= 0x01  # one value's lowest bit
    path.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=f"'{path}'.*checksum"):
        reference_record(path, checksum)
    with pytest.raises(DataError, match=f"'{path}'.*corrupted"):
        step_reference(path, checksum, sets, dst)
    assert not dst.exists()  # the half-made next reference is removed

    path.write_bytes(good.replace(b'"numel": 1000', b'"numel": 1001'))  # the header edited
    with pytest.raises(DataError, match=f"'{path}', field 'sets'"):
        read_layout(path)
    path.write_bytes(good)
    with pytest.raises(DataError, match=f"'{path}', field 'checksum'"):
        step_reference(path, "f" * 64, sets, dst)  # not the round's base
    with pytest.raises(DataError, match=f"'{path}', field 'sets'"):
        step_reference(path, checksum, {"encoder": sets["encoder"]}, dst)  # another model's sets


class _Boom:
    """Unpickling this writes a marker file: proof that a reader unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_without_being_unpickled(tmp_path) -> None:
    path, marker = tmp_path / "ref.f32", tmp_path / "unpickled"
    path.write_bytes(pickle.dumps({"encoder": _Boom(str(marker))}))
    for read in (lambda: read_layout(path), lambda: reference_record(path, "0" * 63 + "1")):
        with pytest.raises(DataError, match=f"'{path}': not a downlink reference file"):
            read()
    assert not marker.exists()


def test_a_bad_reference_costs_a_resync_and_a_resume_starts_afresh(tmp_path, caplog) -> None:
    """A committed reference that fails its checks is not stepped from: every site gets the fp32 form
    (no base), which a site without any reference accepts; a new Downlink on the folder (a resumed
    coordinator) removes the old files."""
    down = Downlink(tmp_path)
    first, second = _sets(4), _sets(5)
    spec, r0 = down.prepare(first, _spec())
    down.commit(r0, [1])
    data = bytearray(down.path.read_bytes())
    data[-1] ^= 0x80  # the last value's sign
    down.path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="server.downlink"):
        spec, r1 = down.prepare(second, _spec(round=1))
    assert f"'{down.path}'" in caplog.text and "fp32 form" in caplog.text
    assert r1.delta is None and not spec.wire_base and not r1.in_sync(1)
    got = receive(spec, r1.records([1])[1].to_torch_state_dict(), RecordDict())
    assert all(torch.equal(got[k], second[k]) for k in SIZES)
    down.commit(r1, [1])
    assert down.path.exists()
    Downlink(tmp_path)  # the resumed coordinator: its sites hold no reference (a new Flower run)
    assert not list(tmp_path.iterdir())
