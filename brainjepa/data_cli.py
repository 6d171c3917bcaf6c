"""The data commands of the `brainjepa` CLI: prepare, gradients, synth.

`register(app)` adds them to the main typer app (brainjepa/cli.py calls it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from brainjepa.errors import InputError
from sites.temporal import DEFAULT_MODEL_TR

log = logging.getLogger(__name__)


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def prepare(
    site: Annotated[Path, typer.Option("--site", help="Site YAML (data.format: nifti).")],
    force: Annotated[bool, typer.Option(help="Redo subjects already extracted.")] = False,
    jobs: Annotated[int | None, typer.Option(help="Subjects in parallel (default: preprocess.n_jobs).")] = None,
    min_frames: Annotated[
        int | None, typer.Option(help="Model window T: count scans shorter than T frames at --model-tr.")
    ] = None,
    model_tr: Annotated[float, typer.Option(help="Model TR in seconds (for the too-short count).")] = DEFAULT_MODEL_TR,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Extract ROI x time series from a site's 4D NIfTI (BIDS derivatives) with its label atlases.

    Applies every atlas in the site config with nilearn's NiftiLabelsMasker (atlas resampled to the
    data grid), optional detrending / filtering / confound regression, and writes one
    `<subject>.npy` (ROIs x frames, float32) per subject plus `manifest.json` (atlas checksums, TR,
    frames, ROI order, QC) into data.output. Bad subjects are reported and skipped; re-running skips
    subjects already done.
    """
    from sites.config import load_site_config
    from sites.prepare import prepare_site

    try:
        cfg = load_site_config(site)
        m = prepare_site(cfg, force=force, n_jobs=jobs, progress=progress, min_frames=min_frames, model_tr=model_tr)
    except InputError as e:
        raise _fail(e) from e
    s = m["summary"]
    typer.echo(
        f"{cfg.site}: {s['ok']} subject(s) ready, {s['failed']} failed, {s['too_short']} too short; "
        f"{cfg.n_rois} ROIs -> {cfg.output_dir}"
    )
    for sid, e in m["subjects"].items():
        if e.get("status") != "ok":
            typer.echo(f"  skipped {sid}: {e.get('error')}")


