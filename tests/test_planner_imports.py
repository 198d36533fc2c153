"""The planner's modules import each other without a cycle (top-level and function-level
imports alike), read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import probe.planner

PACKAGE = "probe.planner"
ROOT = Path(probe.planner.__file__).parent


def planner_graph() -> dict[str, set[str]]:
    """module -> the planner modules it imports anywhere in its source (the package's own
    __init__ left out: every submodule import runs it, and it imports only leaves)."""
    modules = {f"{PACKAGE}.{path.stem}" for path in ROOT.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in sorted(modules):
        tree = ast.parse((ROOT / f"{name.rsplit('.', 1)[1]}.py").read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = (deps & modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_sees_function_level_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_reads_imports_inside_functions():
    graph = planner_graph()
    # warmstart imports greedy inside warm_start() only (it pulls in Numba).
    assert f"{PACKAGE}.greedy" in graph[f"{PACKAGE}.warmstart"]
    assert f"{PACKAGE}.milp" in graph[f"{PACKAGE}.highs"]


def test_planner_imports_have_no_cycle():
    assert find_cycle(planner_graph()) is None
