"""Missing ROIs (partial brain coverage): detection and the per-site policy `preprocess.missing_rois`.

A ROI of one scan is *missing* when its series is all zero, constant, or holds any NaN/Inf value (an
empty atlas label, a region outside the field of view or the brain mask). The site's policy:

- `error` (default): the scan is an error naming the file and the ROIs (the data must be fixed);
- `skip_scan`: the scan is dropped, with the reason logged and counted (`SiteSeries.skipped`);
- `mask`: the scan is kept and its missing ROIs' rows are set to NaN. **A NaN row is the one in-memory
  marker of a missing ROI** from here to the model's entry point: resampling, censoring, packing and
  windowing carry it along unchanged; scaling statistics ignore it (nan-aware); FC and gradients use
  pairwise-complete statistics; pretraining batches (`brainjepa.data`) turn it into an observed mask
  (never a context token nor a target) and fill 0; downstream pooling and `embed` skip its tokens.

Counts per scan and per ROI are kept (`SiteSeries.missing`, the `prepare` manifest) and logged once
per site.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from brainjepa.errors import DataError, where

log = logging.getLogger(__name__)

MissingPolicy = Literal["error", "skip_scan", "mask"]


def find_missing(x: np.ndarray) -> np.ndarray:
    """(R,) bool: ROIs of a (R, L) series that are missing (any NaN/Inf, or constant incl. all-zero)."""
    x = np.asarray(x)
    bad = ~np.isfinite(x).all(axis=-1)  # (R,)
    const = np.ptp(np.where(np.isfinite(x), x, 0.0), axis=-1) == 0  # (R,)
    return bad | const


def observed_rois(x: np.ndarray) -> np.ndarray:
    """(..., R) bool: True where a ROI of a (..., R, L) array is present (a missing ROI is a NaN row)."""
    return np.isfinite(x).all(axis=-1)


def describe(x: np.ndarray, miss: np.ndarray) -> str:
    """What is wrong with the missing ROIs, e.g. 'all-zero ROI(s) 3, 8; NaN ROI(s) 10'."""
    rois = np.flatnonzero(miss)
    nan = rois[~np.isfinite(x[rois]).all(axis=1)]
    rest = np.setdiff1d(rois, nan)
    zero = rest[(x[rest] == 0).all(axis=1)] if rest.size else rest
    const = np.setdiff1d(rest, zero)
    kinds = (("all-zero", zero), ("constant", const), ("NaN or Inf values in", nan))
    parts = [f"{k} ROI(s) {_list(v)}" for k, v in kinds if v.size]
    return "; ".join(parts) + f" (0-based, of {x.shape[0]})"


def apply_policy(x: np.ndarray, policy: MissingPolicy, path: object, sid: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Apply the site's policy to one scan (R, L) -> (the scan or None when skipped, missing ROI indices).

    `error` raises a DataError naming the file, the ROIs and the key to change; `skip_scan` returns None;
    `mask` returns a float32 copy whose missing rows are NaN (a scan with no ROI left is skipped)."""
    miss = find_missing(x)
    idx = np.flatnonzero(miss)
    if not idx.size:
        return x, idx
    what = describe(x, miss)
    if policy == "error":
        raise DataError(
            f"{where(path)}: subject '{sid}': {what}: an empty atlas label or a region outside the field of view "
            "or brain mask; fix the atlas/data, or set 'preprocess.missing_rois: mask' (keep the scan, leave "
            "those ROIs out) or 'skip_scan' (drop such scans)"
        )
    if policy == "skip_scan" or idx.size == x.shape[0]:
        return None, idx
    if policy != "mask":
        raise DataError(f"missing ROIs: expected policy error, skip_scan or mask, got '{policy}'")
    out = np.array(x, dtype=np.float32, copy=True)
    out[idx] = np.nan
    return out, idx


def missing_summary(per_scan: dict[str, list[int]], roi_names: list[str], n_scans: int) -> dict:
    """Counts for a manifest / a log: scans with missing ROIs, and per ROI name the scans missing it."""
    counts = np.zeros(len(roi_names), dtype=np.int64)
    for rois in per_scan.values():
        counts[np.asarray(rois, dtype=np.int64)] += 1
    return {
        "scans": int(n_scans),
        "scans_with_missing": len(per_scan),
        "per_roi": {roi_names[i]: int(counts[i]) for i in np.flatnonzero(counts)},
        "per_scan": {sid: [int(r) for r in rois] for sid, rois in per_scan.items()},
    }


def log_missing(site: str, policy: str, per_scan: dict[str, list[int]], n_scans: int, roi_names: list[str]) -> None:
    """One line per site: how many scans had missing ROIs, which ROIs most often, and what was done."""
    if not per_scan:
        return
    s = missing_summary(per_scan, roi_names, n_scans)
    top = sorted(s["per_roi"].items(), key=lambda kv: -kv[1])[:5]
    action = {"mask": "kept, those ROIs masked", "skip_scan": "scans skipped"}.get(policy, policy)
    log.warning(
        "site %s: %d of %d scan(s) have missing (all-zero / constant / NaN) ROIs, %d ROI-scan pairs in all "
        "(%s); most often: %s",
        site,
        s["scans_with_missing"],
        n_scans,
        sum(len(v) for v in per_scan.values()),
        action,
        ", ".join(f"{k} ({v})" for k, v in top),
    )


def _list(idx: np.ndarray, k: int = 10) -> str:
    s = ", ".join(str(int(i)) for i in idx[:k])
    return s + (f", ... ({len(idx)} in all)" if len(idx) > k else "")
