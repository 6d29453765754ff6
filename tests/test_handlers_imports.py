"""handlers/ imports form no circle (lazy imports inside functions included), and the registry that
features register into imports no feature."""
from __future__ import annotations

import ast
from pathlib import Path

import handlers
import handlers.features

HANDLERS = Path(handlers.__file__).parent


def _imports_of(path: Path) -> set[str]:
    """The handlers.* modules a file imports anywhere (top level or inside a function)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("handlers.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "handlers":
                found |= {f"handlers.{a.name}" for a in node.names}
            elif node.module.startswith("handlers."):
                found.add(node.module)
    return {name for name in found if (HANDLERS / f"{name.split('.')[1]}.py").is_file()}


def _graph() -> dict[str, set[str]]:
    return {f"handlers.{p.stem}": _imports_of(p) for p in HANDLERS.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_handlers_have_no_import_circle() -> None:
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_registry_imports_no_feature() -> None:
    features = _imports_of(Path(handlers.features.__file__))
    assert features, "handlers.features lists the feature modules"
    reachable, todo, graph = set(), ["handlers.registry"], _graph()
    while todo:
        for name in graph[todo.pop()] - reachable:
            reachable.add(name)
            todo.append(name)
    assert not reachable & features, f"the registry reaches features: {sorted(reachable & features)}"
