"""The coordinator as an attacker meets it (site identity and bounded updates), over real processes on
loopback with a PKI and SuperNode keys generated at test time (brainjepa.federation.tls):

- `brainjepa-server start` with TLS and a sites file: only the Fleet proxy is reachable; an outsider's
  `flwr supernode register` and `flwr run` of a foreign app through it are refused (403), an unregistered
  key is refused, two registered sites train, a registered site whose reply claims another site's name
  is refused; then `--resume RUN_DIR --resume-round 1` with the same sites file re-runs round 2.
- (tests/test_fed_deployment.py) a poisoned update (weights x 1e4, 1e6 samples claimed) is rejected
  over real transport and the global model is the honest sites' mean. The rest here: unit checks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.cli.build import build_fab_from_disk
from harness import FLOWER_ENV

from brainjepa.checkpoint import load_checkpoint, save_checkpoint
from brainjepa.config import ModelConfig, PretrainConfig, TrainConfig, load_site
from brainjepa.demo import prepare_federation
from brainjepa.errors import ConfigError, DataError
from brainjepa.federation.contract import ARRAYS, METRICS, SITE, RoundSpec
from brainjepa.federation.launcher import flower_bin, flower_env, write_app_dir
from brainjepa.federation.processes import ManagedProcess, free_port, start_process
from brainjepa.federation.tls import make_ca, make_server_cert, make_supernode_key
from client.cli import probe_coordinator
from client.disk_state import load_state, save_state, state_path
from client.pinned_app import UntrustedApp, check_fab
from client.redact import scrub
from server.aggregate import SiteUpdate, check_update
from server.bounds import SetBound, distance_bound
from server.config import FederationConfig, to_run_config
from server.exchange import SiteResult, malformed, refuse_duplicate, reply_site
from server.fleet_proxy import fleet_allowed
from server.registry import RegisteredSite, load_sites_file
from server.robust import RobustAggregate
from sites.temporal import DEFAULT_MODEL_TR

SMALL = ["--run-config", "n-rois=50", "--run-config", "n-frames=64", "--run-config", "batch-size=4"]

EVIL_APP = """
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
capp = ClientApp()

@app.main()
def main(grid, context):
    Path(MARKER).touch()
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("sec_sites")
    fed = prepare_federation(root, n_sites=2, subjects=10, n_rois=50, n_frames=64, site_tr=DEFAULT_MODEL_TR)
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
    cmd = [
        flower_bin("brainjepa-client"),
        "--site",
        str(yaml),
        "--gradients",
        str(grads),
        "--server",
        f"localhost:{port}",
        "--root-certificates",
        str(ca),
        "--auth-key",
        str(key),
        "--log-dir",
        str(tmp / name),
        "--stay",  # joined across the run's end: the resumed run below finds them
    ]
    return start_process(name, cmd, tmp / "logs" / f"{name}.out", env, cwd=tmp)


