"""The GPU greedy's kernel without a GPU: ptxas's numbers, and how much work one layer does.

    python -m experiments.planner.kernel_stats --out results/kernel_stats
    python -m experiments.planner.kernel_stats --quick --out /tmp/kernel_stats

Two honest proxies for the latency of one layer of probe.planner.greedy_cuda (a layer is one
thread block; nothing here is timed):
1. The compiled kernel, per shape and memory variant (G = 8 / E = 128 in shared memory,
   G = 64 / E = 256 in global scratch): the PTX that Numba makes for sm_90 and what `ptxas -v`
   says of it (registers per thread, stack frame: the per-thread `cuda.local` arrays, spill
   bytes, shared memory, the cubin's size). A large cubin is code a warp walks through once
   per candidate: instruction-cache misses.
2. The work of the synthetic decode layers of experiments.planner.gpu_latency (768 tokens per
   rank, default rules), counted by running the kernel's Python source sequentially (one thread
   per block: `run_sequential`, which the tests also use): per move, the candidates tried before
   the first one that gains, how many of them got past the cheap pruning, and how many
   evaluations of one amount x (a candidate's rank times after moving x tokens, as
   rule 6's bisections ask for them) an unpruned candidate makes. Each evaluation is a chain of
   dependent loads (a binary search over the candidate's pool and a dozen operands).
Needs NVVM and ptxas for part 1 (skipped, and said so, where either is missing); part 2 runs
anywhere. Writes kernel_stats.json, kernel_stats.md and a manifest into --out and prints the
tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from experiments.planner.cuda_sequential import sequential

ROOT = Path(__file__).resolve().parents[2]
# (label, model, hardware, G, E, memory): the shapes gpu_latency times.
SHAPES = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128, "shared"),
          ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256, "global"))

# Compiles greedy_cuda's kernel for sm_90 in a fresh interpreter without the simulator and
# prints its PTX's path (what tests/sm90.py's prelude does, kept here so that an experiment does
# not import the tests).
_PTX_CODE = """
import sys
import numba
import numpy as np
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print("no nvvm")
    raise SystemExit(0)
import numba.cuda.dispatcher as dispatcher
from probe.planner.numba_cuda import cuda
from probe.planner import greedy_cuda as gc

class H200:
    compute_capability = (9, 0)

dispatcher.get_current_device = lambda: H200()
G, E, shared, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "shared", sys.argv[4]
i8, f8 = np.int64, np.float64
z = lambda *shape, dt=i8: np.zeros(shape, dt)
Ls, Gs, Es = (1, 1, 1) if shared else (1, G, E)
args = (z(1, G, E), z(1, G, E, dt=np.bool_), z(G), z(1, G, dt=f8), 1.0, 1.0, z(G, G, dt=f8),
        z(G, G, dt=f8), np.int64(16), 1e-9, True, False, True, False, z(Ls, Es),
        z(Ls, Es, Gs), z(Ls, Gs, Es), z(Ls, Gs, Es), z(Ls, Gs, Gs), z(Ls, Gs, Es, dt=np.uint8),
        z(Ls, Es), z(1, 16, 3), z(1), z(1, 16), z(1, 16, G, G), z(1), z(1), z(1, dt=f8), z(1))
