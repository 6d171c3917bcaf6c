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
ones wait in the kernel's backlog, un-accepted) and `max_per_ip` from one address; a TLS handshake and a
request's headers must arrive within `header_timeout_s`, its whole body within `request_timeout_s`
(slowloris), an idle keep-alive connection is closed after `idle_timeout_s`. TCP_NODELAY on both sides.
HTTP parsing is h11's (strict RFC 9112: a malformed request gets 400 and one log line).

Run as `python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --certfile ...
--keyfile ... --upstream-ca ... [--sites-file sites.yaml]` (stopped with SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
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

import h11

try:
    import uvloop
except ImportError:  # optional: the standard event loop works, a little slower
    uvloop = None

from brainjepa.federation.launcher import CHUNK_SIZE_ENV, DEFAULT_CHUNK_SIZE
from server.fleet_auth import AuthRefused, NodeAuth, registered_keys

log = logging.getLogger("server.fleet_proxy")

FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")  # e.g. /v1/fleet/pull-messages
READ = 2**16  # bytes per socket read
UPSTREAM_IDLE_S = 4.0  # a pooled SuperLink connection idle longer is closed (uvicorn closes them at 5 s)
ACTIVATION_FAILED = 2004  # flwr.supercore.error.ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED
# Hop-by-hop headers (RFC 9110 7.6.1) and the framing, which h11 writes itself; Host is the upstream's.
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


class _Closed(Exception):
    """The peer went away (or broke the protocol) mid-request: close quietly."""


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event, reading from `reader` as needed (the caller bounds the time)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ))  # b"": end of stream, h11 then says ConnectionClosed


async def _pump(
    src: h11.Connection, reader: asyncio.StreamReader, dst: h11.Connection, writer: asyncio.StreamWriter, head: bytes
) -> None:
    """Stream one message body from `src` to `dst` after `head`. Writes wait until body bytes are there and
    more must be read: a small message goes out as one TLS record and packet, not head, body and end apart."""
    out, body = bytearray(head), False
    while True:
        event = src.next_event()
        if event is h11.NEED_DATA:
            if body and out:
                writer.write(out)
                out = bytearray()
                await writer.drain()
            src.receive_data(await reader.read(READ))
        elif isinstance(event, h11.Data):
            out += dst.send(event)
            body = True
            if len(out) >= READ:
                writer.write(out)
                out = bytearray()
                await writer.drain()
        elif isinstance(event, h11.EndOfMessage):
            writer.write(out + dst.send(h11.EndOfMessage()))
            return await writer.drain()
        else:
            raise _Closed(f"message body ended early ({type(event).__name__})")


