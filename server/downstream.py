"""One federated downstream run on the server: fine-tuning or linear probing of a pretrained backbone.

The computation of `brainjepa.downstream.fit.fit(mode="federated")`, over Flower: the same initial model
(seeded as `fit` seeds it, then `DownstreamModel` on the checkpoint's target encoder), rounds of
`local-steps` optimizer steps at each sampled site (`site_round` there) until `recipe.steps`, FedAvg of
the `model` vectors weighted by training scans (`RunningMean`), an `evaluate` round on `val` at each
round that reaches an `eval_every` point (every site's metrics, scan-weighted), the best weights by
the primary metric kept, and one `evaluate` round on `test` with them. Regression targets are
standardised with the pooled training labels' mean and standard deviation, formed from each site's
count, sum and centred sum of squares (a `label-stats` round first).

Outputs in the run folder: `site_metrics.csv` (training rounds, per site), `downstream_metrics.csv`
(each validation: round, step, loss, scan-weighted metrics, whether selected), `test_metrics.json`
(per site and weighted) and `downstream.pt` (the selected model, kind="downstream", rewritten
atomically whenever the selection changes and at the end).

A site whose reply is rejected (an update outside its bounds, a malformed evaluation) is quarantined as
in pretraining (`server.guard`, `quarantine.json`): not asked again for training, validation or test, so
it cannot steer which weights are selected.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.serverapp import Grid

from brainjepa.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from brainjepa.config import to_dict
from brainjepa.downstream.config import DownstreamTask
from brainjepa.downstream.fit import init_seed, load_state_vector, reaches_eval_point, state_vector
from brainjepa.downstream.metrics import METRICS, PRIMARY, is_better
from brainjepa.downstream.model import Backbone, DownstreamModel, load_backbone
from brainjepa.downstream.train import TargetScale, weighted_metrics
from brainjepa.errors import ConfigError
from brainjepa.federation.contract import MODEL_SET, Metric, RoundSpec, eval_metric_key, eval_metrics
from brainjepa.gradients import gradient_checksum
from brainjepa.weights import model_checksum
from server.aggregate import RunningMean, SiteUpdate, check_update
from server.audit import AuditLog
from server.bounds import SetBound, adam_reach, check_bounds, distance_bound
from server.config import FederationConfig, load_downstream_task, to_run_config
from server.exchange import SiteResult, exchange, ok_updates, save_update, site_row
from server.guard import UpdateGuard
from server.privacy_report import PrivacyReport
from server.registry import RegisteredSite, read_registry
from server.report import SITE_FIELDS, append_rows, new_run_dir

log = logging.getLogger(__name__)

CHECKPOINT = "downstream.pt"


def pretraining_data(checkpoint: str | Path) -> dict[str, object]:
    """The pretraining run's model TR and scaling (the downstream data window), where its checkpoint has them."""
    data = load_checkpoint(checkpoint).get("config", {}).get("data", {})
    return {k: data[k] for k in ("model_tr", "scaling") if k in data}


def check_evaluation(update: SiteUpdate, kind: str) -> str | None:
    """Why an evaluation reply is unusable (weights in it, a metric missing, a bad scan count), or None."""
    if not (isinstance(update.num_examples, int) and update.num_examples >= 0):
        return f"num-examples must be a count, got {update.num_examples!r}"
    if update.sets:
        return f"an evaluation reply carries no weights, got {sorted(update.sets)}"
    missing = [m for m in METRICS[kind] if update.num_examples and eval_metric_key(m) not in update.metrics]
    return f"metrics missing: {missing}" if missing else None


def pooled_target(stats: list[tuple[int, float, float]]) -> TargetScale:
    """TargetScale from the sites' (count, label sum, centred sum of squares): the pooled mean and
    population standard deviation, as `TargetScale.of` computes them over all training labels."""
    n = sum(c for c, _, _ in stats)
    mean = sum(s for _, s, _ in stats) / n
    m2 = sum(m + c * (s / c - mean) ** 2 for c, s, m in stats if c)
    return TargetScale(mean, math.sqrt(m2 / n) or 1.0)


