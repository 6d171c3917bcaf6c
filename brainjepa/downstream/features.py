"""Per-scan features of the non-neural baselines (`brainjepa.downstream.baselines`).

Input: N scans, each an (R, L_i) series at one TR (the model TR), L_i free; a missing ROI is a whole NaN
row (`sites.missing`), any other NaN / inf is an error.

- `fc_features`: Fisher z (arctanh, |r| clipped at Z_CLIP) of the upper triangle (k=1, row major) of the
  ROI-by-ROI Pearson correlations of the series as given ("fc_raw"); a missing ROI's pairs are NaN.
- `clean_series` + `fc_features` ("fc"): the same after `nilearn.signal.clean` (linear detrend and a
  Butterworth band-pass per `BaselineConfig`, no standardisation: correlations do not need it).
- `fit_tangent` / `tangent_features` ("fc_tangent"): nilearn's tangent-space connectivity (Ledoit-Wolf
  covariances whitened by the geometric mean of the scans it is fitted on, upper triangle without the
  diagonal) of cleaned series; it needs every ROI of every scan (`require_complete`).
- `roi_spectrum_features` ("roi_spectrum"): per ROI, the log of the Welch power spectral density integrated
  over each band of `BaselineConfig.bands` (the univariate amplitude-and-spectrum reader); features are
  ROI-major, (R, n_bands) flattened; a missing ROI's features are NaN.

Welch segments (`welch_nperseg`): each holds SEGMENT_CYCLES periods of the lowest band edge (0.01 Hz: 200 s,
91 frames at the default model TR, a resolution of about 0.005 Hz, so the narrowest default band spans ~3 bins), Hann
windowed, half overlapping; a scan shorter than that is one segment (a windowed periodogram: the same
resolution as its length allows, a noisier estimate). Band power is the trapezoid integral of the PSD,
linearly interpolated at the band edges, so every band of positive width gets a value whatever the
resolution. The FFT length is made even so that the spectrum reaches the Nyquist frequency.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from nilearn.connectome import ConnectivityMeasure
from nilearn.signal import clean
from scipy.integrate import trapezoid
from scipy.interpolate import interp1d
from scipy.signal import welch

from brainjepa.downstream.config import BaselineConfig
from brainjepa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Z_CLIP = 0.999999  # |r| clip before arctanh, so that r = +-1 gives a finite z
SEGMENT_CYCLES = 2.0  # a Welch segment holds this many periods of the lowest band edge
MIN_SPECTRUM_FRAMES = 8  # shorter scans have no spectrum worth the name


def check_series(
    series: Sequence[np.ndarray], what: str = "scan", n_rois: int | None = None, min_frames: int = 2
) -> list[np.ndarray]:
    """float64 copies of N (R, L_i) series: 2-D, one R (= n_rois when given), L_i >= min_frames, finite
    except whole NaN rows (missing ROIs); a present ROI may not be constant. N may be 0."""
    out = []
    for i, s in enumerate(series):
        x = np.asarray(s, dtype=np.float64)
        if n_rois is None and x.ndim == 2:
            n_rois = x.shape[0]
        if x.ndim != 2 or x.shape[0] != n_rois or x.shape[0] < 2 or x.shape[1] < min_frames:
            raise DataError(
                f"{what} {i}: expected an (R, L) series with R = {n_rois} >= 2 ROIs like the first "
                f"scan and L >= {min_frames} frames, got shape {x.shape}"
            )
        bad = ~np.isfinite(x)  # (R, L)
        if bad.any() and not (bad.all(axis=1) | ~bad.any(axis=1)).all():
            rows = np.flatnonzero(bad.any(axis=1) & ~bad.all(axis=1)).tolist()
            raise DataError(
                f"{what} {i}: ROIs {rows} hold some NaN/inf values; only a whole missing ROI (an "
                "all-NaN row) may be NaN"
            )
        if np.isinf(x).any():
            raise DataError(f"{what} {i}: the series holds inf values")
        present = ~bad.all(axis=1)
        flat = present & (np.ptp(np.where(present[:, None], x, 0.0), axis=1) == 0)
        if flat.any():
            raise DataError(
                f"{what} {i}: ROIs {np.flatnonzero(flat).tolist()} are constant (no correlation or "
                "spectrum is defined; a missing ROI should be a NaN row)"
            )
        out.append(x)
    return out


def present_rois(x: np.ndarray) -> np.ndarray:
    """(R,) bool: the ROIs of an (R, L) series that are not missing (not an all-NaN row)."""
    return ~np.isnan(x).all(axis=1)


def fc_features(series: Sequence[np.ndarray], what: str = "scan") -> np.ndarray:
    """(N, R*(R-1)/2) float64 Fisher-z correlations of the series as given (see the module doc)."""
    xs = check_series(series, what)
    if not xs:
        raise DataError(f"fc_features: expected at least one {what}, got none")
    n_rois = xs[0].shape[0]
    iu = np.triu_indices(n_rois, k=1)
    out = np.empty((len(xs), iu[0].size), dtype=np.float64)  # (N, R*(R-1)/2)
    for i, x in enumerate(xs):
        xc = x - x.mean(axis=1, keepdims=True)  # (R, L); a missing ROI stays NaN
        norm = np.linalg.norm(xc, axis=1)  # (R,)
        if np.any(norm == 0):  # a series cleaned to zero
            raise DataError(
                f"{what} {i}: ROIs {np.flatnonzero(norm == 0).tolist()} are constant (no correlation is defined)"
            )
        xc /= norm[:, None]
        r = (xc @ xc.T)[iu]  # (R*(R-1)/2,); NaN where either ROI is missing
        out[i] = np.arctanh(np.clip(r, -Z_CLIP, Z_CLIP))
    return out


def _nyquist(tr: float) -> float:
    if not (tr > 0 and math.isfinite(tr)):
        raise ConfigError(f"tr: expected a repetition time > 0 s, got {tr}")
    return 0.5 / tr


def clean_series(
    series: Sequence[np.ndarray], tr: float, config: BaselineConfig, what: str = "scan"
) -> list[np.ndarray]:
    """N (R, L_i) float64 series after `nilearn.signal.clean` (detrend and band-pass per `config`,
    t_r = tr, standardize off) of each scan's present ROIs; missing ROIs stay NaN rows."""
    nyq = _nyquist(tr)
    high = config.high_pass or None
    low = config.low_pass or None
    for name, v in (("high_pass", high), ("low_pass", low)):
        if v is not None and v >= nyq:
            raise ConfigError(
                f"baselines.{name}: {v} Hz is at or above the Nyquist frequency {nyq:.4g} Hz of "
                f"TR {tr:g} s; set it lower, or null to disable it"
            )
    out = []
    for i, x in enumerate(check_series(series, what)):
        keep = present_rois(x)  # (R,)
        y = np.full_like(x, np.nan)  # (R, L)
        try:
            y[keep] = clean(x[keep].T, detrend=config.detrend, standardize=None, low_pass=low, high_pass=high, t_r=tr).T
        except ValueError as e:  # scipy's filtfilt: the scan is shorter than the filter's padding
            raise DataError(
                f"{what} {i}: nilearn could not band-pass its {x.shape[1]} frames ({high}-{low} Hz at TR {tr:g} s): {e}"
            ) from e
        out.append(y)
    return out


