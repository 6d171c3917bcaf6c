"""Python 3.10 support of the CLIs: `--run-config` parsing without `tomllib`, and `--help` without torch."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import typer

from server.options import parse_pairs


def _toml_parser() -> types.ModuleType:
    """The TOML parser this Python has (tomllib on 3.11+, tomli on 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib


@pytest.fixture
def without_tomllib(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Python 3.10 as `parse_pairs` sees it: no `tomllib`; a `tomli` that records what it parsed."""
    real = _toml_parser()
    parsed: list[str] = []

    def loads(text: str) -> dict[str, object]:
        parsed.append(text)
        return real.loads(text)

    fake_tomli = types.ModuleType("tomli")
    fake_tomli.loads = loads  # type: ignore[attr-defined]
    fake_tomli.TOMLDecodeError = real.TOMLDecodeError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tomli", fake_tomli)
    return parsed


def test_run_config_pairs_parse_with_tomli_when_tomllib_is_missing(without_tomllib: list[str]) -> None:
    with pytest.raises(ModuleNotFoundError):
        import tomllib  # noqa: F401
    pairs = ["n-rois=450", 'strategy="fedadam"', "lr=1e-4", "save-updates=true"]
    assert parse_pairs(pairs) == {"n-rois": 450, "strategy": "fedadam", "lr": 1e-4, "save-updates": True}
    assert without_tomllib == pairs  # every pair went through the tomli fallback


@pytest.mark.parametrize("fallback", [False, True], ids=["tomllib", "tomli"])
def test_malformed_run_config_pair_is_a_clear_bad_parameter(fallback: bool, request: pytest.FixtureRequest) -> None:
    if fallback:
        request.getfixturevalue("without_tomllib")
    with pytest.raises(typer.BadParameter, match=r"--run-config 'strategy=fedadam': expected key=value"):
        parse_pairs(["n-rois=450", "strategy=fedadam"])  # an unquoted string is not a TOML value


def test_cli_modules_import_without_torch_or_flower() -> None:
    """`brainjepa-server --help` / `brainjepa-client --help` must not pay for importing torch (or flwr)."""
    code = (
        "import sys, server.cli, client.cli; "
        "heavy = sorted({'torch', 'flwr'} & set(sys.modules)); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
