"""Peak memory of the coordinator's ServerApp work in one pretraining round, for ViT-S / ViT-B-sized sets.

Runs, in this process and with the server's own code, what `server.pretraining` does with the weights in
a round: the global sets, the downlink payload (`encode_global`, or under int8 `server.downlink`) built
as Flower's record and dropped once sent (as `server.exchange` does after the push; under int8 the old
reference read from the run folder, a temporary folder here, and the new one written there, chunk by
chunk; `--resync N`: N sites get the fp32 form, read from that file), each site's reply as Flower carries it (an `ArrayRecord`, its arrays
taken out as read-only views by `server.exchange.take_tensors`) read as `ReplySets`, checked in one chunked pass
(`reply_stats`, `check_update` against per-set bounds as `server.guard` derives them) and added to the
fp32 running mean one chunk at a time, then the mean. The sets are random, of the sizes of
`scripts/transport_bench_app/benchapp/shapes.py`. Prints the peak RSS of each stage (VmHWM, reset before
it; the sites' work that makes a reply is done here too but not counted). Flower's own processes
(SuperLink) are measured by `transport_bench.py`.

    python scripts/coordinator_memory.py --model vit-b --wire-dtype int8 --sites 2
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from flwr.app import ArrayRecord

from brainjepa.federation.averaging import RunningMean
from brainjepa.federation.compression import feedback_step
from brainjepa.federation.contract import encode_global, encode_update
from brainjepa.federation.reply_sets import ReplySets, reply_stats
from server.aggregate import SiteUpdate, check_update
from server.bounds import SetBound, distance_bound, target_bound
from server.exchange import take_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent / "transport_bench_app"))
from benchapp.shapes import model_shapes  # noqa: E402


def peak_mb() -> float:
    """This process's peak RSS (VmHWM) since the last `reset_peak`, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim() -> None:
    """Hand freed heap back to the OS (glibc `malloc_trim`): what the stand-in sites' work left in this
    process's heap is then not counted as the coordinator's."""
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0): what follows is measured on its own."""
    Path("/proc/self/clear_refs").write_text("5")


def main(
    model: Annotated[str, typer.Option(help="vit-s or vit-b")] = "vit-b",
    wire_dtype: Annotated[str, typer.Option(help="float32, float16 or int8")] = "int8",
    sites: Annotated[int, typer.Option(help="replies in the round")] = 2,
    resync: Annotated[
        int, typer.Option(help="int8: sites not in sync, sent the fp32 reference read from the run folder")
    ] = 0,
) -> None:
    start = peak_mb()  # python, torch, flwr
    sizes: dict[str, int] = {}
    for name, shape in model_shapes(model):
        key = name.split(".", 1)[0]
        sizes[key] = sizes.get(key, 0) + int(torch.Size(shape).numel())
    g = torch.Generator().manual_seed(0)
    sets = {k: torch.randn(n, generator=g).mul_(0.02) for k, n in sizes.items()}  # the global master (fp32)
    stages = {"python, torch, flwr": start, "global sets": peak_mb()}  # from here: peaks of each stage alone
    seconds = {}
    if wire_dtype == "int8":
        from server.downlink import Downlink  # noqa: PLC0415
        from server.reference_file import write_reference  # noqa: PLC0415

        folder = tempfile.TemporaryDirectory(prefix="coordinator-memory-")  # the run folder
        down = Downlink(Path(folder.name))
        # what in-sync sites hold: last round's reference, committed to the run folder
        down.checksum = write_reference(down.path, {k: v + 1e-3 for k, v in sets.items()})
        down.holders = frozenset(range(resync, sites))
        gc.collect()
        trim()
        reset_peak()
        t0 = time.perf_counter()
        _, rnd = down.prepare(sets, _spec())
        seconds["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        payload = rnd.records(range(sites))  # the delta's record, and the fp32 resync's read from the file
        seconds["records"] = time.perf_counter() - t0
    else:
        reset_peak()
        payload = ArrayRecord(encode_global(sets, wire_dtype))
    del payload  # pushed: the SuperLink holds it now
    stages["downlink payload"] = peak_mb()
    bounds = {
        k: SetBound(target_bound(sets["encoder"], v, 0.5, 0.1), ema_share=0.1)
        if k == "target"
        else SetBound(distance_bound(v, 0.5))
        for k, v in sets.items()
    }
    mean = RunningMean()
    for i in range(sites):
        reply = ArrayRecord(site_reply(sets, wire_dtype, 1e-3 * (i + 1)))  # the site's work: not measured
        gc.collect()
        trim()
        reset_peak()
        update = SiteUpdate(f"site{i}", 10, ReplySets(take_tensors(reply), wire_dtype, sets))
        del reply
        stats = reply_stats(update.sets, sets)
        reason = check_update(update, {k: v.numel() for k, v in sets.items()}, sets, bounds, 0, stats)
        if reason:
            raise RuntimeError(f"the generated reply {i + 1} was refused: {reason}")
        mean.add(update.sets, update.num_examples)
        del update
        stages[f"reply {i + 1} checked and added"] = peak_mb()
    new = mean.result()
    stages["mean"] = peak_mb()
    del new
    params = sum(sizes.values())
    out = {"model": model, "wire": wire_dtype, "params": params, "peak_rss_mb": stages}
    if wire_dtype == "int8":
        down.commit(rnd, range(sites))
        down.close()
        out |= {"resync_sites": resync, "downlink_s": {k: round(v, 2) for k, v in seconds.items()}}
    print(json.dumps(out))


def site_reply(sets: dict[str, torch.Tensor], wire_dtype: str, step: float) -> dict[str, torch.Tensor]:
    """A site's reply payload, one set at a time (as it arrives at the coordinator)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sets.items():
        trained = {k: v + step}
        if wire_dtype == "int8":
            out.update(feedback_step({k: trained[k] - v}, None)[0])
        else:
            out.update(encode_update(trained, {k: v}, wire_dtype))
    return out


def _spec():  # a pretraining RoundSpec with int8 (only its fields are replaced by Downlink.prepare)
    from brainjepa.config import PretrainConfig  # noqa: PLC0415
    from brainjepa.federation.contract import RoundSpec  # noqa: PLC0415

    return RoundSpec(
        task="pretrain",
        round=0,
        num_rounds=1,
        step_start=0,
        local_steps=1,
        wire_dtype="int8",
        model_checksum="",
        gradient_checksum="",
        task_config=PretrainConfig(),
    )


if __name__ == "__main__":
    typer.run(main)