@pytest.mark.integration  # `brainjepa-server start`, `brainjepa-client`, `flwr` as real processes
def test_outsider_refused_sites_known_by_key_resume_with_auth(tmp_path: Path, demo) -> None:
    yamls, grads = demo
    ca = make_ca(tmp_path / "pki")
    server = make_server_cert(ca, tmp_path / "pki", ["localhost", "127.0.0.1"])
    keys = {n: tmp_path / "keys" / n for n in ("site_a", "site_b", "site_c", "outsider")}
    for k in keys.values():
        make_supernode_key(k)
    sites_file = tmp_path / "sites.yaml"
    sites_file.write_text(
        "".join(f"{n}:\n  public-key: keys/{n}.pub\n  max-samples: 100\n" for n in ("site_a", "site_b", "site_c"))
    )
    port = free_port()
    env = flower_env(tmp_path / "user_flwr_home", FLOWER_ENV)
    out = tmp_path / "out"

    def start_server(*extra: str) -> ManagedProcess:
        cmd = [
            flower_bin("brainjepa-server"),
            "start",
            "--gradients",
            str(grads),
            "--address",
            f"127.0.0.1:{port}",
            "--rounds",
            "2",
            "--local-steps",
            "1",
            "--min-sites",
            "2",
            "--out-dir",
            str(out),
            "--ssl-ca-certfile",
            str(ca.cert),
            "--ssl-certfile",
            str(server.cert),
            "--ssl-keyfile",
            str(server.key),
            "--sites-file",
            str(sites_file),
            *SMALL,
            *extra,
        ]
        return start_process("server", cmd, tmp_path / "logs" / f"server{len(extra)}.out", env, cwd=tmp_path)

    srv = start_server()
    procs: list[ManagedProcess] = [srv]
    try:
        _wait_for(srv, r"submitting the run", 90)
        found = re.findall(r"registered site '(\w+)' \(key (SHA256:\S+)\) as node (\d+)", srv.log_tail())
        registered = {site: fp for site, fp, _ in found}
        node_ids = {node for _, _, node in found}
        assert sorted(registered) == ["site_a", "site_b", "site_c"]
        # Two honest sites, and site_c's key with site_a's YAML: its replies claim to be site_a. They train
        # while the outsider tries its luck.
        procs += [
            _client(tmp_path, "a", yamls[0], grads, port, ca.cert, keys["site_a"], env),
            _client(tmp_path, "b", yamls[1], grads, port, ca.cert, keys["site_b"], env),
            _client(tmp_path, "c", yamls[0], grads, port, ca.cert, keys["site_c"], env),
        ]

        # The outsider holds the public CA certificate and reaches the public port.
        home = tmp_path / "outsider_home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "victim"\n\n[superlink.victim]\n'
            f'address = "localhost:{port}"\nroot-certificates = "{ca.cert}"\n'
        )
        outsider_env = flower_env(home, FLOWER_ENV)
        reg = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(keys["outsider"]) + ".pub", "victim"],
            env=outsider_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "403" in reg.stdout + reg.stderr and "registered successfully" not in reg.stdout, reg.stdout
        marker = tmp_path / "FOREIGN_APP_RAN"
        evil = tmp_path / "evil_app"
        write_app_dir(evil, {}, serverapp="evil:app", clientapp="evil:capp")
        (evil / "evil.py").write_text(f"MARKER = {str(marker)!r}\n" + EVIL_APP)
        run = subprocess.run(
            [flower_bin("flwr"), "run", str(evil), "victim"],
            env=outsider_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "403" in run.stdout + run.stderr and "/v1/control/start-run" in run.stdout + run.stderr, run.stdout
        outsider = _client(tmp_path, "outsider", yamls[0], grads, port, ca.cert, keys["outsider"], env)
        assert outsider.wait(timeout=60) != 0
        assert "exit 305" in outsider.log_tail() and "--sites-file" in outsider.log_tail()

        assert srv.wait(timeout=240) == 0, srv.log_tail()
        assert not marker.exists()
        activated = set(re.findall(r"Activated node_id=(\d+)", (out / "logs" / "superlink.log").read_text()))
        assert activated and activated <= node_ids  # the outsider's key never became a node
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
        held = json.loads((run_dir / "quarantine.json").read_text())["sites"]  # by its registered (key's) name
        assert list(held) == ["site_c"] and "claims to be 'site_a'" in held["site_c"]["reason"]
        assert len(c_rows) == 1  # quarantined after round 1: not asked in round 2
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
        events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
        resumed = events[max(i for i, e in enumerate(events) if e["event"] == "start") :]
        rows = [s for e in resumed if e["event"] == "round" for s in e["sites"]]
        assert rows and registered["site_c"] not in {r["fingerprint"] for r in rows}  # still quarantined
    finally:
        for p in procs:
            p.stop()


def test_update_bounds_and_sample_cap() -> None:
    g = torch.Generator().manual_seed(0)
    current = {n: torch.randn(1000, generator=g) for n in ("encoder", "predictor")}
    expected = {k: v.numel() for k, v in current.items()}
    bounds = {k: SetBound(distance_bound(v, 0.5)) for k, v in current.items()}
    honest = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in current.items()}
    assert check_update(SiteUpdate("a", 50, honest), expected, current, bounds, 100) is None
    poisoned = SiteUpdate("b", 1_000_000, {k: v * 1e4 for k, v in honest.items()})
    assert "exceeds the cap of 100" in check_update(poisoned, expected, current, bounds, 100)
    why = check_update(SiteUpdate("b", 50, poisoned.sets), expected, current, bounds, 0)
    assert why is not None and "'encoder' moved" in why and "max-update-ratio" in why
    off = {k: SetBound(distance_bound(v, 0.0)) for k, v in current.items()}
    assert check_update(SiteUpdate("b", 50, poisoned.sets), expected, current, off, 0) is None  # bound off


