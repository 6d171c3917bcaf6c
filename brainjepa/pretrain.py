"""Single-machine pretraining: the run loop around `PretrainStep`, with metrics and checkpoints.

On several devices of the machine (`brainjepa pretrain --devices`, or under torchrun) every rank runs this
loop over the same batches, trains on its rows and sums the gradients (`brainjepa.distributed`); rank 0
alone writes the run folder."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from brainjepa.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from brainjepa.config import PretrainConfig, to_dict
from brainjepa.data import load_pretraining_cohort, pretraining_stream
from brainjepa.distributed import RankGroup
from brainjepa.errors import ConfigError, DataError
from brainjepa.gradients import gradient_checksum, gradients_for, save_gradients
from brainjepa.jepa import JEPAModels, PretrainStep, resolve_device
from brainjepa.monitor import CollapseMonitor, probe_batch, read_rows
from brainjepa.plots import plot_collapse, plot_loss_curve
from brainjepa.prefetch import Prefetcher
from brainjepa.schedules import schedule_at

log = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "loss", "lr", "weight_decay", "momentum", "samples", "seconds"]


@dataclass(frozen=True)
class PretrainResult:
    out_dir: Path
    checkpoint: Path
    metrics: Path
    final_loss: float
    first_loss: float


def _open_metrics(path: Path, start: int) -> tuple[object, csv.DictWriter]:
    """Open the metrics CSV for appending; on resume drop rows past the checkpoint's step."""
    rows = []
    if start > 0 and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < start]
    f = open(path, "w", newline="")  # noqa: SIM115 (closed by the caller)
    writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def keep_copy(ckpt_path: Path, step: int) -> Path:
    """checkpoint_STEP.pt beside the latest checkpoint: a hard link (the next save renames a new file over
    checkpoint.pt and leaves this one intact), a copy where the file system has no hard links."""
    kept = ckpt_path.with_name(f"checkpoint_{step:06d}.pt")
    kept.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, kept)
    except OSError:
        shutil.copy2(ckpt_path, kept)
    return kept


def pretrain_rank(group: RankGroup, job: tuple[PretrainConfig, bool]) -> PretrainResult:
    """One rank of `brainjepa pretrain --devices` (`brainjepa.distributed.launch`)."""
    cfg, resume = job
    return pretrain(cfg, resume=resume, progress=False, group=group)


