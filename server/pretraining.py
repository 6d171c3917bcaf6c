"""One federated pretraining run on the server: global model, rounds, checkpoints, resume.

The message exchange (sampling, sending, collecting, decoding) is `server.exchange`; checks and
aggregation are in `server.aggregate`, the message format in the round contract
(`brainjepa.federation.contract`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from brainjepa.checkpoint import load_checkpoint, save_checkpoint
from brainjepa.config import PretrainConfig, to_dict
from brainjepa.errors import ConfigError, DataError
from brainjepa.federation.contract import SCALING, Metric, RoundSpec, scaling_arrays
from brainjepa.gradients import gradient_checksum, load_gradients, save_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.monitor import CollapseMonitor, Explosion, synthetic_probe
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum
from server.aggregate import RunningMean, ServerOptimizer
from server.audit import AuditLog
from server.config import ROBUST_METHODS, FederationConfig, to_run_config
from server.downlink import Downlink
from server.exchange import RoundFailed, SiteResult, count, exchange, ok_updates, save_update, site_row
from server.guard import UpdateGuard, norm_explosion
from server.registry import RegisteredSite, read_registry
from server.report import RunReport, new_run_dir
from server.robust import RobustAggregate
from server.round_privacy import RoundPrivacy
from server.scaling import scaling_stats
from sites.scaling import RobustScaling

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Run-config keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = {
    "resume-dir",
    "out-dir",
    "round-timeout-s",
    "wait-for-sites-s",
    "save-updates",
    "resume-round",
    "site-registry",
    "keep-checkpoints",
}


def round_checkpoint(run_dir: Path, rnd: int) -> Path:
    """`round-NNN.pt`: the global model after round `rnd` (the last `keep-checkpoints` are kept)."""
    return run_dir / f"round-{rnd:03d}.pt"


def resolve_gradients(cfg: FederationConfig, pcfg: PretrainConfig) -> tuple[np.ndarray, str]:
    """The federation's gradient matrix (every site must hold the same file) and its path."""
    if not cfg.gradients:
        raise ConfigError(
            "run config 'gradients': empty; the federation needs one gradient file that the server "
            "and every site share (`brainjepa gradients --site ...` makes one from the sites' FC "
            "sums; `brainjepa-server simulate` prepares sites and gradients for a demo)"
        )
    m = pcfg.model
    return load_gradients(cfg.gradients, m.n_rois, m.gradient_components), str(Path(cfg.gradients).resolve())


