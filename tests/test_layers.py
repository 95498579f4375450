"""The import graph of our packages: no cycle, and the arrows point inward.

Read from the source (every ``import``, also those inside functions and under
``TYPE_CHECKING``), so a lazy import cannot hide a cycle. ``realtime`` and ``locks`` are
standalone: ``realtime`` imports of ``inventory`` only the domain's value rules
(``inventory.domain``, which imports nothing of ours), ``locks`` nothing of ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("inventory", "realtime", "locks")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Every module name ``node`` may load (``from a import b``: ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        kept = package[: len(package) - node.level + 1]
        base = ".".join([*kept, node.module] if node.module else kept)
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of :data:`PACKAGES` it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(m for m in _imported(name, path, node) if m in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_imports() -> None:
    graph = import_graph()
    assert "inventory.domain.model" in graph["inventory.service.inventory"]
    assert "realtime.ports" in graph["inventory.store.feed"]
    assert "locks.lock" in graph["locks.multi"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_realtime_and_locks_stand_alone() -> None:
    assert import_graph()["inventory.domain.model"] == set()
    for name, edges in import_graph().items():
        if name.startswith("realtime"):
            assert {e for e in edges if e.startswith("inventory")} <= {
                "inventory.domain",
                "inventory.domain.model",
            }, name
        if name.startswith("locks"):
            assert all(e.startswith("locks") for e in edges), name
