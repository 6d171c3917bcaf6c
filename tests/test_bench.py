"""The benchmark command: its FLOP count includes attention and it prints the three figures.
(No timing is asserted: speed is measured, never tested.)"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from brainjepa.bench import count_step_flops
from brainjepa.cli import app


def test_flop_count_includes_attention_on_cpu() -> None:
    B, H, N, Dh = 2, 3, 50, 8
    q = torch.randn(B, H, N, Dh, requires_grad=True)
    flops = count_step_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    forward = 4 * B * H * N * N * Dh  # QK^T and AV, 2 FLOPs per multiply-add
    assert flops == forward + 2.5 * forward  # torch's formula: backward = 2.5 x forward


def test_bench_command_reports_throughput_flops_memory_and_params() -> None:
    result = CliRunner().invoke(
        app, ["bench", "--size", "tiny", "--batch", "2", "--rois", "20", "--frames", "32", "--steps", "1",
              "--warmup", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    for key in ("samples_per_s", "tflops_per_s", "peak_memory_gib", "encoder_params", "predictor_params"):
        assert row[key] > 0, key
