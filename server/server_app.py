"""The Flower ServerApp: federated Brain-JEPA pretraining rounds (sample, send, collect, check, average).

Run-wide settings come from the run config (`server.config`); the global model is checkpointed after
every round (`checkpoint.pt`, atomic) and a run continues from its last completed round with
`resume-dir`. Per-round per-site metrics go to CSV, the console, TensorBoard, and a PNG at the end.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import FederationConfig, from_run_config
from server.round import FederatedRun

log = logging.getLogger(__name__)
app = ServerApp()


FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _attach_logging(run_dir: Path | None = None) -> None:
    """Our loggers -> the (Flower-redirected) stdout, then also run_dir/server.log."""
    root = logging.getLogger("server")
    root.setLevel(logging.INFO)
    root.propagate = False
    if run_dir is None:
        root.handlers.clear()
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(run_dir / "server.log")
    handler.setFormatter(FORMAT)
    root.addHandler(handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _attach_logging()
    cfg: FederationConfig = from_run_config(context.run_config)
    run = FederatedRun.create(cfg, run_id=context.run_id)
    _attach_logging(run.run_dir)
    run.log_start()
    run.execute(grid)

