"""Frame censoring ("scrubbing") by framewise displacement (FD), applied when a site's series are loaded.

With `preprocess.scrub_fd: T` (mm), every frame whose FD exceeds T is censored. FD comes per scan from
`preprocess.fd_file` (a per-subject pattern: a one-column TSV/CSV/.npy of FD per frame at the site TR,
or any table with a `preprocess.fd_column` column) or, for NIfTI sites without one, from the confounds
TSV's `fd_column` (fMRIPrep's `framewise_displacement`; the first frame's FD is `n/a` there and is kept).
A window must never span a censored gap, so a censored scan is cut down to its longest contiguous
stretch of kept frames; shorter stretches are dropped too, and everything removed is counted.
Resampling to the model TR happens afterwards, on the kept stretch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError, where
from sites.roi_io import read_text_table

log = logging.getLogger(__name__)

NA_MARKERS = ("", "n/a", "na", "nan")


def read_fd(path: Path, column: str) -> np.ndarray:
    """(L,) float64 framewise displacement per frame (NaN where not defined, e.g. fMRIPrep's first frame)."""
    if path.name.lower().endswith(".npy"):
        try:
            fd = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{where(path)}: cannot read the framewise-displacement array: {e}") from e
        fd = np.asarray(fd, dtype=np.float64)
        if fd.ndim == 2 and 1 in fd.shape:
            fd = fd.ravel()
        if fd.ndim != 1:
            raise DataError(f"{where(path)}: expected a 1-D array of FD per frame, got shape {fd.shape}")
        return fd
    import pandas as pd  # comes with nilearn

    sep = "\t" if ".tsv" in path.name.lower() else ","
    df = read_text_table(path, sep, "framewise-displacement table")
    first = [str(v).strip() for v in df.iloc[0]]
    has_header = any(
        v.lower() not in NA_MARKERS and pd.to_numeric(pd.Series([v]), errors="coerce").isna().all() for v in first
    )
    if has_header:
        df = df.iloc[1:].set_axis(first, axis=1)
        if column in df.columns:
            cells = df[column]
        elif df.shape[1] == 1:
            cells = df.iloc[:, 0]
        else:
            raise DataError(f"{where(path, column)}: no FD column '{column}' (preprocess.fd_column); have {first[:8]}")
    elif df.shape[1] == 1:
        cells = df.iloc[:, 0]
    else:
        raise DataError(
            f"{where(path)}: expected one column of FD per frame or a header naming '{column}', "
            f"got {df.shape[1]} columns without a header"
        )
    cells = cells.astype(str).str.strip()
    fd = pd.to_numeric(cells.mask(cells.str.lower().isin(NA_MARKERS), "nan"), errors="coerce").to_numpy()
    bad = np.flatnonzero(np.isnan(fd) & ~cells.str.lower().isin(NA_MARKERS).to_numpy())
    if bad.size:
        raise DataError(f"{where(path, column)}: non-numeric FD value {cells.iloc[bad[0]]!r} at frame {bad[0]}")
    return fd.astype(np.float64)


def keep_mask(fd: np.ndarray, threshold: float) -> np.ndarray:
    """(L,) bool: True for frames kept (FD <= threshold, or FD undefined), False for censored ones."""
    return ~(np.asarray(fd, dtype=np.float64) > threshold)  # NaN > T is False: an undefined FD is kept


def longest_run(keep: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of True in `keep` (the first one on ties); (0, 0) when none."""
    padded = np.concatenate([[False], np.asarray(keep, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))  # starts at even, stops at odd positions
    if edges.size == 0:
        return 0, 0
    starts, stops = edges[0::2], edges[1::2]
    i = int(np.argmax(stops - starts))
    return int(starts[i]), int(stops[i])


def censor(x: np.ndarray, fd: np.ndarray, threshold: float, fd_path: Path, sid: str) -> tuple[np.ndarray, dict]:
    """The longest uncensored stretch of `x` (R, L) -> ((R, L_kept), counts).

    counts: `frames` (L), `censored` (FD > threshold), `kept` (frames of the stretch kept); frames removed
    = frames - kept (censored ones plus the shorter uncensored stretches)."""
    n = x.shape[1]
    if fd.shape[0] != n:
        raise DataError(
            f"{where(fd_path)}: has FD for {fd.shape[0]} frames but subject '{sid}''s series has {n} frames "
            "(expected one FD value per frame at the site TR)"
        )
    keep = keep_mask(fd, threshold)
    start, stop = longest_run(keep)
    counts = {"frames": int(n), "censored": int(n - keep.sum()), "kept": int(stop - start)}
    return np.ascontiguousarray(x[:, start:stop]), counts


def log_censoring(site: str, threshold: float, counts: dict[str, dict]) -> None:
    """One line per site: frames censored (and removed with the shorter stretches), in how many scans."""
    total = sum(c["frames"] for c in counts.values())
    cens = sum(c["censored"] for c in counts.values())
    removed = sum(c["frames"] - c["kept"] for c in counts.values())
    scans = sum(1 for c in counts.values() if c["censored"])
    pct = 100.0 * cens / total if total else 0.0
    log.info(
        "site %s: censored %d frames (%.1f %%) in %d scans at FD > %g mm; %d frames removed in all "
        "(censored + shorter uncensored stretches; the longest stretch of each scan is kept)",
        site,
        cens,
        pct,
        scans,
        threshold,
        removed,
    )
