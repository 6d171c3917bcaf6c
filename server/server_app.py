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


def _attach_logging(run_dir: Path) -> None:
    """Our loggers -> the (Flower-redirected) stdout and run_dir/server.log."""
    root = logging.getLogger("server")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "server.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg: FederationConfig = from_run_config(context.run_config)
    run = FederatedRun.create(cfg, run_id=context.run_id)
    _attach_logging(run.run_dir)
    run.log_start()
    run.execute(grid)

