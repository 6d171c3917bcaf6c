"""`brainjepa evaluate --protocol FILE`: run a protocol and write its tables (CSV, Markdown, PNG).

For every experiment: the pretrained backbone (trained here on the experiment's `pretrain` sites, once,
cached under OUT/pretrain/, or a given checkpoint; plus one per ablation), then for every task, seed,
method and training mode: fit on the `finetune` sites (model selection on their validation splits,
`brainjepa.downstream.fit`), and score the selected model once on each `test` site's test split. A row
per (experiment, method, training, task, seed, test site), plus `site = all`: the scan-weighted mean
over the test sites. `local` fits one model per fine-tuning site (`trained_on`); with a single
fine-tuning site the three training modes are the same computation and only `centralized` is run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainjepa.config import load_pretrain_config
from brainjepa.downstream import baselines, comparison, provenance, report, validation_scoring
from brainjepa.downstream.config import BASELINES, NEURAL_METHODS, ScoreOn, TaskSpec
from brainjepa.downstream.data import LabelledSite, load_labelled_site, training_scaling
from brainjepa.downstream.fit import fit, pooled
from brainjepa.downstream.generated_cohorts import protocol_cohorts
from brainjepa.downstream.metrics import METRICS, PRIMARY, classification_metrics, regression_metrics, summarize
from brainjepa.downstream.model import Backbone, load_backbone
from brainjepa.downstream.protocol import Ablation, Experiment, Protocol, pretrain_key, protocol_hash, resolved
from brainjepa.downstream.provenance import ScoringLedger
from brainjepa.downstream.train import predict, weighted_metrics
from brainjepa.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    out_dir: Path
    rows_csv: Path
    summary_csv: Path
    report_md: Path
    markdown: str  # the report's tables
    plots: list[Path]


def pretrained_backbone(p: Protocol, exp: Experiment, ablation: Ablation | None, out: Path, progress: bool) -> Backbone:
    """The experiment's backbone: its checkpoint, or pretraining on its `pretrain` sites (cached)."""
    from brainjepa.pretrain import pretrain  # the single-machine loop (pooled sites)

    if exp.checkpoint:
        return load_backbone(p.source.parent / exp.checkpoint)
    run_dir = out / "pretrain" / pretrain_key(p, exp.pretrain, ablation)
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        return load_backbone(ckpt)
    if not p.pretrain.config:
        raise FileNotFoundError(f"protocol '{p.source}': 'pretrain.config' (a pretraining YAML) is needed to pretrain")
    sites = [str((p.source.parent / p.site(s).config).resolve()) for s in exp.pretrain]
    overrides = {
        "data.site": "",
        "data.roi_dir": "",
        "data.sites": sites,
        "train.steps": p.pretrain.steps,
        "train.seed": p.pretrain.seed,
        "train.out_dir": str(run_dir),
        "train.checkpoint_every": p.pretrain.steps,
    }
    cfg = load_pretrain_config(p.source.parent / p.pretrain.config, overrides)
    if ablation is not None:
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, pos_embed=ablation.pos_embed),
            mask=dataclasses.replace(cfg.mask, mode=ablation.mask_mode),
        )
    log.info(
        "pretraining %s on %s (%d steps)", ablation.name if ablation else "the backbone", exp.pretrain, cfg.train.steps
    )
    pretrain(cfg, progress=progress)
    return load_backbone(ckpt)


Scores = dict[str, np.ndarray]  # test site -> (N, C) class probabilities | (N,) predictions


def _score(
    task: TaskSpec, tests: list[LabelledSite], scores: Scores, base: dict, trained_on: str, extra: dict | None = None
) -> tuple[list[dict], list[dict]]:
    """Result rows (per test site, plus `site = all`: the scan-weighted mean) and per-subject prediction
    rows (subject = its index in the site's test split: no participant id is written) of one fitted model."""
    per = []
    preds: list[dict] = []
    for t in tests:
        s, y = scores[t.site], t.test.y
        if task.kind == "classification":
            per.append((t.site, classification_metrics(y, s, task.n_outputs)))
            cols = [{f"p{c}": float(v[c]) for c in range(task.n_outputs)} for v in s]
        else:
            per.append((t.site, regression_metrics(y.astype(np.float64), s.astype(np.float64))))
            cols = [{"pred": float(v)} for v in s]
        preds += [
            {**base, "trained_on": trained_on, "site": t.site, "subject": i, "y": float(y[i]), **c}
            for i, c in enumerate(cols)
        ]
    rows = [
        {**base, "site": s, "trained_on": trained_on, **(extra or {}), **m} for s, m in _with_all(per, tests, task.kind)
    ]
    return rows, preds