class _Link:
    """One HTTP/1.1 connection: its h11 state and streams (`proven`: the key it proved, for fleet_auth)."""

    def __init__(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn, self.reader, self.writer = conn, reader, writer
        self.ip, self.proven, self.idle_since = "", None, 0.0

    async def refuse(self, status: int, text: str, flower_code: int = 0) -> None:
        """Answer `status` and close (Connection: close): the unread body, if any, is never read."""
        if self.conn.our_state not in (h11.SEND_RESPONSE, h11.IDLE):  # IDLE: the request head was malformed
            return
        if flower_code and status == 412:  # Flower's error JSON: the SuperNode prints it and exits 305
            body, kind = json.dumps({"code": flower_code, "detail": text}).encode(), b"application/json"
        else:
            body, kind = (text + "\n").encode(), b"text/plain; charset=utf-8"
        head = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            out = self.conn.send(h11.Response(status_code=status, headers=head)) + self.conn.send(h11.Data(data=body))
            self.writer.write(out + self.conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(5):
                await self.writer.drain()
        except (OSError, TimeoutError, h11.ProtocolError) as e:
            log.debug("could not send %d: %s", status, e)


class FleetProxy:
    def __init__(
        self, upstream: tuple[str, int], tls: ssl.SSLContext, up_tls: ssl.SSLContext, auth: NodeAuth, lim: ProxyLimits
    ) -> None:
        self.upstream, self.tls, self.up_tls, self.auth, self.limits = upstream, tls, up_tls, auth, lim
        self.max_body = max_body(lim)
        self._pool: list[_Link] = []  # idle keep-alive connections to the SuperLink
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
                if self._per_ip[ip] >= self.limits.max_per_ip:
                    log.warning("refused a connection from %s: %d open from that address", ip, self._per_ip[ip])
                    sock.close()
                    slots.release()
                    continue
                self._per_ip[ip] += 1
                task = loop.create_task(self._connection(sock, ip))
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

    async def _connection(self, sock: socket.socket, ip: str) -> None:
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
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        c = _Link(h11.Connection(h11.SERVER, max_incomplete_event_size=lim.max_header_bytes), reader, writer)
        c.ip = ip
        pending: object = None  # a pipelined request h11 had already parsed
        try:
            while True:
                if start < 0:  # keep-alive: wait for the next request's first bytes
                    pending = c.conn.next_event()
                    if pending is h11.NEED_DATA:
                        pending = None
                        try:
                            async with asyncio.timeout(lim.idle_timeout_s):
                                c.conn.receive_data(await reader.read(READ))
                        except TimeoutError:
                            return
                    start = loop.time()
                if not await self._exchange(c, start, pending):
                    return
                c.conn.start_next_cycle()
                start = -1.0
        except TimeoutError:  # before OSError, its base class
            log.info("closed a connection from %s: request not complete within its deadline", ip)
        except (OSError, _Closed, h11.ProtocolError) as e:
            log.debug("connection from %s closed: %s", ip, e)
        finally:
            c.writer.close()

    async def _exchange(self, c: _Link, start: float, pending: object) -> bool:
        """Serve one request; True if the connection may carry another."""
        try:
            async with asyncio.timeout_at(start + self.limits.header_timeout_s):
                request = pending if pending is not None else await _next_event(c.conn, c.reader)
        except h11.RemoteProtocolError as e:
            log.warning("bad request from %s: %s", c.ip, e)
            await c.refuse(e.error_status_hint, f"bad request: {e}")
            return False
        if isinstance(request, h11.ConnectionClosed):
            return False
        if not isinstance(request, h11.Request):
            raise _Closed(f"unexpected {type(request).__name__}")
        method, path = request.method.decode("ascii", "replace"), request.target.decode("ascii", "replace")
        path = path.split("?", 1)[0]
        if not fleet_allowed(method, path):
            log.warning("refused %s %s from %s (only the Fleet API is served here)", method, path[:200], c.ip)
            await c.refuse(403, "forbidden: this port serves the Flower Fleet API (sites) only")
            return False
        headers = list(request.headers)
        if sum(len(k) + len(v) + 4 for k, v in headers) > self.limits.max_header_bytes:
            log.warning("bad request from %s: headers over %d bytes", c.ip, self.limits.max_header_bytes)
            await c.refuse(431, f"request headers over {self.limits.max_header_bytes} bytes")
            return False
        try:
            c.proven = self.auth.check(headers, c.proven)
        except AuthRefused as e:
            log.warning("refused %s from %s: %s", path, c.ip, e.reason)
            await c.refuse(e.status, e.reason, flower_code=ACTIVATION_FAILED)
            return False
        if any(k == b"transfer-encoding" for k, _ in headers):
            await c.refuse(411, "a Content-Length is required (no chunked uploads)")
            return False
        length = next((int(v) for k, v in headers if k == b"content-length"), 0)  # h11 checked its format
        if length > self.max_body:
            log.warning("refused %s from %s: body of %d bytes (limit %d)", path, c.ip, length, self.max_body)
            await c.refuse(413, f"request body of {length} bytes refused (limit {self.max_body})")
            return False
        fwd = [(k, v) for k, v in headers if k not in HOP]
        fwd += [(b"host", f"{self.upstream[0]}:{self.upstream[1]}".encode()), (b"content-length", str(length).encode())]
        return await self._forward(c, start, h11.Request(method=b"POST", target=path.encode(), headers=fwd))

    async def _forward(self, c: _Link, start: float, request: h11.Request) -> bool:
        """Stream `request`'s body to the SuperLink and its answer back; True if `c` may carry another."""
        try:
            up = await self._borrow()
        except (OSError, TimeoutError) as e:
            log.warning("upstream SuperLink unreachable for %s: %r", c.ip, e)
            await c.refuse(502, "the coordinator's SuperLink is not reachable")
            return False
        try:
            async with asyncio.timeout_at(start + self.limits.request_timeout_s):  # the body, as it arrives
                await _pump(c.conn, c.reader, up.conn, up.writer, up.conn.send(request))
        except BaseException:
            up.writer.close()
            raise
        try:
            async with asyncio.timeout(self.limits.upstream_timeout_s):
                response = await _next_event(up.conn, up.reader)
                if not isinstance(response, h11.Response):
                    raise _Closed(f"SuperLink answered {type(response).__name__}")
                out = [(k, v) for k, v in response.headers if k not in HOP or k == b"content-length"]
                head = c.conn.send(h11.Response(status_code=response.status_code, headers=out, reason=response.reason))
                await _pump(up.conn, up.reader, c.conn, c.writer, head)
        except (OSError, TimeoutError, _Closed, h11.ProtocolError) as e:
            up.writer.close()
            if c.conn.our_state is not h11.SEND_RESPONSE:
                raise
            log.warning("upstream SuperLink failed for %s: %r", c.ip, e)
            await c.refuse(502, "the coordinator's SuperLink did not answer")
            return False
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE and len(self._pool) < 32:
            up.conn.start_next_cycle()
            up.idle_since = asyncio.get_running_loop().time()
            self._pool.append(up)
        else:
            up.writer.close()
        return c.conn.our_state is h11.DONE and c.conn.their_state is h11.DONE

    async def _borrow(self) -> _Link:
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
        return _Link(h11.Connection(h11.CLIENT), reader, writer)


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
