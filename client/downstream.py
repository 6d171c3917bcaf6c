"""One site's downstream round without Flower: fine-tuning / probing steps, evaluation, label statistics.

The round record carries the task (`DownstreamTask`: task spec, recipe, model TR, scaling), the
backbone's model config and the target standardisation; the weights come as ONE flat vector, `model`
(`brainjepa.downstream.fit.state_vector` of the `DownstreamModel`), so the site never needs the
pretraining checkpoint, only the federation's gradient file (checked like pretraining's). The site
loads its own labelled scans (`load_labelled_site`: its own robust scaling, never sent) and then:

- `finetune` / `probe`: `site_round` (K AdamW steps at global steps `step-start..`, the run's schedule),
  the same function the in-process `fit(mode="federated")` runs; sends back the trained vector, its
  training scan count and the mean loss.
- `evaluate`: scores the received weights on its `split` (`split_metrics`); sends back only those
  metrics and the split's scan count, never per-scan predictions, labels or ids.
- `label-stats` (regression): the count, sum and centred sum of squares of its training labels.

With `privacy.enabled` in the site YAML, `finetune` / `probe` rounds run DP-SGD (`private_round`:
`brainjepa.privacy`, the same ledger and budget as pretraining; docs/privacy.md).

A site with `distributed.devices` runs its `finetune` rounds over that many processes (`site_work`,
`brainjepa.distributed`: rank 0's weights are sent). Probe rounds (a frozen backbone and a BatchNorm head
that needs the whole batch), evaluation and label statistics stay in one process.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainjepa.config import SiteRuntime
from brainjepa.distributed import RankGroup, launch, rank_devices
from brainjepa.downstream.data import LabelledSite, load_labelled_site
from brainjepa.downstream.fit import load_state_vector, site_round, state_vector
from brainjepa.downstream.model import Backbone, DownstreamModel
from brainjepa.downstream.train import DownstreamStep, TargetScale, split_metrics
from brainjepa.errors import InputError
from brainjepa.federation.contract import MODEL_SET, Metric, RoundSpec, eval_metric_key
from brainjepa.privacy.sampling import PoissonSubjects, generators
from brainjepa.weights import model_checksum
from client.training import (
    ROUND_ERRORS,
    RoundRefused,
    check_model,
    check_rois,
    checked_gradients,
    granted_round,
    scan_units,
    shared_seeds,
    site_device,
)
from sites.config import SiteConfig

# The architecture of each method without loading pretrained weights (they arrive in the round's vector).
UNLOADED = {"finetune": "scratch", "probe": "random_probe", "scratch": "scratch", "random_probe": "random_probe"}


class DownstreamSite:
    """A site's labelled data and the round's model, checked against the record (a fresh process per round)."""

    def __init__(
        self,
        spec: RoundSpec,
        site: SiteConfig,
        runtime: SiteRuntime,
        gradient_file: Path,
        group: RankGroup | None = None,
        seeds: tuple[int, int] | None = None,
    ) -> None:
        """`group`: this process is one rank of the round; `seeds`: the DP (sampling, noise) seeds (None:
        secret ones; tests set them to compare two runs)."""
        m = spec.model
        check_rois(site, m)
        self.grads = checked_gradients(gradient_file, m, spec.gradient_checksum)
        self.spec, self.name, self.device = spec, site.site, site_device(runtime, group)
        self.group, self.seeds = group, seeds
        self.site, self.privacy = site, runtime.privacy
        dt = spec.task_config
        self.task, self.recipe = dt.task, dt.recipe
        self.target = TargetScale(spec.target_center, spec.target_scale)
        self.data: LabelledSite = load_labelled_site(site, dt.task, dt.model_tr, m.n_frames, dt.scaling)

    def model(self, received: dict[str, torch.Tensor]) -> DownstreamModel:
        """The DownstreamModel with the received global weights (its layout checked against the server's)."""
        unloaded = dataclasses.replace(self.recipe, method=UNLOADED[self.recipe.method])
        model = DownstreamModel(Backbone(self.spec.model, self.grads, {}, "round record"), self.task, unloaded)
        model.recipe = self.recipe  # same architecture and training; the weights come from the vector
        check_model(model_checksum(self.spec.model, {MODEL_SET: model}), self.spec)
        vec = received.get(MODEL_SET)
        n = state_vector(model).numel()
        if vec is None or vec.ndim != 1 or vec.numel() != n:
            got = tuple(vec.shape) if vec is not None else "nothing"
            raise RoundRefused(f"weight set '{MODEL_SET}': expected {n} values, got {got}")
        load_state_vector(model, vec.float())
        return model.to(self.device)

    def train(self, received: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """K steps from the global weights: (the trained `model` vector, metrics)."""
        spec = self.spec
        model = self.model(received)
        t0 = time.perf_counter()
        dp: dict[str, float] = {}
        if self.privacy.enabled:
            loss, dp = self.private_round(model)
        else:
            loss = site_round(
                model,
                self.data,
                self.target,
                spec.step_start,
                spec.local_steps,
                spec.total_steps,
                spec.model.n_frames,
                self.device,
                self.group,
            )
        n = len(self.data.train)
        metrics = {
            **dp,
            Metric.LOSS: loss,
            Metric.LOCAL_STEPS: float(spec.local_steps),
            Metric.NUM_EXAMPLES: float(n),
            Metric.WALL_S: time.perf_counter() - t0,
            Metric.SAMPLES_SEEN: float(spec.local_steps * min(self.recipe.batch_size, n)),
            Metric.PROCESSES: float(self.group.world if self.group else 1),
        }
        return {MODEL_SET: state_vector(model).cpu()}, metrics

    def private_round(self, model: DownstreamModel) -> tuple[float, dict[str, float]]:
        """K DP-SGD steps (site YAML `privacy.enabled`) on Poisson-drawn subjects of the training split,
        granted against the site's ledger (or BudgetExhausted); (mean loss, the reply's privacy metrics)."""
        spec, privacy, train = self.spec, self.privacy, self.data.train
        units = scan_units(self.site, train.ids)
        expected = min(self.recipe.batch_size, int(units.max()) + 1)
        sampler = PoissonSubjects(train.packed(), units, expected, spec.model.n_frames)
        dp, sigma = granted_round(
            self.group, privacy, self.site.source, self.name, spec, self.recipe.seed, sampler.sample_rate
        )
        rng, noise = generators(shared_seeds(self.seeds, self.group))
        from brainjepa.privacy.dpsgd import DPDownstreamStep  # here: opacus costs ~0.8 s per round without DP

        step = DPDownstreamStep(
            DownstreamStep(model, self.task, spec.total_steps, self.target, self.device, train.y, self.group),
            sigma,
            privacy.max_grad_norm,
            expected,
            noise,
            privacy.clip_chunk,
        )
        losses = []
        for s in range(spec.step_start, spec.step_start + spec.local_steps):
            scans = sampler.draw_scans(rng)
            x, y = (sampler.windows(scans, rng), torch.from_numpy(train.y[scans])) if scans.size else (None, None)
            losses.append(step(x, y, s))
        values = [v for v in torch.stack(losses).tolist() if v == v]  # an empty draw has no loss (NaN)
        mean = sum(values) / len(values) if values else float("nan")
        return mean, (dp.commit() if dp is not None else {})  # rank 0 (or the only process) records the round

    def evaluate(self, received: dict[str, torch.Tensor]) -> dict[str, float]:
        """The split's metrics and scan count: all that leaves the site at evaluation."""
        split = self.data.splits[self.spec.split]
        if len(split) == 0:
            return {Metric.NUM_EXAMPLES: 0.0}
        model = self.model(received)
        scores = split_metrics(model, split, self.task, self.target, self.spec.model.n_frames, self.recipe.eval_windows)
        return {Metric.NUM_EXAMPLES: float(len(split)), **{eval_metric_key(k): float(v) for k, v in scores.items()}}

    def label_stats(self) -> dict[str, float]:
        """Regression: count, sum and centred sum of squares of the training labels (aggregates only)."""
        if self.task.kind != "regression":
            raise RoundRefused(
                f"label-stats round for task '{self.task.name}', a {self.task.kind}: only "
                "regression targets are standardised"
            )
        y = self.data.train.y.astype(np.float64)
        return {
            Metric.NUM_EXAMPLES: float(y.size),
            Metric.LABEL_SUM: float(y.sum()),
            Metric.LABEL_M2: float(((y - y.mean()) ** 2).sum()),
        }

    def run(self, received: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The round's work by task: (weight sets to send back, metrics)."""
        if self.spec.task in ("finetune", "probe"):
            return self.train(received)
        if self.spec.task == "evaluate":
            return {}, self.evaluate(received)
        return {}, self.label_stats()


@dataclass(frozen=True)
class DownstreamRound:
    """A downstream round's inputs at the site, picklable: what every rank of a group starts from."""

    spec: RoundSpec
    site: SiteConfig
    runtime: SiteRuntime
    grad_file: Path
    received: dict[str, torch.Tensor]
    seeds: tuple[int, int] | None = None


def site_work(job: DownstreamRound) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The round's work (`DownstreamSite.run`): a `finetune` round over the site's `distributed.devices`
    processes when it has several, everything else in this process."""
    cfg = job.runtime.distributed
    if job.spec.task != "finetune" or cfg.world == 1:
        return DownstreamSite(job.spec, job.site, job.runtime, job.grad_file, seeds=job.seeds).run(job.received)
    try:
        rank_devices(cfg, job.runtime.device)
    except InputError as e:
        raise RoundRefused(f"site config '{job.site.source}': {e}") from e
    return launch(downstream_rank, job, cfg, job.runtime.device, ROUND_ERRORS)


def downstream_rank(group: RankGroup, job: DownstreamRound) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One rank of a site's fine-tuning round (`brainjepa.distributed.launch`)."""
    return DownstreamSite(job.spec, job.site, job.runtime, job.grad_file, group, job.seeds).train(job.received)
