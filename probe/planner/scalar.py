"""Scalar rules written once for the CPU kernels and their numba.cuda twins.

A rule is a plain Python function (scalars and arrays in, a scalar or a tuple out, or writes
into arrays it is given). `@rule` compiles it with `numba.njit` for the CPU kernels
(probe.planner.greedy, probe.planner.assign) and marks it; `probe.planner.numba_cuda.device`
compiles the SAME function again as a numba.cuda device function for the GPU kernels
(greedy_cuda, assign_cuda). The two targets then evaluate the same operations in the same
order, so their float64 results agree bit for bit, provided a rule follows three conventions:

- a product that feeds a sum or a difference is written `mul(a, b)`: a plain product on the
  CPU; on the GPU libdevice's dmul_rn, rounded on its own, which the CUDA compiler never fuses
  with the following + or - into one FMA (an FMA rounds once, so its last bit can differ, and
  one last bit can flip a tie);
- the larger or smaller of two values is `dmax(a, b)` / `dmin(a, b)` (Python's max / min:
  the first on ties), which compile for every numba.cuda version;
- an addition into an array cell that other GPU threads may add to as well is
  `add_at(arr, i, j, value)` (an atomic add on the GPU; use it for whole numbers, whose sum
  does not depend on the order);
- a rule calls other rules by their module-level names (their CPU dispatchers); the GPU twin
  of the caller calls the GPU twins of the callees.

Numba's CPU target never contracts a * b + c into an FMA unless fastmath is on, and no rule
asks for fastmath, so `mul` is the plain product there.

This module does not import numba.cuda: the CPU kernels stay free of it.
"""

from __future__ import annotations

import numba

__all__ = ["add_at", "dmax", "dmin", "is_rule", "mul", "pool_entry", "rule"]

_RULES: set = set()  # the Python functions compiled by `rule`


def rule(fn=None, *, inline: bool = False, refcount: bool = True):
    """Decorator: `numba.njit(cache=True)` of fn (inline="always" when `inline`), marked as a
    rule so that `numba_cuda.device` can compile the same function for the GPU.

    refcount=False compiles the CPU function without Numba's reference counting, for a rule
    that allocates no array and returns none (it only reads and writes the arrays it is
    given): a call then takes its array arguments as they are, without an atomic increment
    and decrement per array (with 30 arrays, about as long as the rule's own work in the
    parallel greedy's candidate search). No effect on the GPU twin."""
    def compile_rule(fn):
        _RULES.add(fn)
        return numba.njit(cache=True, inline="always" if inline else "never",
                          _nrt=refcount)(fn)

    return compile_rule if fn is None else compile_rule(fn)


def is_rule(value) -> bool:
    """Whether value is the CPU dispatcher of a rule."""
    return getattr(value, "py_func", None) in _RULES


@rule
def mul(a, b):  # pragma: no cover - compiled
    """a * b (on the GPU: rounded on its own, never fused into an FMA)."""
    return a * b


@rule
def dmax(a, b):  # pragma: no cover - compiled
    """max(a, b) as Python takes it: a unless b > a."""
    return b if b > a else a


@rule
def dmin(a, b):  # pragma: no cover - compiled
    """min(a, b) as Python takes it: a unless b < a."""
    return b if b < a else a


@rule
def add_at(arr, i, j, value):  # pragma: no cover - compiled
    """arr[i, j] += value (on the GPU: an atomic add)."""
    arr[i, j] += value


@rule(inline=True)
def pool_entry(x, npool, cum):  # pragma: no cover - compiled
    """The entry of a pool where x >= 1 tokens run out: the largest k < npool with cum[k] < x
    (cum[k]: the tokens of the entries before k, non-decreasing)."""
    lo = 0
    hi = npool - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cum[mid] < x:
            lo = mid
        else:
            hi = mid - 1
    return lo
