"""The run folder's privacy report: `privacy.json` and `privacy.md`, rewritten after every round.

Per site: what its own accountant reported in its last reply (`brainjepa.federation.contract.Metric`:
epsilon spent and budget, delta, DP-SGD noise multiplier, clip norm, sampling rate, steps, rounds; a
site without DP-SGD reports none of them and shows as "no DP-SGD", epsilon infinite), and its last
status (a site out of budget declines). The run: central DP (parameters, privacy unit, epsilon so far)
and whether secure aggregation is on. Both files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from brainjepa.checkpoint import atomic_write_text
from brainjepa.federation.contract import Metric
from server.exchange import SiteResult

log = logging.getLogger(__name__)

JSON, MARKDOWN = "privacy.json", "privacy.md"
# reply metric -> report field
SITE_FIELDS = {
    Metric.EPSILON_SPENT: "epsilon",
    Metric.EPSILON_BUDGET: "epsilon_budget",
    Metric.DELTA: "delta",
    Metric.DP_NOISE_MULTIPLIER: "noise_multiplier",
    Metric.DP_MAX_GRAD_NORM: "clip_norm",
    Metric.DP_SAMPLE_RATE: "sample_rate",
    Metric.DP_STEPS: "steps",
    Metric.ROUNDS_DONE: "rounds",
}


def _num(v: float) -> float | int | str:
    """JSON-safe: integers as int, infinities as "inf"."""
    if math.isinf(v):
        return "inf"
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else v


class PrivacyReport:
    def __init__(self, run_dir: Path, secure_aggregation: bool) -> None:
        self.run_dir = run_dir
        self.secure_aggregation = secure_aggregation
        self.sites: dict[str, dict[str, object]] = {}
        self.central: dict[str, object] = {"enabled": False}
        self.rounds = 0
        old = run_dir / JSON
        if old.exists():  # a resumed run keeps what its sites reported so far
            prev = json.loads(old.read_text())
            self.sites = dict(prev.get("sites", {}))

    def update(self, rnd: int, results: Sequence[SiteResult], central: Mapping[str, object] | None) -> None:
        """Record round `rnd` (0-based): each replying site's figures, central DP's block; write both files."""
        for r in results:
            name = r.site or f"node-{r.node_id}"
            entry = self.sites.setdefault(name, {"site": name})
            entry.update({"last_round": rnd + 1, "status": r.status})
            if r.status != "ok":
                entry["detail"] = r.detail.splitlines()[-1][:300] if r.detail else ""
            metrics = r.update.metrics if r.update is not None else {}
            figures = {field: _num(metrics[key]) for key, field in SITE_FIELDS.items() if key in metrics}
            entry.update(figures)
            entry["dp_sgd"] = Metric.EPSILON_SPENT in metrics or bool(entry.get("dp_sgd"))
            if not entry["dp_sgd"]:
                entry["epsilon"] = "inf"
        self.central = dict(central) if central is not None else {"enabled": False}
        self.rounds = rnd + 1
        self.write()

    def to_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "secure_aggregation": self.secure_aggregation,
            "central_dp": self.central,
            "sites": dict(sorted(self.sites.items())),
        }

    def write(self) -> tuple[Path, Path]:
        data = self.to_dict()
        j = atomic_write_text(self.run_dir / JSON, json.dumps(data, indent=1) + "\n")
        m = atomic_write_text(self.run_dir / MARKDOWN, render(data))
        return j, m


def render(data: Mapping[str, object]) -> str:
    """privacy.md: the same figures as privacy.json, for a reader."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cols = [
        "site",
        "status",
        "dp_sgd",
        "epsilon",
        "epsilon_budget",
        "delta",
        "noise_multiplier",
        "clip_norm",
        "sample_rate",
        "steps",
        "rounds",
        "last_round",
    ]
    lines = [
        f"# Privacy report after round {data['rounds']}",
        "",
        "## Sites (their own accountants, as reported in their last reply)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    sites = data["sites"]
    assert isinstance(sites, dict)
    for entry in sites.values():
        lines.append("| " + " | ".join(fmt(entry.get(c)) for c in cols) + " |")
    central = data["central_dp"]
    assert isinstance(central, dict)
    lines += ["", "## Central DP (on the server)", ""]
    if central.get("enabled"):
        for key in (
            "privacy_unit",
            "noise_multiplier",
            "clip_norm",
            "delta",
            "weighting",
            "accountant",
            "rounds",
            "epsilon",
        ):
            lines.append(f"- {key.replace('_', ' ')}: {fmt(central.get(key))}")
        per_round = central.get("per_round") or []
        assert isinstance(per_round, list)
        if per_round:
            last = per_round[-1]
            clipped = last.get("sites_clipped")
            how = "clipped at the sites (secure aggregation)" if clipped is None else f"{clipped} clipped"
            lines.append(
                f"- last round: {last.get('sites_summed')} site(s) summed of {last.get('sampled')} sampled "
                f"(sampling rate {fmt(last.get('sample_rate'))}), {how}"
            )
    else:
        lines.append("- off")
    on = "on (Flower SecAgg+: the server saw only the sum of the updates)" if data["secure_aggregation"] else "off"
    lines += ["", "## Secure aggregation", "", f"- {on}", ""]
    return "\n".join(lines)
