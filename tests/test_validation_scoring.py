"""Scoring a protocol on validation (`brainjepa evaluate --score-on validation`): the fine-tuning sites'
validation splits are scored, every test split and every site that only tests stays unread, nothing goes
to the scoring ledger, and pretraining is cached under the test scoring's key."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_generated_protocol
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.downstream.generated_cohorts import protocol_cohorts
from brainjepa.downstream.protocol import load_protocol, pretrain_key
from brainjepa.downstream.validation_scoring import validation_protocol
from brainjepa.errors import ConfigError, DataError
from sites.cohort import load_site_series

ROOT = Path(__file__).resolve().parent.parent
SEX = TaskSpec("sex", "sex", "classification", ("0", "1"))


def _protocol(root: Path, **edit: object) -> Path:
    return tiny_generated_protocol(
        root,
        generate_update={"split": [0.5, 0.25, 0.25], "held_out": ["site_c"]},
        **{
            "name": "val",
            "generator_seeds": [0],
            "seeds": [0],
            "methods": ["probe", "random_probe", "roi_spectrum", "fc"],
            "experiments": [
                {
                    "name": "held out",
                    "pretrain": ["site_a", "site_b"],
                    "finetune": ["site_a", "site_b"],
                    "test": ["site_c"],
                }
            ],
            **edit,
        },
    )


def _spoil_test_files(cohort_root: Path) -> list[Path]:
    """Overwrite every test subject's series file (all of held-out site C's) with bytes no reader accepts:
    any read of a test split fails, naming the file."""
    spoiled = []
    for yml in sorted(cohort_root.glob("site_*/site_*.yaml")):
        from sites.config import load_site_config

        series = load_site_series(load_site_config(yml))
        for files, split in zip(series.files, series.splits, strict=True):
            if split == "test":
                for f in files:
                    f.write_bytes(b"not a series")
                    spoiled.append(f)
    return spoiled


@pytest.mark.slow  # `brainjepa evaluate` end to end: a generated cohort, 2 pretraining steps, a probe, 3 more methods
def test_validation_scoring_reads_no_test_split_records_no_ledger_entry_and_scores_the_val_splits(
    tmp_path: Path,
) -> None:
    # two cohorts and two seeds, narrowed to the first of each by --cohorts 1 --seeds 1 (a pilot's options)
    path = _protocol(tmp_path, generator_seeds=[0, 1], seeds=[0, 1])
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    p = dataclasses.replace(load_protocol(path), generator_seeds=(0,), seeds=(0,))
    (cohort,) = protocol_cohorts(p, out, progress=False)  # what `evaluate` generates first
    cohort_root = Path(cohort.site_config("site_a").source).parent.parent
    spoiled = _spoil_test_files(cohort_root)
    assert len(spoiled) >= 24 + 2  # all of site C, and the test subjects of A and B
    run = [
        "evaluate",
        "--protocol",
        str(path),
        "--out-dir",
        str(out),
        "--ledger",
        str(ledger),
        "--cohorts",
        "1",
        "--seeds",
        "1",
    ]
    res = CliRunner().invoke(app, [*run, "--score-on", "validation"])
    assert res.exit_code == 0, res.output
    assert not ledger.exists()  # no test data scored: nothing recorded
    assert not (out / "report.md").exists() and (out / "validation" / "report.md").is_file()
    prov = json.loads((out / "validation" / "provenance.json").read_text())
    assert prov["scored_on"] == "validation" and "test_data_sha256" not in prov
    assert sorted(prov["data"]) == ["gen0/site_a", "gen0/site_b"]  # site C never loaded, nor the second cohort
    assert not list((out / "cohorts").glob("gen1-*"))
    with open(out / "validation" / "results.csv") as f:
        assert {r["seed"] for r in csv.DictReader(f)} == {"0"}  # the second seed left out
    assert all("test" not in d["scans"] for d in prov["data"].values())
    report = (out / "validation" / "report.md").read_text()
    assert "Scored on validation" in report and "validation data sha256" in report
    # each fine-tuning site's validation subjects scored, with their labels
    with open(out / "validation" / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    val = {
        s: load_labelled_site(cohort.site_config(s), SEX, 2.0, 32, "centered", splits=("train", "val")).val
        for s in ("site_a", "site_b")
    }
    for method in ("probe", "random_probe", "roi_spectrum", "fc"):
        for s, split in val.items():
            mine = [r for r in preds if r["method"] == method and r["site"] == s]
            assert len(mine) == len(split) > 0, (method, s)
            assert [int(float(r["y"])) for r in mine] == split.y.tolist()
    # the pretraining run sits where the test scoring looks for it (the same key)
    exp = p.experiments[0]
    assert (out / "pretrain" / pretrain_key(cohort, exp.pretrain, None) / "checkpoint.pt").is_file()
    # the spoiled files are what a test scoring reads: it fails on them (so the check above could fail)
    res = CliRunner().invoke(app, run)
    assert res.exit_code == 2 and "not a readable .npy" in res.output, res.output
    # scripts/validation_table.py: a run against itself differs by exactly nothing
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validation_table.py"), f"a={out / 'validation'}", f"b={out / 'validation'}",
         "--versus", "fc"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    assert "| b (roi_std) |" in table and "+0.0 [0.0, 0.0]" in table and "probe - fc |" in table
    # the probe minus fc, paired: the same figure in both rows, and not 0 (two different methods)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| a (", "| b ("))]
    assert (
        len(rows) == 2 * len(p.tasks) and all(r[-1] == rows[0][-1] for r in rows[:2]) and "+0.0 [0.0" not in rows[0][-1]
    )
    # the validation reports again from their saved predictions
    before = (out / "validation" / "intervals.csv").read_text()
    res = CliRunner().invoke(app, [*run, "--score-on", "validation", "--report-only"])
    assert res.exit_code == 0, res.output
    assert (out / "validation" / "intervals.csv").read_text() == before and not ledger.exists()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"methods": ["finetune", "fc"]}, "finetune (its training step is selected on validation)"),
        ({"methods": ["scratch"]}, "scratch"),
        ({"recipe": {"probe_solver": "sgd"}}, "probe_solver: sgd"),
        ({"recipe": {"select": "validation"}}, "recipe.select: validation"),
        ({"training_methods": ["probe"]}, "trained federated"),
    ],
)
def test_a_method_that_selects_on_validation_is_refused_in_a_validation_scoring(
    tmp_path: Path, edit: dict, needle: str
) -> None:
    p = load_protocol(_protocol(tmp_path, **edit))
    with pytest.raises(ConfigError, match="protocol.yaml") as e:
        validation_protocol(p)
    assert needle in str(e.value)


def test_the_validation_copy_scores_the_fine_tuning_sites(tmp_path: Path) -> None:
    v = validation_protocol(load_protocol(_protocol(tmp_path)))
    (exp,) = v.experiments
    assert exp.test == exp.finetune == ("site_a", "site_b") and "validation" in exp.name


def test_a_site_loaded_for_validation_has_no_test_scans(tmp_path: Path) -> None:
    p = load_protocol(_protocol(tmp_path))
    (cohort,) = protocol_cohorts(p, tmp_path / "out", progress=False)
    cfg = cohort.site_config("site_a")
    every = load_labelled_site(cfg, SEX, 2.0, 32, "centered")
    some = load_labelled_site(cfg, SEX, 2.0, 32, "centered", splits=("train", "val"))
    assert len(every.test) > 0 and len(some.test) == 0
    assert some.val.ids == every.val.ids and some.train.ids == every.train.ids
    assert all(np.array_equal(a, b) for a, b in zip(some.train.series, every.train.series, strict=True))
    with pytest.raises(DataError, match="unknown split"):
        load_site_series(cfg, split=("train", "validation"))
