"""The coordinator's only outside-facing port: a TLS-terminating proxy that forwards Flower's Fleet API.

Flower 1.42's SuperLink serves three HTTP APIs on one port: `/v1/fleet` (what SuperNodes call),
`/v1/control` (`flwr run`, `flwr supernode register`: unauthenticated in open-source Flower) and
`/v1/runtime` (the ServerApp's). `brainjepa-server start` binds the SuperLink to 127.0.0.1 and starts this
proxy on the public address. For each request, before any body byte is read:

1. only `POST /v1/fleet/<method>` passes (anything else: 403, never reaches the SuperLink);
2. Flower's SuperNode authentication headers must be present, fresh and signed, by a key of the sites
   file when there is one (`server.fleet_auth`; 401 / 412 and the connection is closed);
3. the body must declare a Content-Length of at most `max_body` (Flower's array chunk size plus headroom;
   413), no chunked uploads (411).

Then the body is streamed to the SuperLink over a pooled keep-alive TLS connection and the answer streamed
back; nothing is buffered whole. Strangers are bounded: at most `max_connections` connections (further
ones wait in the kernel's backlog, un-accepted) and `max_per_ip` from one address (more get 503); a TLS handshake and a
request's headers must arrive within `header_timeout_s`, its whole body within `request_timeout_s`
(slowloris), an idle keep-alive connection is closed after `idle_timeout_s`. TCP_NODELAY on both sides.
HTTP parsing is llhttp's (Node.js's parser, through httptools, as in uvicorn): a malformed request gets
400 and one log line.

Run as `python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --certfile ...
--keyfile ... --upstream-ca ... [--sites-file sites.yaml]` (stopped with SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import re
import signal
import socket
import ssl
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httptools

try:
    import uvloop
except ImportError:  # optional: the standard event loop works, a little slower
    uvloop = None

from brainjepa.federation.launcher import CHUNK_SIZE_ENV, DEFAULT_CHUNK_SIZE
from server.fleet_auth import AuthRefused, NodeAuth, registered_keys
from server.fleet_http import PARSE_ERRORS, READ, Closed, Link, response_head

log = logging.getLogger("server.fleet_proxy")

FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")  # e.g. /v1/fleet/pull-messages
UPSTREAM_IDLE_S = 4.0  # a pooled SuperLink connection idle longer is closed (uvicorn closes them at 5 s)
ACTIVATION_FAILED = 2004  # flwr.supercore.error.ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED
# Hop-by-hop headers (RFC 9110 7.6.1) and the framing, which is written anew; Host is the upstream's.
HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}


@dataclass(frozen=True)
class ProxyLimits:
    """What a connection may cost; the defaults are the command line's."""

    max_body_headroom: int = 2**20  # bytes above Flower's array chunk size (protobuf and object framing)
    max_connections: int = 128
    max_per_ip: int = 32
    header_timeout_s: float = 10.0  # TLS handshake, and a request's headers
    request_timeout_s: float = 60.0  # a request's headers and body (16 MiB in 60 s: ~2.2 Mbit/s at least)
    idle_timeout_s: float = 15.0  # between requests on a keep-alive connection (SuperNodes poll every ~3 s)
    upstream_timeout_s: float = 120.0  # the SuperLink's answer, streamed back
    max_header_bytes: int = 16384


def max_body(limits: ProxyLimits) -> int:
    """The largest request body forwarded: the Flower processes' array chunk size plus headroom."""
    return int(os.environ.get(CHUNK_SIZE_ENV, DEFAULT_CHUNK_SIZE)) + limits.max_body_headroom


def fleet_allowed(method: str, path: str) -> bool:
    """Only the Fleet API's POST routes pass; control, runtime, health and anything else do not."""
    return method == "POST" and FLEET_PATH.match(path) is not None


