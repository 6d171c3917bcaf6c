"""Every default is written once: the run config's in `server.config.FederationConfig` (those it shares
with the pretraining config taken from it), the model TR in `sites.temporal.DEFAULT_MODEL_TR`. The other
places that show them are checked against those here, and so are the traps around them: a choice list
written twice, a run-config key that a `pretrain-config` would silently override."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

import pytest
import typer
import yaml

from brainjepa.errors import ConfigError
from server.config import FederationConfig, from_run_config, to_run_config
from sites.temporal import DEFAULT_MODEL_TR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RUN_DEFAULTS = to_run_config(FederationConfig())


def test_pyproject_flower_app_section_matches_the_code() -> None:
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
    assert app["config"] == RUN_DEFAULTS


def _doc_value(text: str) -> object:
    text = text.strip()
    if text == '""':
        return ""
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        return text


def test_docs_settings_table_lists_every_key_with_its_default() -> None:
    """docs/federation.md: one row per group of keys, `| `k1`, `k2` | d1, d2 | meaning |`."""
    text = (ROOT / "docs" / "federation.md").read_text()
    documented: dict[str, object] = {}
    for line in text.splitlines():
        m = re.match(r"^\| (`[a-z0-9-]+`(?:, `[a-z0-9-]+`)*) \| ([^|]+) \|", line)
        if m:
            keys = re.findall(r"`([a-z0-9-]+)`", m.group(1))
            values = [v for v in m.group(2).split(",")]
            if len(keys) == len(values) and all(k in RUN_DEFAULTS for k in keys):
                for k, v in zip(keys, values, strict=True):
                    assert k not in documented, f"run-config key '{k}' documented twice"
                    documented[k] = _doc_value(v)
    assert set(documented) == set(RUN_DEFAULTS), f"missing: {set(RUN_DEFAULTS) - set(documented)}"
    for k, v in RUN_DEFAULTS.items():
        assert documented[k] == v, f"docs/federation.md says {k} = {documented[k]!r}, the code says {v!r}"


@pytest.mark.parametrize("command", ["start", "simulate"])
def test_server_cli_defaults_are_the_run_configs(command: str) -> None:
    from server.cli import app

    params = {p.name: p.default for p in typer.main.get_command(app).commands[command].params}
    same = {
        "rounds": "num-rounds",
        "local_steps": "local-steps",
        "min_sites": "min-sites",
        "fraction_sites": "fraction-sites",
        "strategy": "strategy",
        "wire_dtype": "wire-dtype",
        "model_size": "model-size",
        "out_dir": "out-dir",
    }
    checked = 0
    for option, key in same.items():
        if option in params:
            assert str(params[option]) == str(RUN_DEFAULTS[key]), f"{command} --{option}"
            checked += 1
    assert checked >= 3


def test_model_tr_is_written_once() -> None:
    """The reference's model TR (UKB 0.735 s x 3) appears in code only as DEFAULT_MODEL_TR."""
    assert DEFAULT_MODEL_TR == 2.205
    hits = [
        str(p.relative_to(ROOT))
        for pkg in ("sites", "brainjepa", "client", "server")
        for p in (ROOT / pkg).rglob("*.py")
        if re.search(r"(?<![\d.])2\.205(?!\d)", p.read_text())
    ]
    assert hits == ["sites/temporal.py"], hits


def test_model_sizes_are_one_list() -> None:
    from typing import get_args

    from brainjepa.config import ENCODER_SIZES, PREDICTOR_SIZES, ModelSize

    assert tuple(ENCODER_SIZES) == tuple(PREDICTOR_SIZES) == get_args(ModelSize)


def test_run_config_defaults_shared_with_the_pretraining_config_are_its_own() -> None:
    """model-size, lr, seed, server-lr and server-momentum are pretraining / server-optimiser settings too:
    one default each. The run's own (demo-sized) defaults are exactly n-rois, n-frames and batch-size."""
    from brainjepa.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
    from server.config import ServerOptConfig

    run = FederationConfig()
    assert (run.model_size, run.lr, run.seed) == (ModelConfig().size, OptimConfig().lr, TrainConfig().seed)
    assert (run.server_lr, run.server_momentum) == (ServerOptConfig().lr, ServerOptConfig().momentum)
    assert run.server_opt() == ServerOptConfig()
    pcfg = run.pretrain()
    base = PretrainConfig()
    assert pcfg.optim == base.optim and pcfg.mask == base.mask and pcfg.data == base.data
    own = {"n_rois": run.n_rois, "n_frames": run.n_frames}
    assert pcfg.model == dataclasses.replace(base.model, **own) and own != {"n_rois": 450, "n_frames": 160}
    assert pcfg.train.seed == base.train.seed and pcfg.train.batch_size == run.batch_size != base.train.batch_size