def head_weights(model: DownstreamModel) -> torch.Tensor:
    """Indices of the head's trained weights in the model's state vector (`state_vector`; BatchNorm
    statistics are not weights), so that a head is bounded apart from the far larger backbone."""
    params, index, offset = {id(p) for p in model.head.parameters()}, [], 0
    for v in model.state_dict(keep_vars=True).values():  # keep_vars: the Parameter objects themselves
        if v.is_floating_point():
            if id(v) in params:
                index.append(torch.arange(offset, offset + v.numel()))
            offset += v.numel()
    return torch.cat(index)


@dataclass
class DownstreamRun:
    cfg: FederationConfig
    dtask: DownstreamTask
    backbone: Backbone
    model: DownstreamModel  # the layout of the global vector; holds the selected weights when saved
    run_dir: Path
    target: TargetScale = TargetScale()
    best: tuple[torch.Tensor, dict[str, float], int] | None = None  # (vector, val metrics, step)
    registry: dict[int, RegisteredSite] = field(default_factory=dict)  # node id -> registered site (caps)
    audit: AuditLog | None = None  # the run's audit.jsonl (joins, each round's verdicts, checkpoint hashes)
    guard: UpdateGuard | None = None  # the quarantine of sites whose replies were rejected

    @classmethod
    def create(cls, cfg: FederationConfig, run_id: int = 0) -> DownstreamRun:
        if cfg.resume_dir or cfg.strategy != "fedavg":
            raise ConfigError(
                "run config: downstream runs average with strategy 'fedavg' and do not resume "
                f"(got strategy '{cfg.strategy}', resume-dir '{cfg.resume_dir}')"
            )
        backbone = load_backbone(cfg.checkpoint)
        dtask = load_downstream_task(cfg.downstream_config, pretraining_data(cfg.checkpoint))
        kind = "probe" if dtask.recipe.frozen_backbone else "finetune"
        if cfg.task != kind:
            raise ConfigError(
                f"run config 'task': '{cfg.task}', but recipe method '{dtask.recipe.method}' in "
                f"'{cfg.downstream_config}' is a {kind} run"
            )
        r = dtask.recipe  # seeded as `fit` does: the same head (and untrained backbone) initialisation
        torch.manual_seed(init_seed(r))
        model = DownstreamModel(backbone, dtask.task, dtask.recipe)
        registry = read_registry(cfg.site_registry) if cfg.site_registry else {}
        run_dir = new_run_dir(cfg.out_dir, run_id)
        audit = AuditLog(run_dir, registry)
        audit.start(to_run_config(cfg), 0)
        guard = UpdateGuard(cfg, run_dir, registry, audit)
        return cls(cfg, dtask, backbone, model, run_dir, registry=registry, audit=audit, guard=guard)

    @property
    def kind(self) -> str:
        return self.dtask.task.kind

    @property
    def num_rounds(self) -> int:
        return math.ceil(self.dtask.recipe.steps / self.cfg.local_steps)

    def spec(self, task: str, rnd: int, start: int = 0, n: int = 1, split: str = "") -> RoundSpec:
        return RoundSpec(
            task=task,
            round=rnd,
            num_rounds=self.num_rounds,
            step_start=start,
            local_steps=n,  # type: ignore[arg-type]
            wire_dtype=self.cfg.wire_dtype,
            model_checksum=model_checksum(self.backbone.model, {MODEL_SET: self.model}),
            gradient_checksum=gradient_checksum(self.backbone.gradients),
            task_config=self.dtask,
            model_config=self.backbone.model,
            target_center=self.target.center,
            target_scale=self.target.scale,
            split=split,  # type: ignore[arg-type]
        )

    def log_start(self) -> None:
        r, t = self.dtask.recipe, self.dtask.task
        log.info(
            "federated downstream %s of task '%s' (%s, column '%s'): %d steps in %d rounds x %d local steps, "
            "validation every %d steps; backbone %s (%s); %d values in the weight vector",
            r.method,
            t.name,
            t.kind,
            t.column,
            r.steps,
            self.num_rounds,
            self.cfg.local_steps,
            r.eval_every,
            self.backbone.source,
            self.backbone.model.size,
            state_vector(self.model).numel(),
        )
        log.info("run folder: %s", self.run_dir)

    def execute(self, grid: Grid) -> Path:
        r, k = self.dtask.recipe, self.cfg.local_steps
        if self.kind == "regression":
            self.target = self.label_stats(grid)
        vec = state_vector(self.model)
        train_task = "probe" if r.frozen_backbone else "finetune"
        for rnd in range(self.num_rounds):
            start = rnd * k
            n = min(k, r.steps - start)
            vec, loss = self.train_round(grid, self.spec(train_task, rnd, start, n), vec)
            done = start + n
            if reaches_eval_point(r, done, n):  # as `fit`
                self.validate(grid, rnd, done, loss, vec)
        assert self.best is not None
        per_site, weighted = self.evaluate(grid, self.num_rounds - 1, "test", self.best[0])
        test = {
            "step": self.best[2],
            "sites": {s: {**m, "n": n} for s, (m, n) in per_site.items()},
            "weighted": weighted,
        }
        atomic_write_text(self.run_dir / "test_metrics.json", json.dumps(test, indent=1))
        self.save(test)
        primary = PRIMARY[self.kind]
        log.info(
            "test (weights of step %d): %s %.4f over %d scans",
            self.best[2],
            primary,
            weighted[primary],
            int(weighted["n"]),
        )
        log.info("outputs under %s", self.run_dir)
        return self.run_dir

    def exchange(
        self,
        grid: Grid,
        spec: RoundSpec,
        sets: dict[str, torch.Tensor],
        accept: Callable[[SiteResult], None],
        message_type: str = "train",
    ) -> list[SiteResult]:
        """`server.exchange.exchange` without the quarantined sites: a reply under a quarantined name is
        refused, and the sites rejected here are quarantined. Evaluations ask every other site."""
        assert self.guard is not None
        guard, rnd = self.guard, spec.round
        exclude, why = guard.exclusion(rnd)

        def checked(res: SiteResult) -> None:
            held = guard.quarantine.holds(guard.label(res), rnd + 1) if res.status == "ok" else None
            if held:
                res.status, res.detail, res.update = "rejected", held, None
            accept(res)

        fraction = None if message_type == "train" else 1.0
        results = exchange(grid, self.cfg, spec, sets, checked, fraction, message_type, exclude=exclude, why=why)
        guard.after_exchange(rnd, results)
        return results

    def label_stats(self, grid: Grid) -> TargetScale:
        stats: list[tuple[int, float, float]] = []

        def accept(res: SiteResult) -> None:
            u = res.update
            if res.status == "ok" and u is not None:
                if u.num_examples < 1 or u.sets or {Metric.LABEL_SUM, Metric.LABEL_M2} - set(u.metrics):
                    res.status, res.detail = "rejected", "label-stats reply needs num-examples >= 1, sums, no weights"
                else:
                    stats.append((u.num_examples, u.metrics[Metric.LABEL_SUM], u.metrics[Metric.LABEL_M2]))

        results = self.exchange(grid, self.spec("label-stats", 0), {}, accept, "evaluate")
        ok_updates(results, self.cfg.min_sites, "label-stats round")
        target = pooled_target(stats)
        log.info(
            "regression target from %d sites' label sums: center %.4g, scale %.4g",
            len(stats),
            target.center,
            target.scale,
        )
        return target

    def train_round(self, grid: Grid, spec: RoundSpec, vec: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One FedAvg round: the new global vector and the sites' mean loss (unweighted, as `fit` reports)."""
        t0 = time.perf_counter()
        mean = RunningMean()
        label = f"{spec.task}-round-{spec.round + 1:03d}"
        head = head_weights(self.model)
        current = {MODEL_SET: vec, "head": vec[head]}
        r = self.dtask.recipe
        lr = r.probe_lr if r.frozen_backbone else r.lr
        bounds = {
            MODEL_SET: SetBound(distance_bound(vec, self.cfg.max_update_ratio)),
            "head": SetBound(
                max(
                    distance_bound(vec[head], self.cfg.max_update_ratio), adam_reach(head.numel(), lr, spec.local_steps)
                )
                if self.cfg.max_update_ratio > 0
                else math.inf
            ),
        }

        def accept(res: SiteResult) -> None:
            if res.status != "ok" or res.update is None:
                return
            reg = self.registry.get(res.node_id)
            caps = [c for c in (self.cfg.max_site_samples, reg.max_samples if reg else 0) if c > 0]
            reason = check_update(res.update, {MODEL_SET: vec.numel()}, max_samples=min(caps) if caps else 0)
            if reason is None:
                site = res.update.sets[MODEL_SET]
                reason = check_bounds({MODEL_SET: site, "head": site[head]}, current, bounds)
            if reason:
                res.status, res.detail = "rejected", reason
                log.warning("%s: update of site %s rejected: %s", label, res.site, reason)
            else:
                mean.add(res.update.sets, res.update.num_examples)
            if self.cfg.save_updates:
                save_update(self.run_dir, label, res)
            res.update.sets = {}  # memory: one site's weights at a time

        results = self.exchange(grid, spec, {MODEL_SET: vec}, accept)
        append_rows(self.run_dir / "site_metrics.csv", SITE_FIELDS, [site_row(spec.round, r) for r in results])
        if self.audit is not None:
            self.audit.round(spec.round + 1, spec.task, results)
        PrivacyReport(self.run_dir, secure_aggregation=False).update(spec.round, results, None)  # the sites' DP figures
        ok = ok_updates(results, self.cfg.min_sites, label)
        loss = sum(u.metrics[Metric.LOSS] for u in ok) / len(ok)
        log.info(
            "%s (steps %d-%d) done in %.1f s: loss %.4f, %d site(s) ok",
            label,
            spec.step_start,
            spec.step_start + spec.local_steps - 1,
            time.perf_counter() - t0,
            loss,
            len(ok),
        )
        return mean.result()[MODEL_SET], loss

    def evaluate(
        self, grid: Grid, rnd: int, split: str, vec: torch.Tensor
    ) -> tuple[dict[str, tuple[dict[str, float], int]], dict[str, float]]:
        """Every connected site scores `vec` on its `split`: (per site: (metrics, scans), scan-weighted)."""

        def accept(res: SiteResult) -> None:
            reason = check_evaluation(res.update, self.kind) if res.status == "ok" and res.update else None
            if reason:
                res.status, res.detail = "rejected", reason
                log.warning("evaluate %s: reply of site %s rejected: %s", split, res.site, reason)

        results = self.exchange(grid, self.spec("evaluate", rnd, split=split), {MODEL_SET: vec}, accept, "evaluate")
        if self.audit is not None:
            self.audit.round(rnd + 1, f"evaluate-{split}", results)
        ok = ok_updates(results, self.cfg.min_sites, f"evaluate {split} after round {rnd + 1}")
        per_site = {u.site: (eval_metrics(u.metrics), u.num_examples) for u in ok}
        return per_site, weighted_metrics([v for v in per_site.values() if v[1] > 0], self.kind)

    def validate(self, grid: Grid, rnd: int, step: int, loss: float, vec: torch.Tensor) -> None:
        """Validation at an evaluation point; keeps the weights if the primary metric improved (as `fit`)."""
        per_site, val = self.evaluate(grid, rnd, "val", vec)
        primary = PRIMARY[self.kind]
        selected = self.best is None or is_better(self.kind, val[primary], self.best[1][primary])
        if selected:
            self.best = (vec.clone(), val, step)
            self.save()
        fields = ["round", "step", "loss", "sites", *METRICS[self.kind], "n", "selected"]
        row = {
            "round": rnd + 1,
            "step": step,
            "loss": f"{loss:.6f}",
            "sites": len(per_site),
            "selected": int(selected),
            **{m: f"{val[m]:.6f}" for m in METRICS[self.kind]},
            "n": int(val["n"]),
        }
        append_rows(self.run_dir / "downstream_metrics.csv", fields, [row])
        log.info(
            "validation after step %d: %s %.4f over %d scans%s",
            step,
            primary,
            val[primary],
            int(val["n"]),
            " (selected)" if selected else "",
        )

    def save(self, test: dict | None = None) -> Path:
        """The selected model as a checkpoint (atomic), with what it needs to be used and audited."""
        assert self.best is not None
        load_state_vector(self.model, self.best[0])
        path = save_checkpoint(
            self.run_dir / CHECKPOINT,
            kind="downstream",
            federated=True,
            method=self.dtask.recipe.method,
            task=to_dict(self.dtask),
            model_config=to_dict(self.backbone.model),
            gradients=self.backbone.gradients,
            gradient_checksum=gradient_checksum(self.backbone.gradients),
            backbone=self.backbone.source,
            model=self.model.state_dict(),
            target={"center": self.target.center, "scale": self.target.scale},
            step=self.best[2],
            val=self.best[1],
            test=test,
            run_config=to_run_config(self.cfg),
        )
        if self.audit is not None:
            self.audit.checkpoint(self.best[2], path)
        return path
