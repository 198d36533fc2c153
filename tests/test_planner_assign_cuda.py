"""The GPU dispatch-time assignment (probe.planner.assign_cuda) under Numba's CUDA simulator,
against the host kernel. The simulator must be switched on before Numba is first imported,
so the comparisons run in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probe.planner.cost import CostModel

ROOT = Path(__file__).resolve().parents[1]


def run_simulated(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_device_kernel_equals_host_kernel_on_random_instances():
    # 30 random instances x 3 layers, half given the home: the same integers and the same
    # eq. 8 objective as assign._best, and an expert with tokens but no copy flags its layer.
    code = """
import json
import numpy as np
from experiments.planner.gpu_assign import compare_random
from probe.planner.assign_cuda import DeviceAssigner
from probe.planner.cost import CostModel
problems = compare_random(30, seed=11)
cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.1, transfer_time=1.0)
load = np.array([[[3, 1], [2, 0]], [[3, 0], [2, 0]]])
copies = np.array([[[1, 0], [1, 0]], [[1, 0], [1, 0]]])   # expert 1 has no copy
out, obj, status = DeviceAssigner(cost, 2, 2)(load, copies)
print(json.dumps({"problems": problems, "status": status.copy_to_host().tolist()}))
"""
    done = run_simulated(code)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["problems"] == []
    assert result["status"] == [1, 0]


def test_device_pairwise_sum_is_numpys():
    # _np_sum (the fixed levels) must give numpy's float64 sum bit for bit, across the
    # pairwise block (128) and several recursion levels; a sequential sum differs on these.
    code = """
import json
import numpy as np
from probe.planner.assign_cuda import _np_sum
from probe.planner.numba_cuda import cuda

@cuda.jit
def rows(a, n, out):
    g = cuda.grid(1)
    if g < a.shape[0]:
        out[g] = _np_sum(a[g], 0, n)

rng = np.random.default_rng(5)
bad = []
for n in (0, 1, 7, 8, 9, 17, 127, 128, 129, 136, 255, 257, 300, 1031, 2049, 4100):
    a = rng.standard_normal((3, n)) * 10.0 ** rng.integers(-8, 8, (3, n))
    out = np.zeros(3)
    rows[1, 3](a, n, out)
    if not np.array_equal(out, a.sum(axis=1)):
        bad.append(n)
print(json.dumps(bad))
"""
    done = run_simulated(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_compiled_kernel_has_no_fma():
    # Compiled for an H200 (sm_90) without a GPU, where NVVM is installed: no product may be
    # fused into an FMA (each goes through dmul_rn), and divisions are IEEE (div.rn).
    code = """
import json, re
import numba
import numpy as np
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print(json.dumps("no nvvm"))
    raise SystemExit(0)
import numba.cuda.dispatcher as dispatcher
from probe.planner import assign_cuda as ac
from probe.planner.numba_cuda import cuda

class H200:
    compute_capability = (9, 0)

dispatcher.get_current_device = lambda: H200()  # device functions ask for the GPU's cc
L, G, E, C, T = 1, 4, 8, 6, ac.THREADS
i, f = np.int64, np.float64
shapes = [((L, G, E), i)] * 3 + [True, ((G, G), f), (G, f), 1.0, 1.0, 8,
          ((L, E), i), ((L, G, E), np.bool_), ((L, E), i), ((L, E, G), i), ((L, E), i),
          (L, i), ((L, G), f), ((L, G, E), f), ((L, C, E, G), f), ((L, C, E, G), i),
          ((L, C, G, G), i), ((L, C, G), f), ((L, C, 2 * G), f), ((L, C, 4, G), f),
          ((L, C, G), f), ((L, C), f), ((L, T, G), f), ((L, T, G), i), ((L, T, G), i),
          ((L, T, G), i), ((L, G, E, G), i), (L, f), (L, np.int32)]
args = [np.zeros(*s) if isinstance(s, tuple) else s for s in shapes]
ptx, _ = cuda.compile_ptx(ac._assign_kernel.py_func, tuple(numba.typeof(a) for a in args),
                          cc=(9, 0))
print(json.dumps({"fma": len(re.findall(r"fma[.a-z]*[.]f64", ptx)),
                  "mul_rn": len(re.findall(r"mul[.]rn[.]f64", ptx)),
                  "div": sorted(set(re.findall(r"div[.a-z]*[.]f64", ptx)))}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "CudaSupportError" in done.stderr:
        pytest.skip("numba cannot compile CUDA code here")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found == "no nvvm":
        pytest.skip("NVVM is not installed")
    assert found["fma"] == 0 and found["mul_rn"] > 20 and found["div"] == ["div.rn.f64"]


def test_gpu_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script sets it for --device cpu
    done = subprocess.run([sys.executable, "-m", "experiments.planner.gpu_assign", "--device",
                           "cpu", "--quick", "--seed", "3", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_assign.json").read_text())
    assert result["mismatches"] == [] and result["layers_checked"] >= 20
    assert all(row["device_eager_us"] > 0 for row in result["speed"])
    assert (tmp_path / "gpu_assign.md").exists()
    assert (tmp_path / "gpu_assign.manifest.json").exists()


def test_bad_arguments():
    from probe.planner.assign_cuda import DeviceAssigner

    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.1, transfer_time=1.0)
    with pytest.raises(TypeError, match="cost"):
        DeviceAssigner("cost", 2, 1)
    with pytest.raises(ValueError, match="num_layers"):
        DeviceAssigner(cost, 2, 0)
    with pytest.raises(ValueError, match="passes"):
        DeviceAssigner(cost, 2, 1, passes=0)
    free = CostModel.uniform(2, alpha=1.0, beta=0.0, token_time=0.1, transfer_time=1.0)
    with pytest.raises(ValueError, match="beta"):
        DeviceAssigner(free, 2, 1)
    assigner = DeviceAssigner(cost, 2, 1)
    good = np.ones((1, 2, 2), np.int64)
    with pytest.raises(ValueError, match="load must have shape"):
        assigner(np.ones((1, 2, 3), np.int64), good)
    with pytest.raises(TypeError, match="copies must have an integer"):
        assigner(good, np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="with_home=False"):
        assigner(good, good, good)
    with pytest.raises(ValueError, match="home is required"):
        DeviceAssigner(cost, 2, 1, with_home=True)(good, good)
    with pytest.raises(TypeError, match="CUDA array"):
        assigner(good.tolist(), good)
