"""Frozen protocols: generated cohorts declared in the protocol, provenance, the scoring ledger, how a
test-only site is scaled, and the report's intervals and paired differences, through `brainjepa evaluate`."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_PRETRAIN, tiny_generated_protocol
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.downstream.config import TaskSpec
from brainjepa.downstream.data import load_labelled_site, training_scaling
from brainjepa.downstream.protocol import load_protocol, protocol_hash
from brainjepa.downstream.provenance import AlreadyScored, ScoringLedger, check_and_record, mark_completed
from brainjepa.errors import ConfigError
from sites.cohort import load_site_series
from sites.config import load_site_config
from sites.scaling import fit_method
from sites.synth import GENERATOR_VERSION, generate_cohorts

SEX = TaskSpec("sex", "sex", "classification", ("0", "1"))


@pytest.mark.slow  # `brainjepa evaluate` end to end: two generated cohorts, pretraining, four methods
def test_a_generated_protocol_runs_once_per_cohort_with_provenance_intervals_and_a_ledger(tmp_path: Path) -> None:
    path = tiny_generated_protocol(tmp_path)
    out = tmp_path / "out"
    run = ["evaluate", "--protocol", str(path), "--out-dir", str(out)]
    res = CliRunner().invoke(app, run)
    assert res.exit_code == 0, res.output
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["protocol_sha256"] == protocol_hash(load_protocol(path))
    assert prov["protocol"]["generate"]["mechanism"] == "coupling" and prov["git"]["commit"]
    assert sorted(prov["data"]) == [f"gen{g}/site_{s}" for g in (0, 1) for s in "abc"]
    assert prov["data"]["gen0/site_a"]["sha256"] != prov["data"]["gen1/site_a"]["sha256"]  # two cohorts
    assert prov["data"]["gen1/site_c"]["generator"]["generator_version"] == GENERATOR_VERSION
    assert prov["scoring"]["times_scored_before_by_this_protocol"] == 0
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    n_test = sum(prov["data"][f"gen{g}/site_c"]["scans"].get("test", 0) for g in (0, 1))
    for method in ("random_probe", "roi_spectrum", "fc", "fc_tangent"):
        mine = [r for r in preds if r["method"] == method]
        assert len(mine) == n_test and {r["cohort"] for r in mine} == {"gen0", "gen1"}
        assert all(not r["subject"].startswith("sub-") for r in mine)  # indices, no participant ids
    report = (out / "report.md").read_text()
    for method in ("roi_spectrum", "fc", "fc_tangent"):
        assert f"| {method} · centralized |" in report
    assert "random_probe · centralized - " in report and "AUROC" in report and "[" in report
    assert "generator version" in report
    assert "**Readout** (`recipe.pool: roi_std`)" in report and "no relation between ROIs" in report
    with open(out / "intervals.csv") as f:
        ivs = list(csv.DictReader(f))
    assert all(float(r["lo"]) <= float(r["estimate"]) <= float(r["hi"]) for r in ivs)
    # the reports again from the saved predictions: nothing refitted, the same intervals
    before = (out / "intervals.csv").read_text()
    res = CliRunner().invoke(app, [*run, "--report-only"])
    assert res.exit_code == 0, res.output
    assert (out / "intervals.csv").read_text() == before
    assert json.loads((out / "provenance.json").read_text())["report_rendered"]["git"]["commit"]
    # the same protocol on the same test data: refused, then allowed with --rescore and recorded
    again = CliRunner().invoke(app, run)
    assert again.exit_code == 2 and "already scored" in again.output
    again = CliRunner().invoke(app, [*run, "--rescore"])
    assert again.exit_code == 0, again.output
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["scoring"]["rescore"] and prov["scoring"]["times_scored_before_by_this_protocol"] == 1


def test_a_run_whose_report_step_failed_is_finished_by_report_only_and_then_counts_as_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from brainjepa.downstream import comparison

    path = tiny_generated_protocol(tmp_path, generator_seeds=[0], methods=["fc"])
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    run = ["evaluate", "--protocol", str(path), "--out-dir", str(out), "--ledger", str(ledger)]
    real = comparison.compare

    def fails(*a: object, **k: object) -> None:
        raise RuntimeError("the report step failed")

    monkeypatch.setattr(comparison, "compare", fails)
    res = CliRunner().invoke(app, run)
    assert isinstance(res.exception, RuntimeError)
    assert (out / "predictions.csv").is_file() and (out / "provenance.json").is_file()
    assert not (out / "report.md").exists()
    assert not any(e.get("completed") for e in ScoringLedger(ledger).entries())  # no test number was shown
    monkeypatch.setattr(comparison, "compare", real)
    res = CliRunner().invoke(app, [*run, "--report-only"])
    assert res.exit_code == 0, res.output
    assert "| fc · centralized |" in (out / "report.md").read_text()
    assert [e["completed"] for e in ScoringLedger(ledger).entries()] == [False, True]
    again = CliRunner().invoke(app, run)
    assert again.exit_code == 2 and "already scored" in again.output
    CliRunner().invoke(app, [*run, "--report-only"])  # rendering again is no new scoring
    assert [e["completed"] for e in ScoringLedger(ledger).entries()] == [False, True]
    empty = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--protocol",
            str(path),
            "--out-dir",
            str(tmp_path / "none"),
            "--report-only",
            "--ledger",
            str(ledger),
        ],
    )
    assert empty.exit_code == 2 and "no results.csv" in empty.output


def test_the_ledger_counts_only_completed_scorings_and_other_protocols_separately(tmp_path: Path) -> None:
    ledger = ScoringLedger(tmp_path / "l.jsonl")
    first = check_and_record(ledger, "p1", "data", tmp_path, rescore=False)
    assert first["times_scored_before_by_this_protocol"] == 0
    check_and_record(ledger, "p1", "data", tmp_path, rescore=False)  # the first run stopped before its tables
    mark_completed(ledger, "p1", "data", tmp_path)
    with pytest.raises(AlreadyScored, match="already scored"):
        check_and_record(ledger, "p1", "data", tmp_path, rescore=False)
    other = check_and_record(ledger, "p2", "data", tmp_path, rescore=False)
    assert other["times_scored_before_by_other_protocols"] == 1
    assert check_and_record(ledger, "p1", "other data", tmp_path, rescore=False)["rescore"] is False


def test_protocol_hash_changes_with_anything_a_result_depends_on(tmp_path: Path) -> None:
    p = load_protocol(tiny_generated_protocol(tmp_path))
    h = protocol_hash(p)
    assert h == protocol_hash(load_protocol(tmp_path / "protocol.yaml"))
    assert protocol_hash(dataclasses.replace(p, test_site_scaling="own_scans")) != h
    assert protocol_hash(dataclasses.replace(p, recipe=dataclasses.replace(p.recipe, eval_windows=4))) != h
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump({**TINY_PRETRAIN, "optim": {"lr": 1e-4}}))
    assert protocol_hash(p) != h  # the pretraining recipe's text is part of it


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"generator_seeds": []}, "at least one generator seed"),
        (
            {"sites": [{"name": s} for s in ("site_a", "site_b", "site_c", "site_q")]},
            "not one of the 3 generated sites",
        ),
        ({"tasks": [{"name": "iq", "column": "iq", "kind": "regression"}]}, "generated sites have"),
        ({"generate": None}, "needs a 'generate' section"),
        ({"generate": None, "generator_seeds": []}, "need a 'config'"),
        ({"generate": {"version": GENERATOR_VERSION, "mechanism": "vibes"}}, "generate.mechanism"),
        ({"test_site_scaling": "test_scans"}, "test_site_scaling"),
    ],
)
def test_a_malformed_generated_protocol_is_refused_naming_the_key(tmp_path: Path, edit: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        load_protocol(tiny_generated_protocol(tmp_path, **edit))
    assert "protocol.yaml" in str(e.value)


def test_a_test_only_site_takes_the_training_sites_scaling_unless_told_otherwise(tmp_path: Path) -> None:
    yamls = generate_cohorts(
        tmp_path, n_sites=3, subjects_per_site=12, n_rois=20, duration_s=200, split=(0.6, 0.2, 0.2)
    )
    cfgs = [load_site_config(y) for y in yamls]
    shared = training_scaling(cfgs[:2], 2.205, 32, "centered")
    pooled = [x for c in cfgs[:2] for x in load_site_series(c, 2.205, split="train", min_frames=32).series]
    np.testing.assert_allclose(shared.scale, fit_method(pooled, "centered").scale)
    new = load_labelled_site(cfgs[2], SEX, 2.205, 32, "centered", training=False, scaling_stats=shared)
    own = load_labelled_site(cfgs[2], SEX, 2.205, 32, "centered", training=False)
    raw = load_site_series(cfgs[2], 2.205, split="test", min_frames=32).series
    np.testing.assert_allclose(new.test.series[0], shared.apply(raw[0]), rtol=1e-6)
    assert not np.allclose(new.test.series[0], own.test.series[0])  # the site's own statistics differ
    with pytest.raises(ValueError, match="own training scans"):
        load_labelled_site(cfgs[0], SEX, 2.205, 32, "centered", training=True, scaling_stats=shared)


def test_git_state_sees_edits_but_not_the_ledger_it_keeps(tmp_path: Path) -> None:
    import subprocess

    from brainjepa.downstream.provenance import git_state

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True
        )

    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "ledger.jsonl").write_text("")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    assert git_state(tmp_path) == {"commit": git_state(tmp_path)["commit"], "dirty": False}
    (tmp_path / "ledger.jsonl").write_text("{}\n")
    assert git_state(tmp_path)["dirty"] is True
    assert git_state(tmp_path, tmp_path / "ledger.jsonl")["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path, tmp_path / "ledger.jsonl")["dirty"] is True
