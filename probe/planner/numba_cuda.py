"""numba.cuda, importable next to a numpy that no longer has `row_stack`.

numba-cuda 0.30 (the version on the H200 machine, with numpy 2.5) registers an overload for
`numpy.row_stack` while it compiles its first kernel; numpy removed that alias of `vstack`, so
the first launch fails with AttributeError before any of our code runs. Restoring the alias
before numba.cuda loads is enough: our kernels never call it. Every numba.cuda kernel of the
project imports `cuda` from here. Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) is unaffected.

It also holds what makes the GPU kernels' float64 arithmetic the CPU kernels': `mul` (a
product rounded on its own, never contracted into an FMA with a later sum, which would round
once and can flip a tie), `dmax` and `dmin` (Python's max / min for two values, written out
because the builtins do not compile for every numba.cuda version), and `device`, which compiles
a rule of probe.planner.scalar (a scalar rule of a CPU kernel) as a device function, so that
the rule's source serves both targets.

`capture_graph` captures launches of these kernels from torch tensors into a torch CUDA graph.

And the warp-level helpers the planners' kernels share: the collectives (`warp_min`, `warp_max`,
`warp_sum`, `warp_scan`, `warp_last`, `warp_any`), `warp_sync`, the combine-then-one-atomic
updates (`lanes_add`, `lanes_max`), and `clock64`, the SM's cycle counter, for a
kernel that times its own steps.
"""

from __future__ import annotations

import numpy

if not hasattr(numpy, "row_stack"):  # pragma: no cover - depends on the installed numpy
    numpy.row_stack = numpy.vstack

import os  # noqa: E402
import types  # noqa: E402

from numba import config, float64, uint32  # noqa: E402
from numba import cuda  # noqa: E402

from probe.planner import scalar  # noqa: E402

__all__ = ["LINEINFO", "SIMULATOR", "WARP_SHUFFLES", "add_at", "capture_graph", "clock64", "cuda",
           "device", "dmax", "dmin", "lanes_add", "lanes_max", "mul", "warp_any", "warp_bits",
           "warp_count", "warp_last", "warp_max", "warp_min", "warp_scan", "warp_sum",
           "warp_sync"]

SIMULATOR = bool(config.ENABLE_CUDASIM)
# On a GPU the 32 lanes of a warp combine their values with shuffles (`warp_min`, `warp_max`,
# `warp_sum`, the prefix sum `warp_scan`, `warp_last`) or a ballot (`warp_bits`, `warp_count`):
# a few instructions, no barrier, no atomic (a 64-bit atomic on shared memory is a
# compare-and-swap loop that the lanes of a warp take one at a time). Numba's CUDA simulator has
# no shuffles or ballots, so `lanes_add` and `lanes_max` take their atomic path there instead,
# with the same results, and a kernel that calls the warp collectives itself does so only
# `if WARP_SHUFFLES:`. A kernel that calls them gives each warp 32 consecutive items of a loop,
# so it needs a multiple of 32 threads per block. experiments.planner.cuda_sequential runs them
# as a warp of one lane (the warp collectives return the lane's own value).
WARP_SHUFFLES = not SIMULATOR
_LANES = 0xFFFFFFFF
# PROBE_CUDA_LINEINFO=1 (read at import) compiles the kernels that ask for it, and the device
# functions here that they inline, with line information for a profiler. The simulator's jit
# takes no lineinfo.
LINEINFO = ({"lineinfo": True} if not SIMULATOR and os.environ.get("PROBE_CUDA_LINEINFO") == "1"
            else {})

if SIMULATOR:
    @cuda.jit(device=True)
    def mul(a, b):  # pragma: no cover - device code
        return a * b
else:  # pragma: no cover (needs a GPU)
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True, **LINEINFO)
    def mul(a, b):
        """a * b rounded on its own (never fused into an FMA with a later + or -)."""
        return libdevice.dmul_rn(float64(a), float64(b))


if SIMULATOR:
    def clock64():  # pragma: no cover - the simulator's kernels never read it
        """The simulator has no cycle counter."""
        return 0
else:
    import numba.cuda.types as _cuda_types
    from llvmlite import ir as _ir
    from numba import types as _core_types
    from numba.cuda.extending import intrinsic as _intrinsic

    # numba-cuda's own types where it has them (its typing no longer takes numba's).
    _INT64 = getattr(_cuda_types, "int64", None) or _core_types.int64

    @_intrinsic
    def clock64(typingctx):
        """The SM's cycle counter (PTX %clock64) as an int64: a kernel timing its own steps."""

        def codegen(context, builder, signature, args):
            read = _ir.InlineAsm(_ir.FunctionType(_ir.IntType(64), []),
                                 "mov.u64 $0, %clock64;", "=l", side_effect=True)
            return builder.call(read, [])

        return _INT64(), codegen


@cuda.jit(device=True, inline=True, **LINEINFO)
def dmax(a, b):  # pragma: no cover - device code
    """max(a, b) as Python and Numba's CPU target take it: a unless b > a."""
    return b if b > a else a


