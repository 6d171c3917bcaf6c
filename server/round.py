"""One federated pretraining run on the server: global model, rounds, checkpoints, resume.

Flower-facing code is limited to `Grid` calls and message (de)construction; checks and aggregation are
in `server.aggregate`, the message format in the round contract (`brainjepa.federation.contract`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from brainjepa.checkpoint import load_checkpoint, save_checkpoint
from brainjepa.config import PretrainConfig, to_dict
from brainjepa.federation.contract import (
    ARRAYS,
    CONFIG,
    METRICS,
    SITE,
    Metric,
    RoundSpec,
    decode_update,
    encode_global,
)
from brainjepa.gradients import gradient_checksum, load_gradients, save_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum
from server.aggregate import RunningMean, ServerOptimizer, SiteUpdate, check_update
from server.config import FederationConfig, to_run_config
from server.report import RunReport
from sites.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Run-config keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = {"resume-dir", "out-dir", "round-timeout-s", "wait-for-sites-s", "save-updates"}


class RoundFailed(RuntimeError):
    """Fewer valid site updates than min-sites: the global model is not updated."""


@dataclass
class SiteResult:
    node_id: int
    status: str  # ok | failed | rejected | timeout
    site: str = ""
    detail: str = ""
    update: SiteUpdate | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


def wait_for_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    """Connected SuperNode ids once at least `n` are connected (sorted, for reproducible sampling)."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} site(s) connected after {timeout_s:.0f} s, min-sites is {n}")
        if not announced:
            log.info("waiting for sites: %d of at least %d connected", len(nodes), n)
            announced = True
        time.sleep(1.0)


def sample_nodes(nodes: list[int], fraction: float, min_sites: int, rng: np.random.Generator) -> list[int]:
    k = min(len(nodes), max(min_sites, math.ceil(fraction * len(nodes))))
    picked = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids are uint64 (no numpy floats)
    return sorted(nodes[int(i)] for i in picked)


