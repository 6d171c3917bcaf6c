"""One site's local work in a round, without Flower: data, models, K JEPA steps, checksums.

The Flower ClientApp (`client.client_app`) only converts between messages and the tensors used here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from brainjepa.config import PerfConfig, PretrainConfig
from brainjepa.data import BatchStream, pack_cohort
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.prefetch import Prefetcher
from brainjepa.pretrain import load_cohort, resolve_device
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum  # noqa: F401
from sites.config import SiteConfig, load_site_config
from sites.errors import DataError, InputError
from sites.schema import from_mapping

log = logging.getLogger(__name__)



class RoundRefused(InputError):
    """The site will not train this round (checksum mismatch, bad config): the message says why."""


@dataclass(frozen=True)
class RoundSpec:
    """What the server asked for (decoded from the message's config record)."""

    round: int
    step_start: int
    total_steps: int
    local_steps: int
    wire_dtype: str
    model_checksum: str
    gradient_checksum: str
    pretrain: PretrainConfig

    @classmethod
    def from_config(cls, conf: dict) -> RoundSpec:
        try:
            pcfg = from_mapping(PretrainConfig, json.loads(str(conf["pretrain-config"])), "<the server's round config>")
            return cls(int(conf["round"]), int(conf["step-start"]), int(conf["total-steps"]),
                       int(conf["local-steps"]), str(conf["wire-dtype"]), str(conf["model-checksum"]),
                       str(conf["gradient-checksum"]), pcfg)  # fmt: skip
        except KeyError as e:
            raise RoundRefused(f"the round's config record lacks {e}: server and site run different versions") from e


@dataclass
class SiteData:
    site: str
    stream: BatchStream
    n_subjects: int


def load_site_data(site_cfg: SiteConfig, pcfg: PretrainConfig) -> SiteData:
    """The site's training split at the model TR, scaled, as deterministic batches: exactly what
    `brainjepa pretrain` reads for `data.site` = this site's YAML (`brainjepa.pretrain.load_cohort`)."""
    m = pcfg.model
    if site_cfg.n_rois != m.n_rois:
        raise RoundRefused(f"site config '{site_cfg.source}' declares {site_cfg.n_rois} ROIs, the federation's "
                           f"model expects model.n_rois={m.n_rois}")  # fmt: skip
    local = dataclasses.replace(pcfg, data=dataclasses.replace(pcfg.data, site=str(site_cfg.source), roi_dir=""))
    cohort = load_cohort(local)
    packed = pack_cohort(cohort.series, cohort.subject_ids, m.n_frames)
    stream = BatchStream(packed, m.n_frames, m.patch_size, pcfg.train.batch_size, pcfg.mask, pcfg.train.seed)
    return SiteData(site_cfg.site, stream, len(packed))


class SiteTrainer:
    """Models + AdamW of one site for one round (a fresh process per round: state comes from outside)."""

    def __init__(self, spec: RoundSpec, gradient_file: Path, device: str = "cpu", perf: PerfConfig | None = None) -> None:
        m = spec.pretrain.model
        try:
            grads = load_gradients(gradient_file, m.n_rois, m.gradient_components)
        except DataError as e:
            raise RoundRefused(str(e)) from e
        mine = gradient_checksum(grads)
        if mine != spec.gradient_checksum:
            raise RoundRefused(
                f"gradient file '{gradient_file}' has checksum {mine[:16]}..., the federation's gradient file has "
                f"{spec.gradient_checksum[:16]}...: this site must use the same gradient file as the server")  # fmt: skip
        self.spec = spec
        self.models = JEPAModels(m, torch.from_numpy(grads))
        mine = model_checksum(m, self.modules)
        if mine != spec.model_checksum:
            raise RoundRefused(f"model checksum {mine[:16]}... differs from the server's {spec.model_checksum[:16]}...: "
                               "site and server build different models (package versions or model config)")  # fmt: skip
        try:
            dev = resolve_device(device)
        except InputError as e:
            raise RoundRefused(f"site device: {e}") from e
        self.perf = perf or PerfConfig()
        self.step_fn = PretrainStep(self.models, spec.pretrain.optim, spec.total_steps, dev,
                                    activation_checkpointing=spec.pretrain.train.activation_checkpointing,
                                    perf=self.perf, precision=spec.pretrain.train.precision)  # fmt: skip

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
        spec, accum = self.spec, self.spec.pretrain.optim.accumulation_steps
        t0 = time.perf_counter()
        losses = []
        steps = range(spec.step_start, spec.step_start + spec.local_steps)
        batches = Prefetcher(lambda step: [data.stream[step * accum + a] for a in range(accum)], steps,
                             self.perf.prefetch, pin=self.step_fn.device.type == "cuda")  # fmt: skip
        for step, micro_batches in batches:
            losses.append(self.step_fn(micro_batches, step))
        values = torch.stack(losses).tolist()  # one host sync per round
        return {"loss": sum(values) / len(values), "loss-first": values[0], "loss-last": values[-1],
                "local-steps": float(spec.local_steps), "wall-s": time.perf_counter() - t0,
                "samples-seen": float(spec.local_steps * accum * spec.pretrain.train.batch_size)}  # fmt: skip


def resolve_site_config(path: str | Path) -> SiteConfig:
    try:
        return load_site_config(path)
    except InputError as e:
        raise RoundRefused(str(e)) from e
