"""Errors for bad input. Each names the file, the field, what was expected and what came."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a config value, data). The message says where and what."""


class ConfigError(InputError):
    """A malformed or inconsistent config file."""


class DataError(InputError):
    """Data that cannot be used as given (wrong shape, NaNs, too short, mismatched)."""


class Origin(str):
    """Where a config came from when it is not a file (e.g. "run config", "round record")."""


def where(path: object, field: str | None = None) -> str:
    """Format the location prefix of an error message: `file 'x.yaml', field 'a.b'` (or `run config, field ...`)."""
    loc = str(path) if isinstance(path, Origin) else f"file '{path}'" if path is not None else "input"
    return f"{loc}, field '{field}'" if field else loc
