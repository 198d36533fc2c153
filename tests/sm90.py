"""Compile numba.cuda kernels for an H200 (sm_90) without a GPU, where NVVM is installed.

Numba's CUDA simulator types some code that the real compiler refuses (a shared array whose
size is an expression, say), so every kernel also gets compiled for real. `compile_for_sm90`
runs `PRELUDE` + a test's code in a fresh interpreter without the simulator and returns the JSON
that the code prints last; the test is skipped where Numba cannot compile CUDA code or NVVM is
missing. The prelude gives the code `ptx_of(py_func, args)` (the PTX for these arguments' types)
and `f64_ops(ptx)` (the float64 FMAs, those of them multiplying by the constant 2.0, the
separately rounded products and the divisions), which the tests assert on: a product that feeds
a sum deciding a choice must be rounded on its own, as it is on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, re
import numba
import numpy as np
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print(json.dumps("no nvvm"))
    raise SystemExit(0)
import numba.cuda.dispatcher as dispatcher
from probe.planner.numba_cuda import cuda

class H200:
    compute_capability = (9, 0)

dispatcher.get_current_device = lambda: H200()  # device functions ask for the GPU's cc

def ptx_of(py_func, args):
    return cuda.compile_ptx(py_func, tuple(numba.typeof(a) for a in args), cc=(9, 0))[0]

def f64_ops(ptx):
    fma = re.findall(r"fma[.a-z]*[.]f64[^;]*", ptx)
    return {"fma": len(fma), "fma_by_2": sum("0d4000000000000000" in x for x in fma),
            "mul_rn": len(re.findall(r"mul[.]rn[.]f64", ptx)),
            "div": sorted(set(re.findall(r"div[.a-z]*[.]f64", ptx)))}
"""


def compile_for_sm90(code: str, timeout: float = 600):
    """Run PRELUDE + code without the simulator; the JSON value its last printed line holds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and "CudaSupportError" in done.stderr:
        pytest.skip("numba cannot compile CUDA code here")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found == "no nvvm":
        pytest.skip("NVVM is not installed")
    return found
