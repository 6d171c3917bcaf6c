"""One site's local work in a round, without Flower: data, models, K JEPA steps, checksums.

The Flower ClientApp (`client.client_app`) only converts between messages and the tensors used here.
A site YAML's `distributed.devices` runs the round over several processes (`SiteRound.run`, one per GPU
or gloo processes on a CPU, `brainjepa.distributed`): the same K steps on the same global batches, rank 0's
weights sent.
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

from brainjepa.config import ModelConfig, PretrainConfig, PrivacyConfig, SiteRuntime, load_site
from brainjepa.data import BatchStream, pretraining_stream
from brainjepa.distributed import RankGroup, launch, rank_devices
from brainjepa.errors import DataError, InputError
from brainjepa.federation.contract import SKETCH_LEVELS, SKETCH_QUANTILES, Metric, RoundSpec
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels, PretrainStep, resolve_device
from brainjepa.prefetch import Prefetcher
from brainjepa.privacy.budget import BudgetExhausted
from brainjepa.privacy.sampling import PoissonSubjects, generators, secret_seeds, unit_index
from brainjepa.privacy.session import PrivateRound, ledger_path, run_key
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum
from client.disk_state import load_state, save_state
from client.state import pack, restore
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


def site_device(runtime: SiteRuntime, group: RankGroup | None = None) -> torch.device:
    """The device this process trains on: the site's (`device`), or its rank's in a group."""
    if group is not None:
        return group.device
    try:
        return resolve_device(runtime.device)
    except InputError as e:
        raise RoundRefused(f"site device: {e}") from e


class SiteTrainer:
    """Models + AdamW of one site for one round (a fresh process per round: state comes from outside); with
    a `group`, one rank of the round (its device, its rows of every batch)."""

    def __init__(
        self, spec: RoundSpec, gradient_file: Path, runtime: SiteRuntime | None = None, group: RankGroup | None = None
    ) -> None:
        runtime = runtime or SiteRuntime()
        self.group = group
        cfg = spec.task_config
        m = cfg.model
        grads = checked_gradients(gradient_file, m, spec.gradient_checksum)
        self.spec = spec
        self.models = JEPAModels(m, torch.from_numpy(grads))
        check_model(model_checksum(m, self.modules), spec)
        dev = site_device(runtime, group)
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
            group=group,
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


def private_train(
    trainer: SiteTrainer, data: SiteData, site: SiteConfig, seeds: tuple[int, int] | None = None
) -> dict[str, float]:
    """The round under DP-SGD (site YAML `privacy.enabled`): granted against the site's ledger (or
    `BudgetExhausted`), K steps on Poisson-drawn subjects, then recorded on the site's disk and reported.
    `seeds` (sampling, noise): secret ones drawn here when None (tests give them to compare two runs); over
    several processes rank 0's are every rank's, and rank 0 alone records the round."""
    spec, cfg, privacy = trainer.spec, trainer.spec.task_config, trainer.privacy
    expected = cfg.train.batch_size * cfg.optim.accumulation_steps
    assert data.units is not None
    try:
        sampler = PoissonSubjects(
            data.stream.packed, data.units, expected, cfg.model.n_frames, cfg.model.patch_size, cfg.mask
        )
    except ValueError as e:
        raise RoundRefused(f"site '{site.source}': {e}") from e
    dp, sigma = granted_round(trainer.group, privacy, site.source, site.site, spec, cfg.train.seed, sampler.sample_rate)
    from brainjepa.privacy.dpsgd import DPPretrainStep  # here: opacus costs ~1.4 s in every round's process

    rng, noise = generators(shared_seeds(seeds, trainer.group))
    step = DPPretrainStep(trainer.step_fn, sigma, privacy.max_grad_norm, expected, noise, privacy.clip_chunk)
    t0 = time.perf_counter()
    losses = [step(*sampler.draw(rng), s) for s in range(spec.step_start, spec.step_start + spec.local_steps)]
    values = [v for v in torch.stack(losses).tolist() if v == v]  # an empty draw has no loss (NaN)
    if dp is None:  # a rank other than 0: rank 0 alone records the round
        return {}
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


def granted_round(
    group: RankGroup | None,
    privacy: PrivacyConfig,
    site_yaml: Path,
    name: str,
    spec: RoundSpec,
    seed: int,
    sample_rate: float,
) -> tuple[PrivateRound | None, float]:
    """(the round granted against site `name`'s ledger, its noise multiplier): the only process, or rank 0,
    opens the ledger (it may write the run's calibrated noise to it); the other ranks get the noise
    multiplier from rank 0 and no round (None). A refusal (BudgetExhausted) ends rank 0, and the round.
    The run is known in the ledger by its task, model, gradients, length and `seed`."""
    dp = None
    if group is None or group.rank == 0:
        dp = PrivateRound.open(
            privacy,
            ledger_path(privacy, site_yaml, name),
            name,
            run_key(spec.task, spec.model_checksum, spec.gradient_checksum, spec.total_steps, seed),
            spec.task,
            spec.round,
            sample_rate,
            spec.local_steps,
            spec.total_steps - spec.step_start,
        )
    sigma = dp.noise_multiplier if dp is not None else 0.0
    return dp, sigma if group is None else group.broadcast_floats([sigma])[0]


def shared_seeds(seeds: tuple[int, int] | None, group: RankGroup | None) -> tuple[int, int]:
    """The DP round's (sampling, noise) seeds: given, or secret; in a group, rank 0's on every rank."""
    seeds = seeds or secret_seeds()
    return seeds if group is None else tuple(group.broadcast_ints(seeds))  # type: ignore[return-value]


# Errors a rank raises that end the round as themselves (a refusal, a declined budget), not as a failure
ROUND_ERRORS = (InputError, BudgetExhausted)


@dataclass
class SiteRound:
    """A pretraining round's inputs at the site, picklable: what every rank of a group starts from."""

    spec: RoundSpec
    site: SiteConfig
    runtime: SiteRuntime
    grad_file: Path
    received: dict[str, torch.Tensor]
    optimizer: dict | None  # `client.state.pack` of the run's context (None: a fresh run)
    scaling: RobustScaling | None = None
    seeds: tuple[int, int] | None = None  # DP (sampling, noise) seeds; None: secret (tests set them)

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
        """(weight sets, metrics, the optimizer's `pack` after the round), in this process or over the
        site's `distributed.devices` processes."""
        if self.runtime.distributed.world == 1:
            return self.train()
        try:
            rank_devices(self.runtime.distributed, self.runtime.device)
        except InputError as e:
            raise RoundRefused(f"site config '{self.site.source}': {e}") from e
        return launch(site_rank, self, self.runtime.distributed, self.runtime.device, ROUND_ERRORS)

    def train(self, group: RankGroup | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
        """K JEPA steps from the received sets, AdamW moments from the context (or the site's disk: a resumed
        coordinator's new run); the data scaled with the federation's `scaling`, or the site's own."""
        spec, site = self.spec, self.site
        trainer = SiteTrainer(spec, self.grad_file, self.runtime, group)
        trainer.load_sets(self.received)
        optimizer = trainer.step_fn.optimizer
        rounds_done = restore(self.optimizer, optimizer, spec.model_checksum) or load_state(site, spec, optimizer)
        data = load_site_data(site, spec.task_config, self.scaling)
        if self.runtime.privacy.enabled:
            metrics = private_train(trainer, data, site, self.seeds)
        else:
            metrics = trainer.train(data)
        if group is None or group.rank == 0:
            save_state(site, spec, optimizer, rounds_done + 1)
        metrics.update(
            {
                Metric.NUM_EXAMPLES: float(data.n_subjects),
                Metric.ROUNDS_DONE: float(rounds_done + 1),
                Metric.PROCESSES: float(group.world if group else 1),
            }
        )
        return trainer.sets(), metrics, pack(optimizer, spec.model_checksum, rounds_done + 1)


def site_rank(group: RankGroup, job: SiteRound) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """One rank of a site's pretraining round (`brainjepa.distributed.launch`)."""
    return job.train(group)


def resolve_site(path: str | Path) -> tuple[SiteConfig, SiteRuntime]:
    """The site's YAML, read once: its data description and how it trains (a bad file refuses the round)."""
    try:
        return load_site(path)
    except InputError as e:
        raise RoundRefused(str(e)) from e
