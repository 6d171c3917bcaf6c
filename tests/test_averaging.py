"""The coordinator's fp32 running mean and its lazily decoded replies: exactness, the error bound, memory.

- one site's weights come back bit for bit (also through an int8 reply decoded chunk by chunk), two
  sites' mean is the float64 mean rounded once (in either order), more sites stay within
  `averaging.error_bound` of the float64 mean;
- `ReplySets` decodes the same bits as `contract.decode_update` and refuses what it refuses;
- adding an int8 reply to the mean (after its checks) does not hold a whole decoded reply: the peak RSS
  above the start (VmHWM, Linux) stays well under one fp32 copy of the sets.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainjepa.federation.averaging import RunningMean, error_bound
from brainjepa.federation.compression import feedback_step
from brainjepa.federation.contract import decode_update, encode_update
from brainjepa.federation.reply_sets import CHUNK, ReplySets, reply_stats
from server.aggregate import SiteUpdate, check_update
from server.bounds import SetBound, distance_bound

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"encoder": 2 * CHUNK + 1234, "predictor": 999, "target": 2 * CHUNK + 1234}  # several chunks, a partial one


def _sets(rng: np.random.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy((scale * rng.standard_normal(n)).astype(np.float32)) for k, n in SIZES.items()}


def _reply(master: dict[str, torch.Tensor], wire: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    trained = {
        k: v + 1e-3 * torch.from_numpy(rng.standard_normal(v.numel()).astype(np.float32)) for k, v in master.items()
    }
    if wire == "int8":
        return feedback_step({k: trained[k] - master[k] for k in master}, None)[0]
    return encode_update(trained, master, wire)


def test_one_site_comes_back_bit_for_bit_also_from_a_lazily_decoded_int8_reply() -> None:
    rng = np.random.default_rng(0)
    w = _sets(rng)
    mean = RunningMean()
    mean.add(w, 37)
    assert all(torch.equal(v, w[k]) for k, v in mean.result().items())
    master = _sets(rng)
    payload = _reply(master, "int8", rng)
    lazy = RunningMean()
    lazy.add(ReplySets(payload, "int8", master), 5)
    decoded = decode_update(payload, "int8", master)
    assert all(torch.equal(v, decoded[k]) for k, v in lazy.result().items())


def test_two_sites_give_the_float64_mean_rounded_once_in_either_order() -> None:
    rng = np.random.default_rng(1)
    a, b = _sets(rng, 3.0), _sets(rng, 0.01)
    want = {k: ((a[k].double() * 17 + b[k].double() * 5) / 22).float() for k in SIZES}
    for order in ((a, 17, b, 5), (b, 5, a, 17)):
        mean = RunningMean()
        mean.add(order[0], order[1])
        mean.add(order[2], order[3])
        assert all(torch.equal(v, want[k]) for k, v in mean.result().items())


@pytest.mark.parametrize("sites", [3, 5, 8])
def test_several_sites_stay_within_the_documented_bound_of_the_float64_mean(sites: int) -> None:
    rng = np.random.default_rng(sites)
    sets = [_sets(rng, float(rng.uniform(0.01, 10))) for _ in range(sites)]
    counts = [int(n) for n in rng.integers(1, 2000, sites)]
    mean = RunningMean()
    for s, n in zip(sets, counts, strict=True):
        mean.add(s, n)
    got = mean.result()
    for k in SIZES:
        exact = sum(n * s[k].double() for s, n in zip(sets, counts, strict=True)) / sum(counts)
        err = (got[k].double() - exact).abs()
        bound = error_bound(counts, torch.stack([s[k].abs() for s in sets]).amax(0).double())
        assert bool((err <= bound).all()), f"{k}: worst error / bound {float((err / bound).max()):.3g}"
        assert float(err.max()) > 0  # fp32 does round: the bound is what is being checked


def test_running_mean_refuses_a_reply_of_other_sets_or_lengths() -> None:
    rng = np.random.default_rng(2)
    mean = RunningMean()
    mean.add(_sets(rng), 3)
    with pytest.raises(ValueError, match="values, the mean has"):
        mean.add({**_sets(rng), "predictor": torch.zeros(5)}, 3)
    with pytest.raises(ValueError, match="differ from the earlier"):
        mean.add({"x": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="positive"):
        mean.add(_sets(rng), 0)


@pytest.mark.parametrize("wire", ["float32", "float16", "int8"])
def test_reply_sets_decode_the_same_bits_as_decode_update(wire: str) -> None:
    rng = np.random.default_rng(3)
    master = _sets(rng)
    payload = _reply(master, wire, rng)
    lazy, whole = ReplySets(payload, wire, master), decode_update(payload, wire, master)
    assert list(lazy) == list(whole)
    for k in SIZES:
        assert torch.equal(lazy[k], whole[k]) and lazy.shape(k) == tuple(whole[k].shape)
    stats = reply_stats(lazy, master)
    for k in SIZES:
        assert stats[k].nonfinite == 0
        assert stats[k].distance == pytest.approx(float((whole[k] - master[k]).double().norm()), rel=1e-9)
        assert stats[k].norm == pytest.approx(float(whole[k].double().norm()), rel=1e-9)


def test_reply_sets_refuse_what_decode_update_refuses() -> None:
    rng = np.random.default_rng(4)
    master = _sets(rng)
    payload = _reply(master, "int8", rng)
    for bad, match in [
        ({k: v for k, v in payload.items() if k != "predictor.scale"}, "int8 payload holds"),
        ({**payload, "encoder": payload["encoder"][:-1]}, "codes, expected"),
        ({**payload, "target.scale": -payload["target.scale"]}, "scales must be finite"),
    ]:
        for decode in (lambda p: decode_update(p, "int8", master), lambda p: ReplySets(p, "int8", master)):
            with pytest.raises(ValueError, match=match):
                decode(bad)
    half = _reply(master, "float16", rng)
    with pytest.raises(ValueError, match="expected float16 deltas"):
        ReplySets({**half, "encoder": half["encoder"].float()}, "float16", master)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _peak_above_start_mb(work) -> float:
    """Peak RSS while `work()` runs, above the RSS before it (VmHWM reset through clear_refs)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    start = _rss_mb("VmRSS")
    work()
    return _rss_mb("VmHWM") - start


