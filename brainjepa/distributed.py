"""One site's local work over several processes: a torch.distributed process group of N ranks.

A site with several GPUs (site YAML `distributed.devices`, `brainjepa pretrain --devices`, `brainjepa bench
--processes`) runs one process per device (NCCL); on a CPU, N gloo processes. The ranks are one logical
run, the very run one process would do with the same global batch:

- every rank builds the SAME global batch (the batch index = the global step; masks and Poisson draws from
  the same seeded generators) and trains on its rows (`RankGroup.rows`: contiguous, B // N or one more);
- each rank's loss is its rows' mean weighted by its share of the batch, so the SUM over ranks of the
  gradients (`RankGroup.sum_`, one all-reduce of one flat buffer per step) is the global batch's gradient;
- every rank then takes the same AdamW step and the same EMA target update: the weights stay identical
  on every rank, and rank 0's are the site's update;
- under DP-SGD the clipped per-sample gradients are summed over ranks before the noise, which every rank
  draws from the same generator: one noise draw per step, one ledger (rank 0 writes it).

`launch` starts the ranks as fresh processes (spawn) on this machine and returns rank 0's result. A rank
that raises a known error (a refused round: `passthrough` types) makes `launch` raise that error; a rank
that dies, or waits more than `timeout_s` for a rank that hangs, makes it raise `DistributedError`, after
every rank has been stopped (by its own process id) and reaped: no orphans, and the next round starts clean.
Ranks also exit when the launching process disappears. Under torchrun, `joined_group` joins the group
torchrun describes in the environment.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from brainjepa.config import DistributedConfig
from brainjepa.errors import ConfigError, InputError
from brainjepa.federation.processes import free_port

log = logging.getLogger(__name__)
STOP_GRACE_S = 2.0  # after a rank failed: how long the others get to end by themselves before being stopped


class DistributedError(RuntimeError):
    """A rank died, hung past the timeout or failed: the message names each rank and what happened."""


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the group: rank `rank` of `world`, training on `device`."""

    rank: int
    world: int
    device: torch.device

    def rows(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of `n` (the shares differ by one at most)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def share(self, n: int) -> float:
        """This rank's rows over the global batch: the weight of its mean loss."""
        r = self.rows(n)
        return (r.stop - r.start) / n

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place, with one all-reduce of one flat buffer."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])  # (sum of numel,)
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_grads(self, params: Sequence[torch.Tensor], extra: Sequence[torch.Tensor] = ()) -> None:
        """Sum the gradients of `params` (those that have one: the same on every rank) and `extra` tensors."""
        self.sum_([p.grad for p in params if p.grad is not None] + list(extra))

    def broadcast_floats(self, values: Sequence[float]) -> list[float]:
        """Rank 0's numbers (float64) on every rank (e.g. the noise multiplier its ledger granted)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.broadcast(t, src=0)
        return [float(v) for v in t.tolist()]

    def broadcast_ints(self, values: Sequence[int]) -> list[int]:
        """Rank 0's integers on every rank (e.g. secret seeds drawn once at the site)."""
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.broadcast(t, src=0)
        return [int(v) for v in t.tolist()]


def parse_devices(text: str) -> int | tuple[int, ...]:
    """A command line's devices: "4" (a count) or "0,1,2,3" (CUDA device ids)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--devices: expected a count (4) or CUDA device ids (0,1,2,3; one id: 2,), got '{text}'")
    return tuple(int(p) for p in parts) if "," in text else int(parts[0])


def rank_devices(cfg: DistributedConfig, device: str) -> list[str]:
    """The device of each rank: `devices` CUDA ids -> cuda:i; a count N -> cuda:0..N-1 on a CUDA machine
    (`device` auto / cuda), else N CPU processes."""
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if isinstance(cfg.devices, tuple):
        if not on_cuda:
            raise ConfigError(
                f"distributed.devices: {list(cfg.devices)} names CUDA devices, but the device is '{device}' "
                "(no CUDA here): give a count of CPU processes instead"
            )
        ids = list(cfg.devices)
    else:
        ids = list(range(cfg.devices))
    if not on_cuda:
        return ["cpu"] * len(ids)
    if not torch.cuda.is_available():
        raise ConfigError(f"distributed.devices: CUDA devices asked for (device '{device}'), but none is available")
    visible = torch.cuda.device_count()
    if max(ids) >= visible:
        raise ConfigError(
            f"distributed.devices: device id {max(ids)} asked for, {visible} CUDA device(s) visible "
            "(CUDA_VISIBLE_DEVICES decides which)"
        )
    return [f"cuda:{i}" for i in ids]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def joined_group(device: str) -> RankGroup | None:
    """The group torchrun describes in the environment (WORLD_SIZE > 1), joined; None when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}" if on_cuda else "cpu")
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend_for(dev), init_method="env://")
    return RankGroup(dist.get_rank(), dist.get_world_size(), dev)


