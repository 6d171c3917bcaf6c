"""Two evaluations of one protocol, e.g. two checkpoints, compared on the same test subjects.

`brainjepa evaluate` compares methods within one run. To ask whether checkpoint A is better than checkpoint
B (two pretraining recipes, two federated schedules), evaluate both with the same protocol and pass the two
`predictions.csv`: for every (experiment, task, method, training) present in both, this prints A's and
B's estimate and the paired difference A - B with its 95 % interval, the same subjects resampled for both
(`brainjepa.downstream.intervals.paired_difference`, the resampling `evaluate` uses). Both runs must score
the same subjects, with the same truth.

    python scripts/paired_runs.py runs/a/predictions.csv runs/b/predictions.csv --label-a "20 x 100" \
        --label-b "80 x 25" --out report.md
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from brainjepa.downstream import intervals
from brainjepa.downstream.comparison import SHOWN, method_predictions
from brainjepa.errors import DataError

log = logging.getLogger(__name__)
KEY = ("experiment", "task", "method", "training")


def read_predictions(path: Path) -> dict[tuple[str, ...], list[dict]]:
    """predictions.csv rows grouped by (experiment, task, method, training)."""
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file (brainjepa evaluate writes predictions.csv)")
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            numeric = {k: float(v) for k, v in row.items() if k in ("y", "pred") or (k[:1] == "p" and k[1:].isdigit())}
            groups[tuple(row[k] for k in KEY)].append(row | numeric)
    return groups


def kind_of(rows: list[dict]) -> str:
    return "classification" if "p0" in rows[0] else "regression"


def compare_runs(a: Path, b: Path, n_boot: int = 2000, seed: int = 0, methods: tuple[str, ...] = ()) -> list[dict]:
    """One row per shared (experiment, task, method, training) and metric: estimate of A, of B, A - B.
    `methods`: only those (e.g. the checkpoint's `probe`; the baselines do not depend on it)."""
    pa, pb = read_predictions(a), read_predictions(b)
    shared = sorted(k for k in set(pa) & set(pb) if not methods or k[2] in methods)
    if not shared:
        raise DataError(f"{a} and {b} share no (experiment, task, method, training)")
    out = []
    for key in shared:
        kind = kind_of(pa[key])
        ma, mb = method_predictions(pa[key], kind), method_predictions(pb[key], kind)
        if ma.subjects != mb.subjects or not np.array_equal(ma.y, mb.y):
            raise DataError(f"{key}: the two runs score different subjects or truths; not a paired comparison")
        for metric in SHOWN[kind]:
            args = dict(kind=kind, metric=metric, n_boot=n_boot, seed=seed)
            ia = intervals.bootstrap_interval(ma.y, ma.scores, ma.group, **args)
            ib = intervals.bootstrap_interval(mb.y, mb.scores, mb.group, **args)
            d = intervals.paired_difference(ma.y, ma.scores, mb.scores, ma.group, **args)
            out.append(dict(zip(KEY, key, strict=True)) | {"metric": metric, "a": ia, "b": ib, "a_minus_b": d})
    return out


def markdown(rows: list[dict], label_a: str, label_b: str) -> str:
    lines = [
        f"| experiment | task | method | metric | {label_a} | {label_b} | {label_a} - {label_b} (paired) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metric"]
        lines.append(
            f"| {r['experiment']} | {r['task']} | {r['method']} · {r['training']} | {m} | "
            f"{intervals.format_interval(m, r['a'])} | {intervals.format_interval(m, r['b'])} | "
            f"{intervals.format_interval(m, r['a_minus_b'], signed=True)} |"
        )
    return "\n".join(lines) + "\n"


def main(
    a: Annotated[Path, typer.Argument(help="predictions.csv of run A (`brainjepa evaluate --out-dir`)")],
    b: Annotated[Path, typer.Argument(help="predictions.csv of run B, same protocol and test subjects")],
    label_a: Annotated[str, typer.Option(help="Name of run A in the table.")] = "A",
    label_b: Annotated[str, typer.Option(help="Name of run B in the table.")] = "B",
    method: Annotated[
        list[str] | None, typer.Option(help="Only this method (repeat for more), e.g. probe; default: all shared.")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of the test subjects.")] = 2000,
    out: Annotated[Path | None, typer.Option(help="Also write the table to this Markdown file.")] = None,
) -> None:
    """Compare two evaluations of one protocol on the same test subjects: each run's estimate and the
    paired difference A - B with its 95 % interval (subjects resampled within test sites, the same
    resamples for both)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = markdown(compare_runs(a, b, n_boot, methods=tuple(method or ())), label_a, label_b)
    if out is not None:
        out.write_text(table)
        log.info("wrote %s", out)
    typer.echo(table)


if __name__ == "__main__":
    typer.run(main)
