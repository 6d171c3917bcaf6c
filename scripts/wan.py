"""A modelled WAN between SuperNodes and the SuperLink, for `scripts/transport_bench.py`.

- Bandwidth: the kernel's HTB shaper (`tc`) on the loopback device of a private network namespace
  (`unshare -rn`: an unprivileged user + network namespace; this kernel has no `netem`). Each site gets
  its own link: one class for its uplink (packets to its relay port), one for its downlink (packets from
  it), each at the given rate. Everything else on loopback (ServerApp <-> SuperLink, SuperNode <->
  ClientApp, the relay <-> SuperLink) is not shaped: those hops are on one machine in a deployment.
- Round-trip time: a user-space TCP relay per site between its SuperNode and the SuperLink; every chunk
  is delivered RTT / 2 after it arrived, in each direction, in order. The relay also counts the HTTP
  requests the SuperNode makes (with their times), so that a round's request count can be read off.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

IN_NETNS = "BRAINJEPA_BENCH_NETNS"


def reexec_in_netns() -> None:
    """Re-run this command inside a fresh user + network namespace with loopback up (once)."""
    if os.environ.get(IN_NETNS):
        return
    env = {**os.environ, IN_NETNS: "1"}
    cmd = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    os.execvpe("unshare", cmd, env)


def shape_links(ports: list[int], mbit: float) -> None:
    """Per relay port: uplink (dport) and downlink (sport) classes at `mbit` each; the rest unshaped."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)
    if mbit <= 0:
        return
    tc = ["tc"]
    cmds = [["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "0"]]
    for i, port in enumerate(ports):
        for j, match in enumerate(("dport", "sport")):  # to the relay (uplink), from it (downlink)
            cls = f"1:{10 + 2 * i + j}"
            cmds.append(
                ["class", "add", "dev", "lo", "parent", "1:", "classid", cls, "htb", "rate", f"{mbit}mbit"]
                + ["burst", "256k", "cburst", "256k", "quantum", "65536"]
            )
            cmds.append(
                ["filter", "add", "dev", "lo", "protocol", "ip", "parent", "1:", "prio", "1", "u32"]
                + ["match", "ip", match, str(port), "0xffff", "flowid", cls]
            )
    for c in cmds:
        subprocess.run(tc + c, check=True, capture_output=True)


@dataclass
class Relay:
    """Relays 127.0.0.1:<port> -> 127.0.0.1:<upstream> for each port, delaying each direction by
    rtt_ms / 2, counting the client's HTTP requests."""

    ports: list[int]
    upstream: Callable[[], int]  # the SuperLink's port (known once it started)
    rtt_ms: float = 0.0
    request_times: list[float] = field(default_factory=list)

    def start(self) -> Relay:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def requests_between(self, t0: float, t1: float) -> int:
        times = sorted(self.request_times)
        return bisect.bisect_right(times, t1) - bisect.bisect_left(times, t0)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        for port in self.ports:
            self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", port))
        ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream())
        await asyncio.gather(self._pipe(reader, up_writer, count=True), self._pipe(up_reader, writer, count=False))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
        delay = self.rtt_ms / 2000.0
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            try:
                while True:
                    due, chunk = await queue.get()
                    if not chunk:
                        break
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    dst.write(chunk)
                    await dst.drain()
            except ConnectionError:
                pass
            dst.close()

        task = asyncio.ensure_future(deliver())
        try:
            while chunk := await src.read(1 << 16):
                if count:
                    now = time.time()
                    self.request_times.extend(now for _ in range(chunk.count(b"POST /") + chunk.count(b"GET /")))
                await queue.put((time.monotonic() + delay, chunk))
        except ConnectionError:
            pass
        await queue.put((0.0, b""))
        await task
