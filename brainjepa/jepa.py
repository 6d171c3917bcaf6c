"""The JEPA pretraining step: online encoder + predictor regress the EMA target's normalised tokens.

`JEPAModels` holds the three networks; `jepa_loss` is the loss of one (micro-)batch; `PretrainStep`
owns AdamW and the schedules and performs one optimizer step (with gradient accumulation) followed by
the EMA update. It is plain PyTorch: the single-machine loop, the benchmark and the federated client
all call the same object.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from brainjepa.config import ModelConfig, OptimConfig, PerfConfig, Precision, TargetNorm
from brainjepa.distributed import RankGroup
from brainjepa.errors import ConfigError
from brainjepa.fastpath import accelerate, attention_backends, attention_context
from brainjepa.masks import Masks
from brainjepa.predictor import Predictor
from brainjepa.schedules import SchedulePoint, schedule_at
from brainjepa.vit import Encoder, gather_tokens


class JEPAModels(nn.Module):
    """encoder (trained), predictor (trained), target (EMA of the encoder, never gets gradients)."""

    def __init__(self, cfg: ModelConfig, gradients: torch.Tensor) -> None:
        super().__init__()
        if gradients.shape != (cfg.n_rois, cfg.gradient_components):
            raise ValueError(
                f"gradients have shape {tuple(gradients.shape)}, the model config expects "
                f"({cfg.n_rois}, {cfg.gradient_components}) (model.n_rois, model.gradient_components)"
            )
        self.cfg = cfg
        self.encoder = Encoder(cfg, gradients)
        self.predictor = Predictor(cfg, gradients)
        self.target = copy.deepcopy(self.encoder)
        self.target.requires_grad_(False)


@torch.no_grad()
def jepa_targets(
    models: JEPAModels,
    x: torch.Tensor,
    masks: Masks,
    target_norm: str = "layer_norm",
    target_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x (B, R, T) -> (B, Nt, D): the EMA target's tokens at `masks.target`, LayerNorm-ed (no affine).

    `target_norm="centered"`: then less each token position's mean over the B scans of the batch (as DINO
    centres its teacher's outputs), taken over every token of the grid before the targets are picked: the
    part of a target that its position alone predicts is removed. Needs B >= 2 (one scan is its own mean).
    `target_forward` replaces the target encoder's call (a CUDA-graph replay, `brainjepa.fastpath`).
    """
    if target_norm == "layer_norm":
        if target_forward is None:
            h = models.target(x, select=masks.target)  # (B, Nt, D): all tokens in, targets out
        else:
            h = gather_tokens(target_forward(x), masks.target)  # (B, N, D) -> (B, Nt, D)
        return F.layer_norm(h, (h.shape[-1],))
    if target_norm != "centered":
        raise ValueError(f"target_norm: expected one of {get_args(TargetNorm)}, got '{target_norm}'")
    if x.shape[0] < 2:
        raise ValueError(f"target_norm 'centered' needs at least 2 scans per batch, got {x.shape[0]}")
    h = models.target(x) if target_forward is None else target_forward(x)  # (B, N, D)
    t = F.layer_norm(h, (h.shape[-1],))
    t = t - t.mean(0, keepdim=True)  # (B, N, D) - (1, N, D): each position's batch mean
    return gather_tokens(t, masks.target)  # (B, Nt, D)