def _baseline_scores(
    p: Protocol, method: str, task: TaskSpec, fts: list[LabelledSite], tests: list[LabelledSite], seed: int, tr: float
) -> tuple[Scores, dict]:
    """A baseline fitted on the pooled fine-tuning scans (strength by cross-validation over the training
    scans, or on the validation scans: `recipe.select`), then scored on each test site."""
    tr_split, va = pooled(fts, "train"), pooled(fts, "val")
    est = baselines.fit_baseline(
        method,
        tr_split.series,
        tr_split.y,
        va.series,
        va.y,
        kind=task.kind,
        seed=seed,
        tr=tr,
        config=p.baselines,
        select=p.recipe.select,
    )
    return {t.site: est.predict_scores(t.test.series, task.n_outputs) for t in tests}, {"strength": est.strength}


def _with_all(rows: list[tuple[str, dict]], tests: list[LabelledSite], kind: str) -> list[tuple[str, dict]]:
    n = {t.site: len(t.test) for t in tests}
    return rows + [("all", weighted_metrics([(m, n[s]) for s, m in rows], kind))]


def _labelled_sites(
    p: Protocol, exp: Experiment, task: TaskSpec, model_tr: float, n_frames: int, scaling: str, score_on: ScoreOn
) -> dict[str, LabelledSite]:
    """The experiment's sites for one task; a site that only tests is scaled as `test_site_scaling` says.
    On validation: the fine-tuning sites' training and validation subjects only, the validation split scored."""
    if score_on == "validation":
        return {
            s: validation_scoring.as_validation(
                load_labelled_site(
                    p.site_config(s), task, model_tr, n_frames, scaling, splits=validation_scoring.READ_SPLITS
                )
            )
            for s in exp.finetune
        }
    shared = "own"
    if p.test_site_scaling == "training_sites" and set(exp.test) - set(exp.finetune):
        shared = training_scaling([p.site_config(s) for s in exp.finetune], model_tr, n_frames, scaling)
    return {
        s: load_labelled_site(
            p.site_config(s),
            task,
            model_tr,
            n_frames,
            scaling,
            training=s in exp.finetune,
            scaling_stats="own" if s in exp.finetune else shared,
        )
        for s in dict.fromkeys((*exp.finetune, *exp.test))
    }


def run_cohort(
    p: Protocol, out_dir: Path, progress: bool, device: str, score_on: ScoreOn = "test"
) -> tuple[list[dict], list[dict]]:
    """Every experiment of one cohort (the protocol's sites, or one generated cohort): result rows and
    per-subject prediction rows. `out_dir`: where pretraining runs are cached."""
    rows: list[dict] = []
    preds: list[dict] = []
    variants: list[Ablation | None] = [None, *p.ablations]
    cohort = p.cohort or "-"
    for exp in p.experiments:
        needs_pretrained = any(m in p.methods for m in ("finetune", "probe"))
        backbones = {v: pretrained_backbone(p, exp, v, out_dir, progress) for v in variants} if needs_pretrained else {}
        shape = backbones[None] if backbones else _shape_only(p, exp, out_dir, progress)
        n_frames, (model_tr, scaling) = shape.model.n_frames, _pretrain_data(p)
        for task in p.tasks:
            data = _labelled_sites(p, exp, task, model_tr, n_frames, scaling, score_on)
            fts, tests = [data[s] for s in exp.finetune], [data[s] for s in exp.test]
            modes = list(p.training) if len(fts) > 1 else ["centralized"]
            runs = [
                (seed, m, v, mode)
                for seed in p.seeds
                for m in p.methods
                for v in (variants if m in ("finetune", "probe") else [None])
                for mode in (modes if m in p.training_methods and m in NEURAL_METHODS else ["centralized"])
            ]
            desc = f"{p.cohort + ' ' if p.cohort else ''}{exp.name}: {task.name}"
            for seed, method, variant, mode in tqdm(runs, desc=desc, disable=not progress):
                name = method if variant is None else f"{method} [{variant.name}]"
                base = {
                    "experiment": exp.name,
                    "method": name,
                    "training": mode,
                    "task": task.name,
                    "seed": seed,
                    "cohort": cohort,
                }
                if method in BASELINES:
                    scores, extra = _baseline_scores(p, method, task, fts, tests, seed, model_tr)
                    r, pr = _score(task, tests, scores, base, "+".join(exp.finetune), extra)
                    rows, preds = rows + r, preds + pr
                    continue
                recipe = dataclasses.replace(p.recipe, method=method, seed=seed)
                backbone = backbones.get(variant, shape)
                groups = [[s] for s in fts] if mode == "local" else [fts]
                for group in groups:
                    res = fit(backbone, task, recipe, group, mode, p.local_steps, device)
                    scores = {
                        t.site: predict(res.model, t.test, task, res.target, n_frames, recipe.eval_windows)
                        for t in tests
                    }
                    r, pr = _score(
                        task, tests, scores, base, "+".join(g.site for g in group), {"best_step": res.best_step}
                    )
                    rows, preds = rows + r, preds + pr
    return rows, preds


