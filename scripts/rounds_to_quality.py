"""Rounds to quality: federated pretraining schemes against one machine, at equal training samples.

Each federated scheme runs in this process with the sites' own round (`client.training.SiteRound.train`:
the K JEPA steps a Flower site runs, its AdamW moments carried from round to round as a site's Flower
context carries them) and the coordinator's averaging (`RunningMean`, then `ServerOptimizer`). Flower's
transport is left out; it changes no number (tests/test_fed_equivalence.py). The single-machine run
(`central`) steps one model over the three sites' pooled training scans (`brainjepa pretrain`'s data path).
Every run sees the same number of training samples: central S steps at batch B; R rounds x K local steps
x 3 sites at batch B.

Quality, measured on the sites' validation splits only (never a test split):
- `val_loss`: the JEPA loss of the global models on fixed windows and masks of the pooled validation
  scans (the same batches for every run), after each round (central: after each 3K steps);
- `rank`: the effective rank of the target encoder's features on those scans (collapse: a low rank);
- `auroc`: a frozen-feature probe at the end (the target encoder's tokens pooled per ROI over time:
  mean and std, `roi_std`; a logistic regression, its strength by 5-fold CV on the training scans, sex
  as the label), AUROC on the validation scans with a 95 % bootstrap interval (2000 resamples).

Schemes: `fedavg` (sample-weighted FedAvg), `fedadam` / `fedyogi` (Reddi et al. 2021: a server step
on the mean's pseudo-gradient; the EMA target is always averaged), `fedema` (Zhuang et al. 2022: each
site starts a round from an EMA of its own last local model and the global one, the weight on its own
model mu = min(lambda * ||global - local||, 1), lambda set from tau at the site's second round).

    .venv/bin/python scripts/rounds_to_quality.py run --out OUT --partition iid --scheme central --scheme fedavg
    .venv/bin/python scripts/rounds_to_quality.py report --out OUT   # OUT/table.md from every run in OUT
    .venv/bin/python scripts/rounds_to_quality.py checkpoint CKPT --sites SITES_DIR --task sex --task diagnosis
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig, load_site
from brainjepa.data import load_pretraining_cohort, pretraining_stream
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.federation.averaging import RunningMean
from brainjepa.federation.contract import Metric, RoundSpec
from brainjepa.gradients import (
    compute_gradients,
    federated_fc,
    gradient_checksum,
    load_gradients,
    save_gradients,
    site_contribution,
)
from brainjepa.jepa import JEPAModels, PretrainStep, jepa_loss
from brainjepa.monitor import content_stats, effective_rank
from brainjepa.schema import from_mapping
from brainjepa.weights import WEIGHT_SETS, flat_parameters, load_flat_parameters, model_checksum
from client.training import SiteRound
from server.aggregate import ServerOptimizer
from server.config import ServerOptConfig
from sites.acquisition import SiteSpec
from sites.cohort import Cohort, load_cohort
from sites.synth import generate_cohorts
from sites.windows import multi_windows, pack

log = logging.getLogger("rounds_to_quality")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])

N_ROIS, N_FRAMES, BATCH = 50, 64, 16
SEXES = TaskSpec(name="sex", column="sex", kind="classification", classes=("0", "1"))
TASKS = {
    t.name: t
    for t in (SEXES, TaskSpec(name="diagnosis", column="diagnosis", kind="classification", classes=("0", "1")))
}


def make_sites(root: Path, partition: str, seed: int) -> tuple[list[Path], Path]:
    """Three generated sites and their gradient file. iid: one population and acquisition, 112 subjects
    each; noniid: the generator's presets (TR, noise, gain differ; site_c from population B), 200 / 20
    / 200 subjects (sizes 10x apart)."""
    if partition == "iid":
        specs = [SiteSpec(f"site_{c}", 0.8, 400, noise=0.4, population="A") for c in "abc"]
        sizes: list[int] = [112, 112, 112]
    else:
        specs, sizes = None, [200, 20, 200]  # type: ignore[assignment]
    yamls = sorted(root.glob("*/*.yaml"))
    if not yamls:
        yamls = generate_cohorts(root, n_sites=3, subjects_per_site=sizes, seed=seed, n_rois=N_ROIS, sites=specs)
    grads = root / "gradients.npy"
    if not grads.exists():
        contributions = [site_contribution(load_site(y)[0], 0.8) for y in yamls]
        save_gradients(grads, compute_gradients(federated_fc(contributions), 30, seed=seed))
    return [Path(y) for y in yamls], grads


def pretrain_config(yamls: list[Path], grads: Path, steps: int, seed: int) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(n_rois=N_ROIS, n_frames=N_FRAMES),
        optim=OptimConfig(),
        data=DataConfig(sites=tuple(str(y) for y in yamls), gradients=str(grads)),
        train=TrainConfig(steps=steps, batch_size=BATCH, device="cpu", seed=seed),
    )


@dataclasses.dataclass
class Validation:
    """Fixed validation batches (windows + masks) of the pooled validation scans, and the probe's data."""

    batches: list
    train_x: list[np.ndarray]
    train_y: np.ndarray
    val_x: list[np.ndarray]
    val_y: np.ndarray

    @classmethod
    def build(cls, cfg: PretrainConfig, yamls: list[Path], task: TaskSpec = SEXES) -> Validation:
        d = cfg.data
        parts = [load_cohort(load_site(y)[0], d.model_tr, "val", N_FRAMES, d.scaling) for y in yamls]
        cohort = Cohort(
            [x for c in parts for x in c.series], [f"{c.source}:{i}" for c in parts for i in c.subject_ids], "val", None
        )
        stream = pretraining_stream(cohort, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=12345)))
        batches = [stream[i] for i in range(8)]
        tr, va = [], []
        for y in yamls:
            s = load_labelled_site(load_site(y)[0], task, cfg.data.model_tr, N_FRAMES, cfg.data.scaling)
            tr.append(s.train)
            va.append(s.val)
        return cls(
            batches,
            [x for s in tr for x in s.series],
            np.concatenate([s.y for s in tr]),
            [x for s in va for x in s.series],
            np.concatenate([s.y for s in va]),
        )

    def loss(self, models: JEPAModels) -> float:
        models.eval()
        with torch.no_grad():
            return float(np.mean([float(jepa_loss(models, x, m)) for x, m in self.batches]))

    def content(self, models: JEPAModels, cfg: PretrainConfig) -> tuple[float, float]:
        """The collapse monitor's content measures on these validation batches (the same inputs for every
        run, unlike the monitors of a run, whose probes differ): mean position share, mean context gain."""
        o = cfg.optim
        pairs = [content_stats(models, x, m, o.loss, o.target_norm) for x, m in self.batches]
        return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))

    def features(self, models: JEPAModels, series: list[np.ndarray]) -> np.ndarray:
        """(N, 2 R D): per ROI, mean and std of the target encoder's tokens over time (4 windows)."""
        packed = pack(series, [str(i) for i in range(len(series))])
        out = []
        with torch.no_grad():
            for lo in range(0, len(series), 32):
                idx = np.arange(lo, min(lo + 32, len(series)))
                x = torch.from_numpy(multi_windows(packed, N_FRAMES, 4, idx)).flatten(0, 1)  # (n W, R, T)
                h = models.target(x)  # (n W, R Tn, D)
                h = h.view(len(idx), 4, N_ROIS, -1, h.shape[-1]).transpose(1, 2).flatten(2, 3)  # (n, R, W Tn, D)
                out.append(torch.cat([h.mean(2), h.std(2)], -1).flatten(1).numpy())
        return np.concatenate(out)

    def probe(self, models: JEPAModels, seed: int) -> tuple[float, float, float, float]:
        """(validation AUROC, its 95 % bootstrap interval, effective rank of the validation features)."""
        models.eval()
        xt, xv = self.features(models, self.train_x), self.features(models, self.val_x)
        mu, sd = xt.mean(0), xt.std(0) + 1e-6
        clf = LogisticRegressionCV(Cs=6, cv=5, max_iter=2000).fit((xt - mu) / sd, self.train_y)
        score = clf.decision_function((xv - mu) / sd)
        auc = roc_auc_score(self.val_y, score)
        rng, boots = np.random.default_rng(seed), []
        for _ in range(2000):
            i = rng.integers(0, len(score), len(score))
            if len(set(self.val_y[i])) == 2:
                boots.append(roc_auc_score(self.val_y[i], score[i]))
        rank = effective_rank(torch.from_numpy(xv).float())
        return auc, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), rank