def jepa_loss(
    models: JEPAModels,
    x: torch.Tensor,
    masks: Masks,
    loss: str = "smooth_l1",
    target_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    context_input: torch.Tensor | None = None,
    target_norm: str = "layer_norm",
    target: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """x (B, R, T) -> scalar loss between predictions and the targets (`jepa_targets`).

    `target_forward` replaces the target encoder's call (a CUDA-graph replay, `brainjepa.fastpath`).
    `context_input` (B, R, T): what the context encoder reads instead of x (the collapse monitor's test of
    whether the predictor uses the context's content); the targets always come from x. `target` (B, Nt, D):
    targets already computed (the monitor's one target pass); `reduction`: "mean" (training) or "sum".
    """
    if target is None:
        with torch.no_grad(), record_function("jepa/target"):
            target = jepa_targets(models, x, masks, target_norm, target_forward)  # (B, Nt, D)
    with record_function("jepa/context_encoder"):
        z = models.encoder(x if context_input is None else context_input, masks.context)  # (B, Nc, D)
    with record_function("jepa/predictor"):
        pred = models.predictor(z, masks.context, masks.target)  # (B, Nt, D)
    with record_function("jepa/loss"):
        if loss == "l2":
            return F.mse_loss(pred.float(), target.float(), reduction=reduction)
        return F.smooth_l1_loss(pred.float(), target.float(), beta=1.0, reduction=reduction)


def param_groups(models: JEPAModels) -> list[dict]:
    """AdamW groups: weight decay on weight matrices, none on biases and 1-D parameters."""
    decay, no_decay = [], []
    for module in (models.encoder, models.predictor):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when there is one, else the CPU; a named CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on CUDA, fp32 elsewhere; `bf16` / `fp32` as asked (bf16 works on CPUs too)."""
    if precision not in get_args(Precision):
        raise ValueError(f"precision: expected one of {get_args(Precision)}, got '{precision}'")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def recompute_count(share: float, depth: int) -> int:
    """Blocks recomputed whole for a share of a network's `depth` (rounded up: 0.25 of 6 -> 2)."""
    return min(depth, math.ceil(share * depth - 1e-9))


class PretrainStep:
    """One optimizer step of JEPA pretraining at an explicit position of the run's schedule.

    `perf` picks the fast path (`brainjepa.fastpath`): SDPA backend order, compiled blocks, a
    CUDA-graph target forward. The default is plain eager PyTorch. With a `group` (`brainjepa.distributed`)
    every rank is given the global micro-batches, trains on its rows and sums the gradients over the ranks:
    the step of one process on the whole batch, to float rounding.
    """

    def __init__(
        self,
        models: JEPAModels,
        cfg: OptimConfig,
        total_steps: int,
        device: torch.device | str = "cpu",
        fused: bool | None = None,
        activation_checkpointing: bool = False,
        perf: PerfConfig | None = None,
        precision: str = "auto",
        group: RankGroup | None = None,
    ) -> None:
        self.models, self.cfg, self.total_steps, self.group = models, cfg, total_steps, group
        if group is not None and cfg.target_norm == "centered":
            raise ConfigError(
                "optim.target_norm: 'centered' takes its mean over the whole batch, which one process of a "
                "site's `distributed` group does not hold; use layer_norm there, or one process"
            )
        self.device = torch.device(device)
        self.perf = perf or PerfConfig()
        if any(p.device != self.device for p in models.parameters()):
            self.models.to(self.device)
        fused = self.device.type == "cuda" if fused is None else fused
        self.optimizer = torch.optim.AdamW(param_groups(models), lr=cfg.start_lr, betas=cfg.betas, fused=fused)
        self.precision = resolve_precision(precision, self.device)
        share = 1.0 if activation_checkpointing else self.perf.recompute_fraction
        for net in (models.encoder, models.predictor):
            net.recompute_blocks = recompute_count(share, len(net.blocks))
            for i, blk in enumerate(net.blocks):  # the blocks recomputed whole need no selective policy
                blk.selective_checkpointing = self.perf.selective_checkpointing and i >= net.recompute_blocks
        self._trained = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._online = list(models.encoder.parameters())
        self._target = list(models.target.parameters())
        self.backends = attention_backends(self.perf.attention, self.device)
        self.target_forward = accelerate(models, self.perf, self.device)

    def autocast(self):
        """bf16 autocast (matmuls and attention in bf16, reductions and weights in fp32) or nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def set_schedule(self, point: SchedulePoint) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = point.lr
            if group["apply_wd"]:
                group["weight_decay"] = point.weight_decay

    def __call__(self, micro_batches: Sequence[tuple[torch.Tensor, Masks]], step: int) -> torch.Tensor:
        """Accumulate gradients over the micro-batches, step AdamW, update the EMA target.

        Returns the mean loss as a detached device tensor (no host sync).
        """
        point = schedule_at(self.cfg, step, self.total_steps)
        self.set_schedule(point)
        self.models.encoder.train()
        self.models.predictor.train()
        total = torch.zeros((), device=self.device)
        for x, masks in micro_batches:
            share = 1.0
            if self.group is not None:  # this rank's rows; its mean loss weighted by their share of the batch
                rows, share = self.group.rows(len(x)), self.group.share(len(x))
                if not share:
                    raise ConfigError(f"a batch of {len(x)} cannot be split over {self.group.world} processes")
                x, masks = x[rows], masks.rows(rows)  # (B_rank, R, T)
            with record_function("jepa/to_device"):
                x = x.to(self.device, non_blocking=True)  # (B, R, T)
                masks = masks.to(self.device)
            if self.target_forward is not None:
                torch.compiler.cudagraph_mark_step_begin()
            with attention_context(self.backends):
                with self.autocast():
                    loss = jepa_loss(
                        self.models, x, masks, self.cfg.loss, self.target_forward, target_norm=self.cfg.target_norm
                    ) / len(micro_batches)
                    if share != 1.0:
                        loss = loss * share
                with record_function("jepa/backward"):
                    loss.backward()
            total += loss.detach()
        if self.group is not None:
            with record_function("jepa/all_reduce"):
                self.group.sum_grads(self._trained, extra=[total])  # the global batch's gradient and loss
        with record_function("jepa/optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with record_function("jepa/ema"):
            self.ema_update(point.momentum)
        return total

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * encoder, for every parameter."""
        torch._foreach_lerp_(self._target, self._online, 1.0 - momentum)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