def run_protocol(
    p: Protocol,
    out_dir: Path,
    progress: bool = True,
    device: str = "cpu",
    *,
    ledger: ScoringLedger | None = None,
    rescore: bool = False,
    score_on: ScoreOn = "test",
) -> EvaluationResult:
    """Run the protocol on every cohort and write its reports. Before anything is trained or scored, the
    data is fingerprinted and, with a `ledger`, a second scoring of the same test data by the same protocol
    is refused unless `rescore` (`provenance.AlreadyScored`). `score_on="validation"`: the fine-tuning
    sites' validation splits instead, no test split read, nothing in the ledger, the reports in
    OUT/validation/ (`brainjepa.downstream.validation_scoring`)."""
    out_dir = Path(out_dir)
    on_val = score_on == "validation"
    scored = validation_scoring.validation_protocol(p) if on_val else p  # refuses methods selecting on val
    reports = validation_scoring.report_dir(out_dir) if on_val else out_dir
    reports.mkdir(parents=True, exist_ok=True)
    resolved_cohorts = protocol_cohorts(scored, out_dir, progress)
    model_tr, _ = _pretrain_data(p)
    phash = protocol_hash(p)
    ledger = None if on_val else ledger
    record = provenance.base_record(
        phash, resolved(p), Path(__file__).resolve().parent, ledger.path if ledger is not None else None
    )
    record["scored_on"] = score_on
    record["data"], record[f"{score_on}_data_sha256"] = provenance.data_record(resolved_cohorts, model_tr, score_on)
    record["checkpoints"] = {
        e.name: provenance.file_sha256(p.source.parent / e.checkpoint) for e in p.experiments if e.checkpoint
    }
    if ledger is not None:
        record["scoring"] = provenance.check_and_record(ledger, phash, record["test_data_sha256"], out_dir, rescore)
    for stale in ("results.csv", "predictions.csv"):  # an earlier run's: never rendered with this one's provenance
        (reports / stale).unlink(missing_ok=True)
    provenance.write_provenance(reports / "provenance.json", record)  # now: a failed report can be rerendered
    rows: list[dict] = []
    preds: list[dict] = []
    for cp in resolved_cohorts:
        r, pr = run_cohort(cp, out_dir, progress, device, score_on)
        rows, preds = rows + r, preds + pr
    result = write_reports(scored, rows, preds, reports, record)
    if ledger is not None:
        provenance.mark_completed(ledger, phash, record["test_data_sha256"], out_dir)
    return result


def _pretrain_data(p: Protocol) -> tuple[float, str]:
    """The model TR and the scaling method of the protocol's pretraining config: downstream data is
    resampled and scaled as pretraining did."""
    from brainjepa.config import DataConfig

    d = load_pretrain_config(p.source.parent / p.pretrain.config).data if p.pretrain.config else DataConfig()
    return d.model_tr, d.scaling


def _shape_only(p: Protocol, exp: Experiment, out: Path, progress: bool) -> Backbone:
    """Without pretrained methods the backbone's shape still comes from the protocol's pretraining config."""
    if exp.checkpoint:
        return load_backbone(p.source.parent / exp.checkpoint)
    from brainjepa.gradients import gradients_for
    from sites.cohort import load_cohort

    cfg = load_pretrain_config(p.source.parent / p.pretrain.config)
    cohort = load_cohort(p.site_config(exp.finetune[0]), cfg.data.model_tr, scaling="none", for_model=False)
    grads, _ = gradients_for(cfg.data.gradients, cohort.series, cfg.model.gradient_components, cohort.source)
    return Backbone(cfg.model, grads, {}, "random init", None)


