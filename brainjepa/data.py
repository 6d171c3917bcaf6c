"""Model-ready batches: subjects' ROI series in memory -> (B, R, T) windows, deterministic by step.

Every micro-batch is a pure function of (seed, micro-batch index): the subject order is a per-epoch
permutation, the window starts come from a numpy generator and the masks from a torch generator, both
seeded with the micro-batch index. A resumed run therefore sees exactly the batches it would have
seen without the interruption, and a federated site can pick up where its last round ended.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from brainjepa.config import MaskConfig, PretrainConfig
from brainjepa.errors import ConfigError, DataError
from brainjepa.masks import Masks, sample_masks_observed, split_missing
from sites.cohort import Cohort, load_cohort
from sites.config import load_site_config
from sites.windows import PackedSeries, check_lengths, pack, random_windows


def pack_cohort(series: Sequence[np.ndarray], subject_ids: Sequence[str], n_frames: int) -> PackedSeries:
    """Check (same R, finite but for whole NaN rows = missing ROIs, long enough) and pack subjects' (R, L_i)
    series for windowing."""
    for x, sid in zip(series, subject_ids, strict=True):
        finite = np.isfinite(x)
        if not (finite.all(axis=1) | ~finite.any(axis=1)).all():
            raise DataError(f"subject '{sid}': contains NaN or Inf values (only a whole missing ROI may be NaN)")
    packed = pack(list(series), list(subject_ids))
    check_lengths(packed, n_frames)
    return packed


class BatchStream:
    """Deterministic (x, masks) micro-batches for any micro-batch index."""

    def __init__(
        self, packed: PackedSeries, n_frames: int, patch_size: int, batch_size: int, mask_cfg: MaskConfig, seed: int
    ) -> None:
        n = len(packed)
        if n < batch_size:
            raise DataError(f"the cohort has {n} subjects, fewer than the batch size {batch_size}")
        self.packed = packed
        self.n_frames, self.n_time = n_frames, n_frames // patch_size
        self.batch_size, self.mask_cfg, self.seed = batch_size, mask_cfg, seed
        self.per_epoch = n // batch_size  # drop the last incomplete batch

    def subjects(self, index: int) -> np.ndarray:
        epoch, pos = divmod(index, self.per_epoch)
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.packed))
        return order[pos * self.batch_size : (pos + 1) * self.batch_size]  # (B,)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Masks]:
        """Micro-batch `index`: (B, R, T) windows and their masks. Missing ROIs (NaN rows) are filled with 0
        and left out of every sample's masks (`masks.sample_masks_observed`: the batch's union)."""
        x, _ = random_windows(
            self.packed, self.subjects(index), self.n_frames, np.random.default_rng([self.seed, 1, index])
        )
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, 2, index]).integers(2**62)))
        x, observed = split_missing(torch.from_numpy(x))  # (B, R, T), (B, R)
        masks = sample_masks_observed(self.mask_cfg, self.batch_size, self.packed.n_rois, self.n_time, g, observed)
        return x, masks  # (B, R, T)


def load_pretraining_cohort(cfg: PretrainConfig) -> Cohort:
    """The training subjects named by the config's `data` section, scaled: one site YAML, several site
    YAMLs pooled (each site scaled with its own statistics, as each would in a federation), or a folder."""
    d = cfg.data
    if sum((bool(d.site), bool(d.sites), bool(d.roi_dir))) != 1:
        raise ConfigError(
            "data: set exactly one of 'site' (a site YAML), 'sites' (several, pooled) or 'roi_dir' "
            "(a folder of .npy files)"
        )
    if d.roi_dir:
        return load_cohort(d.roi_dir, d.model_tr, min_frames=cfg.model.n_frames, scaling=d.scaling)
    cohorts = [
        load_cohort(load_site_config(p), d.model_tr, min_frames=cfg.model.n_frames, scaling=d.scaling)
        for p in ((d.site,) if d.site else d.sites)
    ]
    if len(cohorts) == 1:
        return cohorts[0]
    return Cohort(
        [x for c in cohorts for x in c.series],
        [f"{c.source}:{i}" for c in cohorts for i in c.subject_ids],
        " + ".join(c.source for c in cohorts),
        None,
    )


def pretraining_stream(cohort: Cohort, cfg: PretrainConfig) -> BatchStream:
    """The batches `cfg` trains on from `cohort` (one site's, or a folder's): checked, packed, seeded."""
    m, t = cfg.model, cfg.train
    if cohort.series[0].shape[0] != m.n_rois:
        raise DataError(f"data '{cohort.source}' has {cohort.series[0].shape[0]} ROIs but model.n_rois is {m.n_rois}")
    packed = pack_cohort(cohort.series, cohort.subject_ids, m.n_frames)
    return BatchStream(packed, m.n_frames, m.patch_size, t.batch_size, cfg.mask, t.seed)
