"""Bring a site's series to the model's repetition time (TR).

Methods:
- `polyphase` (default): scipy's polyphase resampler (anti-aliasing FIR low-pass, then rational
  up/down sampling). Edge effects are kept small with `padtype="line"`.
- `linear`: linear interpolation between frames (no anti-aliasing).
- `nearest`: keep the frame nearest to each model time point; with an integer ratio this is the
  reference's frame skipping (UKB 0.735 s -> every 3rd frame -> 2.205 s). Use it to reproduce the
  reference behaviour.
The output covers the same time span: frame k sits at k * tr_out seconds, k = 0 .. floor((L-1) tr_in / tr_out).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from brainjepa.errors import DataError

METHODS = ("polyphase", "linear", "nearest")
DEFAULT_MODEL_TR = 2.205  # seconds: the reference's UKB 0.735 s x 3


def n_frames_after(n_frames: int, tr_in: float, tr_out: float) -> int:
    """Frames a series of `n_frames` at `tr_in` has once resampled to `tr_out`."""
    if np.isclose(tr_in, tr_out, rtol=1e-6, atol=0):
        return n_frames
    return int(np.floor((n_frames - 1) * tr_in / tr_out + 1e-9)) + 1


def resample(x: np.ndarray, tr_in: float, tr_out: float, method: str = "polyphase") -> np.ndarray:
    """Resample (..., L) frames at `tr_in` seconds to `tr_out` seconds along the last axis -> float32."""
    if tr_in <= 0 or tr_out <= 0:
        raise DataError(f"resample: TRs must be > 0, got tr_in={tr_in}, tr_out={tr_out}")
    if method not in METHODS:
        raise DataError(f"resample: unknown method '{method}', expected one of {METHODS}")
    x = np.asarray(x, dtype=np.float32)
    n_in = x.shape[-1]
    if np.isclose(tr_in, tr_out, rtol=1e-6, atol=0):
        return x
    n_out = n_frames_after(n_in, tr_in, tr_out)
    t_out = np.arange(n_out) * (tr_out / tr_in)  # (L',) positions in input frames
    if method == "nearest":
        idx = np.minimum(np.rint(t_out).astype(np.int64), n_in - 1)
        return np.ascontiguousarray(x[..., idx])
    if method == "linear":
        lo = np.minimum(np.floor(t_out).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (t_out - lo).astype(np.float32)
        return np.ascontiguousarray(x[..., lo] * (1 - w) + x[..., hi] * w)
    from scipy.signal import resample_poly

    ratio = Fraction(tr_in / tr_out).limit_denominator(64)  # up / down
    if ratio.numerator == 0:
        raise DataError(f"resample: ratio tr_in/tr_out = {tr_in}/{tr_out} is too small to resample")
    y = resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator, axis=-1, padtype="line")
    return np.ascontiguousarray(y[..., :n_out], dtype=np.float32)
