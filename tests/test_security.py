"""The coordinator as an attacker meets it (issue 15), over real processes on loopback with a PKI and
SuperNode keys generated at test time (brainjepa.federation.tls):

- `brainjepa-server start` with TLS and a sites file: only the Fleet proxy is reachable; an outsider's
  `flwr supernode register` and `flwr run` of a foreign app through it are refused (403), an unregistered
  key is refused, two registered sites train, a registered site whose reply claims another site's name
  is refused; then `--resume RUN_DIR --resume-round 1` with the same sites file re-runs round 2.
- A poisoned update (weights x 1e4, 1e6 samples claimed) is rejected and the global model stays sane.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from brainjepa.checkpoint import load_checkpoint
from brainjepa.demo import prepare_federation
from brainjepa.federation.flower import LocalFederation, flower_bin, flower_env, write_app_dir
from brainjepa.federation.processes import ManagedProcess, free_port, start_process
from brainjepa.federation.tls import make_ca, make_server_cert, make_supernode_key
from server.config import FederationConfig, to_run_config

REPO = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
SMALL = ["--run-config", "n-rois=50", "--run-config", "n-frames=64", "--run-config", "batch-size=4"]

pytestmark = pytest.mark.slow

# Sites poisoning their reply, for the bounds test: weights x 1e4 and 1e6 samples claimed.
POISON_CLIENT = '''
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.clientapp import ClientApp
from client.client_app import train as real_train

app = ClientApp()

@app.train()
def train(msg, context):
    reply = real_train(msg, context)
    if bool(context.node_config.get("poison", False)) and not reply.has_error():
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: Array(arrays[k].numpy() * 1e4) for k in arrays.keys()})
        metrics = dict(reply.content["metrics"])
        metrics["num-examples"] = 1e6
        reply.content["metrics"] = MetricRecord(metrics)
    return reply
'''

EVIL_APP = '''
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
capp = ClientApp()

@app.main()
def main(grid, context):
    Path(MARKER).touch()
'''


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("sec_sites")
    fed = prepare_federation(root, n_sites=2, subjects=10, n_rois=50, n_frames=64)
    return sorted(root.glob("*/*.yaml")), fed.gradients


def _wait_for(proc: ManagedProcess, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, proc.log_tail(200_000))
        if m:
            return m
        assert proc.alive(), proc.log_tail()
        time.sleep(0.3)
    raise AssertionError(f"'{pattern}' not seen within {timeout_s} s:\n{proc.log_tail()}")


def _client(tmp: Path, name: str, yaml: Path, grads: Path, port: int, ca: Path, key: Path, env: dict) -> ManagedProcess:
    cmd = [flower_bin("brainjepa-client"), "--site", str(yaml), "--gradients", str(grads), "--server",
           f"localhost:{port}", "--root-certificates", str(ca), "--auth-key", str(key), "--log-dir", str(tmp / name)]
    return start_process(name, cmd, tmp / "logs" / f"{name}.out", env, cwd=tmp)


def test_outsider_refused_sites_known_by_key_resume_with_auth(tmp_path: Path, demo) -> None:
    yamls, grads = demo
    ca = make_ca(tmp_path / "pki")
    server = make_server_cert(ca, tmp_path / "pki", ["localhost", "127.0.0.1"])
    keys = {n: tmp_path / "keys" / n for n in ("site_a", "site_b", "site_c", "outsider")}
    for k in keys.values():
        make_supernode_key(k)
    sites_file = tmp_path / "sites.yaml"
    sites_file.write_text("".join(f"{n}:\n  public-key: keys/{n}.pub\n  max-samples: 100\n" for n in ("site_a", "site_b", "site_c")))
    port = free_port()
    env = flower_env(tmp_path / "user_flwr_home", ENV)
    out = tmp_path / "out"

    def start_server(*extra: str) -> ManagedProcess:
        cmd = [flower_bin("brainjepa-server"), "start", "--gradients", str(grads), "--address", f"127.0.0.1:{port}",
               "--rounds", "2", "--local-steps", "1", "--min-sites", "2", "--out-dir", str(out), "--ssl-ca-certfile",
               str(ca.cert), "--ssl-certfile", str(server.cert), "--ssl-keyfile", str(server.key), "--sites-file",
               str(sites_file), *SMALL, *extra]  # fmt: skip
        return start_process("server", cmd, tmp_path / "logs" / f"server{len(extra)}.out", env, cwd=tmp_path)

    srv = start_server()
    procs: list[ManagedProcess] = [srv]
    try:
        _wait_for(srv, r"submitting the run", 90)
        registered = dict(re.findall(r"registered site '(\w+)' \(key (SHA256:\S+)\)", srv.log_tail()))
        assert sorted(registered) == ["site_a", "site_b", "site_c"]

        # The outsider holds the public CA certificate and reaches the public port.
        home = tmp_path / "outsider_home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "victim"\n\n[superlink.victim]\n'
                                          f'address = "localhost:{port}"\nroot-certificates = "{ca.cert}"\n')
        outsider_env = flower_env(home, ENV)
        reg = subprocess.run([flower_bin("flwr"), "supernode", "register", str(keys["outsider"]) + ".pub", "victim"],
                             env=outsider_env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "403" in reg.stdout + reg.stderr and "registered successfully" not in reg.stdout, reg.stdout
        marker = tmp_path / "FOREIGN_APP_RAN"
        evil = tmp_path / "evil_app"
        write_app_dir(evil, {}, serverapp="evil:app", clientapp="evil:capp")
        (evil / "evil.py").write_text(f"MARKER = {str(marker)!r}\n" + EVIL_APP)
        run = subprocess.run([flower_bin("flwr"), "run", str(evil), "victim"], env=outsider_env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert "403" in run.stdout + run.stderr and "/v1/control/start-run" in run.stdout + run.stderr, run.stdout
        outsider = _client(tmp_path, "outsider", yamls[0], grads, port, ca.cert, keys["outsider"], env)
        assert outsider.wait(timeout=60) != 0
        assert "exit 305" in outsider.log_tail() and "--sites-file" in outsider.log_tail()
        assert not (out / "logs" / "superlink.log").read_text().count("Activated node_id")

        # Two honest sites, and site_c's key with site_a's YAML: its replies claim to be site_a.
        procs += [_client(tmp_path, "a", yamls[0], grads, port, ca.cert, keys["site_a"], env),
                  _client(tmp_path, "b", yamls[1], grads, port, ca.cert, keys["site_b"], env),
                  _client(tmp_path, "c", yamls[0], grads, port, ca.cert, keys["site_c"], env)]  # fmt: skip
        assert srv.wait(timeout=240) == 0, srv.log_tail()
        assert not marker.exists()
        (run_dir,) = [p for p in out.glob("*-run*") if p.is_dir()]
        ckpt = load_checkpoint(run_dir / "checkpoint.pt")  # weights_only=True
        assert ckpt["round"] == 2
        assert sorted(p.name for p in run_dir.glob("round-*.pt")) == ["round-001.pt", "round-002.pt"]
        for p in (run_dir / "checkpoint.pt", run_dir / "audit.jsonl", out / "superlink.db", run_dir / "server.log"):
            assert p.stat().st_mode & 0o077 == 0, p
        assert run_dir.stat().st_mode & 0o077 == 0
        events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
        start = events[0]
        assert {v["site"]: v["fingerprint"] for v in start["registered_sites"].values()} == registered
        rows = [s for e in events if e["event"] == "round" for s in e["sites"]]
        by_site = {(r["site"], r["status"]) for r in rows}
        assert ("site_a", "ok") in by_site and ("site_b", "ok") in by_site
        c_rows = [r for r in rows if r["fingerprint"] == registered["site_c"]]
        assert c_rows and all(r["status"] == "rejected" and "claims to be 'site_a'" in r["reason"] for r in c_rows)
        assert all(r["fingerprint"] == registered[r["site"]] for r in rows if r["status"] == "ok")
        hashes = [e for e in events if e["event"] == "checkpoint"]
        assert [e["round"] for e in hashes] == [1, 2] and all(len(e["sha256"]) == 64 for e in hashes)

        # Resume through the CLI, site authentication on (the keys are registered already), from the kept
        # round-001.pt; the sites' clients reconnect by themselves.
        srv = start_server("--resume", str(run_dir), "--resume-round", "1")
        procs.append(srv)
        assert srv.wait(timeout=240) == 0, srv.log_tail()
        assert f"resuming {run_dir} after round 1" in srv.log_tail(200_000)
        assert load_checkpoint(run_dir / "checkpoint.pt")["round"] == 2
    finally:
        for p in procs:
            p.stop()


def test_poisoned_update_rejected_global_model_stays_sane(tmp_path: Path, demo) -> None:
    yamls, grads = demo
    nodes = [{"site-config": str(yamls[0]), "gradients": str(grads)},
             {"site-config": str(yamls[1]), "gradients": str(grads), "poison": True}]  # fmt: skip
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "poison_client.py").write_text(POISON_CLIENT)
    cfg = FederationConfig(n_rois=50, n_frames=64, local_steps=1, batch_size=4, num_rounds=1, min_sites=1,
                           out_dir=str(tmp_path / "runs"), gradients=str(grads))  # fmt: skip
    app = write_app_dir(tmp_path / "app", to_run_config(cfg), clientapp="poison_client:app")
    with LocalFederation(tmp_path, nodes, env_extra=ENV) as fed:
        res = fed.run(app, timeout_s=300)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs").glob("*-run*"))
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    rounds = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    rows = [s for e in rounds if e["event"] == "round" for s in e["sites"]]
    assert sorted((r["site"], r["status"]) for r in rows) == [("site_a", "ok"), ("site_b", "rejected")]
    assert all("max-update-ratio" in r["reason"] for r in rows if r["status"] == "rejected")
    norm = float(torch.cat([v.flatten() for k, v in ckpt["models"].items() if k.startswith("encoder.")]).norm())
    assert 1.0 < norm < 100.0  # an untrained tiny encoder's norm is ~25; the poisoned one would be ~1e5
