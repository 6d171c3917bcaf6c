"""Methods compared with uncertainty: per-subject predictions -> 95 % intervals and paired differences.

For every (experiment, task, method, training) the per-subject predictions of `brainjepa evaluate`
(predictions.csv: one row per test subject, training seed and fitted model) become the arrays of
`brainjepa.downstream.intervals`: the subjects of every test site of every cohort, each (cohort, site) a
stratum, each (seed, fine-tuning site) a replicate. For classification, a test site whose subjects hold a
single class has no AUROC of its own: the test sites of its cohort then form one stratum (one fitted model
scores them all, so their scores share a scale), and the report says so. Every method gets an interval per metric; every neural
method gets its paired difference to the best baseline on the same resampled subjects. "Best" is the
baseline with the highest point estimate of the ranking metric (AUROC; regression: R²) on the test
subjects: the strongest comparison for the neural method, never a choice made in its favour. Every
pretrained method also gets its paired difference to the same model untrained (probe - random_probe,
finetune - scratch): what pretraining buys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from brainjepa.downstream import intervals
from brainjepa.downstream.report import LABELS

log = logging.getLogger(__name__)

SHOWN: dict[str, tuple[str, ...]] = {
    "classification": ("balanced_acc", "auroc"),
    "regression": ("r2", "mae", "pearson_r"),
}
RANKING: dict[str, str] = {"classification": "auroc", "regression": "r2"}
UNTRAINED: dict[str, str] = {"probe": "random_probe", "finetune": "scratch"}  # pretrained -> the same model untrained


@dataclass(frozen=True)
class Comparison:
    rows: list[dict]  # experiment, task, method, training, metric, versus ("" or the baseline), estimate, lo, hi
    best_baseline: dict[tuple[str, str], str]  # (experiment, task) -> baseline method
    pooled: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)  # (experiment, task) -> cohorts


@dataclass(frozen=True)
class MethodPredictions:
    subjects: list[tuple[str, str, int]]  # N x (cohort, site, subject index), sorted
    y: np.ndarray  # (N,)
    scores: np.ndarray  # (S, N, C) class probabilities | (S, N) predictions; S replicates (seed, trained_on)
    group: np.ndarray  # (N,) int stratum: (cohort, site), or (cohort, pooled sites)
    pooled: tuple[str, ...] = ()  # cohorts whose test sites form one stratum (a site held a single class)


def method_predictions(rows: Sequence[Mapping], kind: str) -> MethodPredictions:
    """The arrays of one method's prediction rows (all replicates must score the same subjects)."""
    reps: dict[tuple, dict[tuple, Mapping]] = {}
    for r in rows:
        reps.setdefault((r["seed"], r["trained_on"]), {})[(r["cohort"], r["site"], int(r["subject"]))] = r
    subjects = sorted(next(iter(reps.values())))
    for key, per in reps.items():
        if sorted(per) != subjects:
            raise ValueError(f"replicate {key} scores other subjects than the first one")
    first = next(iter(reps.values()))
    y = np.array([first[s]["y"] for s in subjects], dtype=np.float64)
    if kind == "classification":
        n_classes = sum(1 for k in first[subjects[0]] if k.startswith("p") and k[1:].isdigit())
        scores = np.array([[[per[s][f"p{c}"] for c in range(n_classes)] for s in subjects] for per in reps.values()])
        y = y.astype(np.int64)
    else:
        scores = np.array([[per[s]["pred"] for s in subjects] for per in reps.values()], dtype=np.float64)
    pooled = _single_class_cohorts(subjects, y) if kind == "classification" else ()
    keys = [(c, "" if c in pooled else site) for c, site, _ in subjects]
    strata = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    group = np.array([strata[k] for k in keys], dtype=np.int64)
    return MethodPredictions(subjects, y, scores, group, pooled)


def _single_class_cohorts(subjects: Sequence[tuple[str, str, int]], y: np.ndarray) -> tuple[str, ...]:
    """The cohorts with a test site whose subjects hold a single class."""
    classes: dict[tuple[str, str], set[int]] = {}
    for (c, site, _), label in zip(subjects, y.tolist(), strict=True):
        classes.setdefault((c, site), set()).add(label)
    return tuple(dict.fromkeys(c for (c, _), k in classes.items() if len(k) < 2))


