"""Which site is which: the coordinator's sites file, registration of the sites' keys, node -> site.

The sites file (`brainjepa-server start --sites-file sites.yaml`) names each site with its SuperNode public
key and optionally the most training samples it may claim:

    site_a:
      public-key: keys/site_a.pub     # ssh-keygen -t ecdsa -b 384 (relative to the sites file)
      max-samples: 500                # 0: no cap

Only the coordinator registers keys (through the SuperLink's loopback-only control API); the node id
Flower gives each key is written with its site to the run's registry JSON (0600), which the ServerApp
reads (run config `site-registry`): a reply's site is its node's registered name, never what it says.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from brainjepa.errors import ConfigError, DataError
from brainjepa.federation.names import check_site_name
from brainjepa.schema import from_mapping, read_yaml_mapping


@dataclass(frozen=True)
class SiteKey:
    """One site of the sites file."""

    public_key: str
    max_samples: int = 0


@dataclass(frozen=True)
class RegisteredSite:
    site: str
    fingerprint: str
    max_samples: int = 0


def key_fingerprint(public_key_text: str) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a public key line (`ecdsa-sha2-nistp384 AAAA... comment`)."""
    parts = public_key_text.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line")
    blob = base64.b64decode(parts[1], validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_sites_file(path: Path) -> dict[str, tuple[Path, SiteKey]]:
    """site name -> (public key path, entry); every error names the file, the site and the field."""
    raw = read_yaml_mapping(path, "sites file (--sites-file)")
    out: dict[str, tuple[Path, SiteKey]] = {}
    for name, entry in raw.items():
        check_site_name(name, f"sites file '{path}'")
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"sites file '{path}', site '{name}': expected a mapping with 'public-key' (and "
                f"optionally 'max-samples'), got {type(entry).__name__}"
            )
        key = from_mapping(SiteKey, dict(entry), path, prefix=f"{name}.", spell=lambda f: f.replace("_", "-"))
        key_path = (path.parent / key.public_key).resolve()
        if not key_path.is_file():
            raise ConfigError(f"sites file '{path}', site '{name}', 'public-key': file '{key_path}' does not exist")
        try:
            key_fingerprint(key_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"sites file '{path}', site '{name}', 'public-key': '{key_path}' is not an OpenSSH "
                f"public key (ssh-keygen -t ecdsa -b 384 writes one): {e}"
            ) from e
        if key.max_samples < 0:
            raise ConfigError(
                f"sites file '{path}', site '{name}', 'max-samples': expected >= 0, got {key.max_samples}"
            )
        out[name] = (key_path, key)
    if not out:
        raise ConfigError(f"sites file '{path}': no sites")
    prints = [key_fingerprint(p.read_text()) for p, _ in out.values()]
    if len(set(prints)) != len(prints):
        raise ConfigError(f"sites file '{path}': two sites share one public key")
    return out


def write_registry(path: Path, nodes: Mapping[int, RegisteredSite]) -> Path:
    """The registry JSON (owner-only): {"nodes": {node_id: {site, fingerprint, max_samples}}}."""
    data = {
        "nodes": {
            str(n): {"site": r.site, "fingerprint": r.fingerprint, "max_samples": r.max_samples}
            for n, r in nodes.items()
        }
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def read_registry(path: str | Path) -> dict[int, RegisteredSite]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {
            int(n): RegisteredSite(str(e["site"]), str(e["fingerprint"]), int(e["max_samples"]))
            for n, e in data["nodes"].items()
        }
    except FileNotFoundError as e:
        raise DataError(f"run config 'site-registry': file '{path}' does not exist") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(
            f"site registry '{path}': expected {{\"nodes\": {{node_id: {{site, fingerprint, max_samples}}}}}}: {e}"
        ) from e


def register_sites(
    sites: Mapping[str, tuple[Path, SiteKey]], flwr: str, connection: str, env: Mapping[str, str], registry: Path
) -> dict[int, RegisteredSite]:
    """Register each site's key with the SuperLink (`flwr supernode register`, control API on loopback);
    a key the SuperLink already knows (a resumed coordinator with its state database) keeps the node id
    the previous start wrote to `registry`."""
    known = {r.fingerprint: n for n, r in read_registry(registry).items()} if registry.exists() else {}
    nodes: dict[int, RegisteredSite] = {}
    for name, (key_path, key) in sites.items():
        fp = key_fingerprint(key_path.read_text())
        res = subprocess.run(
            [flwr, "supernode", "register", str(key_path), connection, "--format", "json"],
            env=dict(env),
            capture_output=True,
            text=True,
            check=False,
        )
        text = res.stdout + res.stderr
        node_id = _node_id(res.stdout)
        if node_id is None and "already in use" in text and fp in known:
            node_id = known[fp]
        if node_id is None:
            hint = (
                " (the SuperLink's state database already holds this key, but no registry file "
                f"'{registry}' of an earlier start names it: use a fresh --out-dir, or the original one)"
                if "already in use" in text
                else ""
            )
            raise ConfigError(
                f"sites file: registering site '{name}' (key '{key_path}') failed{hint}: {text.strip()[-500:]}"
            )
        nodes[node_id] = RegisteredSite(name, fp, key.max_samples)
    write_registry(registry, nodes)
    return nodes


def _node_id(stdout: str) -> int | None:
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    value = data.get("node-id") if isinstance(data, dict) and data.get("success", True) else None
    return int(value) if value else None
