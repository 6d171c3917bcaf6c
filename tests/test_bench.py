"""The benchmark command: its FLOP count includes attention and it prints the three figures.
(No timing is asserted: speed is measured, never tested.)"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.masks import sample_masks
from brainjepa.perf.bench import BenchResult, count_step_flops, format_table, run_bench, synthetic_batches
from brainjepa.perf.profiling import PHASES


def test_flop_count_includes_attention_on_cpu() -> None:
    B, H, N, Dh = 2, 3, 50, 8
    q = torch.randn(B, H, N, Dh, requires_grad=True)
    flops = count_step_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    forward = 4 * B * H * N * N * Dh  # QK^T and AV, 2 FLOPs per multiply-add
    assert flops == forward + 2.5 * forward  # torch's formula: backward = 2.5 x forward


# One timed step of the tiny model on 20 ROIs x 32 frames: what the bench tests run.
TINY_BENCH = [
    "bench",
    "--size",
    "tiny",
    "--batch",
    "2",
    "--rois",
    "20",
    "--frames",
    "32",
    "--steps",
    "1",
    "--warmup",
    "1",
]


def test_bench_command_reports_throughput_flops_memory_and_params() -> None:
    # eager: what is checked here is the report; the compiled path's numerics are tests/test_fastpath.py's
    result = CliRunner().invoke(app, [*TINY_BENCH, "--mode", "eager", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    for key in ("samples_per_s", "tflops_per_s", "peak_memory_gib", "encoder_params", "predictor_params"):
        assert row[key] > 0, key


def test_bench_profile_writes_phase_table_and_trace(tmp_path) -> None:  # noqa: ANN001
    result = CliRunner().invoke(app, [*TINY_BENCH, "--mode", "eager", "--profile", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| tiny | 2 | ours | eager |" in result.output
    run = tmp_path / "tiny-b2-eager"
    text = (run / "profile.md").read_text()
    for phase in PHASES:  # every phase of the step shows up, with a time
        assert f"| {phase} |" in text, phase
    ms = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in text.splitlines() if "| jepa/" in line}
    assert ms["jepa/target"] > 0 and ms["jepa/backward"] > 0
    with gzip.open(run / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"], "empty Chrome trace"


@pytest.mark.integration  # 2 spawned processes (gloo)
def test_bench_on_two_processes_reports_samples_per_s_and_scaling() -> None:
    """`--processes 1 --processes 2`: the batch split over 2 gloo processes, the whole batch's samples/s and
    the scaling efficiency against the one-process row (not asserted: speed is measured, never tested)."""
    cmd = [*TINY_BENCH, "--mode", "eager", "--processes", "1", "--processes", "2", "--json"]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0, result.output
    rows = [BenchResult(**json.loads(line)) for line in result.output.splitlines() if line.startswith("{")]
    assert [r.processes for r in rows] == [1, 2] and rows[1].samples_per_s > 0
    # the whole batch's FLOPs, each rank counting its rows, summed: the one-process count, plus what does
    # not depend on the batch (the positional projection of the gradients) done once per rank (0.25 % here)
    assert rows[0].tflop_per_sample > 0
    assert rows[0].tflop_per_sample < rows[1].tflop_per_sample < 1.01 * rows[0].tflop_per_sample
    two = [line for line in format_table(rows).splitlines() if line.startswith("| tiny |")][1].split("|")
    assert two[5].strip() == "2" and two[8].strip() == f"{rows[1].samples_per_s / (2 * rows[0].samples_per_s):.0%}"


def test_reference_masks_cost_fewer_flops_than_ours() -> None:
    """Our masks keep every drawn token; the reference truncates to the batch minimum (docs/performance.md)."""
    ours = run_bench(size="tiny", batch=8, steps=1, warmup=1, n_rois=60, n_frames=160, perf=PerfConfig(prefetch=0))
    ref = run_bench(size="tiny", batch=8, steps=1, warmup=1, n_rois=60, n_frames=160, reference_masks=True)
    assert ref.masks == "reference" and ours.masks == "ours" and ours.mode == ref.mode == "eager"
    g = torch.Generator().manual_seed(0)
    counts = {
        name: sum(
            sample_masks(MaskConfig(reference_truncation=name == "ref"), 8, 450, 10, g).context.shape[1]
            for _ in range(40)
        )
        / 40
        for name in ("ours", "ref")
    }
    assert counts["ref"] < 0.9 * counts["ours"], counts  # measured ~810 vs ~1,100 context tokens


def test_flops_are_counted_on_the_timed_batches() -> None:
    """Our token counts change per batch: achieved TFLOP/s must divide the timed batches' own FLOPs."""
    kw = dict(size="tiny", batch=4, n_rois=40, n_frames=160)
    r = run_bench(**kw, steps=2, warmup=1, perf=PerfConfig(prefetch=0))
    cfg = ModelConfig(size="tiny", n_rois=40, n_frames=160)
    make = synthetic_batches(4, 40, 160, cfg.n_time_patches, MaskConfig(), seed=0)
    step = PretrainStep(JEPAModels(cfg, torch.randn(40, cfg.gradient_components)), OptimConfig(), total_steps=10)
    per_batch = [count_step_flops(lambda s=s: step(make(s), 0)) for s in (2, 3)]  # after 1 warm-up step
    assert len(set(per_batch)) == 2, "pick a seed whose two timed batches differ"
    assert r.tflop_per_sample * 4 * 1e12 == pytest.approx(sum(per_batch) / 2, rel=1e-9)
    assert r.context_tokens == sum(make(s)[0][1].context.shape[1] for s in (2, 3)) / 2
