"""`participants.tsv` (BIDS): one row per subject, an id column and phenotype columns."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError, where

MISSING = ("", "n/a", "na", "nan")


@dataclass(frozen=True)
class Participants:
    ids: tuple[str, ...]
    columns: dict[str, np.ndarray]  # column -> (N,) float64 (numeric, NaN = missing) or str array
    source: Path

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise DataError(f"{where(self.source, name)}: no such column; columns are {', '.join(self.columns)}")
        return self.columns[name]


def _as_array(values: list[str]) -> np.ndarray:
    present = [v for v in values if v.strip().lower() not in MISSING]
    try:
        [float(v) for v in present]
    except ValueError:
        return np.array(values, dtype=str)
    return np.array([float(v) if v.strip().lower() not in MISSING else np.nan for v in values], dtype=np.float64)


def read_participants(
    path: str | Path, id_column: str = "participant_id", columns: tuple[str, ...] = ()
) -> Participants:
    """Read a tab-separated participants file; `columns` (phenotypes) must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where(path)}: participants file does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise DataError(f"{where(path)}: participants file is empty (expected a header row)")
    header = [h.strip() for h in rows[0]]
    if id_column not in header:
        raise DataError(
            f"{where(path, id_column)}: id column not found; header is {header} (is the file tab-separated?)"
        )
    for c in columns:
        if c not in header:
            raise DataError(f"{where(path, c)}: phenotype column not found; header is {header}")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise DataError(f"{where(path)}: row {i + 2} has {len(r)} fields, the header has {len(header)}")
    cols = {h: [r[j].strip() for r in body] for j, h in enumerate(header)}
    ids = cols[id_column]
    if any(not s for s in ids):
        raise DataError(f"{where(path, id_column)}: empty subject id in row {ids.index('') + 2}")
    seen: set[str] = set()
    for s in ids:
        if s in seen:
            raise DataError(f"{where(path, id_column)}: subject id '{s}' appears more than once")
        seen.add(s)
    out = {h: _as_array(v) for h, v in cols.items() if h != id_column}
    return Participants(ids=tuple(ids), columns=out, source=path)


def write_participants(
    path: str | Path, ids: list[str], columns: dict[str, np.ndarray], id_column: str = "participant_id"
) -> Path:
    """Write a participants.tsv (numbers with 6 significant digits, NaN as n/a), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fmt(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:.6g}"
        return str(v)

    lines = ["\t".join([id_column, *columns])]
    for i, s in enumerate(ids):
        lines.append("\t".join([s, *(fmt(columns[c][i]) for c in columns)]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
