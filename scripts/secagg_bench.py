"""What secure aggregation (Flower's SecAgg+, `server.secagg` / `client.secagg`) costs against a plain
round: wall time per stage, bytes each way, peak memory, for Brain-JEPA-sized updates.

Starts a real SuperLink and N SuperNodes (separate processes, loopback) and runs the app in
`scripts/secagg_bench_app`: one plain round and one SecAgg+ round with the same random global sets of
the model's sizes (encoder, predictor, EMA target); the sites' "training" adds a seeded delta, so the
server checks the unmasked weighted mean against the exact one.

    python scripts/secagg_bench.py --size small --size base --sites 2

Results are appended to a JSON-lines file and printed as a Markdown table.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.federation.launcher import LocalFederation

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "scripts" / "secagg_bench_app"
SIZES = {
    "small": (21306816, 10949568, 21306816),
    "base": (85080960, 11244864, 85080960),
    "tiny": (1000000, 500000, 1000000),
}  # encoder, predictor, target parameters (n_rois 100)
log = logging.getLogger("secagg_bench")


def run_one(size: str, sites: int, central_dp: bool, work_root: Path) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    from transport_bench import RssSampler  # noqa: PLC0415  (the transport study's /proc sampler)

    work = Path(tempfile.mkdtemp(prefix=f"secagg-{size}-", dir=work_root))
    result_path = work / "result.json"
    enc, pred, tgt = SIZES[size]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(APP_DIR)]), "OMP_NUM_THREADS": "1"}
    with LocalFederation(work, [{"site-id": i} for i in range(sites)], env_extra=env) as fed:
        roots = [p.pid for p in [fed.superlink, *fed.supernodes] if p is not None]
        sampler = RssSampler(roots)
        sampler.start()
        t0 = time.perf_counter()
        res = fed.run(
            APP_DIR,
            {
                "encoder": enc,
                "predictor": pred,
                "target": tgt,
                "sites": sites,
                "central-dp": central_dp,
                "result-path": str(result_path),
            },
            timeout_s=3600,
        )
        wall = time.perf_counter() - t0
        sampler.stop()
    if res.returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"flwr run failed ({res.returncode}); logs in {work / 'logs'}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    row = json.loads(result_path.read_text())
    row.update({"size": size, "flwr_run_wall_s": wall, "peak_rss_mb": {k: v / 1e6 for k, v in sampler.peak.items()}})
    return row


def main(
    size: Annotated[list[str], typer.Option(help="tiny, small (ViT-S), base (ViT-B)")] = ["small"],  # noqa: B006
    sites: Annotated[int, typer.Option(help="number of SuperNodes")] = 2,
    central_dp: Annotated[bool, typer.Option(help="central-DP shape: encoder + predictor, weight 1")] = False,
    out: Annotated[Path, typer.Option(help="JSON lines, appended")] = Path("secagg_bench.jsonl"),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work_root = Path(tempfile.mkdtemp(prefix="secagg-bench-"))
    rows = []
    for s in size:
        log.info("=== %s, %d sites, central-dp %s", s, sites, central_dp)
        row = run_one(s, sites, central_dp, work_root)
        log.info("%s", json.dumps(row))
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows.append(row)
    print(
        "| update | params | sites | plain s | SecAgg+ s | stages s (setup, keys, collect, unmask) | "
        "plain MB up | SecAgg+ MB up | SecAgg+ MB down | max err / bound | peak RSS all MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = ", ".join(f"{x['wall_s']:.1f}" for x in r["stages"])
        print(
            f"| {r['size']} | {r['params'] / 1e6:.1f} M | {r['sites']} | {r['plain_s']:.1f} | {r['secagg_s']:.1f} | "
            f"{st} | {r['plain_mb_received']:.0f} | {r['secagg_mb_received']:.0f} | {r['secagg_mb_sent']:.0f} | "
            f"{r['max_abs_err']:.2e} / {r['tolerance']:.2e} | {r['peak_rss_mb'].get('all', 0):.0f} |"
        )


if __name__ == "__main__":
    typer.run(main)
