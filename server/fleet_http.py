"""One HTTP/1.1 connection of the Fleet proxy (`server.fleet_proxy`), on asyncio streams: llhttp (Node.js's
parser, through httptools, as in uvicorn) turns the bytes into events, and a message body is streamed
from one connection to another as it arrives, never held whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from http import HTTPStatus

import httptools

log = logging.getLogger("server.fleet_proxy")
READ = 2**16  # bytes per socket read
# What llhttp raises on a request it will not parse (an Upgrade or CONNECT is not an HttpParserError).
PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class Closed(Exception):
    """The peer went away (or broke the protocol) mid-message: close quietly."""


class Link:
    """One HTTP/1.1 connection: its streams and an llhttp parser (httptools) turning bytes into events
    ("head", "body", "end"); `proven` is the key it proved (fleet_auth); `keep` whether it may be reused."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bool = False) -> None:
        self.reader, self.writer = reader, writer
        self.parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(self)
        self.events: deque[tuple[str, object]] = deque()
        self.url, self.headers, self.fed = b"", [], 0  # `fed`: bytes fed since the last message ended
        self.ip, self.proven, self.idle_since, self.answered, self.keep = "", None, 0.0, False, True

    # httptools' callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.events.append(("head", (self.url, self.headers)))
        self.url, self.headers = b"", []

    def on_body(self, body: bytes) -> None:
        self.events.append(("body", body))

    def on_message_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()
        self.events.append(("end", None))

    async def next_event(self, header_limit: int = 0) -> tuple[str, object]:
        """The next event, reading as needed (the caller bounds the time); a head over `header_limit` bytes
        is refused (HttpParserError)."""
        while not self.events:
            data = await self.reader.read(READ)
            if not data:
                raise Closed("connection closed")
            self.fed += len(data)
            self.parser.feed_data(data)
            if header_limit and not self.events and self.fed > header_limit:
                raise httptools.HttpParserError(f"request headers over {header_limit} bytes")
        return self.events.popleft()

    async def pump(self, dst: asyncio.StreamWriter, head: bytes, chunked: bool) -> None:
        """Stream this message's body to `dst` after `head` (`chunked`: in HTTP/1.1 chunks). Writes wait until
        body bytes are there and more must be read: a small message goes out as one TLS record and packet."""
        out, body = bytearray(head), False
        while True:
            if not self.events and body and out:
                dst.write(out)
                out = bytearray()
                await dst.drain()
            kind, data = await self.next_event()
            if kind == "body":
                out += b"%x\r\n%s\r\n" % (len(data), data) if chunked else data  # type: ignore[arg-type, str-format]
                body = True
                if len(out) >= READ:
                    dst.write(out)
                    out = bytearray()
                    await dst.drain()
            elif kind == "end":
                dst.write(out + (b"0\r\n\r\n" if chunked else b""))
                self.fed = 0
                return await dst.drain()
            else:
                raise Closed(f"message body ended early ({kind})")

    async def refuse(self, status: int, text: str, flower_code: int = 0) -> None:
        """Answer `status` and close (Connection: close): the unread body, if any, is never read."""
        if self.answered:
            return
        self.answered, self.keep = True, False
        if flower_code and status == 412:  # Flower's error JSON: the SuperNode prints it and exits 305
            body, kind = json.dumps({"code": flower_code, "detail": text}).encode(), b"application/json"
        else:
            body, kind = (text + "\n").encode(), b"text/plain; charset=utf-8"
        head = response_head(status, [(b"content-type", kind), (b"content-length", b"%d" % len(body))], close=True)
        try:
            self.writer.write(head + body)
            async with asyncio.timeout(5):
                await self.writer.drain()
        except (OSError, TimeoutError) as e:
            log.debug("could not send %d: %s", status, e)


def response_head(status: int, headers: list[tuple[bytes, bytes]], close: bool = False) -> bytes:
    """A response's status line and headers."""
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    lines = [b"HTTP/1.1 %d %s" % (status, reason), *(k + b": " + v for k, v in headers)]
    return b"\r\n".join([*lines, *([b"connection: close"] if close else []), b"", b""])
