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
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainjepa.config import load_pretrain_config
from brainjepa.downstream import baselines, report
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import LabelledSite, load_labelled_site
from brainjepa.downstream.fit import fit, pooled
from brainjepa.downstream.metrics import (
    METRICS,
    PRIMARY,
    classification_metrics,
    regression_metrics,
    summarize,
)
from brainjepa.downstream.model import Backbone, load_backbone
from brainjepa.downstream.protocol import Ablation, Experiment, Protocol, pretrain_key
from brainjepa.downstream.train import split_metrics, weighted_metrics

log = logging.getLogger(__name__)
KEYS = ["experiment", "method", "training", "task", "seed", "site", "trained_on"]


@dataclass(frozen=True)
class EvaluationResult:
    out_dir: Path
    rows_csv: Path
    summary_csv: Path
    report_md: Path
    markdown: str  # the report's tables
    plots: list[Path]


def pretrained_backbone(p: Protocol, exp: Experiment, ablation: Ablation | None, out: Path,
                        progress: bool) -> Backbone:  # fmt: skip
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
    overrides = {"data.site": "", "data.roi_dir": "", "data.sites": sites, "train.steps": p.pretrain.steps,
                 "train.seed": p.pretrain.seed, "train.out_dir": str(run_dir), "train.checkpoint_every": p.pretrain.steps}  # fmt: skip
    cfg = load_pretrain_config(p.source.parent / p.pretrain.config, overrides)
    if ablation is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pos_embed=ablation.pos_embed),
                                  mask=dataclasses.replace(cfg.mask, mode=ablation.mask_mode))  # fmt: skip
    log.info("pretraining %s on %s (%d steps)", ablation.name if ablation else "the backbone", exp.pretrain, cfg.train.steps)
    pretrain(cfg, progress=progress)
    return load_backbone(ckpt)


def _fc_rows(task: TaskSpec, fts: list[LabelledSite], tests: list[LabelledSite], seed: int,
             select: str) -> list[tuple[str, dict]]:  # fmt: skip
    """Connectivity + logistic / ridge regression: fitted on the pooled fine-tuning scans, C / alpha chosen
    on their validation scans; (test site, metrics) per test site."""
    tr, va = pooled(fts, "train"), pooled(fts, "val")
    est = baselines.fit_fc_baseline(baselines.fc_features(tr.series), tr.y, baselines.fc_features(va.series), va.y,
                                    task.kind, seed, select=select)  # fmt: skip
    out = []
    for t in tests:
        scores = baselines.predict_scores(est, baselines.fc_features(t.test.series), task.kind, task.n_outputs)
        m = (classification_metrics(t.test.y, scores, task.n_outputs) if task.kind == "classification"
             else regression_metrics(t.test.y.astype(np.float64), scores.astype(np.float64)))  # fmt: skip
        out.append((t.site, m))
    return out


def _with_all(rows: list[tuple[str, dict]], tests: list[LabelledSite], kind: str) -> list[tuple[str, dict]]:
    n = {t.site: len(t.test) for t in tests}
    return rows + [("all", weighted_metrics([(m, n[s]) for s, m in rows], kind))]