def test_median_and_trimmed_mean_bound_a_poisoned_site() -> None:
    g = torch.Generator().manual_seed(1)
    sites = [{"encoder": torch.randn(500, generator=g)} for _ in range(5)]
    sites[4] = {"encoder": sites[4]["encoder"] * 1e4}
    stack = np.stack([s["encoder"].numpy() for s in sites])
    for method, want in (("median", np.median(stack, axis=0)), ("trimmed-mean", np.sort(stack, axis=0)[1:4].mean(0))):
        agg = RobustAggregate(method, 0.2)
        for s in sites:
            agg.add(s, 10**6)  # the claimed count does not weigh in
        got = agg.result()["encoder"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert np.abs(got).max() < 10  # the x 1e4 site is cut or outvoted


def test_reply_identity_names_and_malformed_replies() -> None:
    registry = {7: RegisteredSite("site_a", "SHA256:abc", 100)}
    own = RecordDict({SITE: ConfigRecord({"name": "site_a"})})
    assert reply_site(own, 7, registry) == "site_a"
    with pytest.raises(
        ConfigError, match=r"registered as site 'site_a' \(key SHA256:abc\) but its reply claims to be 'site_b'"
    ):
        reply_site(RecordDict({SITE: ConfigRecord({"name": "site_b"})}), 7, registry)
    with pytest.raises(ConfigError, match="node 8 is not in the site registry"):
        reply_site(own, 8, registry)
    for bad in ("../../../../x", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="no '/'"):
            reply_site(RecordDict({SITE: ConfigRecord({"name": bad})}), 7, None)
    first = refuse_duplicate(SiteResult(1, "ok", "site_a"), [])
    second = refuse_duplicate(SiteResult(2, "ok", "site_a"), [first])
    assert first.status == "ok" and second.status == "rejected" and "duplicate site name" in second.detail
    assert refuse_duplicate(SiteResult(3, "ok", "site_b"), [first, second]).status == "ok"
    assert "malformed reply" in malformed(RecordDict({ARRAYS: ArrayRecord({})}))
    assert malformed(RecordDict({ARRAYS: ArrayRecord({}), METRICS: MetricRecord({"num-examples": 1.0})})) == ""


def test_site_errors_are_scrubbed_of_subject_ids_and_paths() -> None:
    text = (
        "file '/data/hosp/sub-0012/func/sub-0012_task-rest_bold.nii.gz': bad; subject '100307': NaN; "
        "subject id 'AB12' twice; participants ['p1', 'p2'] missing; 50 ROIs, got 400"
    )
    out = scrub(text)
    for secret in ("/data/hosp", "0012", "100307", "AB12", "p1", "p2"):
        assert secret not in out, out
    assert "50 ROIs, got 400" in out and "<path>" in out and "subject <id>" in out


def test_checkpoints_load_weights_only_and_are_private(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "c.pt",
        gradients=np.arange(6.0).reshape(3, 2),
        n=np.float32(2.5),
        models={"w": torch.ones(2)},
        config={"a": [1, "x", None]},
    )
    assert path.stat().st_mode & 0o777 == 0o600
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt["gradients"], np.arange(6.0).reshape(3, 2))
    assert ckpt["n"] == 2.5 and ckpt["config"] == {"a": [1, "x", None]}
    assert torch.load(path, weights_only=True)["format"] == "brainjepa-checkpoint/1"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "brainjepa-checkpoint/1", "x": Path("/")}, evil)  # an arbitrary object
    with pytest.raises(DataError, match=r"evil\.pt.*weights_only=True"):
        load_checkpoint(evil)


