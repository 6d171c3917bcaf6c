"""The "what each method reads" table: methods x label mechanisms, from the reports `brainjepa evaluate` wrote.

Each mechanism's protocol (experiments/what_each_method_reads/<mechanism>.yaml) was run into the folder of
the same name; this collects their intervals.csv into one Markdown table (AUROC [95 % interval] per task,
the generated cohorts pooled as the reports pool them) and a heatmap PNG, next to the protocols:

    .venv/bin/python scripts/reads_table.py experiments/what_each_method_reads
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

MECHANISMS = ("coupling", "amplitude", "spectrum", "mixed")
WHAT = {
    "coupling": "between-network correlations only",
    "amplitude": "per-ROI variance only",
    "spectrum": "timescales only",
    "mixed": "the earlier generator: amplitude, coupling and timescales",
}


def read(folder: Path) -> list[dict]:
    with open(folder / "intervals.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if not r["versus"] and r["metric"] == "auroc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="experiments/what_each_method_reads")
    args = ap.parse_args()
    found = {m: read(args.root / m) for m in MECHANISMS if (args.root / m / "intervals.csv").is_file()}
    if not found:
        raise SystemExit(f"no <mechanism>/intervals.csv under {args.root}: run the protocols first")
    tasks = list(dict.fromkeys(r["task"] for rows in found.values() for r in rows))
    methods = list(dict.fromkeys(r["method"] for rows in found.values() for r in rows))
    cell = {(m, r["method"], r["task"]): r for m, rows in found.items() for r in rows}
    prov = {m: json.loads((args.root / m / "provenance.json").read_text()) for m in found}
    steps = sorted({p["protocol"]["pretrain"]["steps"] for p in prov.values()})
    cohorts = sorted({len(p["protocol"]["generator_seeds"]) for p in prov.values()})
    lines = [
        "# What each method reads",
        "",
        f"AUROC % [95 % interval] on the held-out site C, {'/'.join(map(str, cohorts))} generated cohorts pooled "
        "(subjects resampled within each cohort); the probe's backbone pretrained "
        f"{'/'.join(f'{s:,}' for s in steps)} steps on sites A + B of each cohort. Each column's labels are "
        "carried by one label mechanism of the generator:",
        "",
    ]
    lines += [f"- `{m}`: {WHAT[m]}" for m in found]
    for task in tasks:
        lines += ["", f"## {task}", "", "| method | " + " | ".join(found) + " |", "|---|" + "---|" * len(found)]
        for me in methods:
            out = []
            for m in found:
                r = cell.get((m, me, task))
                out.append(
                    "–"
                    if r is None
                    else f"{100 * float(r['estimate']):.1f} [{100 * float(r['lo']):.1f}, {100 * float(r['hi']):.1f}]"
                )
            lines.append(f"| {me} | " + " | ".join(out) + " |")
    commits = {m: p["git"]["commit"] for m, p in prov.items()}
    lines += [
        "",
        "Sources: " + ", ".join(f"[{m}/report.md]({m}/report.md) (code {str(c)[:10]})" for m, c in commits.items()),
        "",
    ]
    (args.root / "table.md").write_text("\n".join(lines))
    plot(found, tasks, methods, cell, args.root / "table.png")
    print(f"wrote {args.root / 'table.md'} and table.png")


def plot(found: dict, tasks: list[str], methods: list[str], cell: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(tasks), figsize=(len(tasks) * (2.2 + 0.8 * len(found)), 0.5 * len(methods) + 1.8))
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        v = np.array(
            [
                [float(cell[(m, me, task)]["estimate"]) if (m, me, task) in cell else math.nan for m in found]
                for me in methods
            ]
        )
        ax.imshow(v, vmin=0.4, vmax=1.0, cmap="viridis")
        for i in range(len(methods)):
            for j in range(len(found)):
                ax.text(
                    j,
                    i,
                    "–" if math.isnan(v[i, j]) else f"{100 * v[i, j]:.0f}",
                    ha="center",
                    va="center",
                    color="white" if v[i, j] < 0.75 else "black",
                )
        ax.set_xticks(range(len(found)), list(found), rotation=30)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title(f"{task}: AUROC %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
