"""The launcher of Flower's processes on one machine: a SuperLink, SuperNodes and `flwr run`, started and
stopped cleanly.

Used by `brainjepa-server start` (SuperLink + the run), `brainjepa-client` (one SuperNode), the
integration tests (SuperLink + N SuperNodes on free loopback ports) and `scripts/transport_bench.py`.

Imports no Flower: it only builds the command lines and environments of Flower's console scripts and
runs them with `processes.start_process` (each in its own session, stopped by its own ids).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brainjepa.federation.processes import (
    ManagedProcess,
    free_port,
    kill_trees,
    pids_mentioning,
    pids_with_args,
    start_process,
    wait_for_port,
)

log = logging.getLogger(__name__)

# Environment every Flower process of ours gets (docs/federation.md): no `uv sync` of the app's
# dependencies at run time (offline it fails; with torch listed it fetches a CUDA build), no update
# check, no telemetry.
FLOWER_QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


# Flower moves arrays in chunks of this many bytes (default 5 MiB); 16 MiB moved ViT-B's weight sets
# fastest here (docs/federation.md). Every process that serialises arrays (ServerApp, ClientApp) reads it
# from its environment, inherited from the SuperLink / SuperNode we start. A value already set wins.
CHUNK_SIZE_ENV = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"
DEFAULT_CHUNK_SIZE = 16 * 2**20


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed next to this Python (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: ours + a private FLWR_HOME (None: the user's) + `extra`."""
    env = dict(os.environ)
    env.update(FLOWER_QUIET_ENV)
    env.setdefault(CHUNK_SIZE_ENV, str(DEFAULT_CHUNK_SIZE))
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    # Flower starts further console scripts (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def toml_value(value: object) -> str:
    """A Python scalar as a TOML value (node config and run config overrides are TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def toml_pairs(values: Mapping[str, object]) -> str:
    """`k1=v1 k2="v2"` as Flower's --node-config / --run-config expect."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


@dataclass(frozen=True)
class TlsFiles:
    """Certificates of a TLS-enabled SuperLink (CA, server certificate and key)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_command(
    host: str, port: int, database: str | None, tls: TlsFiles | None, enable_supernode_auth: bool = False
) -> list[str]:
    """Command line of a SuperLink serving Fleet, Control and Runtime APIs on one HTTP port."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if database:
        cmd += ["--database", database]
    if enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(
    superlink: str,
    port: int,
    node_config: Mapping[str, object],
    root_cert: Path | None = None,
    auth_private_key: Path | None = None,
) -> list[str]:
    """Command line of a SuperNode joining `superlink` (host:port) with `node_config`."""
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if root_cert is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_cert)]
    if auth_private_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_private_key)]
    if node_config:
        cmd += ["--node-config", toml_pairs(node_config)]
    return cmd


def write_connection(flwr_home: Path, name: str, address: str, root_cert: Path | None = None) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection `name` (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_cert}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# The ServerApp's line when a run stops on a clear error (no valid replies, no sites, bad resume folder).
RUN_STOPPED = "run stopped:"


def run_failed(output: str) -> bool:
    """`flwr run --stream` exits 0 even when the ServerApp raised: look for Flower's failure lines and ours."""
    return "ServerApp raised an exception" in output or "Exit Code:" in output or RUN_STOPPED in output


