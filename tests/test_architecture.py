"""The house rules, checked on the source: one direction of dependency and modules of a readable size.

sites <- brainjepa <- client, server: `sites` imports nothing of ours, `brainjepa` never imports Flower,
`client` or `server`, and the two Flower apps never import each other (they share
`brainjepa.federation`). Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "sites": {"brainjepa", "client", "server"},
    "brainjepa": {"flwr", "client", "server"},
    "client": {"server"},
    "server": {"client"},
}
MAX_LINES = 400


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package]) for p in modules(package)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"imports against the direction sites <- brainjepa <- client, server: {bad}"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.pretraining import x\n    import flwr.app\n")
    assert imported_packages(f) == {"server", "flwr"}


def test_no_module_is_too_long_to_read() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in FORBIDDEN for p in modules(pkg)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
