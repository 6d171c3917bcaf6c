"""The coordinator's public port as a stranger meets it: a real SuperLink (TLS, SuperNode authentication on)
behind a real `server.fleet_proxy` process with small limits, attacked over raw TLS sockets on loopback.

- A request without Flower's SuperNode headers is refused (401) before its body is read, even one claiming
  200 MB: the connection is closed at once and the proxy's memory does not grow; an unregistered key
  gets 412 (Flower's error JSON, as the SuperLink answers an unknown key), a bad signature 401, a registered key claiming 200 MB 413, another path
  403; a correctly signed request reaches the SuperLink and its answer comes back; a 16 MiB body is
  streamed (the proxy's peak memory grows by < 8 MiB).
- Malformed Content-Length: 400 and one log line, no traceback.
- Slowloris: a connection trickling headers, or a signed request trickling its body, is closed at its
  deadline; an idle keep-alive connection at the idle timeout.
- The connection cap: one address gets at most `max-per-ip` connections (then 503); beyond `max-connections` a
  connection waits un-accepted until a slot frees (here: a deadline closes a held one).
"""

from __future__ import annotations

import base64
import datetime
import shutil
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.proto.fleet_pb2 import ActivateNodeRequest
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from harness import FLOWER_ENV

from brainjepa.federation.launcher import TlsFiles, flower_env, superlink_command
from brainjepa.federation.processes import ManagedProcess, free_port, start_process, wait_for_port
from brainjepa.federation.tls import make_ca, make_server_cert, make_supernode_key
from server import fleet_auth
from server.fleet_front import write_nginx_config

HEADER_S, REQUEST_S, IDLE_S = 3.0, 4.0, 2.0
LIMITS = ["--max-connections", "4", "--max-per-ip", "3", "--header-timeout-s", str(HEADER_S)]
LIMITS += ["--request-timeout-s", str(REQUEST_S), "--idle-timeout-s", str(IDLE_S)]


def test_our_copy_of_flowers_auth_constants_matches_flower() -> None:
    assert fleet_auth.KEY.decode() == FLEET_HTTP_PUBLIC_KEY_HEADER
    assert fleet_auth.SIGNATURE.decode() == FLEET_HTTP_SIGNATURE_HEADER
    assert fleet_auth.TIMESTAMP.decode() == TIMESTAMP_HEADER
    assert (fleet_auth.TIMESTAMP_TOLERANCE, fleet_auth.SYSTEM_TIME_TOLERANCE) == (
        TIMESTAMP_TOLERANCE,
        SYSTEM_TIME_TOLERANCE,
    )


