"""The `brainjepa evaluate` command: run an evaluation protocol, print its table, write its reports."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, get_args

import click
import typer

from brainjepa.downstream.config import ScoreOn
from brainjepa.errors import InputError


def evaluate(
    protocol: Annotated[
        Path,
        typer.Option(
            help="Protocol YAML: sites (or the cohorts to generate), experiments (pretrain / finetune / test sites), tasks, methods, seeds (see experiments/ and configs/protocols/)."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            help="Where report.md, provenance.json, results / predictions / summary / intervals CSVs, the PNG plots, generated cohorts and cached pretraining runs go."
        ),
    ] = Path("runs/evaluate"),
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Use this pretraining checkpoint in every experiment (instead of the protocol's pretraining)."
        ),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Use only the protocol's first N seeds (a quick look).")] = None,
    cohorts: Annotated[
        int | None,
        typer.Option(
            help="Use only the protocol's first N generated cohorts (a quick look, e.g. a design pilot on validation; claims rest on all of them)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    rescore: Annotated[
        bool,
        typer.Option(
            help="Score this protocol's test data again although it was scored before (recorded in provenance.json and the report)."
        ),
    ] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            help="Only write the reports again from OUT_DIR's results.csv, predictions.csv and provenance.json (a run of this protocol that predicted every test subject, e.g. one whose report step failed): nothing is fitted or predicted."
        ),
    ] = False,
    ledger: Annotated[
        Path | None,
        typer.Option(
            help="The scoring ledger (default $BRAINJEPA_LEDGER, else ~/.local/state/brainjepa/scored.jsonl)."
        ),
    ] = None,
    score_on: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(get_args(ScoreOn)),
            help="test: score the test splits (once; the scoring ledger refuses a second look). validation: score each fine-tuning site's validation split instead, for choosing designs: the test splits and the sites that only test are never read, nothing goes to the ledger, the reports go to OUT_DIR/validation/ (cohorts and pretraining runs cached in OUT_DIR are reused). Methods that select on validation (finetune, scratch, SGD probes, select: validation) are refused there.",
        ),
    ] = "test",
    verbose: bool = False,
) -> None:
    """Fine-tune, probe and score a pretrained Brain-JEPA across sites as the protocol says, beside the
    baselines a reviewer asks for (per-ROI band power `roi_spectrum`, cleaned connectivity `fc`,
    tangent-space connectivity `fc_tangent`, the same ViT from scratch, a probe on random weights),
    federated vs centralized vs local. Training steps are selected on validation, probe and baseline
    strengths by cross-validation over the training scans; the test split is only scored. Every method gets
    95 % intervals from resampled test subjects, every neural method its paired difference to the best
    baseline. provenance.json records the code, the protocol's hash, the data's fingerprints; the same
    protocol does not score the same test data twice unless --rescore. Prints the report and where it went."""
    import dataclasses

    from brainjepa.downstream.evaluate import rerender, run_protocol
    from brainjepa.downstream.protocol import load_protocol
    from brainjepa.downstream.provenance import AlreadyScored, ScoringLedger, default_ledger

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        p = load_protocol(protocol)
        if seeds is not None:
            p = dataclasses.replace(p, seeds=p.seeds[:seeds])
        if cohorts is not None:
            if p.generate is None:
                raise InputError(
                    f"--cohorts: protocol '{protocol}' generates no cohorts (it has no 'generate' section)"
                )
            p = dataclasses.replace(p, generator_seeds=p.generator_seeds[:cohorts])
        if checkpoint is not None:
            experiments = tuple(
                dataclasses.replace(e, pretrain=(), checkpoint=str(checkpoint.resolve())) for e in p.experiments
            )
            p = dataclasses.replace(p, experiments=experiments, ablations=())
        if report_only:
            result = rerender(p, out_dir.resolve(), ScoringLedger(ledger or default_ledger()), score_on)
        else:
            result = run_protocol(
                p,
                out_dir.resolve(),
                progress=True,
                device=device,
                ledger=ScoringLedger(ledger or default_ledger()),
                rescore=rescore,
                score_on=score_on,
            )
    except (InputError, FileNotFoundError, AlreadyScored) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(result.markdown)
    typer.echo(
        f"\nreports in {result.out_dir}: {result.report_md.name}, {result.rows_csv.name}, "
        f"{result.summary_csv.name}, " + ", ".join(p.name for p in result.plots)
    )


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
