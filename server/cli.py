"""`brainjepa-server`: run the federation's coordinator (a Flower SuperLink plus the pretraining run)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.errors import InputError
from brainjepa.federation.launcher import (
    TlsFiles,
    flower_bin,
    flower_env,
    flwr_run_command,
    run_failed,
    run_simulation,
    superlink_command,
    toml_pairs,
    write_app_dir,
    write_connection,
)
from brainjepa.federation.processes import ManagedProcess, free_port, private_dir, start_process, wait_for_port
from brainjepa.federation.tls import certificate_names, make_ca, make_server_cert
from server.config import FederationConfig, from_run_config, to_run_config
from server.fleet_front import proxy_command, write_nginx_config
from server.options import check_address, check_files, parse_pairs
from server.registry import load_sites_file, register_sites

# Option defaults are the run config's (server.config.FederationConfig), never written twice.
D = FederationConfig()

app = typer.Typer(
    help="Coordinate a federated Brain-JEPA pretraining run (Flower SuperLink + ServerApp).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
log = logging.getLogger("server.cli")


@app.callback()
def _root() -> None:
    """Coordinate a federated Brain-JEPA pretraining run (Flower SuperLink + ServerApp)."""


@app.command()
def start(
    gradients: Annotated[
        Path,
        typer.Option(
            help="The federation's gradient file (every site uses the same; `brainjepa gradients --site ...` makes one from the sites' FC sums)."
        ),
    ],
    address: Annotated[
        str,
        typer.Option(
            help="HOST:PORT sites connect to: a TLS proxy that serves only Flower's Fleet API (the SuperLink itself listens on 127.0.0.1)."
        ),
    ] = "0.0.0.0:9092",
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = D.num_rounds,
    local_steps: Annotated[int, typer.Option(help="Local JEPA optimizer steps per site per round.")] = D.local_steps,
    min_sites: Annotated[
        int, typer.Option(help="Sites a round needs (fewer valid updates: the run stops, resumable).")
    ] = D.min_sites,
    fraction_sites: Annotated[
        float, typer.Option(help="Share of connected sites sampled per round.")
    ] = D.fraction_sites,
    strategy: Annotated[
        str, typer.Option(help="fedavg, fedavgm, fedadam, fedyogi, median or trimmed-mean.")
    ] = D.strategy,
    wire_dtype: Annotated[
        str, typer.Option(help="float32, float16 (half-precision transfer) or int8 (int8 deltas, error feedback).")
    ] = D.wire_dtype,
    model_size: Annotated[str, typer.Option(help="tiny, small, base or large.")] = D.model_size,
    pretrain_config: Annotated[
        Path | None, typer.Option(help="Pretraining YAML (model/mask/optim) instead of --model-size.")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option(help="Where run folders, logs and the SuperLink database go (created 0700).")
    ] = Path(D.out_dir),
    resume: Annotated[
        Path | None, typer.Option(help="Continue RUN_DIR from its last completed round (or --resume-round).")
    ] = None,
    resume_round: Annotated[
        int, typer.Option(help="With --resume: continue after this round (its kept round-NNN.pt); 0: the last.")
    ] = D.resume_round,
    run_config: Annotated[list[str], typer.Option(help="Extra run-config pairs, e.g. 'n-rois=450' (repeatable).")] = [],  # noqa: B006
    insecure: Annotated[
        bool, typer.Option(help="No TLS, no proxy, no site authentication; only on a 127.0.0.1 address. Testing only.")
    ] = False,
    ssl_ca_certfile: Annotated[
        Path | None, typer.Option(help="CA certificate that signed --ssl-certfile (the sites' --root-certificates).")
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="Server certificate (TLS), valid for the name sites connect to.")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Server private key (TLS).")] = None,
    sites_file: Annotated[
        Path | None,
        typer.Option(
            help="YAML: site name -> public-key (a site's SuperNode public key, ssh-keygen -t ecdsa -b 384) and max-samples. Only these sites can join; each is known by its key. Needs TLS."
        ),
    ] = None,
    keep_running: Annotated[bool, typer.Option(help="Keep the SuperLink up after the run (Ctrl-C to stop).")] = False,
    nginx: Annotated[
        bool,
        typer.Option(
            help="Start no Fleet proxy: write OUT_DIR/nginx-fleet.conf for nginx to serve --address (needs --sites-file; docs/federation.md)."
        ),
    ] = False,
    in_memory_state: Annotated[
        bool,
        typer.Option(
            help="SuperLink state in memory instead of OUT_DIR/superlink.db: ~1.5x faster transfers of large models, but after a coordinator crash every site must restart its client."
        ),
    ] = False,
) -> None:
    """Start a loopback-only SuperLink, the Fleet-only TLS proxy on ADDRESS, and submit the run.

    Sites join with `brainjepa-client --site SITE.yaml --server THIS_HOST:PORT --root-certificates CA
    --auth-key SITE_KEY`. Only the keys in --sites-file are registered (by this command; sites cannot
    register themselves), and a site is known by its key. Rounds wait until --min-sites sites are
    connected. Ctrl-C stops the run, the proxy and the SuperLink cleanly; the last completed round's
    checkpoint stays, and `--resume RUN_DIR` continues it.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.umask(0o077)  # everything this command and its processes create: owner-only
    tls_files = [ssl_ca_certfile, ssl_certfile, ssl_keyfile]
    if insecure and (any(tls_files) or sites_file or nginx):
        raise typer.BadParameter("--insecure excludes TLS certificates, --sites-file and --nginx")
    if nginx and sites_file is None:
        raise typer.BadParameter("--nginx needs --sites-file (nginx lets only the registered sites' keys through)")
    if not insecure and not all(tls_files):
        raise typer.BadParameter(
            "give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile, or --insecure (testing only)"
        )
    check_files(
        ssl_ca_certfile=ssl_ca_certfile,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        sites_file=sites_file,
        gradients=gradients,
    )
    host, port = check_address(address)
    if insecure and host not in ("127.0.0.1", "localhost", "::1"):
        raise typer.BadParameter(f"--insecure serves every API unauthenticated: only on 127.0.0.1, not '{host}'")
    if resume is not None and not resume.is_dir():
        raise typer.BadParameter(f"--resume: folder '{resume}' does not exist")
    wanted = f"round-{resume_round:03d}.pt" if resume_round else "checkpoint.pt"
    if resume is not None and not (resume / wanted).is_file():
        kept = sorted(p.name for p in resume.glob("round-*.pt"))
        raise typer.BadParameter(
            f"--resume: '{resume}' holds no {wanted} (kept rounds: {kept or 'none'}); nothing to resume"
        )
    if resume_round and resume is None:
        raise typer.BadParameter("--resume-round needs --resume RUN_DIR")
    work = private_dir(out_dir.resolve())
    try:
        sites = load_sites_file(sites_file.resolve()) if sites_file else None
        cfg = from_run_config(
            {
                **to_run_config(FederationConfig()),
                "num-rounds": rounds,
                "local-steps": local_steps,
                "min-sites": min_sites,
                "fraction-sites": fraction_sites,
                "strategy": strategy,
                "wire-dtype": wire_dtype,
                "gradients": str(gradients.resolve()),
                "model-size": model_size,
                "pretrain-config": str(pretrain_config.resolve()) if pretrain_config else "",
                "out-dir": str(work),
                "resume-dir": str(resume.resolve()) if resume else "",
                "resume-round": resume_round,
                "site-registry": str(work / "site_registry.json") if sites else "",
                **parse_pairs(run_config),
            }
        )
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    if sites is not None and cfg.min_sites > len(sites):
        typer.secho(
            f"error: --min-sites {cfg.min_sites} but the sites file names {len(sites)} site(s)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    logs = private_dir(work / "logs")
    flwr_home = work / ".flwr"
    env = flower_env(flwr_home)
    if insecure:
        typer.secho(
            "!! --insecure: NO TLS, no proxy, no site authentication: every Flower API on this port. "
            "Local tests only. !!",
            fg=typer.colors.RED,
            bold=True,
            err=True,
        )
        link_host, link_port, link_tls = host, port, None
    else:
        # The SuperLink gets its own CA and 127.0.0.1 certificate (made here, 0600): only the proxy and our
        # own `flwr` commands talk to it; the hospital's certificate and key are read by the proxy only.
        ca = make_ca(work / "loopback-tls", "brainjepa loopback CA")
        cert = make_server_cert(ca, work / "loopback-tls", ["127.0.0.1", "localhost"], "superlink")
        link_host, link_port, link_tls = "127.0.0.1", free_port(), TlsFiles(ca.cert, cert.cert, cert.key)
        names = certificate_names(ssl_certfile.resolve())  # type: ignore[union-attr]
        typer.echo(
            f"server certificate {ssl_certfile} is valid for: {', '.join(names) or 'NO names (no SAN)'}; "
            f"sites must connect with one of these names"
        )
    write_connection(
        flwr_home, "coordinator", f"{link_host}:{link_port}", root_cert=link_tls.ca_cert if link_tls else None
    )
    database = None if in_memory_state else str(work / "superlink.db")
    superlink = start_process(
        "superlink",
        superlink_command(link_host, link_port, database, link_tls, enable_supernode_auth=sites is not None),
        logs / "superlink.log",
        env,
        cwd=work,
    )
    proxy: ManagedProcess | None = None
    run_proc: subprocess.Popen | None = None
    try:
        wait_for_port(superlink, link_host, link_port)
        if link_tls is not None and nginx:
            conf = write_nginx_config(
                work / "nginx-fleet.conf", address, f"127.0.0.1:{link_port}", ssl_certfile.resolve(),  # type: ignore[union-attr]
                ssl_keyfile.resolve(), link_tls.ca_cert, sites_file.resolve(),  # type: ignore[union-attr]
            )  # fmt: skip
            typer.echo(f"no Fleet proxy started: serve {address} with `nginx -c {conf}` (reload it after each start)")
        elif link_tls is not None:
            cmd = proxy_command(
                address, f"127.0.0.1:{link_port}", ssl_certfile.resolve(), ssl_keyfile.resolve(),  # type: ignore[union-attr]
                link_tls.ca_cert, sites_file.resolve() if sites_file else None,
            )  # fmt: skip
            proxy = start_process("fleet-proxy", cmd, logs / "fleet-proxy.log", env, cwd=work)
            wait_for_port(proxy, "127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
            typer.echo(
                f"sites connect to {address} (TLS, Fleet API only; log {logs / 'fleet-proxy.log'}); the "
                f"SuperLink's control and runtime APIs listen on 127.0.0.1:{link_port} only"
            )
        else:
            typer.echo(f"SuperLink listening on {address}")
        typer.echo(f"SuperLink log: {logs / 'superlink.log'}, state: {database or 'in memory'}")
        if sites is not None:
            try:
                nodes = register_sites(sites, flower_bin("flwr"), "coordinator", env, Path(cfg.site_registry))
            except InputError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from e
            for node, reg in nodes.items():
                typer.echo(
                    f"registered site '{reg.site}' (key {reg.fingerprint}) as node {node}"
                    f"{f', at most {reg.max_samples} samples' if reg.max_samples else ''}"
                )
        app_dir = write_app_dir(work / "app", to_run_config(cfg))
        cmd = flwr_run_command(app_dir, "coordinator")
        join = "--insecure" if insecure else "--root-certificates CA.crt --auth-key SITE_KEY"
        typer.echo(
            f"submitting the run: {cfg.num_rounds} rounds x {cfg.local_steps} local steps, waiting for "
            f"{cfg.min_sites} site(s); sites join with: brainjepa-client --site SITE.yaml --server "
            f"HOST:{port} --gradients GRADIENT_FILE {join}"
        )
        # Stream the ServerApp's log to this console; `flwr run` exits 0 even when the ServerApp failed.
        run_proc = subprocess.Popen(
            cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        failed = False
        assert run_proc.stdout is not None
        for line in run_proc.stdout:
            sys.stdout.write(line)
            failed = failed or run_failed(line)
        code = run_proc.wait() or int(failed)
        if failed:
            typer.secho(f"the run failed (see above and {work}/<run folder>/server.log)", fg=typer.colors.RED, err=True)
        if keep_running:
            typer.echo("run finished; SuperLink still up (Ctrl-C to stop)")
            while superlink.alive():
                time.sleep(1)
        raise typer.Exit(code)
    except typer.Exit:  # click's Exit is a RuntimeError: not one of the failures below
        raise
    except (RuntimeError, TimeoutError) as e:  # a process that did not start (port in use, bad certificate)
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    except KeyboardInterrupt:
        typer.echo("\nCtrl-C: stopping the run and the SuperLink (the last completed round's checkpoint is kept)")
        if run_proc is not None and run_proc.poll() is None:
            run_proc.send_signal(signal.SIGINT)
            try:
                run_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                run_proc.kill()
        raise typer.Exit(130) from None
    finally:
        if proxy is not None:
            proxy.stop()
        superlink.stop()
        typer.echo(f"SuperLink stopped; logs in {logs}")


@app.command()
def simulate(
    sites: Annotated[int, typer.Option(help="Generated demo sites (one simulated SuperNode each).")] = 3,
    subjects: Annotated[int, typer.Option(help="Subjects per generated site.")] = 24,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = D.num_rounds,
    local_steps: Annotated[int, typer.Option(help="Local JEPA optimizer steps per site per round.")] = D.local_steps,
    out_dir: Annotated[Path, typer.Option(help="Run folders and the generated sites (OUT_DIR/sites) go here.")] = Path(
        D.out_dir
    ),
    run_config: Annotated[
        list[str],
        typer.Option(
            help="Extra run-config pairs, e.g. 'strategy=\"fedadam\"'; 'sites-dir' and 'gradients' together simulate your own sites."
        ),
    ] = [],  # noqa: B006
    prepare_only: Annotated[
        bool,
        typer.Option(
            help="Only prepare the sites and their gradient file, and print the `flwr run` command that simulates them."
        ),
    ] = False,
) -> None:
    """One-machine demo: `flwr run` with Flower's simulation engine, N generated sites, a tiny model.

    First generates the sites and their federation's gradient file (from the sites' FC sums) under
    OUT_DIR/sites, unless they are there already; then runs the same ServerApp and ClientApp as a real
    deployment, and stops Flower's detached simulation SuperLink at the end. Outputs (checkpoint, CSVs,
    loss PNG) under the run folder printed at the end.
    """
    import dataclasses

    from brainjepa.demo import prepare_federation  # imports torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = out_dir.resolve()
    try:
        cfg = from_run_config(
            {
                **to_run_config(FederationConfig()),
                "num-rounds": rounds,
                "local-steps": local_steps,
                "min-sites": sites,
                "out-dir": str(work),
                **parse_pairs(run_config),
            }
        )
        if not cfg.sites_dir:
            m, tr = cfg.pretrain().model, cfg.pretrain().data.model_tr
            demo = prepare_federation(
                work / "sites", sites, subjects, m.n_rois, m.n_frames, tr, m.gradient_components, cfg.seed
            )
            cfg = dataclasses.replace(cfg, sites_dir=str(demo.sites_dir), gradients=str(demo.gradients))
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    n_nodes = len(list(Path(cfg.sites_dir).glob("*/*.yaml")))
    run = {k: v for k, v in to_run_config(cfg).items() if k in ("sites-dir", "gradients", "out-dir")}
    if prepare_only:
        typer.echo(f"{n_nodes} sites under {cfg.sites_dir}, gradient file {cfg.gradients}; simulate them with:")
        typer.echo(
            f"  flwr run . --stream --run-config '{toml_pairs(run)}' "
            f"--federation-config 'num-supernodes={n_nodes} client-resources-num-cpus=1'"
        )
        raise typer.Exit(0)
    app_dir = write_app_dir(work / "app", to_run_config(cfg))
    typer.echo(f"simulating {n_nodes} sites x {rounds} rounds x {local_steps} local steps (Flower simulation engine)")
    res = run_simulation(app_dir, work, num_supernodes=n_nodes, timeout_s=None, stream=True)
    raise typer.Exit(res.returncode)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