def _checked(result: subprocess.CompletedProcess, log_path: Path) -> subprocess.CompletedProcess:
    """`result` of a captured `flwr run`, its output saved to `log_path`, returncode 1 if it failed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode == 0 and run_failed(result.stdout + result.stderr):
        result.returncode = 1
    return result


def flwr_run_command(
    app_dir: Path, connection: str, run_config: Mapping[str, object] | None = None, stream: bool = True
) -> list[str]:
    cmd = [flower_bin("flwr"), "run", str(app_dir), connection]
    if run_config:
        cmd += ["--run-config", toml_pairs(run_config)]
    if stream:
        cmd.append("--stream")
    return cmd


@dataclass
class LocalFederation:
    """A SuperLink and N SuperNodes on free loopback ports, as separate processes (for tests / benches).

    Use as a context manager; `run()` submits an app with `flwr run ... --stream` and waits for it.
    """

    work_dir: Path
    node_configs: Sequence[Mapping[str, object]]
    env_extra: Mapping[str, str] = field(default_factory=dict)
    database: str | None = None
    host: str = "127.0.0.1"
    superlink: ManagedProcess | None = None
    supernodes: list[ManagedProcess] = field(default_factory=list)
    port: int = 0

    @property
    def flwr_home(self) -> Path:
        return self.work_dir / "flwr_home"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home, self.env_extra)

    def start(self, ready_timeout_s: float = 60.0) -> LocalFederation:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        write_connection(self.flwr_home, "local-deploy", self.address)
        self._start_superlink("superlink.log", ready_timeout_s)
        for i, node_config in enumerate(self.node_configs):
            self.add_supernode(node_config, name=f"supernode{i}")
        return self

    def add_supernode(self, node_config: Mapping[str, object], name: str) -> ManagedProcess:
        port = free_port(self.host)
        proc = start_process(
            name,
            supernode_command(self.address, port, node_config),
            self.work_dir / "logs" / f"{name}.log",
            self.env(),
            cwd=self.work_dir,
        )
        wait_for_port(proc, self.host, port)
        self.supernodes.append(proc)
        return proc

    def run(
        self, app_dir: Path, run_config: Mapping[str, object] | None = None, timeout_s: float = 600.0
    ) -> subprocess.CompletedProcess:
        """`flwr run app_dir local-deploy --stream`; its output goes to logs/flwr_run.log too."""
        cmd = flwr_run_command(app_dir, "local-deploy", run_config)
        log.info("running %s", " ".join(cmd))
        result = subprocess.run(
            cmd, env=self.env(), cwd=self.work_dir, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        return _checked(result, self.work_dir / "logs" / "flwr_run.log")

    def start_run(
        self, app_dir: Path, run_config: Mapping[str, object] | None = None, name: str = "flwr_run"
    ) -> ManagedProcess:
        """`flwr run ... --stream` in the background (tests that kill things mid-run)."""
        return start_process(
            name,
            flwr_run_command(app_dir, "local-deploy", run_config),
            self.work_dir / "logs" / f"{name}.log",
            self.env(),
            cwd=self.work_dir,
        )

    def restart_superlink(self, ready_timeout_s: float = 60.0) -> ManagedProcess:
        """A new SuperLink on the same address (SuperNodes reconnect to it by themselves)."""
        return self._start_superlink("superlink-restarted.log", ready_timeout_s)

    def _start_superlink(self, log_name: str, ready_timeout_s: float) -> ManagedProcess:
        self.superlink = start_process(
            "superlink",
            superlink_command(self.host, self.port, self.database, None),
            self.work_dir / "logs" / log_name,
            self.env(),
            cwd=self.work_dir,
        )
        wait_for_port(self.superlink, self.host, self.port, ready_timeout_s)
        return self.superlink

    def stop(self) -> None:
        for proc in [*self.supernodes, self.superlink]:
            if proc is not None:
                proc.stop()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def app_toml(
    run_config: Mapping[str, object],
    name: str = "brainjepa-federation",
    serverapp: str = "server.server_app:app",
    clientapp: str = "client.client_app:app",
) -> str:
    """A `pyproject.toml` declaring the brainjepa Flower app (ServerApp + ClientApp) with `run_config`.

    The app's code is the installed `server` / `client` packages; this file only wires them (the same
    `[tool.flwr.app]` section the project's own pyproject.toml carries, docs/federation.md).
    """
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "0.1.0"',
        'license = "Apache-2.0"',
        'description = "Brain-JEPA federated pretraining (brainjepa)"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "brainjepa"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{serverapp}"',
        f'clientapp = "{clientapp}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in run_config.items()]
    return "\n".join(lines) + "\n"


def write_app_dir(path: Path, run_config: Mapping[str, object], **components: str) -> Path:
    """A folder `flwr run` can submit: just the pyproject.toml of `app_toml`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(app_toml(run_config, **components))
    return path


def run_simulation(
    app_dir: Path,
    work_dir: Path,
    num_supernodes: int,
    run_config: Mapping[str, object] | None = None,
    env_extra: Mapping[str, str] | None = None,
    timeout_s: float | None = 900.0,
    stream: bool = False,
) -> subprocess.CompletedProcess:
    """`flwr run APP local --stream` (Ray simulation) with a private FLWR_HOME and private ports.

    `flwr run` starts a detached `flower-superlink --simulation` that outlives it: it is found by its
    (private) port and stopped, with everything under it, before returning.
    """
    port, control = free_port(), free_port()
    env = flower_env(
        work_dir / "flwr_home",
        {
            **(env_extra or {}),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        },
    )
    cmd = [
        *flwr_run_command(app_dir, "local", run_config),
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
    ]
    log.info("running %s", " ".join(cmd))
    try:
        result = subprocess.run(
            cmd, env=env, cwd=work_dir, capture_output=not stream, text=True, timeout=timeout_s, check=False
        )
    finally:
        home = str(work_dir / "flwr_home")  # the detached SuperLink's state and log live under it
        kill_trees(set(pids_with_args("--simulation", str(port))) | set(pids_mentioning(home)), timeout_s=15.0)
    return result if stream else _checked(result, work_dir / "logs" / "flwr_run_simulation.log")
