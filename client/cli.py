"""`brainjepa-client`: join a federation as one imaging site (a Flower SuperNode with the site's config)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.errors import InputError
from brainjepa.federation.launcher import flower_env, supernode_command
from brainjepa.federation.names import check_site_name
from brainjepa.federation.processes import ManagedProcess, free_port, start_process
from client.probe import probe_coordinator
from client.site_status import describe, read_status, status_lines
from sites.config import SiteConfig

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, invoke_without_command=True)
EXIT_GAVE_UP = 4  # the coordinator did not answer for --give-up-after-s
FINAL_GRACE_S = 60.0  # after the final reply: the longest wait for the coordinator to close the run


def pinned_app_env(bin_dir: Path, trust_any_app: bool = False) -> dict[str, str]:
    """The SuperNode's environment with our `flwr-clientapp` (client.pinned_app: only the federation's app
    bundle runs, unless `trust_any_app`; error replies are scrubbed) first on its PATH."""
    from client.pinned_app import TRUST_ANY_APP_ENV  # imports Flower: here, not when --help runs

    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    script = bin_dir / "flwr-clientapp"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m client.pinned_app "$@"\n')
    script.chmod(0o700)
    env = flower_env(None)
    env["PATH"] = str(bin_dir) + os.pathsep + env["PATH"]
    env[TRUST_ANY_APP_ENV] = "1" if trust_any_app else "0"
    return env


@dataclass
class Watch:
    """What `follow` watches besides the log: the coordinator (probed every `probe_every_s`; a site with no
    answer for `give_up_after_s` gives up) and the site's status file (the run's final round sent)."""

    site: SiteConfig
    server: str
    root_cert: Path | None
    give_up_after_s: float
    probe_every_s: float
    stay: bool = False
    started: float = field(default_factory=time.time)
    last_contact: float = field(default_factory=time.time)
    lost: bool = False
    sent: int = 0

    def probe(self) -> int | None:
        """An exit code if the site should give up, else None (and a line when contact is lost or back)."""
        why = probe_coordinator(self.server, self.root_cert, name_mismatch=False)
        now = time.time()
        if why is None:
            if self.lost:
                typer.echo(f"the coordinator at {self.server} answers again (since {_clock(now)})")
            self.last_contact, self.lost = now, False
            return None
        if not self.lost:
            self.lost = True
            typer.secho(
                f"the coordinator at {self.server} does not answer since {_clock(self.last_contact)} (last "
                f"contact): {why}; the SuperNode retries until {_clock(self.last_contact + self.give_up_after_s)} "
                f"(--give-up-after-s {self.give_up_after_s:g}), then this site leaves",
                fg=typer.colors.YELLOW,
                err=True,
            )
        if now - self.last_contact > self.give_up_after_s:
            typer.secho(
                f"giving up: no answer from the coordinator at {self.server} since {_clock(self.last_contact)} "
                f"(last contact), {self.give_up_after_s:g} s ago; restart this client when it is back",
                fg=typer.colors.RED,
                err=True,
            )
            return EXIT_GAVE_UP
        return None

    def run_complete(self) -> dict | None:
        """The status of the run's final round if this site has just sent it, else None."""
        self.sent += 1
        self.last_contact = time.time()
        status = read_status(self.site)
        return status if status and status.get("final") and status["time"] >= self.started else None


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def follow(proc: ManagedProcess, watch: Watch, poll_s: float = 0.5) -> tuple[int, bool]:
    """Echo the SuperNode's log (Flower's and this site's ClientApp lines) to the console until it exits, the
    federation's run ends at this site (0, with a summary) or the coordinator is gone for good (4). Returns
    the exit code and whether it is the SuperNode's own. After the final reply is sent the SuperNode stays
    until the coordinator closes the run (its port stops answering) or FINAL_GRACE_S pass: leaving at once
    would let the SuperLink turn a reply the ServerApp has not pulled yet into "Node Unavailable"."""
    pos, next_probe, done, done_at = 0, time.monotonic() + watch.probe_every_s, None, 0.0
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
            if "Sent successfully" in line and done is None and (done := watch.run_complete()):
                if watch.stay:
                    typer.echo(f"the run is complete at this site ({describe(done)}); staying joined (--stay)")
                    done = None
                    continue
                done_at, next_probe = time.monotonic(), time.monotonic() + 1.0
                typer.echo("the run's final round is answered; leaving once the coordinator closes the run")
        if not alive:
            return proc.wait(), True
        if done is not None and time.monotonic() >= next_probe:
            next_probe = time.monotonic() + 1.0
            if time.monotonic() - done_at > FINAL_GRACE_S or probe_coordinator(
                watch.server, watch.root_cert, name_mismatch=False
            ):
                eps = f"; epsilon spent {done['epsilon_spent']:.3f}" if done.get("epsilon_spent") else ""
                typer.echo(
                    f"the federation's run is complete at this site: {watch.sent} repl(y/ies) sent since "
                    f"{_clock(watch.started)}, the last {describe(done)}{eps}; leaving the federation"
                )
                proc.stop(grace_s=15.0)
                return 0, False
        elif time.monotonic() >= next_probe:
            next_probe = time.monotonic() + watch.probe_every_s
            if (code := watch.probe()) is not None:
                proc.stop(grace_s=15.0)
                return code, False
        time.sleep(poll_s)


