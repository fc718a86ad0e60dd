"""The layout holds: every module imports on its own, and no two modules import each other, however
indirectly (a cycle is how the request path once came to depend on the gc command)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mirror"


def modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def _source(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports(module: str, known: set[str]) -> set[str]:
    """The mirror modules `module` imports anywhere in its body (lazy imports count: they hide cycles),
    with the packages whose __init__ each import runs."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != module:
                    found.add(candidate)
    return found


def test_the_import_graph_is_acyclic() -> None:
    known = set(modules())
    graph = {m: imports(m, known) for m in known}
    # A package's own __init__ importing its submodules is not a cycle of theirs.
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d):], d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _ours() -> dict[str, object]:
    return {n: m for n, m in sys.modules.items() if n == "mirror" or n.startswith("mirror.")}


@pytest.mark.parametrize("module", modules())
def test_every_module_imports_alone(module: str) -> None:
    saved = _ours()
    for name in saved:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    finally:  # give the session back the very module objects it had: their classes are in use elsewhere
        for name in _ours():
            del sys.modules[name]
        sys.modules.update(saved)  # type: ignore[arg-type]
