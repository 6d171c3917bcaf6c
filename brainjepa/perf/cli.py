"""The performance commands of the `brainjepa` CLI: bench, memory, numerics.

`register(app)` adds them to the main typer app (brainjepa/cli.py calls it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.errors import InputError


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def bench(
    size: Annotated[list[str], typer.Option("--size", help="Model size(s): tiny, small, base, large.")] = ["base"],  # noqa: B006
    batch: Annotated[list[int], typer.Option("--batch", help="Batch size(s).")] = [16],  # noqa: B006
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    mode: Annotated[
        str,
        typer.Option(
            help="eager (plain PyTorch), fast (compiled blocks, SDPA backend order, "
            "prefetching) or compare (both, with the speed-up)."
        ),
    ] = "compare",
    attention: Annotated[
        str,
        typer.Option(
            help="Fast mode's SDPA backend order on CUDA: auto (cuDNN first on "
            "Hopper), cudnn, flash, efficient, math, default."
        ),
    ] = "auto",
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs", help="Fast mode: replay the target encoder's forward as a CUDA graph.")
    ] = False,
    selective: Annotated[
        bool,
        typer.Option(
            "--selective-checkpointing",
            help="Fast mode: keep matmul outputs, "
            "recompute pointwise ops in backward (about a third less activation "
            "memory).",
        ),
    ] = False,
    recompute: Annotated[
        float,
        typer.Option(
            help="Fast mode: share of the trained networks' blocks recomputed whole "
            "in backward (perf.recompute_fraction; less memory, more FLOPs)."
        ),
    ] = 0.0,
    reference_masks: Annotated[
        bool,
        typer.Option(
            "--reference-masks",
            help="Sample masks with the reference's algorithm and truncation (its token counts and FLOPs).",
        ),
    ] = False,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps (the first also compiles).")] = 2,
    rois: Annotated[int, typer.Option(help="ROIs per sample.")] = 450,
    frames: Annotated[int, typer.Option(help="Frames per sample.")] = 160,
    checkpointing: Annotated[
        bool,
        typer.Option(
            "--activation-checkpointing",
            help="Recompute block activations in backward (less memory, ~1/3 more compute).",
        ),
    ] = False,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Also profile 3 steps of each run: trace.json.gz and "
            "profile.md (time per phase and op) in a subfolder here."
        ),
    ] = None,
    processes: Annotated[
        list[int],
        typer.Option(
            "--processes",
            help="Ranks the batch is split over (brainjepa.distributed): GPUs of this machine with "
            "--device cuda, gloo processes on a CPU. Repeat (--processes 1 --processes 2) for the scaling "
            "efficiency: samples/s over N x the one-process figure.",
        ),
    ] = [1],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line instead of a table.")] = False,
) -> None:
    """Time the pretraining step (one optimizer step per batch, default masking, random inputs):
    samples/s, achieved TFLOP/s (FlopCounterMode) and peak memory, plus parameter counts. Compare
    with the reference GPU figures in docs/performance.md on the same GPU kind; docs/performance.md explains the figures."""
    from brainjepa.config import PerfConfig
    from brainjepa.perf.bench import fast_perf, format_table, run_bench

    modes = {"eager": ["eager"], "fast": ["fast"], "compare": ["eager", "fast"]}
    if mode not in modes:
        raise _fail(ValueError(f"--mode: expected eager, fast or compare, got '{mode}'"))
    try:
        perfs = {
            "eager": PerfConfig(attention="default"),
            "fast": fast_perf(device, cuda_graphs, attention, selective, recompute),
        }
    except InputError as e:
        raise _fail(e) from e
    if profile and max(processes) > 1:
        raise _fail(ValueError("--profile: profiling runs in one process; leave --processes at 1"))
    results = []
    for s in size:
        for b in batch:
            for m in modes[mode]:
                for n in processes:
                    where = profile / f"{s}-b{b}-{m}" if profile else None
                    try:
                        r = run_bench(
                            size=s,
                            batch=b,
                            device=device,
                            steps=steps,
                            warmup=warmup,
                            n_rois=rois,
                            n_frames=frames,
                            activation_checkpointing=checkpointing,
                            perf=perfs[m],
                            reference_masks=reference_masks,
                            profile_dir=where,
                            processes=n,
                        )
                    except InputError as e:  # e.g. more processes than the batch has rows, or devices
                        raise _fail(e) from e
                    results.append(r)
                    if as_json:
                        typer.echo(json.dumps(r.as_dict()))
                    if where:
                        typer.echo(f"profile of {s} batch {b} {m}: {where / 'profile.md'}", err=True)
    if not as_json:
        typer.echo(format_table(results))


def memory(
    size: Annotated[list[str], typer.Option("--size", help="Model size(s): tiny, small, base, large.")] = ["base"],  # noqa: B006
    batch: Annotated[list[int], typer.Option("--batch", help="Batch size(s).")] = [16],  # noqa: B006
    setting: Annotated[
        list[str],
        typer.Option(
            "--setting",
            help="eager; selective (keep matmul outputs, recompute "
            "pointwise ops); full (recompute every block); recompute:F (the first "
            "share F of the blocks, perf.recompute_fraction); or selective+recompute:F.",
        ),
    ] = ["eager"],  # noqa: B006
    reference_masks: Annotated[
        bool,
        typer.Option(
            "--reference-masks", help="The reference's masks and token counts (its batch-minimum truncation)."
        ),
    ] = False,
    steps: Annotated[
        int, typer.Option(help="Steps whose peak counts (after 2 warm-up steps), the bench's batches.")
    ] = 5,
    rois: Annotated[int, typer.Option(help="ROIs per sample.")] = 450,
    frames: Annotated[int, typer.Option(help="Frames per sample.")] = 160,
    worst_of: Annotated[
        int | None,
        typer.Option(
            help="Time one step on the heaviest of N mask draws (what a long "
            "run meets) instead of the bench's batches. Default: 0, and "
            "1000 with --fit (our masks only)."
        ),
    ] = None,
    fit: Annotated[
        float | None,
        typer.Option(
            help="Your GPU's memory in GiB: try eager, then ever more recomputation, "
            "and print the fastest setting that fits (--setting is ignored)."
        ),
    ] = None,
    headroom: Annotated[
        float,
        typer.Option(
            help="With --fit: share of the GPU kept free for what the estimate leaves "
            "out (CUDA context, allocator rounding, workspaces)."
        ),
    ] = 0.15,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line instead of a table.")] = False,
) -> None:
    """Estimate the peak GPU memory of a bf16 training step without a GPU: the step runs on fake
    tensors (shapes only) and every live tensor's bytes are added up. Ratios are against the
    reference's measured H200 peaks (the reference GPU figures in docs/performance.md); docs/performance.md shows how
    close the estimate comes for the reference's own code."""
    from tqdm.auto import tqdm

    from brainjepa.perf.bench import REFERENCE_H200
    from brainjepa.perf.memory import estimate_step_memory, fit_setting, format_estimates, parse_setting, perf_yaml

    if worst_of and reference_masks:
        raise _fail(ValueError("--worst-of: only for our masks (the reference's counts depend on the whole batch)"))
    anchor = {k: v[1] for k, v in REFERENCE_H200.items()}
    if fit is not None:
        if fit <= 0 or not 0 <= headroom < 1:
            raise _fail(ValueError(f"--fit must be > 0 GiB and --headroom in [0, 1), got {fit} and {headroom}"))
        worst = (0 if reference_masks else 1000) if worst_of is None else worst_of
        for sz in size:
            for b in batch:
                chosen, tried = fit_setting(
                    fit,
                    headroom,
                    size=sz,
                    batch=b,
                    n_rois=rois,
                    n_frames=frames,
                    steps=steps,
                    reference_masks=reference_masks,
                    worst_of=worst,
                )
                typer.echo(format_estimates(tried, anchor))
                if chosen is None:
                    typer.echo(
                        f"{sz} at batch {b} does not fit in {fit:g} GiB even with full recomputation: "
                        f"use a smaller batch (with gradient accumulation) or a larger GPU."
                    )
                else:
                    typer.echo(
                        f"{sz} at batch {b} fits in {fit:g} GiB ({headroom:.0%} kept free) with "
                        f"'{chosen.setting}': put this in the YAML:\n{perf_yaml(chosen)}"
                    )
        return
    try:
        kinds = {s: parse_setting(s) for s in setting}
    except ValueError as e:
        raise _fail(ValueError(f"--setting: {e}")) from e
    estimates = []
    runs = [(sz, b, s) for sz in size for b in batch for s in setting]
    with tqdm(runs, desc="memory", unit="setting", disable=len(runs) < 2) as bar:
        for sz, b, s in bar:
            bar.set_postfix_str(f"{sz} batch {b} {s}")
            selective, fraction = kinds[s]
            e = estimate_step_memory(
                sz,
                b,
                n_rois=rois,
                n_frames=frames,
                steps=steps,
                reference_masks=reference_masks,
                selective_checkpointing=selective,
                recompute_fraction=fraction,
                worst_of=worst_of or 0,
            )
            estimates.append(e)
            if as_json:
                typer.echo(json.dumps(e.as_dict()))
    if not as_json:
        typer.echo(format_estimates(estimates, anchor))


