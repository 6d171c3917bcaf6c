"""Fitting a downstream model three ways with one recipe: federated, centralized (pooled), local.

- `centralized`: one model on the pooled training scans of the given sites (what a consortium that
  could pool its data would do).
- `local`: the same, on one site's scans alone (call it once per site).
- `federated`: FedAvg. Each round every site starts from the global weights, runs `local_steps`
  optimizer steps on its own scans (a fresh AdamW whose schedule position is the round's global step;
  `site_round`, also what the Flower ClientApp runs), and the global weights become the scan-weighted
  mean of the sites' (`brainjepa.federation.averaging.RunningMean`, also the coordinator's).
Model selection never touches the test split: every `eval_every` steps (federated: at the round that reaches
them) the model is scored on each site's validation split; the scan-weighted mean of the primary
metric picks the weights that are kept. The test split is not touched here.
- Probes (`probe`, `random_probe`) trained centrally or locally are solved rather than trained
  (`solve_probe`, recipe `probe_solver: lbfgs`, the default): a converged L2 logistic / ridge regression on
  the frozen features, its strength chosen by cross-validation over the training scans (recipe
  `select: cv`) or on validation (`select: validation`). `probe_solver: sgd` trains them like the rest.
"""

from __future__ import annotations

import copy
import logging
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from brainjepa.distributed import RankGroup
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.downstream.data import LabelledSite, Split, TrainBatches
from brainjepa.downstream.metrics import PRIMARY, is_better
from brainjepa.downstream.model import Backbone, BlockWeight, DownstreamModel
from brainjepa.downstream.train import DownstreamStep, TargetScale, split_metrics, weighted_metrics, window_chunks
from brainjepa.federation.averaging import RunningMean

log = logging.getLogger(__name__)
RANDOM_INIT_SEED = 10_000  # offset of the seeds that draw untrained backbones


def init_seed(recipe: DownstreamConfig) -> int:
    """The torch seed a model is built from: head init and drop-path from the run's seed; an untrained
    backbone (scratch, random_probe) from its own stream, so that it is not the very initialisation a
    pretraining run with the same seed started from."""
    return recipe.seed if recipe.pretrained else RANDOM_INIT_SEED + recipe.seed


def reaches_eval_point(recipe: DownstreamConfig, done: int, n: int) -> bool:
    """Whether the chunk of `n` steps that ended at step `done` passed an `eval_every` point (or the end)."""
    return done % recipe.eval_every < n or done == recipe.steps


def state_vector(model: torch.nn.Module) -> torch.Tensor:
    """(P,) fp32: every floating entry of the state dict (weights and BatchNorm statistics), in order."""
    return torch.cat([v.detach().reshape(-1).float() for v in model.state_dict().values() if v.is_floating_point()])


def load_state_vector(model: torch.nn.Module, vec: torch.Tensor) -> None:
    state, offset = model.state_dict(), 0
    with torch.no_grad():
        for v in state.values():
            if v.is_floating_point():
                v.copy_(vec[offset : offset + v.numel()].view_as(v))
                offset += v.numel()
    if offset != vec.numel():
        raise ValueError(f"weight vector has {vec.numel()} values, the model {offset}")


@dataclass
class FitResult:
    model: DownstreamModel  # holding the selected weights
    target: TargetScale
    best_step: int
    val: dict[str, float]  # the selected model's scan-weighted validation metrics
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, val primary)


def pooled(sites: list[LabelledSite], split: str) -> Split:
    parts = [s.splits[split] for s in sites]
    return Split(
        [x for p in parts for x in p.series],
        np.concatenate([p.y for p in parts]),
        [f"{s.site}/{i}" for s, p in zip(sites, parts, strict=True) for i in p.ids],
    )


def validate(model: DownstreamModel, sites: list[LabelledSite], target: TargetScale, n_frames: int) -> dict:
    task, w = sites[0].task, model.recipe.eval_windows
    per_site = [(split_metrics(model, s.val, task, target, n_frames, w), len(s.val)) for s in sites if len(s.val)]
    return weighted_metrics(per_site, task.kind)


def site_round(
    model: DownstreamModel,
    site: LabelledSite,
    target: TargetScale,
    start: int,
    n_steps: int,
    total: int,
    n_frames: int,
    device: torch.device | str = "cpu",
    group: RankGroup | None = None,
) -> float:
    """`n_steps` optimizer steps of `model` on the site's training scans from global step `start`;
    returns the mean loss (one host sync). Drop-path draws from torch's RNG, seeded by (recipe seed,
    round position, site name): the same draws in this process, at a Flower site and on every rank of
    a `group` (`brainjepa.distributed`: each trains on its rows of the same batches)."""
    r = model.recipe
    seed = np.random.SeedSequence([r.seed, start, zlib.crc32(site.site.encode())])
    torch.manual_seed(int(seed.generate_state(1)[0]))
    step_fn = DownstreamStep(model, site.task, total, target, device, labels=site.train.y, group=group)
    batches = TrainBatches(site.train, n_frames, r.batch_size, r.seed)
    losses = [step_fn(*batches[s], s) for s in range(start, start + n_steps)]
    return float(torch.stack(losses).mean())


