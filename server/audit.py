"""The run's audit log: `audit.jsonl` in the run folder, one JSON object per line, owner-only (0600).

Events: `start` (run config, the registered sites with their key fingerprints), `round` (each site's
node id, registered name and key fingerprint, status and the reason of a rejection or failure), and
`checkpoint` (round, file, SHA-256), `quarantine` (round, site, node id, reason) and `rollback` (round,
reason, the site blamed). Appended, never rewritten: a resumed run adds to the same file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.exchange import SiteResult
from server.registry import RegisteredSite
from sites.manifest import file_sha256


class AuditLog:
    def __init__(self, run_dir: Path, registry: Mapping[int, RegisteredSite] | None) -> None:
        self.path = run_dir / "audit.jsonl"
        self.registry = registry or {}

    def _write(self, event: str, **fields: object) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}, default=str)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")

    def start(self, run_config: Mapping[str, object], start_round: int) -> None:
        sites = {
            str(n): {"site": r.site, "fingerprint": r.fingerprint, "max_samples": r.max_samples}
            for n, r in self.registry.items()
        }
        self._write("start", start_round=start_round, registered_sites=sites, run_config=dict(run_config))

    def round(self, rnd: int, task: str, results: Sequence[SiteResult]) -> None:
        rows = []
        for r in results:
            reg = self.registry.get(r.node_id)
            rows.append(
                {
                    "node_id": r.node_id,
                    "site": r.site or (reg.site if reg else ""),
                    "fingerprint": reg.fingerprint if reg else "",
                    "status": r.status,
                    "samples": r.update.num_examples if r.update is not None else 0,
                    "reason": r.detail.splitlines()[-1][:500] if r.detail and r.status != "ok" else "",
                }
            )
        self._write("round", round=rnd, task=task, sites=rows)

    def event(self, event: str, **fields: object) -> None:
        """Any other event (`quarantine`, `rollback`: see `server.guard`)."""
        self._write(event, **fields)

    def checkpoint(self, rnd: int, path: Path) -> None:
        self._write("checkpoint", round=rnd, file=str(path), sha256=file_sha256(path))
