"""Issue 12: one table from two `brainjepa evaluate` runs of a protocol on the same cached backbones: the
rows of the methods the second run re-ran replace the first run's, the rest are kept (docs/results.md 6c, 7).

Used where only some methods changed, e.g. the probe / random-init probe / FC rows re-run under a new
strength-selection rule, while fine-tuning and scratch (unaffected, and the slow part) are kept. Writes
results.csv / summary.csv / report.md / PNGs with `brainjepa evaluate`'s own report writer.

    .venv/bin/python scripts/experiments/merge_results.py --protocol configs/protocols/cross_cohort.yaml \
        --base docs/results/issue12/session4/cross_cohort_unweighted/results.csv \
        --rerun docs/results/issue12/session4/cross_cohort_balanced_probes/results.csv --out OUT
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from brainjepa.downstream.evaluate import write_reports
from brainjepa.downstream.protocol import load_protocol
from brainjepa.downstream.report import read_csv


def tidy(v: object) -> object:
    """read_csv gives floats: whole numbers back to int, a missing value back to empty."""
    if isinstance(v, float) and v != v:
        return ""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", type=Path, required=True, help="the protocol YAML both runs used")
    ap.add_argument("--base", type=Path, required=True, help="results.csv of the whole run")
    ap.add_argument("--rerun", type=Path, required=True, help="results.csv of the run that re-ran some methods")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    full, rerun = read_csv(args.base), read_csv(args.rerun)
    replaced = {r["method"] for r in rerun}
    rows = [r for r in full if r["method"] not in replaced] + rerun
    rows = [{k: tidy(v) if k in ("seed", "best_step", "n") else v for k, v in r.items()} for r in rows]
    seeds = tuple(sorted({int(r["seed"]) for r in rows}))
    p = dataclasses.replace(load_protocol(args.protocol), seeds=seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    result = write_reports(p, rows, args.out)
    print(result.markdown)


if __name__ == "__main__":
    main()
