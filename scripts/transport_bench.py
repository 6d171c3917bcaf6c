"""What one federated round costs on Flower's real transport: time, bytes, memory.

Starts a real SuperLink and N SuperNodes (separate processes, loopback), runs the app in
`scripts/transport_bench_app` (ServerApp sends ViT-sized random weight sets for Brain-JEPA's encoder,
predictor and EMA target to every SuperNode, each sends them back changed) and samples the resident memory
of every Flower process from /proc while it runs.

    python scripts/transport_bench.py --model vit-b --chunk-mib 5 --chunk-mib 64 --wire-dtype float16

Each (model, wire dtype, chunk size, database, bandwidth) combination is one fresh federation. Results
are appended to a JSON-lines file and printed as a Markdown table.

A modelled WAN (`scripts/wan.py`): `--bandwidth-mbit 100` gives each site its own 100 Mbit/s link each
way (kernel HTB shaping inside a private network namespace the bench re-executes itself in), `--rtt-ms
40` adds 40 ms of round-trip time (a delaying relay per site); only SuperNode <-> SuperLink traffic is
shaped and delayed, and the relay counts that hop's HTTP requests per round.

    python scripts/transport_bench.py --model vit-b --wire-dtype int8 --bandwidth-mbit 100 --rtt-ms 40

`--proxy-overhead` measures instead what the coordinator's Fleet proxy (`server/fleet_proxy.py`) adds to
one Fleet request: a real SuperLink (TLS, SuperNode authentication on) and the proxy in front of it, and
one keep-alive HTTPS client (httpx, as a SuperNode) sending signed `activate-node` requests alternately
straight to the SuperLink and through the proxy; it reports the medians, the median of the paired
differences and the proxy's CPU time per request (from /proc).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from wan import Relay, reexec_in_netns, shape_links

from brainjepa.federation.launcher import LocalFederation, TlsFiles, flower_env, superlink_command, supernode_command
from brainjepa.federation.processes import ManagedProcess, descendants, free_port, start_process, wait_for_port
from brainjepa.federation.tls import make_ca, make_server_cert, make_supernode_key
from server.fleet_front import proxy_command, write_nginx_config

APP_DIR = Path(__file__).resolve().parent / "transport_bench_app"
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("transport_bench")


def _proc_table() -> dict[int, tuple[int, str, int, float]]:
    """pid -> (ppid, command name, RSS bytes, CPU seconds) for every process we can read."""
    table: dict[int, tuple[int, str, int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            statm = Path(entry.path, "statm").read_text().split()
            cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = " ".join(c.decode(errors="replace").rsplit("/", 1)[-1] for c in cmdline[:2])
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        table[int(entry.name)] = (int(fields[1]), name, int(statm[1]) * page, cpu)
    return table


def _role(name: str) -> str:
    for role in ("flwr-serverapp", "flwr-clientapp", "flower-superlink", "flower-supernode"):
        if role in name:
            return role
    return "other"


class RssSampler(threading.Thread):
    """Peak RSS per Flower role (and of all of them together) under a set of root pids."""

    def __init__(self, roots: list[int], interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.roots, self.interval_s = roots, interval_s
        self.peak: dict[str, int] = {}
        self.cpu_by_pid: dict[int, tuple[str, float]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            table = _proc_table()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo, seen = list(self.roots), set()
            per_role: dict[str, int] = {}
            while todo:
                pid = todo.pop()
                if pid in seen or pid not in table:
                    continue
                seen.add(pid)
                role = _role(table[pid][1])
                per_role[role] = per_role.get(role, 0) + table[pid][2]
                self.cpu_by_pid[pid] = (role, table[pid][3])
                todo += children.get(pid, [])
            per_role["all"] = sum(per_role.values())
            for role, rss in per_role.items():
                self.peak[role] = max(self.peak.get(role, 0), rss)
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used per role (as last seen; processes are sampled until they exit)."""
        out: dict[str, float] = {}
        for role, cpu in self.cpu_by_pid.values():
            out[role] = out.get(role, 0.0) + cpu
        return out


@dataclass
class RelayedFederation(LocalFederation):
    """LocalFederation whose i-th SuperNode reaches the SuperLink through relay port `relay_ports[i]`."""

    relay_ports: list[int] = field(default_factory=list)

    def add_supernode(self, node_config: Mapping[str, object], name: str) -> ManagedProcess:
        port = free_port(self.host)
        via = f"{self.host}:{self.relay_ports[len(self.supernodes)]}"
        proc = start_process(
            name, supernode_command(via, port, node_config), self.work_dir / "logs" / f"{name}.log", self.env()
        )
        wait_for_port(proc, self.host, port)
        self.supernodes.append(proc)
        return proc