@cuda.jit(device=True, inline=True, **LINEINFO)
def dmin(a, b):  # pragma: no cover - device code
    """min(a, b): a unless b < a."""
    return b if b < a else a


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_min(v):  # pragma: no cover - device code (GPU only)
    """The minimum of v over the warp's 32 lanes (every lane gets it)."""
    for off in (16, 8, 4, 2, 1):
        w = cuda.shfl_xor_sync(_LANES, v, off)
        if w < v:
            v = w
    return v


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_max(v):  # pragma: no cover - device code (GPU only)
    """The maximum of v over the warp's 32 lanes (every lane gets it)."""
    for off in (16, 8, 4, 2, 1):
        w = cuda.shfl_xor_sync(_LANES, v, off)
        if w > v:
            v = w
    return v


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_sum(v):  # pragma: no cover - device code (GPU only)
    """The sum of v over the warp's 32 lanes (every lane gets it)."""
    for off in (16, 8, 4, 2, 1):
        v += cuda.shfl_xor_sync(_LANES, v, off)
    return v


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_bits(bits):  # pragma: no cover - device code (GPU only)
    """The OR of the lanes' words where each lane's word has at most its own bit (1 << lane)
    set: one ballot (every lane gets it)."""
    return uint32(cuda.ballot_sync(_LANES, bits != 0))


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_count(flag):  # pragma: no cover - device code (GPU only)
    """How many of the warp's lanes have flag set (every lane gets it)."""
    return cuda.popc(cuda.ballot_sync(_LANES, flag))


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_scan(v):  # pragma: no cover - device code (GPU only)
    """The sum of v over the lanes up to and including this one."""
    lane = cuda.laneid
    for off in (1, 2, 4, 8, 16):
        w = cuda.shfl_up_sync(_LANES, v, off)
        if lane >= off:
            v += w
    return v


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_last(v):  # pragma: no cover - device code (GPU only)
    """v of the warp's last lane (lane 31), for every lane."""
    return cuda.shfl_sync(_LANES, v, 31)


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_sync():  # pragma: no cover - device code
    """Order the warp's shared-memory writes before its lanes' next reads (`syncwarp`). The
    simulator has no syncwarp: there it is a block barrier, so code calling it must reach it
    with every thread of the block (a loop whose trip count is the same in every warp)."""
    if WARP_SHUFFLES:
        cuda.syncwarp(_LANES)
    else:
        cuda.syncthreads()


@cuda.jit(device=True, inline=True, **LINEINFO)
def warp_any(flag):  # pragma: no cover - device code
    """Whether flag is true on any lane of the warp (every lane gets it). In the simulator:
    on any thread of the block (`syncthreads_or`), the same for a block of one warp, and for
    a loop `while warp_any(...)` every warp then runs the block's longest trip count."""
    if WARP_SHUFFLES:
        return cuda.any_sync(_LANES, flag)
    return cuda.syncthreads_or(flag) != 0


# arr[idx] combined atomically with the values v of a warp's 32 lanes: on a GPU the warp
# combines them first and lane 0 makes the one atomic update; elsewhere every lane makes its
# own. Every lane of the warp must call them (a loop over whole warps).
@cuda.jit(device=True, inline=True, **LINEINFO)
def lanes_add(arr, idx, v):  # pragma: no cover - device code
    """arr[idx] += the sum of v over the warp's lanes."""
    if WARP_SHUFFLES:
        v = warp_sum(v)
        if cuda.laneid == 0:
            cuda.atomic.add(arr, idx, v)
    else:
        cuda.atomic.add(arr, idx, v)


@cuda.jit(device=True, inline=True, **LINEINFO)
def lanes_max(arr, idx, v):  # pragma: no cover - device code
    """arr[idx] = max(arr[idx], the maximum of v over the warp's lanes)."""
    if WARP_SHUFFLES:
        v = warp_max(v)
        if cuda.laneid == 0:
            cuda.atomic.max(arr, idx, v)
    else:
        cuda.atomic.max(arr, idx, v)


@cuda.jit(device=True, inline=True, **LINEINFO)
def add_at(arr, i, j, value):  # pragma: no cover - device code
    """arr[i, j] += value, atomically."""
    cuda.atomic.add(arr, (i, j), value)


# The CPU helpers of probe.planner.scalar and their device counterparts.
_OPS = {scalar.mul.py_func: mul, scalar.dmax.py_func: dmax, scalar.dmin.py_func: dmin,
        scalar.add_at.py_func: add_at}
_TWINS: dict = {}


def device(cpu_rule, *, inline: bool = False):
    """The numba.cuda device function of a rule (the dispatcher `@scalar.rule` returned): the
    same Python function, compiled for the GPU with every global name that means a rule
    (`mul`, `dmax`, `dmin` and the other rules it calls) rebound to its device counterpart.
    One device function per (rule, inline), made on the first request."""
    if not scalar.is_rule(cpu_rule):
        raise TypeError(f"device() takes a function decorated with @scalar.rule, got {cpu_rule!r}")
    fn = cpu_rule.py_func
    if fn in _OPS:
        return _OPS[fn]
    key = (fn, inline)
    if key not in _TWINS:
        names = dict(fn.__globals__)
        for name in fn.__code__.co_names:
            value = names.get(name)
            if scalar.is_rule(value):
                names[name] = device(value)
        twin = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__, twin.__doc__ = fn.__qualname__, fn.__doc__
        twin.__module__ = fn.__module__
        _TWINS[key] = cuda.jit(device=True, inline=inline, **LINEINFO)(twin)
    return _TWINS[key]


def capture_graph(graph, launch, device=None):
    """Capture launch() into the torch.cuda.CUDAGraph `graph` and return what that captured
    call returned: a warm-up launch on a side stream first (a kernel's compile and its lazily
    allocated buffers happen there, outside the capture), then the capture on the same side
    stream, with numba's frees deferred (no cuMemFree while the stream captures); the device
    is synchronised at the end. `device`: the CUDA device (default: the current one)."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        launch()
    torch.cuda.current_stream(device).wait_stream(side)
    with cuda.defer_cleanup(), torch.cuda.graph(graph, stream=side):
        out = launch()
    torch.cuda.synchronize(device)
    return out
