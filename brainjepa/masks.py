"""Spatiotemporal masking on the R x W token grid (W = T / patch_size time patches).

One observation (context) block and three target regions (docs/model.md):
- Cross-ROI: a random ROI set over a contiguous time span inside the observation window; those ROIs
  leave the context at every time point.
- Cross-Time: observed ROIs at columns near the right and left time edges.
- Double-Cross: Cross-ROI ROIs at those edge columns.
The edge columns leave the context. Block SIZES are drawn once per batch and POSITIONS per sample,
all from one explicit `torch.Generator`, so every sample of a batch has the same number of context
and target tokens by construction (nothing is truncated).

How the context is built (our construction, documented deviation): the ROI set is a random subset of
the non-Cross-ROI ROIs of a per-batch size (the reference draws the observed ROIs from all ROIs, so
its count after removing the Cross-ROI set varies per sample); the time columns are a run of the
columns left after removing the edge columns, as long as the observation window minus the columns
it would lose. `reference_truncation=True` instead reproduces the reference algorithm (per-sample
sizes for the edge blocks, overlapping regions, time patch W-1 never observed) and its truncation of
every sample's context and target lists to the batch minimum.

`mode: random` (ablation: spatiotemporal vs random masking) keeps the per-batch token counts of the
spatiotemporal sampler (same sizes drawn first, same generator calls) and places the context and a
disjoint target set uniformly at random over the whole grid: only WHERE the tokens are changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brainjepa.config import MaskConfig


@dataclass(frozen=True)
class Masks:
    """Token indices (ROI-major: r * W + t) for one batch."""

    context: torch.Tensor  # (B, Nc) int64, sorted
    target: torch.Tensor  # (B, Nt) int64: [Cross-ROI | Cross-Time | Double-Cross]
    region_sizes: tuple[int, int, int]  # tokens per sample in each target region, in that order

    def pin_memory(self) -> Masks:
        return Masks(self.context.pin_memory(), self.target.pin_memory(), self.region_sizes)

    def rows(self, rows: slice) -> Masks:
        """The masks of some samples of the batch (a rank's rows: `brainjepa.distributed.RankGroup.rows`)."""
        return Masks(self.context[rows], self.target[rows], self.region_sizes)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Masks:
        return Masks(
            self.context.to(device, non_blocking=non_blocking),
            self.target.to(device, non_blocking=non_blocking),
            self.region_sizes,
        )


def _lerp(scale: tuple[float, float], u: float) -> float:
    return scale[0] + u * (scale[1] - scale[0])


def _rand_perm(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """An independent random permutation of range(n) per row: (B, n)."""
    return torch.rand(batch, n, generator=g).argsort(dim=1)


def _subset(pool: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k random distinct entries of each row of pool (B, P) -> (B, k)."""
    return torch.gather(pool, 1, _rand_perm(pool.shape[0], pool.shape[1], g)[:, :k])


def _grid_tokens(rois: torch.Tensor, cols: torch.Tensor, n_time: int) -> torch.Tensor:
    """All (roi, col) pairs per sample: rois (B, a), cols (B, b) -> token ids (B, a*b)."""
    return (rois[:, :, None] * n_time + cols[:, None, :]).flatten(1)


@dataclass(frozen=True)
class BatchMaskSizes:
    """The per-batch block sizes (counts of ROIs and time patches)."""

    n_alpha: int  # Cross-ROI ROIs
    w_alpha: int  # Cross-ROI time patches
    n_ctx_roi: int  # context ROIs
    w_ctx: int  # context time patches
    w_right: int
    w_left: int
    n_ct_right: int  # Cross-Time ROIs (from the context ROIs)
    n_ct_left: int
    n_dc_right: int  # Double-Cross ROIs (from the Cross-ROI ROIs)
    n_dc_left: int
    edge: int  # width of each edge zone

    @property
    def n_context(self) -> int:
        """Context tokens per sample."""
        return self.n_ctx_roi * self.w_ctx

    @property
    def region_counts(self) -> tuple[int, int, int]:
        """Target tokens per sample in (Cross-ROI, Cross-Time, Double-Cross)."""
        return (
            self.n_alpha * self.w_alpha,
            self.n_ct_right * self.w_right + self.n_ct_left * self.w_left,
            self.n_dc_right * self.w_right + self.n_dc_left * self.w_left,
        )


def sample_sizes(cfg: MaskConfig, n_rois: int, n_time: int, g: torch.Generator) -> BatchMaskSizes:
    R, W = n_rois, n_time
    u = torch.rand(9, generator=g).tolist()
    edge = max(1, min(round(W * cfg.edge_width), (W - 1) // 2))
    n_alpha = min(max(int(R * _lerp(cfg.alpha_roi_scale, u[0])), 1), R - 2)
    n_ctx_roi = min(max(int((R - n_alpha) * _lerp(cfg.obs_roi_scale, u[1])), 1), R - n_alpha)
    w_obs = min(max(int(W * _lerp(cfg.obs_time_scale, u[2])), 1), W)
    w_right = min(int(W * _lerp(cfg.edge_time_scale, u[3])), edge)
    w_left = min(int(W * _lerp(cfg.edge_time_scale, u[4])), edge)
    if w_right + w_left == 0:  # keep both edge regions present in every batch
        if u[5] < 0.5:
            w_right = 1
        else:
            w_left = 1
    n_free = W - w_right - w_left  # columns left after removing the edge columns
    w_ctx = min(max(n_free - (W - w_obs), 1), n_free)
    w_alpha = min(max(int(W * _lerp(cfg.alpha_time_scale, u[6])), 1), w_ctx)
    f_right, f_left = _lerp(cfg.edge_roi_scale, u[7]), _lerp(cfg.edge_roi_scale, u[8])

    def edge_count(pool: int, f: float, w: int) -> int:
        return 0 if w == 0 else min(max(int(pool * f), 1), pool)

    return BatchMaskSizes(
        n_alpha=n_alpha,
        w_alpha=w_alpha,
        n_ctx_roi=n_ctx_roi,
        w_ctx=w_ctx,
        w_right=w_right,
        w_left=w_left,
        n_ct_right=edge_count(n_ctx_roi, f_right, w_right),
        n_ct_left=edge_count(n_ctx_roi, f_left, w_left),
        n_dc_right=edge_count(n_alpha, f_right, w_right),
        n_dc_left=edge_count(n_alpha, f_left, w_left),
        edge=edge,
    )


def sample_masks(cfg: MaskConfig, batch: int, n_rois: int, n_time: int, g: torch.Generator) -> Masks:
    """Draw context and target token indices for a batch, all from `g` (CPU tensors)."""
    if cfg.mode == "random":
        return sample_random_masks(cfg, batch, n_rois, n_time, g)
    if cfg.reference_truncation:
        return sample_reference_masks(cfg, batch, n_rois, n_time, g)
    B, R, W = batch, n_rois, n_time
    s = sample_sizes(cfg, R, W, g)

    # -- ROIs: Cross-ROI set, context set (disjoint), edge-block subsets of each
    perm = _rand_perm(B, R, g)  # (B, R)
    alpha = perm[:, : s.n_alpha]  # (B, na)
    ctx_rois = perm[:, s.n_alpha : s.n_alpha + s.n_ctx_roi]  # (B, nc)
    ct_right, ct_left = _subset(ctx_rois, s.n_ct_right, g), _subset(ctx_rois, s.n_ct_left, g)
    dc_right, dc_left = _subset(alpha, s.n_dc_right, g), _subset(alpha, s.n_dc_left, g)

    # -- time: edge columns, then the context run and the Cross-ROI span among the remaining columns
    right = W - s.edge + _rand_perm(B, s.edge, g)[:, : s.w_right]  # (B, wr)
    left = _rand_perm(B, s.edge, g)[:, : s.w_left]  # (B, wl)
    removed = torch.zeros(B, W, dtype=torch.bool)
    removed.scatter_(1, torch.cat([right, left], dim=1), True)
    free = (removed.long() * W + torch.arange(W)).argsort(dim=1)  # remaining columns first, ascending
    n_free = W - s.w_right - s.w_left
    start = (torch.rand(B, generator=g) * (n_free - s.w_ctx + 1)).long()  # (B,)
    offset = (torch.rand(B, generator=g) * (s.w_ctx - s.w_alpha + 1)).long()  # (B,)
    ctx_cols = torch.gather(free, 1, start[:, None] + torch.arange(s.w_ctx))  # (B, wc)
    alpha_cols = torch.gather(free, 1, (start + offset)[:, None] + torch.arange(s.w_alpha))  # (B, wa)

    context = _grid_tokens(ctx_rois, ctx_cols, W).sort(dim=1).values  # (B, nc*wc)
    cross_roi = _grid_tokens(alpha, alpha_cols, W)
    cross_time = torch.cat([_grid_tokens(ct_right, right, W), _grid_tokens(ct_left, left, W)], dim=1)
    double_cross = torch.cat([_grid_tokens(dc_right, right, W), _grid_tokens(dc_left, left, W)], dim=1)
    target = torch.cat([cross_roi, cross_time, double_cross], dim=1)  # (B, Nt)
    return Masks(context, target, (cross_roi.shape[1], cross_time.shape[1], double_cross.shape[1]))


def sample_random_masks(cfg: MaskConfig, batch: int, n_rois: int, n_time: int, g: torch.Generator) -> Masks:
    """The random-masking ablation: the spatiotemporal sampler's per-batch counts (`sample_sizes`),
    then per sample a uniformly random context set and a disjoint uniformly random target set over
    all R * W tokens. `region_sizes` keeps the spatiotemporal split of the counts, so the fields and
    shapes match; the regions carry no structure here (the targets are sorted as one set)."""
    B, N = batch, n_rois * n_time
    s = sample_sizes(cfg, n_rois, n_time, g)
    n_ctx, regions = s.n_context, s.region_counts
    order = _rand_perm(B, N, g)  # (B, N): a uniform random order of all tokens per sample
    context = order[:, :n_ctx].sort(dim=1).values  # (B, Nc)
    target = order[:, n_ctx : n_ctx + sum(regions)].sort(dim=1).values  # (B, Nt)
    return Masks(context, target, regions)


def sample_reference_masks(cfg: MaskConfig, batch: int, n_rois: int, n_time: int, g: torch.Generator) -> Masks:
    """The reference collator's algorithm (per-sample loop, kept only for comparison), then its
    truncation of every sample's context and target lists to the batch minimum.

    `region_sizes` reports the untruncated mean share of each region is not recoverable after
    truncation, so it holds the kept counts of (Cross-ROI, right edge, left edge) of sample 0.
    """
    R, W = n_rois, n_time
    edge = max(1, min(round(W * cfg.edge_width), (W - 1) // 2))

    def frac(scale: tuple[float, float]) -> float:
        return _lerp(scale, torch.rand(1, generator=g).item())

    n_alpha, w_alpha = int(R * frac(cfg.alpha_roi_scale)), int(W * frac(cfg.alpha_time_scale))
    n_obs, w_obs = int(R * frac(cfg.obs_roi_scale)), int(W * frac(cfg.obs_time_scale))
    w_obs = min(w_obs, W - 1)
    contexts, targets, sizes0 = [], [], None
    for _ in range(batch):
        obs = torch.zeros(R, W, dtype=torch.bool)
        obs_rois = torch.randperm(R, generator=g)[:n_obs]
        t0 = int(torch.randint(0, W - w_obs, (1,), generator=g))  # exclusive high: W-1 never observed
        obs[obs_rois, t0 : t0 + w_obs] = True
        alpha_rois = torch.randperm(R, generator=g)[:n_alpha]
        in_obs = torch.zeros(R, dtype=torch.bool)
        in_obs[obs_rois] = True
        in_alpha = torch.zeros(R, dtype=torch.bool)
        in_alpha[alpha_rois] = True
        both = torch.nonzero(in_obs & in_alpha).flatten()  # observed and Cross-ROI
        rest = torch.nonzero(~(in_obs & in_alpha)).flatten()
        wa = min(w_alpha, w_obs - 1)
        ta = t0 + int(torch.randint(0, max(w_obs - wa, 1), (1,), generator=g))
        region = torch.zeros(R, W, dtype=torch.bool)
        region[alpha_rois, ta : ta + wa] = True
        parts = [torch.nonzero(region.flatten()).flatten()]
        obs[alpha_rois, :] = False
        for side in ("right", "left"):
            f = frac(cfg.edge_roi_scale)
            h_both, h_rest = int(len(both) * f), int(len(rest) * f)
            w = min(int(W * frac(cfg.edge_time_scale)), edge)
            cols = torch.randperm(edge, generator=g)[:w] + (W - edge if side == "right" else 0)
            rois = torch.cat(
                [
                    rest[torch.randperm(len(rest), generator=g)][:h_rest],
                    both[torch.randperm(len(both), generator=g)][:h_both],
                ]
            )
            region = torch.zeros(R, W, dtype=torch.bool)
            if w > 0:
                region[rois[:, None], cols[None, :]] = True
                obs[:, cols] = False
            parts.append(torch.nonzero(region.flatten()).flatten())
        if sizes0 is None:
            sizes0 = tuple(len(p) for p in parts)
        contexts.append(torch.nonzero(obs.flatten()).flatten())
        targets.append(torch.cat(parts))
    n_ctx, n_tgt = min(len(c) for c in contexts), min(len(t) for t in targets)
    context = torch.stack([c[:n_ctx] for c in contexts])
    target = torch.stack([t[:n_tgt] for t in targets])
    return Masks(context, target, sizes0)


# ---------------------------------------------------------------------------------------- missing ROIs
# A missing ROI of a scan (sites.missing, `preprocess.missing_rois: mask`) reaches training as a NaN row.
# Batch rule: the UNION of the batch's missing ROIs leaves the mask grid of every sample of the batch, so
# all samples keep equal context / target counts without padding (a ROI missing in one scan is also left
# out of that batch's other scans: a few ROIs of R per batch at the rates real data shows).


def split_missing(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, T) with NaN rows for missing ROIs -> (the same with those rows 0, observed (B, R) bool)."""
    observed = torch.isfinite(x).all(dim=-1)  # (B, R)
    return torch.where(observed[..., None], x, torch.zeros((), dtype=x.dtype)), observed


def sample_masks_observed(
    cfg: MaskConfig, batch: int, n_rois: int, n_time: int, g: torch.Generator, observed: torch.Tensor | None = None
) -> Masks:
    """`sample_masks` on the ROIs observed in every sample (`observed` (B, R) bool; None: all), its token
    ids mapped back to the full R x W grid: a missing ROI's patches are never context nor target tokens.
    With every ROI observed this is `sample_masks` itself (the same draws)."""
    if observed is None or bool(observed.all()):
        return sample_masks(cfg, batch, n_rois, n_time, g)
    keep = torch.nonzero(observed.all(dim=0)).flatten()  # (R',) ascending
    if keep.numel() < 3:
        raise ValueError(
            f"masks: only {keep.numel()} of {n_rois} ROIs are observed in every scan of the batch "
            "(need >= 3): too many missing ROIs"
        )
    m = sample_masks(cfg, batch, int(keep.numel()), n_time, g)

    def full_grid(tok: torch.Tensor) -> torch.Tensor:  # monotone: sorted stays sorted
        return keep[tok // n_time] * n_time + tok % n_time

    return Masks(full_grid(m.context), full_grid(m.target), m.region_sizes)


def mean_observed(h: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of observed ROIs: h (B, N, D) ROI-major tokens, observed (B, R) -> (B, D)."""
    if bool(observed.all()):
        return h.mean(dim=1)
    w = observed.repeat_interleave(h.shape[1] // observed.shape[1], dim=1).to(h.dtype)  # (B, N)
    return (h * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