def pretrain(
    cfg: PretrainConfig, resume: bool = False, progress: bool = True, group: RankGroup | None = None
) -> PretrainResult:
    """Pretrain for cfg.train.steps optimizer steps; resumable from out_dir/checkpoint.pt. With a `group`,
    this process is one rank of the run (its device is the group's; rank 0 writes the outputs)."""
    t = cfg.train
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.csv"
    device = resolve_device(t.device) if group is None else group.device
    writer_rank = group is None or group.rank == 0
    torch.manual_seed(t.seed)

    cohort = load_pretraining_cohort(cfg)
    stream = pretraining_stream(cohort, cfg)
    if not cfg.data.gradients:
        log.info(
            "no gradient file given: computing %d diffusion-map gradients from the cohort's mean FC",
            cfg.model.gradient_components,
        )
    grads, grad_source = gradients_for(cfg.data.gradients, cohort.series, cfg.model.gradient_components, cohort.source)
    checksum = gradient_checksum(grads)
    if writer_rank:
        save_gradients(out / "gradients.npy", grads)
    if cohort.scaling is not None and writer_rank:
        atomic_write_text(out / "scaling.json", json.dumps(cohort.scaling.to_dict()))

    models = JEPAModels(cfg.model, torch.from_numpy(grads))
    step_fn = PretrainStep(
        models,
        cfg.optim,
        t.steps,
        device,
        activation_checkpointing=t.activation_checkpointing,
        perf=cfg.perf,
        precision=t.precision,
        group=group,
    )
    start = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["gradient_checksum"] != checksum:
            raise DataError(f"checkpoint '{ckpt_path}' was trained with other gradients (checksum mismatch)")
        if ckpt["config"]["model"] != to_dict(cfg)["model"] or ckpt["config"]["train"]["steps"] != t.steps:
            raise ConfigError(f"checkpoint '{ckpt_path}': model config or train.steps differ from the config given")
        models.load_state_dict(ckpt["models"])
        step_fn.load_state_dict(ckpt["trainer"])
        start = ckpt["step"]
        log.info("resuming from %s at step %d of %d", ckpt_path, start, t.steps)

    accum = cfg.optim.accumulation_steps

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_path,
            kind="pretrain",
            step=step,
            config=to_dict(cfg),
            model_config=to_dict(cfg.model),
            gradients=grads,
            gradient_checksum=checksum,
            gradient_source=grad_source,
            models=models.state_dict(),
            trainer=step_fn.state_dict(),
            scaling=cohort.scaling.to_dict() if cohort.scaling else None,
        )

    f, writer = _open_metrics(metrics_path if writer_rank else Path(os.devnull), start)
    monitor = None
    if writer_rank:
        probe = torch.nan_to_num(probe_batch(stream.packed, cfg.model.n_frames, cfg.monitor.probe_scans))  # (B, R, T)
        monitor = CollapseMonitor(
            cfg.monitor,
            probe,
            cfg.model.embed_dim,
            out / "monitor.csv",
            start,
            mask_cfg=cfg.mask,
            patch_size=cfg.model.patch_size,
            loss=cfg.optim.loss,
            target_norm=cfg.optim.target_norm,
        )
    pending: list[tuple[int, torch.Tensor, float]] = []
    first_loss = last_loss = float("nan")
    batches = Prefetcher(
        lambda step: [stream[step * accum + a] for a in range(accum)],
        range(start, t.steps),
        cfg.perf.prefetch,
        pin=device.type == "cuda",
    )
    bar = tqdm(batches, initial=start, total=t.steps, desc="pretrain", disable=not progress)
    t0 = time.perf_counter()
    try:
        for step, micro_batches in bar:
            loss = step_fn(micro_batches, step)
            pending.append((step, loss, time.perf_counter() - t0))
            if len(pending) >= t.log_every or step == t.steps - 1:
                losses = torch.stack([p[1] for p in pending]).tolist()  # one host sync per flush
                for (s, _, sec), value in zip(pending, losses, strict=True):
                    pt = schedule_at(cfg.optim, s, t.steps)
                    writer.writerow(
                        {
                            "step": s,
                            "loss": f"{value:.6f}",
                            "lr": f"{pt.lr:.3e}",
                            "weight_decay": f"{pt.weight_decay:.4f}",
                            "momentum": f"{pt.momentum:.6f}",
                            "samples": (s + 1) * t.batch_size * accum,
                            "seconds": f"{sec:.2f}",
                        }
                    )
                f.flush()
                if first_loss != first_loss and pending[0][0] == 0:
                    first_loss = losses[0]
                last_loss = losses[-1]
                bar.set_postfix(loss=f"{last_loss:.4f}")
                pending.clear()
            if monitor is not None and monitor.due(step, last=step == t.steps - 1):
                monitor.measure(models.target, step, models)
            keep = t.keep_every > 0 and (step + 1) % t.keep_every == 0 and writer_rank
            if ((step + 1) % t.checkpoint_every == 0 or keep or step == t.steps - 1) and writer_rank:
                checkpoint(step + 1)
            if keep:
                keep_copy(ckpt_path, step + 1)
    finally:
        f.close()
        bar.close()
    if monitor is None:  # a rank other than 0: nothing to write
        return PretrainResult(out, ckpt_path, metrics_path, last_loss, first_loss)
    plot_loss_curve(metrics_path, out / "loss.png")
    if cfg.monitor.every > 0:
        with open(metrics_path, newline="") as mf:
            loss_points = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(mf)]
        plot_collapse(loss_points, read_rows(monitor.path), out / "collapse.png")
    log.info("pretraining done: %d steps, final loss %.4f, checkpoint %s", t.steps, last_loss, ckpt_path)
    return PretrainResult(out, ckpt_path, metrics_path, last_loss, first_loss)
