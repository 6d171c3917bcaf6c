"""What a site admin sees from `brainjepa-client`, over real processes on loopback:

- a site started with `--insecure` against a TLS port, or with `--root-certificates` against a plain-HTTP
  port, exits 3 with one line naming the TLS mismatch;
- a federation of one round: the honest site exits 0 with a summary when the run is complete; a site whose
  rounds are refused (another gradient file) keeps waiting, names the last contact and the give-up time
  once the coordinator is gone, and leaves (exit 4) at that deadline;
- `brainjepa-client status --site FILE` (in-process): the last round, the ledger's epsilon, whether the coordinator
  answers; Flower's own exception replies are scrubbed of paths and subject ids before they leave.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from harness import FLOWER_ENV
from typer.testing import CliRunner

from brainjepa.config import ModelConfig, PretrainConfig, TrainConfig, load_site
from brainjepa.demo import prepare_federation
from brainjepa.federation.contract import Metric, RoundSpec
from brainjepa.federation.launcher import flower_bin, flower_env
from brainjepa.federation.processes import free_port, start_process
from brainjepa.federation.tls import make_ca, make_server_cert
from brainjepa.gradients import load_gradients, save_gradients
from brainjepa.privacy.budget import Ledger, Release
from brainjepa.privacy.session import ledger_path
from client.cli import app
from client.pinned_app import scrub_error
from client.probe import INSECURE_AGAINST_TLS, TLS_AGAINST_PLAIN, probe_coordinator
from client.site_status import final_round, record_round
from sites.temporal import DEFAULT_MODEL_TR

SMALL = ["--run-config", "n-rois=50", "--run-config", "n-frames=64", "--run-config", "batch-size=4"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("admin_sites")
    fed = prepare_federation(root, n_sites=2, subjects=10, n_rois=50, n_frames=64, site_tr=DEFAULT_MODEL_TR)
    return sorted(root.glob("*/*.yaml")), fed.gradients


def _serve_once(sock: socket.socket, tls: ssl.SSLContext | None) -> threading.Thread:
    """Answer each connection on `sock` (in a thread): a TLS handshake, or a plain HTTP 400."""

    def serve() -> None:
        with suppress(OSError):
            while True:
                conn, _ = sock.accept()
                with suppress(ssl.SSLError, OSError), conn:
                    if tls is not None:
                        with tls.wrap_socket(conn, server_side=True) as t:
                            t.recv(1)
                    else:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _client(site: Path, grads: Path, port: int, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [flower_bin("brainjepa-client"), "--site", str(site), "--gradients", str(grads)]
    cmd += ["--server", f"127.0.0.1:{port}", *extra]
    env = flower_env(None, FLOWER_ENV)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration  # `brainjepa-client` as a process
def test_tls_mismatch_is_named_in_one_line(tmp_path: Path, demo) -> None:
    yamls, grads = demo
    ca = make_ca(tmp_path / "pki")
    cert = make_server_cert(ca, tmp_path / "pki", ["127.0.0.1"])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert.cert, cert.key)
    with socket.create_server(("127.0.0.1", 0)) as tls_port, socket.create_server(("127.0.0.1", 0)) as plain:
        _serve_once(tls_port, tls)
        _serve_once(plain, None)
        res = _client(yamls[0], grads, tls_port.getsockname()[1], "--insecure")
        assert res.returncode == 3, res.stdout + res.stderr
        want = INSECURE_AGAINST_TLS.format(server=f"127.0.0.1:{tls_port.getsockname()[1]}")
        assert [ln for ln in res.stderr.splitlines() if "TLS mismatch" in ln] == [
            f"error: {want}: start it with --root-certificates CA.crt"
        ], res.stderr
        plain_server = f"127.0.0.1:{plain.getsockname()[1]}"
        why = probe_coordinator(plain_server, ca.cert)  # the reverse, in-process
        assert why is not None and why.startswith(TLS_AGAINST_PLAIN.format(server=plain_server)), why


@pytest.mark.integration  # `brainjepa-server start`, two `brainjepa-client`s
def test_client_exits_when_the_run_ends_and_gives_up_on_a_vanished_coordinator(tmp_path: Path, demo) -> None:
    yamls, grads = demo
    other = tmp_path / "other_gradients.npy"  # same shape, another checksum: every round refused
    save_gradients(other, load_gradients(grads)[::-1].copy())
    port = free_port()
    env = flower_env(tmp_path / "home", FLOWER_ENV)
    server = [flower_bin("brainjepa-server"), "start", "--insecure", "--address", f"127.0.0.1:{port}"]
    server += ["--gradients", str(grads), "--rounds", "1", "--local-steps", "1", "--min-sites", "1"]
    server += ["--out-dir", str(tmp_path / "out"), *SMALL]
    srv = start_process("server", server, tmp_path / "server.out", env, cwd=tmp_path)
    procs = [srv]
    try:
        deadline = time.monotonic() + 90
        while "submitting the run" not in srv.log_tail() and time.monotonic() < deadline:
            assert srv.alive(), srv.log_tail()
            time.sleep(0.3)
        common = ["--server", f"127.0.0.1:{port}", "--insecure", "--probe-every-s", "1"]
        for name, g, extra in (("refused", other, ["--give-up-after-s", "4"]), ("honest", grads, [])):
            cmd = [flower_bin("brainjepa-client"), "--site", str(yamls[0 if name == "honest" else 1])]
            cmd += ["--gradients", str(g), "--log-dir", str(tmp_path / name), *common, *extra]
            procs.append(start_process(name, cmd, tmp_path / f"{name}.out", env, cwd=tmp_path))
        refused, honest = procs[1], procs[2]
        assert honest.wait(timeout=240) == 0, honest.log_tail()
        out = honest.log_tail(200_000)
        assert "the federation's run is complete at this site" in out and "pretrain round 1 of 1" in out, out
        assert srv.wait(timeout=60) == 0, srv.log_tail()
        t_gone = time.monotonic()
        assert refused.wait(timeout=60) == 4, refused.log_tail()
        assert time.monotonic() - t_gone < 4 + 20
        out = refused.log_tail(200_000)
        assert "checksum" in out  # its rounds were refused: it never saw the final round
        assert "does not answer since" in out and "(last contact)" in out and "the SuperNode retries until" in out
        assert "giving up: no answer from the coordinator" in out, out
    finally:
        for p in procs:
            p.stop()


def test_status_shows_last_round_epsilon_and_coordinator(tmp_path: Path, demo) -> None:
    yamls, _ = demo
    site, runtime = load_site(yamls[0])
    cfg = PretrainConfig(model=ModelConfig(n_rois=50, n_frames=64), train=TrainConfig(steps=2, batch_size=4))
    spec = RoundSpec("pretrain", 1, 2, 1, 1, "float32", "m" * 64, "g" * 64, cfg)
    assert final_round(spec) and not final_round(dataclasses.replace(spec, round=0, step_start=0))
    record_round(site, spec, {Metric.EPSILON_SPENT: 0.5})
    ledger = Ledger.open(ledger_path(runtime.privacy, yamls[0], site.site), site.site)  # the default place
    ledger.record(Release("run-1", "pretrain", 0, 1.1, 0.1, 50, 1.0))
    port = free_port()
    res = CliRunner().invoke(app, ["status", "--site", str(yamls[0]), "--server", f"127.0.0.1:{port}"])
    assert res.exit_code == 0, res.output
    assert "last round: pretrain round 2 of 2 answered at" in res.output and "final round" in res.output
    eps = ledger.epsilon(runtime.privacy.delta)
    assert f"epsilon {eps:.3f} spent" in res.output and "1 DP round(s) in 1 run(s)" in res.output, res.output
    assert f"coordinator 127.0.0.1:{port}: does not answer: cannot reach" in res.output


def test_flowers_exception_replies_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in ("_run_id", "_node_id", "_task_id"):  # as in a ClientApp process
        monkeypatch.setattr(TaskIdentity, field, 1)
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's SuperNode delivers it
    reason = "<class 'OSError'>:<'cannot read /data/hospital/sub-0042/ses-01/rest.nii.gz for subject 0042'>"
    reply = scrub_error(Message(Error(code=2, reason=reason), reply_to=msg))
    assert reply.error.code == 2
    assert reply.error.reason == "<class 'OSError'>:<'cannot read <path> for subject <id>'>", reply.error.reason
    ok = scrub_error(Message(RecordDict(), reply_to=msg))
    assert not ok.has_error()
