"""One site's local work in a round, without Flower: data, models, K JEPA steps, checksums.

The Flower ClientApp (`client.client_app`) only converts between messages and the tensors used here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brainjepa.config import ModelConfig, PretrainConfig, SiteRuntime, load_site
from brainjepa.data import BatchStream, pretraining_stream
from brainjepa.federation.contract import Metric, RoundSpec
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels, PretrainStep, resolve_device
from brainjepa.prefetch import Prefetcher
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum
from sites.cohort import load_cohort
from sites.config import SiteConfig
from sites.errors import DataError, InputError

log = logging.getLogger(__name__)


class RoundRefused(InputError):
    """The site will not train this round (checksum mismatch, bad config): the message says why."""


@dataclass
class SiteData:
    site: str
    stream: BatchStream
    n_subjects: int


def load_site_data(site: SiteConfig, cfg: PretrainConfig) -> SiteData:
    """The site's training split at the model TR, scaled, as deterministic batches: exactly what
    `brainjepa pretrain` reads for `data.site` = this site's YAML."""
    m = cfg.model
    check_rois(site, m)
    cohort = load_cohort(site, cfg.data.model_tr, min_frames=m.n_frames, scaling=cfg.data.scaling)
    stream = pretraining_stream(cohort, cfg)
    return SiteData(site.site, stream, len(stream.packed))


def check_rois(site: SiteConfig, m: ModelConfig) -> None:
    if site.n_rois != m.n_rois:
        raise RoundRefused(f"site config '{site.source}' declares {site.n_rois} ROIs, the federation's "
                           f"model expects model.n_rois={m.n_rois}")  # fmt: skip


def checked_gradients(gradient_file: Path, m: ModelConfig, expected: str) -> np.ndarray:
    """The site's gradient file, refused unless its checksum is the federation's (`expected`)."""
    try:
        grads = load_gradients(gradient_file, m.n_rois, m.gradient_components)
    except DataError as e:
        raise RoundRefused(str(e)) from e
    mine = gradient_checksum(grads)
    if mine != expected:
        raise RoundRefused(
            f"gradient file '{gradient_file}' has checksum {mine[:16]}..., the federation's gradient file has "
            f"{expected[:16]}...: this site must use the same gradient file as the server")  # fmt: skip
    return grads


def check_model(mine: str, spec: RoundSpec) -> None:
    """The site built the model the server did (`brainjepa.weights.model_checksum`), or it refuses."""
    if mine != spec.model_checksum:
        raise RoundRefused(f"model checksum {mine[:16]}... differs from the server's {spec.model_checksum[:16]}...: "
                           "site and server build different models (package versions or model config)")  # fmt: skip


def site_device(runtime: SiteRuntime) -> torch.device:
    try:
        return resolve_device(runtime.device)
    except InputError as e:
        raise RoundRefused(f"site device: {e}") from e


class SiteTrainer:
    """Models + AdamW of one site for one round (a fresh process per round: state comes from outside)."""

    def __init__(self, spec: RoundSpec, gradient_file: Path, runtime: SiteRuntime | None = None) -> None:
        runtime = runtime or SiteRuntime()
        cfg = spec.task_config
        m = cfg.model
        grads = checked_gradients(gradient_file, m, spec.gradient_checksum)
        self.spec = spec
        self.models = JEPAModels(m, torch.from_numpy(grads))
        check_model(model_checksum(m, self.modules), spec)
        dev = site_device(runtime)
        self.perf = runtime.perf
        self.step_fn = PretrainStep(self.models, cfg.optim, spec.total_steps, dev,
                                    activation_checkpointing=cfg.train.activation_checkpointing,
                                    perf=self.perf, precision=cfg.train.precision)  # fmt: skip

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {n: getattr(self.models, n) for n in WEIGHT_SETS}

    def sizes(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in mod.parameters()) for n, mod in self.modules.items()}

    def load_sets(self, sets: dict[str, torch.Tensor]) -> None:
        sizes = self.sizes()
        for name, n in sizes.items():
            if name not in sets or sets[name].numel() != n:
                got = tuple(sets[name].shape) if name in sets else "nothing"
                raise RoundRefused(f"weight set '{name}': expected {n} values, got {got}")
            load_flat_parameters(self.modules[name], sets[name].float())

    def sets(self) -> dict[str, torch.Tensor]:
        return {n: flat_parameters(mod) for n, mod in self.modules.items()}

    def train(self, data: SiteData) -> dict[str, float]:
        """K optimizer steps at global steps step_start.. (batch index = global step: resume-safe and,
        with one site, the very batches `brainjepa pretrain` uses)."""
        spec, accum = self.spec, self.spec.task_config.optim.accumulation_steps
        t0 = time.perf_counter()
        losses = []
        steps = range(spec.step_start, spec.step_start + spec.local_steps)
        batches = Prefetcher(lambda step: [data.stream[step * accum + a] for a in range(accum)], steps,
                             self.perf.prefetch, pin=self.step_fn.device.type == "cuda")  # fmt: skip
        for step, micro_batches in batches:
            losses.append(self.step_fn(micro_batches, step))
        values = torch.stack(losses).tolist()  # one host sync per round
        return {Metric.LOSS: sum(values) / len(values), Metric.LOSS_FIRST: values[0], Metric.LOSS_LAST: values[-1],
                Metric.LOCAL_STEPS: float(spec.local_steps), Metric.WALL_S: time.perf_counter() - t0,
                Metric.SAMPLES_SEEN: float(spec.local_steps * accum * spec.task_config.train.batch_size)}  # fmt: skip


def resolve_site(path: str | Path) -> tuple[SiteConfig, SiteRuntime]:
    """The site's YAML, read once: its data description and how it trains (a bad file refuses the round)."""
    try:
        return load_site(path)
    except InputError as e:
        raise RoundRefused(str(e)) from e