@app.callback()
def main_command(
    ctx: typer.Context,
    site: Annotated[
        Path | None, typer.Option(help="This site's YAML config (data location, TR, ROI layout, ...).")
    ] = None,
    gradients: Annotated[
        Path | None, typer.Option(help="The federation's gradient file (the same as the server's).")
    ] = None,
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
    give_up_after_s: Annotated[
        float,
        typer.Option(
            help="Leave (exit 4) when the coordinator has not answered for this long; the console names the last contact and this deadline as soon as it stops answering."
        ),
    ] = 1800.0,
    probe_every_s: Annotated[float, typer.Option(help="How often the coordinator is checked while joined.")] = 15.0,
    stay: Annotated[
        bool,
        typer.Option(
            help="When the run is complete at this site, stay joined for the federation's next run (a resumed, fine-tuning or evaluation run) instead of exiting 0."
        ),
    ] = False,
) -> None:
    """Join the federation at --server as the site described by --site (`brainjepa-client status --site
    FILE`: the site's last round, privacy budget and whether the coordinator answers). Scans never leave
    this machine: only model weights and metrics do. Exits 0 with a summary when the federation's run is
    complete at this site; Ctrl-C leaves the federation cleanly."""
    if ctx.invoked_subcommand is not None:
        return
    if site is None or gradients is None:
        raise typer.BadParameter("give --site SITE.yaml and --gradients GRADIENT_FILE")
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
    typer.echo(
        f"this site leaves when the federation's run is complete here{' (not with --stay)' if stay else ''}, or "
        f"when the coordinator has not answered "
        f"for {give_up_after_s:g} s (--give-up-after-s)"
    )
    root = root_certificates.resolve() if root_certificates else None
    watch = Watch(cfg, server, root, give_up_after_s, probe_every_s, stay)
    # The user's FLWR_HOME (None); a new session: Ctrl-C reaches only us, and we stop the SuperNode's tree.
    env = pinned_app_env(log_path.parent / ".pinned-app-bin", trust_any_app)
    proc = start_process("supernode", cmd, log_path, env)
    try:
        code, own = follow(proc, watch)
        if own:
            typer.echo(f"SuperNode exited with code {code}; see {log_path}")
        if code and own:
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


@app.command()
def status(
    site: Annotated[Path, typer.Option(help="This site's YAML config.")],
    server: Annotated[str | None, typer.Option(help="The coordinator's HOST:PORT, to check that it answers.")] = None,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate to verify the server (TLS).")] = None,
) -> None:
    """The site's part in the federation: its last round, the privacy budget its ledger records as spent
    (epsilon), and (with --server) whether the coordinator answers."""
    try:
        for line in status_lines(site, server, root_certificates.resolve() if root_certificates else None):
            typer.echo(line)
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e


def main() -> None:
    app()


if __name__ == "__main__":
    main()
