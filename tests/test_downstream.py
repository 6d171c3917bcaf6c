"""The downstream harness: labels and grouped splits, the heads, LR decay and drop-path that take effect,
protocol errors, and a whole protocol through `brainjepa evaluate` on generated sites."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.downstream.data import encode_labels, load_labelled_site
from brainjepa.downstream.fit import fit
from brainjepa.downstream.model import Backbone, DownstreamModel, load_backbone, param_groups
from brainjepa.downstream.protocol import load_protocol
from brainjepa.errors import ConfigError, DataError
from brainjepa.pretrain import pretrain
from sites.cohort import load_site_series
from sites.config import load_site_config
from sites.synth import generate_cohorts

SEX = TaskSpec("sex", "sex", "classification", ("0", "1"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """Three generated sites (20 ROIs) and a tiny checkpoint pretrained 3 steps on the first."""
    root = tmp_path_factory.mktemp("downstream")
    yamls = generate_cohorts(
        root / "sites", n_sites=3, subjects_per_site=15, n_rois=20, duration_s=200, split=(0.6, 0.2, 0.2)
    )
    cfg = PretrainConfig(
        model=ModelConfig(size="tiny", n_rois=20, n_frames=32, gradient_components=8),
        data=DataConfig(site=str(yamls[0])),
        train=TrainConfig(steps=3, batch_size=4, out_dir=str(root / "pre"), checkpoint_every=3),
    )
    pretrain(cfg, progress=False)
    return root, yamls, root / "pre" / "checkpoint.pt"


def test_labels_keep_the_task_classes_in_their_order() -> None:
    y = encode_labels(np.array([0.0, 1.0, 2.0, np.nan, 1.0]), TaskSpec("s", "s", "classification", ("1", "0")))
    assert y.tolist() == [1, 0, -1, -1, 0]  # class filter: 2 and missing are left out; "1" is class 0
    assert np.isnan(encode_labels(np.array([3.5, np.nan]), TaskSpec("a", "a", "regression"))[1])
    with pytest.raises(ConfigError, match="needs 'classes'"):
        TaskSpec("s", "s", "classification")


def test_grouped_splits_never_put_one_subject_in_two_splits(tmp_path: Path, world) -> None:
    _, yamls, _ = world
    site_dir = yamls[0].parent
    rows = (site_dir / "participants.tsv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    # three scans ("runs") per subject: the subject column groups them
    lines = [header + "\tsubject"] + [f"{r}\tS{i // 3:02d}" for i, r in enumerate(body)]
    (site_dir / "participants_runs.tsv").write_text("\n".join(lines) + "\n")
    cfg = yaml.safe_load(yamls[0].read_text())
    cfg["participants"]["file"] = "participants_runs.tsv"
    cfg["participants"]["subject_column"] = "subject"
    cfg["split"] = {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1}
    grouped = site_dir / "grouped.yaml"
    grouped.write_text(yaml.safe_dump(cfg))
    ss = load_site_series(load_site_config(grouped))
    subject = {r.split("\t")[0]: r.split("\t")[-1] for r in lines[1:]}
    split_of: dict[str, set] = {}
    for sid, split in zip(ss.subject_ids, ss.splits, strict=True):
        split_of.setdefault(subject[sid], set()).add(str(split))
    assert all(len(s) == 1 for s in split_of.values()), split_of
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test"}
    # a given split column that puts one subject's runs in two splits is refused, naming the subject
    col = [f"{r}\t{'train' if i % 3 else 'test'}" for i, r in enumerate(lines[1:])]
    (site_dir / "participants_runs.tsv").write_text("\n".join([lines[0] + "\tfold", *col]) + "\n")
    cfg["split"] = {"column": "fold"}
    grouped.write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match="subject 'S00' is in both"):
        load_site_series(load_site_config(grouped))


def test_heads_lr_decay_and_drop_path_take_effect(world) -> None:
    _, _, ckpt = world
    bb = load_backbone(ckpt)
    ft = DownstreamModel(bb, SEX, DownstreamConfig(method="finetune", layer_decay=0.5, drop_path=0.3))
    scales = {(g["lr_scale"]) for g in param_groups(ft)}
    depth = bb.model.depth
    assert scales == {0.5 ** (depth + 1 - layer) for layer in range(depth + 2)}
    assert ft.backbone.blocks[-1].drop_path == pytest.approx(0.3) and ft.backbone.blocks[0].drop_path == 0.0
    x = torch.randn(4, 20, 32)
    ft.train()
    torch.manual_seed(0)
    a = ft(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, ft(x))  # drop-path draws differ in training
    ft.eval()
    assert torch.equal(ft(x), ft(x))  # and vanish at evaluation
    probe = DownstreamModel(bb, SEX, DownstreamConfig(method="probe"))
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine
    torch.testing.assert_close(
        probe.backbone.state_dict()["blocks.0.attn.qkv.weight"], bb.weights["blocks.0.attn.qkv.weight"]
    )  # the target encoder's weights


def test_probe_leaves_the_backbone_alone_and_all_modes_run(world) -> None:
    _, yamls, ckpt = world
    bb = load_backbone(ckpt)
    sites = [load_labelled_site(load_site_config(y), SEX, 2.205, 32) for y in yamls[:2]]
    recipe = DownstreamConfig(method="probe", steps=6, batch_size=4, eval_every=3, eval_windows=2)
    res = fit(bb, SEX, recipe, sites, "federated", local_steps=3)
    for k, v in bb.weights.items():
        torch.testing.assert_close(res.model.backbone.state_dict()[k], v)
    assert res.best_step in (3, 6) and 0.0 <= res.val["balanced_acc"] <= 1.0
    for mode, group in (("centralized", sites), ("local", sites[:1])):
        r = fit(bb, SEX, DownstreamConfig(method="finetune", steps=4, batch_size=4, eval_every=2), group, mode)
        assert [h[0] for h in r.history] == [2, 4]


def _protocol(root: Path, yamls: list[Path], ckpt: Path, **edit) -> Path:
    p = {
        "name": "tiny",
        "pretrain": {},
        "seeds": [0],
        "sites": [{"name": y.parent.name, "config": str(y)} for y in yamls],
        "tasks": [{"name": "sex", "column": "sex", "kind": "classification", "classes": ["0", "1"]}],
        "methods": ["finetune", "probe", "random_probe", "fc"],
        "recipe": {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_windows": 2},
        "local_steps": 2,
        "experiments": [
            {"name": "held out", "checkpoint": str(ckpt), "finetune": ["site_a", "site_b"], "test": ["site_c"]}
        ],
    }
    p.update(edit)
    path = root / "protocol.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            {"experiments": [{"name": "x", "checkpoint": "c.pt", "finetune": ["site_z"], "test": ["site_c"]}]},
            "site 'site_z' of experiment 'x' is not declared",
        ),
        ({"tasks": [{"name": "iq", "column": "iq", "kind": "regression"}]}, "uses column 'iq'"),
        ({"methods": ["finetune", "transformer_xl"]}, "'methods[1]'"),
    ],
)
def test_a_protocol_with_an_unknown_site_column_or_method_is_refused(tmp_path: Path, world, edit, needle) -> None:
    _, yamls, ckpt = world
    path = _protocol(tmp_path, yamls, ckpt, **edit)
    with pytest.raises(ConfigError) as e:
        load_protocol(path)
    assert needle in str(e.value) and str(path) in str(e.value)


@pytest.mark.slow  # `brainjepa evaluate` end to end: every method of a protocol
def test_evaluate_runs_a_protocol_and_writes_the_tables(tmp_path: Path, world) -> None:
    _, yamls, ckpt = world
    path = _protocol(tmp_path, yamls, ckpt)
    res = CliRunner().invoke(app, ["evaluate", "--protocol", str(path), "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "| finetune · federated |" in res.output and "| fc · centralized |" in res.output
    for name in ("results.csv", "summary.csv", "report.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    # finetune: federated, centralized, local (one model per fine-tuning site); probe, random probe, fc:
    # centralized; each with a site_c row and an "all" row
    assert len(rows) - 1 == 2 * (1 + 1 + 2 + 1 + 1 + 1)
    assert list((tmp_path / "out").glob("*.png"))


def test_a_test_only_site_is_scored_on_all_its_subjects_and_cannot_train(tmp_path: Path, world) -> None:
    """An external cohort (`split: {train: 0, val: 0, test: 1}`) is tested on every subject, its scaling
    fitted on its own scans; used as a fine-tuning site it is refused, naming its YAML."""
    _, yamls, ckpt = world
    cfg = yaml.safe_load(yamls[2].read_text())
    cfg["split"] = {"train": 0.0, "val": 0.0, "test": 1.0, "seed": 0}
    external = yamls[2].parent / "test_only.yaml"
    external.write_text(yaml.safe_dump(cfg))
    n_subjects = len(load_site_series(load_site_config(external)).series)
    site = load_labelled_site(load_site_config(external), SEX, 2.205, 32, "centered", training=False)
    assert (len(site.train), len(site.val), len(site.test)) == (0, 0, n_subjects)
    assert site.scaling is not None  # fitted on the site's own (label-free) scans
    sites = [{"name": y.parent.name, "config": str(y)} for y in yamls[:2]] + [
        {"name": "site_c", "config": str(external)}
    ]
    path = _protocol(tmp_path, yamls, ckpt, sites=sites, methods=["probe", "fc"])
    res = CliRunner().invoke(app, ["evaluate", "--protocol", str(path), "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    rows = [r.split(",") for r in (tmp_path / "out" / "results.csv").read_text().splitlines()]
    n_col, site_col = rows[0].index("n"), rows[0].index("site")
    assert {float(r[n_col]) for r in rows[1:] if r[site_col] == "all"} == {float(n_subjects)}
    with pytest.raises(DataError, match="no scan in the training split") as e:
        load_labelled_site(load_site_config(external), SEX, 2.205, 32, "centered")
    assert str(external) in str(e.value)


def test_roi_std_pooling_keeps_a_per_roi_amplitude_that_the_mean_loses() -> None:
    """Two classes differ only in one ROI's amplitude (plus random per-scan offsets): a linear read-out
    of a random backbone's roi_std features separates them, its mean-pooled features (the reference)
    stay at chance (under the reference's patch-embedding init, where the positions dominate every token).
    Missing ROIs give zero features; both heads map to (B, classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = ModelConfig(
        size="tiny", n_rois=20, n_frames=128, gradient_components=8, patch_init="reference"
    )  # 8 time patches
    bb = Backbone(cfg, np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), {}, "random")
    g = torch.Generator().manual_seed(0)
    n = 96
    y = torch.arange(n) % 2
    x = torch.randn(n, 20, 128, generator=g) * 0.2 + torch.randn(n, 20, 1, generator=g)  # (N, R, T)
    x[:, 5] *= 1.0 + 1.5 * y[:, None]  # class 1: ROI 5 fluctuates 2.5x as much
    acc = {}
    for pool in ("mean", "roi_std"):
        torch.manual_seed(0)
        model = DownstreamModel(bb, SEX, DownstreamConfig(method="random_probe", pool=pool))
        f = model.features(x).flatten(1).numpy()  # (N, F)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        acc[pool] = clf.fit(f[: n // 2], y[: n // 2].numpy()).score(f[n // 2 :], y[n // 2 :].numpy())
        assert model(x[:4]).shape == (4, 2)
    assert acc["roi_std"] >= 0.85 and acc["roi_std"] - acc["mean"] >= 0.2, acc
    torch.manual_seed(0)
    ft = DownstreamModel(bb, SEX, DownstreamConfig(method="scratch", pool="roi_std"))
    xm = x[:2].clone()
    xm[0, 3] = float("nan")  # a missing ROI
    f = ft.features(xm)  # (2, R, 2D)
    assert f.shape == (2, 20, 2 * cfg.embed_dim) and torch.all(f[0, 3] == 0) and torch.any(f[1, 3] != 0)
    assert ft(xm).shape == (2, 2) and torch.isfinite(ft(xm)).all()


def test_solved_probe_is_a_converged_regression_with_its_strength_chosen_by_cross_validation(world) -> None:
    """`probe_solver: lbfgs` (default): the head holds scikit-learn's logistic / ridge solution on the
    standardised frozen features of every training window, the strength the best of its cross-validated
    scores (`select: cv`) or of its validation scores (`select: validation`); the backbone is untouched;
    `sgd` still trains it step by step."""
    from sklearn.linear_model import LogisticRegression, Ridge

    from brainjepa.downstream.data import eval_windows
    from brainjepa.downstream.fit import PROBE_STRENGTHS, pooled, window_features

    _, yamls, ckpt = world
    bb = load_backbone(ckpt)
    age = TaskSpec("age", "age", "regression")
    for task in (SEX, age):
        sites = [load_labelled_site(load_site_config(y), task, 2.205, 32) for y in yamls[:2]]
        res = fit(bb, task, DownstreamConfig(method="probe", eval_windows=2), sites, "centralized")
        for k, v in bb.weights.items():
            torch.testing.assert_close(res.model.backbone.state_dict()[k], v)
        vals = [h[2] for h in res.history]
        assert [h[0] for h in res.history] == list(range(len(PROBE_STRENGTHS)))
        assert res.best_step == (int(np.argmax(vals)) if task is SEX else int(np.argmin(vals)))
        train = pooled(sites, "train")
        x = window_features(res.model, train, 32, 2)  # (N * 2, F)
        z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        y = np.repeat(train.y, 2)
        c = PROBE_STRENGTHS[res.best_step]
        windows = eval_windows(train, 32, 2).flatten(0, 1)  # (N * 2, R, T), the same windows
        with torch.no_grad():
            out = res.model.eval()(windows).double().numpy()
        if task is SEX:
            want = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(z, y).predict_proba(z)
            np.testing.assert_allclose(torch.from_numpy(out).softmax(-1).numpy(), want, atol=1e-4)
        else:
            scale = (train.y.mean(), train.y.std())
            want = Ridge(alpha=1.0 / c).fit(z, (y - scale[0]) / scale[1]).predict(z)
            np.testing.assert_allclose(out[:, 0], want, atol=1e-4)
    sex_sites = [load_labelled_site(load_site_config(y), SEX, 2.205, 32) for y in yamls[:2]]
    on_val = fit(
        bb, SEX, DownstreamConfig(method="probe", eval_windows=2, select="validation"), sex_sites, "centralized"
    )
    vals = [h[2] for h in on_val.history]
    assert on_val.best_step == int(np.argmax(vals)) and on_val.val["balanced_acc"] == max(vals)
    assert all(h[1] == h[1] for h in on_val.history)  # the validation rule records each candidate's training loss
    sgd = fit(
        bb,
        SEX,
        DownstreamConfig(method="probe", probe_solver="sgd", steps=4, batch_size=4, eval_every=2),
        [load_labelled_site(load_site_config(yamls[0]), SEX, 2.205, 32)],
        "local",
    )
    assert [h[0] for h in sgd.history] == [2, 4]


def test_fine_tuning_weights_classes_as_scikit_learn_balanced_and_per_sample() -> None:
    """`class_weight: balanced` (default): the cross-entropy weights are scikit-learn's "balanced" over the
    training labels the optimizer sees, the batch loss is the mean of the samples' weighted losses (so a
    one-sample loss under DP-SGD's per-sample gradients carries its weight), and `none` is the plain
    cross-entropy of the reference."""
    from sklearn.utils.class_weight import compute_class_weight

    from brainjepa.downstream.train import DownstreamStep, TargetScale, class_weights

    labels = np.array([0] * 9 + [1] * 3)
    w = class_weights(SEX, DownstreamConfig(), labels)
    assert torch.allclose(
        w, torch.tensor(compute_class_weight("balanced", classes=np.arange(2), y=labels), dtype=torch.float32)
    )
    assert class_weights(SEX, DownstreamConfig(class_weight="none"), labels) is None
    assert torch.allclose(class_weights(SEX, DownstreamConfig(), np.zeros(4, np.int64)), torch.tensor([0.5, 1.0]))
    with pytest.raises(ConfigError, match="class_weight"):
        DownstreamConfig(class_weight="inverse")
    cfg = ModelConfig(size="tiny", n_rois=20, n_frames=32, gradient_components=8)
    bb = Backbone(cfg, np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), {}, "random")
    out = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))  # (B, C) logits
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    losses = {}
    for rule in ("balanced", "none"):
        model = DownstreamModel(bb, SEX, DownstreamConfig(method="scratch", class_weight=rule))
        step = DownstreamStep(model, SEX, 10, TargetScale(), "cpu", labels=labels)
        losses[rule] = step.loss(out, y)
        per_sample = torch.stack([step.loss(out[i : i + 1], y[i : i + 1]) for i in range(6)])
        assert torch.allclose(losses[rule], per_sample.mean())
    plain = torch.nn.functional.cross_entropy(out, y, reduction="none")
    assert torch.allclose(losses["none"], plain.mean())
    assert torch.allclose(losses["balanced"], (plain * w[y]).mean()) and not torch.allclose(
        losses["balanced"], plain.mean()
    )


