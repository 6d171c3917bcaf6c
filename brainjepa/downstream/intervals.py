"""Subject-level bootstrap intervals of the downstream metrics, and paired differences between methods.

The data: one method's per-subject predictions on the test subjects, `scores` (S, N, C) class
probabilities (classification) or (S, N) predictions (regression) for S training seeds and N test
subjects, the truth `y` (N,) and `group` (N,) ints, the stratum of each subject (a test site within a
generated cohort). The point estimate is the mean over groups, weighted by the group's subject count, of
the mean over seeds of the metric computed within the group; AUROC pooled across groups would mix the
score scales of different fitted models.

The bootstrap resamples SUBJECTS with replacement within each group (for classification within each
class of each group, so every resample keeps the group's class counts and AUROC / balanced accuracy are
always defined); a subject's S scores move together, and `paired_difference` scores two methods on the
same resamples. The interval is the percentile interval of the resampled values. The draws depend only
on (seed, y, group, n_boot): two calls with the same seed on the same subjects use the same resamples.

The metrics run vectorised over a block of resamples: a resample is a row of subject counts w (B, N),
every metric is a weighted sum over subjects (AUROC in its Mann-Whitney form over the subjects sorted by
score once per seed, ties counted 1/2), and blocks of about CHUNK subject draws keep memory bounded.
They equal `brainjepa.downstream.metrics` on the resampled subjects (see that module for the
conventions: F1 of class 1 or macro, AUROC one-vs-rest macro over the classes present, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from brainjepa.downstream.counted_metrics import counts, metric_fn
from brainjepa.downstream.metrics import METRICS

log = logging.getLogger(__name__)
CHUNK = 1 << 16  # subject draws per block; a block's working arrays hold about CHUNK * S floats each


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile interval [lo, hi] at level, from n_boot resamples (those
    whose value was finite; NaN bounds when none was)."""

    estimate: float
    lo: float
    hi: float
    n_boot: int
    level: float


# ---------------------------------------------------------------- input checks


def _check_kind_metric(kind: str, metric: str) -> None:
    if kind not in METRICS:
        raise ValueError(f"kind must be one of {sorted(METRICS)}, got '{kind}'")
    if metric not in METRICS[kind]:
        raise ValueError(f"metric '{metric}' is not a {kind} metric; expected one of {METRICS[kind]}")


def _truth(y: object, kind: str) -> np.ndarray:
    """y (N,) as int64 class indices (classification) or finite float64 values (regression)."""
    t = np.asarray(y)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"y must be a non-empty 1-D array (N,), got shape {t.shape}")
    if kind == "regression":
        if t.dtype.kind not in "iuf":
            raise ValueError(f"y must be numeric for regression, got dtype {t.dtype}")
        t = t.astype(np.float64)
        if not np.all(np.isfinite(t)):
            raise ValueError(f"y holds {int(np.sum(~np.isfinite(t)))} NaN/inf values (of {t.size})")
        return t
    if t.dtype.kind == "f":
        if not np.all(np.isfinite(t)) or not np.all(t == np.round(t)):
            raise ValueError("y must be integer class indices, got non-integer or NaN floats")
    elif t.dtype.kind not in "iub":
        raise ValueError(f"y must be integer class indices, got dtype {t.dtype}")
    t = t.astype(np.int64)
    if t.min() < 0:
        raise ValueError(f"y holds negative class index {t.min()}")
    return t


def _groups(group: object, n: int) -> np.ndarray:
    g = np.asarray(group)
    if g.shape != (n,):
        raise ValueError(f"group must have shape (N,) = ({n},) like y, got {g.shape}")
    if g.dtype.kind not in "iub":
        raise ValueError(f"group must hold integer stratum ids, got dtype {g.dtype}")
    return g.astype(np.int64)


def _scores(scores: object, name: str, kind: str, y: np.ndarray) -> np.ndarray:
    """scores as float64 (S, N, C) or (S, N), checked against y (N,)."""
    s = np.asarray(scores)
    if s.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    want = "(S, N, C) class probabilities" if kind == "classification" else "(S, N) predictions"
    if s.ndim != (3 if kind == "classification" else 2):
        raise ValueError(
            f"{name} must be {want} (S seeds, N subjects), got shape {s.shape}; "
            f"a single seed needs a leading axis of length 1"
        )
    if s.shape[0] == 0:
        raise ValueError(f"{name} holds no seed (S = 0), shape {s.shape}")
    if s.shape[1] != y.shape[0]:
        raise ValueError(f"{name} has {s.shape[1]} subjects (axis 1 of {s.shape}) but y has {y.shape[0]}")
    if kind == "classification":
        if s.shape[2] < 2:
            raise ValueError(f"{name} must have C >= 2 class columns, got shape {s.shape}")
        if y.max() >= s.shape[2]:
            raise ValueError(f"y holds class index {y.max()} but {name} has only {s.shape[2]} classes")
    bad = ~np.isfinite(s)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN/inf values (of {s.size}), first at index {tuple(int(i) for i in where)}"
        )
    return s