class FleetProxy:
    def __init__(
        self, upstream: tuple[str, int], tls: ssl.SSLContext, up_tls: ssl.SSLContext, auth: NodeAuth, lim: ProxyLimits
    ) -> None:
        self.upstream, self.tls, self.up_tls, self.auth, self.limits = upstream, tls, up_tls, auth, lim
        self.max_body = max_body(lim)
        self._pool: list[Link] = []  # idle keep-alive connections to the SuperLink
        self._per_ip: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, listen: socket.socket, stop: asyncio.Event) -> None:
        """Accept connections on `listen` until `stop` is set; at most `max_connections` at a time."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.limits.max_connections)
        listen.setblocking(False)

        async def accept() -> None:
            while True:
                await slots.acquire()  # at the cap, further connections wait un-accepted in the backlog
                sock, (ip, *_) = await loop.sock_accept(listen)
                over = self._per_ip[ip] >= self.limits.max_per_ip  # answered 503 (Flower's SuperNode retries)
                if over:
                    log.warning("refused a connection from %s: %d open from that address", ip, self._per_ip[ip])
                self._per_ip[ip] += 1
                task = loop.create_task(self._connection(sock, ip, over))
                self._tasks.add(task)
                task.add_done_callback(lambda t, ip=ip: self._done(t, ip, slots))

        acceptor = loop.create_task(accept())
        await stop.wait()
        acceptor.cancel()
        listen.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for up in self._pool:
            up.writer.close()

    def _done(self, task: asyncio.Task, ip: str, slots: asyncio.Semaphore) -> None:
        self._tasks.discard(task)
        self._per_ip[ip] -= 1
        if not self._per_ip[ip]:
            del self._per_ip[ip]
        slots.release()

    async def _connection(self, sock: socket.socket, ip: str, over: bool = False) -> None:
        loop = asyncio.get_running_loop()
        lim = self.limits
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = loop.time()
        reader = asyncio.StreamReader(limit=READ, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.tls, ssl_handshake_timeout=lim.header_timeout_s
            )
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            log.info("TLS handshake with %s failed: %r", ip, e)
            sock.close()
            return
        c = Link(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
        c.ip = ip
        if over:  # after the handshake: closing before it makes a SuperNode give up (an "ssl" error)
            await c.refuse(503, f"too many connections from {ip} (limit {lim.max_per_ip}): retry later")
            return c.writer.close()
        try:
            while True:
                if start < 0 and not c.events:  # keep-alive: wait for the next request's first bytes
                    try:
                        async with asyncio.timeout(lim.idle_timeout_s):
                            data = await reader.read(READ)
                    except TimeoutError:
                        return
                    if not data:
                        return
                    c.fed = len(data)
                    c.parser.feed_data(data)  # a parse error here is answered below
                if start < 0:
                    start = loop.time()
                if not await self._exchange(c, start):
                    return
                start = -1.0
        except TimeoutError:  # before OSError, its base class
            log.info("closed a connection from %s: request not complete within its deadline", ip)
        except PARSE_ERRORS as e:
            log.warning("bad request from %s: %s", ip, e if isinstance(e, httptools.HttpParserError) else "upgrade")
            status = 431 if "headers over" in str(e) else 400
            await c.refuse(status, f"bad request: {e}")
        except (OSError, Closed) as e:
            log.debug("connection from %s closed: %s", ip, e)
        finally:
            c.writer.close()

    async def _exchange(self, c: Link, start: float) -> bool:
        """Serve one request; True if the connection may carry another."""
        lim = self.limits
        c.answered = False
        async with asyncio.timeout_at(start + lim.header_timeout_s):
            kind, head = await c.next_event(lim.max_header_bytes)
        if kind != "head":
            raise Closed(f"unexpected {kind}")
        url, headers = head  # type: ignore[misc]
        method = c.parser.get_method().decode("ascii", "replace")
        path = url.decode("ascii", "replace").split("?", 1)[0]
        if not fleet_allowed(method, path):
            log.warning("refused %s %s from %s (only the Fleet API is served here)", method, path[:200], c.ip)
            await c.refuse(403, "forbidden: this port serves the Flower Fleet API (sites) only")
            return False
        if sum(len(k) + len(v) + 4 for k, v in headers) > lim.max_header_bytes:
            raise httptools.HttpParserError(f"request headers over {lim.max_header_bytes} bytes")
        try:
            c.proven = self.auth.check(headers, c.proven)
        except AuthRefused as e:
            log.warning("refused %s from %s: %s", path, c.ip, e.reason)
            await c.refuse(e.status, e.reason, flower_code=ACTIVATION_FAILED)
            return False
        if any(k == b"transfer-encoding" for k, _ in headers):
            await c.refuse(411, "a Content-Length is required (no chunked uploads)")
            return False
        length = next((int(v) for k, v in headers if k == b"content-length"), 0)  # llhttp checked its format
        if length > self.max_body:
            log.warning("refused %s from %s: body of %d bytes (limit %d)", path, c.ip, length, self.max_body)
            await c.refuse(413, f"request body of {length} bytes refused (limit {self.max_body})")
            return False
        fwd = [(k, v) for k, v in headers if k not in HOP]
        fwd += [
            (b"host", b"%s:%d" % (self.upstream[0].encode(), self.upstream[1])),
            (b"content-length", b"%d" % length),
        ]
        head_bytes = b"\r\n".join([b"POST %s HTTP/1.1" % path.encode(), *(k + b": " + v for k, v in fwd), b"", b""])
        return await self._forward(c, start, head_bytes)

    async def _forward(self, c: Link, start: float, request_head: bytes) -> bool:
        """Stream the request's body to the SuperLink after `request_head` and its answer back; True if `c`
        may carry another."""
        try:
            up = await self._borrow()
        except (OSError, TimeoutError) as e:
            log.warning("upstream SuperLink unreachable for %s: %r", c.ip, e)
            await c.refuse(502, "the coordinator's SuperLink is not reachable")
            return False
        try:
            async with asyncio.timeout_at(start + self.limits.request_timeout_s):  # the body, as it arrives
                await c.pump(up.writer, request_head, chunked=False)
        except BaseException:
            up.writer.close()
            raise
        try:
            async with asyncio.timeout(self.limits.upstream_timeout_s):
                kind, head = await up.next_event()
                if kind != "head":
                    raise Closed(f"SuperLink answered {kind}")
                _, headers = head  # type: ignore[misc]
                status = up.parser.get_status_code()
                sized = status in (204, 304) or any(k == b"content-length" for k, _ in headers)
                out = [(k, v) for k, v in headers if k not in HOP or k == b"content-length"]
                out += [] if sized else [(b"transfer-encoding", b"chunked")]
                c.answered = True
                await up.pump(c.writer, response_head(status, out), chunked=not sized)
        except (OSError, TimeoutError, Closed, *PARSE_ERRORS) as e:
            up.writer.close()
            if c.answered:
                raise
            log.warning("upstream SuperLink failed for %s: %r", c.ip, e)
            await c.refuse(502, "the coordinator's SuperLink did not answer")
            return False
        if up.keep and not up.events and len(self._pool) < 32:
            up.idle_since = asyncio.get_running_loop().time()
            self._pool.append(up)
        else:
            up.writer.close()
        return c.keep

    async def _borrow(self) -> Link:
        """A pooled SuperLink connection idle for less than UPSTREAM_IDLE_S, or a new one."""
        now = asyncio.get_running_loop().time()
        while self._pool:
            up = self._pool.pop()
            if now - up.idle_since < UPSTREAM_IDLE_S and not up.reader.at_eof():
                return up
            up.writer.close()
        async with asyncio.timeout(self.limits.header_timeout_s):
            reader, writer = await asyncio.open_connection(*self.upstream, ssl=self.up_tls, limit=READ)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Link(reader, writer, response=True)


async def _main(args: argparse.Namespace, limits: ProxyLimits) -> None:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(args.certfile, args.keyfile)
    upstream_tls = ssl.create_default_context(cafile=args.upstream_ca)
    upstream_tls.check_hostname = False  # loopback; the chain is still verified against the CA
    keys = registered_keys(Path(args.sites_file)) if args.sites_file else None
    lhost, _, lport = args.listen.rpartition(":")
    uhost, _, uport = args.upstream.rpartition(":")
    listen = socket.create_server((lhost.strip("[]"), int(lport)), backlog=1024)
    proxy = FleetProxy((uhost, int(uport)), tls, upstream_tls, NodeAuth(keys), limits)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "Fleet proxy on https://%s -> SuperLink %s (only POST /v1/fleet/*; %s; bodies <= %d bytes; %s)",
        args.listen,
        args.upstream,
        f"keys of {len(keys)} registered sites" if keys is not None else "any signed SuperNode key",
        proxy.max_body,
        limits,
    )
    gc.freeze()  # what start-up allocated is never garbage: keep the collector off it (a third of the CPU)
    await proxy.serve(listen, stop)
    log.info("Fleet proxy stopped")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="TLS proxy forwarding only Flower's Fleet API to a loopback SuperLink.")
    p.add_argument("--listen", required=True, help="HOST:PORT sites connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certfile", required=True)
    p.add_argument("--keyfile", required=True)
    p.add_argument("--upstream-ca", required=True, help="CA that signed the SuperLink's certificate")
    p.add_argument("--sites-file", help="only SuperNodes signing with these sites' keys get past the headers")
    for field in dataclasses.fields(ProxyLimits):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    a = p.parse_args(argv)
    limits = ProxyLimits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ProxyLimits)})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    if uvloop is not None:  # Flower's uvicorn[standard] brings it: ~2x cheaper TLS and socket handling
        uvloop.install()
    asyncio.run(_main(a, limits))


if __name__ == "__main__":
    main()
