"""Reading and writing per-subject ROI time-series files (.npy, .csv, .csv.gz, .tsv).

In memory a series is always float32 (R, L): ROIs in rows, frames in columns. On disk the
orientation is declared by the site (`rois_x_time` or `time_x_rois`). CSV files may carry a header
row and/or a label column (the reference UKB layout: first column `label_name`, one row per ROI,
then one column per frame): both are detected and dropped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError, where

log = logging.getLogger(__name__)

ROI_SUFFIXES = (".npy", ".csv", ".csv.gz", ".tsv", ".tsv.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(ROI_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix


def read_text_table(path: Path, sep: str, what: str = "table"):  # -> pandas.DataFrame of str cells
    """A delimited text file as a DataFrame of strings (no header parsing, no NA conversion)."""
    import pandas as pd  # comes with nilearn

    try:
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where(path)}: cannot read as a delimited text table: {e}") from e
    if df.empty:
        raise DataError(f"{where(path)}: the {what} is empty")
    return df


def _read_table(path: Path, sep: str, header: bool | None = None) -> np.ndarray:
    import pandas as pd  # comes with nilearn

    df = read_text_table(path, sep)

    def numeric(values) -> np.ndarray:
        return pd.to_numeric(
            pd.Series(values).str.strip().replace({"n/a": "nan", "NA": "nan", "": "nan"}), errors="coerce"
        ).to_numpy()

    first_col = numeric(df.iloc[1:, 0].to_numpy())
    if df.shape[0] > 1 and df.shape[1] > 1 and np.isnan(first_col).all():  # label column (ROI or frame names)
        df = df.iloc[:, 1:]
    if header is None:  # auto: a first row with any non-numeric cell is a header
        header = df.shape[0] > 1 and bool(np.isnan(numeric(df.iloc[0].to_numpy())).any())
    if header:
        df = df.iloc[1:]
    cells = df.to_numpy(dtype=str)
    try:
        return np.char.strip(cells).astype(np.float64)
    except ValueError:
        vals = numeric(cells.ravel()).reshape(cells.shape)
        bad = np.isnan(vals) & ~np.isin(np.char.lower(np.char.strip(cells)), ["nan", "n/a", "na", ""])
        if not bad.any():
            return vals  # only missing-value markers: reported as NaN by check_series
        i, j = np.argwhere(bad)[0]
        raise DataError(
            f"{where(path)}: non-numeric value {str(cells[i, j])!r} at data row {i + 1}, column {j + 1}"
        ) from None


def read_roi_file(
    path: str | Path,
    orientation: str = "rois_x_time",
    n_rois: int | None = None,
    check: bool = True,
    csv_header: bool | None = None,
) -> np.ndarray:
    """Read one subject's ROI series as float32 (R, L).

    CSV/TSV: a first column of non-numeric labels is dropped; `csv_header` True/False says whether
    the first row holds column names (None: detected, a row with any non-numeric cell).
    `n_rois`, when given, must match. With `check`, NaN/Inf values and constant (e.g. all-zero)
    ROIs are errors naming the file and the ROI indices.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where(path)}: ROI series file does not exist")
    suffix = _suffix(path)
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{where(path)}: not a readable .npy array: {e}") from e
    elif suffix in (".csv", ".csv.gz"):
        x = _read_table(path, ",", csv_header)
    elif suffix in (".tsv", ".tsv.gz"):
        x = _read_table(path, "\t", csv_header)
    else:
        raise DataError(f"{where(path)}: unsupported ROI file type '{suffix}', expected one of {ROI_SUFFIXES}")
    if x.ndim != 2:
        raise DataError(f"{where(path)}: expected a 2-D ROI series ({orientation}), got shape {x.shape}")
    if orientation == "time_x_rois":
        x = x.T
    elif orientation != "rois_x_time":
        raise DataError(f"{where(path)}: unknown orientation '{orientation}'")
    x = np.ascontiguousarray(x, dtype=np.float32)  # (R, L)
    if n_rois is not None and x.shape[0] != n_rois:
        raise DataError(
            f"{where(path)}: has {x.shape[0]} ROIs ({orientation}, shape {x.shape}) but the site's ROI layout "
            f"declares {n_rois}; check 'data.orientation' and 'rois'"
        )
    if check:
        check_series(x, path)
    return x


def check_series(x: np.ndarray, path: object) -> None:
    """Reject NaN/Inf values and constant (including all-zero) ROIs, naming the ROI indices."""
    finite = np.isfinite(x)
    if not finite.all():
        rois = np.flatnonzero(~finite.all(axis=1))
        raise DataError(f"{where(path)}: NaN or Inf values in ROI(s) {_list(rois)} (0-based, of {x.shape[0]})")
    const = np.ptp(x, axis=1) == 0
    if const.any():
        rois = np.flatnonzero(const)
        zero = bool(np.all(x[rois] == 0))
        kind = "all-zero" if zero else "constant"
        raise DataError(
            f"{where(path)}: {kind} ROI(s) {_list(rois)} (0-based, of {x.shape[0]}): an empty atlas label or "
            "a region outside the brain mask; fix the atlas/data or drop the subject"
        )


def _list(idx: np.ndarray, k: int = 10) -> str:
    s = ", ".join(str(int(i)) for i in idx[:k])
    return s + (f", ... ({len(idx)} in all)" if len(idx) > k else "")


def read_roi_dir(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """Every `*.npy` (R, L) file of a folder, sorted by name: (float32 series, subject ids = file stems)."""
    path = Path(path)
    files = sorted(path.glob("*.npy"))
    if not files:
        raise DataError(f"data folder '{path}': no .npy ROI-series files found")
    series = []
    for f in files:
        x = np.load(f).astype(np.float32)
        if x.ndim != 2:
            raise DataError(f"'{f}': expected a 2-D ROI x time array, got shape {x.shape}")
        check_series(x, f)
        series.append(x)
    return series, [f.stem for f in files]


def write_roi_npy(path: str | Path, x: np.ndarray) -> Path:
    """Write a float32 (R, L) series atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(x, dtype=np.float32))
    tmp.replace(path)
    return path
