"""numba.cuda, importable next to a numpy that no longer has `row_stack`.

numba-cuda 0.30 (the version on the H200 machine, with numpy 2.5) registers an overload for
`numpy.row_stack` while it compiles its first kernel; numpy removed that alias of `vstack`, so
the first launch fails with AttributeError before any of our code runs. Restoring the alias
before numba.cuda loads is enough: our kernels never call it. Every numba.cuda kernel of the
project imports `cuda` from here. Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) is unaffected.

It also holds the device functions the kernels share so that their float64 arithmetic is the
CPU kernels': `mul` (a product rounded on its own, never contracted into an FMA with a later
sum, which would round once and can flip a tie), `dmax` and `dmin` (Python's max / min for two
values, written out because the builtins do not compile for every numba.cuda version).
"""

from __future__ import annotations

import numpy

if not hasattr(numpy, "row_stack"):  # pragma: no cover - depends on the installed numpy
    numpy.row_stack = numpy.vstack

from numba import config, float64  # noqa: E402
from numba import cuda  # noqa: E402

__all__ = ["SIMULATOR", "cuda", "dmax", "dmin", "mul"]

SIMULATOR = bool(config.ENABLE_CUDASIM)

if SIMULATOR:
    @cuda.jit(device=True)
    def mul(a, b):  # pragma: no cover - device code
        return a * b
else:  # pragma: no cover (needs a GPU)
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def mul(a, b):
        """a * b rounded on its own (never fused into an FMA with a later + or -)."""
        return libdevice.dmul_rn(float64(a), float64(b))


@cuda.jit(device=True, inline=True)
def dmax(a, b):  # pragma: no cover - device code
    """max(a, b) as Python and Numba's CPU target take it: a unless b > a."""
    return b if b > a else a


@cuda.jit(device=True, inline=True)
def dmin(a, b):  # pragma: no cover - device code
    """min(a, b): a unless b < a."""
    return b if b < a else a