def run_protocol(p: Protocol, out_dir: Path, progress: bool = True, device: str = "cpu") -> EvaluationResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    variants: list[Ablation | None] = [None, *p.ablations]
    for exp in p.experiments:
        needs_pretrained = any(m in p.methods for m in ("finetune", "probe"))
        backbones = {v: pretrained_backbone(p, exp, v, out_dir, progress) for v in variants} if needs_pretrained else {}
        shape = backbones[None] if backbones else _shape_only(p, exp, out_dir, progress)
        n_frames, (model_tr, scaling) = shape.model.n_frames, _pretrain_data(p)
        for task in p.tasks:
            data = {s: load_labelled_site(p.site_config(s), task, model_tr, n_frames, scaling, training=s in exp.finetune)
                    for s in {*exp.finetune, *exp.test}}  # fmt: skip
            fts, tests = [data[s] for s in exp.finetune], [data[s] for s in exp.test]
            modes = list(p.training) if len(fts) > 1 else ["centralized"]
            runs = [(seed, m, v, mode) for seed in p.seeds for m in p.methods
                    for v in (variants if m in ("finetune", "probe") else [None])
                    for mode in (modes if m in p.training_methods and m != "fc" else ["centralized"])]  # fmt: skip
            for seed, method, variant, mode in tqdm(runs, desc=f"{exp.name}: {task.name}", disable=not progress):
                name = method if variant is None else f"{method} [{variant.name}]"
                base = {"experiment": exp.name, "method": name, "training": mode, "task": task.name, "seed": seed}
                if method == "fc":
                    rows += [{**base, "site": s, "trained_on": "+".join(exp.finetune), **m}
                             for s, m in _with_all(_fc_rows(task, fts, tests, seed, p.recipe.select), tests, task.kind)]  # fmt: skip
                    continue
                recipe = dataclasses.replace(p.recipe, method=method, seed=seed)
                backbone = backbones.get(variant, shape)
                groups = [[s] for s in fts] if mode == "local" else [fts]
                for group in groups:
                    res = fit(backbone, task, recipe, group, mode, p.local_steps, device)
                    per = [(t.site, split_metrics(res.model, t.test, task, res.target, n_frames, recipe.eval_windows))
                           for t in tests]  # fmt: skip
                    rows += [{**base, "site": s, "trained_on": "+".join(g.site for g in group), "best_step": res.best_step,
                              **m} for s, m in _with_all(per, tests, task.kind)]  # fmt: skip
    return write_reports(p, rows, out_dir)


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


def write_reports(p: Protocol, rows: list[dict], out_dir: Path) -> EvaluationResult:
    """results.csv (every row), summary.csv (mean +- std over seeds, site = all), report.md, PNG plots."""
    rows_csv = report.write_csv(rows, out_dir / "results.csv")
    overall = [r for r in rows if r["site"] == "all"]
    metric_names = sorted({m for t in p.tasks for m in METRICS[t.kind]})
    summary = summarize(overall, ["experiment", "method", "training", "task"], metric_names)
    summary_csv = report.write_csv(summary, out_dir / "summary.csv")
    sections, plots = [], []
    primary = {t.name: PRIMARY[t.kind] for t in p.tasks}
    second = {t.name: METRICS[t.kind][1 if t.kind == "classification" else 2] for t in p.tasks}
    tasks = [t.name for t in p.tasks]
    for exp in p.experiments:
        ex = [dict(r, method=f"{r['method']} · {r['training']}") for r in summary if r["experiment"] == exp.name]
        methods = list(dict.fromkeys(r["method"] for r in ex))
        for metrics in (primary, second):
            sections.append((f"{exp.name}", report.markdown_table(ex, methods, tasks, metrics)))
        slug = "".join(c if c.isalnum() else "_" for c in exp.name).strip("_").lower()
        first = next(iter(primary.values()))
        plots.append(report.plot_methods(ex, out_dir / f"{slug}_methods.png", first))
        modes = [r for r in summary if r["experiment"] == exp.name and r["method"] in p.training_methods]
        if len({r["training"] for r in modes}) > 1:
            plots.append(report.plot_training_modes(modes, out_dir / f"{slug}_training.png", first))
        per_site = [dict(r, method=f"{r['method']} · {r['training']}") for r in rows if r["experiment"] == exp.name]
        plots.append(report.plot_per_site(per_site, out_dir / f"{slug}_sites.png", first))
    title = f"{p.name}: {len(p.seeds)} seed(s), mean ± std" + (f"\n\n{p.description}" if p.description else "")
    md = "\n\n".join(f"### {h}\n\n{t}" for h, t in sections)
    report_md = report.write_markdown(out_dir / "report.md", sections, title=title)
    return EvaluationResult(out_dir, rows_csv, summary_csv, report_md, md, plots)