def test_a_sites_device_default_is_the_pretraining_one(tmp_path: Path) -> None:
    from brainjepa.config import SiteRuntime, TrainConfig, load_site
    from sites.synth import generate_cohorts

    assert SiteRuntime().device == TrainConfig().device
    (path,) = generate_cohorts(tmp_path, n_sites=1, subjects_per_site=4, n_rois=20, duration_s=60)
    data = yaml.safe_load(path.read_text())
    assert "batch_size" not in data  # generated site YAMLs carry only keys that are read
    data.pop("device")
    path.write_text(yaml.safe_dump(data))
    assert load_site(path)[1].device == TrainConfig().device


def _pretrain_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "pretrain.yaml"
    path.write_text("model: {n_rois: 40, n_frames: 64}\noptim: {lr: 5.0e-4}\n")
    return path


@pytest.mark.parametrize(
    "key, value, decides",
    [
        ("n-rois", 450, "model.n_rois"),
        ("n-frames", 160, "model.n_frames"),
        ("model-size", "small", "model.size"),
        ("lr", 0.01, "optim.lr"),
    ],
)
def test_a_run_config_key_that_pretrain_config_decides_is_an_error(
    tmp_path: Path, key: str, value: object, decides: str
) -> None:
    """Flower hands the server the whole run config (pyproject defaults + overrides): a key the pretraining
    YAML would override silently is refused, naming both keys and the file."""
    path = _pretrain_yaml(tmp_path)
    with pytest.raises(ConfigError) as e:
        from_run_config({**RUN_DEFAULTS, "pretrain-config": str(path), key: value})
    msg = str(e.value)
    assert f"'{key}'" in msg and "'pretrain-config'" in msg and str(path) in msg and decides in msg


def test_pretrain_config_with_the_other_keys_at_their_defaults_decides(tmp_path: Path) -> None:
    path = _pretrain_yaml(tmp_path)
    cfg = from_run_config({**RUN_DEFAULTS, "pretrain-config": str(path), "batch-size": 4, "seed": 7})
    pcfg = cfg.pretrain()
    assert (pcfg.model.n_rois, pcfg.model.n_frames, pcfg.optim.lr) == (40, 64, 5e-4)
    assert (pcfg.train.batch_size, pcfg.train.seed) == (4, 7)  # still the run config's


def test_server_cli_refuses_a_run_config_key_that_pretrain_config_decides(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    path = _pretrain_yaml(tmp_path)
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "--out-dir",
            str(tmp_path / "out"),
            "--prepare-only",
            "--run-config",
            f'pretrain-config="{path}"',
            "--run-config",
            "n-rois=450",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "'n-rois'" in res.output and "'pretrain-config'" in res.output
    assert not (tmp_path / "out" / "sites").exists()  # refused before anything was generated


def test_strategies_are_the_server_methods_and_the_robust_ones() -> None:
    from typing import get_args

    from server.config import ROBUST_METHODS, ServerMethod, Strategy

    assert get_args(Strategy) == get_args(ServerMethod) + ROBUST_METHODS


def _literals_and_classes() -> tuple[dict[tuple, list[str]], dict[str, list[str]]]:
    """Every `Literal[...]` of constants written in the packages' source, and every class name, with where."""
    literals: dict[tuple, list[str]] = {}
    classes: dict[str, list[str]] = {}
    for pkg in ("sites", "brainjepa", "client", "server"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                where = f"{p.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
                    elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
                    if all(isinstance(e, ast.Constant) for e in elts):
                        literals.setdefault(tuple(e.value for e in elts), []).append(where)
                elif isinstance(node, ast.ClassDef):
                    classes.setdefault(node.name, []).append(where)
    return literals, classes


def test_each_choice_list_is_written_once() -> None:
    """A `Literal[...]` is defined once and imported (or composed) elsewhere, never retyped."""
    literals, _ = _literals_and_classes()
    twice = {values: places for values, places in literals.items() if len(places) > 1}
    assert not twice, f"the same choices written more than once (define once, import): {twice}"
    assert literals, "the scan found no Literal at all"


def test_config_class_names_are_unique() -> None:
    _, classes = _literals_and_classes()
    twice = {name: places for name, places in classes.items() if name.endswith("Config") and len(places) > 1}
    assert not twice, f"two config classes share a name: {twice}"
    assert "DataConfig" in classes and "SiteFiles" in classes


def test_shipped_configs_all_load() -> None:
    """Every shipped site YAML and pretraining YAML loads through the strict loaders (runtime keys included)."""
    from brainjepa.config import load_pretrain_config, load_site

    sites = sorted((ROOT / "configs").glob("site_*.yaml"))
    assert len(sites) >= 3
    for path in sites:
        site, runtime = load_site(path)
        assert site.source == path and runtime.device
    pretrain = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p not in sites]
    assert pretrain
    for path in pretrain:
        assert load_pretrain_config(path).train.steps > 0
