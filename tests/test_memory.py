"""The fake-tensor memory estimate (brainjepa/memory.py): exact against real tensors, and it ranks the settings."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from brainjepa.cli import app
from brainjepa.config import MaskConfig, ModelConfig, load_pretrain_config
from brainjepa.jepa import JEPAModels
from brainjepa.masks import sample_masks
from brainjepa.perf.memory import (
    GIB,
    LiveBytes,
    estimate_step_memory,
    fit_setting,
    heaviest_masks,
    parse_setting,
    perf_yaml,
)

SMALL = dict(size="tiny", batch=2, n_rois=32, n_frames=64, steps=1, warmup=1)
WIDER = SMALL | {"batch": 8}


def test_live_bytes_counts_storages_while_alive() -> None:
    live = LiveBytes()
    with live:
        a = torch.zeros(1000)  # 4,000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.ones(500, dtype=torch.bfloat16)  # 1,000 bytes
        assert live.now == 5000
        del a, b
        assert live.now == 1000
        d = torch.zeros(10)
    assert live.peak == 5000
    assert live.now == 1040
    del c, d


def test_fake_estimate_equals_the_real_count() -> None:
    """Same ops, same shapes: the fake run must count exactly the bytes a real run allocates."""
    fake = estimate_step_memory(**SMALL)
    real = estimate_step_memory(**SMALL, fake=False)
    assert fake.step_peaks_gib == real.step_peaks_gib
    assert fake.peak_gib > fake.weights_gib + fake.optimizer_gib
    cfg = ModelConfig(size="tiny", n_rois=32, n_frames=64)
    with torch.device("meta"):
        models = JEPAModels(cfg, torch.zeros(32, cfg.gradient_components))
    trainable = sum(p.numel() for p in models.parameters() if p.requires_grad)
    assert fake.optimizer_gib * GIB == 2 * 4 * trainable  # AdamW's two fp32 moments


@pytest.mark.slow  # four memory estimates (one traced step each)
def test_checkpointing_lowers_the_estimate() -> None:
    """At a batch where activations dominate the peak, each step of recomputation must lower it."""
    eager = estimate_step_memory(**WIDER)
    selective = estimate_step_memory(**WIDER, selective_checkpointing=True)
    half = estimate_step_memory(**WIDER, selective_checkpointing=True, recompute_fraction=0.5)
    full = estimate_step_memory(**WIDER, recompute_fraction=1.0)
    assert full.peak_gib < half.peak_gib < selective.peak_gib < eager.peak_gib
    assert eager.context_tokens == selective.context_tokens == full.context_tokens
    assert eager.tflop_per_sample == selective.tflop_per_sample < half.tflop_per_sample < full.tflop_per_sample
    assert [e.setting for e in (eager, selective, half, full)] == [
        "eager",
        "selective",
        "selective + recompute 50%",
        "full",
    ]


def test_setting_parser() -> None:
    assert parse_setting("selective+recompute:0.25") == (True, 0.25)
    assert parse_setting("full") == (False, 1.0)
    with pytest.raises(ValueError, match="recompute:F"):
        parse_setting("recompute:2")
    with pytest.raises(ValueError, match="expected eager"):
        parse_setting("fastest")


@pytest.mark.slow  # a search over settings, one traced step each
def test_fit_picks_the_first_setting_that_fits_and_prints_a_loadable_perf_section(tmp_path: Path) -> None:
    eager = estimate_step_memory(**WIDER)
    chosen, tried = fit_setting(eager.peak_gib * 0.99, headroom=0.0, **WIDER)
    assert tried[0].setting == "eager" and tried[0].peak_gib == eager.peak_gib
    assert chosen is tried[-1] and chosen.setting != "eager" and chosen.peak_gib <= eager.peak_gib * 0.99
    assert all(e.peak_gib > eager.peak_gib * 0.99 for e in tried[:-1])
    config = tmp_path / "site.yaml"
    config.write_text(perf_yaml(chosen) + "\n")
    perf = load_pretrain_config(config).perf
    assert (perf.selective_checkpointing, perf.recompute_fraction) == (
        chosen.selective_checkpointing,
        chosen.recompute_fraction,
    )


@pytest.mark.slow  # a search over settings, one traced step each
def test_fit_says_none_when_even_full_recomputation_does_not_fit() -> None:
    chosen, tried = fit_setting(1e-6, **SMALL)
    assert chosen is None
    assert [e.setting for e in tried] == [
        "eager",
        "selective",
        "selective + recompute 25%",
        "selective + recompute 50%",
        "selective + recompute 75%",
        "full",
    ]


def test_heaviest_masks_are_the_largest_draw_at_any_batch() -> None:
    cfg = MaskConfig()
    counts = [sample_masks(cfg, 1, 450, 10, torch.Generator().manual_seed(i)).context.shape[1] for i in range(50)]
    heavy = heaviest_masks(cfg, 16, 450, 10, draws=50)
    assert heavy.context.shape == (16, max(counts))  # sizes are drawn per batch, before any per-sample draw
    assert max(counts) > sorted(counts)[len(counts) // 2]
    with pytest.raises(ValueError, match="only for our masks"):
        heaviest_masks(MaskConfig(reference_truncation=True), 16, 450, 10, draws=5)


@pytest.mark.slow  # the `memory` command end to end (a traced step per call)
def test_memory_command_prints_estimates_and_rejects_bad_settings() -> None:
    args = ["memory", "--size", "tiny", "--batch", "2", "--rois", "32", "--frames", "64", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--setting", "selective", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["setting"] == "selective" and row["peak_gib"] > row["weights_gib"] > 0
    bad = CliRunner().invoke(app, [*args, "--setting", "fastest"])
    assert bad.exit_code == 2 and "--setting" in bad.output and "fastest" in bad.output
    bad = CliRunner().invoke(app, [*args, "--reference-masks", "--worst-of", "5"])
    assert bad.exit_code == 2 and "only for our masks" in bad.output
