"""Downstream results on disk: a CSV of result rows, Markdown tables (rows = methods, columns = tasks,
cells mean ± std over seeds, best per column in bold) and PNG bar charts (matplotlib, headless).

A result row is a dict with the keys experiment, method, training (federated | centralized | local | -),
task, seed, site (a test site, or "all") and one value per metric. Summary rows come from
`brainjepa.downstream.metrics.summarize` (keys `<metric>_mean`, `<metric>_std`, `<metric>_n`). Every
file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainjepa.downstream.metrics import higher_is_better, summarize
from brainjepa.plots import save_figure

ROW_KEYS: tuple[str, ...] = ("experiment", "method", "training", "task", "seed", "cohort", "site", "trained_on")
TEXT_KEYS = frozenset({"experiment", "method", "training", "task", "cohort", "site", "trained_on", "metric", "versus"})
TRAINING_ORDER: tuple[str, ...] = ("federated", "centralized", "local", "-")
PERCENT = frozenset({"acc", "balanced_acc", "f1", "auroc"})
LABELS: dict[str, str] = {
    "acc": "accuracy (%)",
    "balanced_acc": "balanced accuracy (%)",
    "f1": "F1 (%)",
    "auroc": "AUROC (%)",
    "mse": "MSE",
    "mae": "MAE",
    "pearson_r": "Pearson r",
    "r2": "R²",
}


READS = {
    "mean": "the mean over all ROI x time tokens (the reference's readout: what every scan shares dominates it)",
    "roi_std": "per ROI the mean and the std over time of its tokens (first-order: each ROI's level, amplitude "
    "and timescales; no relation between ROIs)",
    "roi_fc": "the connectivity of its tokens, per embedding dimension the correlation of two ROIs over time "
    "(second-order: relations between ROIs; no per-ROI amplitude)",
    "roi_std_fc": "both per-ROI statistics and the connectivity of its tokens, side by side, each block weighted "
    "alike (first- and second-order)",
}


def readout_note(pool: str, probe_solver: str, eval_windows: int) -> str:
    """One line for a report: what the neural methods read of the encoder (docs/downstream.md, "Pooling")."""
    solver = "solved (L2 logistic / ridge regression)" if probe_solver == "lbfgs" else "trained by SGD"
    return (
        f"**Readout** (`recipe.pool: {pool}`): the neural methods read the target encoder's tokens through "
        f"{READS[pool]}; probes {solver}; {eval_windows} window(s) per scan."
    )


def _write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Result rows as CSV: the row keys first (ROW_KEYS), then the other columns in first-seen order;
    a cell a row lacks is written empty."""
    if not rows:
        raise ValueError(f"no result rows to write to {path}")
    extra = [k for r in rows for k in r if k not in ROW_KEYS]
    columns = [k for k in ROW_KEYS if any(k in r for r in rows)] + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return _write_atomic(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by `write_csv`: text keys as str, seed as int, every other cell as float (empty: NaN)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        for k, v in r.items():
            if k in TEXT_KEYS:
                row[k] = v
            elif k == "seed":
                row[k] = int(v)
            else:
                row[k] = float(v) if v != "" else math.nan
        out.append(row)
    return out


def format_value(metric: str, mean: float, std: float) -> str:
    """A cell "mean ± std": percent with 1 decimal (acc, balanced_acc, f1, auroc), 2 decimals (pearson_r, r2),
    3 significant digits (mse, mae and anything else)."""
    if math.isnan(mean):
        return "–"
    std = 0.0 if math.isnan(std) else std
    if metric in PERCENT:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if metric in ("pearson_r", "r2"):
        return f"{mean:.2f} ± {std:.2f}"
    return f"{_sig3(mean)} ± {_sig3(std)}"


def _sig3(v: float) -> str:
    """3 significant digits, trailing zeros kept (8.00, 0.0894, 123, 1.23e+03)."""
    return f"{v:#.3g}".rstrip(".").replace(".e", "e") if v else "0"


def _cells(summary: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> dict[tuple, Mapping[str, Any]]:
    """Summary rows keyed by their values of keys; two rows with the same key are an error."""
    out: dict[tuple, Mapping[str, Any]] = {}
    for r in summary:
        key = tuple(r[k] for k in keys)
        if key in out:
            raise ValueError(
                f"two summary rows for {dict(zip(keys, key, strict=True))}: summarize or filter "
                f"the rows so that each {keys} appears once"
            )
        out[key] = r
    return out


def markdown_table(
    summary: Sequence[Mapping[str, Any]], methods: Sequence[str], tasks: Sequence[str], metric: str | Mapping[str, str]
) -> str:
    """A Markdown table of summary rows (one per method and task): rows = methods, columns = tasks, cells
    "mean ± std" of metric (one name, or one per task), best mean per column in bold (ties: all), then a
    caption line naming the metrics and the number of seeds. A missing cell reads "–"."""
    per_task = {t: metric if isinstance(metric, str) else metric[t] for t in tasks}
    cells = _cells(summary, ("method", "task"))
    best: dict[str, float] = {}
    for t, m in per_task.items():
        means = [cells[(me, t)][f"{m}_mean"] for me in methods if (me, t) in cells]
        means = [v for v in means if not math.isnan(v)]
        if means:
            best[t] = max(means) if higher_is_better(m) else min(means)
    lines = ["| Method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    seeds = set()
    for me in methods:
        row = []
        for t in tasks:
            m, r = per_task[t], cells.get((me, t))
            if r is None:
                row.append("–")
                continue
            text = format_value(m, r[f"{m}_mean"], r[f"{m}_std"])
            seeds.add(r[f"{m}_n"])
            row.append(f"**{text}**" if r[f"{m}_mean"] == best.get(t) else text)
        lines.append(f"| {me} | " + " | ".join(row) + " |")
    by_metric: dict[str, list[str]] = {}
    for t, m in per_task.items():
        by_metric.setdefault(m, []).append(t)
    named = "; ".join(f"{LABELS.get(m, m)} ({', '.join(ts)})" for m, ts in by_metric.items())
    n = "–" if not seeds else str(min(seeds)) if len(seeds) == 1 else f"{min(seeds)}–{max(seeds)}"
    runs = f"{n} seeds" if len(seeds) <= 1 else f"{n} runs (seeds; local training: seeds x fine-tuning sites)"
    lines += ["", f"*{named}: mean ± std over {runs}; best per column in bold.*"]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, sections: Sequence[tuple[str, str]], title: str | None = None) -> Path:
    """A Markdown file of sections (heading, text such as a `markdown_table`), under an optional title."""
    parts = [f"# {title}\n"] if title else []
    parts += [f"## {heading}\n\n{text.rstrip()}\n" for heading, text in sections]
    return _write_atomic(path, "\n".join(parts))


def _ordered(values: list[Any], order: Sequence[Any] = ()) -> list[Any]:
    """Unique values, those in order first (in that order), then the rest in first-seen order."""
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def _bars(
    summary: Sequence[Mapping[str, Any]],
    path: str | Path,
    metric: str,
    group: str,
    series: tuple[str, ...],
    title: str,
    group_order: Sequence[Any] = (),
    series_order: Sequence[Any] = (),
    named: Sequence[str] = (),
) -> Path:
    """Grouped bar chart: one group of bars per value of `group`, one bar (colour) per `series` tuple,
    height metric's mean, error bar its std. Series labels name the series keys that vary and those in
    `named`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [r for r in summary if not math.isnan(r.get(f"{metric}_mean", math.nan))]
    if not summary:
        raise ValueError(f"no summary row holds a {metric}_mean value to plot into {path}")
    cells = _cells(summary, (group, *series))
    groups = _ordered([r[group] for r in summary], group_order)
    keys = _ordered([tuple(r[k] for k in series) for r in summary])
    if series_order:  # the last series key in series_order, within the first-seen order of the others
        heads = _ordered([k[:-1] for k in keys])
        last = _ordered([k[-1] for k in keys], series_order)
        keys.sort(key=lambda k: (heads.index(k[:-1]), last.index(k[-1])))
    varying = [i for i, k in enumerate(series) if k in named or len({key[i] for key in keys}) > 1]
    varying = varying or [len(series) - 1]
    scale = 100.0 if metric in PERCENT else 1.0
    width = 0.8 / len(keys)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(4.5 + max(3.0, 0.35 * len(groups) * len(keys)), 4))  # legend at right
    for j, key in enumerate(keys):
        rows = [cells.get((g, *key)) for g in groups]
        mean = [scale * r[f"{metric}_mean"] if r else math.nan for r in rows]
        std = [scale * r[f"{metric}_std"] if r and not math.isnan(r[f"{metric}_std"]) else 0.0 for r in rows]
        label = " / ".join(str(key[i]) for i in varying)
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=label)
    ax.set_xticks(x, [str(g) for g in groups])
    ax.set_xlabel(group)
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_methods(summary: Sequence[Mapping[str, Any]], path: str | Path, metric: str) -> Path:
    """Methods per task (summary rows, one per method and task): bars of the mean, std error bars."""
    return _bars(summary, path, metric, "task", ("method",), f"methods per task: {LABELS.get(metric, metric)}")


def plot_training_modes(summary: Sequence[Mapping[str, Any]], path: str | Path, metric: str) -> Path:
    """Federated vs centralized vs local per task (summary rows, one per method, training and task)."""
    return _bars(
        summary,
        path,
        metric,
        "task",
        ("method", "training"),
        f"training modes per task: {LABELS.get(metric, metric)}",
        series_order=TRAINING_ORDER,
        named=("training",),
    )


def plot_per_site(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str, scored: str = "test") -> Path:
    """Per-site performance from result rows (`scored`: the split scored, test or validation): one group
    per site ("all" last), one bar per method / training / task, mean ± std over seeds."""
    present = ["site", "method"] + [k for k in ("task", "training") if all(k in r for r in rows)]
    summary = summarize(rows, present, [metric])
    sites = [r["site"] for r in summary]
    order = [s for s in dict.fromkeys(sites) if s != "all"] + (["all"] if "all" in sites else [])
    return _bars(
        summary,
        path,
        metric,
        "site",
        tuple(present[1:]),
        f"per site ({scored} split): {LABELS.get(metric, metric)}",
        group_order=order,
        named=("method",),
    )