def gradients(
    out: Annotated[
        Path, typer.Option("--out", help="Gradient file to write (.npy or .csv); metadata goes to <out>.json.")
    ],
    fc: Annotated[Path | None, typer.Option(help="Source: a square connectivity matrix (.npy / .csv).")] = None,
    site: Annotated[
        list[Path] | None,
        typer.Option(help="Source: site YAML(s); one = its subjects' mean Fisher-z FC, several = a federation."),
    ] = None,
    fc_sum: Annotated[
        list[Path] | None,
        typer.Option(help="Source: site FC contributions (.npz from --export-fc-sum), summed as a federation."),
    ] = None,
    schaefer400: Annotated[
        bool, typer.Option(help="Source: BrainSpace's shipped Schaefer-400 group FC (the ready default).")
    ] = False,
    group: Annotated[str, typer.Option(help="BrainSpace group for --schaefer400: main or holdout.")] = "main",
    n_components: Annotated[int, typer.Option(help="Gradient components k.")] = 30,
    align_to: Annotated[Path | None, typer.Option(help="Reference gradient file: Procrustes-align to it.")] = None,
    split: Annotated[
        str | None, typer.Option(help="With --site: use only this split's subjects (e.g. train).")
    ] = "train",
    model_tr: Annotated[
        float, typer.Option(help="With --site: model TR the series are resampled to.")
    ] = DEFAULT_MODEL_TR,
    export_fc_sum: Annotated[
        Path | None,
        typer.Option(help="With one --site: also write its (FC sum, count) contribution (.npz) for a federation."),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG scatter of the first gradients, coloured by network.")] = None,
    networks: Annotated[
        Path | None, typer.Option(help="Text file, one network label per ROI (default: data-driven).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random state of the diffusion-map solver.")] = 0,
) -> None:
    """Compute brain gradients (BrainSpace diffusion map, normalized-angle kernel) of a group FC.

    Exactly one source: --fc FILE, --site YAML (repeat for a federation), --fc-sum NPZ (repeat), or
    --schaefer400. Works for any parcellation. Writes the R x k gradient file, a JSON sidecar
    (source, method, parameters, checksum) and optionally a PNG plot.
    """
    from brainjepa import gradients as G

    sources = [fc is not None, bool(site), bool(fc_sum), schaefer400]
    if sum(sources) != 1:
        raise _fail(
            ValueError("give exactly one source: --fc, --site (repeatable), --fc-sum (repeatable) or --schaefer400")
        )
    try:
        params: dict = {"n_components": n_components, "seed": seed}
        if fc is not None:
            mat, source = G.load_connectivity(fc), f"connectivity file {fc}"
        elif schaefer400:
            mat, source = G.schaefer400_fc(group), f"brainspace schaefer-400 group FC ({group})"
        elif fc_sum:
            contribs = [_read_fc_sum(p) for p in fc_sum]
            mat = G.federated_fc(contribs)
            source = f"federation of {len(contribs)} site FC sums ({G.n_scans(contribs)} subjects)"
            params["sites"] = [str(p) for p in fc_sum]
        else:
            from sites.config import load_site_config

            contribs = [G.site_contribution(load_site_config(y), model_tr, split) for y in site]
            if export_fc_sum is not None:
                if len(site) != 1:
                    raise ValueError("--export-fc-sum takes exactly one --site")
                export_fc_sum.parent.mkdir(parents=True, exist_ok=True)
                np.savez(export_fc_sum, fc_sum=contribs[0][0], count=contribs[0][1])
            mat = G.federated_fc(contribs)
            kind = "site" if len(site) == 1 else f"federation of {len(site)} sites"
            source = f"{kind} mean Fisher-z FC ({G.n_scans(contribs)} subjects, split={split})"
            params.update(sites=[str(p) for p in site], model_tr=model_tr)
        g = G.compute_gradients(mat, n_components, seed)
        if align_to is not None:
            g = G.align_gradients(g, G.load_gradients(align_to, n_rois=g.shape[0]))
            params["aligned_to"] = str(align_to)
        path, side = G.save_gradients_with_metadata(out, g, G.gradient_metadata(g, source, **params))
        if plot is not None:
            labels = _networks(networks, mat)
            G.plot_gradients(g, plot, labels, title=f"gradients: {source}")
    except (InputError, ValueError) as e:
        raise _fail(e) from e
    meta = json.loads(side.read_text())
    typer.echo(
        f"wrote {path} ({g.shape[0]} ROIs x {g.shape[1]} components, sha256 {meta['checksum'][:12]}) and {side.name}"
    )


def _read_fc_sum(path: Path) -> tuple[np.ndarray, int | np.ndarray]:
    from brainjepa.errors import DataError

    if not path.is_file():
        raise DataError(f"FC contribution '{path}' does not exist")
    with np.load(path) as z:
        if "fc_sum" not in z or "count" not in z:
            raise DataError(f"FC contribution '{path}': expected arrays 'fc_sum' and 'count' (from --export-fc-sum)")
        from brainjepa.gradients import fc_count

        return z["fc_sum"], fc_count(z["count"])


def _networks(path: Path | None, mat: np.ndarray) -> np.ndarray:
    from brainjepa.errors import DataError
    from sites.connectome import networks_from_fc

    if path is None:
        return networks_from_fc(mat)
    lab = np.loadtxt(path, dtype=str, ndmin=1)
    if lab.shape[0] != mat.shape[0]:
        raise DataError(f"networks file '{path}': {lab.shape[0]} labels for {mat.shape[0]} ROIs")
    return lab


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the sites into (one subfolder per site).")],
    sites: Annotated[int, typer.Option(help="Number of sites (the last of two or more is population B).")] = 3,
    subjects: Annotated[int, typer.Option(help="Subjects per site.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same files.")] = 0,
    rois: Annotated[int, typer.Option(help="ROIs in all, subcortical block included.")] = 450,
    subcortical: Annotated[int | None, typer.Option(help="Subcortical ROIs (default rois/9: 50 of 450).")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Scan length in seconds for every site (default: per-site presets).")
    ] = None,
    split: Annotated[
        tuple[float, float, float], typer.Option(help="Train / val / test fractions written to each site YAML.")
    ] = (0.8, 0.1, 0.1),
    effect: Annotated[
        list[str],
        typer.Option(
            help="Change a generated effect, KEY=VALUE (repeatable; `sites.synth.Effects`, over the "
            "--generator-version defaults), e.g. 'coupling_weight=0.4'; recorded in each synth.json."
        ),
    ] = [],  # noqa: B006
    mechanism: Annotated[
        str,
        typer.Option(
            help="What carries the labels (sex, diagnosis): mixed (the original effects), coupling "
            "(between-network correlations only), amplitude (per-ROI variance only), spectrum "
            "(timescales only) or null (nothing). See `sites.mechanisms`."
        ),
    ] = "mixed",
    generator_version: Annotated[
        int | None,
        typer.Option(
            help="Reproduce an earlier generator exactly (default: the latest). 1: factor timescales "
            "1.5-6 s and a strengthened sex driver; 2: today's effects, mixed only; 3: adds mechanisms."
        ),
    ] = None,
    only: Annotated[
        list[str],
        typer.Option(
            help="Write only this site of the cohort (repeatable, e.g. '--sites 5 --only site_d "
            "--only site_e': new sites of the same population; a site's files do not depend on the others)."
        ),
    ] = [],  # noqa: B006
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate realistic multi-site ROI-series cohorts (BOLD-like, BrainSpace Schaefer-400 FC driven).

    Each site gets roi/<subject>.npy, participants.tsv (age, sex, diagnosis, population) and a site
    YAML, exactly like a real ROI-series site: use the YAML with `--site` anywhere. Sites differ in TR,
    scan length, noise, gain and motion spikes; deterministic by seed. `--mechanism` chooses what carries
    the labels; each site's synth.json records the generator version, mechanism and effects.
    """
    from sites.synth import GENERATOR_VERSION, effects_for_version, effects_from_pairs, generate_cohorts

    version = GENERATOR_VERSION if generator_version is None else generator_version
    try:
        paths = generate_cohorts(
            out,
            n_sites=sites,
            subjects_per_site=subjects,
            seed=seed,
            n_rois=rois,
            n_subcortical=subcortical,
            duration_s=duration,
            progress=progress,
            split=split,
            effects=effects_from_pairs(effect, base=effects_for_version(version)),
            only=tuple(only),
            mechanism=mechanism,
            version=version,
        )
    except InputError as e:
        raise _fail(e) from e
    for p in paths:
        typer.echo(str(p))


def register(app: typer.Typer) -> None:
    """Add `prepare`, `gradients` and `synth` to the main `brainjepa` app."""
    app.command("prepare")(prepare)
    app.command("gradients")(gradients)
    app.command("synth")(synth)