def rerender(
    p: Protocol, out_dir: Path, ledger: ScoringLedger | None = None, score_on: ScoreOn = "test"
) -> EvaluationResult:
    """The reports again from a run's results.csv, predictions.csv and provenance.json: no model is fitted
    and nothing new is predicted (after the report's format changed, or when the run's last step, the
    report, failed). With a `ledger`, a scoring not yet marked completed there is marked now: its test
    numbers are shown. `score_on="validation"`: the validation scoring's reports (OUT/validation/)."""
    out_dir = validation_scoring.report_dir(out_dir) if score_on == "validation" else Path(out_dir)
    for name in ("results.csv", "predictions.csv", "provenance.json"):
        if not (out_dir / name).is_file():
            raise DataError(
                f"{out_dir}: no {name}; --report-only needs a run of this protocol that predicted "
                f"every test subject (results.csv, predictions.csv and provenance.json)"
            )
    record = json.loads((out_dir / "provenance.json").read_text())
    if record["protocol_sha256"] != protocol_hash(p):
        raise DataError(
            f"{out_dir}: its provenance.json is of another protocol (sha256 {record['protocol_sha256'][:12]}, "
            f"this one {protocol_hash(p)[:12]})"
        )
    record["report_rendered"] = {
        "git": provenance.git_state(Path(__file__).resolve().parent),
        "command": sys.argv,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tidy = [{k: _tidy(v) for k, v in r.items()} for r in report.read_csv(out_dir / "results.csv")]
    preds = [{k: _tidy(v) for k, v in r.items()} for r in report.read_csv(out_dir / "predictions.csv")]
    if record.get("scored_on", "test") != score_on:
        raise DataError(f"{out_dir}: its provenance.json is of a scoring on {record.get('scored_on')}, not {score_on}")
    if score_on == "validation":
        p, ledger = validation_scoring.validation_protocol(p), None
    result = write_reports(p, tidy, preds, out_dir, record)
    if ledger is not None and not provenance.completed(
        ledger, record["protocol_sha256"], record["test_data_sha256"], out_dir
    ):
        provenance.mark_completed(ledger, record["protocol_sha256"], record["test_data_sha256"], out_dir)
    return result


def _tidy(v: object) -> object:
    """A CSV cell read back as a float: whole numbers back to int, NaN back to empty."""
    if isinstance(v, float) and v != v:
        return ""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def write_reports(
    p: Protocol, rows: list[dict], preds: list[dict], out_dir: Path, record: dict | None = None
) -> EvaluationResult:
    """results.csv (every row), predictions.csv (every test subject's scores), summary.csv (mean +- std over
    seeds, site = all), intervals.csv (95 % subject-bootstrap intervals and paired differences to the best
    baseline), report.md, PNG plots and provenance.json."""
    rows_csv = report.write_csv(rows, out_dir / "results.csv")
    report.write_csv(preds, out_dir / "predictions.csv")
    overall = [r for r in rows if r["site"] == "all"]
    metric_names = sorted({m for t in p.tasks for m in METRICS[t.kind]})
    summary = summarize(overall, ["experiment", "method", "training", "task"], metric_names)
    summary_csv = report.write_csv(summary, out_dir / "summary.csv")
    kinds = {t.name: t.kind for t in p.tasks}
    cmp = comparison.compare(preds, kinds, n_boot=p.n_bootstrap, baselines=BASELINES)
    report.write_csv(cmp.rows, out_dir / "intervals.csv")
    sections, plots = [], []
    on = (record or {}).get("scored_on", "test")  # the split scored: test, or validation
    primary = {t.name: PRIMARY[t.kind] for t in p.tasks}
    tasks = [t.name for t in p.tasks]
    for exp in p.experiments:
        sections.append((exp.name, comparison.markdown(cmp, exp.name, tasks, kinds)))
        ex = [dict(r, method=f"{r['method']} · {r['training']}") for r in summary if r["experiment"] == exp.name]
        slug = "".join(c if c.isalnum() else "_" for c in exp.name).strip("_").lower()
        first = next(iter(primary.values()))
        plots.append(report.plot_methods(ex, out_dir / f"{slug}_methods.png", first))
        modes = [r for r in summary if r["experiment"] == exp.name and r["method"] in p.training_methods]
        if len({r["training"] for r in modes}) > 1:
            plots.append(report.plot_training_modes(modes, out_dir / f"{slug}_training.png", first))
        per_site = [dict(r, method=f"{r['method']} · {r['training']}") for r in rows if r["experiment"] == exp.name]
        plots.append(report.plot_per_site(per_site, out_dir / f"{slug}_sites.png", first, on))
    if record is not None:
        sections.append(("Provenance", comparison.provenance_markdown(record)))
        provenance.write_provenance(out_dir / "provenance.json", record)
    n_cohorts = len({r["cohort"] for r in rows})
    cohorts_text = f", {n_cohorts} generated cohorts" if p.generate is not None else ""
    title = (
        f"{p.name}: {len(p.seeds)} seed(s){cohorts_text}; 95 % intervals from {p.n_bootstrap} resamples of "
        f"{on} subjects" + (f"\n\n{validation_scoring.NOTE}" if on == "validation" else "")
    ) + (f"\n\n{p.description}" if p.description else "")
    if any(m in NEURAL_METHODS for m in p.methods):
        r = p.recipe
        title += "\n\n" + report.readout_note(r.pool, r.probe_solver, r.eval_windows)
    md = "\n\n".join(f"### {h}\n\n{t}" for h, t in sections)
    report_md = report.write_markdown(out_dir / "report.md", sections, title=title)
    return EvaluationResult(out_dir, rows_csv, summary_csv, report_md, md, plots)