def central(cfg: PretrainConfig, grads: np.ndarray, val: Validation, every: int) -> tuple[list[dict], JEPAModels]:
    """One machine over the pooled training scans; validation every `every` steps."""
    torch.manual_seed(cfg.train.seed)
    models = JEPAModels(cfg.model, torch.from_numpy(grads))
    step_fn = PretrainStep(models, cfg.optim, cfg.train.steps, torch.device("cpu"))
    stream = pretraining_stream(load_pretraining_cohort(cfg), cfg)
    rows = []
    for step in range(cfg.train.steps):
        step_fn([stream[step]], step)
        if (step + 1) % every == 0:
            rows.append({"round": (step + 1) // every, "val_loss": val.loss(models)})
    return rows, models


def federated(
    cfg: PretrainConfig,
    yamls: list[Path],
    grad_path: Path,
    val: Validation,
    scheme: str,
    rounds: int,
    k: int,
    tau: float,
) -> tuple[list[dict], JEPAModels]:
    g = load_gradients(grad_path)
    torch.manual_seed(cfg.train.seed)  # the server's initial weights
    models = JEPAModels(cfg.model, torch.from_numpy(g))
    sets = {n: flat_parameters(getattr(models, n)) for n in WEIGHT_SETS}
    server = ServerOptimizer(
        ServerOptConfig(scheme if scheme in ("fedadam", "fedyogi") else "fedavg", lr=SERVER_LR[scheme])
    )
    sites = [load_site(y) for y in yamls]
    packs: list[dict | None] = [None] * len(sites)
    local: list[dict | None] = [None] * len(sites)
    lam: list[float | None] = [None] * len(sites)
    check = model_checksum(cfg.model, {n: getattr(models, n) for n in WEIGHT_SETS})
    rows = []
    for r in range(rounds):
        spec = RoundSpec("pretrain", r, rounds, r * k, k, "float32", check, gradient_checksum(g), cfg)
        mean = RunningMean()
        losses = []
        for i, (site, runtime) in enumerate(sites):
            start = dict(sets)
            if scheme == "fedema" and local[i] is not None:
                start, lam[i] = fedema_start(sets, local[i], lam[i], tau)
            out, metrics, packs[i] = SiteRound(spec, site, runtime, grad_path, start, packs[i]).train()
            local[i] = {n: out[n].clone() for n in ("encoder", "predictor")}
            mean.add(out, int(metrics[Metric.NUM_EXAMPLES]))
            losses.append(metrics[Metric.LOSS])
        sets = server.step(sets, mean.result())
        for n in WEIGHT_SETS:
            load_flat_parameters(getattr(models, n), sets[n].clone())
        rows.append({"round": r + 1, "val_loss": val.loss(models), "train_loss": float(np.mean(losses))})
    return rows, models


ORDER = ("random", "central", "fedavg", "fedema", "fedadam", "fedyogi")
SERVER_LR = {"fedavg": 1.0, "fedadam": 3e-3, "fedyogi": 3e-3, "fedema": 1.0}  # adaptive: one untuned value


def fedema_start(
    glob: dict[str, torch.Tensor], own: dict[str, torch.Tensor], lam: float | None, tau: float
) -> tuple[dict[str, torch.Tensor], float]:
    """FedEMA's round start at a site: encoder and predictor = mu own + (1 - mu) global, mu = min(lambda
    divergence, 1); lambda = tau / the first divergence seen (the EMA target: the global one)."""
    div = float(torch.sqrt(sum(((glob[n] - own[n]) ** 2).sum() for n in own)))
    lam = tau / max(div, 1e-12) if lam is None else lam
    mu = min(lam * div, 1.0)
    start = dict(glob)
    for n in own:
        start[n] = mu * own[n] + (1 - mu) * glob[n]
    return start, lam


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="Output folder: sites/, <partition>_<scheme>_s<seed>.csv, results.jsonl.")],
    partition: Annotated[str, typer.Option(help="iid or noniid.")] = "iid",
    scheme: Annotated[
        list[str] | None, typer.Option(help="random (no training), central, fedavg, fedadam, fedyogi, fedema (repeat).")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of the federated schemes.")] = 40,
    local_steps: Annotated[int, typer.Option(help="K: each site's steps per round.")] = 25,
    samples_steps: Annotated[int, typer.Option(help="Central steps S (equal samples: rounds x K x 3 = S).")] = 3000,
    seed: Annotated[int, typer.Option(help="Pretraining seed (the sites are generated with seed 0).")] = 0,
    tau: Annotated[float, typer.Option(help="FedEMA's tau.")] = 0.7,
) -> None:
    """Run the schemes; one CSV of per-round validation losses each, one JSON line of final quality each."""
    if scheme is None:
        scheme = ["central"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    root = out / "sites" / partition
    yamls, grad_path = make_sites(root, partition, 0)
    g = load_gradients(grad_path)
    for name in scheme:
        t0 = time.perf_counter()
        if name == "random":  # the untrained initial weights: the probe's floor
            cfg = pretrain_config(yamls, grad_path, samples_steps, seed)
            val = Validation.build(cfg, yamls)
            torch.manual_seed(seed)
            models = JEPAModels(cfg.model, torch.from_numpy(g))
            rows, k, r = [{"round": 0, "val_loss": val.loss(models)}], 0, 0
        elif name == "central":
            cfg = pretrain_config(yamls, grad_path, samples_steps, seed)
            val = Validation.build(cfg, yamls)
            rows, models = central(cfg, g, val, samples_steps // rounds)
            k, r = samples_steps // rounds, rounds
        else:
            if rounds * local_steps * 3 != samples_steps:
                raise typer.BadParameter(f"rounds x local-steps x 3 = {rounds * local_steps * 3}, not {samples_steps}")
            cfg = pretrain_config(yamls, grad_path, rounds * local_steps, seed)
            val = Validation.build(cfg, yamls)
            rows, models = federated(cfg, yamls, grad_path, val, name, rounds, local_steps, tau)
            k, r = local_steps, rounds
        auc, lo, hi, rank = val.probe(models, seed)
        tag = f"{partition}_{name}_r{r}_k{k}_s{seed}"
        with open(out / f"{tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({key for row in rows for key in row}))
            w.writeheader()
            w.writerows(rows)
        result = {
            "partition": partition,
            "scheme": name,
            "rounds": r,
            "local_steps": k,
            "seed": seed,
            "final_val_loss": rows[-1]["val_loss"],
            "auroc": auc,
            "auroc_lo": lo,
            "auroc_hi": hi,
            "feature_rank": rank,
            "seconds": time.perf_counter() - t0,
        }
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        log.info("%s", result)


@app.command()
def checkpoint(
    ckpt: Annotated[Path, typer.Argument(help="A pretraining checkpoint.pt (federated or not), 50 ROIs x 64 frames.")],
    sites: Annotated[Path, typer.Option(help="The folder of the site folders it was trained on (their val splits).")],
    task: Annotated[list[str] | None, typer.Option(help=f"Probe label(s), of {sorted(TASKS)}; default: sex.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the probe's bootstrap.")] = 0,
) -> None:
    """The same validation measures for a finished run's checkpoint (e.g. two `make demo` schedules):
    validation JEPA loss, feature rank, the monitor's position share and context gain on the validation
    batches, and per task the probe's AUROC with its interval; one JSON line on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tasks = task or ["sex"]
    if set(tasks) - set(TASKS):
        raise typer.BadParameter(f"--task: {sorted(set(tasks) - set(TASKS))}, expected some of {sorted(TASKS)}")
    state = load_checkpoint(ckpt)
    cfg = from_mapping(PretrainConfig, state["config"], str(ckpt))
    if (cfg.model.n_rois, cfg.model.n_frames) != (N_ROIS, N_FRAMES):
        raise typer.BadParameter(
            f"{ckpt}: model is {cfg.model.n_rois} x {cfg.model.n_frames}, expected {N_ROIS} x {N_FRAMES}"
        )
    yamls = sorted(sites.glob("*/*.yaml"))
    if not yamls:
        raise typer.BadParameter(f"{sites}: no site folder with a site YAML")
    models = JEPAModels(cfg.model, torch.as_tensor(np.asarray(state["gradients"], dtype=np.float32)))
    models.load_state_dict(state["models"])
    result: dict[str, object] = {"checkpoint": str(ckpt), "step": state.get("step"), "round": state.get("round")}
    for name in tasks:
        val = Validation.build(cfg, yamls, TASKS[name])
        auc, lo, hi, rank = val.probe(models, seed)
        share, gain = val.content(models, cfg)
        result |= {"val_loss": val.loss(models), "feature_rank": rank, "position_share": share, "context_gain": gain}
        result |= {f"{name}_auroc": auc, f"{name}_auroc_lo": lo, f"{name}_auroc_hi": hi}
    typer.echo(json.dumps(result))


@app.command()
def report(out: Annotated[Path, typer.Option(help="A folder of `run` outputs (each partition's subfolder).")]) -> None:
    """OUT/table.md: per partition and scheme, the final validation loss (and its difference to the
    single-machine run's), the probe's AUROC with its interval, the features' effective rank, the loss
    after each quarter of the run."""
    lines = [
        "# Rounds to quality (validation splits only)",
        "",
        "Written by `scripts/rounds_to_quality.py report`. Equal training samples in every row (the central run's",
        "steps = rounds x local steps x 3 sites, batch 16). Validation JEPA loss of the global models on fixed",
        "windows and masks of the pooled validation scans; its targets move with the EMA target, so it is compared",
        "between runs at their end, not read as a curve to a threshold.",
        "",
        "| partition | seed | scheme | rounds x K | final val loss | - central's | probe AUROC % [95 % CI] | feature rank "
        "| val loss at 1/4, 1/2, 3/4 of the run | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part in sorted(p for p in out.iterdir() if (p / "results.jsonl").is_file()):
        results = [json.loads(x) for x in (part / "results.jsonl").read_text().splitlines()]
        central_loss = {r["seed"]: r["final_val_loss"] for r in results if r["scheme"] == "central"}
        for r in sorted(results, key=lambda r: (r["seed"], ORDER.index(r["scheme"]), -r["rounds"])):
            level = central_loss.get(r["seed"], float("nan"))  # the same seed's single-machine run
            tag = f"{r['partition']}_{r['scheme']}_r{r['rounds']}_k{r['local_steps']}_s{r['seed']}"
            with open(part / f"{tag}.csv", newline="") as f:
                curve = [float(row["val_loss"]) for row in csv.DictReader(f)]
            quarters = ", ".join(f"{curve[max(0, len(curve) * q // 4 - 1)]:.3f}" for q in (1, 2, 3))
            lines.append(
                f"| {r['partition']} | {r['seed']} | {r['scheme']} | {r['rounds']} x {r['local_steps']} | {r['final_val_loss']:.4f} "
                f"| {r['final_val_loss'] - level:+.4f} | {100 * r['auroc']:.1f} [{100 * r['auroc_lo']:.1f}, "
                f"{100 * r['auroc_hi']:.1f}] | {r['feature_rank']:.1f} | {quarters} | {r['seconds']:.0f} |"
            )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out / "table.md")


if __name__ == "__main__":
    app()