def test_solved_probe_on_both_readouts_weighs_the_blocks_as_its_head_does(world) -> None:
    """`pool: roi_std_fc`: the solved head is scikit-learn's logistic regression on the standardised features
    times the head's fixed block weights, and the model's own forward pass gives its probabilities."""
    from sklearn.linear_model import LogisticRegression

    from brainjepa.downstream.data import eval_windows
    from brainjepa.downstream.fit import PROBE_STRENGTHS, pooled, window_features

    _, yamls, ckpt = world
    pre = load_backbone(ckpt)
    model_cfg = dataclasses.replace(pre.model, n_frames=48)  # 3 time patches: enough to correlate
    bb = Backbone(model_cfg, pre.gradients, {}, "random")
    sites = [load_labelled_site(load_site_config(y), SEX, 2.205, 48) for y in yamls[:2]]
    recipe = DownstreamConfig(method="random_probe", pool="roi_std_fc", eval_windows=2)
    res = fit(bb, SEX, recipe, sites, "centralized")
    train = pooled(sites, "train")
    x = window_features(res.model, train, 48, 2)  # (N * 2, F)
    w = res.model.head[1].weight.double().numpy()  # (F,)
    z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * w
    c = PROBE_STRENGTHS[res.best_step]
    want = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(z, np.repeat(train.y, 2))
    with torch.no_grad():
        out = res.model.eval()(eval_windows(train, 48, 2).flatten(0, 1)).softmax(-1).double().numpy()
    np.testing.assert_allclose(out, want.predict_proba(z), atol=1e-4)