def measure_reply_memory() -> dict[str, float]:
    """In a fresh process (`__main__` below): MB above the start while an int8 reply of 64 MB of fp32 sets
    is checked and added to the mean (`lazy`), and while it is decoded whole, the old way (`whole`)."""
    n = 1 << 24  # 16 M values: 64 MB fp32 (above glibc's largest mmap threshold: a fresh mapping), 16 MB int8
    g = torch.Generator().manual_seed(0)
    master = {"encoder": torch.randn(n, generator=g)}
    replies = [feedback_step({"encoder": torch.randn(n, generator=g) * 1e-3}, None)[0] for _ in range(2)]
    mean = RunningMean()
    mean.add(ReplySets(replies[0], "int8", master), 3)  # allocates the mean: 64 MB, expected

    def lazy() -> None:
        update = SiteUpdate("b", 4, ReplySets(replies[1], "int8", master))
        bounds = {"encoder": SetBound(distance_bound(master["encoder"], 0.5), 1e9)}
        stats = reply_stats(update.sets, master)  # the checks' one pass
        assert check_update(update, {"encoder": n}, master, bounds, 0, stats) is None
        mean.add(update.sets, update.num_examples)

    def whole() -> None:
        decoded = decode_update(replies[1], "int8", master)
        del decoded

    return {"mb": n * 4 / 2**20, "lazy": _peak_above_start_mb(lazy), "whole": _peak_above_start_mb(whole)}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_adding_an_int8_reply_does_not_hold_a_decoded_copy_of_it() -> None:
    """Checking and adding the second int8 reply stays under a quarter of one decoded copy (chunk
    temporaries only); decoding it whole is measured to take at least a copy, so the measurement can tell
    the two apart. A fresh process: nothing else of the test session's allocates meanwhile."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    code = "import json, test_averaging as t; print(json.dumps(t.measure_reply_memory()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    mb, lazy_mb, whole_mb = got["mb"], got["lazy"], got["whole"]
    assert whole_mb >= 0.9 * mb, f"the measurement missed a whole decoded reply ({whole_mb:.0f} MB of {mb:.0f})"
    assert lazy_mb < 0.25 * mb, f"checking and adding one reply took {lazy_mb:.0f} MB (a decoded copy is {mb:.0f} MB)"
