"""A design comparison on validation: AUROC with intervals of several validation scorings of the same cohorts.

Each run is a folder `brainjepa evaluate --score-on validation` wrote (OUT/validation/: predictions.csv,
intervals.csv, provenance.json) on the same generated cohorts, e.g. a pretraining recipe and its variant.
Per task, one row per run: every method's AUROC % [95 % interval], the probe's paired difference to the
random-init probe of the same run (what pretraining buys), and the probe's paired difference to the first
run's probe on the same resampled validation subjects (what the variant changes); with `--versus fc_tangent`
(repeatable) also each probe's paired difference to that baseline as the first run scored it (a variant run
may leave the baselines out: they do not depend on it). Refuses a folder that is not a validation scoring.

    .venv/bin/python scripts/validation_table.py \\
        default=experiments/what_each_method_reads/coupling/validation \\
        centered=experiments/reads_validation/coupling_centered/validation --out table.md
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from brainjepa.downstream import intervals
from brainjepa.downstream.comparison import method_predictions

METHODS = ("probe", "random_probe", "roi_spectrum", "fc", "fc_tangent")
N_BOOT = 2000


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(r: dict | None, signed: bool = False) -> str:
    if r is None:
        return "–"
    iv = intervals.Interval(estimate=float(r["estimate"]), lo=float(r["lo"]), hi=float(r["hi"]), n_boot=0, level=0.95)
    return intervals.format_interval("auroc", iv, signed=signed)


def _predictions(preds: list[dict], task: str, method: str = "probe") -> object:
    rows = [
        {k: float(v) if k == "y" or (k[0] == "p" and k[1:].isdigit()) else v for k, v in r.items()}
        for r in preds
        if r["method"] == method and r["task"] == task
    ]
    if not rows:
        raise SystemExit(f"no '{method}' predictions for task '{task}'")
    return method_predictions(rows, "classification")


def _paired(mine: object, other: object, what: str) -> str:
    """A - B AUROC with its interval, on the same resampled validation subjects."""
    if mine.subjects != other.subjects or not np.array_equal(mine.y, other.y):
        raise SystemExit(f"{what}: scores other validation subjects")
    iv = intervals.paired_difference(
        mine.y, mine.scores, other.scores, mine.group, kind="classification", metric="auroc", n_boot=N_BOOT
    )
    return intervals.format_interval("auroc", iv, signed=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FOLDER (a validation scoring's folder); the first is the reference")
    ap.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")
    ap.add_argument(
        "--versus",
        action="append",
        default=[],
        choices=METHODS[2:],
        help="also each run's probe minus this baseline, paired (the baseline as the first run scored it; repeatable)",
    )
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, folder = spec.partition("=")
        prov = json.loads((Path(folder) / "provenance.json").read_text())
        if prov.get("scored_on") != "validation":
            raise SystemExit(f"{folder}: not a validation scoring (provenance.json scored_on: {prov.get('scored_on')})")
        runs[label] = (
            _rows(Path(folder) / "intervals.csv"),
            _rows(Path(folder) / "predictions.csv"),
            prov["protocol"]["recipe"]["pool"],
        )
    ref = next(iter(runs))
    tasks = list(dict.fromkeys(r["task"] for r in runs[ref][0]))
    lines = []
    for task in tasks:
        head = [*METHODS, "probe - random_probe", f"probe - {ref}'s probe", *(f"probe - {b}" for b in args.versus)]
        lines += ["", f"#### {task}", "", "| run (readout) | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        ref_probe = _predictions(runs[ref][1], task)
        baselines = {b: _predictions(runs[ref][1], task, b) for b in args.versus}
        for label, (ivs, preds, pool) in runs.items():
            auroc = {(r["method"], r["versus"]): r for r in ivs if r["task"] == task and r["metric"] == "auroc"}
            cells = [_cell(auroc.get((m, ""))) for m in METHODS]
            cells.append(_cell(auroc.get(("probe", "random_probe")), signed=True))
            mine = _predictions(preds, task)
            cells.append("–" if label == ref else _paired(mine, ref_probe, f"{label} against {ref}"))
            cells += [_paired(mine, base, f"{label} against {ref}'s {b}") for b, base in baselines.items()]
            lines.append(f"| {label} ({pool}) | " + " | ".join(cells) + " |")
    text = (
        "AUROC % [95 % interval] on the validation splits of the fine-tuning sites (subjects resampled within "
        f"each cohort and site, {N_BOOT} resamples for the paired differences between runs)\n" + "\n".join(lines) + "\n"
    )
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
