"""brainjepa.perf: its commands are registered on the main app, and its modules import without running."""

from __future__ import annotations

import importlib

import pytest
from typer.testing import CliRunner

from brainjepa.cli import app

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # no option name cut by a narrow help panel


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("bench", ["--size", "--batch", "--mode", "--selective-checkpointing", "--profile", "--json"]),
        ("memory", ["--size", "--batch", "--setting", "--worst-of", "--fit", "--headroom", "--json"]),
        ("numerics", ["--device", "--precision", "--steps", "--batch", "--cuda-graphs", "--out"]),
    ],
)
def test_perf_command_help(command: str, options: list[str]) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output, f"{command} --help lacks {option}"


def test_perf_commands_listed() -> None:
    result = CliRunner().invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for command in ("pretrain", "demo", "bench", "memory", "numerics", "prepare", "gradients", "synth"):
        assert command in result.output


@pytest.mark.parametrize("module", ["bench", "memory", "numerics", "profiling", "cli"])
def test_perf_modules_import_without_running(module: str) -> None:
    m = importlib.import_module(f"brainjepa.perf.{module}")
    assert m.__doc__
