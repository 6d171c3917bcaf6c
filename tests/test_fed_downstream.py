"""Federated fine-tuning and linear probing over real Flower == the in-process `fit(mode="federated")`.

Two generated sites, a tiny backbone pretrained for 4 steps, then through the same ServerApp / ClientApp
as pretraining (SuperLink + 2 SuperNodes on loopback, `flwr run`):
- linear probing of a regression task (age), 1 round x 3 local steps: a `label-stats` round first
  (the target standardisation from the sites' label sums), validation at the end;
- fine-tuning of a classification task (sex), 2 rounds x 3 local steps, validation after each round,
  with a third, hostile site that scales its head: rejected by the head's own bound in round 1, then
  quarantined (not asked for training, validation or test).
Each run's selected weights and validation metrics equal `fit(..., "federated", local_steps=K)` on the
two honest sites. Every evaluation reply holds only metrics and a scan count (the sites' own dumps of
what they sent).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from harness import FLOWER_ENV

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig, load_site
from brainjepa.demo import prepare_federation
from brainjepa.downstream.config import DownstreamConfig, DownstreamTask, TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.downstream.fit import fit
from brainjepa.downstream.metrics import METRICS
from brainjepa.downstream.model import DownstreamModel, load_backbone
from brainjepa.federation.contract import ARRAYS, SITE, Metric, eval_metric_key
from brainjepa.federation.contract import METRICS as METRICS_RECORD
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from brainjepa.pretrain import pretrain
from server.config import FederationConfig, to_run_config
from sites.temporal import DEFAULT_MODEL_TR

pytestmark = pytest.mark.integration  # SuperLink / SuperNodes as real processes

N_ROIS, N_FRAMES = 40, 64
# What an evaluation reply may hold besides `eval-<metric>` values: the scan count and transfer figures.
EVAL_BOOKKEEPING = {Metric.NUM_EXAMPLES, Metric.ROUND_WALL_S, Metric.BYTES_RECEIVED, Metric.BYTES_SENT}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two sites, their gradient file, a backbone pretrained on both for 4 steps, and a SuperLink with
    one SuperNode per site (both tests' runs go through it; each site dumps what it sends)."""
    tmp = tmp_path_factory.mktemp("fed_downstream")
    threads = torch.get_num_threads()
    # One thread here as in the sites' processes (FLOWER_ENV): both sides then sum in the same order (and
    # on a shared 2-core machine two threads per process spin against each other).
    torch.set_num_threads(1)
    demo = prepare_federation(
        tmp / "sites", n_sites=2, subjects=16, n_rois=N_ROIS, n_frames=N_FRAMES, seed=5, site_tr=DEFAULT_MODEL_TR
    )
    cfg = PretrainConfig(
        model=ModelConfig(n_rois=N_ROIS, n_frames=N_FRAMES),
        data=DataConfig(sites=tuple(str(y) for y in demo.site_yamls), gradients=str(demo.gradients)),
        train=TrainConfig(steps=4, batch_size=4, device="cpu", out_dir=str(tmp / "pretrain"), checkpoint_every=4),
    )
    checkpoint = pretrain(cfg, progress=False).checkpoint
    dumps = tmp / "dumps"
    nodes = [
        {"site-config": str(y), "gradients": str(demo.gradients), "dump-updates-dir": str(dumps)}
        for y in demo.site_yamls
    ]
    with LocalFederation(tmp / "flower", nodes, env_extra=FLOWER_ENV) as fed:
        yield {"tmp": tmp, "demo": demo, "checkpoint": checkpoint, "fed": fed, "dumps": dumps}
    torch.set_num_threads(threads)


def _write_config(path: Path, task: TaskSpec, recipe: DownstreamConfig) -> Path:
    path.parent.mkdir(parents=True)
    path.write_text(
        yaml.safe_dump(
            {"task": dataclasses.asdict(task) | {"classes": list(task.classes)}, "recipe": dataclasses.asdict(recipe)}
        )
    )
    return path