def require_complete(series: Sequence[np.ndarray], what: str = "scan") -> None:
    """DataError naming the first scan with a missing ROI: the tangent space needs every ROI."""
    for i, s in enumerate(series):
        missing = np.flatnonzero(~present_rois(np.asarray(s)))
        if missing.size:
            raise DataError(
                f"{what} {i} has missing ROI(s) {missing.tolist()} (NaN rows): a scan with a missing "
                "ROI cannot enter the tangent space; use the 'fc' baseline (pairwise-complete "
                "correlations, imputed) or leave the scan out"
            )


def tangent_measure() -> ConnectivityMeasure:
    """The unfitted tangent-space measure (Ledoit-Wolf covariances of z-scored series, upper triangle)."""
    return ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True, standardize="zscore_sample")


def fit_tangent(cleaned: Sequence[np.ndarray]) -> tuple[ConnectivityMeasure, np.ndarray]:
    """The tangent measure fitted on N complete (R, L_i) cleaned series (its reference: their geometric
    mean), and their (N, R*(R-1)/2) tangent features."""
    require_complete(cleaned, "training scan")
    measure = tangent_measure()
    feats = measure.fit_transform([np.asarray(x).T for x in cleaned])  # list of (L_i, R)
    return measure, np.asarray(feats, dtype=np.float64)


