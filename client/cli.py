"""`brainjepa-client`: join a federation as one imaging site (a Flower SuperNode with the site's config)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainjepa.federation.flower import flower_env, supernode_command
from brainjepa.federation.processes import free_port, start_process
from sites.errors import InputError

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main_command(
    site: Annotated[Path, typer.Option(help="This site's YAML config (data location, TR, ROI layout, ...).")],
    gradients: Annotated[Path, typer.Option(help="The federation's gradient file (the same as the server's).")],
    server: Annotated[str, typer.Option(help="The coordinator's HOST:PORT.")] = "127.0.0.1:9092",
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate to verify the server (TLS).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS (testing only): weights travel unencrypted.")] = False,
    auth_key: Annotated[Path | None, typer.Option(help="This site's SuperNode private key (registered at the server).")] = None,
    log_dir: Annotated[Path, typer.Option(help="Where the SuperNode log goes.")] = Path("runs/site-logs"),
    runtime_port: Annotated[int, typer.Option(help="Local port for the site's ClientApp API (0: any free port).")] = 0,
) -> None:
    """Join the federation at --server as the site described by --site. Scans never leave this machine:
    only model weights and metrics do. Ctrl-C leaves the federation cleanly."""
    from brainjepa.config import load_site
    from brainjepa.gradients import gradient_checksum, load_gradients

    if insecure == (root_certificates is not None):
        raise typer.BadParameter("give --root-certificates CA.crt, or --insecure (testing only)")
    try:  # fail here, with a clear message, rather than in the first round
        cfg, _ = load_site(site)  # the whole file, runtime sections (device, perf, privacy) included
        grads = load_gradients(gradients, n_rois=cfg.n_rois)
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    if insecure:
        typer.secho("!! --insecure: NO TLS. Model weights travel unencrypted. Local tests only. !!",
                    fg=typer.colors.RED, bold=True, err=True)  # fmt: skip
    cmd = supernode_command(
        server, runtime_port or free_port(), {"site-config": str(site.resolve()), "gradients": str(gradients.resolve())},
        root_cert=root_certificates.resolve() if root_certificates else None,
        auth_private_key=auth_key.resolve() if auth_key else None,
    )
    log_path = (log_dir / f"supernode-{cfg.site}.log").resolve()
    typer.echo(f"site '{cfg.site}': {cfg.n_rois} ROIs, TR {cfg.tr} s, data under {cfg.data.root}")
    typer.echo(f"gradient file {gradients} (checksum {gradient_checksum(grads)[:16]}...)")
    typer.echo(f"joining the federation at {server}; SuperNode log: {log_path} (Ctrl-C to leave)")
    # The user's FLWR_HOME (None); a new session: Ctrl-C reaches only us, and we stop the SuperNode's tree.
    proc = start_process("supernode", cmd, log_path, flower_env(None))
    try:
        code = proc.wait()
        typer.echo(f"SuperNode exited with code {code}; see {log_path}")
        if code:
            lines = log_path.read_text(errors="replace").splitlines()[-40:]
            why = [ln for ln in lines if "Exit Code" in ln or "[code:" in ln or "Failed" in ln]
            for ln in why:
                typer.secho(f"  {ln.strip()}", fg=typer.colors.RED, err=True)
            if any("305" in ln for ln in why):
                typer.secho("  (exit 305: the SuperLink refused this site: is its public key registered at the "
                            "coordinator with --auth-public-key?)", fg=typer.colors.RED, err=True)  # fmt: skip
        raise typer.Exit(code)
    except KeyboardInterrupt:
        typer.echo("\nCtrl-C: leaving the federation")
        proc.stop(grace_s=15.0)  # SIGINT (a clean leave), then SIGTERM, then SIGKILL, the whole tree
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
