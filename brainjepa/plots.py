"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

import csv
from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:  # noqa: ANN001 (a matplotlib Figure)
    """Save a figure as PNG via a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss_curve(metrics_csv: str | Path, png: str | Path, title: str = "Brain-JEPA pretraining") -> Path:
    """Loss and learning rate per optimizer step, from a run's metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [float(r["loss"]) for r in rows], lw=1.2, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("JEPA loss")
    ax.set_yscale("log")
    ax.set_title(title)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [float(r["lr"]) for r in rows], color="grey", lw=0.8, ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate", color="grey")
    fig.tight_layout()
    return save_figure(fig, png)


def plot_loss_pair(
    a: list[float], b: list[float], png: str | Path, labels: tuple[str, str], title: str = "fast path vs eager"
) -> Path:
    """Two loss curves over the same steps (top) and their relative difference (bottom, log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(len(a))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    top.plot(steps, a, lw=1.6, label=labels[0])
    top.plot(steps, b, lw=1.0, ls="--", label=labels[1])
    top.set_yscale("log")
    top.set_ylabel("JEPA loss")
    top.legend()
    top.set_title(title)
    rel = [abs(x - y) / abs(x) if x else 0.0 for x, y in zip(a, b, strict=True)]
    bottom.plot(steps, [max(r, 1e-12) for r in rel], lw=1.0, color="tab:red")
    bottom.set_yscale("log")
    bottom.set_ylabel("|relative diff|")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    return save_figure(fig, png)


def plot_collapse(
    loss: list[tuple[int, float]],
    monitor: list[dict],
    png: str | Path,
    xlabel: str = "step",
    title: str = "Brain-JEPA pretraining: loss and collapse monitor",
) -> Path:
    """Panels over the same x axis: the loss, the target features' effective rank, their spread (per token
    and per scan), and, when measured, whether the pretext needs the content (position share of the
    targets' variance; loss ratio with another scan's context). `monitor` rows as `read_rows` gives them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    content = any(r.get("position_share", float("nan")) == r.get("position_share") for r in monitor)  # not all NaN
    fig, axes = plt.subplots(4 if content else 3, 1, figsize=(7, 9 if content else 7), sharex=True)
    top, mid, bottom = axes[:3]
    top.plot([p[0] for p in loss], [p[1] for p in loss], lw=1.2)
    top.set_yscale("log")
    top.set_ylabel("JEPA loss")
    top.set_title(title)
    xs = [r[xlabel] for r in monitor]
    mid.plot(xs, [r["rank"] for r in monitor], marker=".", color="tab:green")
    mid.set_ylabel("effective rank")
    bottom.plot(xs, [r["spread"] for r in monitor], marker=".", label="per token")
    bottom.plot(xs, [r["scan_spread"] for r in monitor], marker=".", label="per scan (mean-pooled)")
    bottom.set_ylabel("feature std")
    bottom.set_yscale("log")
    bottom.legend()
    if content:
        last = axes[3]
        last.plot(
            xs,
            [r["position_share"] for r in monitor],
            marker=".",
            color="tab:purple",
            label="target variance explained by position",
        )
        last.set_ylabel("position share")
        last.set_ylim(0, 1)
        gain = last.twinx()
        gain.plot(
            xs,
            [r["context_gain"] for r in monitor],
            marker=".",
            color="tab:red",
            label="loss, another scan's context / own",
        )
        gain.axhline(1.0, color="tab:red", lw=0.6, ls=":")
        gain.set_ylabel("context gain", color="tab:red")
        last.legend(loc="upper left", fontsize=8)
        gain.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    return save_figure(fig, png)
