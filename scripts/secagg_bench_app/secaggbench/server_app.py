"""Benchmark ServerApp: one plain round (`server.exchange.exchange`) and one SecAgg+ round
(`server.secagg.secure_exchange`) with the same random global sets of the configured sizes; checks the
unmasked weighted mean against the one recomputed from the sites' seeds; writes times and bytes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from brainjepa.federation.contract import RoundSpec
from brainjepa.federation.secure import TRAINED_SETS, secagg_tolerance
from secaggbench.client_app import site_delta, site_weight
from server.config import FederationConfig
from server.exchange import exchange
from server.secagg import secure_exchange

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    sizes = {k: int(rc[k]) for k in ("encoder", "predictor", "target")}
    g = torch.Generator().manual_seed(0)
    sets = {k: torch.randn(n, generator=g) * 0.02 for k, n in sizes.items()}  # (P_k,)
    central = bool(rc["central-dp"])
    cfg = FederationConfig(
        min_sites=int(rc["sites"]),
        secure_aggregation=True,
        round_timeout_s=3000.0,
        central_dp=central,
        central_dp_clip_norm=1e6,
    )  # no clipping: checks the sum exactly
    spec = RoundSpec(
        task="pretrain",
        round=0,
        num_rounds=1,
        step_start=0,
        local_steps=1,
        wire_dtype="float32",
        model_checksum="bench",
        gradient_checksum="bench",
        task_config=cfg.pretrain(),
    )
    t0 = time.perf_counter()
    plain = exchange(grid, cfg, spec, sets, lambda r: None)
    plain_s = time.perf_counter() - t0
    sec = secure_exchange(grid, cfg, spec, sets, None, clip_norm=1e6 if central else 0.0)
    ids = [int(r.site.removeprefix("site")) for r in sec.results if r.status == "ok"]
    weights = [1.0 if central else float(site_weight(i)) for i in ids]
    want = {k: torch.zeros(v.numel(), dtype=torch.float64) for k, v in sec.mean_delta.items()}
    for i, w in zip(ids, weights, strict=True):
        delta = site_delta(i, sets)  # the site's draws, in its order
        for k in want:
            want[k].add_(delta[k].double(), alpha=w / sum(weights))
    err = max(float((sec.mean_delta[k] - want[k]).abs().max()) for k in want)
    max_weight = 1.0 if central else cfg.secure_aggregation_max_weight
    result = {
        "params": sum(v.numel() for k, v in sets.items() if not central or k in TRAINED_SETS),
        "sites": len(ids),
        "central_dp_weighting": central,
        "plain_s": plain_s,
        "plain_mb_sent": sum(r.bytes_sent for r in plain) / 1e6,
        "plain_mb_received": sum(r.bytes_received for r in plain) / 1e6,
        "secagg_s": sec.wall_s,
        "secagg_mb_sent": sum(r.bytes_sent for r in sec.results) / 1e6,
        "secagg_mb_received": sum(r.bytes_received for r in sec.results) / 1e6,
        "stages": sec.stages,
        "max_abs_err": err,
        "tolerance": secagg_tolerance(cfg.secure_aggregation_clip_range, weights, max_weight),
    }
    Path(str(rc["result-path"])).write_text(json.dumps(result))