def launch(
    fn: Callable[[RankGroup, Any], Any],
    payload: Any,
    cfg: DistributedConfig,
    device: str,
    passthrough: tuple[type[BaseException], ...] = (InputError,),
) -> Any:
    """Run `fn(group, payload)` on `cfg.world` fresh processes of this machine; rank 0's return value.

    `fn` must be importable (a module-level function); `payload` and the result travel through files in
    an owner-only temporary folder. Raises the first `passthrough` error a rank raised (lowest rank), else
    `DistributedError` when a rank failed, died or hung."""
    devices = rank_devices(cfg, device)
    world = len(devices)
    port = cfg.port or free_port()
    threads = max(1, torch.get_num_threads() // world) if devices[0] == "cpu" else torch.get_num_threads()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="brainjepa-ranks-") as tmp:
        folder = Path(tmp)
        torch.save(payload, folder / "payload.pt")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world, devices[rank], port, cfg.timeout_s, threads, str(folder), os.getpid()),
                name=f"brainjepa-rank-{rank}",
            )
            for rank in range(world)
        ]
        log.info("starting %d ranks on %s (rendezvous 127.0.0.1:%d)", world, ", ".join(devices), port)
        try:
            for p in procs:
                p.start()
            failed = _wait(procs, cfg.timeout_s)
        finally:
            stopped = _stop(procs)
        if failed:
            _raise_failure(procs, folder, devices, stopped, passthrough)
        return torch.load(folder / "result.pt", weights_only=False)  # our own file, written by rank 0


def _wait(procs: list[multiprocessing.process.BaseProcess], timeout_s: float) -> bool:
    """Until every rank ended (False), or one failed and the others had STOP_GRACE_S to end too (True).
    Once rank 0 has finished (its result written), the others get `timeout_s` to end before being stopped."""
    failed_by = done_by = None
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if any(p.exitcode not in (None, 0) for p in procs) and failed_by is None:
            failed_by = time.monotonic() + STOP_GRACE_S
        if procs[0].exitcode == 0 and done_by is None:
            done_by = time.monotonic() + timeout_s
        if not alive:
            return failed_by is not None
        if failed_by is not None and time.monotonic() >= failed_by:
            return True
        if done_by is not None and time.monotonic() >= done_by:
            log.warning("rank 0 finished, %d rank(s) did not end within %.0f s: stopped", len(alive), timeout_s)
            return False
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.5)


def _stop(procs: list[multiprocessing.process.BaseProcess]) -> set[int]:
    """Terminate, then kill, every rank still running (by its own id), and reap all; the ranks stopped."""
    stopped = {i for i, p in enumerate(procs) if p.pid is not None and p.exitcode is None}
    for i in stopped:
        procs[i].terminate()
    for i in stopped:
        procs[i].join(STOP_GRACE_S)
        if procs[i].exitcode is None:
            procs[i].kill()
    for p in procs:
        if p.pid is not None:
            p.join()
    return stopped


def _raise_failure(
    procs: list[multiprocessing.process.BaseProcess],
    folder: Path,
    devices: list[str],
    stopped: set[int],
    passthrough: tuple[type[BaseException], ...],
) -> None:
    for rank in range(len(procs)):
        path = folder / f"error-{rank}.pt"
        if path.is_file():
            err = torch.load(path, weights_only=False)
            if isinstance(err, passthrough):
                raise err
    parts = []
    for rank, p in enumerate(procs):
        note = folder / f"error-{rank}.txt"
        if note.is_file():
            what = f"failed: {note.read_text().strip()}"
        elif rank in stopped:
            what = "stopped after another rank failed"
        elif p.exitcode == 0:
            what = "finished"
        elif p.exitcode is not None and p.exitcode < 0:
            what = f"died (signal {-p.exitcode})"
        else:
            what = f"died (exit code {p.exitcode}, no error raised)"
        parts.append(f"rank {rank} ({devices[rank]}): {what}")
    raise DistributedError(
        f"the round's {len(procs)} processes did not finish: " + "; ".join(parts) + " (every rank was stopped)"
    )


def _save(obj: Any, path: Path) -> None:
    """torch.save, write-then-rename: the launcher never reads a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _watch_parent(parent: int) -> None:
    """End this rank when the process that launched it is gone (killed): no orphans."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _rank_main(
    fn: Callable[[RankGroup, Any], Any],
    rank: int,
    world: int,
    device: str,
    port: int,
    timeout_s: float,
    threads: int,
    folder: str,
    parent: int,
) -> None:
    """One rank: join the group on loopback, run `fn`, rank 0 writes the result (write-then-rename)."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:  # every rank is on this machine: gloo talks over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    out = Path(folder)
    try:
        dist.init_process_group(
            backend_for(dev),
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = fn(RankGroup(rank, world, dev), torch.load(out / "payload.pt", weights_only=False))
        if rank == 0:
            _save(result, out / "result.pt")
    except Exception as e:  # recorded for the launcher's message (and re-raised: this rank fails)
        _save(e, out / f"error-{rank}.pt")
        (out / f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}"[:2000])
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
