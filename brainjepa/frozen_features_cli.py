"""The `brainjepa embed` command: frozen-backbone features of a site's scans or of one series file.

`register(app)` adds it to the main typer app (brainjepa/cli.py calls it); the logic is
`brainjepa.frozen_features`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.errors import InputError


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def embed(
    checkpoint: Annotated[Path, typer.Argument(help="Pretraining checkpoint (checkpoint.pt): its EMA target encoder.")],
    out: Annotated[Path, typer.Option("--out", help="Output prefix: writes PREFIX.npy, PREFIX.ids.txt, PREFIX.json.")],
    site: Annotated[
        Path | None,
        typer.Option(
            help="Input: a site YAML (resampled to the pretraining model TR, "
            "scaled by the site's training-split robust statistics)."
        ),
    ] = None,
    series: Annotated[
        Path | None,
        typer.Option(
            help="Input: one (ROIs x frames) .npy already at the model TR "
            "(scaled by the checkpoint's saved statistics, if any)."
        ),
    ] = None,
    ids: Annotated[
        str | None, typer.Option("--ids", help="With --series: its subject id (default: the file name).")
    ] = None,
    tokens: Annotated[
        bool,
        typer.Option(
            "--tokens",
            help="Keep every token: (N, R*T/p, D) instead of the mean "
            "over tokens (N, D). Big: N x R*W x D float32 (450 ROIs, 10 time "
            "patches, D=768: 13.8 MB per scan).",
        ),
    ] = False,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="The same encoder at its random initialisation (seed --seed): the baseline for probes.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the --random-init weights.")] = 0,
    windows: Annotated[
        int, typer.Option(help="Evenly spaced windows of n_frames per scan; features are averaged over them.")
    ] = 4,
    split: Annotated[str, typer.Option(help="With --site: train, val, test or all.")] = "all",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    chunk: Annotated[int, typer.Option(help="Scans per forward batch (each with --windows windows).")] = 16,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over subjects.")] = True,
    verbose: bool = False,
) -> None:
    """Embed scans with a pretrained (or randomly initialised) Brain-JEPA encoder, frozen, no gradients.

    Writes PREFIX.npy (float32, one row per subject), PREFIX.ids.txt (the subject ids, same order) and
    PREFIX.json (checkpoint and its sha256, random_init, windows, shape, model config, split, scaling).
    """
    from brainjepa.frozen_features import EmbedRequest, run_embed

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        req = EmbedRequest(
            checkpoint=checkpoint,
            out=out,
            site=site,
            series=series,
            series_id=ids or "",
            split=split,
            tokens=tokens,
            random_init=random_init,
            seed=seed,  # type: ignore[arg-type]
            windows=windows,
            device=device,
            chunk=chunk,
            progress=progress,
        )
        result = run_embed(req)
    except InputError as e:
        raise _fail(e) from e
    n = result.shape[0]
    typer.echo(
        f"embedded {n} scan(s) -> {result.features} {tuple(result.shape)} float32 "
        f"({result.seconds:.2f} s), {result.ids.name}, {result.meta.name}"
    )


def register(app: typer.Typer) -> None:
    """Add `embed` to the main `brainjepa` app."""
    app.command("embed")(embed)
