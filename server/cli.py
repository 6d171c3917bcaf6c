"""`brainjepa-server`: run the federation's coordinator (a Flower SuperLink plus the pretraining run)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from brainjepa.federation.flower import (
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
from brainjepa.federation.processes import start_process, wait_for_port
from server.config import FederationConfig, from_run_config, to_run_config
from sites.errors import InputError

# Option defaults are the run config's (server.config.FederationConfig), never written twice.
D = FederationConfig()

app = typer.Typer(help="Coordinate a federated Brain-JEPA pretraining run (Flower SuperLink + ServerApp).",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)  # fmt: skip
log = logging.getLogger("server.cli")


@app.callback()
def _root() -> None:
    """Coordinate a federated Brain-JEPA pretraining run (Flower SuperLink + ServerApp)."""


def _parse_pairs(pairs: list[str]) -> dict[str, object]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10: tomli, the package tomllib was taken from
        import tomli as tomllib

    out: dict[str, object] = {}
    for pair in pairs:
        try:
            out.update(tomllib.loads(pair))
        except tomllib.TOMLDecodeError as e:
            raise typer.BadParameter(f"--run-config '{pair}': expected key=value with a TOML value ({e})") from e
    return out


@app.command()
def start(
    gradients: Annotated[Path, typer.Option(help="The federation's gradient file (every site uses the same; `brainjepa gradients --site ...` makes one from the sites' FC sums).")],
    address: Annotated[str, typer.Option(help="HOST:PORT the SuperLink listens on (sites connect here).")] = "0.0.0.0:9092",
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = D.num_rounds,
    local_steps: Annotated[int, typer.Option(help="Local JEPA optimizer steps per site per round.")] = D.local_steps,
    min_sites: Annotated[int, typer.Option(help="Sites a round needs (fewer valid updates: the run stops, resumable).")] = D.min_sites,
    fraction_sites: Annotated[float, typer.Option(help="Share of connected sites sampled per round.")] = D.fraction_sites,
    strategy: Annotated[str, typer.Option(help="fedavg, fedavgm or fedadam.")] = D.strategy,
    wire_dtype: Annotated[str, typer.Option(help="float32, or float16 (half-precision transfer).")] = D.wire_dtype,
    model_size: Annotated[str, typer.Option(help="tiny, small, base or large.")] = D.model_size,
    pretrain_config: Annotated[Path | None, typer.Option(help="Pretraining YAML (model/mask/optim) instead of --model-size.")] = None,
    out_dir: Annotated[Path, typer.Option(help="Where run folders, logs and the SuperLink database go.")] = Path(D.out_dir),
    resume: Annotated[Path | None, typer.Option(help="Continue RUN_DIR from its last completed round.")] = None,
    run_config: Annotated[list[str], typer.Option(help="Extra run-config pairs, e.g. 'n-rois=450' (repeatable).")] = [],  # noqa: B006
    insecure: Annotated[bool, typer.Option(help="No TLS: traffic (model weights) unencrypted. Testing only.")] = False,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="CA certificate (TLS).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="Server certificate (TLS).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Server private key (TLS).")] = None,
    auth_public_key: Annotated[list[Path], typer.Option(help="A site's SuperNode public key (ssh-keygen -t ecdsa -b 384); enables SuperNode authentication (needs TLS). Repeatable.")] = [],  # noqa: B006
    keep_running: Annotated[bool, typer.Option(help="Keep the SuperLink up after the run (Ctrl-C to stop).")] = False,
    in_memory_state: Annotated[bool, typer.Option(help="SuperLink state in memory instead of OUT_DIR/superlink.db: ~1.5x faster transfers of large models, but after a coordinator crash every site must restart its client.")] = False,
) -> None:
    """Start a SuperLink on ADDRESS and submit the federated pretraining run to it.

    Sites join with `brainjepa-client --site SITE.yaml --server THIS_HOST:PORT`. Rounds wait until
    --min-sites sites are connected. Ctrl-C stops the run and the SuperLink cleanly; the last completed
    round's checkpoint stays, and `--resume RUN_DIR` continues it.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tls_files = [ssl_ca_certfile, ssl_certfile, ssl_keyfile]
    if insecure and any(tls_files):
        raise typer.BadParameter("--insecure and TLS certificates are exclusive")
    if not insecure and not all(tls_files):
        raise typer.BadParameter("give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile, or --insecure (testing only)")
    if auth_public_key and insecure:
        raise typer.BadParameter("SuperNode authentication (--auth-public-key) needs TLS")
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise typer.BadParameter(f"--address: expected HOST:PORT, got '{address}'")
    try:
        cfg = from_run_config({
            **to_run_config(FederationConfig()), "num-rounds": rounds, "local-steps": local_steps,
            "min-sites": min_sites, "fraction-sites": fraction_sites, "strategy": strategy, "wire-dtype": wire_dtype,
            "gradients": str(gradients.resolve()), "model-size": model_size,
            "pretrain-config": str(pretrain_config.resolve()) if pretrain_config else "",
            "out-dir": str(out_dir.resolve()), "resume-dir": str(resume.resolve()) if resume else "",
            **_parse_pairs(run_config),
        })  # fmt: skip
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    work = out_dir.resolve()
    logs = work / "logs"
    flwr_home = work / ".flwr"
    env = flower_env(flwr_home)
    tls = None if insecure else TlsFiles(ssl_ca_certfile.resolve(), ssl_certfile.resolve(), ssl_keyfile.resolve())  # type: ignore[union-attr]
    if insecure:
        typer.secho("!! --insecure: NO TLS. Model weights and metrics cross the network UNENCRYPTED and any "
                    "machine that reaches this port can join as a site. Use only for local tests. !!",
                    fg=typer.colors.RED, bold=True, err=True)  # fmt: skip
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    write_connection(flwr_home, "coordinator", f"{connect_host}:{port_text}", root_cert=tls.ca_cert if tls else None)
    database = None if in_memory_state else str(work / "superlink.db")
    superlink = start_process("superlink", superlink_command(host, int(port_text), database, tls,
                              enable_supernode_auth=bool(auth_public_key)), logs / "superlink.log", env, cwd=work)  # fmt: skip
    typer.echo(f"SuperLink listening on {address} (log: {logs / 'superlink.log'}, state: {database or 'in memory'})")
    run_proc: subprocess.Popen | None = None
    try:
        wait_for_port(superlink, connect_host, int(port_text))
        for key in auth_public_key:
            subprocess.run([flower_bin("flwr"), "supernode", "register", str(key.resolve()), "coordinator"],
                           env=env, check=True)  # fmt: skip
            typer.echo(f"registered SuperNode key {key}")
        app_dir = write_app_dir(work / "app", to_run_config(cfg))
        cmd = flwr_run_command(app_dir, "coordinator")
        typer.echo(f"submitting the run: {cfg.num_rounds} rounds x {cfg.local_steps} local steps, waiting for "
                   f"{cfg.min_sites} site(s); sites join with: brainjepa-client --site SITE.yaml --server "
                   f"{connect_host}:{port_text} --gradients GRADIENT_FILE{' --insecure' if insecure else ''}")  # fmt: skip
        # Stream the ServerApp's log to this console; `flwr run` exits 0 even when the ServerApp failed.
        run_proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)  # fmt: skip
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
        superlink.stop()
        typer.echo(f"SuperLink stopped; logs in {logs}")


