"""The house's floors: ``config`` at the bottom, the serving layers above it, the operations tooling above those,
and the test support that tests and load tests share above that (so ``loadtests/`` never imports ``tests/``).
Every import of Anker's own packages, at module level or inside a function, must go down a floor or stay on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each package may import of Anker's own packages (itself included).
MAY_IMPORT = {
    "config": {"config"},
    "observability": {"config", "observability"},
    "autoscaling": {"config", "observability", "autoscaling"},
    "deployments": {"config", "autoscaling", "observability", "deployments"},
    "cluster": {"config", "autoscaling", "observability", "deployments", "cluster"},
    # The support that tests and load tests share (free ports, the SSE client, throwaway servers, doubles).
    "testkit": {"config", "autoscaling", "observability", "deployments", "cluster", "testkit"},
    "loadtests": {"config", "autoscaling", "observability", "deployments", "cluster", "testkit", "loadtests"},
}
OWN = set(MAY_IMPORT) | {"tests"}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Anker's top-level packages that a module imports, with the line of each import."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in OWN}
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_no_import_runs_up_a_floor(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules under {package}/"
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in modules
        for imported, line in sorted(imported_packages(path))
        if imported not in MAY_IMPORT[package]
    ]
    assert not upward, f"{package}/ may import only {sorted(MAY_IMPORT[package])}:\n" + "\n".join(upward)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from cluster.local import connect\n    import deployments.builder\n")
    assert imported_packages(module) == {("cluster", 4), ("deployments", 5)}
