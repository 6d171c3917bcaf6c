"""The `brainjepa` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from brainjepa import data_cli, frozen_features_cli, reference_import_cli
from brainjepa.downstream import cli as downstream_cli
from brainjepa.errors import InputError
from brainjepa.perf import cli as perf_cli

app = typer.Typer(
    help="Brain-JEPA: pretrain a brain-dynamics foundation model on ROI fMRI series, on one machine "
    "or federated across imaging sites. Run `brainjepa COMMAND --help` for each command.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def pretrain(
    config: Annotated[
        Path,
        typer.Option(
            "--config", "-c", help="Pretraining YAML (sections model, mask, optim, data, train, perf, monitor)."
        ),
    ],
    resume: Annotated[bool, typer.Option(help="Continue from OUT_DIR/checkpoint.pt with the same schedule.")] = False,
    site: Annotated[Path | None, typer.Option(help="Override data.site: train on this site YAML.")] = None,
    steps: Annotated[int | None, typer.Option(help="Override train.steps (the planned optimizer steps).")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Override train.out_dir.")] = None,
    device: Annotated[str | None, typer.Option(help="Override train.device (auto, cpu, cuda, cuda:N).")] = None,
    devices: Annotated[
        str,
        typer.Option(
            help="Train on several devices of this machine, one process each: a count (CUDA: cuda:0..N-1, "
            "else N CPU processes) or CUDA ids such as 0,1,2,3. The global batch (train.batch_size) is split "
            "over them; the run equals one process's. Under torchrun, leave it at 1."
        ),
    ] = "1",
    timeout_s: Annotated[
        float, typer.Option(help="With --devices: a process waiting this long for a dead or hung one ends the run.")
    ] = 600.0,
    verbose: bool = False,
) -> None:
    """Pretrain Brain-JEPA on one machine. Writes metrics.csv, gradients.npy, checkpoint.pt, loss.png and the
    collapse monitor's monitor.csv / collapse.png to the run folder; Ctrl-C leaves the last checkpoint intact
    and `--resume` continues bit-for-bit. Several GPUs: `--devices 4`, or
    `torchrun --nproc-per-node 4 $(which brainjepa) pretrain -c CONFIG`."""
    from brainjepa.config import DistributedConfig, load_pretrain_config
    from brainjepa.distributed import DistributedError, joined_group, launch, parse_devices
    from brainjepa.pretrain import pretrain as run
    from brainjepa.pretrain import pretrain_rank

    _setup_logging(verbose)
    overrides = {
        k: v
        for k, v in {
            "train.steps": steps,
            "train.out_dir": str(out_dir.resolve()) if out_dir else None,
            "train.device": device,
            "data.site": str(site.resolve()) if site else None,
        }.items()
        if v is not None
    }
    if site:
        overrides["data.roi_dir"] = ""
    try:
        cfg = load_pretrain_config(config, overrides)
        ranks = DistributedConfig(devices=parse_devices(devices), timeout_s=timeout_s)
        if ranks.world > 1:
            result = launch(pretrain_rank, (cfg, resume), ranks, cfg.train.device)
        else:
            group = joined_group(cfg.train.device)  # under torchrun: its group; else None (one process)
            result = run(cfg, resume=resume, progress=group is None or group.rank == 0, group=group)
            if group is not None and group.rank != 0:
                return
    except (InputError, DistributedError) as e:
        raise _fail(e) from e
    except KeyboardInterrupt:
        typer.secho("interrupted: the last checkpoint is intact; continue with --resume", err=True)
        raise typer.Exit(code=130) from None
    typer.echo(f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}")
    typer.echo(
        f"outputs in {result.out_dir.resolve()}: checkpoint.pt, metrics.csv, loss.png, gradients.npy, "
        "monitor.csv, collapse.png"
    )


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="Pretraining YAML of the demo.")] = Path("configs/demo_pretrain.yaml"),
    data: Annotated[Path, typer.Option(help="Where the generated sites are written.")] = Path("data/demo"),
    subjects: Annotated[int, typer.Option(help="Subjects per generated site.")] = 40,
    steps: Annotated[int | None, typer.Option(help="Override the demo's optimizer steps.")] = None,
    verbose: bool = False,
) -> None:
    """Generate three small sites (100 ROIs, 10-minute scans) and pretrain a tiny Brain-JEPA on
    site A on this machine (a few minutes on a laptop CPU). Prints where the outputs went."""
    from brainjepa.config import load_pretrain_config
    from brainjepa.pretrain import pretrain as run
    from sites.synth import generate_cohorts

    _setup_logging(verbose)
    try:
        sites = generate_cohorts(data, n_sites=3, subjects_per_site=subjects, n_rois=100, duration_s=600, progress=True)
        typer.echo("generated sites: " + ", ".join(str(p) for p in sites))
        overrides = {"data.site": str(sites[0].resolve())} | ({"train.steps": steps} if steps else {})
        cfg = load_pretrain_config(config, overrides)
        result = run(cfg)
    except InputError as e:
        raise _fail(e) from e
    typer.echo(f"loss {result.first_loss:.4f} -> {result.final_loss:.4f} over {cfg.train.steps} steps")
    typer.echo(f"outputs in {result.out_dir.resolve()}:")
    for name in ("checkpoint.pt", "metrics.csv", "loss.png", "gradients.npy", "scaling.json"):
        typer.echo(f"  {result.out_dir.resolve() / name}")


perf_cli.register(app)
data_cli.register(app)
frozen_features_cli.register(app)
downstream_cli.register(app)
reference_import_cli.register(app)


def main() -> None:
    app()
