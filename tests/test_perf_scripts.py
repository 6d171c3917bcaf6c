"""The one-off performance scripts (scripts/gpu_plan.py, scripts/reference_memory.py): their --help runs,
and the GPU plan's grid and table are what docs/performance.md describes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from brainjepa.perf.bench import REFERENCE_H200, BenchResult

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"cannot load {SCRIPTS / name}.py"
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("script", "options"),
    [
        ("gpu_plan", ["--out", "--budget", "--device", "--quick"]),
        ("reference_memory", ["--reference-repo", "--size", "--batch", "--steps"]),
    ],
)
def test_script_help(script: str, options: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout[:200]
    for option in options:
        assert option in result.stdout, f"{script}.py --help lacks {option}"


def test_gpu_plan_grid_and_table() -> None:
    gpu_plan = _load("gpu_plan")
    items = gpu_plan.plan("cpu")
    names = [item.name for item in items]
    assert len(names) == len(set(names)), "each run of the plan needs its own name (results.jsonl, profiles)"
    assert names[:4] == ["B16 eager", "B16 fast", "B64 eager", "B64 fast"], "ViT-B at 16 and 64 go first"
    assert {item.size for item in items} == {"small", "base", "large"}
    assert all(not item.perf.cuda_graphs for item in items), "CUDA graphs must stay off on a CPU"

    row = BenchResult(
        size="base",
        batch=16,
        device="cpu",
        mode="eager",
        masks="ours",
        samples_per_s=111.4,
        tflops_per_s=250.0,
        tflop_per_sample=2.45,
        peak_memory_gib=4.4,
        memory_kind="process peak RSS",
        encoder_params=1,
        predictor_params=1,
        context_tokens=1088.0,
        target_tokens=1083.0,
        step_ms=143.6,
        first_step_s=2.0,
    )
    lines = gpu_plan.table([(items[0], row)]).splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    anchor_speed, anchor_memory = REFERENCE_H200[("base", 16)]
    assert cells[0] == "B16 eager"
    assert cells[4] == f"{111.4 / anchor_speed:.2f}" and cells[8] == f"{4.4 / anchor_memory:.2f}"
    row_without_anchor = BenchResult(**{**row.as_dict(), "size": "tiny"})
    assert gpu_plan.table([(items[0], row_without_anchor)]).splitlines()[2].count("| - |") == 2