def test_proxy_forwards_the_fleet_api_only() -> None:
    assert fleet_allowed("POST", "/v1/fleet/pull-messages") and fleet_allowed("POST", "/v1/fleet/activate-node")
    for method, path in (
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/"),
    ):
        assert not fleet_allowed(method, path), path


def test_sites_file_errors_name_file_site_and_field(tmp_path: Path) -> None:
    make_supernode_key(tmp_path / "a")
    f = tmp_path / "sites.yaml"
    f.write_text("site_a:\n  public-key: a.pub\n  max-samples: 10\n")
    assert load_sites_file(f)["site_a"][1].max_samples == 10
    for text, pattern in (
        ("site/a:\n  public-key: a.pub\n", "not allowed"),
        ("site_a:\n  public-key: missing.pub\n", r"site 'site_a', 'public-key'.*does not exist"),
        ("site_a:\n  public-key: a.pub\n  max-sample: 1\n", "max-sample"),
        ("site_a:\n  public-key: a.pub\nsite_b:\n  public-key: a.pub\n", "share one public key"),
        ("site_a:\n  public-key: sites.yaml\n", "not an OpenSSH public key"),
    ):
        f.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            load_sites_file(f)


def test_site_optimizer_state_survives_a_coordinator_restart(tmp_path: Path, demo) -> None:
    """The AdamW moments go to the site's disk; a new run (resumed coordinator) continuing at the same
    step gets them back, a rollback or another model starts afresh."""
    site, _ = load_site(demo[0][0])
    cfg = PretrainConfig(model=ModelConfig(n_rois=50, n_frames=64), train=TrainConfig(steps=8, batch_size=4))
    spec = RoundSpec(
        task="pretrain",
        round=0,
        num_rounds=4,
        step_start=0,
        local_steps=2,
        wire_dtype="float32",
        model_checksum="m" * 64,
        gradient_checksum="g" * 64,
        task_config=cfg,
    )
    w = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.AdamW([w], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    save_state(site, spec, opt, 1)
    path = state_path(site, spec)
    assert path.stat().st_mode & 0o777 == 0o600
    fresh = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone())], lr=0.1)
    nxt = dataclasses.replace(spec, round=1, step_start=2)
    assert load_state(site, nxt, fresh) == 1
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])
    for other in (
        dataclasses.replace(spec, round=2, step_start=4),
        dataclasses.replace(nxt, gradient_checksum="h" * 64),
    ):
        assert load_state(site, other, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(10))])) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside flwr build
def test_site_runs_only_the_federations_app_bundle(tmp_path: Path) -> None:
    """Bundles built by Flower itself (`build_fab_from_disk`, what `flwr run` sends): ours passes the
    site's check, one carrying code or naming another ClientApp does not."""
    ours = write_app_dir(tmp_path / "ours", to_run_config(FederationConfig()))
    check_fab(build_fab_from_disk(ours))
    evil = write_app_dir(tmp_path / "evil", {}, serverapp="evil:app", clientapp="evil:capp")
    (evil / "evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(UntrustedApp, match=r"files besides pyproject.toml: \['evil.py'\]"):
        check_fab(build_fab_from_disk(evil))
    other = write_app_dir(tmp_path / "other", {}, clientapp="flwr.clientapp:ClientApp")
    with pytest.raises(UntrustedApp, match="names components"):
        check_fab(build_fab_from_disk(other))


def test_client_probe_names_an_unreachable_coordinator_and_a_certificate_without_the_name(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    cert = make_server_cert(ca, tmp_path / "pki", ["coordinator.example.org"])
    port = free_port()
    t0 = time.monotonic()
    assert f"cannot reach the coordinator at 127.0.0.1:{port}" in (
        probe_coordinator(f"127.0.0.1:{port}", ca.cert) or ""
    )
    assert time.monotonic() - t0 < 6
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    with socket.create_server(("127.0.0.1", 0)) as srv:

        def serve() -> None:
            conn, _ = srv.accept()
            with suppress(ssl.SSLError, OSError), ctx.wrap_socket(conn, server_side=True):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        why = probe_coordinator(f"127.0.0.1:{srv.getsockname()[1]}", ca.cert)
        thread.join(5)
    assert why is not None and "does not verify" in why and "SAN lacks '127.0.0.1'" in why, why