def numerics(
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    precision: Annotated[
        str,
        typer.Option(
            help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 (also on a CPU: "
            "emulates the GPU's rounding) or fp32; the same on both paths."
        ),
    ] = "auto",
    size: Annotated[str, typer.Option(help="Model size.")] = "tiny",
    steps: Annotated[int, typer.Option(help="Optimizer steps of each run.")] = 200,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 8,
    rois: Annotated[int, typer.Option(help="ROIs per sample.")] = 32,
    frames: Annotated[int, typer.Option(help="Frames per sample.")] = 64,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Include the CUDA-graph target forward.")] = False,
    out: Annotated[Path, typer.Option(help="Where numerics.png and numerics.json go.")] = Path("runs/numerics"),
) -> None:
    """Train twice from the same seed and batches, plain eager and the fast path, and compare the loss
    curves: exits 1 when they differ by more than the stated tolerance (docs/performance.md)."""
    from brainjepa.checkpoint import atomic_write_text
    from brainjepa.perf.bench import fast_perf
    from brainjepa.perf.numerics import compare_paths
    from brainjepa.plots import plot_loss_pair

    r = compare_paths(
        fast_perf(device, cuda_graphs),
        size=size,
        batch=batch,
        steps=steps,
        n_rois=rois,
        n_frames=frames,
        device=device,
        precision=precision,
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "numerics.json", json.dumps(r.summary(), indent=2))
    plot_loss_pair(
        r.eager_loss,
        r.fast_loss,
        out / "numerics.png",
        ("eager", r.fast),
        title=f"{size}, {device}, {r.precision}: fast path vs eager",
    )
    typer.echo(json.dumps(r.summary()))
    verdict = "within" if r.ok else "OUTSIDE"
    typer.echo(
        f"relative loss difference over {steps} steps ({r.precision}): largest {r.max_rel_loss_diff:.2e}, mean "
        f"{r.mean_rel_loss_diff:.2e}: {verdict} the tolerance {r.tolerance[0]:.0e} / {r.tolerance[1]:.0e}; "
        f"{r.graphs} compiled graphs; plot in {out / 'numerics.png'}"
    )
    if not r.ok:
        raise typer.Exit(code=1)


def dp_bench(
    size: Annotated[list[str], typer.Option("--size", help="Model sizes: tiny, small, base, large.")] = [  # noqa: B006
        "tiny",
        "small",
    ],
    batch: Annotated[int, typer.Option(help="Batch size (subjects per step).")] = 8,
    chunk: Annotated[
        list[int],
        typer.Option(
            "--chunk",
            help="DP: samples whose per-sample gradients exist at once "
            "(privacy.clip_chunk; 0 = the whole batch). Repeat for several.",
        ),
    ] = [0],  # noqa: B006
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    steps: Annotated[int, typer.Option(help="Timed optimizer steps.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps.")] = 1,
    rois: Annotated[int, typer.Option(help="ROIs per sample.")] = 450,
    frames: Annotated[int, typer.Option(help="Frames per sample.")] = 160,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line instead of a table.")] = False,
) -> None:
    """Cost of site-side DP-SGD: pretraining step time and peak memory without DP and with DP (per-sample
    gradients, Opacus clipping and noise), each configuration in a fresh process. docs/privacy.md."""
    from dataclasses import asdict

    from brainjepa.privacy.bench import format_table, measure_isolated

    common = dict(batch=batch, steps=steps, warmup=warmup, rois=rois, frames=frames, device=device)
    results = []
    try:
        for s in size:
            results.append(measure_isolated(size=s, dp=False, **common))
            results.extend(measure_isolated(size=s, dp=True, chunk=c, **common) for c in chunk)
    except (InputError, RuntimeError) as e:
        raise _fail(e) from e
    typer.echo("\n".join(json.dumps(asdict(r)) for r in results) if as_json else format_table(results))


def register(app: typer.Typer) -> None:
    """Add `bench`, `dp-bench`, `memory` and `numerics` to the main `brainjepa` app."""
    app.command("bench")(bench)
    app.command("dp-bench")(dp_bench)
    app.command("memory")(memory)
    app.command("numerics")(numerics)
