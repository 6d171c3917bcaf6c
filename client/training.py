"""One site's local work in a round, without Flower: data, models, K JEPA steps, checksums.

The Flower ClientApp (`client.client_app`) only converts between messages and the tensors used here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brainjepa.config import ModelConfig, PretrainConfig, SiteRuntime, load_site
from brainjepa.data import BatchStream, pretraining_stream
from brainjepa.errors import DataError, InputError
from brainjepa.federation.contract import SKETCH_LEVELS, SKETCH_QUANTILES, Metric, RoundSpec
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels, PretrainStep, resolve_device
from brainjepa.prefetch import Prefetcher
from brainjepa.privacy.sampling import PoissonSubjects, secret_generators, unit_index
from brainjepa.privacy.session import PrivateRound, ledger_path, run_key
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum
from sites.cohort import check_spread, load_cohort
from sites.config import SiteConfig
from sites.layout import read_site_participants, subject_column
from sites.scaling import RobustScaling
from sites.scaling_sketch import summarize

log = logging.getLogger(__name__)


class RoundRefused(InputError):
    """The site will not train this round (checksum mismatch, bad config): the message says why."""


@dataclass
class SiteData:
    site: str
    stream: BatchStream
    n_subjects: int  # training scans (series)
    units: np.ndarray | None = None  # (N,) privacy unit (subject) index of each scan, for DP sampling


def load_site_data(site: SiteConfig, cfg: PretrainConfig, scaling: RobustScaling | None = None) -> SiteData:
    """The site's training split at the model TR, scaled, as deterministic batches: exactly what
    `brainjepa pretrain` reads for `data.site` = this site's YAML (its own statistics), or scaled with
    the federation's `scaling` (run config `scaling-scope = "federation"`)."""
    m = cfg.model
    check_rois(site, m)
    if scaling is None:
        cohort = load_cohort(site, cfg.data.model_tr, min_frames=m.n_frames, scaling=cfg.data.scaling)
    else:
        raw = load_cohort(site, cfg.data.model_tr, min_frames=m.n_frames, scaling="none", for_model=False)
        n_rois = raw.series[0].shape[0]
        if scaling.n_rois != n_rois:
            raise RoundRefused(
                f"federation scaling has statistics for {scaling.n_rois} ROIs, this site's data "
                f"'{site.source}' has {n_rois} ROIs"
            )
        series = scaling.apply_all(raw.series)
        check_spread(series, raw.source, "robust")
        cohort = dataclasses.replace(raw, series=series, scaling=scaling)
    stream = pretraining_stream(cohort, cfg)
    return SiteData(site.site, stream, len(stream.packed), scan_units(site, cohort.subject_ids))


def scan_units(site: SiteConfig, scan_ids: list[str]) -> np.ndarray:
    """(N,) the privacy unit of each scan: its subject (`participants.subject_column`, when a subject has
    several scans), else the scan's own participant id (one scan per subject)."""
    column = subject_column(site)  # participants.subject_column, or the id column with participants.runs
    if column is None:
        return unit_index(scan_ids)
    parts = read_site_participants(site)
    subject = dict(zip(parts.ids, (str(g) for g in parts.column(column)), strict=True))
    return unit_index([subject.get(i, i) for i in scan_ids])


def site_sketch(site: SiteConfig, cfg: PretrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """scaling-stats round: the quantile sketch of the training subjects' per-ROI time-means at the model
    TR, unscaled (`sites.scaling_sketch.summarize`), and the subject count: all that leaves the site."""
    m = cfg.model
    check_rois(site, m)
    if cfg.data.scaling != "robust":
        raise RoundRefused(
            f"scaling-stats round with data.scaling '{cfg.data.scaling}': only the reference "
            "('robust') scaling has a federation-wide sketch"
        )
    raw = load_cohort(site, cfg.data.model_tr, min_frames=m.n_frames, scaling="none", for_model=False)
    sketch = summarize(raw.series, site.site)
    arrays = {
        SKETCH_LEVELS: torch.from_numpy(sketch.levels.astype(np.float64)),
        SKETCH_QUANTILES: torch.from_numpy(sketch.quantiles.astype(np.float64)),
    }
    return arrays, {Metric.NUM_EXAMPLES: float(sketch.n_subjects)}


def check_rois(site: SiteConfig, m: ModelConfig) -> None:
    if site.n_rois != m.n_rois:
        raise RoundRefused(
            f"site config '{site.source}' declares {site.n_rois} ROIs, the federation's "
            f"model expects model.n_rois={m.n_rois}"
        )


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
            f"{expected[:16]}...: this site must use the same gradient file as the server"
        )
    return grads


