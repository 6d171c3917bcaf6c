"""Every default is written once: the run config's in `server.config.FederationConfig`, the model TR in
`sites.temporal.DEFAULT_MODEL_TR`. The other places that show them are checked against those here."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import typer

from server.config import FederationConfig, to_run_config
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
    same = {"rounds": "num-rounds", "local_steps": "local-steps", "min_sites": "min-sites",
            "fraction_sites": "fraction-sites", "strategy": "strategy", "wire_dtype": "wire-dtype",
            "model_size": "model-size", "out_dir": "out-dir"}  # fmt: skip
    checked = 0
    for option, key in same.items():
        if option in params:
            assert str(params[option]) == str(RUN_DEFAULTS[key]), f"{command} --{option}"
            checked += 1
    assert checked >= 3


def test_model_tr_is_written_once() -> None:
    """The reference's model TR (UKB 0.735 s x 3) appears in code only as DEFAULT_MODEL_TR."""
    assert DEFAULT_MODEL_TR == 2.205
    hits = [str(p.relative_to(ROOT)) for pkg in ("sites", "brainjepa", "client", "server")
            for p in (ROOT / pkg).rglob("*.py") if re.search(r"(?<![\d.])2\.205(?!\d)", p.read_text())]  # fmt: skip
    assert hits == ["sites/temporal.py"], hits


def test_model_sizes_are_one_list() -> None:
    from typing import get_args

    from brainjepa.config import ENCODER_SIZES, PREDICTOR_SIZES, ModelSize

    assert tuple(ENCODER_SIZES) == tuple(PREDICTOR_SIZES) == get_args(ModelSize)
