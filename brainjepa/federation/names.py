"""Site names both apps accept: they become file names (`updates/<round>/<site>.pt`, logs) and keys of
the coordinator's registry, so no path characters."""

from __future__ import annotations

import re

from brainjepa.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_site_name(name: object, where: str) -> str:
    """`name` if it is a safe site name (letters, digits, `_ . -`; no path characters), else ConfigError."""
    if not isinstance(name, str) or not SITE_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{where}: site name {str(name)[:80]!r} is not allowed (expected 1-64 letters, digits, "
            f"'_', '.', '-', starting with a letter or digit; no '/', no '..')"
        )
    return name
