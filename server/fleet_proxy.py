"""The coordinator's only outside-facing port: a TLS-terminating proxy that forwards Flower's Fleet API.

Flower 1.42's SuperLink serves three HTTP APIs on one port: `/v1/fleet` (what SuperNodes call),
`/v1/control` (`flwr run`, `flwr supernode register`: unauthenticated in open-source Flower) and
`/v1/runtime` (the ServerApp's). `brainjepa-server start` binds the SuperLink to 127.0.0.1 and starts this
proxy on the public address: it accepts only `POST /v1/fleet/<method>` and forwards the request body and
headers (Flower's signed SuperNode authentication headers included) to the loopback SuperLink over TLS;
everything else is answered 403 without reaching the SuperLink. Bytes in, bytes out: nothing is parsed.

Run as `python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --certfile ...
--keyfile ... --upstream-ca ...` (a separate process, stopped with SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import http.client
import logging
import re
import signal
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("server.fleet_proxy")

FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")  # e.g. /v1/fleet/pull-messages
MAX_BODY = 256 * 2**20  # Flower moves arrays in chunks (16 MiB here): a body above this is refused
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; Host is the upstream's.
HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def fleet_allowed(method: str, path: str) -> bool:
    """Only the Fleet API's POST routes pass; control, runtime, health and anything else do not."""
    return method == "POST" and FLEET_PATH.match(path) is not None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is closed after this
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.info("%s %s", self.address_string(), format % args)

    def _refuse(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        path = self.path.split("?", 1)[0]
        if not fleet_allowed(self.command, path):
            log.warning(
                "refused %s %s from %s (only the Fleet API is served here)", self.command, path, self.client_address[0]
            )
            self._refuse(403, "forbidden: this port serves the Flower Fleet API (sites) only\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            self._refuse(413, f"request body of {length} bytes refused (limit {MAX_BODY})\n")
            return
        body = self.rfile.read(length)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn = self.server.upstream_connection()
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self.server.drop_connection()
            log.warning("upstream SuperLink unreachable for %s: %s", path, e)
            self._refuse(502, "the coordinator's SuperLink is not reachable\n")
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = _forward
    do_GET = _forward
    do_PUT = _forward
    do_DELETE = _forward
    do_PATCH = _forward
    do_HEAD = _forward
    do_OPTIONS = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], upstream_ctx: ssl.SSLContext) -> None:
        super().__init__(listen, _Handler)
        self.upstream, self.upstream_ctx = upstream, upstream_ctx
        self._local = threading.local()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2

    def finish_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        """The TLS handshake happens here, in the connection's own thread (a slow client stalls no one)."""
        request.settimeout(30)
        try:
            tls_sock = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.warning("TLS handshake with %s failed: %s", client_address[0], e)
            return
        super().finish_request(tls_sock, client_address)

    def upstream_connection(self) -> http.client.HTTPSConnection:
        """One keep-alive connection to the SuperLink per handler thread."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(*self.upstream, context=self.upstream_ctx, timeout=120)
            self._local.conn = conn
        return conn

    def drop_connection(self) -> None:
        self._local.conn = None


def serve(listen: str, upstream: str, certfile: str, keyfile: str, upstream_ca: str) -> None:
    """Serve until SIGINT / SIGTERM."""
    lhost, _, lport = listen.rpartition(":")
    uhost, _, uport = upstream.rpartition(":")
    upstream_ctx = ssl.create_default_context(cafile=upstream_ca)
    upstream_ctx.check_hostname = False  # loopback; the chain is still verified against the CA
    server = _ProxyServer((lhost, int(lport)), (uhost, int(uport)), upstream_ctx)
    server.tls.load_cert_chain(certfile, keyfile)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("Fleet proxy on https://%s -> SuperLink %s (only POST /v1/fleet/* is forwarded)", listen, upstream)
    server.serve_forever()
    server.server_close()
    log.info("Fleet proxy stopped")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="TLS proxy forwarding only Flower's Fleet API to a loopback SuperLink.")
    p.add_argument("--listen", required=True, help="HOST:PORT sites connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certfile", required=True)
    p.add_argument("--keyfile", required=True)
    p.add_argument("--upstream-ca", required=True, help="CA that signed the SuperLink's certificate")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    serve(a.listen, a.upstream, a.certfile, a.keyfile, a.upstream_ca)


if __name__ == "__main__":
    main()
