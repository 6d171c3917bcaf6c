"""Finding a site's per-scan files: subject patterns, BIDS runs, and the participants rows they become.

Patterns use `{subject}` (the participants id as written, e.g. `sub-001`) and `{label}` (the id without a
leading `sub-`) and may hold `*` wildcards. One file per subject, unless `participants.runs: true`: then
every file of a subject whose name holds a BIDS `run-<label>` entity (`sub-01_task-rest_run-02_bold.nii.gz`)
is a scan of its own, a participants row `<subject>_run-<label>` with the subject's phenotypes, keyed to
the subject (the id column, or `participants.subject_column`) so that splits are drawn by subject.
The same run entity picks the run's confounds / FD file.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError, where
from sites.config import SiteConfig
from sites.participants import Participants, read_participants

RUN_ENTITY = re.compile(r"(?:^|_)run-([A-Za-z0-9]+)(?=[_.])")  # BIDS: ..._run-02_bold.nii.gz
RUN_ID = re.compile(r"^(?P<subject>.+)_run-(?P<run>[A-Za-z0-9]+)$")  # our row id of one run


def subject_label(sid: str) -> str:
    return sid[4:] if sid.startswith("sub-") else sid


def fill(pattern: str, sid: str) -> str:
    return pattern.replace("{subject}", sid).replace("{label}", subject_label(sid))


def run_of(name: str) -> str | None:
    """The BIDS run label of a file name ('02' for '..._run-02_bold.nii.gz'), None without one."""
    m = RUN_ENTITY.search(name)
    return m.group(1) if m else None


def _matches(root: Path, pattern: str, sid: str) -> list[Path]:
    rel = fill(pattern, sid)
    if glob.has_magic(rel):
        return sorted(root.glob(rel))
    p = root / rel
    return [p] if p.is_file() else []


def find_subject_file(root: Path, pattern: str, sid: str, key: str, cfg_file: Path, runs: bool = False) -> Path | None:
    """The one file matching `pattern` for scan `sid` under `root`; None when there is none. With `runs`,
    an id `<subject>_run-<label>` picks, among the subject's matches, the file of that run."""
    m = RUN_ID.match(sid) if runs else None
    hits = _matches(root, pattern, m.group("subject") if m else sid)
    if m:
        hits = [h for h in hits if run_of(h.name) == m.group("run")]
    if len(hits) > 1:
        hint = (
            "set 'participants.runs: true' (each run its own scan)"
            if not runs and any(run_of(h.name) for h in hits)
            else "make it specific (one file per scan)"
        )
        raise DataError(
            f"{where(cfg_file, key)}: pattern '{pattern}' matches {len(hits)} files for '{sid}' "
            f"({', '.join(h.name for h in hits[:4])}...): {hint}"
        )
    return hits[0] if hits else None


def discover_subjects(root: Path, pattern: str) -> dict[str, Path]:
    """Subject ids that have a file matching `pattern` under `root` (id as `{subject}` would be filled)."""
    glob_pat = re.sub(r"\*+", "*", re.sub(r"\{(subject|label)\}", "*", pattern))  # '{subject}*' -> one '*'

    rx = ""
    for part in re.split(r"(\{subject\}|\{label\}|\*|\?)", pattern):
        if part == "{subject}":
            rx += r"(?P<subject>[^/]+)" if "(?P<subject>" not in rx else r"(?P=subject)"
        elif part == "{label}":
            rx += r"(?P<label>[^/]+)" if "(?P<label>" not in rx else r"(?P=label)"
        elif part == "*":
            rx += r"[^/]*"
        elif part == "?":
            rx += r"[^/]"
        else:
            rx += re.escape(part)
    cre = re.compile(rx + r"\Z")
    found: dict[str, Path] = {}
    for p in root.glob(glob_pat):
        m = cre.match(p.relative_to(root).as_posix())
        if m:
            gd = m.groupdict()
            sid = gd.get("subject") or "sub-" + gd["label"]
            found[sid] = p
    return found


def scan_pattern(cfg: SiteConfig) -> tuple[str, str]:
    """(key, pattern) of the file that defines a site's scans: `data.bold` (NIfTI) or `data.file` (ROI)."""
    if cfg.data.format == "nifti":
        return "data.bold", cfg.data.bold
    return "data.file", cfg.data.file or ""


def subject_column(cfg: SiteConfig) -> str | None:
    """The participants column naming each row's subject (None: every row is its own subject)."""
    p = cfg.participants
    return p.subject_column or (p.id_column if p.runs else None)


def read_site_participants(cfg: SiteConfig, columns: tuple[str, ...] | None = None) -> Participants:
    """The site's participants rows, `participants.runs` expanded: one row per run file found (see module doc).
    `columns`: the phenotype columns that must exist (default: `participants.phenotypes`)."""
    p = cfg.participants
    parts = read_participants(p.file, p.id_column, p.phenotypes if columns is None else columns)
    if not p.runs:
        return parts
    key, pattern = scan_pattern(cfg)
    ids: list[str] = []
    rows: list[int] = []
    for i, sid in enumerate(parts.ids):
        hits = _matches(cfg.data.root, pattern, sid)
        labels = sorted({r for r in (run_of(h.name) for h in hits) if r is not None})
        if len(hits) > max(len(labels), 1):
            raise DataError(
                f"{where(cfg.source, key)}: '{sid}' has {len(hits)} files matching '{pattern}' for "
                f"{len(labels)} distinct run-<label> entities ({', '.join(h.name for h in hits[:4])}): "
                "with participants.runs every file must name its run"
            )
        scans = [f"{sid}_run-{r}" for r in labels] or [sid]
        ids += scans
        rows += [i] * len(scans)
    idx = np.array(rows, dtype=np.int64)
    cols = {c: v[idx] for c, v in parts.columns.items()}
    cols[p.id_column] = np.array([parts.ids[i] for i in rows], dtype=str)  # the row's participant id
    return dataclasses.replace(parts, ids=tuple(ids), columns=cols)
