"""The coordinator CLI's option parsing and checks: run-config pairs, HOST:PORT addresses, files that must exist."""

from __future__ import annotations

from pathlib import Path

import typer


def parse_pairs(pairs: list[str]) -> dict[str, object]:
    """--run-config key=value pairs (TOML values) as one dict."""
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


def check_address(address: str) -> tuple[str, int]:
    """HOST:PORT as (host, port), or a clear error."""
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise typer.BadParameter(f"--address: expected HOST:PORT with a port in 1-65535, got '{address}'")
    return host, int(port_text)


def check_files(**files: Path | None) -> None:
    """Every given option's file exists (option name -> path; None: not given)."""
    for option, path in files.items():
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"--{option.replace('_', '-')}: file '{path}' does not exist")