def compare(
    preds: Sequence[Mapping], kinds: Mapping[str, str], *, n_boot: int, baselines: Sequence[str], seed: int = 0
) -> Comparison:
    """Intervals of every method and paired differences of every non-baseline method to the best baseline."""
    by: dict[tuple[str, str, str, str], list[Mapping]] = {}
    for r in preds:
        by.setdefault((r["experiment"], r["task"], r["method"], r["training"]), []).append(r)
    arrays = {k: method_predictions(v, kinds[k[1]]) for k, v in by.items()}
    rows: list[dict] = []
    best: dict[tuple[str, str], str] = {}
    pooled = {(k[0], k[1]): mp.pooled for k, mp in arrays.items() if mp.pooled}
    for (exp, task), cohorts in pooled.items():
        log.warning(
            "%s / %s: a test site of cohort(s) %s holds a single class; each such cohort's test sites form one stratum",
            exp,
            task,
            ", ".join(cohorts),
        )
    for (exp, task, method, training), mp in arrays.items():
        for metric in SHOWN[kinds[task]]:
            iv = intervals.bootstrap_interval(
                mp.y, mp.scores, mp.group, kind=kinds[task], metric=metric, n_boot=n_boot, seed=seed
            )
            rows.append(_row((exp, task, method, training), metric, "", iv))
    for exp, task in dict.fromkeys((k[0], k[1]) for k in arrays):
        rank = RANKING[kinds[task]]
        cands = [
            r
            for r in rows
            if (r["experiment"], r["task"], r["metric"], r["versus"]) == (exp, task, rank, "")
            and r["method"] in baselines
        ]
        if not cands:
            continue
        b = max(cands, key=lambda r: r["estimate"])
        best[(exp, task)] = b["method"]
        ref = arrays[(exp, task, b["method"], b["training"])]
        for key, mp in arrays.items():
            if key[:2] != (exp, task) or key[2] in baselines:
                continue
            if mp.subjects != ref.subjects:
                raise ValueError(f"{exp} / {task}: {key[2]} and {b['method']} scored different subjects")
            rows += _differences(key, mp, ref, b["method"], kinds[task], n_boot, seed)
    for key, mp in arrays.items():  # what pretraining buys: the same model untrained
        exp, task, method, training = key
        untrained = UNTRAINED.get(method.partition(" ")[0])
        ref = arrays.get((exp, task, untrained, training)) or arrays.get((exp, task, untrained, "centralized"))
        if untrained is None or ref is None or ref.subjects != mp.subjects:
            continue
        rows += _differences(key, mp, ref, untrained, kinds[task], n_boot, seed)
    return Comparison(rows, best, pooled)


def _row(key: tuple[str, str, str, str], metric: str, versus: str, iv: intervals.Interval) -> dict:
    exp, task, method, training = key
    return {
        "experiment": exp,
        "task": task,
        "method": method,
        "training": training,
        "metric": metric,
        "versus": versus,
        "estimate": iv.estimate,
        "lo": iv.lo,
        "hi": iv.hi,
    }


def _differences(
    key: tuple[str, str, str, str],
    mp: MethodPredictions,
    ref: MethodPredictions,
    versus: str,
    kind: str,
    n_boot: int,
    seed: int,
) -> list[dict]:
    """The paired differences method - `versus` on every shown metric, on the same resampled subjects."""
    out = []
    for metric in SHOWN[kind]:
        iv = intervals.paired_difference(
            mp.y, mp.scores, ref.scores, mp.group, kind=kind, metric=metric, n_boot=n_boot, seed=seed
        )
        out.append(_row(key, metric, versus, iv))
    return out


def _iv(r: Mapping) -> intervals.Interval:
    return intervals.Interval(estimate=r["estimate"], lo=r["lo"], hi=r["hi"], n_boot=0, level=0.95)


