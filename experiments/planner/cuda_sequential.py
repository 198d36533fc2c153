"""Run a numba.cuda kernel's source as plain Python, one thread per block, without a GPU.

The planners' kernels stride their loops by the block size, so one thread does every thread's
work, and with one thread the first gaining candidate is the first one tried. `sequential`
rebuilds the kernel and every device function it reaches (its own module's, and the device
twins of scalar rules that `numba_cuda.device` made) as Python functions whose `cuda` is a
stand-in (thread 0 of a block of 1, lane 0 of its warp; shared and local arrays are numpy
arrays; atomics are plain updates; numba_cuda's warp collectives return the lane's own value
and its warp_sync does nothing)
and whose `mul` is the plain product. The tests compare such runs with the CPU kernels;
experiments.planner.kernel_stats counts the work of a run (`wrap`).
"""

from __future__ import annotations

import types

import numpy as np


def _py(fn):
    """The plain Python function behind a numba.cuda kernel or device function (a plain
    function as it is)."""
    return getattr(fn, "py_func", None) or getattr(fn, "fn", None) or fn


def _is_cuda_function(value) -> bool:
    """Whether value is a numba.cuda kernel or device function (or the simulator's)."""
    return "cuda" in type(value).__module__ and (hasattr(value, "py_func")
                                                  or hasattr(value, "fn"))


class _Array:
    @staticmethod
    def array(shape, dtype):
        from numba.np.numpy_support import as_dtype

        return np.zeros(shape, as_dtype(dtype))


class _Atomic:
    @staticmethod
    def add(arr, idx, v):
        old = arr[idx]
        arr[idx] += v
        return old

    @staticmethod
    def min(arr, idx, v):
        arr[idx] = min(arr[idx], v)

    @staticmethod
    def max(arr, idx, v):
        arr[idx] = max(arr[idx], v)

    @staticmethod
    def cas(arr, idx, old, v):
        loaded = arr[idx]
        if loaded == old:
            arr[idx] = v
        return loaded

    @staticmethod
    def or_(arr, idx, v):
        old = arr[idx]
        arr[idx] |= v
        return old


def _clz(v):
    """cuda.clz of a 32-bit integer (leading zero bits of its two's complement)."""
    return 32 - (int(v) & 0xFFFFFFFF).bit_length()


def _mul(a, b):
    return a * b


def _one_lane(v):
    """numba_cuda's warp collectives over a warp of one lane: the lane's own value."""
    return v


def _no_op():
    return None


# Device functions that combine a warp's lanes, run here as a warp of one lane.
_WARP_COLLECTIVES = ("warp_any", "warp_bits", "warp_count", "warp_last", "warp_min", "warp_max",
                     "warp_scan", "warp_sum")


def sequential(kernel, wrap=None):
    """`run(*args, num_layers=L)`: kernel's source (a numba.cuda kernel, or the plain Python
    function of one) run for blocks 0 .. L-1, one after the other, on numpy arrays (the
    kernel's arguments); a grid's second dimension is one block (blockIdx.y = 0, gridDim.y =
    1), whose one thread does every item. wrap(name, fn), when given, returns what replaces
    each device function where it is called (to count calls)."""
    fake = types.SimpleNamespace(threadIdx=types.SimpleNamespace(x=0),
                                 blockIdx=types.SimpleNamespace(x=0, y=0),
                                 blockDim=types.SimpleNamespace(x=1),
                                 gridDim=types.SimpleNamespace(x=1, y=1), syncthreads=lambda: None,
                                 syncthreads_or=lambda v: 1 if v else 0,
                                 shared=_Array, local=_Array, atomic=_Atomic,
                                 popc=lambda v: bin(int(v)).count("1"),
                                 clz=_clz, laneid=0)
    made: dict = {}

    def plain(fn):
        py = _py(fn)
        if py not in made:
            env = dict(py.__globals__)
            made[py] = types.FunctionType(py.__code__, env, py.__name__, py.__defaults__,
                                          py.__closure__)
            env["cuda"] = fake
            env["mul"] = _mul
            for name in _WARP_COLLECTIVES:
                if name in env:
                    env[name] = _one_lane
            if "warp_sync" in env:  # a warp of one lane has nothing to order
                env["warp_sync"] = _no_op
            for name in py.__code__.co_names:
                if _is_cuda_function(env.get(name)):
                    env[name] = plain(env[name])
                    if wrap is not None:
                        env[name] = wrap(name, env[name])
        return made[py]

    run_block = plain(kernel)

    def run(*args, num_layers: int) -> None:
        for layer in range(num_layers):
            fake.blockIdx.x = layer
            run_block(*args)

    return run