@dataclass
class FederatedRun:
    cfg: FederationConfig
    pcfg: PretrainConfig
    run_dir: Path
    models: JEPAModels
    gradients: np.ndarray
    gradient_source: str
    server_opt: ServerOptimizer
    start_round: int = 0
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    scaling: RobustScaling | None = None  # scaling-scope federation: the statistics every site applies
    registry: dict[int, RegisteredSite] = field(default_factory=dict)  # node id -> registered site
    audit: AuditLog | None = None
    monitor: CollapseMonitor | None = None  # the global target after each round, on a generated probe batch
    privacy: RoundPrivacy | None = None  # central DP, secure aggregation, privacy.json / privacy.md
    guard: UpdateGuard | None = None  # bounds, sample claims, quarantine, rollback blame
    guard_state: dict | None = None  # the resumed checkpoint's guard state
    downlink: Downlink | None = None  # wire-dtype int8: what in-sync sites hold (server.downlink)

    @classmethod
    def create(cls, cfg: FederationConfig, run_id: int = 0) -> FederatedRun:
        pcfg = cfg.pretrain()
        if cfg.scaling_scope == "federation" and pcfg.data.scaling != "robust":
            raise ConfigError(
                f"run config 'scaling-scope': 'federation' needs data.scaling 'robust' (the "
                f"reference scaling, whose statistics sites share as quantile sketches), got "
                f"'{pcfg.data.scaling}' (use scaling-scope 'site')"
            )
        if cfg.resume_dir:
            run_dir = Path(cfg.resume_dir).resolve()
            if not run_dir.is_dir():
                raise ConfigError(f"run config 'resume-dir': folder '{run_dir}' does not exist")
        else:
            run_dir = new_run_dir(cfg.out_dir, run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        grads, source = resolve_gradients(cfg, pcfg)
        torch.manual_seed(cfg.seed)  # same initial weights as `brainjepa pretrain` with this seed
        models = JEPAModels(pcfg.model, torch.from_numpy(grads))
        run = cls(cfg, pcfg, run_dir, models, grads, source, ServerOptimizer(cfg.server_opt()))
        run.registry = read_registry(cfg.site_registry) if cfg.site_registry else {}
        run.privacy = RoundPrivacy(cfg, run_dir)
        ckpt_path = round_checkpoint(run_dir, cfg.resume_round) if cfg.resume_round else run_dir / CHECKPOINT
        if cfg.resume_dir:
            if not ckpt_path.exists():
                kept = sorted(p.name for p in run_dir.glob("round-*.pt"))
                raise ConfigError(
                    f"run config 'resume-dir': '{ckpt_path}' does not exist (checkpoints in "
                    f"{run_dir}: {kept or 'none'}); nothing to resume"
                )
            run._load(ckpt_path)
        else:
            save_gradients(run_dir / "gradients.npy", grads)
        run.audit = AuditLog(run_dir, run.registry)
        run.audit.start(to_run_config(cfg), run.start_round)
        for name in WEIGHT_SETS:  # the modules' parameters become views of the sets, set by set: one copy
            run.sets[name] = flat_parameters(getattr(models, name))
            load_flat_parameters(getattr(models, name), run.sets[name])
        run.guard = UpdateGuard(cfg, run_dir, run.registry, run.audit, run.guard_state)
        run.guard.norms.record(run.start_round, run.sets)
        run.downlink = Downlink(run_dir) if cfg.wire_dtype == "int8" else None
        return run

    # ---------------------------------------------------------------- checkpoints
    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("gradient_checksum") != gradient_checksum(self.gradients):
            raise DataError(f"checkpoint '{path}' was trained with other gradients (checksum mismatch)")
        defaults = to_run_config(FederationConfig())  # keys newer than the checkpoint: their defaults
        old = {k: v for k, v in {**defaults, **ckpt["run_config"]}.items() if k not in RESUME_FREE_KEYS}
        new = {k: v for k, v in to_run_config(self.cfg).items() if k not in RESUME_FREE_KEYS}
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        if diff:
            raise ConfigError(
                f"checkpoint '{path}': run config differs from the run being resumed (key: (checkpoint, now)): {diff}"
            )
        self.models.load_state_dict(ckpt["models"])
        self.server_opt.load_state_dict(ckpt["server_optimizer"])
        self.start_round = int(ckpt["round"])
        if ckpt.get("scaling") is not None:
            self.scaling = RobustScaling.from_dict(ckpt["scaling"])
        if self.privacy is not None:
            self.privacy.load_state_dict(ckpt.get("central_dp"))
        self.guard_state = ckpt.get("guard")
        log.info("resuming %s after round %d of %d", self.run_dir, self.start_round, self.cfg.num_rounds)

    def _save(self, completed_rounds: int) -> Path:
        path = self._write_checkpoint(completed_rounds)
        kept = round_checkpoint(self.run_dir, completed_rounds)
        kept.unlink(missing_ok=True)
        os.link(path, kept)  # the same bytes; checkpoint.pt is replaced by a rename next round
        for old in sorted(self.run_dir.glob("round-*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        if self.audit is not None:
            self.audit.checkpoint(completed_rounds, kept)
        return path

    def _write_checkpoint(self, completed_rounds: int) -> Path:
        return save_checkpoint(
            self.run_dir / CHECKPOINT,
            kind="pretrain",
            federated=True,
            round=completed_rounds,
            step=completed_rounds * self.cfg.local_steps,
            config=to_dict(self.pcfg),
            model_config=to_dict(self.pcfg.model),
            gradients=self.gradients,
            gradient_checksum=gradient_checksum(self.gradients),
            gradient_source=self.gradient_source,
            model_checksum=self.model_checksum,
            models=self.models.state_dict(),
            server_optimizer=self.server_opt.state_dict(),
            run_config=to_run_config(self.cfg),
            scaling=self.scaling.to_dict() if self.scaling is not None else None,
            central_dp=self.privacy.state_dict() if self.privacy is not None else None,
            guard=self.guard.state_dict() if self.guard is not None else None,
        )

    @property
    def model_checksum(self) -> str:
        return model_checksum(self.pcfg.model, {n: getattr(self.models, n) for n in WEIGHT_SETS})

    # ---------------------------------------------------------------- rounds
    def log_start(self) -> None:
        n = {k: v.numel() for k, v in self.sets.items()}
        log.info(
            "federated Brain-JEPA pretraining: %d rounds x %d local steps, strategy %s, wire %s, "
            "min %d sites, fraction %.2f",
            self.cfg.num_rounds,
            self.cfg.local_steps,
            self.cfg.strategy,
            self.cfg.wire_dtype,
            self.cfg.min_sites,
            self.cfg.fraction_sites,
        )
        log.info(
            "model %s: encoder %d, predictor %d, target %d parameters; gradients %s",
            self.pcfg.model.size,
            n["encoder"],
            n["predictor"],
            n["target"],
            self.gradient_source,
        )
        log.info("run folder: %s", self.run_dir)

    def round_spec(self, rnd: int, task: str = "pretrain") -> RoundSpec:
        checksum = self.scaling.checksum() if self.scaling is not None and task == "pretrain" else ""
        return RoundSpec(
            task=task,
            round=rnd,
            num_rounds=self.cfg.num_rounds,
            step_start=rnd * self.cfg.local_steps,  # type: ignore[arg-type]
            local_steps=self.cfg.local_steps,
            wire_dtype=self.cfg.wire_dtype,
            model_checksum=self.model_checksum,
            gradient_checksum=gradient_checksum(self.gradients),
            task_config=self.pcfg,
            scaling_checksum=checksum,
        )

    def execute(self, grid: Grid) -> Path:
        if self.cfg.scaling_scope == "federation" and self.scaling is None and self.start_round < self.cfg.num_rounds:
            # once per run (a resume whose checkpoint holds the statistics reuses them)
            self.scaling = scaling_stats(grid, self.cfg, self.round_spec(0, "scaling-stats"), self.pcfg.model.n_rois)
        report = RunReport(self.run_dir, self.start_round)
        m, pm = self.pcfg.model, self.pcfg.monitor
        if pm.every > 0:  # the server holds no data: a probe batch generated from the run's seed
            probe = synthetic_probe(pm.probe_scans, m.n_rois, m.n_frames, seed=self.cfg.seed)  # (B, R, T)
            # one probe scan per pass (chunk=1): the coordinator holds two copies of the weights meanwhile
            kw = dict(mask_cfg=self.pcfg.mask, patch_size=m.patch_size, chunk=1, label="round")
            loss = dict(loss=self.pcfg.optim.loss, target_norm=self.pcfg.optim.target_norm)
            csv_path, keep = self.run_dir / "monitor.csv", self.start_round + 1
            self.monitor = CollapseMonitor(pm, probe, m.embed_dim, csv_path, keep, **kw, **loss)
        for rnd in range(self.start_round, self.cfg.num_rounds):
            self.run_round(grid, rnd, report)
        if self.downlink is not None:
            self.downlink.close()
        png = report.finish()
        log.info(
            "done: %d rounds; checkpoint %s; metrics %s; plot %s",
            self.cfg.num_rounds,
            self.run_dir / CHECKPOINT,
            report.sites_csv,
            png,
        )
        log.info("outputs under %s", self.run_dir)
        return self.run_dir

    def run_round(self, grid: Grid, rnd: int, report: RunReport) -> None:
        """Round `rnd` (0-based). When sites were quarantined in an attempt that then fell short of
        min-sites (or was rolled back), the round is asked again of the remaining sites, waiting up to
        wait-for-sites-s for enough of them; RoundFailed only when no site was newly quarantined."""
        assert self.guard is not None
        while True:
            before = self.guard.events
            try:
                self._attempt(grid, rnd, report)
                return
            except RoundFailed as e:
                if self.guard.events == before:
                    raise
                why = self.guard.exclusion(rnd)[1]
                log.warning("round %d: %s; asking again without the %s sites", rnd + 1, e, why)

    def _attempt(self, grid: Grid, rnd: int, report: RunReport) -> None:
        assert self.guard is not None
        t0 = time.perf_counter()
        cfg = self.cfg
        spec, down = self.round_spec(rnd), None
        if self.downlink is not None:  # int8: the round's payloads; their checksums go in the record
            spec, down = self.downlink.prepare(self.sets, spec)
        sched = spec.schedule()
        log.info("round %d/%d: lr %.2e, ema %.5f", rnd + 1, cfg.num_rounds, sched.lr, sched.momentum)
        mean: RunningMean | RobustAggregate = (
            RobustAggregate(cfg.strategy, cfg.trim_fraction) if cfg.strategy in ROBUST_METHODS else RunningMean()
        )
        records = {SCALING: scaling_arrays(self.scaling)} if self.scaling is not None else None
        exclude, why = self.guard.exclusion(rnd)
        bounds = self.guard.bounds(spec, self.sets)
        self.guard.start_round()

        def accept(res: SiteResult) -> None:
            self._accept(rnd, res, mean, bounds)

        if self.privacy is None:
            results = exchange(
                grid, cfg, spec, self.sets, accept, records=records, exclude=exclude, why=why, downlink=down
            )
        else:  # central DP (clipped sum) and / or secure aggregation (SecAgg+)
            mean = self.privacy.accumulator(mean, self.sets)  # type: ignore[arg-type]
            results = self.privacy.exchange(grid, spec, self.sets, records, mean, accept, exclude, why, down)  # type: ignore[arg-type]
        if self.downlink is not None and down is not None:  # what the sites that replied now hold
            self.downlink.commit(down, [r.node_id for r in results if r.update is not None])
        self.guard.after_exchange(rnd, results)
        report.site_rows([site_row(rnd, r) for r in results])
        if self.audit is not None:
            self.audit.round(rnd + 1, spec.task, results)
        ok = ok_updates(
            results,
            cfg.min_sites,
            f"round {rnd + 1}",
            f"; the global model stays at round {rnd} (resume with resume-dir={self.run_dir})",
        )
        new = mean.result() if self.privacy is None else self.privacy.new_sets(mean, self.sets, spec)  # type: ignore[arg-type]
        self._step(rnd, new)
        samples = sum(u.num_examples for u in ok)
        loss = sum(u.metrics.get(Metric.LOSS, float("nan")) * u.num_examples for u in ok) / samples
        wall = time.perf_counter() - t0
        n_ok, n_failed, n_rejected = count(results)
        report.round_row(
            {
                "round": rnd + 1,
                "loss": f"{loss:.6f}",
                "sites_ok": n_ok,
                "sites_failed": n_failed,
                "sites_rejected": n_rejected,
                "samples": samples,
                "step_start": spec.step_start,
                "lr": f"{sched.lr:.3e}",
                "weight_decay": f"{sched.weight_decay:.4f}",
                "momentum": f"{sched.momentum:.6f}",
                "wall_s": f"{wall:.2f}",
                "bytes_sent": sum(r.bytes_sent for r in results),
                "bytes_received": sum(r.bytes_received for r in results),
            }
        )
        # The checkpoint last: a checkpoint of round N implies its metrics rows (a crash before it leaves rows
        # that a resume truncates to the checkpoint's round, `RunReport` / `CollapseMonitor`).
        self._save(rnd + 1)
        if self.privacy is not None:
            self.privacy.after_round(rnd, results)
        log.info(
            "round %d/%d done in %.1f s: loss %.4f (%d site(s) ok, %d failed, %d rejected), checkpoint saved",
            rnd + 1,
            cfg.num_rounds,
            wall,
            loss,
            n_ok,
            n_failed,
            n_rejected,
        )

    def _step(self, rnd: int, new: dict[str, torch.Tensor]) -> None:
        """The server optimiser's step to the round's aggregate `new`, unless the global model would explode
        (a set's norm, or the monitor's measures, up by more than monitor.explode x): then the round is
        rolled back, its farthest-moving site quarantined, and RoundFailed raised."""
        assert self.guard is not None
        snapshot = self.server_opt.state_dict()
        candidate = self.server_opt.step(self.sets, new)
        why = norm_explosion(self.sets, candidate, self.pcfg.monitor.explode)
        for name in WEIGHT_SETS:
            load_flat_parameters(getattr(self.models, name), candidate[name])
        if not why and self.monitor is not None:
            try:
                self.monitor.measure(self.models.target, rnd + 1, self.models)
            except Explosion as e:
                why = str(e)
        if why:
            for name in WEIGHT_SETS:
                load_flat_parameters(getattr(self.models, name), self.sets[name])
            self.server_opt.load_state_dict(snapshot)
            self.guard.rollback(rnd, why)
            raise RoundFailed(f"round {rnd + 1} rolled back: {why}")
        self.sets = candidate
        self.guard.norms.record(rnd + 1, self.sets)

    def _accept(self, rnd: int, res: SiteResult, mean: RunningMean, bounds: dict) -> None:
        """Check one decoded reply; add it to the mean (then drop its weights) or reject it."""
        if res.status != "ok" or res.update is None:
            return
        assert self.guard is not None
        reason = self.guard.check(res, rnd, self.sets, bounds)
        if reason:
            res.status, res.detail = "rejected", reason
            log.warning("round %d: update of site %s rejected: %s", rnd + 1, res.site, reason)
        else:
            mean.add(res.update.sets, res.update.num_examples)
        if self.cfg.save_updates:
            save_update(self.run_dir, f"round-{rnd + 1:03d}", res)
        res.update.sets = {}  # memory: one site's weights at a time
