"""Observability of a federated run: per-round per-site CSV, per-round CSV, TensorBoard, loss PNG."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from brainjepa.monitor import read_rows
from brainjepa.plots import plot_collapse, save_figure

log = logging.getLogger(__name__)

SITE_FIELDS = [
    "round",
    "site",
    "node_id",
    "status",
    "loss",
    "local_steps",
    "samples",
    "wall_s",
    "bytes_sent",
    "bytes_received",
    "detail",
]
ROUND_FIELDS = [
    "round",
    "loss",
    "sites_ok",
    "sites_failed",
    "sites_rejected",
    "samples",
    "step_start",
    "lr",
    "weight_decay",
    "momentum",
    "wall_s",
    "bytes_sent",
    "bytes_received",
]


def new_run_dir(out_dir: str | Path, run_id: int) -> Path:
    """`<out_dir>/<date>-<time>-run<id>/`, created: a run's folder."""
    run_dir = (Path(out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # owner-only: checkpoints, metrics and the audit log
    return run_dir


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows to a CSV file (its header first when the file is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def _rewrite_until(path: Path, fields: list[str], keep_rounds: int) -> None:
    """Keep the header and the rows of rounds 1..keep_rounds (the completed ones, on resume)."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["round"]) <= keep_rounds]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


class RunReport:
    """Appends rows as rounds finish; `finish()` draws the PNG."""

    def __init__(self, run_dir: Path, start_round: int) -> None:
        self.run_dir = run_dir
        self.sites_csv = run_dir / "site_metrics.csv"
        self.rounds_csv = run_dir / "round_metrics.csv"
        _rewrite_until(self.sites_csv, SITE_FIELDS, start_round)
        _rewrite_until(self.rounds_csv, ROUND_FIELDS, start_round)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard logs")
        else:
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_round)

    def site_rows(self, rows: list[dict]) -> None:
        append_rows(self.sites_csv, SITE_FIELDS, rows)
        if self.tb is not None:
            for r in rows:
                if r["status"] == "ok":
                    self.tb.add_scalar(f"site/{r['site']}/loss", float(r["loss"]), int(r["round"]))
                    self.tb.add_scalar(f"site/{r['site']}/wall_s", float(r["wall_s"]), int(r["round"]))

    def round_row(self, row: dict) -> None:
        append_rows(self.rounds_csv, ROUND_FIELDS, [row])
        if self.tb is not None:
            for key in ("loss", "lr", "momentum", "wall_s", "sites_ok"):
                self.tb.add_scalar(f"round/{key}", float(row[key]), int(row["round"]))
            self.tb.flush()

    def finish(self) -> Path | None:
        if self.tb is not None:
            self.tb.close()
        monitor = read_rows(self.run_dir / "monitor.csv", "round")
        if monitor:  # the collapse monitor (brainjepa.monitor) beside the loss per round
            with open(self.rounds_csv, newline="") as f:
                loss = [(int(r["round"]), float(r["loss"])) for r in csv.DictReader(f)]
            plot_collapse(
                loss,
                monitor,
                self.run_dir / "collapse_per_round.png",
                xlabel="round",
                title="Federated pretraining: loss and collapse monitor (global target)",
            )
        return plot_site_losses(self.sites_csv, self.run_dir / "loss_per_round.png")


def plot_site_losses(sites_csv: Path, out: Path) -> Path | None:
    """PNG: mean local loss per round, one line per site (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    with open(sites_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                series.setdefault(r["site"], []).append((int(r["round"]), float(r["loss"])))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for site, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=site)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("mean local JEPA loss")
    ax.set_title("Federated pretraining: loss per round per site")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)