def resolve_gradients(cfg: FederationConfig, pcfg: PretrainConfig) -> tuple[np.ndarray, str]:
    """The federation's gradient matrix (every site must hold the same file) and its path."""
    if not cfg.gradients:
        raise ConfigError("run config 'gradients': empty; the federation needs one gradient file that the server "
                          "and every site share (`brainjepa gradients --site ...` makes one from the sites' FC "
                          "sums; `brainjepa-server simulate` prepares sites and gradients for a demo)")  # fmt: skip
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

    @classmethod
    def create(cls, cfg: FederationConfig, run_id: int = 0) -> FederatedRun:
        pcfg = cfg.pretrain()
        if cfg.resume_dir:
            run_dir = Path(cfg.resume_dir).resolve()
            if not run_dir.is_dir():
                raise ConfigError(f"run config 'resume-dir': folder '{run_dir}' does not exist")
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = (Path(cfg.out_dir) / f"{stamp}-run{run_id}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        grads, source = resolve_gradients(cfg, pcfg)
        torch.manual_seed(cfg.seed)  # same initial weights as `brainjepa pretrain` with this seed
        models = JEPAModels(pcfg.model, torch.from_numpy(grads))
        run = cls(cfg, pcfg, run_dir, models, grads, source, ServerOptimizer(cfg.server_opt()))
        ckpt_path = run_dir / CHECKPOINT
        if cfg.resume_dir and ckpt_path.exists():
            run._load(ckpt_path)
        elif not cfg.resume_dir:
            save_gradients(run_dir / "gradients.npy", grads)
        run.sets = {name: flat_parameters(getattr(models, name)) for name in WEIGHT_SETS}
        return run

    # ---------------------------------------------------------------- checkpoints
    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("gradient_checksum") != gradient_checksum(self.gradients):
            raise DataError(f"checkpoint '{path}' was trained with other gradients (checksum mismatch)")
        old = {k: v for k, v in ckpt["run_config"].items() if k not in RESUME_FREE_KEYS}
        new = {k: v for k, v in to_run_config(self.cfg).items() if k not in RESUME_FREE_KEYS}
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        if diff:
            raise ConfigError(f"checkpoint '{path}': run config differs from the run being resumed "
                              f"(key: (checkpoint, now)): {diff}")
        self.models.load_state_dict(ckpt["models"])
        self.server_opt.load_state_dict(ckpt["server_optimizer"])
        self.start_round = int(ckpt["round"])
        log.info("resuming %s after round %d of %d", self.run_dir, self.start_round, self.cfg.num_rounds)

    def _save(self, completed_rounds: int) -> Path:
        return save_checkpoint(
            self.run_dir / CHECKPOINT, kind="pretrain", federated=True, round=completed_rounds,
            step=completed_rounds * self.cfg.local_steps, config=to_dict(self.pcfg),
            model_config=to_dict(self.pcfg.model), gradients=self.gradients,
            gradient_checksum=gradient_checksum(self.gradients), gradient_source=self.gradient_source,
            model_checksum=self.model_checksum, models=self.models.state_dict(),
            server_optimizer=self.server_opt.state_dict(), run_config=to_run_config(self.cfg),
        )  # fmt: skip

    @property
    def model_checksum(self) -> str:
        return model_checksum(self.pcfg.model, {n: getattr(self.models, n) for n in WEIGHT_SETS})

    # ---------------------------------------------------------------- rounds
    def log_start(self) -> None:
        n = {k: v.numel() for k, v in self.sets.items()}
        log.info("federated Brain-JEPA pretraining: %d rounds x %d local steps, strategy %s, wire %s, "
                 "min %d sites, fraction %.2f", self.cfg.num_rounds, self.cfg.local_steps, self.cfg.strategy,
                 self.cfg.wire_dtype, self.cfg.min_sites, self.cfg.fraction_sites)  # fmt: skip
        log.info("model %s: encoder %d, predictor %d, target %d parameters; gradients %s",
                 self.pcfg.model.size, n["encoder"], n["predictor"], n["target"], self.gradient_source)
        log.info("run folder: %s", self.run_dir)

    def round_spec(self, rnd: int) -> RoundSpec:
        return RoundSpec(
            task="pretrain", round=rnd, num_rounds=self.cfg.num_rounds, step_start=rnd * self.cfg.local_steps,
            local_steps=self.cfg.local_steps, wire_dtype=self.cfg.wire_dtype, model_checksum=self.model_checksum,
            gradient_checksum=gradient_checksum(self.gradients), task_config=self.pcfg,
        )  # fmt: skip

    def execute(self, grid: Grid) -> Path:
        report = RunReport(self.run_dir, self.start_round)
        for rnd in range(self.start_round, self.cfg.num_rounds):
            self.run_round(grid, rnd, report)
        png = report.finish()
        log.info("done: %d rounds; checkpoint %s; metrics %s; plot %s", self.cfg.num_rounds,
                 self.run_dir / CHECKPOINT, report.sites_csv, png)
        log.info("outputs under %s", self.run_dir)
        return self.run_dir

    def run_round(self, grid: Grid, rnd: int, report: RunReport) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        nodes = wait_for_nodes(grid, cfg.min_sites, cfg.wait_for_sites_s)
        sampled = sample_nodes(nodes, cfg.fraction_sites, cfg.min_sites, np.random.default_rng([cfg.seed, rnd]))
        spec = self.round_spec(rnd)
        sched = spec.schedule()
        conf = ConfigRecord(spec.to_record())
        arrays = ArrayRecord(encode_global(self.sets, cfg.wire_dtype))
        sent_bytes = arrays.count_bytes()
        log.info("round %d/%d: sending %.1f MB to each of %d site(s) (lr %.2e, ema %.5f)", rnd + 1,
                 cfg.num_rounds, sent_bytes / 1e6, len(sampled), sched.lr, sched.momentum)  # fmt: skip
        msgs = [Message(RecordDict({ARRAYS: arrays, CONFIG: conf}), dst_node_id=node, message_type="train",
                        group_id=str(rnd)) for node in sampled]  # fmt: skip
        mean = RunningMean()
        results = self.collect(grid, msgs, sent_bytes, lambda res: self._accept(rnd, res, mean))
        ok = [r.update for r in results if r.status == "ok" and r.update is not None]
        rows = [self._site_row(rnd, r) for r in results]
        report.site_rows(rows)
        if len(ok) < cfg.min_sites:
            raise RoundFailed(f"round {rnd + 1}: {len(ok)} valid update(s), fewer than min-sites={cfg.min_sites}; "
                              f"the global model stays at round {rnd} (resume with resume-dir={self.run_dir})")
        self.sets = self.server_opt.step(self.sets, mean.result())
        for name in WEIGHT_SETS:
            load_flat_parameters(getattr(self.models, name), self.sets[name])
        self._save(rnd + 1)
        samples = sum(u.num_examples for u in ok)
        loss = sum(u.metrics.get(Metric.LOSS, float("nan")) * u.num_examples for u in ok) / samples
        wall = time.perf_counter() - t0
        report.round_row({
            "round": rnd + 1, "loss": f"{loss:.6f}", "sites_ok": len(ok),
            "sites_failed": sum(r.status in ("failed", "timeout") for r in results),
            "sites_rejected": sum(r.status == "rejected" for r in results), "samples": samples,
            "step_start": spec.step_start, "lr": f"{sched.lr:.3e}", "weight_decay": f"{sched.weight_decay:.4f}",
            "momentum": f"{sched.momentum:.6f}", "wall_s": f"{wall:.2f}",
            "bytes_sent": sum(r.bytes_sent for r in results), "bytes_received": sum(r.bytes_received for r in results),
        })  # fmt: skip
        log.info("round %d/%d done in %.1f s: loss %.4f (%d site(s) ok, %d failed, %d rejected), checkpoint saved",
                 rnd + 1, cfg.num_rounds, wall, loss, len(ok), sum(r.status in ("failed", "timeout") for r in results),
                 sum(r.status == "rejected" for r in results))  # fmt: skip

    def _accept(self, rnd: int, res: SiteResult, mean: RunningMean) -> None:
        """Check one decoded reply; add it to the mean (then drop its weights) or reject it."""
        if res.status != "ok" or res.update is None:
            return
        reason = check_update(res.update, {k: v.numel() for k, v in self.sets.items()})
        if reason:
            res.status, res.detail = "rejected", reason
            log.warning("round %d: update of site %s rejected: %s", rnd + 1, res.site, reason)
        else:
            mean.add(res.update)
        if self.cfg.save_updates:
            self._save_update(rnd, res)
        res.update.sets = {}  # memory: one site's weights at a time

    def collect(self, grid: Grid, msgs: list[Message], sent_bytes: int,
                on_result: Callable[[SiteResult], None]) -> list[SiteResult]:
        """Push the round's messages and pull replies (one at a time, each handed to `on_result` and
        released) until all came, a site left, or the timeout."""
        ids = list(grid.push_messages(msgs))
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True)}
        pending = set(ids)
        results: list[SiteResult] = []
        deadline = time.monotonic() + self.cfg.round_timeout_s
        gone_since: dict[str, float] = {}
        while pending and time.monotonic() < deadline:
            for asked in list(pending):
                for reply in grid.pull_messages([asked]):
                    mid = reply.metadata.reply_to_message_id
                    if mid in pending:
                        pending.discard(mid)
                        results.append(self.decode(reply, node_of[mid], sent_bytes))
                        on_result(results[-1])
                    del reply
            if not pending:
                break
            connected = set(grid.get_node_ids())
            now = time.monotonic()
            for mid in list(pending):
                if node_of[mid] in connected:
                    gone_since.pop(mid, None)
                elif now - gone_since.setdefault(mid, now) > 5.0:  # left the federation mid-round
                    pending.discard(mid)
                    results.append(SiteResult(node_of[mid], "failed", detail="site disconnected mid-round",
                                              bytes_sent=sent_bytes))  # fmt: skip
                    log.warning("site node %d disconnected mid-round: dropped from this round", node_of[mid])
            time.sleep(0.5)
        for mid in pending:
            results.append(SiteResult(node_of[mid], "timeout", detail=f"no reply within {self.cfg.round_timeout_s:.0f} s",
                                      bytes_sent=sent_bytes))  # fmt: skip
            log.warning("site node %d: no reply within %.0f s, dropped from this round", node_of[mid],
                        self.cfg.round_timeout_s)  # fmt: skip
        return sorted(results, key=lambda r: r.node_id)

    def decode(self, reply: Message, node_id: int, sent_bytes: int) -> SiteResult:
        if reply.has_error():
            reason = (reply.error.reason or "").strip()
            log.warning("site node %d failed: %s", node_id, reason.splitlines()[-1] if reason else reply.error.code)
            return SiteResult(node_id, "failed", detail=reason[-2000:], bytes_sent=sent_bytes)
        content = reply.content
        site = str(content[SITE]["name"]) if SITE in content.config_records else f"node-{node_id}"
        metrics = {k: float(v) for k, v in content[METRICS].items()}
        arrays = content[ARRAYS]
        try:
            sets = decode_update(arrays.to_torch_state_dict(), self.cfg.wire_dtype, self.sets)
        except (ValueError, TypeError) as e:
            return SiteResult(node_id, "rejected", site, f"undecodable weights: {e}", bytes_sent=sent_bytes,
                              bytes_received=arrays.count_bytes())  # fmt: skip
        n = metrics.get(Metric.NUM_EXAMPLES, 0.0)
        update = SiteUpdate(site, int(n) if float(n).is_integer() else -1, sets, metrics)
        return SiteResult(node_id, "ok", site, update=update, bytes_sent=sent_bytes, bytes_received=arrays.count_bytes())

    def _site_row(self, rnd: int, r: SiteResult) -> dict:
        m = r.update.metrics if r.update is not None else {}
        return {
            "round": rnd + 1, "site": r.site or f"node-{r.node_id}", "node_id": r.node_id, "status": r.status,
            "loss": f"{m[Metric.LOSS]:.6f}" if Metric.LOSS in m else "", "local_steps": int(m.get(Metric.LOCAL_STEPS, 0)),
            "samples": int(m.get(Metric.NUM_EXAMPLES, 0)), "wall_s": f"{m.get(Metric.WALL_S, 0.0):.2f}",
            "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
            "detail": r.detail.splitlines()[-1][:300] if r.detail else "",
        }  # fmt: skip

    def _save_update(self, rnd: int, r: SiteResult) -> None:
        out = self.run_dir / "updates" / f"round-{rnd + 1:03d}"
        out.mkdir(parents=True, exist_ok=True)
        assert r.update is not None
        torch.save({"site": r.site, "status": r.status, "num_examples": r.update.num_examples,
                    "sets": r.update.sets}, out / f"{r.site}.pt")  # fmt: skip

