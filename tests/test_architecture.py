"""The house rules, checked on the source: one direction of dependency and modules of a readable size.

sites <- brainjepa <- client, server: `sites` imports nothing of ours but the base modules (the error
types and the strict loader every package uses), `brainjepa` never imports Flower, `client` or `server`,
and the two Flower apps never import each other (they share `brainjepa.federation`). The base modules
import nothing of ours but each other. Every import counts, including those inside functions.
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
# The base of every package: error types and the strict YAML / run-config loader.
BASE_MODULES = {"brainjepa.errors", "brainjepa.schema"}
MAX_LINES = 400


def imported_modules(path: Path) -> set[str]:
    """Every absolute import in a file, as a dotted module name (`from a.b import c` counts as `a.b`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def imported_packages(path: Path, allowed: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Top-level package of every absolute import in a file, leaving out the modules in `allowed`."""
    return {m.split(".")[0] for m in imported_modules(path) if m not in allowed}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = {
        str(p.relative_to(ROOT)): sorted(imported_packages(p, BASE_MODULES) & FORBIDDEN[package])
        for p in modules(package)
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"imports against the direction sites <- brainjepa <- client, server: {bad}"


@pytest.mark.parametrize("module", sorted(BASE_MODULES))
def test_base_modules_import_nothing_of_ours_but_each_other(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    ours = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
    assert ours <= BASE_MODULES, f"{module} is imported by every package: it may import only {BASE_MODULES}, got {ours}"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.pretraining import x\n    import flwr.app\n")
    assert imported_packages(f) == {"server", "flwr"}
    f.write_text("from brainjepa.errors import ConfigError\nimport brainjepa.config\n")
    assert imported_packages(f, BASE_MODULES) == {"brainjepa"}
    f.write_text("from brainjepa.errors import ConfigError\n")
    assert imported_packages(f, BASE_MODULES) == set()


def test_no_module_is_too_long_to_read() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in FORBIDDEN
        for p in modules(pkg)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