def _check_strata(y: np.ndarray, group: np.ndarray, kind: str) -> None:
    for g in np.unique(group):
        yg = y[group == g]
        if kind == "classification" and np.unique(yg).size < 2:
            raise ValueError(
                f"group {g} holds a single class ({yg[0]}, {yg.size} subjects): its metrics "
                f"are undefined; every group needs at least two classes"
            )
        if yg.size < 2:
            raise ValueError(f"group {g} holds a single subject; every group needs at least two")


def _check_boot(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def batch_metric(y: object, scores: object, idx: object, *, kind: str, metric: str) -> np.ndarray:
    """The metric of each seed on each resample: idx (B, k) rows of subject indices into y (N,) and
    scores (S, N, C) / (S, N); returns (B, S), equal to `brainjepa.downstream.metrics` on
    (y[idx[b]], scores[s, idx[b]]). NaN where that metric is undefined (one class for AUROC, a constant
    side for pearson_r)."""
    _check_kind_metric(kind, metric)
    t = _truth(y, kind)
    s = _scores(scores, "scores", kind, t)
    i = np.asarray(idx)
    if i.ndim != 2 or i.shape[1] < 1 or i.dtype.kind not in "iu":
        raise ValueError(f"idx must be a 2-D int array (B, k) of subject indices, got {i.shape} {i.dtype}")
    if i.size and (i.min() < 0 or i.max() >= t.size):
        raise ValueError(f"idx holds indices {i.min()}..{i.max()}, outside 0..{t.size - 1}")
    fn = metric_fn(kind, metric, t, s)
    block = max(1, CHUNK // t.size)
    out = [fn(counts(i[a : a + block], t.size)) for a in range(0, i.shape[0], block)]
    return np.concatenate(out, axis=0) if out else np.zeros((0, s.shape[0]))


# ---------------------------------------------------------------- resampling


def _draws(y: np.ndarray, kind: str, n_boot: int, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
    """Blocks (first resample, local indices (b, n)) of one group's resamples: position j draws from the
    subjects of j's class (classification) or from all n (regression), with replacement. A class with a
    single subject (e.g. subject identification: one test scan per subject) would make every stratified
    resample the same sample: such a group is resampled without strata (a resample may then miss a class;
    the metrics average over the classes it holds)."""
    n = y.size
    strata = [np.flatnonzero(y == c) for c in np.unique(y)] if kind == "classification" else [np.arange(n)]
    if min(m.size for m in strata) < 2:
        strata = [np.arange(n)]
    block = max(1, CHUNK // n)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        idx = np.empty((b, n), dtype=np.intp)
        for members in strata:
            idx[:, members] = members[rng.integers(0, members.size, size=(b, members.size))]
        yield start, idx


def _group_rngs(seed: int, group: np.ndarray) -> list[tuple[np.ndarray, np.random.Generator]]:
    """(members, generator) per group, in sorted group order; each group draws from its own stream."""
    ids = np.unique(group)
    children = np.random.SeedSequence(seed).spawn(ids.size)
    rngs = [np.random.default_rng(c) for c in children]
    return [(np.flatnonzero(group == g), r) for g, r in zip(ids, rngs, strict=True)]


def resample_indices(y: object, group: object, *, kind: str, n_boot: int, seed: int = 0) -> np.ndarray:
    """The subject resamples the intervals use, as (n_boot, N) indices: entry [b, i] is the subject drawn
    into i's place, from i's group (and, for classification, i's class when every class of the group has
    two subjects or more: then y[idx] == y)."""
    if kind not in METRICS:
        raise ValueError(f"kind must be one of {sorted(METRICS)}, got '{kind}'")
    _check_boot(n_boot, 0.5)
    t = _truth(y, kind)
    g = _groups(group, t.size)
    _check_strata(t, g, kind)
    out = np.empty((n_boot, t.size), dtype=np.intp)
    for members, rng in _group_rngs(seed, g):
        for start, local in _draws(t[members], kind, n_boot, rng):
            out[start : start + local.shape[0], members] = members[local]
    return out


def _replicates(
    y: np.ndarray, scores: list[np.ndarray], group: np.ndarray, kind: str, metric: str, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Estimates (M,) and resampled values (M, n_boot) of each method's metric, all on the same draws."""
    est = np.zeros(len(scores))
    reps = np.zeros((len(scores), n_boot))
    for members, rng in _group_rngs(seed, group):
        weight = members.size / y.size
        fns = [metric_fn(kind, metric, y[members], s[:, members]) for s in scores]
        for m, fn in enumerate(fns):
            est[m] += weight * fn(np.ones((1, members.size))).mean(axis=1)[0]
        for start, local in _draws(y[members], kind, n_boot, rng):
            w = counts(local, members.size)
            for m, fn in enumerate(fns):
                reps[m, start : start + local.shape[0]] += weight * fn(w).mean(axis=1)
    return est, reps


def _percentile(estimate: float, values: np.ndarray, level: float) -> Interval:
    finite = values[np.isfinite(values)]
    if finite.size < values.size:
        log.warning(
            "%d of %d bootstrap resamples gave an undefined metric; the interval uses the other %d",
            values.size - finite.size,
            values.size,
            finite.size,
        )
    if finite.size == 0:
        return Interval(float(estimate), math.nan, math.nan, 0, level)
    lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(estimate), float(lo), float(hi), int(finite.size), level)


def _prepare(
    y: object, scores: list[tuple[str, object]], group: object, kind: str, metric: str, n_boot: int, level: float
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    _check_kind_metric(kind, metric)
    _check_boot(n_boot, level)
    t = _truth(y, kind)
    arrays = [_scores(s, name, kind, t) for name, s in scores]
    if kind == "classification" and len({a.shape[2] for a in arrays}) > 1:
        raise ValueError(f"the methods' class counts differ: {[a.shape for a in arrays]}")
    g = _groups(group, t.size)
    _check_strata(t, g, kind)
    return t, arrays, g


def bootstrap_interval(
    y: object,
    scores: object,
    group: object,
    *,
    kind: str,
    metric: str,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The metric's estimate (group-weighted mean of the seed-mean within each group) on y (N,),
    scores (S, N, C) / (S, N) and group (N,), with its percentile interval over n_boot subject resamples
    (within groups, class-stratified for classification; see the module docstring)."""
    t, (s,), g = _prepare(y, [("scores", scores)], group, kind, metric, n_boot, level)
    est, reps = _replicates(t, [s], g, kind, metric, n_boot, seed)
    return _percentile(est[0], reps[0], level)


def paired_difference(
    y: object,
    scores_a: object,
    scores_b: object,
    group: object,
    *,
    kind: str,
    metric: str,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The difference a - b of two methods' metric on the same subjects (their seed counts may differ),
    with its percentile interval over the same n_boot resamples for both. Always a - b: for mse and
    mae (lower is better) a negative difference means a is better."""
    t, (a, b), g = _prepare(y, [("scores_a", scores_a), ("scores_b", scores_b)], group, kind, metric, n_boot, level)
    est, reps = _replicates(t, [a, b], g, kind, metric, n_boot, seed)
    return _percentile(est[0] - est[1], reps[0] - reps[1], level)


# ---------------------------------------------------------------- text


def format_interval(metric: str, iv: Interval, *, signed: bool = False) -> str:
    """ "91.2 [86.0, 95.1]": percent with 1 decimal (acc, balanced_acc, f1, auroc), 2 decimals
    (pearson_r, r2), 3 significant digits otherwise; signed=True (differences) puts a sign on the
    estimate: "+3.1 [-1.2, 7.4]". An undefined estimate reads "–", undefined bounds "[–, –]"."""
    from brainjepa.downstream.report import PERCENT, _sig3  # here: the report may import this module

    if math.isnan(iv.estimate):
        return "–"

    def text(v: float, sign: str = "") -> str:
        if metric in PERCENT:
            return f"{100 * v:{sign}.1f}"
        if metric in ("pearson_r", "r2"):
            return f"{v:{sign}.2f}"
        return ("+" if sign and v >= 0 else "") + _sig3(v)

    head = text(iv.estimate, "+" if signed else "")
    if math.isnan(iv.lo) or math.isnan(iv.hi):
        return f"{head} [–, –]"
    return f"{head} [{text(iv.lo)}, {text(iv.hi)}]"