@app.command()
def simulate(
    sites: Annotated[int, typer.Option(help="Generated demo sites (one simulated SuperNode each).")] = 3,
    subjects: Annotated[int, typer.Option(help="Subjects per generated site.")] = 24,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = D.num_rounds,
    local_steps: Annotated[int, typer.Option(help="Local JEPA optimizer steps per site per round.")] = D.local_steps,
    out_dir: Annotated[Path, typer.Option(help="Run folders and the generated sites (OUT_DIR/sites) go here.")] = Path(D.out_dir),
    run_config: Annotated[list[str], typer.Option(help="Extra run-config pairs, e.g. 'strategy=\"fedadam\"'; 'sites-dir' and 'gradients' together simulate your own sites.")] = [],  # noqa: B006
    prepare_only: Annotated[bool, typer.Option(help="Only prepare the sites and their gradient file, and print the `flwr run` command that simulates them.")] = False,
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
        cfg = from_run_config({**to_run_config(FederationConfig()), "num-rounds": rounds, "local-steps": local_steps,
                               "min-sites": sites, "out-dir": str(work), **_parse_pairs(run_config)})  # fmt: skip
        if not cfg.sites_dir:
            m, tr = cfg.pretrain().model, cfg.pretrain().data.model_tr
            demo = prepare_federation(work / "sites", sites, subjects, m.n_rois, m.n_frames, tr,
                                      m.gradient_components, cfg.seed)  # fmt: skip
            cfg = dataclasses.replace(cfg, sites_dir=str(demo.sites_dir), gradients=str(demo.gradients))
    except InputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    n_nodes = len(list(Path(cfg.sites_dir).glob("*/*.yaml")))
    run = {k: v for k, v in to_run_config(cfg).items() if k in ("sites-dir", "gradients", "out-dir")}
    if prepare_only:
        typer.echo(f"{n_nodes} sites under {cfg.sites_dir}, gradient file {cfg.gradients}; simulate them with:")
        typer.echo(f"  flwr run . --stream --run-config '{toml_pairs(run)}' "
                   f"--federation-config 'num-supernodes={n_nodes} client-resources-num-cpus=1'")  # fmt: skip
        raise typer.Exit(0)
    app_dir = write_app_dir(work / "app", to_run_config(cfg))
    typer.echo(f"simulating {n_nodes} sites x {rounds} rounds x {local_steps} local steps (Flower simulation engine)")
    res = run_simulation(app_dir, work, num_supernodes=n_nodes, timeout_s=None, stream=True)
    raise typer.Exit(res.returncode)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