sig = tuple(numba.typeof(a) for a in args)
ptx = cuda.compile_ptx(gc._kernel_source(G, E, shared), sig, cc=(9, 0))[0]
open(path, "w").write(ptx)
print(path)
"""


def ptx_stats(num_ranks: int, num_experts: int, memory: str, workdir: Path) -> dict:
    """ptxas -v's numbers for the kernel of one shape and memory variant, with the PTX's and
    the cubin's sizes; {"skipped": why} where NVVM or ptxas is missing."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return {"skipped": "ptxas not on PATH"}
    ptx_path = workdir / f"greedy_{num_ranks}_{num_experts}_{memory}.ptx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", _PTX_CODE, str(num_ranks), str(num_experts),
                           memory, str(ptx_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        return {"skipped": "PTX compile failed: " + done.stderr.strip().splitlines()[-1][:200]}
    if done.stdout.strip() == "no nvvm":
        return {"skipped": "NVVM not installed"}
    cubin = ptx_path.with_suffix(".cubin")
    out = subprocess.run([ptxas, "-arch=sm_90", "-v", str(ptx_path), "-o", str(cubin)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"skipped": "ptxas failed: " + out.stderr.strip()[-200:]}
    info = out.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, info)
        return int(found.group(1)) if found else -1

    ptx = ptx_path.read_text()
    return {"registers": number(r"Used (\d+) registers"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"),
            "shared_bytes": number(r"(\d+) bytes smem"),
            "ptx_bytes": len(ptx), "ptx_instructions": _ptx_instructions(ptx),
            "cubin_bytes": cubin.stat().st_size}


def _ptx_instructions(ptx: str) -> int:
    """PTX instruction lines (not labels, directives, braces or comments)."""
    count = 0
    for line in ptx.splitlines():
        line = line.strip()
        if line and line[0] not in ".{}/$" and not line.endswith(":"):
            count += 1
    return count


def run_sequential(*args, num_layers: int, in_shared: bool = False, wrap=None) -> None:
    """Run greedy_cuda's kernel on numpy launch arguments (`host_buffers`) as plain Python, one
    thread per block, its working arrays in (simulated) shared memory or in the global scratch
    arguments."""
    from probe.planner import greedy_cuda

    num_ranks, num_experts = args[1].shape[1:]
    run = sequential(greedy_cuda._kernel_source(num_ranks, num_experts, in_shared), wrap=wrap)
    run(*args, num_layers=num_layers)


def host_buffers(load, home, slots, window, alpha, beta, tt, xt, rules) -> tuple:
    """The kernel's launch arguments as numpy arrays (scratch and outputs zeroed)."""
    L, G, E = load.shape  # noqa: N806 (the shape letters)
    limit = rules.max_moves(G, E) or 1_000_000
    cap_rep = max(min(int(np.minimum(slots, E).sum()), limit), 1)
    cap_blk = max(min(limit, E), 1)
    i64 = np.int64
    return (load.astype(i64), home.astype(bool), slots.astype(i64), window.astype(float),
            float(alpha), float(beta), tt, xt, limit, rules.epsilon, rules.move_local,
            rules.evacuate, rules.two_phase, rules.mean_cap,
            np.zeros((L, E), i64), np.zeros((L, E, G), i64), np.zeros((L, G, E), i64),
            np.zeros((L, G, E), i64), np.zeros((L, G, G), i64), np.zeros((L, G, E), np.uint8),
            np.zeros((L, E), i64),
            np.zeros((L, cap_rep, 3), i64), np.zeros(L, i64), np.zeros((L, cap_blk), i64),
            np.zeros((L, cap_blk, G, G), i64), np.zeros(L, i64), np.zeros(L, i64),
            np.zeros(L), np.zeros(L, i64))


def work_counts(batch, layer: int) -> dict:
    """Per move of one layer, run sequentially: candidates tried up to the first gaining one,
    those past the pruning (a pool built) and the evaluations of x each of them made."""
    load, home, slots, window, cost, rules = batch
    calls = {"eval": 0, "pool": 0}
    per_move: list = []
    current: list = []

    def wrap(name, fn):
        if name == "_candidate":
            def candidate(*a):
                calls["eval"] = calls["pool"] = 0
                out = fn(*a)
                current.append((calls["pool"], calls["eval"]))
                return out
            return candidate
        if name in ("_eval_x", "_after_p", "_src_after_p", "_prefix"):
            key = "pool" if name == "_prefix" else "eval"

            def counted(*a):
                calls[key] += 1
                return fn(*a)
            return counted
        if name == "_apply_move":
            def applied(*a):
                per_move.append(list(current))
                current.clear()
                return fn(*a)
            return applied
        return fn

    args = host_buffers(load[layer:layer + 1], home[layer:layer + 1], slots,
                        window[layer:layer + 1], cost.alpha, cost.beta, cost.token_time,
                        cost.transfer_time, rules)
    run_sequential(*args, num_layers=1, in_shared=True, wrap=wrap)
    moves = [{"tried": len(c), "unpruned": sum(p > 0 for p, _ in c),
              "evals": [n for p, n in c if p > 0]} for c in per_move]
    last = {"tried": len(current), "unpruned": sum(p > 0 for p, _ in current),
            "evals": [n for p, n in current if p > 0]}
    evals = [n for m in moves for n in m["evals"]]
    return {"moves": len(moves), "per_move": moves, "no_gain_pass": last,
            "tried_per_move": float(np.mean([m["tried"] for m in moves])) if moves else 0.0,
            "unpruned_per_move": float(np.mean([m["unpruned"] for m in moves])) if moves else 0.0,
            "evals_per_unpruned": float(np.mean(evals)) if evals else 0.0,
            "evals_max": max(evals, default=0)}


def _markdown(report: dict) -> str:
    lines = ["# The GPU greedy's kernel, without a GPU", "", "Command:", "",
             f"    {report['command']}", "",
             "ptxas -arch=sm_90 -v on the PTX Numba makes (one kernel per shape and memory):",
             "", "| shape | memory | registers | stack B | spill B (st/ld) | shared B | PTX KB "
             "| PTX instr | cubin KB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["ptxas"]:
        if "skipped" in row:
            lines.append(f"| {row['shape']} | {row['memory']} | skipped: {row['skipped']} "
                         "| | | | | | |")
            continue
        lines.append(f"| {row['shape']} | {row['memory']} | {row['registers']} | "
                     f"{row['stack_bytes']} | {row['spill_stores']}/{row['spill_loads']} | "
                     f"{row['shared_bytes']} | {row['ptx_bytes'] / 1024:.0f} | "
                     f"{row['ptx_instructions']} | {row['cubin_bytes'] / 1024:.0f} |")
    lines += ["", "Work per layer (decode layers, the kernel run sequentially; per move: "
              "candidates tried up to the first gaining one, those past the pruning, and "
              "evaluations of x per unpruned candidate):", "",
              "| shape | layer | moves | tried / move | unpruned / move | evals / unpruned | "
              "max evals | no-gain pass: tried, unpruned |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["work"]:
        last = row["no_gain_pass"]
        lines.append(f"| {row['shape']} | {row['layer']} | {row['moves']} | "
                     f"{row['tried_per_move']:.1f} | {row['unpruned_per_move']:.2f} | "
                     f"{row['evals_per_unpruned']:.1f} | {row['evals_max']} | "
                     f"{last['tried']}, {last['unpruned']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kernel_stats", help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="one decode layer per shape instead of 4, no ptxas")
    parser.add_argument("--layers", type=int, default=4, help="decode layers counted per shape")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    from experiments.manifest import Manifest
    from experiments.planner.gpu_greedy import decode_batch

    run = Manifest.start("experiments.planner.kernel_stats", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = 1 if args.quick else args.layers
    report = {"command": "python -m experiments.planner.kernel_stats"
              + (" --quick" if args.quick else ""), "ptxas": [], "work": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, _, _, ranks, experts, memory in SHAPES:
            if args.quick:
                stats = {"skipped": "--quick"}
            else:
                stats = ptx_stats(ranks, experts, memory, Path(tmp))
            report["ptxas"].append({"shape": label, "memory": memory, **stats})
    for label, model, hardware, ranks, experts, _ in SHAPES:
        batch = decode_batch(model, hardware, ranks, experts, max(layers, 1))
        for layer in range(layers):
            report["work"].append({"shape": label, "layer": layer,
                                   **work_counts(batch, layer)})
    json_path, md_path = out / "kernel_stats.json", out / "kernel_stats.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(_markdown(report))
    run.write(out, [json_path, md_path], name="kernel_stats.manifest.json")
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