def run_one(
    model: str,
    wire_dtype: str,
    chunk_mib: float,
    database: str,
    packing: str,
    sites: int,
    rounds: int,
    work_root: Path,
    bandwidth_mbit: float = 0.0,
    rtt_ms: float = 0.0,
) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{model}-{wire_dtype}-{chunk_mib}-", dir=work_root))
    result_path = work / "result.json"
    # one torch thread per process: two ClientApps on these 2 cores, each with 2 OpenMP threads, thrash
    # (their codec ran 13x slower when overlapping); on separate machines each site has its own cores
    env = {
        "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": str(int(chunk_mib * 2**20)),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    db = str(work / "state.db") if database == "sqlite" else None
    nodes = [{"site-id": i} for i in range(sites)]
    relay = None
    if bandwidth_mbit > 0 or rtt_ms > 0:  # SuperNodes reach the SuperLink through shaped, delaying relays
        ports = [free_port() for _ in range(sites)]
        shape_links(ports, bandwidth_mbit)
        fed: LocalFederation = RelayedFederation(work, nodes, env_extra=env, database=db, relay_ports=ports)
        relay = Relay(ports, lambda: fed.port, rtt_ms).start()
    else:
        fed = LocalFederation(work, nodes, env_extra=env, database=db)
    with fed:
        roots = [p.pid for p in [fed.superlink, *fed.supernodes] if p is not None]
        sampler = RssSampler(roots)
        sampler.start()
        t0 = time.perf_counter()
        res = fed.run(
            APP_DIR,
            {
                "model": model,
                "wire-dtype": wire_dtype,
                "packing": packing,
                "rounds": rounds,
                "min-nodes": sites,
                "result-path": str(result_path),
            },
            timeout_s=1800,
        )
        wall = time.perf_counter() - t0
        sampler.stop()
    if relay is not None:
        relay.stop()
    if res.returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"flwr run failed ({res.returncode}); logs in {work / 'logs'}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    per_round = json.loads(result_path.read_text())
    best = min(per_round, key=lambda r: r["roundtrip_s"])
    mb = best["bytes_per_site"] / 1e6
    return {
        "model": model,
        "wire_dtype": wire_dtype,
        "chunk_mib": chunk_mib,
        "database": database,
        "packing": packing,
        "sites": sites,
        "rounds": rounds,
        "mb_per_direction_per_site": mb,
        "mb_per_direction": mb * sites,
        "roundtrip_s": [r["roundtrip_s"] for r in per_round],
        "effective_mb_s": 2 * mb * sites / best["roundtrip_s"],
        "flwr_run_wall_s": wall,
        "verified_sites": best["verified"],
        "peak_rss_mb": {k: v / 1e6 for k, v in sampler.peak.items()},
        "cpu_s": sampler.cpu_seconds(),
        "server_serialize_s": best["serialize_s"],
        "server_deserialize_s": best["deserialize_s"],
        "client": best["client"],
        "bandwidth_mbit": bandwidth_mbit,
        "rtt_ms": rtt_ms,
        # HTTP requests SuperNodes -> SuperLink while each round ran (through the relay; none without it)
        "requests_per_round": [relay.requests_between(r["t0_epoch"], r["t1_epoch"]) if relay else 0 for r in per_round],
    }


def fp16_averaging_error(model: str, sites: int, update_scale: float, seed: int = 0) -> dict:
    """Max |fp16-transported average - fp32 average| for ViT-like weights and site updates.

    Weights: N(0, 0.02) for matrices (ViT init), 1 +- 0.02 for 1-D (LayerNorm-like); each site's result =
    global + N(0, update_scale). 'weights' = sites send fp16 weights; 'deltas' = sites send fp16 of
    (result - received), the server adds the averaged delta to its fp32 master copy.
    """
    from benchapp_shapes import model_shapes  # noqa: PLC0415  (path set up in main)

    rng = np.random.default_rng(seed)
    err_w, err_d, n = 0.0, 0.0, 0
    for _, shape in model_shapes(model):
        g = (
            rng.standard_normal(shape, dtype=np.float32) * 0.02
            if len(shape) > 1
            else 1 + rng.standard_normal(shape, dtype=np.float32) * 0.02
        )
        received = g.astype(np.float16).astype(np.float32)  # what fp16 downlink delivers
        results = [received + rng.standard_normal(shape, dtype=np.float32) * update_scale for _ in range(sites)]
        ref = np.mean(results, axis=0)
        via_w = np.mean([r.astype(np.float16).astype(np.float32) for r in results], axis=0)
        via_d = g + np.mean([(r - received).astype(np.float16).astype(np.float32) for r in results], axis=0)
        # For deltas the reference is the fp32 master plus the fp32 mean update.
        ref_d = g + np.mean([r - received for r in results], axis=0)
        err_w = max(err_w, float(np.abs(via_w - ref).max()))
        err_d = max(err_d, float(np.abs(via_d - ref_d).max()))
        n += g.size
    return {
        "model": model,
        "update_scale": update_scale,
        "max_abs_err_fp16_weights": err_w,
        "max_abs_err_fp16_deltas": err_d,
        "params": n,
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its descendants (nginx's workers)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def proxy_overhead(requests: int, work: Path, kind: str = "fleet-proxy") -> dict:
    """Paired timings of one signed Fleet request, straight to a SuperLink and through the Fleet proxy."""
    import base64  # noqa: PLC0415
    import datetime  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    import httpx  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # noqa: PLC0415

    ca = make_ca(work / "pki")
    cert = make_server_cert(ca, work / "pki", ["127.0.0.1", "localhost"])
    key_path = work / "keys" / "site_a"
    make_supernode_key(key_path)
    (work / "sites.yaml").write_text("site_a:\n  public-key: keys/site_a.pub\n")
    key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = ActivateNodeRequest(public_key=pem, heartbeat_interval=30).SerializeToString()
    env = flower_env(work / "flwr_home")
    link_port, proxy_port = free_port(), free_port()
    tls = TlsFiles(ca.cert, cert.cert, cert.key)
    link = start_process("superlink", superlink_command("127.0.0.1", link_port, None, tls, True), work / "sl.log", env)
    if kind == "nginx":
        upstream = f"127.0.0.1:{link_port}"
        conf = write_nginx_config(
            work / "nginx.conf", f"127.0.0.1:{proxy_port}", upstream, cert.cert, cert.key, ca.cert, work / "sites.yaml"
        )
        proxy_cmd = [str(shutil.which("nginx")), "-c", str(conf), "-g", "daemon off;"]
    else:
        proxy_cmd = proxy_command(
            f"127.0.0.1:{proxy_port}", f"127.0.0.1:{link_port}", cert.cert, cert.key, ca.cert, work / "sites.yaml"
        )
    env["PYTHONPATH"] = os.pathsep.join([str(APP_DIR.parent.parent), env.get("PYTHONPATH", "")])
    proxy = start_process(kind, proxy_cmd, work / "proxy.log", env)
    try:
        wait_for_port(link, "127.0.0.1", link_port)
        wait_for_port(proxy, "127.0.0.1", proxy_port)
        urls = {
            p: f"https://127.0.0.1:{port}/v1/fleet/activate-node"
            for p, port in (("direct", link_port), ("proxy", proxy_port))
        }
        times: dict[str, list[float]] = {"direct": [], "proxy": []}
        with httpx.Client(verify=str(ca.cert)) as client:

            def one(path: str) -> float:
                stamp = datetime.datetime.now(tz=datetime.UTC).isoformat()
                headers = {
                    "flwr-public-key": base64.b64encode(pem).decode(),
                    "flwr-timestamp": stamp,
                    "flwr-signature": base64.b64encode(key.sign(stamp.encode(), ec.ECDSA(hashes.SHA256()))).decode(),
                    "content-type": "application/protobuf",
                }
                t0 = time.perf_counter()
                status = client.post(urls[path], content=body, headers=headers).status_code
                dt = time.perf_counter() - t0
                if status != 412:  # the SuperLink's answer to a key it has not registered: it came all the way
                    raise RuntimeError(f"{path}: expected the SuperLink's 412, got {status}")
                return dt

            for _ in range(20):  # warm-up: connections, caches
                one("direct"), one("proxy")
            cpu0 = _cpu_s(proxy.pid)
            for i in range(requests):
                for path in ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct"):
                    times[path].append(one(path))
            cpu = _cpu_s(proxy.pid) - cpu0
    finally:
        proxy.stop()
        link.stop()
    d, p = np.array(times["direct"]) * 1e3, np.array(times["proxy"]) * 1e3
    return {
        "mode": "proxy-overhead",
        "proxy": kind,
        "requests": requests,
        "direct_median_ms": float(np.median(d)),
        "proxy_median_ms": float(np.median(p)),
        "direct_p90_ms": float(np.percentile(d, 90)),
        "proxy_p90_ms": float(np.percentile(p, 90)),
        "overhead_median_ms": float(np.median(p - d)),
        "proxy_cpu_ms_per_request": 1e3 * cpu / requests,
        "load_average": os.getloadavg(),
    }


def main(
    model: Annotated[list[str], typer.Option(help="vit-tiny, vit-s, vit-b, vit-l")] = ["vit-s", "vit-b"],  # noqa: B006
    wire_dtype: Annotated[list[str], typer.Option(help="dtype on the wire")] = ["float32", "float16"],  # noqa: B006
    chunk_mib: Annotated[list[float], typer.Option(help="FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE in MiB")] = [16.0],  # noqa: B006
    database: Annotated[list[str], typer.Option(help="SuperLink state: memory or sqlite")] = ["memory"],  # noqa: B006
    packing: Annotated[list[str], typer.Option(help="flat (one array per weight set) or per-tensor")] = ["flat"],  # noqa: B006
    sites: Annotated[int, typer.Option(help="number of SuperNodes")] = 2,
    rounds: Annotated[int, typer.Option(help="rounds per federation (the fastest is reported)")] = 1,
    out: Annotated[Path, typer.Option(help="JSON lines, appended")] = Path("transport_bench.jsonl"),
    numerics: Annotated[bool, typer.Option(help="also compute the fp16 averaging error")] = True,
    proxy_overhead_requests: Annotated[
        int, typer.Option("--proxy-overhead", help="only measure the Fleet proxy's cost per request, over N pairs")
    ] = 0,
    proxy: Annotated[str, typer.Option(help="with --proxy-overhead: fleet-proxy (ours) or nginx")] = "fleet-proxy",
    bandwidth_mbit: Annotated[
        list[float], typer.Option(help="each site's link, Mbit/s each way (0: loopback, unshaped)")
    ] = [0.0],  # noqa: B006
    rtt_ms: Annotated[float, typer.Option(help="round-trip time SuperNode <-> SuperLink, ms (a delaying relay)")] = 0.0,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if max(bandwidth_mbit) > 0 or rtt_ms > 0:
        reexec_in_netns()  # shaping needs a network namespace of our own (no-op once inside)
    work_root = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    if proxy_overhead_requests:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
        row = proxy_overhead(proxy_overhead_requests, work_root, proxy)
        print(json.dumps(row))
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return
    rows = []
    for m, w, c, d, p, bw in itertools.product(model, wire_dtype, chunk_mib, database, packing, bandwidth_mbit):
        log.info("=== %s %s chunk %.0f MiB, %s state, %s packing, %g Mbit/s, RTT %g ms", m, w, c, d, p, bw, rtt_ms)
        row = run_one(m, w, c, d, p, sites, rounds, work_root, bw, rtt_ms)
        log.info("%s", json.dumps(row))
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows.append(row)
    print(
        "| model | packing | wire | chunk MiB | state | Mbit/s | RTT ms | MB/direction | round s | eff. MB/s | "
        "peak RSS SuperLink MB | peak RSS ServerApp MB | peak RSS all MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["peak_rss_mb"]
        print(
            f"| {r['model']} | {r['packing']} | {r['wire_dtype']} | {r['chunk_mib']:g} | {r['database']} | "
            f"{r['bandwidth_mbit']:g} | {r['rtt_ms']:g} | "
            f"{r['mb_per_direction']:.0f} | {min(r['roundtrip_s']):.1f} | {r['effective_mb_s']:.0f} | "
            f"{p.get('flower-superlink', 0):.0f} | {p.get('flwr-serverapp', 0):.0f} | {p.get('all', 0):.0f} |"
        )
    if numerics:
        import sys  # noqa: PLC0415

        sys.path.insert(0, str(APP_DIR / "benchapp"))
        import shapes as benchapp_shapes  # noqa: PLC0415

        sys.modules["benchapp_shapes"] = benchapp_shapes
        for m in model:
            for scale in (1e-4, 1e-3, 1e-2):
                e = fp16_averaging_error(m, sites, scale)
                print(json.dumps(e))
                with out.open("a") as fh:
                    fh.write(json.dumps(e) + "\n")


if __name__ == "__main__":
    typer.run(main)