def tangent_features(measure: ConnectivityMeasure, cleaned: Sequence[np.ndarray], what: str = "scan") -> np.ndarray:
    """(N, R*(R-1)/2) tangent features of complete cleaned series, against the fitted reference."""
    require_complete(cleaned, what)
    n_pairs = measure.mean_.shape[0] * (measure.mean_.shape[0] - 1) // 2
    if len(cleaned) == 0:
        return np.empty((0, n_pairs))
    return np.asarray(measure.transform([np.asarray(x).T for x in cleaned]), dtype=np.float64)


def usable_bands(bands: Sequence[tuple[float, float]], tr: float) -> tuple[tuple[float, float], ...]:
    """The bands clipped at the Nyquist frequency of tr; a band starting at or above it is a ConfigError."""
    nyq = _nyquist(tr)
    above = [(lo, hi) for lo, hi in bands if lo >= nyq]
    if above:
        raise ConfigError(
            f"baselines.bands: {[list(b) for b in above]} Hz start at or above the Nyquist frequency "
            f"{nyq:.4g} Hz of TR {tr:g} s; drop them or lower them"
        )
    return tuple((float(lo), float(min(hi, nyq))) for lo, hi in bands)


def welch_nperseg(n_frames: int, tr: float, lowest_hz: float) -> int:
    """Welch segment length: SEGMENT_CYCLES periods of lowest_hz in frames, at most the scan's length."""
    want = math.ceil(SEGMENT_CYCLES / (lowest_hz * tr)) if lowest_hz > 0 else n_frames
    return int(min(n_frames, max(want, 2)))


def band_power(freqs: np.ndarray, psd: np.ndarray, bands: Sequence[tuple[float, float]]) -> np.ndarray:
    """(R, B): the integral over each band of the PSD (R, F) at freqs (F,) (linear between bins)."""
    at = interp1d(freqs, psd, axis=-1, assume_sorted=True)
    out = np.empty((psd.shape[0], len(bands)))
    for b, (lo, hi) in enumerate(bands):
        lo, hi = max(lo, freqs[0]), min(hi, freqs[-1])  # the Nyquist edge may differ in the last bit
        f = np.concatenate([[lo], freqs[(freqs > lo) & (freqs < hi)], [hi]])  # (n,)
        out[:, b] = trapezoid(at(f), f, axis=-1)
    return out


def roi_spectrum_features(
    series: Sequence[np.ndarray], tr: float, config: BaselineConfig, what: str = "scan"
) -> np.ndarray:
    """(N, R * n_bands) float64 log band powers, ROI-major (see the module doc); NaN for missing ROIs."""
    bands = usable_bands(config.bands, tr)
    lowest = min([e for b in bands for e in b if e > 0])
    xs = check_series(series, what, min_frames=MIN_SPECTRUM_FRAMES)
    n_rois = xs[0].shape[0] if xs else 0
    out = np.full((len(xs), n_rois, len(bands)), np.nan)  # (N, R, B)
    for i, x in enumerate(xs):
        keep = present_rois(x)  # (R,)
        nperseg = welch_nperseg(x.shape[1], tr, lowest)
        freqs, psd = welch(
            x[keep],
            fs=1.0 / tr,
            window="hann",
            nperseg=nperseg,
            nfft=nperseg + nperseg % 2,
            detrend="linear" if config.detrend else "constant",
            axis=-1,
        )
        power = band_power(freqs, psd, bands)  # (R_present, B)
        if not (power > 0).all():
            rois = np.flatnonzero(keep)[~(power > 0).all(axis=1)].tolist()
            raise DataError(f"{what} {i}: ROIs {rois} have no power in some band {list(bands)} Hz")
        out[i, keep] = np.log(power)
    return out.reshape(len(xs), n_rois * len(bands))
