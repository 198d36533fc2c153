"""Calls of the planners' inlined CUDA device functions pass few enough arguments to inline.

CPython (3.11 and later) compiles a call of more than 30 arguments as a call with *args, and
numba-cuda (the GPU machines' numba.cuda) inlines an `inline=True` device function at the Numba
IR level, where such a call fails to compile ("Calling a closure with *args is unsupported").
Numba's own numba.cuda, which CI and the sm_90 compile tests use, accepts it, so only this
check catches it before a GPU does: lite_device._pair_move once took 43 arguments.
"""

from __future__ import annotations

import ast
from pathlib import Path

from probe.planner.lite_device import MAX_CALL_ARGS

PLANNER = Path(__file__).resolve().parents[1] / "probe" / "planner"


def _inlined(tree: ast.Module) -> set[str]:
    """Names of the functions defined with @cuda.jit(..., inline=True, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and ast.unparse(deco.func) == "cuda.jit"
                        and any(k.arg == "inline" and ast.unparse(k.value) == "True"
                                for k in deco.keywords)):
                    names.add(node.name)
    return names


def test_inlined_device_functions_are_called_with_at_most_30_arguments():
    trees = {p: ast.parse(p.read_text()) for p in sorted(PLANNER.glob("*.py"))}
    inlined = set().union(*(_inlined(t) for t in trees.values()))
    assert {"_pair_move", "_best_amount", "_lay_pool"} <= inlined  # the check sees them
    too_many = [f"{p.name}:{node.lineno} {node.func.id}: {len(node.args) + len(node.keywords)}"
                for p, tree in trees.items() for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in inlined
                and len(node.args) + len(node.keywords) > MAX_CALL_ARGS]
    assert MAX_CALL_ARGS <= 30
    assert not too_many, too_many
