"""Robust per-ROI scaling: `(x - median_r) / IQR_r`, statistics over training subjects' ROI time-means.

This is the reference's pretraining scaling (docs/data.md, docs/model.md), used identically in
pretraining, fine-tuning and evaluation: fit once, save `to_dict()` beside the model, `from_dict()`
and `apply()` everywhere.

Three ways to fit:
- `fit(series)`: exact, from one site's (or a pooled) list of training series.
- per site: each site's own `fit` (site-specific scaling, removes site offsets and gains).
- federation-wide without pooling: each site shares a quantile sketch of its subjects' per-ROI
  time-means, and the federation combines them (`sites.scaling_sketch`).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from brainjepa.errors import DataError

log = logging.getLogger(__name__)

# How series are scaled (`fit_method`); robust: the reference's (stats of ROI time-means)
Scaling = Literal["auto", "robust", "values", "scan", "centered", "none"]


def subject_means(series: list[np.ndarray]) -> np.ndarray:
    """Per-subject per-ROI time-means: N x (R, L_i) -> (N, R) float64."""
    if not series:
        raise DataError("scaling: no series to compute statistics from")
    r = {s.shape[0] for s in series}
    if len(r) != 1:
        raise DataError(f"scaling: series have different ROI counts {sorted(r)}")
    return np.stack([np.asarray(s, dtype=np.float64).mean(axis=1) for s in series])  # (N, R); missing ROI: NaN


@dataclass(frozen=True)
class RobustScaling:
    median: np.ndarray  # (R,) float64
    iqr: np.ndarray  # (R,) float64, > 0
    n_subjects: int
    method: str  # "exact", "federated-sketch", ...

    @property
    def n_rois(self) -> int:
        return int(self.median.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale (..., R, L) series -> float32, same shape."""
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[-2] != self.n_rois:
            raise DataError(
                f"scaling: statistics are for {self.n_rois} ROIs but the series has shape {x.shape} (expected (..., {self.n_rois}, L))"
            )
        med = self.median.astype(np.float32)[:, None]  # (R, 1)
        iqr = self.iqr.astype(np.float32)[:, None]
        return ((x.astype(np.float32) - med) / iqr).astype(np.float32)

    def apply_all(self, series: list[np.ndarray]) -> list[np.ndarray]:
        return [self.apply(s) for s in series]

    def checksum(self) -> str:
        h = hashlib.sha256(self.median.astype(np.float64).tobytes())
        h.update(self.iqr.astype(np.float64).tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        """Plain lists and numbers (JSON / checkpoint friendly)."""
        return {
            "kind": "robust_roi_scaling",
            "median": self.median.tolist(),
            "iqr": self.iqr.tolist(),
            "n_subjects": int(self.n_subjects),
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RobustScaling:
        if not isinstance(d, dict) or d.get("kind") != "robust_roi_scaling":
            raise DataError("scaling: not a saved robust_roi_scaling mapping (missing kind='robust_roi_scaling')")
        med = np.asarray(d["median"], dtype=np.float64)
        iqr = np.asarray(d["iqr"], dtype=np.float64)
        if med.shape != iqr.shape or med.ndim != 1:
            raise DataError(f"scaling: median {med.shape} and iqr {iqr.shape} must be equal 1-D shapes")
        check_iqr(iqr, int(d.get("n_subjects", 0)))
        return cls(median=med, iqr=iqr, n_subjects=int(d["n_subjects"]), method=str(d.get("method", "exact")))


def check_iqr(iqr: np.ndarray, n: int) -> None:
    bad = np.flatnonzero(~(iqr > 0) | ~np.isfinite(iqr))
    if bad.size:
        raise DataError(
            f"scaling: ROI(s) {bad[:10].tolist()} have zero (or invalid) IQR of time-means over {n} subjects: "
            "too few training subjects, or constant ROIs"
        )


def fit_means(means: np.ndarray, method: str = "exact") -> RobustScaling:
    """Median and IQR (25th-75th percentile, linear interpolation) of (N, R) subject means."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] < 2:
        raise DataError(f"scaling: need (N >= 2, R) subject means, got shape {means.shape}")
    q25, med, q75 = nan_quantiles(means, [0.25, 0.5, 0.75], axis=0)  # (R,) each, missing ROIs ignored
    iqr = q75 - q25
    check_iqr(iqr, means.shape[0])
    return RobustScaling(median=med, iqr=iqr, n_subjects=int(means.shape[0]), method=method)


def nan_quantiles(a: np.ndarray, q: list[float], axis: int) -> np.ndarray:
    """np.nanquantile, quiet about all-NaN slices (a ROI missing everywhere: NaN, refused by check_iqr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(a, q, axis=axis)


def fit(series: list[np.ndarray]) -> RobustScaling:
    """Exact statistics from training series N x (R, L_i)."""
    return fit_means(subject_means(series))


def fit_values(series: list[np.ndarray], frames_per_subject: int = 256) -> RobustScaling:
    """Per-ROI median and IQR of the VALUES over the training subjects' frames (up to
    `frames_per_subject` evenly spaced frames each): works on raw, demeaned and standardized data alike,
    where the reference's statistics of time-means break (IQR ~ 0 for demeaned series)."""
    if not series:
        raise DataError("scaling: no series to compute statistics from")
    cols = [s[:, np.linspace(0, s.shape[1] - 1, min(frames_per_subject, s.shape[1])).astype(np.int64)] for s in series]
    frames = np.concatenate(cols, axis=1).astype(np.float64)  # (R, sum of kept frames)
    q25, med, q75 = nan_quantiles(frames, [0.25, 0.5, 0.75], axis=1)  # (R,) each, missing ROIs ignored
    iqr = q75 - q25
    check_iqr(iqr, len(series))
    return RobustScaling(median=med, iqr=iqr, n_subjects=len(series), method="values")


@dataclass(frozen=True)
class PerScanScaling:
    """Each scan scaled by its own per-ROI median and IQR over its frames (no statistics to fit or share):
    for raw intensities whose baseline differs per subject by more than the signal (percent-signal-change
    like). Close to the reference's downstream per-sample z-score, robustly."""

    method: str = "per-scan"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., R, L) -> float32, each (R, L) series by its own statistics."""
        x = np.asarray(x, dtype=np.float32)
        q25, med, q75 = np.percentile(x, [25, 50, 75], axis=-1, keepdims=True)  # (..., R, 1); missing ROI: NaN
        iqr = q75 - q25
        if np.any(iqr <= 0):  # NaN (a missing ROI) compares False: it stays NaN
            raise DataError("scaling: per-scan IQR is 0 for some ROI (a constant ROI): cannot scale the scan")
        return ((x - med) / iqr).astype(np.float32)

    def apply_all(self, series: list[np.ndarray]) -> list[np.ndarray]:
        return [self.apply(s) for s in series]

    def checksum(self) -> str:
        return "per-scan"

    def to_dict(self) -> dict:
        return {"kind": "per_scan_robust"}


@dataclass(frozen=True)
class CenteredScaling:
    """Each scan's per-ROI time-mean removed, then one per-ROI scale fitted on the training scans (the
    median over scans of each scan's per-ROI IQR of its centred values): offsets go, between-subject
    differences in a ROI's amplitude stay. For raw series whose per-scan baselines dwarf the signal
    (after `robust` scaling a generated scan's offsets are 3-7x its fluctuations) where `scan` scaling
    would also divide away the amplitude (docs/model.md, deviations table)."""

    scale: np.ndarray  # (R,) float64, > 0
    n_subjects: int
    method: str = "centered"

    @property
    def n_rois(self) -> int:
        return int(self.scale.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., R, L) -> float32, same shape; a missing ROI (NaN) stays NaN."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2 or x.shape[-2] != self.n_rois:
            raise DataError(
                f"scaling: statistics are for {self.n_rois} ROIs but the series has shape {x.shape} "
                f"(expected (..., {self.n_rois}, L))"
            )
        return ((x - x.mean(axis=-1, keepdims=True)) / self.scale.astype(np.float32)[:, None]).astype(np.float32)

    def apply_all(self, series: list[np.ndarray]) -> list[np.ndarray]:
        return [self.apply(s) for s in series]

    def checksum(self) -> str:
        return hashlib.sha256(self.scale.astype(np.float64).tobytes()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"kind": "centered_roi_scaling", "scale": self.scale.tolist(), "n_subjects": int(self.n_subjects)}

    @classmethod
    def from_dict(cls, d: dict) -> CenteredScaling:
        scale = np.asarray(d["scale"], dtype=np.float64)
        if scale.ndim != 1:
            raise DataError(f"scaling: a centered scaling's scale must be 1-D, got shape {scale.shape}")
        check_iqr(scale, int(d.get("n_subjects", 0)))
        return cls(scale=scale, n_subjects=int(d["n_subjects"]))


def fit_centered(series: list[np.ndarray]) -> CenteredScaling:
    """Per-ROI median over the training scans of each scan's IQR over its frames (NaN ROIs ignored)."""
    if not series:
        raise DataError("scaling: no series to compute statistics from")
    iqrs = np.stack(
        [np.subtract(*nan_quantiles(np.asarray(s, np.float64), [0.75, 0.25], axis=1)) for s in series]
    )  # (N, R): each scan's per-ROI IQR over its frames
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scale = np.nanmedian(iqrs, axis=0)  # (R,)
    check_iqr(scale, len(series))
    return CenteredScaling(scale=scale, n_subjects=len(series))


def scaling_from_dict(d: dict) -> RobustScaling | PerScanScaling | CenteredScaling:
    """A saved scaling (`to_dict()` of any kind) back."""
    if isinstance(d, dict) and d.get("kind") == "per_scan_robust":
        return PerScanScaling()
    if isinstance(d, dict) and d.get("kind") == "centered_roi_scaling":
        return CenteredScaling.from_dict(d)
    return RobustScaling.from_dict(d)


def fit_method(
    series: list[np.ndarray], method: str, source: str = "data"
) -> RobustScaling | PerScanScaling | CenteredScaling | None:
    """`robust`: the reference's statistics of subjects' ROI time-means; `values`: of the values
    themselves (`fit_values`); `scan`: each scan by its own (`PerScanScaling`); `centered`: each scan's
    per-ROI mean removed, one fitted per-ROI scale (`CenteredScaling`); `none`: no scaling;
    `auto`: one of the three picked from the series (`choose_method`), with the reason logged."""
    if method == "auto":
        method, reason = choose_method(series)
        log.info("%s: scaling 'auto' picked '%s': %s", source, method, reason)
    if method == "robust":
        return fit(series)
    if method == "values":
        return fit_values(series)
    if method == "scan":
        return PerScanScaling()
    if method == "centered":
        return fit_centered(series)
    if method == "none":
        return None
    raise DataError(f"scaling: expected one of {', '.join(get_args(Scaling))}, got '{method}'")


CENTRED_MAX = 0.5  # auto: |time-mean| / within-scan SD below this (median over scans, ROIs) = demeaned data
BASELINE_MAX = 1.0  # auto: baselines' IQR across scans / within-scan SD above this = per-scan baselines
BASELINE_MIN = 1 / 3  # auto: below this the time-means' IQR is too small to divide by (spread > 3)


def choose_method(series: list[np.ndarray]) -> tuple[str, str]:
    """`auto`: (method, reason) from the training series themselves (missing ROIs ignored).

    - demeaned or standardized per scan (each ROI's time-mean small against its SD within the scan,
      median ratio < CENTRED_MAX) -> `values` (the reference's statistics of time-means would divide by ~0);
    - raw intensities whose baselines differ across scans by more than the signal (IQR across scans of
      a ROI's time-mean > BASELINE_MAX x its within-scan SD, median over ROIs) -> `scan`;
    - raw intensities with (nearly) the same baseline in every scan (that ratio < BASELINE_MIN: the
      reference's recipe would divide by a tiny IQR, spread > 3) -> `values`;
    - otherwise (baselines differing by about the signal) -> `robust`, the reference's recipe (spread ~ 1 / ratio)."""
    if not series:
        raise DataError("scaling: no series to choose a scaling from")
    means = subject_means(series)  # (N, R)
    sds = np.stack([np.asarray(s, dtype=np.float64).std(axis=1) for s in series])  # (N, R)
    ok = np.isfinite(means) & (sds > 0)
    centred = float(np.median(np.abs(means[ok]) / sds[ok]))
    if centred < CENTRED_MAX:
        return "values", (
            f"the series look demeaned per scan (median |time-mean| / SD = {centred:.3g} < {CENTRED_MAX})"
        )
    q25, q75 = nan_quantiles(means, [0.25, 0.75], axis=0)  # (R,) each
    within = nan_quantiles(np.where(ok, sds, np.nan), [0.5], axis=0)[0]  # (R,)
    ratio = float(np.nanmedian((q75 - q25) / within)) if len(series) > 1 else 0.0
    if ratio > BASELINE_MAX:
        return "scan", (
            f"raw intensities whose baselines differ across scans by {ratio:.3g} x the within-scan "
            f"SD (> {BASELINE_MAX}): each scan by its own statistics"
        )
    if ratio < BASELINE_MIN:
        return "values", (
            f"raw intensities with nearly equal baselines across scans (IQR across scans = {ratio:.3g} "
            f"x the within-scan SD < {BASELINE_MIN:.3g}): the time-means' IQR is too small to divide by"
        )
    return "robust", (
        f"raw intensities (|time-mean| / SD = {centred:.3g}) with comparable baselines (IQR across "
        f"scans = {ratio:.3g} x the within-scan SD): the reference's recipe"
    )


def typical_spread(series: list[np.ndarray]) -> float:
    """Median over (up to 64) subjects of the median per-ROI standard deviation: ~1 is what the model wants.
    Missing ROIs (NaN rows) are left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmedian([np.nanmedian(s.std(axis=1)) for s in series[:64]]))


def check_spread(series: list[np.ndarray], source: str, scaling: str) -> float:
    """Log the typical spread of (scaled) series; refuse the reference scaling of demeaned data, warn (naming
    the source: the site YAML) when the model would see values whose typical scale is far from 1."""
    spread = typical_spread(series)
    if scaling == "robust" and spread > 1e3:
        raise DataError(
            f"data '{source}': robust scaling divides by the IQR of the subjects' ROI time-means, which is "
            f"~{spread:.1e} times smaller than the signal: the series look already demeaned (z-scored). "
            "Set `data.scaling: values` (median / IQR of the values themselves) or `auto` for such data"
        )
    if not 0.1 <= spread <= 10.0:
        hint = (
            "consider `scaling: values` or `auto`"
            if scaling != "values"
            else "the subjects' baselines differ by more than the signal: consider `scaling: scan`"
        )
        log.warning(
            "data '%s': after scaling '%s' the series' typical spread is %.3g, far from 1 (the model "
            "trains best near 1): %s",
            source,
            scaling,
            spread,
            hint,
        )
    else:
        log.info("data '%s': scaling '%s', typical spread %.3g", source, scaling, spread)
    return spread
