"""Imports point one way: no cycle between probe's modules nor between its packages.

The graph is read from the source with `ast`, so nothing is imported: every `import` and
`from ... import` statement counts, at module level or inside a function (a cycle through a
deferred import still ties the two modules together). `from pkg import name` points at the
submodule `pkg.name` when there is one, else at `pkg` itself; relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "probe"

# The packages (and top-level modules) whose dependencies must form a DAG. The intended order
# is specs -> traces -> planner -> (predictor, sim, runtime) -> cli, with placement beside specs.
# The command-line modules of every package (`cli`, `*_cli`, `__main__`) count as probe.cli:
# they are entry points, where packages are wired together (e.g. `python -m probe.runtime
# --predictor router` hands a probe.predictor model to the runtime).
UNITS = ("probe.specs", "probe.placement", "probe.traces", "probe.planner", "probe.predictor",
         "probe.sim", "probe.runtime", "probe.cli")


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `package`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that module `name` (source at `path`) imports anywhere."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_deepest_known(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else _deepest_known(target, modules))
    found.discard(None)
    found.discard(name)
    return found


def _deepest_known(dotted: str, modules: set[str]) -> str | None:
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """probe's module graph (read once per session; callers must not change it)."""
    files = module_files()
    names = set(files)
    return {name: frozenset(imported_modules(name, path, names))
            for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component that has
    more than one node (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(set(component))
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the alphabetically first node of `component`."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def unit_of(module: str) -> str | None:
    last = module.rpartition(".")[2]
    if module.startswith(PACKAGE + ".") and (last in ("cli", "__main__") or last.endswith("_cli")):
        return "probe.cli"
    for unit in UNITS:
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between UNITS: an edge wherever a module of one imports a module of another."""
    units: dict[str, set[str]] = {unit: set() for unit in UNITS}
    for module, targets in graph.items():
        source = unit_of(module)
        if source is None:
            continue
        for target in targets:
            dest = unit_of(target)
            if dest is not None and dest != source:
                units[source].add(dest)
    return units


def _explain(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_graph_reader_resolves_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from .sub import c, VALUE\n")
    (pkg / "b.py").write_text("import pkg.sub.c\nimport os\n")
    (pkg / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom ..b import g\n")
    files = module_files(tmp_path, "pkg")
    names = set(files)
    graph = {name: imported_modules(name, path, names) for name, path in files.items()}
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.sub.c", "pkg.sub"},
                     "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(), "pkg.sub.c": {"pkg.a", "pkg.b"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.c", "pkg.a"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycle_between_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between modules of probe/:\n" + _explain(cycles)


def test_unit_graph_maps_entry_points_to_the_cli():
    graph = {"probe.runtime.pipeline": {"probe.planner.solve"},
             "probe.runtime.__main__": {"probe.predictor.model", "probe.runtime.pipeline"},
             "probe.predictor.model": {"probe.runtime.model"},
             "probe.runtime.checkpoint_cli": {"probe.runtime.checkpoint"}}
    units = unit_graph(graph)
    assert units["probe.runtime"] == {"probe.planner"}
    assert units["probe.cli"] == {"probe.predictor", "probe.runtime"}
    assert units["probe.predictor"] == {"probe.runtime"}
    assert find_cycles(units) == []
    graph["probe.runtime.pipeline"].add("probe.predictor")
    assert find_cycles(unit_graph(graph)) == [["probe.predictor", "probe.runtime",
                                               "probe.predictor"]]


def test_no_import_cycle_between_packages():
    graph = unit_graph(import_graph())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between packages of probe/:\n" + _explain(cycles)
    # The predictor builds on the runtime's model; the runtime takes a predictor through
    # probe.runtime.pipeline.LoadPredictor and the entry points wire the two together.
    assert "probe.predictor" not in graph["probe.runtime"]


def test_probe_does_not_import_what_depends_on_it():
    # solvers_bench (and the experiments) build on probe; probe never reaches back.
    offenders = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            offenders += [f"{name} imports {t}" for t in targets
                          if t.split(".")[0] in ("solvers_bench", "experiments", "benchmarks",
                                                 "scripts")]
    assert not offenders, "\n".join(offenders)


# The optional dependencies (pyproject.toml's extras): none of them may be needed to plan.
OPTIONAL = ("torch", "ortools", "typer", "rich", "matplotlib", "transformers", "triton")

_CORE_ONLY = '''
import sys

OPTIONAL = {optional!r}


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in OPTIONAL:
            raise ImportError(f"{{name}} is blocked (optional dependency)")
        return None


sys.meta_path.insert(0, Blocked())
for name in OPTIONAL:
    sys.modules.pop(name, None)

from pathlib import Path

import numpy as np

import probe.planner
import probe.traces
from probe.placement import sharded_home
from probe.planner import BalanceProblem, CostModel, check_plan, evaluate_plan, plan_step, solve
from probe.specs import hardware_preset, model_preset
from probe.traces import RoutingTrace, generate

trace = generate("decode", num_steps=3, num_layers=2, num_experts=16, top_k=2, num_ranks=4,
                 seed=0)
path = Path({tmp!r}) / "trace.safetensors"
trace.save(path)
trace = RoutingTrace.load(path)
cost = CostModel.from_specs(model_preset("gpt-oss-120b"), hardware_preset("h200x8"),
                            num_ranks=4)
load = trace.load_counts()[1, 0]
problem = BalanceProblem(load, sharded_home(16, 4), 2, 3 * cost.transfer_time[0, 1], cost)
static = evaluate_plan(problem, solve(problem, "static").plan).objective
for method in ("greedy", "lp", "highs", "eplb_addcopies", "eplb"):
    result = solve(problem, method, time_limit=2.0)  # a timed-out solve keeps its best plan
    assert check_plan(problem, result.plan) == [], method
    assert evaluate_plan(problem, result.plan).objective <= static * (1 + 1e-9), method
assert len(plan_step(trace, 1, cost=cost, slots=2)) == 2
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in OPTIONAL)
assert not loaded, loaded
print("planned without", ", ".join(OPTIONAL))
'''


def test_planner_and_traces_need_only_the_core_dependencies(tmp_path):
    code = _CORE_ONLY.format(optional=OPTIONAL, tmp=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "planned without torch" in out.stdout
