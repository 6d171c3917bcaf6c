"""`brainjepa-client`: join a federation as one imaging site (a Flower SuperNode with the site's config)."""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.errors import InputError
from brainjepa.federation.launcher import flower_env, supernode_command
from brainjepa.federation.names import check_site_name
from brainjepa.federation.processes import ManagedProcess, free_port, start_process

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def probe_coordinator(server: str, root_cert: Path | None, timeout_s: float = 5.0) -> str | None:
    """Why the coordinator at `server` (HOST:PORT) cannot be used, or None: a TCP connection and, with
    `root_cert`, a TLS handshake that verifies its certificate (chain and name), within `timeout_s`."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--server: expected HOST:PORT with a port in 1-65535, got '{server}'"
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as e:
        return (
            f"cannot reach the coordinator at {server}: {e.strerror or e} (is `brainjepa-server start` running "
            f"there, and is the port open to this machine?)"
        )
    with sock:
        if root_cert is None:
            return None
        ctx = ssl.create_default_context(cafile=str(root_cert))
        try:
            with ctx.wrap_socket(sock, server_hostname=host.strip("[]")):
                return None
        except ssl.SSLCertVerificationError as e:
            return (
                f"the coordinator's TLS certificate at {server} does not verify against --root-certificates "
                f"{root_cert}: {e.verify_message} (a name mismatch means the certificate's SAN lacks '{host}': "
                f"connect with a name it holds, or ask the coordinator for a certificate with this one)"
            )
        except (ssl.SSLError, OSError) as e:
            return f"TLS handshake with the coordinator at {server} failed: {e}"


def pinned_app_env(bin_dir: Path) -> dict[str, str]:
    """The SuperNode's environment with our `flwr-clientapp` (client.pinned_app: only the federation's app
    bundle runs) first on its PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    script = bin_dir / "flwr-clientapp"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m client.pinned_app "$@"\n')
    script.chmod(0o700)
    env = flower_env(None)
    env["PATH"] = str(bin_dir) + os.pathsep + env["PATH"]
    return env


def follow(proc: ManagedProcess, poll_s: float = 0.5) -> int:
    """Echo the SuperNode's log (Flower's and this site's ClientApp lines) to the console until it exits."""
    pos = 0
    while True:
        alive = proc.alive()
        try:
            with open(proc.log_path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = ""
        for line in chunk.splitlines():
            err = "ERROR" in line or "site failed" in line or "site refused" in line
            typer.secho(f"  | {line}", fg=typer.colors.RED if err else None, err=err)
        if not alive:
            return proc.wait()
        time.sleep(poll_s)


@app.command()
def main_command(
    site: Annotated[Path, typer.Option(help="This site's YAML config (data location, TR, ROI layout, ...).")],
    gradients: Annotated[Path, typer.Option(help="The federation's gradient file (the same as the server's).")],
    server: Annotated[str, typer.Option(help="The coordinator's HOST:PORT.")] = "127.0.0.1:9092",
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate to verify the server (TLS).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS (testing only): weights travel unencrypted.")] = False,
    auth_key: Annotated[
        Path | None, typer.Option(help="This site's SuperNode private key (registered at the server).")
    ] = None,
    log_dir: Annotated[Path, typer.Option(help="Where the SuperNode log goes.")] = Path("runs/site-logs"),
    runtime_port: Annotated[int, typer.Option(help="Local port for the site's ClientApp API (0: any free port).")] = 0,
    trust_any_app: Annotated[
        bool,
        typer.Option(
            help="Run any app bundle the coordinator sends (development only); by default only the brainjepa ClientApp installed here runs."
        ),
    ] = False,
) -> None:
    """Join the federation at --server as the site described by --site. Scans never leave this machine:
    only model weights and metrics do. Ctrl-C leaves the federation cleanly."""
    from brainjepa.config import load_site
    from brainjepa.gradients import gradient_checksum, load_gradients

    os.umask(0o077)  # logs and the site's state: owner-only
    if insecure == (root_certificates is not None):
        raise typer.BadParameter("give --root-certificates CA.crt, or --insecure (testing only)")
    for option, path in (("--root-certificates", root_certificates), ("--auth-key", auth_key)):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{option}: file '{path}' does not exist")
    try:  # fail here, with a clear message, rather than in the first round
        cfg, _ = load_site(site)  # the whole file, runtime sections (device, perf, privacy) included
        check_site_name(cfg.site, f"site config '{site}', field 'site'")
        grads = load_gradients(gradients, n_rois=cfg.n_rois)
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    problem = probe_coordinator(server, root_certificates.resolve() if root_certificates else None)
    if problem:
        typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(3)
    if insecure:
        typer.secho(
            "!! --insecure: NO TLS. Model weights travel unencrypted. Local tests only. !!",
            fg=typer.colors.RED,
            bold=True,
            err=True,
        )
    cmd = supernode_command(
        server,
        runtime_port or free_port(),
        {"site-config": str(site.resolve()), "gradients": str(gradients.resolve())},
        root_cert=root_certificates.resolve() if root_certificates else None,
        auth_private_key=auth_key.resolve() if auth_key else None,
    )
    log_path = (log_dir / f"supernode-{cfg.site}.log").resolve()
    typer.echo(f"site '{cfg.site}': {cfg.n_rois} ROIs, TR {cfg.tr} s, data under {cfg.data.root}")
    typer.echo(
        f"gradient file {gradients}: {grads.shape[0]} ROIs x {grads.shape[1]} components (checksum "
        f"{gradient_checksum(grads)[:16]}...; the coordinator's model must use the same)"
    )
    typer.echo(f"joining the federation at {server}; SuperNode log: {log_path} (Ctrl-C to leave)")
    # The user's FLWR_HOME (None); a new session: Ctrl-C reaches only us, and we stop the SuperNode's tree.
    env = flower_env(None) if trust_any_app else pinned_app_env(log_path.parent / ".pinned-app-bin")
    proc = start_process("supernode", cmd, log_path, env)
    try:
        code = follow(proc)
        typer.echo(f"SuperNode exited with code {code}; see {log_path}")
        if code:
            lines = log_path.read_text(errors="replace").splitlines()[-40:]
            why = [ln for ln in lines if "Exit Code" in ln or "[code:" in ln or "Failed" in ln]
            for ln in why:
                typer.secho(f"  {ln.strip()}", fg=typer.colors.RED, err=True)
            if any("305" in ln for ln in why):
                typer.secho(
                    "  (exit 305: the coordinator refused to activate this site: either its public key is not "
                    "in the coordinator's --sites-file, or the coordinator still lists this site as connected "
                    "from a session that ended without leaving: it forgets it within 60 s, try again then)",
                    fg=typer.colors.RED,
                    err=True,
                )
        raise typer.Exit(code)
    except KeyboardInterrupt:
        typer.echo("\nCtrl-C: leaving the federation")
        proc.stop(grace_s=15.0)  # SIGINT (a clean leave), then SIGTERM, then SIGKILL, the whole tree
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
