"""Where a result came from, and how often its test data has been looked at.

`provenance.json` (written by `brainjepa evaluate` beside every report): the git commit and whether the
tree was dirty, the protocol's hash and the resolved protocol (every default filled in), the command line,
the versions of the packages the numbers depend on, and a fingerprint of every site's data (its loaded
series, its split assignment and, for generated sites, the generator's record).

The scoring ledger: one JSON line per scoring of a protocol's test data (protocol hash + the test splits'
fingerprint). `brainjepa evaluate` refuses to score the same protocol on the same test data a second time
unless told to (`--rescore`, recorded as such), and reports how often the test data was scored before by
other protocols: a number a reader should see beside a table.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from brainjepa.downstream.config import ScoreOn
from brainjepa.downstream.protocol import Protocol
from brainjepa.downstream.validation_scoring import READ_SPLITS
from sites.cohort import SiteSeries, load_site_series

log = logging.getLogger(__name__)

PACKAGES = ("brainjepa", "torch", "numpy", "scipy", "scikit-learn", "nilearn", "brainspace", "nibabel", "flwr")
LEDGER_ENV = "BRAINJEPA_LEDGER"


def default_ledger() -> Path:
    """$BRAINJEPA_LEDGER, else $XDG_STATE_HOME (or ~/.local/state)/brainjepa/scored.jsonl."""
    if os.environ.get(LEDGER_ENV):
        return Path(os.environ[LEDGER_ENV])
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "brainjepa" / "scored.jsonl"


def git_state(where: Path, ledger: Path | None = None) -> dict[str, object]:
    """{"commit": sha or None, "dirty": bool or None} of the git work tree holding `where`; changes to the
    scoring ledger itself (kept in the repository, written by every evaluation) do not count."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    spec = ["--", "."] + ([f":(exclude){ledger.resolve()}"] if ledger is not None else [])
    status = git("status", "--porcelain", "--untracked-files=no", *spec) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def series_fingerprint(series: SiteSeries, split: str | None = None) -> str:
    """sha256 over the subject ids, their splits and their loaded (R, L) series (float32 bytes), in load
    order; `split`: only that split's scans."""
    h = hashlib.sha256()
    for sid, s, x in zip(series.subject_ids, series.splits, series.series, strict=True):
        if split is not None and s != split:
            continue
        h.update(f"{sid}\0{s}\0{x.shape}\0".encode())
        h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return h.hexdigest()


def site_record(series: SiteSeries, scored: str = "test") -> dict[str, object]:
    """A site's data fingerprint for provenance.json: scan counts per split, all data (as loaded), the
    scored split (`<scored>_sha256`: the test split, or the validation split of a validation scoring), and
    the generator's record (synth.json) for a generated site."""
    from sites.synth import read_generator_record

    counts = {str(k): int(v) for k, v in zip(*np.unique(series.splits, return_counts=True), strict=True)}
    return {
        "site": series.site,
        "config": str(series.source),
        "scans": counts,
        "sha256": series_fingerprint(series),
        f"{scored}_sha256": series_fingerprint(series, scored),
        "generator": read_generator_record(Path(series.source).parent),
    }


def data_record(cohorts: list[Protocol], model_tr: float, score_on: ScoreOn = "test") -> tuple[dict, str]:
    """Every read site's fingerprint (`site_record`) and the scored splits' combined fingerprint. On the test
    split: every site of every experiment, all splits; on validation: the pretraining and fine-tuning
    sites' training and validation subjects only (sites that only test are not read)."""
    on_test = score_on == "test"
    split, key = (None, "test") if on_test else (READ_SPLITS, "val")
    data, prints = {}, []
    for cp in cohorts:
        scored = {s for e in cp.experiments for s in (e.test if on_test else e.finetune)}
        read = [s for e in cp.experiments for s in (*e.pretrain, *e.finetune, *(e.test if on_test else ()))]
        for name in dict.fromkeys(read):
            site = site_record(load_site_series(cp.site_config(name), model_tr, split=split), key)
            data[f"{cp.cohort or '-'}/{name}"] = site
            if name in scored:
                prints.append(site[f"{key}_sha256"])
    return data, combined(prints)


