"""The site's privacy report (JSON + Markdown), next to its ledger, rewritten after every DP round."""

from __future__ import annotations

import json
import os
from pathlib import Path

from brainjepa.config import PrivacyConfig
from brainjepa.privacy.budget import Ledger


def summary(ledger: Ledger, cfg: PrivacyConfig) -> dict:
    """Epsilon spent over the whole ledger and per federation run, with each run's DP parameters."""
    runs = {}
    for r in ledger.releases:
        run = runs.setdefault(
            r.run,
            {
                "rounds": 0,
                "steps": 0,
                "tasks": set(),
                "noise_multiplier": set(),
                "sample_rate": set(),
                "max_grad_norm": set(),
            },
        )
        run["rounds"] += 1
        run["steps"] += r.steps
        run["tasks"].add(r.task)
        run["noise_multiplier"].add(round(r.noise_multiplier, 6))
        run["sample_rate"].add(round(r.sample_rate, 6))
        run["max_grad_norm"].add(r.max_grad_norm)
    for key, run in runs.items():
        run.update({k: sorted(v) for k, v in run.items() if isinstance(v, set)})
        run["epsilon"] = ledger.epsilon(cfg.delta, cfg.accountant, run=key)
    return {
        "site": ledger.site,
        "unit": "subject",
        "accountant": cfg.accountant,
        "delta": cfg.delta,
        "target_epsilon": cfg.target_epsilon,
        "epsilon_spent": ledger.epsilon(cfg.delta, cfg.accountant),
        "rounds": len(ledger.releases),
        "steps": sum(r.steps for r in ledger.releases),
        "max_grad_norm": cfg.max_grad_norm,
        "ledger": str(ledger.path),
        "runs": runs,
    }


def markdown(s: dict) -> str:
    lines = [
        f"# Privacy report: site {s['site']}",
        "",
        f"- guarantee: ({s['epsilon_spent']:.3f}, {s['delta']:g})-differential privacy per **{s['unit']}** "
        f"(budget epsilon {s['target_epsilon']}, accountant {s['accountant'].upper()}, Opacus)",
        f"- DP-SGD: {s['rounds']} rounds, {s['steps']} steps; clip norm {s['max_grad_norm']}",
        f"- ledger: `{s['ledger']}`",
        "",
        "| federation run | tasks | rounds | steps | noise multiplier | sampling rate | clip norm | epsilon (run alone) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in s["runs"].items():
        lines.append(
            f"| `{key}` | {', '.join(r['tasks'])} | {r['rounds']} | {r['steps']} | "
            f"{', '.join(f'{v:.4g}' for v in r['noise_multiplier'])} | "
            f"{', '.join(f'{v:.4g}' for v in r['sample_rate'])} | "
            f"{', '.join(f'{v:g}' for v in r['max_grad_norm'])} | {r['epsilon']:.3f} |"
        )
    lines += [
        "",
        "The total epsilon composes every run of the ledger (one accountant over everything this site's "
        "data has trained); each run's own epsilon is shown for reference.",
    ]
    return "\n".join(lines) + "\n"


def write_report(ledger: Ledger, cfg: PrivacyConfig) -> tuple[Path, Path]:
    """`<ledger stem>-report.json` and `.md` next to the ledger (each write-then-rename)."""
    s = summary(ledger, cfg)
    out = []
    for suffix, text in ((".json", json.dumps(s, indent=1)), (".md", markdown(s))):
        path = ledger.path.with_name(ledger.path.stem + "-report" + suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        out.append(path)
    return out[0], out[1]
