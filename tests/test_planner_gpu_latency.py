"""experiments.planner.gpu_latency in Numba's CUDA simulator (--device cpu --quick): every
planner's one-layer plan checked against its CPU kernel, both greedy memory variants, and the
report files written (nothing is timed there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_latency_script_runs_in_the_simulator(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script sets it for --device cpu
    # --time-limit well past the default 110 s: every step must run (nothing skipped) however
    # busy the machine is; the simulator times nothing, so the limit only gates the steps
    proc = subprocess.run([sys.executable, "-m", "experiments.planner.gpu_latency", "--device",
                           "cpu", "--quick", "--time-limit", "540", "--out", str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_latency.json").read_text())
    assert report["status"] == "finished" and not report["errors"] and not report["skipped"]
    checks = [check for checks in report["checks"].values() for check in checks]
    assert [c["check"] for c in checks] == [
        "greedy one-layer plans (shared) == CPU kernel",
        "assigner one-layer assignment == CPU kernel",
        "parallel greedy one-layer plan == CPU kernel",
        "greedy one-layer plans (global) == CPU kernel"]
    assert all(c["ok"] for c in checks)
    assert checks[0]["cpu_moves"] == checks[3]["cpu_moves"] == [9]  # plans that move tokens
    assert report["rows"] == []  # the simulator times nothing
    assert (tmp_path / "gpu_latency.md").exists()
    assert (tmp_path / "gpu_latency.manifest.json").exists()
