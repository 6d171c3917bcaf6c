"""Flower's SuperNode authentication headers, checked by the Fleet proxy before it reads a request body.

Every Fleet request a Flower 1.42 SuperNode sends carries three headers (flwr/supernode/
node_auth_http_interceptor.py): `flwr-public-key` (base64 of the node's public key as PEM
SubjectPublicKeyInfo), `flwr-timestamp` (ISO 8601, UTC) and `flwr-signature` (base64 of the ECDSA-SHA256
signature of the timestamp's ASCII bytes). The SuperLink verifies them again (flwr/superlink/routers/
fleet/node_auth.py) and also binds the key to the node id in the body; this check only keeps strangers
away from the body: the headers are present and well-formed, the key is a registered site's (with a sites
file), the timestamp is within Flower's window and the signature verifies.

An ECDSA P-384 verification costs ~2 ms on a 2-core CPU, so it is done once per TLS connection and key:
later requests on the same connection with the same key (the SuperNode's keep-alive traffic) get the
cheap checks only. The TLS channel binds those requests to the peer that proved the key.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from brainjepa.errors import ConfigError
from server.registry import load_sites_file

# Flower's names and window (flwr.supercore.constant, flwr.common.constant), written here so that the proxy
# process does not import Flower (a smaller heap, cheaper garbage collection); tests/test_proxy.py checks
# them against the installed flwr.
KEY, SIGNATURE, TIMESTAMP = b"flwr-public-key", b"flwr-signature", b"flwr-timestamp"
TIMESTAMP_TOLERANCE, SYSTEM_TIME_TOLERANCE = 300, 5  # seconds
MAX_VALUE = 2048  # bytes: a P-384 PEM key in base64 is ~300, a signature ~140, a timestamp 32


class AuthRefused(Exception):
    """A request without valid SuperNode authentication; `status` is the HTTP answer (401 / 412)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def flower_key_bytes(openssh_public_key: bytes) -> bytes:
    """An OpenSSH public key line as the bytes a SuperNode sends in `flwr-public-key` (PEM SPKI)."""
    key = serialization.load_ssh_public_key(openssh_public_key)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"expected an ECDSA key (ssh-keygen -t ecdsa -b 384), got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def registered_keys(sites_file: Path) -> dict[bytes, str]:
    """Flower key bytes -> site name, for every site of the coordinator's sites file."""
    keys: dict[bytes, str] = {}
    for name, (key_path, _) in load_sites_file(sites_file).items():
        try:
            keys[flower_key_bytes(key_path.read_bytes())] = name
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ConfigError(f"sites file '{sites_file}', site '{name}', 'public-key': '{key_path}': {e}") from e
    return keys


class NodeAuth:
    """The header check. `keys`: registered key bytes -> site name; None: any well-signed key (no sites
    file: the SuperLink then lets any SuperNode register itself)."""

    def __init__(self, keys: Mapping[bytes, str] | None) -> None:
        self.keys = dict(keys) if keys is not None else None
        self._parsed: dict[bytes, ec.EllipticCurvePublicKey] = {}

    def check(self, headers: Sequence[tuple[bytes, bytes]], proven_key: bytes | None) -> bytes:
        """The request's key bytes if `headers` (lower-case names) authenticate it, else AuthRefused.
        `proven_key`: the key this connection already proved with a verified signature (not verified again)."""
        try:
            key = base64.b64decode(_one(headers, KEY), validate=True)
            signature = base64.b64decode(_one(headers, SIGNATURE), validate=True)
            stamp = _one(headers, TIMESTAMP).decode("ascii")
            age = (datetime.datetime.now(tz=datetime.UTC) - datetime.datetime.fromisoformat(stamp)).total_seconds()
        except (ValueError, TypeError, binascii.Error) as e:  # missing, repeated, not base64 / ISO 8601 / aware
            raise AuthRefused(401, f"SuperNode authentication headers missing or malformed: {e}") from e
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            raise AuthRefused(401, f"SuperNode authentication timestamp {stamp} outside the allowed window")
        if self.keys is not None and key not in self.keys:
            # 412 with Flower's error JSON, as the SuperLink answers an unknown key's activation: the SuperNode
            # prints the reason and exits (305); on a 403 it would retry forever.
            raise AuthRefused(412, "this SuperNode's public key is not registered with the coordinator")
        if key != proven_key:
            try:
                public = self._public(key)
                public.verify(signature, stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
            except (ValueError, UnsupportedAlgorithm, InvalidSignature) as e:
                raise AuthRefused(401, "SuperNode authentication signature does not verify") from e
        return key

    def _public(self, key: bytes) -> ec.EllipticCurvePublicKey:
        public = self._parsed.get(key)
        if public is None:
            loaded = serialization.load_pem_public_key(key)
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise ValueError("not an elliptic-curve key")
            public = loaded
            if self.keys is not None:  # only registered keys are kept (a stranger cannot fill this cache)
                self._parsed[key] = public
        return public


def _one(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    values = [v for k, v in headers if k == name]
    if len(values) != 1 or len(values[0]) > MAX_VALUE:
        raise ValueError(f"expected one header '{name.decode()}' of at most {MAX_VALUE} bytes, got {len(values)}")
    return values[0]
