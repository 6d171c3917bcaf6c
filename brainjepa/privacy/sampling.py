"""Poisson sampling of a site's privacy units (subjects) for DP-SGD pretraining steps.

The unit of privacy is the SUBJECT: each step includes every subject independently with probability
q = expected batch / number of subjects, and an included subject contributes ONE window, cropped at a
random position from one of its scans drawn uniformly. A subject therefore touches at most one
per-sample gradient per step, which clipping bounds: the (epsilon, delta) guarantee is subject-level,
whatever number of scans or windows a subject has.

The draws come from a generator the site seeds from a secret source (`secret_generators`): an
adversary who knew which subjects were drawn would lose the amplification by sampling the accountant
counts on, and one who knew the noise could remove it. DP rounds are therefore not bit-reproducible.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch

from brainjepa.config import MaskConfig
from brainjepa.masks import Masks, sample_masks
from sites.windows import PackedSeries, random_windows


def secret_seeds() -> tuple[int, int]:
    """(sampling seed, noise seed) from the OS's entropy (63 bits each: they travel between a site's
    processes as int64, `brainjepa.distributed.RankGroup.broadcast_ints`)."""
    return secrets.randbits(63), secrets.randbits(63)


def generators(seeds: tuple[int, int]) -> tuple[np.random.Generator, torch.Generator]:
    """(numpy generator for sampling, torch generator for noise) from (sampling seed, noise seed)."""
    return np.random.default_rng(seeds[0]), torch.Generator().manual_seed(seeds[1])


def secret_generators() -> tuple[np.random.Generator, torch.Generator]:
    """(numpy generator for sampling, torch generator for noise), seeded from the OS's entropy."""
    return generators(secret_seeds())


def unit_index(units: Sequence[str]) -> np.ndarray:
    """(N,) unit label of each scan -> (N,) int unit index (0..U-1, in order of first appearance)."""
    _, first, inverse = np.unique(np.asarray(units, dtype=str), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # relabel by first appearance
    return order[inverse].astype(np.int64)


class PoissonSubjects:
    """The subjects Poisson-drawn at each step (a variable batch, possibly empty): one scan each
    (`draw_scans`), and for pretraining a window of it with the batch's masks (`draw`)."""

    def __init__(
        self,
        packed: PackedSeries,
        scan_unit: np.ndarray,
        expected_batch: int,
        n_frames: int,
        patch_size: int = 1,
        mask_cfg: MaskConfig | None = None,
    ) -> None:
        self.packed, self.n_frames, self.n_time, self.mask_cfg = packed, n_frames, n_frames // patch_size, mask_cfg
        self.n_units = int(scan_unit.max()) + 1
        order = np.argsort(scan_unit, kind="stable")  # scans grouped by unit
        self.scans = order
        self.counts = np.bincount(scan_unit, minlength=self.n_units)  # (U,)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # (U,)
        if not 0 < expected_batch <= self.n_units:
            raise ValueError(f"DP sampling: expected batch {expected_batch} must be 1..{self.n_units} (the subjects)")
        self.sample_rate = expected_batch / self.n_units

    def draw_scans(self, rng: np.random.Generator) -> np.ndarray:
        """(b,) scan indices: one uniformly drawn scan of each subject included with probability q."""
        units = np.flatnonzero(rng.random(self.n_units) < self.sample_rate)  # (b,)
        pick = self.starts[units] + (rng.random(units.size) * self.counts[units]).astype(np.int64)
        return self.scans[pick]

    def windows(self, scans: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """(b, R, T): a random window of each scan."""
        return torch.from_numpy(random_windows(self.packed, scans, self.n_frames, rng)[0])

    def draw(self, rng: np.random.Generator) -> tuple[torch.Tensor | None, Masks | None]:
        """One pretraining step's batch: x (b, R, T) and masks, or (None, None) when nobody is drawn."""
        scans = self.draw_scans(rng)
        if scans.size == 0:
            return None, None
        assert self.mask_cfg is not None, "pretraining draws need the mask config"
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        masks = sample_masks(self.mask_cfg, int(scans.size), self.packed.n_rois, self.n_time, g)
        return self.windows(scans, rng), masks
