"""Subprocesses started and stopped cleanly: each in its own session, its output in a log file.

Generic (nothing Flower-specific): `launcher.py` builds the command lines and environments of Flower's
processes and starts them with `start_process`.

Every process is started in its own session (process group) so that stopping it also stops the
subprocesses it spawns (Flower's `flwr-serverapp` / `flwr-clientapp`). Processes are only ever
stopped by their own id / group id, or by the ids of their descendants found in /proc.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def private_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if needed; the folder itself is made owner-only (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), including ones that started their own session."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += children.get(child, [])
    return out


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each pid that is still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class ManagedProcess:
    """A subprocess in its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its exit code."""
        return self.popen.wait(timeout=timeout)

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except FileNotFoundError:
            return ""

    def signal_group(self, sig: int) -> None:
        """Send `sig` to this process's group (the process and the subprocesses it spawned)."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process, its group and every descendant at once (a crash, not a shutdown)."""
        tree = descendants(self.popen.pid) if self.alive() else []
        self.signal_group(signal.SIGKILL)
        kill_pids(tree)
        self.popen.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGINT (Flower shuts down cleanly on it), then SIGTERM, then SIGKILL; returns the exit code.

        Descendants that detached into their own session (Flower's SuperExec, ServerApp and ClientApp
        processes) are remembered first and killed by pid if they outlive their parent.
        """
        tree = descendants(self.popen.pid) if self.alive() else []
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            self.signal_group(sig)
            try:
                self.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Children may outlive the leader: make sure none is left.
        self.signal_group(signal.SIGKILL)
        kill_pids(tree)
        return self.popen.poll()


def start_process(
    name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> ManagedProcess:
    """Start `cmd` in a new session with stdout+stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting %s: %s (log: %s)", name, " ".join(cmd), log_path)
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def wait_for_port(proc: ManagedProcess, host: str, port: int, timeout_s: float = 60.0) -> None:
    """Wait until `host:port` accepts TCP connections; error with the log tail if the process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with code {proc.popen.returncode} before listening on {host}:{port}; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"{proc.name} did not listen on {host}:{port} within {timeout_s:.0f} s; log {proc.log_path}:\n{proc.log_tail()}"
    )


def pids_with_args(*needles: str) -> list[int]:
    """Pids of processes whose command line has every one of `needles` as a whole argument."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        text = [a.decode(errors="replace") for a in args]
        if all(n in text for n in needles):
            out.append(int(entry.name))
    return out


def pids_mentioning(text: str) -> list[int]:
    """Pids of live processes with `text` inside one of their command-line arguments (not ours)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text.encode() in args:
            out.append(int(entry.name))
    return out


def wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait until every pid has exited (a zombie counts as gone: its command line is empty)."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if not Path(f"/proc/{pid}/cmdline").read_bytes():
                    break
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.1)


def kill_trees(pids: Iterable[int], timeout_s: float) -> None:
    """SIGKILL each of `pids` and all its descendants; wait (up to `timeout_s`) until they are gone."""
    doomed = [q for pid in pids for q in (pid, *descendants(pid))]
    kill_pids(doomed)
    wait_gone(doomed, timeout_s)