def check_model(mine: str, spec: RoundSpec) -> None:
    """The site built the model the server did (`brainjepa.weights.model_checksum`), or it refuses."""
    if mine != spec.model_checksum:
        raise RoundRefused(
            f"model checksum {mine[:16]}... differs from the server's {spec.model_checksum[:16]}...: "
            "site and server build different models (package versions or model config)"
        )


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
        self.perf, self.privacy = runtime.perf, runtime.privacy
        private = self.privacy.enabled  # the DP path is the plain eager fp32 step
        perf = dataclasses.replace(self.perf, compile=False, cuda_graphs=False) if private else self.perf
        self.step_fn = PretrainStep(
            self.models,
            cfg.optim,
            spec.total_steps,
            dev,
            activation_checkpointing=cfg.train.activation_checkpointing and not private,
            perf=perf,
            precision="fp32" if private else cfg.train.precision,
        )

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
            # a private copy on the step's device: the parameters become views of it (load_flat_parameters),
            # so training must not write into `sets`, the base the site's uplink deltas are taken against
            load_flat_parameters(self.modules[name], sets[name].to(self.step_fn.device, torch.float32, copy=True))

    def sets(self) -> dict[str, torch.Tensor]:
        return {n: flat_parameters(mod) for n, mod in self.modules.items()}

    def train(self, data: SiteData) -> dict[str, float]:
        """K optimizer steps at global steps step_start.. (batch index = global step: resume-safe and,
        with one site, the very batches `brainjepa pretrain` uses)."""
        spec, accum = self.spec, self.spec.task_config.optim.accumulation_steps
        t0 = time.perf_counter()
        losses = []
        steps = range(spec.step_start, spec.step_start + spec.local_steps)
        batches = Prefetcher(
            lambda step: [data.stream[step * accum + a] for a in range(accum)],
            steps,
            self.perf.prefetch,
            pin=self.step_fn.device.type == "cuda",
        )
        for step, micro_batches in batches:
            losses.append(self.step_fn(micro_batches, step))
        values = torch.stack(losses).tolist()  # one host sync per round
        return {
            Metric.LOSS: sum(values) / len(values),
            Metric.LOSS_FIRST: values[0],
            Metric.LOSS_LAST: values[-1],
            Metric.LOCAL_STEPS: float(spec.local_steps),
            Metric.WALL_S: time.perf_counter() - t0,
            Metric.SAMPLES_SEEN: float(spec.local_steps * accum * spec.task_config.train.batch_size),
        }


def private_train(trainer: SiteTrainer, data: SiteData, site: SiteConfig) -> dict[str, float]:
    """The round under DP-SGD (site YAML `privacy.enabled`): granted against the site's ledger (or
    `BudgetExhausted`), K steps on Poisson-drawn subjects, then recorded on the site's disk and reported."""
    spec, cfg, privacy = trainer.spec, trainer.spec.task_config, trainer.privacy
    expected = cfg.train.batch_size * cfg.optim.accumulation_steps
    assert data.units is not None
    try:
        sampler = PoissonSubjects(
            data.stream.packed, data.units, expected, cfg.model.n_frames, cfg.model.patch_size, cfg.mask
        )
    except ValueError as e:
        raise RoundRefused(f"site '{site.source}': {e}") from e
    dp = PrivateRound.open(
        privacy,
        ledger_path(privacy, site.source, site.site),
        site.site,
        run_key(spec.task, spec.model_checksum, spec.gradient_checksum, spec.total_steps, cfg.train.seed),
        spec.task,
        spec.round,
        sampler.sample_rate,
        spec.local_steps,
        spec.total_steps - spec.step_start,
    )
    from brainjepa.privacy.dpsgd import DPPretrainStep  # here: opacus costs ~1.4 s in every round's process

    rng, noise = secret_generators()
    step = DPPretrainStep(
        trainer.step_fn, dp.noise_multiplier, privacy.max_grad_norm, expected, noise, privacy.clip_chunk
    )
    t0 = time.perf_counter()
    losses = [step(*sampler.draw(rng), s) for s in range(spec.step_start, spec.step_start + spec.local_steps)]
    values = [v for v in torch.stack(losses).tolist() if v == v]  # an empty draw has no loss (NaN)
    metrics = dp.commit()
    log.info(
        "site %s: DP round %d, epsilon %.3f of %s (noise multiplier %.3g, sampling rate %.3g)",
        site.site,
        spec.round + 1,
        metrics[Metric.EPSILON_SPENT],
        privacy.target_epsilon,
        dp.noise_multiplier,
        sampler.sample_rate,
    )
    mean = sum(values) / len(values) if values else float("nan")
    metrics.update(
        {
            Metric.LOSS: mean,
            Metric.LOSS_FIRST: values[0] if values else mean,
            Metric.LOSS_LAST: values[-1] if values else mean,
            Metric.LOCAL_STEPS: float(spec.local_steps),
            Metric.WALL_S: time.perf_counter() - t0,
            Metric.SAMPLES_SEEN: float(spec.local_steps * expected),
        }
    )
    return metrics


def resolve_site(path: str | Path) -> tuple[SiteConfig, SiteRuntime]:
    """The site's YAML, read once: its data description and how it trains (a bad file refuses the round)."""
    try:
        return load_site(path)
    except InputError as e:
        raise RoundRefused(str(e)) from e
