"""Write experiments/transport/ (results.csv, provenance.json) from `transport_bench.py` rows; print the table
(for the folder's hand-written report.md).

    python scripts/transport_report.py transport_bench.jsonl --out experiments/transport --machine "..."

Per row: the measured round (ServerApp push to last reply decoded, the fastest of its rounds), the share of
a 50-step round it would be next to the compute figure (ViT-B: the reference implementation measured on
an H200, ~56 samples/s at batch 16 in bf16, so 50 steps x 16 samples = 14.3 s), and the line-rate floor
(both directions' bytes at the link rate, plus one RTT per request the SuperNode made in the round).
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Annotated

import typer

COMPUTE_S = {"vit-b": 50 * 16 / 56.0}  # the reference implementation measured on an H200 (ViT-B, 450 x 160)
FIELDS = [
    "model",
    "wire",
    "bandwidth_mbit",
    "rtt_ms",
    "mb_per_site_per_direction",
    "round_s",
    "requests_per_round",
    "line_rate_floor_s",
    "compute_s",
    "comm_share",
    "peak_superlink_mb",
    "peak_serverapp_mb",
    "peak_coordinator_mb",
    "peak_all_mb",
    "verified_sites",
]


def row(r: dict) -> dict:
    fastest = min(range(len(r["roundtrip_s"])), key=lambda i: r["roundtrip_s"][i])
    round_s = r["roundtrip_s"][fastest]
    requests = r["requests_per_round"][fastest]
    mb = r["mb_per_direction_per_site"]
    bw = r["bandwidth_mbit"]
    floor = (2 * mb * 8 / bw if bw > 0 else 0.0) + requests * r["rtt_ms"] / 1000
    compute = COMPUTE_S.get(r["model"])
    peak = r["peak_rss_mb"]
    coordinator = peak.get("flower-superlink", 0) + peak.get("flwr-serverapp", 0)
    return {
        "model": r["model"],
        "wire": r["wire_dtype"],
        "bandwidth_mbit": f"{bw:g}",
        "rtt_ms": f"{r['rtt_ms']:g}",
        "mb_per_site_per_direction": f"{mb:.1f}",
        "round_s": f"{round_s:.1f}",
        "requests_per_round": requests,
        "line_rate_floor_s": f"{floor:.1f}",
        "compute_s": f"{compute:.1f}" if compute else "",
        "comm_share": f"{round_s / (round_s + compute):.2f}" if compute else "",
        "peak_superlink_mb": f"{peak.get('flower-superlink', 0):.0f}",
        "peak_serverapp_mb": f"{peak.get('flwr-serverapp', 0):.0f}",
        "peak_coordinator_mb": f"{coordinator:.0f}",
        "peak_all_mb": f"{peak.get('all', 0):.0f}",
        "verified_sites": r["verified_sites"],
    }


def main(
    results: Annotated[Path, typer.Argument(help="transport_bench.py's JSON lines")],
    out: Annotated[Path, typer.Option(help="the experiment folder")] = Path("experiments/transport"),
    machine: Annotated[str, typer.Option(help="where it was measured, for the report")] = "",
) -> None:
    raw = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [row(r) for r in raw if "roundtrip_s" in r]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    protocol = {
        "name": "transport",
        "description": "What does a federated round cost on a modelled WAN? ViT-S / ViT-B weight sets over "
        "Flower's real transport (SuperLink + 2 SuperNodes), each site on its own shaped link with added "
        "round-trip time, float32 / float16 / int8 on the wire; seconds per round, share of a 50-step round, "
        "coordinator memory.",
        "compute_s": COMPUTE_S,
        "machine": machine,
    }
    sha = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()
    provenance = {"protocol": protocol, "protocol_sha256": sha, "git": {"commit": git, "dirty": dirty}}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    head = "| " + " | ".join(FIELDS) + " |\n|" + "---|" * len(FIELDS) + "\n"
    table = head + "".join("| " + " | ".join(str(r[k]) for k in FIELDS) + " |\n" for r in rows)
    typer.echo(table)


if __name__ == "__main__":
    typer.run(main)
