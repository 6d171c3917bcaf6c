"""Turn parsed YAML mappings into frozen dataclasses, checking every key and type.

A small, strict converter: an unknown key, a missing required key or a value of the wrong type is a
`ConfigError` that names the file, the dotted key, what was expected and what came. Supported field
types: bool, int, float (ints accepted), str, Path, `X | None`, `Literal[...]`, `tuple[X, ...]`, and
fixed-length `tuple[X, Y]`, nested dataclasses (also as `tuple[Dataclass, ...]` from a YAML list), and
unions such as `int | tuple[int, ...]` (the first member that takes the value).
A dataclass may list keys it used to have in a `RETIRED_KEYS` class variable (key -> what to do instead):
such a key is an error that says so, rather than a plain unknown key.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from brainjepa.errors import ConfigError, where

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_optional(tp):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if Ellipsis not in args:
            return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is Path:
        return "a path (string)"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _convert(value: Any, tp: Any, file: Path | str | None, key: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where(file, key)}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if _is_optional(tp):
        if value is None:
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _convert(value, inner[0], file, key)
    if _is_union(tp):  # e.g. int | tuple[int, ...]: the first member that takes the value
        for member in get_args(tp):
            try:
                return _convert(value, member, file, key)
            except ConfigError:
                continue
        raise bad()
    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            raise bad()
        return value
    if get_origin(tp) is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad()
        args = get_args(tp)
        if Ellipsis not in args:  # fixed length, e.g. tuple[float, float]
            if len(value) != len(args):
                raise bad()
            return tuple(_convert(v, a, file, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        (item,) = [a for a in args if a is not Ellipsis]
        return tuple(_convert(v, item, file, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return from_mapping(tp, value, file, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise bad()
        return Path(value)
    raise TypeError(f"schema: unsupported field type {tp!r} for key '{key}'")  # programming error


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file whose top level is a mapping (an empty file: {}); errors name the file and say what
    it should have been (`what`, e.g. "site config")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where(path)}: {what} file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where(path)}: malformed YAML (not valid YAML): {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where(path)}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def from_mapping(
    cls: type, data: dict, file: Path | str | None, prefix: str = "", spell: Callable[[str], str] | None = None
) -> Any:
    """Build dataclass `cls` from a mapping; errors name `file` and the dotted key.

    `spell` maps a field name to how the source writes its key (e.g. `num_rounds` -> `num-rounds` in
    Flower's run config); keys are looked up, and named in errors, as spelled.
    """
    hints = typing.get_type_hints(cls)
    spell = spell or (lambda name: name)
    fields = {spell(f.name): f for f in dataclasses.fields(cls) if f.init}
    retired: dict[str, str] = getattr(cls, "RETIRED_KEYS", {})
    for k in data:
        full = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(k, str) and k in retired:
            raise ConfigError(f"{where(file, full)}: not read by anything, remove it: {retired[k]}")
        if not isinstance(k, str) or k not in fields:
            raise ConfigError(f"{where(file, full)}: unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for key, f in fields.items():
        full = f"{prefix}.{key}" if prefix else key
        if key in data:
            kwargs[f.name] = _convert(data[key], hints[f.name], file, full)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"{where(file, full)}: required key is missing (expected {_type_name(hints[f.name])})")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a dataclass's own check (__post_init__): add the file it came from
        if file is None or str(file) in str(e):
            raise
        raise ConfigError(f"{where(file)}: {e}") from e


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple, bool], ...]:
    """(name, allowed values, may be None) of every `Literal[...]` (or `Literal[...] | None`) field."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        optional = _is_optional(tp)
        if optional:
            tp = next(a for a in get_args(tp) if a is not type(None))
        if get_origin(tp) is Literal:
            out.append((name, get_args(tp), optional))
    return tuple(out)


def check_choices(obj: Any, section: str) -> None:
    """Every `Literal[...]` field of the dataclass instance `obj` holds one of its choices.

    The one check of choices for configs built in code (a YAML or run config is already checked while
    parsed); call it from `__post_init__`. The error names `section.field`, the choices and the value.
    """
    for name, allowed, optional in _choice_fields(type(obj)):
        value = getattr(obj, name)
        if value not in allowed and not (optional and value is None):
            raise ConfigError(f"{section}.{name}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
