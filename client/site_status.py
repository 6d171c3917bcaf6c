"""The site's part in the federation as its admin sees it (`brainjepa-client status`, and the client's exit).

After each round it answers, the ClientApp writes `<site output>/federation-status.json` (write-then-
rename): when, the task, the round and the run's round count, whether it was the run's final round for
this site (`final_round`: the last pretraining round, or a downstream run's test evaluation) and the
epsilon spent if the site trains with DP. `brainjepa-client` reads it after each reply Flower reports sent
to know that the run is over; `status_lines` adds the site's privacy ledger and whether the coordinator
answers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from brainjepa.errors import DataError
from client.probe import probe_coordinator
from sites.config import SiteConfig

if TYPE_CHECKING:
    from brainjepa.federation.contract import RoundSpec

# torch-free at import (the CLIs' --help must not load torch): the brainjepa modules below import it, so
# they are imported where used.

log = logging.getLogger(__name__)
STATUS_FILE = "federation-status.json"


def final_round(spec: RoundSpec) -> bool:
    """The run's last message to this site: its last pretraining round, or a downstream run's test scoring."""
    return (spec.task == "pretrain" and spec.round == spec.num_rounds - 1) or spec.split == "test"


def record_round(site: SiteConfig, spec: RoundSpec, metrics: Mapping[str, float]) -> None:
    """Write the status file; a site whose output folder is not writable only loses this (a warning)."""
    from brainjepa.checkpoint import atomic_write_text
    from brainjepa.federation.contract import Metric

    status = {
        "time": time.time(),
        "task": spec.task,
        "round": spec.round + 1,
        "num_rounds": spec.num_rounds,
        "final": final_round(spec),
        "epsilon_spent": metrics.get(Metric.EPSILON_SPENT),
    }
    try:
        atomic_write_text(site.output_dir / STATUS_FILE, json.dumps(status))
    except OSError as e:
        log.warning("federation status not written (%s)", e)


def read_status(site: SiteConfig) -> dict | None:
    """The last round's status, or None if the site has answered none (or the file is unreadable)."""
    try:
        return json.loads((site.output_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe(status: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["time"]))
    final = ", the run's final round for this site" if status.get("final") else ""
    return f"{status['task']} round {status['round']} of {status['num_rounds']} answered at {when}{final}"


def status_lines(site_yaml: Path, server: str | None, root_cert: Path | None) -> list[str]:
    """What `brainjepa-client status` prints: the site, its last round, its privacy ledger, the coordinator."""
    from brainjepa.config import load_site
    from brainjepa.privacy.budget import Ledger
    from brainjepa.privacy.session import ledger_path

    site, runtime = load_site(site_yaml)
    status = read_status(site)
    lines = [f"site '{site.site}' ({site_yaml})"]
    lines.append(f"last round: {describe(status) if status else 'none answered yet'}")
    privacy = runtime.privacy
    path = ledger_path(privacy, site_yaml, site.site)
    if not path.exists():
        lines.append(f"privacy ledger: none at {path} (no DP round recorded; privacy.enabled: {privacy.enabled})")
    else:
        try:
            ledger = Ledger.open(path, site.site)
            eps = ledger.epsilon(privacy.delta, privacy.accountant)
            budget = f" of the budget {privacy.target_epsilon}" if privacy.target_epsilon else ""
            lines.append(
                f"privacy ledger {path}: epsilon {eps:.3f}{budget} spent at delta {privacy.delta:g} "
                f"over {len(ledger.releases)} DP round(s) in {len({r.run for r in ledger.releases})} run(s)"
            )
        except DataError as e:
            lines.append(f"privacy ledger: {e}")
    if server is not None:
        why = probe_coordinator(server, root_cert)
        lines.append(f"coordinator {server}: {'answers' if why is None else f'does not answer: {why}'}")
    return lines
