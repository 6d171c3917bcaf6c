"""Scoring a protocol on validation: the measure design choices are made with, every test split left unread.

`brainjepa evaluate --score-on validation` runs a protocol's experiments with each fine-tuning site's
validation split in the place of a test split: the probes and baselines train on the fine-tuning sites'
training splits as they do for the test scoring, and are scored on those sites' validation splits (a
row per fine-tuning site, plus `site = all`). The sites that only test are never loaded, and every site
is read with its training and validation subjects only (`sites.cohort.load_site_series(split=...)`: the
test subjects' files are never opened). Pretraining reads training splits only, and its checkpoints are
cached under the same key as the test scoring's (OUT/pretrain/), as are the generated cohorts
(OUT/cohorts/); the reports go to OUT/validation/, so a test report in OUT is never overwritten.
Nothing is written to the scoring ledger: no test data is scored.

A method that chooses its weights or its strength on the validation split would be scored on the data
it was selected on; it is refused (fine-tuning and training from scratch select their step on
validation, a probe trained by SGD too, and `recipe.select: validation` picks strengths there).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from brainjepa.downstream.config import BASELINES
from brainjepa.downstream.data import LabelledSite
from brainjepa.downstream.protocol import Protocol
from brainjepa.errors import ConfigError, where

log = logging.getLogger(__name__)

READ_SPLITS = ("train", "val")  # the only splits a validation scoring opens
REPORT_DIR = "validation"
NOTE = (  # the report's first lines
    "**Scored on validation**: each fine-tuning site's validation split is scored where a test split would be "
    "(a row per fine-tuning site); the test splits and the sites that only test were not read, and nothing was "
    "recorded in the scoring ledger. These numbers choose designs; they are not test results."
)  # OUT/validation/: the validation reports, beside (never over) a test report


def selects_on_validation(p: Protocol) -> list[str]:
    """The protocol's methods that choose weights or strengths on the validation split, with why."""
    out = []
    several = any(len(e.finetune) > 1 for e in p.experiments)  # one fine-tuning site: centralized only
    for m in p.methods:
        if m in ("finetune", "scratch"):
            out.append(f"{m} (its training step is selected on validation)")
        elif m in ("probe", "random_probe") and p.recipe.probe_solver == "sgd":
            out.append(f"{m} (recipe.probe_solver: sgd selects its step on validation)")
        elif m in ("probe", "random_probe") and m in p.training_methods and "federated" in p.training and several:
            out.append(f"{m} (trained federated: by SGD, its step selected on validation)")
        elif p.recipe.select == "validation" and (m in BASELINES or m in ("probe", "random_probe")):
            out.append(f"{m} (recipe.select: validation picks its strength there)")
    return out


def validation_protocol(p: Protocol) -> Protocol:
    """The protocol with every experiment scored on its fine-tuning sites (their validation splits, see
    `as_validation`); refuses methods that select on validation (a `ConfigError` naming them)."""
    bad = selects_on_validation(p)
    if bad:
        raise ConfigError(
            f"{where(p.source, 'methods')}: scoring on validation needs methods that do not select on it; "
            f"{', '.join(bad)}. Leave them out of a validation scoring (e.g. a protocol copy with "
            "`methods: [probe, random_probe, roi_spectrum, fc, fc_tangent]`)"
        )
    experiments = tuple(
        dataclasses.replace(e, name=f"{e.name} [validation of {'+'.join(e.finetune)}]", test=e.finetune)
        for e in p.experiments
    )
    return dataclasses.replace(p, experiments=experiments)


def as_validation(site: LabelledSite) -> LabelledSite:
    """A fine-tuning site whose validation split is scored where the test split would be."""
    if len(site.test):
        raise ValueError(f"site {site.site}: a validation scoring must not hold test scans, got {len(site.test)}")
    return dataclasses.replace(site, splits={**site.splits, "test": site.val})


def report_dir(out_dir: Path) -> Path:
    return Path(out_dir) / REPORT_DIR
