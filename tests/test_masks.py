"""Invariants of the spatiotemporal mask sampler over many seeded draws."""

from __future__ import annotations

import pytest
import torch

from brainjepa.config import MaskConfig
from brainjepa.masks import sample_masks, sample_sizes

CFG = MaskConfig()
GRIDS = [(450, 10), (50, 10), (32, 4), (100, 20)]


def _decode(tokens: torch.Tensor, W: int) -> tuple[set[int], set[int]]:
    return {int(t) // W for t in tokens}, {int(t) % W for t in tokens}


@pytest.mark.parametrize("R,W", GRIDS)
def test_mask_invariants_over_many_draws(R: int, W: int) -> None:
    g = torch.Generator().manual_seed(R * 100 + W)
    for _ in range(60):
        B = int(torch.randint(1, 9, (1,), generator=g))
        m = sample_masks(CFG, B, R, W, g)
        assert m.context.shape[0] == m.target.shape[0] == B
        assert m.context.dtype == m.target.dtype == torch.int64
        assert sum(m.region_sizes) == m.target.shape[1]
        assert all(n > 0 for n in m.region_sizes), "all three target regions must be present"
        for idx in (m.context, m.target):
            assert int(idx.min()) >= 0 and int(idx.max()) < R * W
        n_alpha, n_ct, _ = m.region_sizes
        for b in range(B):
            ctx, tgt = set(m.context[b].tolist()), set(m.target[b].tolist())
            assert len(ctx) == m.context.shape[1], "context indices must be distinct"
            assert len(tgt) == m.target.shape[1], "target regions must not overlap"
            assert not ctx & tgt, "context and targets must be disjoint"
            alpha_rois, alpha_cols = _decode(m.target[b, :n_alpha], W)
            ctx_rois, ctx_cols = _decode(m.context[b], W)
            edge_rois_ct, edge_cols = _decode(m.target[b, n_alpha : n_alpha + n_ct], W)
            edge_rois_dc, _ = _decode(m.target[b, n_alpha + n_ct :], W)
            # Cross-ROI shares (int() floors, so allow one unit below the range)
            lo, hi = CFG.alpha_roi_scale
            assert lo - 1 / R <= len(alpha_rois) / R <= hi
            assert len(alpha_cols) <= int(W * CFG.alpha_time_scale[1])
            # the Cross-ROI span is contiguous once the removed edge columns are skipped
            assert set(range(min(alpha_cols), max(alpha_cols) + 1)) - alpha_cols <= edge_cols
            # Cross-ROI ROIs leave the context at every time point; edge columns leave the context
            assert not alpha_rois & ctx_rois
            assert not edge_cols & ctx_cols
            # context ROIs: share of the non-Cross-ROI ROIs within the observation range
            lo, hi = CFG.obs_roi_scale
            n_rest = R - len(alpha_rois)
            assert lo - 1 / n_rest <= len(ctx_rois) / n_rest <= hi
            # Cross-Time uses observed ROIs, Double-Cross uses Cross-ROI ROIs, both at edge columns
            assert edge_rois_ct <= ctx_rois
            assert edge_rois_dc <= alpha_rois
            edge = max(1, min(round(W * CFG.edge_width), (W - 1) // 2))
            assert all(c < edge or c >= W - edge for c in edge_cols)
            # per side: columns within the edge-time range, ROI shares within the edge-ROI range
            ct = m.target[b, n_alpha : n_alpha + n_ct]
            dc = m.target[b, n_alpha + n_ct :]
            for lo_col, hi_col in ((W - edge, W), (0, edge)):
                def side(c: int, lo_col: int = lo_col, hi_col: int = hi_col) -> bool:
                    return lo_col <= c < hi_col

                cols = {c for c in edge_cols if side(c)}
                assert len(cols) <= int(W * CFG.edge_time_scale[1])
                if not cols:
                    continue
                ct_rois = {int(t) // W for t in ct if side(int(t) % W)}
                dc_rois = {int(t) // W for t in dc if side(int(t) % W)}
                lo, hi = CFG.edge_roi_scale
                for rois, pool in ((ct_rois, len(ctx_rois)), (dc_rois, len(alpha_rois))):
                    assert len(rois) == 1 or lo - 1 / pool <= len(rois) / pool <= hi


def test_same_seed_same_masks_and_different_seed_differs() -> None:
    def draw(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        return [sample_masks(CFG, 4, 450, 10, g) for _ in range(5)]

    a, b, c = draw(7), draw(7), draw(8)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.context, y.context) and torch.equal(x.target, y.target)
    assert any(x.context.shape != z.context.shape or not torch.equal(x.context, z.context) for x, z in zip(a, c, strict=True))


def test_sizes_per_batch_positions_per_sample() -> None:
    g = torch.Generator().manual_seed(3)
    m = sample_masks(CFG, 8, 450, 10, g)
    assert len({tuple(row.tolist()) for row in m.context}) == 8, "positions must differ between samples"


def test_default_token_counts_match_the_reference_scale() -> None:
    """ViT-B defaults: the reference keeps ~820 context / ~860 target tokens after truncation; we keep
    every target, so our means are larger but of the same order."""
    g = torch.Generator().manual_seed(0)
    ours = [sample_masks(CFG, 16, 450, 10, g) for _ in range(40)]
    nc = sum(m.context.shape[1] for m in ours) / 40
    nt = sum(m.target.shape[1] for m in ours) / 40
    assert 700 < nc < 1500 and 700 < nt < 1500
    ref = [sample_masks(MaskConfig(reference_truncation=True), 16, 450, 10, g) for _ in range(20)]
    rc = sum(m.context.shape[1] for m in ref) / 20
    rt = sum(m.target.shape[1] for m in ref) / 20
    assert 600 < rc < 1000 and 600 < rt < 1000
    assert nt > rt, "without truncation more target tokens are trained on"


def test_reference_mode_never_observes_last_time_patch_and_is_seeded() -> None:
    cfg = MaskConfig(reference_truncation=True)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(10):
        a, b = sample_masks(cfg, 4, 60, 10, g1), sample_masks(cfg, 4, 60, 10, g2)
        assert torch.equal(a.context, b.context) and torch.equal(a.target, b.target)
        assert not bool(((a.context % 10) == 9).any())


def test_sizes_are_deterministic() -> None:
    s1 = sample_sizes(CFG, 450, 10, torch.Generator().manual_seed(1))
    s2 = sample_sizes(CFG, 450, 10, torch.Generator().manual_seed(1))
    assert s1 == s2
