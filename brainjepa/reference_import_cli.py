"""The `brainjepa import-reference` command: a reference Brain-JEPA checkpoint -> one of ours.

`register(app)` adds it to the main typer app (brainjepa/cli.py calls it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.errors import InputError

log = logging.getLogger(__name__)


def import_reference(
    ckpt: Annotated[
        Path, typer.Argument(help="Reference checkpoint (e.g. jepa-latest.pth.tar of Eric-LRL/Brain-JEPA).")
    ],
    gradients: Annotated[
        Path,
        typer.Option(
            "--gradients",
            help="The gradient CSV it was trained with (R x k, headerless; e.g. gradient_mapping_450.csv).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Our checkpoint to write (.pt).")],
    size: Annotated[
        str | None,
        typer.Option("--size", help="S, B or L: the reference model (6, 12, 16 heads in encoder and predictor)."),
    ] = None,
    num_heads: Annotated[
        int | None, typer.Option("--num-heads", help="Head count of encoder and predictor (wins over --size).")
    ] = None,
    normalization: Annotated[
        Path | None,
        typer.Option(
            "--normalization", help="normalization_params_train.npz (medians, iqrs): stored as our robust scaling."
        ),
    ] = None,
    n_frames: Annotated[
        int | None, typer.Option("--n-frames", help="Frames per window T (default: from the weights; given: checked).")
    ] = None,
    patch_size: Annotated[
        int | None, typer.Option("--patch-size", help="Frames per token p (default: from the weights; given: checked).")
    ] = None,
    verbose: bool = False,
) -> None:
    """Import CKPT, a checkpoint of the reference Brain-JEPA code, as a brainjepa pretraining checkpoint.

    Widths, depths, patch size and window length come from the weights; the head count from --size or
    --num-heads. Every key is mapped by the table in docs/model.md ("Importing reference checkpoints");
    an unknown key, a missing one or a wrong shape is an error naming it. The file is read with
    torch.load(weights_only=True): tensors and plain containers only.
    """
    from brainjepa.reference_import import import_reference as run

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        r = run(
            ckpt,
            gradients,
            out,
            size=size,
            num_heads=num_heads,
            normalization=normalization,
            n_frames=n_frames,
            patch_size=patch_size,
        )
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from e
    m = r.model
    typer.echo(
        f"wrote {r.path}: {m.size} encoder {m.embed_dim} x {m.depth} ({m.num_heads} heads), predictor "
        f"{m.pred_dim} x {m.pred_depth} ({m.pred_heads} heads), {m.n_rois} ROIs x {m.n_frames} frames, "
        f"patch {m.patch_size}, {m.gradient_components} gradients; reference epoch {r.epoch}; "
        f"sin-cos time table max |diff| {r.sincos_max_diff:.1e}; normalization -> {r.scaling}"
    )


def register(app: typer.Typer) -> None:
    """Add `import-reference` to the main `brainjepa` app."""
    app.command("import-reference")(import_reference)
