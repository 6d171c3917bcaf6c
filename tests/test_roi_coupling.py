"""Second-order pooling (`pool: roi_fc`): the connectivity of learned features, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainjepa.config import ModelConfig
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from brainjepa.downstream.model import Backbone, DownstreamModel, roi_coupling
from brainjepa.errors import DataError

SEX = TaskSpec("sex", "sex", "classification", ("0", "1"))


def test_roi_coupling_equals_the_dimension_mean_of_numpy_correlations() -> None:
    g = torch.Generator().manual_seed(0)
    B, R, W, D = 2, 5, 6, 3
    h = torch.randn(B, R * W, D, generator=g, dtype=torch.float64)  # ROI-major tokens
    observed = torch.ones(B, R, dtype=torch.bool)
    observed[1, 2] = False  # a missing ROI
    got = roi_coupling(h, observed).numpy()  # (B, R(R-1)/2)
    hh = h.reshape(B, R, W, D).numpy()
    iu = np.triu_indices(R, 1)
    for b in range(B):
        mean_r = np.mean([np.corrcoef(hh[b, :, :, d])[iu] for d in range(D)], axis=0)  # (R(R-1)/2,)
        want = np.arctanh(np.clip(mean_r, -0.999, 0.999))
        if b == 1:
            want[(iu[0] == 2) | (iu[1] == 2)] = 0.0
        np.testing.assert_allclose(got[b], want, atol=1e-10)


def test_roi_fc_models_probe_and_fine_tune_on_the_pair_features() -> None:
    cfg = ModelConfig(size="tiny", n_rois=6, n_frames=64, gradient_components=4)
    bb = Backbone(cfg, np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32), {}, "random")
    x = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(1))  # (B, R, T)
    x[0, 4] = float("nan")  # a missing ROI
    for method in ("random_probe", "scratch"):
        torch.manual_seed(0)
        model = DownstreamModel(bb, SEX, DownstreamConfig(method=method, pool="roi_fc"))
        f = model.features(x)
        assert f.shape == (3, 15) and torch.isfinite(f).all()
        assert torch.all(f[0, [3, 7, 10, 12, 14]] == 0) and torch.all(f[1] != 0)  # pairs with ROI 4
        out = model(x)
        assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_roi_fc_refuses_a_window_too_short_to_correlate() -> None:
    cfg = ModelConfig(size="tiny", n_rois=6, n_frames=32, gradient_components=4)  # 2 time patches
    bb = Backbone(cfg, np.zeros((6, 4), dtype=np.float32), {}, "random")
    with pytest.raises(DataError, match="roi_fc' needs 3 or more time patches.*n_frames 32, patch_size 16"):
        DownstreamModel(bb, SEX, DownstreamConfig(method="random_probe", pool="roi_fc"))


def test_roi_std_fc_puts_both_readouts_side_by_side_and_weighs_the_blocks_alike() -> None:
    cfg = ModelConfig(size="tiny", n_rois=6, n_frames=64, gradient_components=4)
    bb = Backbone(cfg, np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32), {}, "random")
    x = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(2))  # (B, R, T)
    x[0, 4] = float("nan")
    torch.manual_seed(0)
    both = DownstreamModel(bb, SEX, DownstreamConfig(method="random_probe", pool="roi_std_fc"))
    parts = {}
    for pool in ("roi_std", "roi_fc"):
        torch.manual_seed(0)  # the same random backbone
        parts[pool] = DownstreamModel(bb, SEX, DownstreamConfig(method="random_probe", pool=pool)).features(x)
    f = both.features(x)
    D = cfg.embed_dim
    assert f.shape == (5, 6 * 2 * D + 15)
    torch.testing.assert_close(f, torch.cat([parts["roi_std"].flatten(1), parts["roi_fc"]], dim=1))
    # after the head's normalisation (unit variance per feature) both blocks carry the same total variance
    w = both.head[1].weight
    n_std = 6 * 2 * D
    assert float((w[:n_std] ** 2).sum()) == pytest.approx(float((w[n_std:] ** 2).sum()))
    assert "1.weight" not in both.head.state_dict()  # a fixed weight: nothing new on the wire or in checkpoints
    assert both(x).shape == (5, 2) and torch.isfinite(both(x)).all()
