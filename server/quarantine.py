"""Sites the coordinator no longer asks: each rejected update (or a round rolled back for it) quarantines
its site, for `quarantine-rounds` rounds or the rest of the run.

A site is quarantined by name (its registered name when a sites file is in use, else the name it
reported) and by SuperNode id: quarantined nodes are not sampled, and a reply under a quarantined name
is refused. The list is `quarantine.json` in the run folder (owner-only, written then renamed), so a
resumed run keeps it: a hostile site cannot halt the run again by being asked again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brainjepa.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

FILE = "quarantine.json"


@dataclass
class Entry:
    round: int  # 1-based round in which the site was quarantined
    until: int  # the last 1-based round it sits out (0: the rest of the run)
    reason: str
    nodes: list[int] = field(default_factory=list)


class Quarantine:
    def __init__(self, run_dir: Path, rounds: int) -> None:
        self.path, self.rounds = run_dir / FILE, rounds
        self.entries: dict[str, Entry] = {}
        if self.path.exists():
            raw = json.loads(self.path.read_text())
            self.entries = {site: Entry(**e) for site, e in raw["sites"].items()}

    def add(self, site: str, node: int, rnd: int, reason: str) -> None:
        """Quarantine `site` (node `node`) from 1-based round `rnd` on."""
        until = rnd + self.rounds if self.rounds else 0
        entry = self.entries.setdefault(site, Entry(rnd, until, reason))
        entry.round, entry.until, entry.reason = rnd, until, reason
        if node not in entry.nodes:
            entry.nodes.append(node)
        self._save()
        how_long = f"until round {until}" if until else "for the rest of the run"
        log.warning("site %s (node %d) quarantined %s: %s", site, node, how_long, reason)

    def _active(self, rnd: int) -> dict[str, Entry]:
        return {s: e for s, e in self.entries.items() if e.until == 0 or rnd <= e.until}

    def nodes(self, rnd: int) -> frozenset[int]:
        """Node ids not to sample in 1-based round `rnd`."""
        return frozenset(n for e in self._active(rnd).values() for n in e.nodes)

    def names(self, rnd: int) -> list[str]:
        return sorted(self._active(rnd))

    def holds(self, site: str, rnd: int) -> str | None:
        """Why a reply under `site`'s name is refused in 1-based round `rnd`, or None."""
        e = self._active(rnd).get(site)
        return f"site quarantined since round {e.round}: {e.reason}" if e is not None else None

    def _save(self) -> None:
        text = json.dumps({"sites": {s: asdict(e) for s, e in self.entries.items()}}, indent=1)
        atomic_write_text(self.path, text)
        os.chmod(self.path, 0o600)
