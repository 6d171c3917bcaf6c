"""Windows of T frames cropped from variable-length series, without Python loops over samples.

All series of a cohort are packed once into one (R, sum L_i) array with per-subject offsets; a batch
of windows is then a single fancy-indexing gather. Training draws window starts uniformly from an
explicit `numpy.random.Generator`; evaluation uses fixed windows (start, centre) or several evenly
spaced windows per subject (to be averaged downstream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainjepa.errors import DataError


@dataclass(frozen=True)
class PackedSeries:
    data: np.ndarray  # (R, sum L_i) float32
    offsets: np.ndarray  # (N,) int64 start column of each subject
    lengths: np.ndarray  # (N,) int64 frames of each subject
    subject_ids: tuple[str, ...] = ()

    @property
    def n_rois(self) -> int:
        return int(self.data.shape[0])

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def pack(series: list[np.ndarray], subject_ids: list[str] | None = None) -> PackedSeries:
    """N x (R, L_i) -> PackedSeries."""
    if not series:
        raise DataError("windows: no series to pack")
    r = {s.shape[0] for s in series}
    if len(r) != 1:
        raise DataError(f"windows: series have different ROI counts {sorted(r)}")
    lengths = np.array([s.shape[1] for s in series], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    data = np.ascontiguousarray(np.concatenate(series, axis=1), dtype=np.float32)  # (R, sum L)
    return PackedSeries(data, offsets, lengths, tuple(subject_ids or ()))


def check_lengths(packed: PackedSeries, n_frames: int, skip: bool = False) -> np.ndarray:
    """Indices of subjects long enough for a window of `n_frames`; too short -> error, or dropped if `skip`."""
    ok = packed.lengths >= n_frames
    if not ok.all() and not skip:
        bad = np.flatnonzero(~ok)
        who = [packed.subject_ids[i] if packed.subject_ids else f"#{i}" for i in bad[:5]]
        raise DataError(
            f"windows: {bad.size} series shorter than the window of {n_frames} frames "
            f"(e.g. {who} with {packed.lengths[bad[:5]].tolist()} frames); lower the window or skip them"
        )
    return np.flatnonzero(ok)


def gather(packed: PackedSeries, idx: np.ndarray, starts: np.ndarray, n_frames: int) -> np.ndarray:
    """Windows of `n_frames` at `starts` of subjects `idx` -> (B, R, T) float32."""
    idx = np.asarray(idx, dtype=np.int64)  # (B,)
    starts = np.asarray(starts, dtype=np.int64)  # (B,)
    if np.any(starts < 0) or np.any(starts + n_frames > packed.lengths[idx]):
        raise DataError(f"windows: a window of {n_frames} frames does not fit inside its series")
    cols = packed.offsets[idx, None] + starts[:, None] + np.arange(n_frames)  # (B, T)
    return np.ascontiguousarray(packed.data[:, cols].transpose(1, 0, 2))  # (R, B, T) -> (B, R, T)


def random_starts(
    lengths: np.ndarray, n_frames: int, rng: np.random.Generator, max_start: int | None = None
) -> np.ndarray:
    """(B,) uniform integer starts in [0, min(L_i - T, max_start)] for lengths (B,)."""
    span = np.asarray(lengths, dtype=np.int64) - n_frames  # (B,)
    if np.any(span < 0):
        raise DataError(f"windows: a series is shorter than the window of {n_frames} frames")
    if max_start is not None:
        span = np.minimum(span, max_start)
    return np.floor(rng.random(span.shape[0]) * (span + 1)).astype(np.int64)


def random_windows(
    packed: PackedSeries, idx: np.ndarray, n_frames: int, rng: np.random.Generator, max_start: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Training crops: one random window per requested subject -> ((B, R, T), starts (B,))."""
    idx = np.asarray(idx, dtype=np.int64)
    starts = random_starts(packed.lengths[idx], n_frames, rng, max_start)
    return gather(packed, idx, starts, n_frames), starts


def fixed_windows(
    packed: PackedSeries, n_frames: int, position: str = "start", idx: np.ndarray | None = None
) -> np.ndarray:
    """Evaluation crops: one window per subject at the series' 'start' or 'center' -> (N, R, T)."""
    idx = np.arange(len(packed)) if idx is None else np.asarray(idx, dtype=np.int64)
    span = packed.lengths[idx] - n_frames
    if np.any(span < 0):
        raise DataError(f"windows: a series is shorter than the window of {n_frames} frames")
    if position == "start":
        starts = np.zeros_like(span)
    elif position == "center":
        starts = span // 2
    else:
        raise DataError(f"windows: unknown position '{position}', expected 'start' or 'center'")
    return gather(packed, idx, starts, n_frames)


def multi_windows(packed: PackedSeries, n_frames: int, n_windows: int, idx: np.ndarray | None = None) -> np.ndarray:
    """Evaluation crops: `n_windows` evenly spaced windows per subject -> (N, n_windows, R, T).

    Windows run from the first to the last possible start (they overlap when the scan is short);
    average the model's outputs over axis 1.
    """
    if n_windows < 1:
        raise DataError(f"windows: n_windows must be >= 1, got {n_windows}")
    idx = np.arange(len(packed)) if idx is None else np.asarray(idx, dtype=np.int64)
    span = packed.lengths[idx] - n_frames  # (N,)
    if np.any(span < 0):
        raise DataError(f"windows: a series is shorter than the window of {n_frames} frames")
    frac = np.linspace(0.0, 1.0, n_windows) if n_windows > 1 else np.array([0.5])  # (W,)
    starts = np.floor(span[:, None] * frac[None, :] + 0.5).astype(np.int64)  # (N, W)
    rep = np.repeat(idx, n_windows)  # (N*W,)
    x = gather(packed, rep, starts.reshape(-1), n_frames)  # (N*W, R, T)
    return x.reshape(idx.shape[0], n_windows, packed.n_rois, n_frames)
