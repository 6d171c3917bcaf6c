"""Peak memory of the coordinator's ServerApp work in one pretraining round, for ViT-S / ViT-B-sized sets.

Runs, in this process and with the server's own code, what `server.pretraining` does with the weights in
a round: the global sets, the downlink payload (`encode_global`, or under int8 `server.downlink`), each
site's reply as Flower carries it (an `ArrayRecord`, read back with `to_torch_state_dict`), decoded
(`contract.decode_update`) and added to the float64 running mean one site at a time, then the mean. The
sets are random, of the sizes of `scripts/transport_bench_app/benchapp/shapes.py`. Prints the peak RSS of
each stage (VmHWM, reset before it; the sites' work that makes a reply is done here too but not
counted). Flower's own processes (SuperLink) are measured by `transport_bench.py`.

    python scripts/coordinator_memory.py --model vit-b --wire-dtype int8 --sites 2
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from flwr.app import ArrayRecord

from brainjepa.federation.averaging import RunningMean
from brainjepa.federation.compression import feedback_step
from brainjepa.federation.contract import decode_update, encode_global, encode_update

sys.path.insert(0, str(Path(__file__).resolve().parent / "transport_bench_app"))
from benchapp.shapes import model_shapes  # noqa: E402


def peak_mb() -> float:
    """This process's peak RSS (VmHWM) since the last `reset_peak`, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0): what follows is measured on its own."""
    Path("/proc/self/clear_refs").write_text("5")


def main(
    model: Annotated[str, typer.Option(help="vit-s or vit-b")] = "vit-b",
    wire_dtype: Annotated[str, typer.Option(help="float32, float16 or int8")] = "int8",
    sites: Annotated[int, typer.Option(help="replies in the round")] = 2,
) -> None:
    start = peak_mb()  # python, torch, flwr
    sizes: dict[str, int] = {}
    for name, shape in model_shapes(model):
        key = name.split(".", 1)[0]
        sizes[key] = sizes.get(key, 0) + int(torch.Size(shape).numel())
    g = torch.Generator().manual_seed(0)
    sets = {k: torch.randn(n, generator=g).mul_(0.02) for k, n in sizes.items()}  # the global master (fp32)
    stages = {"python, torch, flwr": start, "global sets": peak_mb()}  # from here: peaks of each stage alone
    if wire_dtype == "int8":
        from server.downlink import Downlink  # noqa: PLC0415

        down = Downlink()
        down.reference = {k: v + 1e-3 for k, v in sets.items()}  # what in-sync sites hold
        reset_peak()
        _, rnd = down.prepare(sets, _spec())
        payload = ArrayRecord(rnd.delta)  # type: ignore[arg-type]  (every site in sync: no fp32 record)
        full = rnd.full  # the new reference
    else:
        reset_peak()
        payload = ArrayRecord(encode_global(sets, wire_dtype))
        full = None
    stages["downlink payload"] = peak_mb()
    mean = RunningMean()
    for i in range(sites):
        reply = ArrayRecord(site_reply(sets, wire_dtype, 1e-3 * (i + 1)))  # the site's work: not measured
        gc.collect()
        reset_peak()
        decoded = decode_update(reply.to_torch_state_dict(), wire_dtype, sets)
        del reply
        mean.add(decoded, 10)
        del decoded
        stages[f"reply {i + 1} decoded and added"] = peak_mb()
    new = mean.result()
    stages["mean"] = peak_mb()
    del new, payload, full
    params = sum(sizes.values())
    print(json.dumps({"model": model, "wire": wire_dtype, "params": params, "peak_rss_mb": stages}))


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
