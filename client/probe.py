"""Does the coordinator answer, and in the way this site was started? (`brainjepa-client`'s checks)

`probe_coordinator` opens a TCP connection and, with a CA certificate, a TLS handshake that verifies the
coordinator's certificate (chain and name). A mismatch of the two ends' TLS settings is named in one line:
a site started with `--insecure` against a port that speaks TLS (it would retry forever on Flower's
"Server disconnected"), and a site with `--root-certificates` against a plain-HTTP port.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

INSECURE_AGAINST_TLS = "TLS mismatch: the coordinator at {server} speaks TLS but this site was started with --insecure"
TLS_AGAINST_PLAIN = (
    "TLS mismatch: the coordinator at {server} does not speak TLS (started with --insecure, for local tests "
    "only) but this site was started with --root-certificates"
)


def probe_coordinator(
    server: str, root_cert: Path | None, timeout_s: float = 5.0, name_mismatch: bool = True
) -> str | None:
    """Why the coordinator at `server` (HOST:PORT) cannot be used, or None: a TCP connection and, with
    `root_cert`, a TLS handshake that verifies its certificate (chain and name), within `timeout_s`.
    `name_mismatch`: without `root_cert`, also check that the port does not speak TLS (a plain-HTTP
    SuperLink logs the attempt as an invalid request: not for repeated probes)."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--server: expected HOST:PORT with a port in 1-65535, got '{server}'"
    address = (host.strip("[]"), int(port))
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError as e:
        return (
            f"cannot reach the coordinator at {server}: {e.strerror or e} (is `brainjepa-server start` running "
            f"there, and is the port open to this machine?)"
        )
    with sock:
        if root_cert is None:
            return _speaks_tls(sock, server, timeout_s) if name_mismatch else None
        ctx = ssl.create_default_context(cafile=str(root_cert))
        try:
            with ctx.wrap_socket(sock, server_hostname=address[0]):
                return None
        except ssl.SSLCertVerificationError as e:
            return (
                f"the coordinator's TLS certificate at {server} does not verify against --root-certificates "
                f"{root_cert}: {e.verify_message} (a name mismatch means the certificate's SAN lacks '{host}': "
                f"connect with a name it holds, or ask the coordinator for a certificate with this one)"
            )
        except (ssl.SSLError, OSError) as e:
            if _speaks_plain_http(address, timeout_s):
                return TLS_AGAINST_PLAIN.format(server=server) + ": drop --root-certificates and use --insecure"
            return f"TLS handshake with the coordinator at {server} failed: {e}"


def _speaks_tls(sock: socket.socket, server: str, timeout_s: float) -> str | None:
    """The mismatch message if the port completes a TLS handshake (certificate unchecked: only the protocol
    matters here), else None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    sock.settimeout(timeout_s)
    try:
        with ctx.wrap_socket(sock):
            return INSECURE_AGAINST_TLS.format(server=server) + ": start it with --root-certificates CA.crt"
    except (ssl.SSLError, OSError):
        return None


def _speaks_plain_http(address: tuple[str, int], timeout_s: float) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout_s) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False
