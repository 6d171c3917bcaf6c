"""Invariants of the spatiotemporal mask sampler over many seeded draws; the random-masking ablation."""

from __future__ import annotations

import hashlib

import pytest
import torch

from brainjepa.config import MaskConfig
from brainjepa.errors import ConfigError
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
    assert any(
        x.context.shape != z.context.shape or not torch.equal(x.context, z.context) for x, z in zip(a, c, strict=True)
    )


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


# -- the random-masking ablation and the default path's stability -----------------------------------

RANDOM = MaskConfig(mode="random")


def _fingerprint(cfg: MaskConfig, batch: int, R: int, W: int) -> str:
    """sha256 over three seeds x three draws: indices, region sizes and the generator state after."""
    h = hashlib.sha256()
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            m = sample_masks(cfg, batch, R, W, g)
            h.update(m.context.numpy().tobytes())
            h.update(m.target.numpy().tobytes())
            h.update(repr(m.region_sizes).encode())
        h.update(g.get_state().numpy().tobytes())
    return h.hexdigest()


def test_default_draws_are_unchanged_by_the_random_mode() -> None:
    """Recorded from the sampler before `mode` existed: the default draws the same masks and
    consumes the generator the same way, bit for bit."""
    assert MaskConfig().mode == "spatiotemporal"
    assert _fingerprint(CFG, 4, 50, 10) == "44c5866776752d7bc7914adeb3983271545677be538bac87fec93ff072068660"
    assert _fingerprint(CFG, 8, 450, 10) == "5752dd595b7d1119c34a51123f31dce8de7893bb065f0a6a6f2626343541df01"
    assert _fingerprint(MaskConfig(reference_truncation=True), 4, 50, 10) == (
        "61149d677d86d590c1e9da30082da74269e8979e9a0b415d7bf74a41d2cfd5cc"
    )


def test_mask_mode_is_checked() -> None:
    with pytest.raises(ConfigError, match="mask.mode"):
        MaskConfig(mode="blocks")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mask.reference_truncation"):
        MaskConfig(mode="random", reference_truncation=True)


@pytest.mark.parametrize("R,W", GRIDS)
def test_random_mode_same_counts_disjoint_and_same_fields(R: int, W: int) -> None:
    for seed in range(30):  # same seed: the sizes are drawn first, so the counts are the same
        st = sample_masks(CFG, 6, R, W, torch.Generator().manual_seed(seed))
        rd = sample_masks(RANDOM, 6, R, W, torch.Generator().manual_seed(seed))
        assert rd.context.shape == st.context.shape and rd.target.shape == st.target.shape
        assert rd.region_sizes == st.region_sizes and sum(rd.region_sizes) == rd.target.shape[1]
        assert rd.context.dtype == rd.target.dtype == torch.int64
        assert int(rd.context.min()) >= 0 and int(rd.target.max()) < R * W
        assert bool((rd.context.diff(dim=1) > 0).all()), "context sorted and distinct"
        assert bool((rd.target.diff(dim=1) > 0).all()), "targets sorted and distinct"
        both = torch.cat([rd.context, rd.target], dim=1).sort(dim=1).values
        assert bool((both.diff(dim=1) > 0).all()), "context and targets must be disjoint"


def test_random_mode_is_deterministic_per_generator() -> None:
    a = [sample_masks(RANDOM, 4, 100, 10, torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(a[0].context, a[1].context) and torch.equal(a[0].target, a[1].target)
    c = sample_masks(RANDOM, 4, 100, 10, torch.Generator().manual_seed(12))
    assert c.context.shape != a[0].context.shape or not torch.equal(c.context, a[0].context)


def _neighbour_rate(tokens: torch.Tensor, R: int, W: int) -> float:
    """Share of selected tokens (r, t < W-1) whose next time patch (r, t+1) is selected too."""
    grid = torch.zeros(tokens.shape[0], R * W, dtype=torch.bool).scatter_(1, tokens, True).view(-1, R, W)
    pairs = grid[:, :, :-1]
    return float((pairs & grid[:, :, 1:]).sum() / pairs.sum())


def test_random_mode_covers_the_grid_uniformly_without_blocks() -> None:
    R, W, draws, B = 50, 10, 300, 8
    g = torch.Generator().manual_seed(0)
    per_roi, per_col = torch.zeros(R), torch.zeros(W)
    rate_rd, rate_st, density = [], [], []
    for _ in range(draws):
        m = sample_masks(RANDOM, B, R, W, g)
        per_roi += torch.bincount((m.target // W).flatten(), minlength=R)
        per_col += torch.bincount((m.target % W).flatten(), minlength=W)
        rate_rd.append(_neighbour_rate(m.target, R, W))
        density.append(m.target.shape[1] / (R * W))
        rate_st.append(_neighbour_rate(sample_masks(CFG, B, R, W, g).target, R, W))
    # every ROI and every time patch is a target equally often (within sampling noise)
    assert float((per_roi / per_roi.mean() - 1).abs().max()) < 0.1
    assert float((per_col / per_col.mean() - 1).abs().max()) < 0.05
    # no block structure: a target's next time patch is a target at the overall density only,
    # while the spatiotemporal targets come in contiguous runs
    mean = sum(rate_rd) / draws
    assert abs(mean - sum(density) / draws) < 0.02
    assert sum(rate_st) / draws > mean + 0.3