def _run(
    federation: dict,
    name: str,
    task: TaskSpec,
    recipe: DownstreamConfig,
    local_steps: int,
    clientapp: tuple[str, str] | None = None,
) -> tuple[dict, Path]:
    """The run over Flower (its checkpoint and folder) and the in-process reference, compared.
    `clientapp`: (module name, source) of a ClientApp to run instead of the real one."""
    tmp, demo = federation["tmp"] / name, federation["demo"]
    config = _write_config(tmp / "downstream.yaml", task, recipe)
    cfg = FederationConfig(
        task="probe" if recipe.frozen_backbone else "finetune",
        local_steps=local_steps,
        checkpoint=str(federation["checkpoint"]),
        downstream_config=str(config),
        out_dir=str(tmp / "runs"),
        gradients=str(demo.gradients),
    )
    dumps = federation["dumps"]
    shutil.rmtree(dumps, ignore_errors=True)  # this run's replies only
    if clientapp is None:
        app = write_app_dir(tmp / "app", to_run_config(cfg))
    else:
        app = write_app_dir(tmp / "app", to_run_config(cfg), clientapp=f"{clientapp[0]}:app")
        (app / f"{clientapp[0]}.py").write_text(clientapp[1])
    res = federation["fed"].run(app, timeout_s=300)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    (run_dir,) = list((tmp / "runs").iterdir())
    flower = load_checkpoint(run_dir / "downstream.pt")

    # The same computation in this process (`fit` loads the sites as the ClientApp does).
    backbone = load_backbone(federation["checkpoint"])
    dt = DownstreamTask(task, recipe)
    sites = [load_labelled_site(load_site(y)[0], task, dt.model_tr, N_FRAMES, dt.scaling) for y in demo.site_yamls]
    ref = fit(backbone, task, recipe, sites, "federated", local_steps=local_steps)
    state = ref.model.state_dict()
    worst = max(
        float((flower["model"][k].double() - v.double()).abs().max()) for k, v in state.items() if v.is_floating_point()
    )
    init = {k.removeprefix("target."): v for k, v in load_checkpoint(federation["checkpoint"])["models"].items()}
    moved = max(
        float((flower["model"][k] - init[k.removeprefix("backbone.")]).abs().max())
        for k in state
        if k.startswith("backbone.") and state[k].is_floating_point()
    )
    print(
        f"{name}: max |flower - in-process| = {worst:.3g} over {len(state)} tensors; selected step "
        f"{flower['step']} (in-process {ref.best_step}); backbone moved by up to {moved:.3g}"
    )
    assert worst <= 1e-6, f"{name}: federated over Flower and in-process fit differ by up to {worst:.3g}"
    assert flower["step"] == ref.best_step
    for m in [*METRICS[task.kind], "n"]:
        assert flower["val"][m] == pytest.approx(ref.val[m], abs=1e-9, nan_ok=True), m
    assert flower["target"] == {"center": ref.target.center, "scale": pytest.approx(ref.target.scale, rel=1e-12)}
    _check_evaluation_replies(dumps, task.kind, len(demo.site_yamls))
    return {"flower": flower, "ref": ref, "moved": moved, "dumps": dumps}, run_dir


def _check_evaluation_replies(dumps: Path, kind: str, n_sites: int) -> None:
    """What each site sent in its evaluate rounds: no arrays, metrics (eval-*, scan count, transfer)."""
    replies = sorted(dumps.glob("evaluate-*/round-*/*.json"))
    assert {p.parents[1].name for p in replies} == {"evaluate-val", "evaluate-test"}
    for path in replies:
        sent = json.loads(path.read_text())
        assert sent["records"] == {ARRAYS: [], METRICS_RECORD: sorted(sent["metrics"]), SITE: ["name"]}, path
        assert not np.load(path.with_suffix(".npz")).files[1:], path  # only num_examples: no weight set
        expected = {eval_metric_key(m) for m in METRICS[kind]} if sent["metrics"][Metric.NUM_EXAMPLES] else set()
        assert set(sent["metrics"]) == expected | EVAL_BOOKKEEPING, path
    assert len({p.name for p in replies}) == n_sites


def test_federated_probing_of_a_regression_over_flower_equals_in_process_fit(federation: dict) -> None:
    task = TaskSpec(name="age", column="age", kind="regression")
    recipe = DownstreamConfig(
        method="probe", steps=3, batch_size=4, probe_lr=1e-2, eval_every=3, eval_windows=2, seed=2
    )
    out, run_dir = _run(federation, "probe", task, recipe, local_steps=3)
    assert out["moved"] == 0.0  # the probe leaves the backbone frozen
    assert out["flower"]["target"]["scale"] != 1.0  # standardised with the pooled label statistics
    stats = sorted((out["dumps"] / "label-stats").glob("round-*/*.json"))
    for path in stats:
        sent = json.loads(path.read_text())
        assert set(sent["metrics"]) == {Metric.LABEL_SUM, Metric.LABEL_M2} | EVAL_BOOKKEEPING, path
    assert len(stats) == 2
    assert torch.is_tensor(out["flower"]["model"]["head.0.running_mean"])  # BatchNorm statistics travel too


