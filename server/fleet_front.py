"""What serves the coordinator's public port: our Fleet proxy (`server.fleet_proxy`, the default) or nginx.

`brainjepa-server start --external-proxy nginx` starts no proxy; it writes `OUT/nginx-fleet.conf` for this
start (the SuperLink's loopback port and CA, the server certificate, the registered sites' keys, the same
limits as `ProxyLimits`) and nginx serves the port with it (`nginx -c OUT/nginx-fleet.conf`, or its
`server` block included in the hospital's own nginx). nginx checks that a request carries a registered
site's `flwr-public-key` before it reads the body; the timestamp window and the signature are then checked
by the SuperLink only (nginx has no ECDSA without a scripting module).
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

from server.fleet_auth import registered_keys
from server.fleet_proxy import ProxyLimits, max_body

NGINX = """# nginx in front of the loopback SuperLink: TLS, Flower's Fleet API only, registered SuperNode keys
# checked before a body is read. Written by `brainjepa-server start --external-proxy nginx`.
worker_processes auto;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections {max_connections}; }}
http {{
    access_log {run}/nginx-access.log;
    client_body_temp_path {run}/body; proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fcgi; uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
    map_hash_bucket_size 512;
    map $http_flwr_public_key $brainjepa_site {{   # base64 of each site's key, as SuperNodes send it
        default "";
{keys}
    }}
    limit_conn_zone $binary_remote_addr zone=brainjepa_per_ip:10m;
    upstream brainjepa_superlink {{
        server {upstream};
        keepalive 16;
        keepalive_timeout 4s;                     # the SuperLink (uvicorn) closes idle ones at 5 s
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {certfile};
        ssl_certificate_key {keyfile};
        ssl_protocols TLSv1.2 TLSv1.3;
        tcp_nodelay on;
        client_header_timeout {header_s}s;        # a request's headers (slowloris)
        client_body_timeout {header_s}s;          # between two reads of a body (nginx has no whole-body deadline)
        send_timeout {upstream_s}s;
        keepalive_timeout {idle_s}s;
        client_max_body_size {max_body};          # Flower's array chunk size + headroom
        large_client_header_buffers 4 16k;
        limit_conn brainjepa_per_ip {max_per_ip};
        location ~ "^/v1/fleet/[a-z][a-z-]{{0,63}}$" {{
            limit_except POST {{ deny all; }}
            if ($brainjepa_site = "") {{ return 401; }}   # before the body is read
            proxy_pass https://brainjepa_superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1;
            proxy_request_buffering off;              # stream bodies, both ways
            proxy_buffering off;
            proxy_read_timeout {upstream_s}s;
            proxy_ssl_trusted_certificate {upstream_ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;                 # nginx 1.22 matches DNS names only: the loopback certificate holds it
            proxy_ssl_session_reuse on;
        }}
        location / {{ return 403; }}              # control, runtime, health: never from outside
    }}
}}
"""


def nginx_config(
    listen: str,
    upstream: str,
    certfile: Path,
    keyfile: Path,
    upstream_ca: Path,
    sites_file: Path,
    run_dir: Path,
    limits: ProxyLimits | None = None,
) -> str:
    """The nginx configuration serving `listen` in front of the SuperLink at `upstream` (both HOST:PORT);
    the limits are our proxy's (`ProxyLimits`)."""
    limits = limits or ProxyLimits()
    keys = "\n".join(
        f'        "{base64.b64encode(key).decode()}" {site};' for key, site in registered_keys(sites_file).items()
    )
    return NGINX.format(
        run=run_dir,
        keys=keys,
        listen=listen,
        upstream=upstream,
        certfile=certfile,
        keyfile=keyfile,
        upstream_ca=upstream_ca,
        max_connections=limits.max_connections,
        max_per_ip=limits.max_per_ip,
        header_s=int(limits.header_timeout_s),
        idle_s=int(limits.idle_timeout_s),
        upstream_s=int(limits.upstream_timeout_s),
        max_body=max_body(limits),
    )


def write_nginx_config(
    path: Path, listen: str, upstream: str, certfile: Path, keyfile: Path, upstream_ca: Path, sites_file: Path
) -> Path:
    """The nginx configuration written to `path`, with its pid, logs and temp folders under `nginx/` next to it."""
    run = path.parent / "nginx"
    for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
        (run / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # write-then-rename, owner-only (no torch here)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(nginx_config(listen, upstream, certfile, keyfile, upstream_ca, sites_file, run))
    os.replace(tmp, path)
    return path


def proxy_command(
    listen: str, upstream: str, certfile: Path, keyfile: Path, upstream_ca: Path, sites_file: Path | None
) -> list[str]:
    """The command line of our Fleet proxy (`server.fleet_proxy`)."""
    cmd = [sys.executable, "-m", "server.fleet_proxy", "--listen", listen, "--upstream", upstream]
    cmd += ["--certfile", str(certfile), "--keyfile", str(keyfile), "--upstream-ca", str(upstream_ca)]
    return cmd + (["--sites-file", str(sites_file)] if sites_file else [])