def markdown(cmp: Comparison, experiment: str, tasks: Sequence[str], kinds: Mapping[str, str]) -> str:
    """One experiment: a table (rows = method · training, columns = task x metric, cells "estimate [lo, hi]",
    best estimate per column in bold), then each non-baseline method's paired difference to the best
    baseline."""
    rows = [r for r in cmp.rows if r["experiment"] == experiment]
    cols = [(t, m) for t in tasks for m in SHOWN[kinds[t]]]
    methods = list(dict.fromkeys((r["method"], r["training"]) for r in rows))
    cell = {(r["method"], r["training"], r["task"], r["metric"]): r for r in rows if not r["versus"]}
    best = {}
    for t, m in cols:
        vals = [cell[(me, tr, t, m)]["estimate"] for me, tr in methods if (me, tr, t, m) in cell]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            best[(t, m)] = min(vals) if m in ("mae", "mse") else max(vals)
    head = "| method | " + " | ".join(f"{t}: {LABELS.get(m, m)}" for t, m in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for me, tr in methods:
        out = []
        for t, m in cols:
            r = cell.get((me, tr, t, m))
            text = "–" if r is None else intervals.format_interval(m, _iv(r))
            out.append(f"**{text}**" if r is not None and r["estimate"] == best.get((t, m)) else text)
        lines.append(f"| {me} · {tr} | " + " | ".join(out) + " |")
    lines += [
        "",
        "*Estimate [95 % interval]: subjects resampled within each test site (and generated cohort), "
        "class counts kept; training seeds averaged. Best per column in bold.*",
    ]
    for t in tasks:
        cohorts = cmp.pooled.get((experiment, t))
        if cohorts:
            lines += [
                "",
                f"*{t}: a test site of cohort(s) {', '.join(cohorts)} holds a single class (no AUROC of its "
                "own); each such cohort's test sites are resampled and scored as one stratum.*",
            ]
    best_rows = [r for r in rows if r["versus"] and r["versus"] == cmp.best_baseline.get((experiment, r["task"]))]
    untrained = [r for r in rows if r["versus"] and r["versus"] in UNTRAINED.values() and r not in best_rows]
    for diffs, what in (
        (best_rows, "the best baseline"),
        (untrained, "the same model untrained (what pretraining buys)"),
    ):
        if not diffs:
            continue
        lines += [
            "",
            f"Paired differences to {what} (same resampled subjects; > 0: the method is better, for MAE < 0):",
            "",
        ]
        for me, tr, t, versus in dict.fromkeys((r["method"], r["training"], r["task"], r["versus"]) for r in diffs):
            parts = [
                f"{LABELS.get(r['metric'], r['metric'])} {intervals.format_interval(r['metric'], _iv(r), signed=True)}"
                for r in diffs
                if (r["method"], r["training"], r["task"], r["versus"]) == (me, tr, t, versus)
            ]
            lines.append(f"- {t}: {me} · {tr} - {versus}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def provenance_markdown(record: Mapping) -> str:
    git = record.get("git", {})
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    on = record.get("scored_on", "test")
    lines = [
        f"- protocol sha256 `{record['protocol_sha256'][:16]}`; code `{str(git.get('commit'))[:12]}`{dirty}",
        f"- {on} data sha256 `{record[f'{on}_data_sha256'][:16]}` ({len(record.get('data', {}))} site(s) "
        "fingerprinted)",
    ]
    if on == "validation":
        lines.append("- scored on the fine-tuning sites' validation splits: no test split was read, no ledger entry")
    versions = sorted(
        {str(d["generator"].get("generator_version")) for d in record.get("data", {}).values() if d.get("generator")}
    )
    if versions:
        lines.append(f"- generated data: generator version {', '.join(versions)}")
    s = record.get("scoring")
    if s:
        lines.append(
            f"- this test data was scored before {s['times_scored_before_by_this_protocol']} time(s) by this "
            f"protocol{' (--rescore)' if s['rescore'] else ''} and "
            f"{s['times_scored_before_by_other_protocols']} time(s) by other protocols"
        )
    if record.get("rebuilt"):
        lines.append(f"- {record['rebuilt']}")
    lines.append("- everything else (resolved protocol, command, package versions, fingerprints): provenance.json")
    return "\n".join(lines) + "\n"