# The real ClientApp, except that its fine-tuning replies scale the head's weights (the last `head-size`
# values of the model vector: the head's LayerNorm and Linear come last in the state) by 2.
HOSTILE_HEAD = """
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp
from client.client_app import handle

app = ClientApp()

@app.train()
def train(msg, context):
    reply = handle(msg, context)
    n = int(context.node_config.get("head-size", 0))
    if n and not reply.has_error():
        vec = reply.content["arrays"]["model"].numpy().copy()
        vec[-n:] *= 2.0
        reply.content["arrays"] = ArrayRecord({"model": Array(vec)})
    return reply

@app.evaluate()
def evaluate(msg, context):
    return handle(msg, context)
"""


def test_federated_finetuning_over_flower_equals_in_process_fit_with_a_hostile_head_quarantined(
    federation: dict,
) -> None:
    """Drop-path on: its draws are seeded per (seed, round, site), the same at a Flower site and in `fit`.
    A third site joins and sends its fine-tuned model with the head x 2: inside the whole model's
    max-update-ratio, outside the head's own bound. It is rejected in round 1 and quarantined: the
    result is the two honest sites' `fit`, its validation and test metrics included."""
    demo = federation["demo"]
    task = TaskSpec(name="sex", column="sex", kind="classification", classes=("0", "1"))
    recipe = DownstreamConfig(
        method="finetune", steps=6, batch_size=4, lr=1e-3, drop_path=0.2, eval_every=3, eval_windows=2, seed=1
    )
    torch.manual_seed(0)
    n_head = sum(
        p.numel() for p in DownstreamModel(load_backbone(federation["checkpoint"]), task, recipe).head.parameters()
    )
    site_h = demo.site_yamls[0].with_name("site_h.yaml")  # site_a's data under its own name (data root relative)
    site_h.write_text(demo.site_yamls[0].read_text().replace("site: site_a", "site: site_h"))
    hostile = federation["fed"].add_supernode(
        {"site-config": str(site_h), "gradients": str(demo.gradients), "head-size": n_head}, "hostile"
    )
    try:
        out, run_dir = _run(
            federation, "finetune", task, recipe, local_steps=3, clientapp=("hostile_head", HOSTILE_HEAD)
        )
    finally:
        hostile.stop()
    assert out["moved"] > 1e-5  # fine-tuning trained the backbone
    with open(run_dir / "downstream_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6] and sum(int(r["selected"]) for r in rows) >= 1
    assert all(r["sites"] == "2" for r in rows)  # site_h was not asked to validate
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(test["sites"]) == {"site_a", "site_b"} and test["weighted"]["n"] == sum(
        s["n"] for s in test["sites"].values()
    )
    assert json.dumps(out["flower"]["test"]) == json.dumps(test) and out["flower"]["kind"] == "downstream"
    # site_h: rejected by the head's bound in round 1 (the whole model's bound held), then not asked
    with open(run_dir / "site_metrics.csv", newline="") as f:
        bad = [r for r in csv.DictReader(f) if r["status"] != "ok"]
    assert [(r["round"], r["site"], r["status"]) for r in bad] == [("1", "site_h", "rejected")], bad
    assert bad[0]["detail"].startswith("weight set 'head' moved"), bad
    (held,) = json.loads((run_dir / "quarantine.json").read_text())["sites"].values()
    assert held["round"] == 1 and held["reason"].startswith("weight set 'head' moved"), held
    # the audit log: the start, each round's and evaluation's verdicts, the quarantine, the checkpoint's hash
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and (run_dir / "audit.jsonl").stat().st_mode & 0o077 == 0
    rounds = [e for e in events if e["event"] == "round" and e["task"] == "finetune"]
    assert [sorted(s["site"] for s in e["sites"]) for e in rounds] == [
        ["site_a", "site_b", "site_h"],
        ["site_a", "site_b"],
    ]
    assert all(s["status"] == "ok" for e in rounds for s in e["sites"] if s["site"] != "site_h")
    evals = [e for e in events if e["event"] == "round" and e["task"].startswith("evaluate")]
    assert len(evals) == 3 and all(sorted(s["site"] for s in e["sites"]) == ["site_a", "site_b"] for e in evals)
    assert sum(e["event"] == "quarantine" for e in events) == 1
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert ckpts and ckpts[-1]["sha256"] == hashlib.sha256((run_dir / "downstream.pt").read_bytes()).hexdigest()
