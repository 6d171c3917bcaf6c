"""DP-SGD for the trained networks of a step: per-sample gradients, clipping and Gaussian noise.

Per-sample gradients come from `torch.func` (`vmap(grad(...))` over the WHOLE trained network, the
approach of Opacus' functorch grad-sample mode applied to the network instead of layer by layer): our
positional embedding (`brainjepa.positions.GradientProjection`) has no batch input, so Opacus' per-layer
hooks cannot attribute its gradient to samples; through `functional_call` every parameter, the mask
token and the gradient projection included, gets its exact per-sample gradient.

Clipping, noise and the optimizer wrapping are Opacus' own (`opacus.optimizers.DPOptimizer`:
`clip_and_accumulate`, `add_noise`). Memory: the per-sample gradients of at most `chunk` samples exist
at once; each chunk is clipped and summed into `p.summed_grad` before the next one is computed, so the
peak is `chunk` x the trained parameters instead of the batch's (chunk 1: about one extra copy of the
gradients, ghost clipping's class of memory).

The DP path is the plain eager step: no compiled blocks, no activation recomputation, and attention as
explicit matmul-softmax (`Attention.use_sdpa = False`; SDPA has no vmap batching rule and would fall
back to a per-sample loop): the same maths to float rounding.

Over several processes (`brainjepa.distributed`) every rank is given the step's whole Poisson draw, computes
and clips the per-sample gradients of its rows, and the clipped sums are added over the ranks BEFORE the
noise; every rank then adds the same noise (one generator, seeded alike on every rank): one noise draw
per step over the whole batch, exactly the single-process release.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad, vmap

from brainjepa.attention import Attention
from brainjepa.distributed import RankGroup
from brainjepa.downstream.model import DownstreamModel
from brainjepa.downstream.train import DownstreamStep, lr_at
from brainjepa.errors import ConfigError
from brainjepa.jepa import PretrainStep, jepa_targets
from brainjepa.masks import Masks, split_missing
from brainjepa.schedules import schedule_at

# loss_of(forward, *inputs of ONE sample with a leading batch dim of 1) -> scalar loss of that sample
SampleLoss = Callable[..., torch.Tensor]


def plain_eager(module: nn.Module) -> None:
    """What the DP path needs of a network: explicit attention, nothing recomputed, no selective checkpoints,
    no stochastic depth (vmap cannot draw a different in-place mask per sample)."""
    for sub in module.modules():
        if hasattr(sub, "drop_path"):
            sub.drop_path = 0.0
        if isinstance(sub, Attention):
            sub.use_sdpa = False
        if hasattr(sub, "recompute_blocks"):
            sub.recompute_blocks = 0
        if hasattr(sub, "selective_checkpointing"):
            sub.selective_checkpointing = False


def per_sample_gradients(
    module: nn.Module, loss_of: SampleLoss, *batch: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each sample's gradient of `loss_of` w.r.t. every trainable parameter of `module`.

    batch: tensors with a leading sample dim B. Returns ({name: (B, *param.shape)}, losses (B,)).
    """
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def one(p: dict[str, torch.Tensor], *sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_of(lambda *a: functional_call(module, p, a), *(s.unsqueeze(0) for s in sample))
        return loss, loss.detach()

    in_dims = (None,) + (0,) * len(batch)
    return vmap(grad(one, has_aux=True), in_dims=in_dims, randomness="different")(params, *batch)


class DPGradients:
    """Clip-and-noise of one network's gradient with Opacus' DPOptimizer around the step's optimizer.

    `accumulate(grads)` clips each sample's gradient (over all parameters together) to `max_grad_norm`
    and adds it to the sum; `release(expected_batch)` adds N(0, (sigma C)^2) noise to the sum and divides
    by the expected batch size: p.grad is then what the optimizer steps on.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        generator: torch.Generator,
    ) -> None:
        self.dp = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=None,
            loss_reduction="sum",
            generator=generator,
        )
        names = {id(p): n for n, p in module.named_parameters()}
        self.names = [names[id(p)] for p in self.dp.params]  # the optimizer's parameters, by name
        self.last_norms = torch.zeros(0)  # (b,) pre-clipping norms of the last chunk (tests, diagnostics)

    def accumulate(self, grads: dict[str, torch.Tensor]) -> None:
        for p, n in zip(self.dp.params, self.names, strict=True):
            p.grad_sample = grads[n]  # (b, *p.shape)
        self.last_norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in self.dp.grad_samples], 1).norm(dim=1)
        self.dp.clip_and_accumulate()
        for p in self.dp.params:
            p.grad_sample = None

    def release(self, expected_batch: float, group: RankGroup | None = None, extra: list[torch.Tensor] = ()) -> None:
        """With a `group`: the clipped sums (and the `extra` tensors) are first summed over the ranks."""
        for p in self.dp.params:  # an empty Poisson draw: nothing summed, noise only
            if p.summed_grad is None:
                p.summed_grad = torch.zeros_like(p)
        if group is not None:
            group.sum_([p.summed_grad for p in self.dp.params] + list(extra))
        self.dp.add_noise()
        for p in self.dp.params:
            p.grad /= expected_batch
            p.summed_grad = None


def release(
    grads: DPGradients, expected: float, group: RankGroup | None, losses: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Noise the clipped sum (summed over the ranks first, with the per-sample losses' sum and count);
    the mean per-sample loss of the whole draw, NaN when nobody was drawn."""
    if group is None:
        grads.release(expected)
        return torch.cat(losses).mean() if losses else torch.full((), float("nan"))
    per_sample = torch.cat(losses) if losses else torch.zeros(0, device=device)
    tally = torch.stack([per_sample.sum(), torch.tensor(float(len(per_sample)), device=device)])  # (2,)
    grads.release(expected, group, [tally])
    return tally[0] / tally[1] if tally[1] > 0 else torch.full((), float("nan"))


class OnlineJEPA(nn.Module):
    """The trained networks of pretraining as one function: context x -> predictions at the targets."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, x: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.encoder(x, context), context, target)  # (B, Nt, D)


def jepa_sample_loss(loss: str) -> SampleLoss:
    """One sample's JEPA loss: its mean over (Nt, D), as `jepa_loss` averages the batch."""

    def loss_of(
        forward: Callable[..., torch.Tensor], x: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        pred = forward(x, ctx, tgt).float()  # (1, Nt, D)
        return F.mse_loss(pred, y.float()) if loss == "l2" else F.smooth_l1_loss(pred, y.float(), beta=1.0)

    return loss_of


class DPPretrainStep:
    """A JEPA optimizer step under DP-SGD: per-sample gradients of the context encoder + predictor, each
    clipped to C, summed, N(0, (sigma C)^2) noise added, divided by the expected batch size, AdamW at
    the run's schedule; then the EMA target update (post-processing of the DP-trained encoder).

    `generator` draws the noise: seed it from a secret source (never from anything the server sends).
    """

    def __init__(
        self,
        step: PretrainStep,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch: float,
        generator: torch.Generator,
        chunk: int = 0,
    ) -> None:
        if step.precision != "fp32" or step.target_forward is not None:
            raise ValueError("the DP step runs the plain eager fp32 path: set train.precision fp32, perf.compile off")
        if step.cfg.target_norm != "layer_norm":  # a centred target mixes the batch's scans: no per-sample bound
            raise ConfigError(
                f"optim.target_norm: '{step.cfg.target_norm}' centres each target on the batch's other scans, so "
                "one scan's gradient depends on the others' and DP-SGD's per-sample clipping bounds nothing; "
                "use layer_norm with site-side DP"
            )
        self.step, self.expected_batch, self.chunk = step, expected_batch, chunk
        self.online = OnlineJEPA(step.models.encoder, step.models.predictor)
        plain_eager(self.online)
        self.grads = DPGradients(self.online, step.optimizer, noise_multiplier, max_grad_norm, generator)
        self.loss_of = jepa_sample_loss(step.cfg.loss)

    def __call__(self, x: torch.Tensor | None, masks: Masks | None, step: int) -> torch.Tensor:
        """x (b, R, T) of the Poisson-sampled subjects (None: nobody drawn). Returns the mean loss."""
        s = self.step
        point = schedule_at(s.cfg, step, s.total_steps)
        s.set_schedule(point)
        self.online.train()
        losses = []
        if x is not None and masks is not None and s.group is not None:  # this rank's rows of the draw
            rows = s.group.rows(len(x))
            x, masks = x[rows], masks.rows(rows)  # (b_rank, R, T)
        if x is not None and masks is not None and len(x):
            x, masks = x.to(s.device), masks.to(s.device)
            with torch.no_grad():
                y = jepa_targets(s.models, x, masks)  # (b, Nt, D)
            c = self.chunk or len(x)
            for i in range(0, len(x), c):
                part = slice(i, i + c)
                g, loss = per_sample_gradients(
                    self.online, self.loss_of, x[part], masks.context[part], masks.target[part], y[part]
                )
                self.grads.accumulate(g)
                losses.append(loss)
        loss = release(self.grads, self.expected_batch, s.group, losses, s.device)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.ema_update(point.momentum)
        return loss


class DownstreamForward(nn.Module):
    """`DownstreamModel.forward` without its data-dependent shortcut (vmap cannot branch on values): the
    backbone's tokens averaged over the observed ROIs' tokens (`masks.mean_observed`'s general case), then
    the head. The same function to float rounding."""

    def __init__(self, model: DownstreamModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, observed = split_missing(x)  # (B, R, T), (B, R)
        if m.recipe.frozen_backbone:
            m.backbone.eval()
            with torch.no_grad():
                h = m.backbone(x)  # (B, N, D)
        else:
            h = m.backbone(x)
        if m.recipe.pool != "mean":  # roi_std: per ROI mean + std over time, no data-dependent branch
            return m.classify(m.pool(h, observed))  # (B, out)
        w = observed.repeat_interleave(h.shape[1] // observed.shape[1], dim=1).to(h.dtype)  # (B, N)
        return m.head((h * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0))  # (B, out)


class DPDownstreamStep:
    """A fine-tuning / probing optimizer step under DP-SGD: per-sample gradients of the trained
    parameters (backbone + head, or the probe's head), clipped, summed, noised, divided by the expected
    batch size, then the step's AdamW at its LR schedule. Under DP, stochastic depth is off (vmap cannot
    draw a different in-place mask per sample) and the probe's BatchNorm runs on its initial statistics:
    batch statistics would mix samples, and learned running statistics would leave the site unprotected."""

    def __init__(
        self,
        step: DownstreamStep,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch: float,
        generator: torch.Generator,
        chunk: int = 0,
    ) -> None:
        self.step, self.expected_batch, self.chunk = step, expected_batch, chunk
        plain_eager(step.model)
        self.forward = DownstreamForward(step.model)
        self.grads = DPGradients(self.forward, step.optimizer, noise_multiplier, max_grad_norm, generator)

    def _train_mode(self) -> None:
        self.step.model.train()
        for m in self.step.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def __call__(self, x: torch.Tensor | None, y: torch.Tensor | None, step: int) -> torch.Tensor:
        """x (b, R, T), y (b,) of the Poisson-drawn subjects (None: nobody). Returns the mean loss."""
        s = self.step
        lr = lr_at(s.model.recipe, step, s.total_steps)
        for g in s.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self._train_mode()
        losses = []
        if x is not None and y is not None and s.group is not None:  # this rank's rows of the draw
            rows = s.group.rows(len(x))
            x, y = x[rows], y[rows]  # (b_rank, R, T), (b_rank,)
        if x is not None and y is not None and len(x):
            x, y = x.to(s.device), y.to(s.device)
            c = self.chunk or len(x)
            for i in range(0, len(x), c):
                g, loss = per_sample_gradients(
                    self.forward, lambda f, xi, yi: s.loss(f(xi), yi), x[i : i + c], y[i : i + c]
                )
                self.grads.accumulate(g)
                losses.append(loss)
        loss = release(self.grads, self.expected_batch, s.group, losses, s.device)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        return loss