def fit(
    backbone: Backbone,
    task: TaskSpec,
    recipe: DownstreamConfig,
    sites: list[LabelledSite],
    mode: str,
    local_steps: int = 10,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> FitResult:
    """Train `recipe.steps` optimizer steps (per site, in `federated` mode) and keep the best on validation."""
    if mode not in ("federated", "centralized", "local"):
        raise ValueError(f"mode: expected federated, centralized or local, got '{mode}'")
    if mode == "local" and len(sites) != 1:
        raise ValueError(f"local mode trains on one site, got {len(sites)}")
    torch.manual_seed(init_seed(recipe))
    model = DownstreamModel(backbone, task, recipe).to(device)
    n_frames = backbone.model.n_frames
    target = TargetScale.of(task, [s.train.y for s in sites])
    if recipe.frozen_backbone and recipe.probe_solver == "lbfgs":
        if mode != "federated":
            return solve_probe(model, sites, target, n_frames)
        log.info(
            "%s %s: a federated probe trains by FedAvg SGD (probe_solver lbfgs is for centralized / local)",
            recipe.method,
            task.name,
        )
    primary = PRIMARY[task.kind]
    best: tuple[dict, dict, int] | None = None
    history: list[tuple[int, float, float]] = []
    total = recipe.steps
    chunk = local_steps if mode == "federated" else recipe.eval_every
    if mode != "federated":  # one optimizer over the whole run
        train = pooled(sites, "train")
        step_fn = DownstreamStep(model, task, total, target, device, labels=train.y)
        batches = TrainBatches(train, n_frames, recipe.batch_size, recipe.seed)
    bar = tqdm(total=total, desc=f"{recipe.method} {mode} {task.name}", disable=not progress, leave=False)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        if mode == "federated":
            loss = _federated_round(model, sites, target, start, n, total, n_frames, device)
        else:
            loss = float(torch.stack([step_fn(*batches[s], s) for s in range(start, start + n)]).mean())
        bar.update(n)
        done = start + n
        if reaches_eval_point(recipe, done, n):
            val = validate(model, sites, target, n_frames)
            history.append((done, loss, val[primary]))
            if best is None or is_better(task.kind, val[primary], best[1][primary]):
                best = (copy.deepcopy(model.state_dict()), val, done)
    bar.close()
    assert best is not None
    model.load_state_dict(best[0])
    return FitResult(model, target, best[2], best[1], history)


def _federated_round(
    model: DownstreamModel,
    sites: list[LabelledSite],
    target: TargetScale,
    start: int,
    n: int,
    total: int,
    n_frames: int,
    device: torch.device | str,
) -> float:
    """One FedAvg round in this process: the same site work and averaging as over Flower."""
    global_vec = state_vector(model)
    mean, losses = RunningMean(), []
    for site in sites:
        load_state_vector(model, global_vec)
        losses.append(site_round(model, site, target, start, n, total, n_frames, device))
        mean.add({"model": state_vector(model)}, len(site.train))
    load_state_vector(model, mean.result()["model"])
    return float(np.mean(losses))


# inverse L2 strength C (logistic); ridge alpha = 1 / C. The same grid as the baselines' (`baselines.FC_GRID`),
# wide enough that cross-validation over the training scans seldom picks an end of it.
PROBE_STRENGTHS = tuple(float(c) for c in np.logspace(-5, 4, 10))


@torch.no_grad()
def window_features(model: DownstreamModel, split: Split, n_frames: int, n_windows: int, chunk: int = 32) -> np.ndarray:
    """(N * W, F) float64: the frozen backbone's pooled features of every scan's `n_windows` evaluation
    windows (the windows `predict` averages over), scan-major."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x in window_chunks(split, n_frames, n_windows, chunk):  # (n, W, R, T)
        f = model.features(x.reshape(-1, *x.shape[2:]).to(device))  # (n * W, F) or (n * W, R, 2D)
        out.append(f.flatten(1).double().cpu().numpy())
    return np.concatenate(out)


def solve_probe(model: DownstreamModel, sites: list[LabelledSite], target: TargetScale, n_frames: int) -> FitResult:
    """The probe's head solved on frozen features: its BatchNorm takes the training features' mean and
    variance, the Linear layer an L2-regularised logistic regression (classification) or ridge regression
    (regression, on the scaled target) fitted with scikit-learn on every training window. The strength
    (PROBE_STRENGTHS) is chosen by 5-fold cross-validation over the training scans (recipe `select: cv`,
    `brainjepa.downstream.selection`) or on the validation split (`select: validation`, through the same
    `validate` as the trained methods). history: one row per candidate (its index, its training loss
    (validation rule; NaN under cv), its cross-validated or validation primary metric)."""
    from brainjepa.downstream.selection import best_index, can_cross_validate, cv_scores

    task, recipe = sites[0].task, model.recipe
    train = pooled(sites, "train")
    w = recipe.eval_windows
    x = window_features(model, train, n_frames, w)  # (N * W, F)
    y = np.repeat(train.y, w)  # (N * W,)
    norm, linear = model.head[0], model.head[-1]
    mean, var = x.mean(0), x.var(0)
    with torch.no_grad():
        norm.running_mean.copy_(torch.from_numpy(mean))
        norm.running_var.copy_(torch.from_numpy(var))
    z = (x - mean) / np.sqrt(var + norm.eps)  # what the BatchNorm gives in eval mode
    if isinstance(model.head[1], BlockWeight):  # pool roi_std_fc: the blocks' fixed weights, as the head has
        z = z * model.head[1].weight.double().numpy()
    primary = PRIMARY[task.kind]
    what = f"{recipe.method} {task.name}"

    def install(c: float) -> float:
        weight, bias, loss = _solved_head(task, c, z, y, target)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
        return loss

    select = recipe.select
    if select == "cv" and not can_cross_validate(train.y, task.kind):
        log.warning(
            "%s: the training scans cannot make 2 folds (a class with one scan): strength chosen on validation", what
        )
        select = "validation"
    if select == "cv":

        def fit_predict(c: float, z_fit: np.ndarray, y_fit: np.ndarray, z_test: np.ndarray) -> np.ndarray:
            weight, bias, _ = _solved_head(task, c, z_fit, y_fit, target)
            out = z_test @ weight.T + bias  # (m, n_outputs)
            if task.kind == "regression":
                return out[:, 0] * target.scale + target.center  # (m,)
            e = np.exp(out - out.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)  # (m, C)

        scan = np.repeat(np.arange(len(train)), w)  # (N * W,) each window's scan
        scores = cv_scores(fit_predict, z, y, scan, task.kind, PROBE_STRENGTHS, recipe.seed, task.n_outputs)
        chosen = best_index(scores, task.kind, PROBE_STRENGTHS, what)
        install(PROBE_STRENGTHS[chosen])
        val = validate(model, sites, target, n_frames)
        history = [(i, float("nan"), float(s)) for i, s in enumerate(scores)]
        rule = f"by {len(train)}-scan cross-validation ({primary} {scores[chosen]:.3f})"
    else:
        best: tuple[dict, dict, int] | None = None
        history = []
        for i, c in enumerate(PROBE_STRENGTHS):
            loss = install(c)
            cand = validate(model, sites, target, n_frames)
            history.append((i, loss, cand[primary]))
            if best is None or is_better(task.kind, cand[primary], best[1][primary]):
                best = (copy.deepcopy(model.state_dict()), cand, i)
        assert best is not None
        model.load_state_dict(best[0])
        _, val, chosen = best
        best_index(np.array([h[2] for h in history]), task.kind, PROBE_STRENGTHS, what)  # the grid-end warning
        rule = f"on validation ({primary} {val[primary]:.3f})"
    log.info(
        "%s: probe solved on %d windows x %d features, C = %g chosen %s",
        what,
        z.shape[0],
        z.shape[1],
        PROBE_STRENGTHS[chosen],
        rule,
    )
    return FitResult(model, target, chosen, val, history)


def _solved_head(
    task: TaskSpec, c: float, z: np.ndarray, y: np.ndarray, target: TargetScale
) -> tuple[np.ndarray, np.ndarray, float]:
    """(weight (n_outputs, F), bias (n_outputs,), training loss) of the L2 logistic (C = c) or ridge
    (alpha = 1 / c, on the scaled target) regression of y on the standardised features z (M, F)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import log_loss

    weight = np.zeros((task.n_outputs, z.shape[1]))
    bias = np.zeros(task.n_outputs)
    if task.kind == "regression":
        scaled = (y - target.center) / target.scale
        reg = Ridge(alpha=1.0 / c).fit(z, scaled)
        weight[0], bias[0] = reg.coef_, reg.intercept_
        return weight, bias, float(np.mean((reg.predict(z) - scaled) ** 2))
    if len(np.unique(y)) < 2:  # one class in training: predict it
        bias[int(y[0])] = 10.0
        return weight, bias, 0.0
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(z, y)
    rows = clf.classes_.astype(int)
    if len(rows) == 2:  # one logit difference: softmax([0, w.z + b]) is its sigmoid
        weight[rows[1]], bias[rows[1]] = clf.coef_[0], clf.intercept_[0]
        bias[np.setdiff1d(np.arange(task.n_outputs), rows)] = -30.0  # classes absent in training
    else:  # one logit per class seen in training; absent classes get -30
        bias[:] = -30.0
        weight[rows], bias[rows] = clf.coef_, clf.intercept_
    return weight, bias, float(log_loss(y, clf.predict_proba(z), labels=clf.classes_))
