"""The fast path trains the same model as plain eager PyTorch; its pieces keep the maths exact.

(No timing is asserted: speed is measured by `brainjepa bench`, never tested.)
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig, load_pretrain_config
from brainjepa.errors import ConfigError
from brainjepa.fastpath import attention_backends, compile_blocks
from brainjepa.jepa import JEPAModels, PretrainStep, resolve_precision
from brainjepa.perf.bench import CPU_SDPA_FLOPS, synthetic_batches
from brainjepa.perf.numerics import compare_paths
from brainjepa.prefetch import Prefetcher
from brainjepa.vit import Block, gather_tokens

# torch.compile on a CPU generates C++: it needs a compiler (CI and the dev image have g++)
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


@pytest.mark.slow  # torch.compile, then 200 steps
@needs_compiler
def test_compiled_path_follows_eager_over_200_steps_on_cpu() -> None:
    """The numerics check of docs/performance.md: same seed and batches, fp32 on both paths, 200 optimizer steps."""
    r = compare_paths(PerfConfig(compile=True), size="tiny", batch=8, steps=200, n_rois=32, n_frames=64)
    assert r.fast == "compile"
    assert r.eager_loss[-1] < 0.8 * r.eager_loss[0], "the runs must actually train for the comparison to mean much"
    assert r.precision == "fp32" and r.tolerance == (1e-4, 1e-5)
    assert r.ok, r.summary()  # measured: largest 7e-7, mean 1.4e-7
    assert r.max_rel_param_diff < 1e-3, r.summary()  # measured ~4e-5
    assert r.max_rel_loss_diff > 0 or r.max_rel_param_diff > 0, "identical results: was anything compiled?"
    # token counts change every batch; dynamic shapes keep it to a train graph and a no-grad one
    assert 1 <= r.graphs <= 4, f"{r.graphs} graphs: the compiler re-specialised on batch shapes"


def test_target_selects_tokens_after_the_blocks_exactly() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", n_rois=20, n_frames=48, gradient_components=4)
    models = JEPAModels(cfg, torch.randn(20, 4))
    x = torch.randn(3, 20, 48)
    idx = torch.stack([torch.randperm(cfg.n_rois * cfg.n_time_patches)[:17] for _ in range(3)])  # (B, 17)
    with torch.no_grad():
        full = gather_tokens(models.target(x), idx)
        models.target.select_in_last_block = False
        after_blocks = models.target(x, select=idx)  # the final LayerNorm on the selected tokens only
        models.target.select_in_last_block = True
        in_last_block = models.target(x, select=idx)  # the last block's queries and MLP on them only
    assert torch.equal(full, after_blocks)
    assert in_last_block.shape == (3, 17, cfg.embed_dim)
    torch.testing.assert_close(in_last_block, full, rtol=1e-5, atol=1e-5)  # other matmul shapes: rounding only
    assert not torch.equal(in_last_block, gather_tokens(models.target(x), idx.flip(1)))  # the order is kept


def test_selecting_in_the_last_block_saves_its_flops() -> None:
    cfg = ModelConfig(size="small", n_rois=100, n_frames=160)
    with torch.device("meta"):
        target = JEPAModels(cfg, torch.zeros(100, cfg.gradient_components)).target
        x, idx = torch.zeros(2, 100, 160), torch.zeros(2, 250, dtype=torch.long)  # 250 of 1,000 tokens
    flops = {}
    for flag in (False, True):
        target.select_in_last_block = flag
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter, torch.no_grad():
            target(x, select=idx)
        flops[flag] = counter.get_total_flops()
    per_block = flops[False] / cfg.depth
    saved = (flops[False] - flops[True]) / per_block
    assert 0.6 < saved < 0.8  # 3/4 of the queries, projections and MLP rows; the keys and values stay


@pytest.mark.slow  # torch.compile of the blocks
@needs_compiler
@pytest.mark.parametrize("selective", [False, True], ids=["plain", "selective-checkpointing"])
def test_compiled_blocks_keep_parameters_and_gradients(selective: bool) -> None:
    torch.manual_seed(0)
    blk = Block(32, 4)
    ref = Block(32, 4)
    ref.load_state_dict(blk.state_dict())
    blk.selective_checkpointing = selective  # the policy runs inside the compiled graph
    assert compile_blocks(torch.nn.ModuleList([blk])) == 1
    for n in (5, 9):  # two token counts, one graph
        x = torch.randn(2, n, 32, requires_grad=True)
        torch.testing.assert_close(blk(x), ref(x), rtol=1e-5, atol=1e-5)
        blk(x).square().sum().backward()
        ref(x).square().sum().backward()
    for (name, p), q in zip(blk.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_precision_autocasts_on_cpu_too() -> None:
    """`train.precision: bf16` on a CPU rounds like the GPU path (how the bf16 tolerance was measured)."""
    cfg = ModelConfig(size="tiny", n_rois=20, n_frames=48, gradient_components=4)
    make = synthetic_batches(4, 20, 48, cfg.n_time_patches, MaskConfig(), seed=1)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        step_fn = PretrainStep(JEPAModels(cfg, torch.randn(20, 4)), OptimConfig(), 10, precision=precision)
        assert step_fn.precision == precision
        losses[precision] = step_fn(make(0), 0).item()
    assert losses["fp32"] != losses["bf16"], "bf16 autocast did not change the rounding"
    assert abs(losses["fp32"] - losses["bf16"]) < 0.05 * losses["fp32"]
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_attention_backend_order_is_cuda_only() -> None:
    assert attention_backends("auto", torch.device("cpu")) is None
    assert attention_backends("cudnn", torch.device("cpu")) is None


def test_prefetcher_yields_every_step_in_order_and_stops_cleanly() -> None:
    make = synthetic_batches(2, 10, 32, 2, MaskConfig(), seed=3)
    inline = list(Prefetcher(make, range(5, 12), depth=0))
    ahead = list(Prefetcher(make, range(5, 12), depth=3))
    assert [s for s, _ in ahead] == list(range(5, 12))
    for (_, a), (_, b) in zip(inline, ahead, strict=True):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1].context, b[0][1].context)
    before = threading.active_count()
    it = iter(Prefetcher(make, range(100), depth=4))
    next(it)
    it.close()  # a consumer that stops early (Ctrl-C, an error) leaves no thread behind
    assert threading.active_count() == before


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("perf:\n  attention: fastest\n", "perf.attention.*fastest"),
        ("perf:\n  cuda_graphs: true\n", "perf.cuda_graphs.*perf.compile"),
        ("perf:\n  recompute_fraction: 1.5\n", "perf.recompute_fraction.*1.5"),
        ("train:\n  precision: fp16\n", "train.precision.*fp16"),
    ],
)
def test_perf_section_is_validated_with_the_field_named(tmp_path: Path, text: str, error: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_pretrain_config(bad)


def test_perf_section_is_read(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("perf:\n  compile: true\n  prefetch: 0\n")
    assert load_pretrain_config(good).perf == PerfConfig(compile=True, prefetch=0)


@pytest.mark.slow  # torch.compile, then both paths side by side
@needs_compiler
def test_numerics_command_writes_plot_and_verdict(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["numerics", "--steps", "12", "--rois", "20", "--frames", "48", "--batch", "4", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "numerics.json").read_text())
    assert summary["ok"] and summary["steps"] == 12 and summary["fast"] == "compile"
    assert (tmp_path / "numerics.png").stat().st_size > 10_000
