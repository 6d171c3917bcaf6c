"""Issue 12: the cross-cohort table for the current code, from session 4's two runs on the same cached
backbones (docs/results.md 6a).

- `docs/results/issue12/session4/cross_cohort_unweighted/`: the whole protocol (2 seeds);
  its fine-tuning and scratch rows do not depend on the probe's solver.
- `docs/results/issue12/session4/cross_cohort_balanced_probes/`: probe, random-init probe and FC re-run
  with the class-balanced solver (the current default) on the same cached backbones.

Keeps the first run's rows of the methods the second did not re-run, adds the second's, and writes
results.csv / summary.csv / report.md / PNGs with `brainjepa evaluate`'s own report writer.

    .venv/bin/python scripts/experiments/merge_cross_cohort.py --out docs/results/cross_cohort
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from brainjepa.downstream.evaluate import write_reports
from brainjepa.downstream.protocol import load_protocol
from brainjepa.downstream.report import read_csv

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs/results/issue12/session4"


def tidy(v: object) -> object:
    """read_csv gives floats: whole numbers back to int, a missing value back to empty."""
    if isinstance(v, float) and v != v:
        return ""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    full = read_csv(RUNS / "cross_cohort_unweighted/results.csv")
    rerun = read_csv(RUNS / "cross_cohort_balanced_probes/results.csv")
    replaced = {r["method"] for r in rerun}
    rows = [r for r in full if r["method"] not in replaced] + rerun
    rows = [{k: tidy(v) if k in ("seed", "best_step", "n") else v for k, v in r.items()} for r in rows]
    seeds = tuple(sorted({int(r["seed"]) for r in rows}))
    p = dataclasses.replace(load_protocol(ROOT / "configs/protocols/cross_cohort.yaml"), seeds=seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    result = write_reports(p, rows, args.out)
    print(result.markdown)


if __name__ == "__main__":
    main()