class Setup:
    def __init__(self, root: Path) -> None:
        ca = make_ca(root / "pki")
        cert = make_server_cert(ca, root / "pki", ["127.0.0.1", "localhost"])  # as `start`'s loopback one
        self.ca, self.cert, self.root, self.link_port = ca.cert, cert, root, 0
        make_supernode_key(root / "keys" / "site_a")
        make_supernode_key(root / "keys" / "stranger")
        (root / "sites.yaml").write_text("site_a:\n  public-key: keys/site_a.pub\n")
        self.site = serialization.load_ssh_private_key((root / "keys" / "site_a").read_bytes(), None)
        self.stranger = serialization.load_ssh_private_key((root / "keys" / "stranger").read_bytes(), None)
        env = flower_env(root / "flwr_home", FLOWER_ENV)
        self.link_port = link_port = free_port()
        self.port = free_port()
        tls = TlsFiles(ca.cert, cert.cert, cert.key)
        self.link = start_process(
            "superlink", superlink_command("127.0.0.1", link_port, None, tls, True), root / "sl.log", env
        )
        cmd = [sys.executable, "-m", "server.fleet_proxy", "--listen", f"127.0.0.1:{self.port}"]
        cmd += ["--upstream", f"127.0.0.1:{link_port}", "--certfile", str(cert.cert), "--keyfile", str(cert.key)]
        cmd += ["--upstream-ca", str(ca.cert), "--sites-file", str(root / "sites.yaml"), *LIMITS]
        self.proxy: ManagedProcess = start_process("fleet-proxy", cmd, root / "proxy.log", env)
        wait_for_port(self.link, "127.0.0.1", link_port)
        wait_for_port(self.proxy, "127.0.0.1", self.port)
        self.tls = ssl.create_default_context(cafile=str(ca.cert))

    def connect(self, source: str = "127.0.0.1", handshake: bool = True, timeout: float = 10.0) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout, source_address=(source, 0))
        return self.tls.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=handshake)

    def headers(self, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey | None = None) -> str:
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        stamp = datetime.datetime.now(tz=datetime.UTC).isoformat()
        sig = (signer or key).sign(stamp.encode(), ec.ECDSA(hashes.SHA256()))
        return (
            f"flwr-public-key: {base64.b64encode(pem).decode()}\r\nflwr-timestamp: {stamp}\r\n"
            f"flwr-signature: {base64.b64encode(sig).decode()}\r\n"
        )

    def rss_kb(self, field: str = "VmRSS") -> int:
        """The proxy's resident memory now (VmRSS) or at its peak (VmHWM), in KiB."""
        text = Path(f"/proc/{self.proxy.pid}/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field)))


def request(path: str, extra: str = "", length: int = 0) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {length}\r\n\r\n".encode()


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and what else arrives before the proxy closes the connection (b'' at once if it did)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def one_response(sock: socket.socket) -> bytes:
    """One response on a keep-alive connection (its head and Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the peer closed `sock`, at most `seconds` (else AssertionError)."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (ssl.SSLError, ConnectionResetError):
        pass
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    s = Setup(tmp_path_factory.mktemp("proxy"))
    yield s
    s.proxy.stop()
    s.link.stop()


@pytest.mark.integration  # a SuperLink and the proxy as processes
def test_strangers_refused_before_the_body_sites_get_through(setup: Setup) -> None:
    rss0 = setup.rss_kb()
    socks = [setup.connect() for _ in range(3)]
    t0 = time.monotonic()
    for s in socks:  # 200 MB claimed each, no authentication: 401 at once, and the connection is closed
        s.sendall(request("/v1/fleet/push-object", length=200_000_000) + b"\0" * 2**16)
    for s in socks:
        status, data = answer(s)  # returns: the proxy closed the connection
        s.close()
        assert status == 401 and b"missing or malformed" in data and b"connection: close" in data.lower(), data
    assert time.monotonic() - t0 < 5
    assert setup.rss_kb() - rss0 < 4096, (rss0, setup.rss_kb())

    for extra, length, want, text in (
        (setup.headers(setup.stranger), 10, 412, b'"code": 2004'),  # a valid signature, unregistered key
        (setup.headers(setup.site, signer=setup.stranger), 10, 401, b"does not verify"),
        (setup.headers(setup.site), 200_000_000, 413, b"limit"),
        (setup.headers(setup.site).replace("+00:00", ""), 10, 401, b"malformed"),  # a naive timestamp
    ):
        with setup.connect() as s:
            s.sendall(request("/v1/fleet/push-object", extra, length))
            status, data = answer(s)
        assert status == want and text in data, data
    with setup.connect() as s:
        s.sendall(request("/v1/control/start-run", setup.headers(setup.site), 0))
        assert answer(s)[0] == 403

    # A site's signed request reaches the SuperLink: its own answer (the key is not registered THERE).
    pem = setup.site.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = ActivateNodeRequest(public_key=pem, heartbeat_interval=30).SerializeToString()
    proto = "content-type: application/protobuf\r\n"
    with setup.connect() as s:
        for _ in range(2):  # twice on one keep-alive connection
            s.sendall(request("/v1/fleet/activate-node", setup.headers(setup.site) + proto, len(body)) + body)
            data = one_response(s)
            assert data.startswith(b"HTTP/1.1 412") and b"Failed to activate SuperNode" in data, data
    # A site's 16 MiB body is streamed, not held: the proxy's peak RSS grows by far less than the body.
    hwm = setup.rss_kb("VmHWM")
    with setup.connect() as s:
        big = b"\0" * 2**24
        s.sendall(request("/v1/fleet/push-object", setup.headers(setup.site) + proto, len(big)) + big)
        data = one_response(s)
        assert data.startswith(b"HTTP/1.1 400") and b"Invalid protobuf payload" in data, data  # the SuperLink's
    assert setup.rss_kb("VmHWM") - hwm < 8192, (hwm, setup.rss_kb("VmHWM"))
    log = setup.proxy.log_tail(200_000)
    assert "refused /v1/fleet/push-object from 127.0.0.1: SuperNode authentication headers missing" in log
    assert "Traceback" not in log


@pytest.mark.integration
def test_malformed_requests_get_400_and_one_log_line(setup: Setup) -> None:
    for bad in (b"abc", b"-5", b"5, 6", b"99999999999999999999999"):
        with setup.connect() as s:
            s.sendall(b"POST /v1/fleet/x HTTP/1.1\r\nHost: x\r\nContent-Length: " + bad + b"\r\n\r\n")
            assert answer(s)[0] == 400, bad
    with setup.connect() as s:
        s.sendall(b"POST /v1/fleet/x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert answer(s)[0] == 431
    for head in (
        b"POST /v1/fleet/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n",
        b"CONNECT x:1 HTTP/1.1\r\n",
    ):
        with setup.connect() as s:
            s.sendall(head + b"Content-Length: 0\r\n\r\n")
            assert answer(s)[0] == 400, head
    log = setup.proxy.log_tail(200_000)
    assert log.count("bad request from 127.0.0.1") >= 7 and "Traceback" not in log


@pytest.mark.integration
def test_slow_or_idle_connections_are_closed_at_their_deadlines(setup: Setup) -> None:
    with setup.connect() as slow_headers, setup.connect() as slow_body, setup.connect() as idle:
        t0 = time.monotonic()
        slow_headers.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\n")
        body = b"\0" * 1000
        slow_body.sendall(request("/v1/fleet/push-object", setup.headers(setup.site), len(body)))
        idle.sendall(request("/v1/fleet/x", setup.headers(setup.site), 0))  # a SuperLink 4xx, kept alive
        assert one_response(idle).startswith(b"HTTP/1.1 4")
        t_idle = time.monotonic()
        for i in range(int(REQUEST_S * 4)):  # a byte every 0.25 s on each: never complete
            for s, data in ((slow_headers, b"X"), (slow_body, body[i : i + 1])):
                try:
                    s.sendall(data)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass
            time.sleep(0.25)
        assert closed_within(idle, 1.0) + time.monotonic() - t_idle < IDLE_S + 4
        assert closed_within(slow_headers, 1.0) + time.monotonic() - t0 < HEADER_S + 4
        assert closed_within(slow_body, 1.0) + time.monotonic() - t0 < REQUEST_S + 4
    assert "request not complete within its deadline" in setup.proxy.log_tail(200_000)


@pytest.mark.integration
def test_connection_cap_per_address_and_in_all(setup: Setup) -> None:
    held = [setup.connect() for _ in range(3)]  # the per-address cap (3)
    t0 = time.monotonic()
    with setup.connect() as s:  # a 4th from 127.0.0.1: 503 at once (a SuperNode retries it)
        assert answer(s)[0] == 503
    held.append(setup.connect(source="127.0.0.2"))  # the 4th connection in all
    waiting = setup.connect(source="127.0.0.3", handshake=False, timeout=1.0)
    with pytest.raises((TimeoutError, socket.timeout)):
        waiting.do_handshake()  # not accepted while 4 are open
    waiting.close()
    waiting = setup.connect(source="127.0.0.3", handshake=False, timeout=HEADER_S + 6)
    waiting.do_handshake()  # accepted once the header deadline has closed the held ones
    assert time.monotonic() - t0 < HEADER_S + 6
    for s in [*held, waiting]:
        s.close()
    assert "refused a connection from 127.0.0.1: 3 open from that address" in setup.proxy.log_tail(200_000)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_the_nginx_config_serves_the_fleet_api_only(setup: Setup) -> None:
    port = free_port()
    conf = write_nginx_config(
        setup.root / "nginx-fleet.conf", f"127.0.0.1:{port}", f"127.0.0.1:{setup.link_port}",
        setup.cert.cert, setup.cert.key, setup.ca, setup.root / "sites.yaml",
    )  # fmt: skip
    cmd = [str(shutil.which("nginx")), "-c", str(conf), "-g", "daemon off;"]
    nginx = start_process("nginx", cmd, setup.root / "nginx.out", {})
    try:
        wait_for_port(nginx, "127.0.0.1", port)
        setup.port, proxy_port = port, setup.port
        pem = setup.site.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        body = ActivateNodeRequest(public_key=pem, heartbeat_interval=30).SerializeToString()
        proto = "content-type: application/protobuf\r\n"
        with setup.connect() as s:  # a site's request reaches the SuperLink, twice on one connection
            for _ in range(2):
                s.sendall(request("/v1/fleet/activate-node", setup.headers(setup.site) + proto, len(body)) + body)
                assert one_response(s).startswith(b"HTTP/1.1 412"), "the SuperLink's answer"
        for path, extra, length, want in (
            ("/v1/fleet/push-object", "", 1000, 401),  # no key
            ("/v1/fleet/push-object", setup.headers(setup.stranger), 1000, 401),  # an unregistered key
            ("/v1/fleet/push-object", setup.headers(setup.site), 200_000_000, 413),  # before the body
            ("/v1/control/start-run", setup.headers(setup.site), 10, 403),
        ):
            with setup.connect() as s:
                s.sendall(request(path, extra, length))
                assert one_response(s).split(b" ", 2)[1] == str(want).encode(), (path, want)
    finally:
        setup.port = proxy_port
        nginx.stop()
