"""Model-ready batches: subjects' ROI series in memory -> (B, R, T) windows, deterministic by step.

Every batch is a pure function of (seed, micro-batch index): the subject order is a per-epoch
permutation and the window starts and masks come from a generator seeded with the micro-batch index.
A resumed run therefore sees exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brainjepa.config import MaskConfig
from brainjepa.masks import Masks, sample_masks
from sites.errors import DataError


def load_roi_dir(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """Read every `*.npy` (R, L) file of a folder, sorted by name: (series, subject ids)."""
    path = Path(path)
    files = sorted(path.glob("*.npy"))
    if not files:
        raise DataError(f"data folder '{path}': no .npy ROI-series files found")
    return [np.load(f).astype(np.float32) for f in files], [f.stem for f in files]


def stack_series(series: Sequence[np.ndarray], n_frames: int, sources: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and pad subjects' (R, L_i) series into one (N, R, L_max) tensor plus lengths (N,)."""
    names = list(sources) if sources is not None else [f"subject {i}" for i in range(len(series))]
    if not series:
        raise DataError("no subjects to train on")
    n_rois = series[0].shape[0]
    for s, name in zip(series, names, strict=True):
        if s.ndim != 2:
            raise DataError(f"{name}: expected a 2-D ROI x time array, got shape {s.shape}")
        if s.shape[0] != n_rois:
            raise DataError(f"{name}: has {s.shape[0]} ROIs, the first subject has {n_rois}")
        if s.shape[1] < n_frames:
            raise DataError(f"{name}: has {s.shape[1]} frames, shorter than the window of {n_frames} frames")
        if not np.isfinite(s).all():
            raise DataError(f"{name}: contains NaN or Inf values")
    lengths = torch.tensor([s.shape[1] for s in series])
    out = torch.zeros(len(series), n_rois, int(lengths.max()))
    for i, s in enumerate(series):
        out[i, :, : s.shape[1]] = torch.from_numpy(s)
    return out, lengths


def crop_windows(series: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor, n_frames: int, g: torch.Generator) -> torch.Tensor:
    """Random windows of n_frames for subjects idx (B,): series (N, R, L) -> (B, R, T)."""
    room = lengths[idx] - n_frames + 1  # (B,)
    starts = (torch.rand(len(idx), generator=g) * room).long()  # (B,)
    cols = starts[:, None] + torch.arange(n_frames)  # (B, T)
    x = series[idx]  # (B, R, L)
    return torch.gather(x, 2, cols[:, None, :].expand(-1, x.shape[1], -1))


class BatchStream:
    """Deterministic (x, masks) micro-batches for any micro-batch index."""

    def __init__(self, series: torch.Tensor, lengths: torch.Tensor, n_frames: int, patch_size: int,
                 batch_size: int, mask_cfg: MaskConfig, seed: int) -> None:  # fmt: skip
        n = series.shape[0]
        if n < batch_size:
            raise DataError(f"the cohort has {n} subjects, fewer than train.batch_size={batch_size}")
        self.series, self.lengths = series, lengths
        self.n_frames, self.n_time = n_frames, n_frames // patch_size
        self.batch_size, self.mask_cfg, self.seed = batch_size, mask_cfg, seed
        self.per_epoch = n // batch_size  # drop the last incomplete batch

    def subjects(self, index: int) -> torch.Tensor:
        epoch, pos = divmod(index, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.series.shape[0], generator=g)
        return order[pos * self.batch_size : (pos + 1) * self.batch_size]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Masks]:
        g = torch.Generator().manual_seed((self.seed + 1) * 7_919_317 + index)
        idx = self.subjects(index)
        x = crop_windows(self.series, self.lengths, idx, self.n_frames, g)  # (B, R, T)
        masks = sample_masks(self.mask_cfg, self.batch_size, self.series.shape[1], self.n_time, g)
        return x, masks