def combined(fingerprints: list[str]) -> str:
    return hashlib.sha256("\0".join(sorted(fingerprints)).encode()).hexdigest()


@dataclass(frozen=True)
class ScoringLedger:
    """The JSON-lines record of every scoring of a protocol's test data."""

    path: Path

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for i, line in enumerate(self.path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}, line {i + 1}: not a ledger entry (JSON): {e}") from e
        return out

    def prior(self, test_data: str) -> list[dict]:
        """Earlier scorings of this test data (any protocol)."""
        return [e for e in self.entries() if e.get("test_data") == test_data]

    def record(self, entry: dict) -> None:
        """Append one entry: under an exclusive lock (two evaluations may run at once), written to a
        temporary file and renamed (a crash never leaves half a ledger)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            text = self.path.read_text() if self.path.is_file() else ""
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(text + json.dumps(entry, sort_keys=True) + "\n")
            os.replace(tmp, self.path)


def _where(out_dir: Path, ledger: ScoringLedger) -> str:
    """The output folder as the ledger records it: relative to the ledger's folder when inside it (a ledger
    kept in a repository stays valid in every clone)."""
    out, root = Path(out_dir).resolve(), ledger.path.resolve().parent
    return str(out.relative_to(root)) if out.is_relative_to(root) else str(out)


class AlreadyScored(RuntimeError):
    """The protocol's test data was scored before, and `--rescore` was not given."""


def check_and_record(ledger: ScoringLedger, protocol: str, test_data: str, out_dir: Path, rescore: bool) -> dict:
    """Refuse a second scoring of (protocol, test data) unless `rescore`; record that this one started.
    Returns what provenance.json says about it: earlier completed scorings by this protocol and by others.
    A run that stopped before writing its tables (it showed no test number) does not count."""
    prior = [e for e in ledger.prior(test_data) if e.get("completed")]
    same = [e for e in prior if e.get("protocol") == protocol]
    if same and not rescore:
        when = ", ".join(f"{e.get('time')} -> {e.get('out_dir')}" for e in same)
        raise AlreadyScored(
            f"this protocol (sha256 {protocol[:12]}) already scored this test data ({when}); a second "
            f"look at a test split is a choice made on it. Pass --rescore to score it again (recorded "
            f"in provenance.json), or use new test data. Scoringledger: {ledger.path}"
        )
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    ledger.record(
        {
            "protocol": protocol,
            "test_data": test_data,
            "time": now,
            "out_dir": _where(out_dir, ledger),
            "rescore": bool(same),
            "completed": False,
        }
    )
    return {
        "ledger": str(ledger.path),
        "rescore": bool(same),
        "times_scored_before_by_this_protocol": len(same),
        "times_scored_before_by_other_protocols": len(prior) - len(same),
    }


def completed(ledger: ScoringLedger, protocol: str, test_data: str, out_dir: Path) -> bool:
    """Whether the ledger records this scoring's tables as written."""
    where = _where(out_dir, ledger)
    return any(
        e.get("completed") and e.get("protocol") == protocol and e.get("out_dir") == where
        for e in ledger.prior(test_data)
    )


def mark_completed(ledger: ScoringLedger, protocol: str, test_data: str, out_dir: Path) -> None:
    """Record that the scoring's tables were written: from now on a second one needs `--rescore`."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    ledger.record(
        {
            "protocol": protocol,
            "test_data": test_data,
            "time": now,
            "out_dir": _where(out_dir, ledger),
            "completed": True,
        }
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_provenance(path: Path, record: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def base_record(protocol_hash: str, protocol: dict, repo: Path, ledger: Path | None = None) -> dict:
    return {
        "protocol_sha256": protocol_hash,
        "protocol": protocol,
        "git": git_state(repo, ledger),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
