"""numba.cuda, importable next to a numpy that no longer has `row_stack`.

numba-cuda 0.30 (the version on the H200 machine, with numpy 2.5) registers an overload for
`numpy.row_stack` while it compiles its first kernel; numpy removed that alias of `vstack`, so
the first launch fails with AttributeError before any of our code runs. Restoring the alias
before numba.cuda loads is enough: our kernels never call it. Every numba.cuda kernel of the
project imports `cuda` from here. Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) is unaffected.
"""

from __future__ import annotations

import numpy

if not hasattr(numpy, "row_stack"):  # pragma: no cover - depends on the installed numpy
    numpy.row_stack = numpy.vstack

from numba import cuda  # noqa: E402

__all__ = ["cuda"]
