"""The import graph of our packages: no cycle, and the arrows point inward.

Read from the source (every ``import``, also those inside functions and under
``TYPE_CHECKING``), so a lazy import cannot hide a cycle. ``inventory`` is in layers, one
package each, from the inside out: ``domain`` (pure rules), ``store`` (PostgreSQL),
``service`` (use cases), ``http`` (routes) and ``ops`` (the composition root, the command
line). A module imports its own layer and the ones inside it, never one further out;
``config``, ``logs`` and ``metrics`` are shared by every layer and import none, and the
typed ``client`` (used by the client-side commands of ``ops``) imports nothing of ours.
The reservation core of the service layer sees the store only through its interface
(``inventory.store.port``). ``realtime`` and ``locks`` stand alone: ``realtime`` imports of
``inventory`` only the domain, ``locks`` nothing.
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


LAYERS = ("domain", "store", "service", "http", "ops")  # inside first
SHARED = {"inventory", "inventory.config", "inventory.logs", "inventory.metrics"}
CLIENT = "inventory.client"
#: The service layer's reservation core: it depends on the store's interface only.
CORE = {
    "inventory.service.inventory",
    "inventory.service.engine",
    "inventory.service.expiry",
    "inventory.service.combining",
    "inventory.service.idempotency",
}
PORT = "inventory.store.port"


def layer(module: str) -> int | None:
    """The rank of ``module``'s layer (0 = domain), None outside the layers."""
    parts = module.split(".")
    if parts[0] == "inventory" and len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_the_scan_sees_the_imports() -> None:
    graph = import_graph()
    assert "inventory.domain.model" in graph["inventory.service.inventory"]
    assert "inventory.store.port" in graph["inventory.service.engine"]
    assert "realtime.ports" in graph["inventory.store.feed"]
    assert "locks.lock" in graph["locks.multi"]
    assert layer("inventory.http.api") == 3
    assert layer("inventory.http") == 3
    assert layer("inventory.config") is None
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_every_module_is_in_a_layer_or_shared() -> None:
    loose = [
        name
        for name in import_graph()
        if name.startswith("inventory") and layer(name) is None and name not in {*SHARED, CLIENT}
    ]
    assert loose == []


def test_arrows_point_inward() -> None:
    outward = []
    for name, edges in import_graph().items():
        rank = layer(name)
        for edge in edges:
            if rank is None or not edge.startswith("inventory") or edge in {*SHARED, CLIENT}:
                continue
            target = layer(edge)
            if target is None or target > rank:
                outward.append((name, edge))
    assert outward == []


def test_the_domain_imports_nothing_else() -> None:
    for name, edges in import_graph().items():
        if layer(name) == 0:
            assert all(layer(e) == 0 for e in edges), name


def test_the_store_knows_no_service_and_only_realtimes_ports() -> None:
    for name, edges in import_graph().items():
        if layer(name) == 1:
            assert {e for e in edges if e.startswith("realtime")} <= {"realtime.ports"}, name


def test_only_the_ops_layer_imports_ops() -> None:
    for name, edges in import_graph().items():
        if layer(name) != 4:
            assert not any(layer(e) == 4 for e in edges), name


def test_shared_modules_import_no_layer_and_the_client_nothing() -> None:
    graph = import_graph()
    for name in SHARED:
        assert all(e in SHARED for e in graph[name]), name
    assert graph[CLIENT] == set()


def test_the_reservation_core_sees_the_store_through_its_interface() -> None:
    graph = import_graph()
    for name in CORE:
        assert {e for e in graph[name] if layer(e) == 1} <= {PORT}, name
    assert all(layer(e) == 0 for e in graph[PORT])
    # The memory store is a second implementation of the interface, not a wrapper.
    assert {e for e in graph["inventory.store.memory"] if layer(e) == 1} == {PORT}


def test_realtime_and_locks_stand_alone() -> None:
    for name, edges in import_graph().items():
        if name.startswith("realtime"):
            assert all(layer(e) == 0 for e in edges if e.startswith("inventory")), name
        if name.startswith("locks"):
            assert all(e.startswith("locks") for e in edges), name
