"""The Flower ServerApp: federated Brain-JEPA pretraining rounds (sample, send, collect, check, average),
or, with run config `task` = `finetune` / `probe`, a federated downstream run on a pretrained backbone.

Run-wide settings come from the run config (`server.config`). Pretraining (`server.pretraining`): the global
model is checkpointed after every round (`checkpoint.pt`, atomic) and a run continues from its last
completed round with `resume-dir`; per-round per-site metrics go to CSV, the console, TensorBoard, and a
PNG at the end. Downstream (`server.downstream`): training rounds, validation, model selection and a
final test evaluation, with their CSV / JSON and the selected model's checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from brainjepa.errors import InputError
from brainjepa.federation.launcher import RUN_STOPPED as STOPPED
from server.config import FederationConfig, from_run_config
from server.exchange import RoundFailed
from server.pretraining import FederatedRun

if TYPE_CHECKING:
    from server.downstream import DownstreamRun

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
    os.umask(0o077)  # run folders 0700, checkpoints, logs, CSVs, audit log 0600
    _attach_logging()
    try:
        run: FederatedRun | DownstreamRun
        cfg: FederationConfig = from_run_config(context.run_config)
        if cfg.task == "pretrain":
            run = FederatedRun.create(cfg, run_id=context.run_id)
        else:
            from server.downstream import DownstreamRun  # here: a pretraining run never imports sklearn

            run = DownstreamRun.create(cfg, run_id=context.run_id)
        _attach_logging(run.run_dir)
        run.log_start()
        run.execute(grid)
    except (RoundFailed, InputError) as e:  # a clear line instead of a traceback; `brainjepa-server` exits 1
        log.error("%s %s", STOPPED, e)
