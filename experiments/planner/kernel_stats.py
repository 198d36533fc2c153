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
   the first one that gains, how many of them got past the cheap pruning (each is searched by
   the whole block), the evaluations of one amount x (a candidate's rank times after moving x
   tokens, as rule 6's bisections ask for them) its search makes one after another with one
   result slot per round, and the rounds it takes with greedy_cuda.SLOTS slots (a block of 64
   threads or more: each round its evaluations side by side, one barrier, then the walk through
   the results). The dependent steps of a move: its rounds of pruning plus one thread's chain of
   evaluations (the kernel before its search was spread over the block), or plus the search's
   rounds (now). Each evaluation is a chain of dependent loads (a binary search over the
   candidate's pool and a dozen operands).
Needs NVVM and ptxas for part 1 (skipped, and said so, where either is missing); part 2 runs
anywhere. Writes kernel_stats.json, kernel_stats.md and a manifest into --out and prints the
tables.
"""

from __future__ import annotations

import argparse
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


def run_sequential(*args, num_layers: int, in_shared: bool = False, slots: int = 1,
                   wrap=None) -> None:
    """Run greedy_cuda's kernel on numpy launch arguments (`host_buffers`) as plain Python, one
    thread per block, its working arrays in (simulated) shared memory or in the global scratch
    arguments, `slots` amounts per round of a candidate's search (1: one evaluation per round,
    the CPU kernel's chain; greedy_cuda.SLOTS: the rounds of a block of 64 threads or more,
    the one thread making every slot's evaluation)."""
    from probe.planner import greedy_cuda

    num_ranks, num_experts = args[1].shape[1:]
    run = sequential(greedy_cuda._kernel_source(num_ranks, num_experts, in_shared, slots),
                     wrap=wrap)
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


def _count_moves(batch, layer: int, slots: int) -> tuple[list, list]:
    """One layer run sequentially with `slots` amounts per round: per move (and for the last
    pass, which found no move) one entry per searched candidate, (tried, evaluations, rounds):
    the candidates tried since the last one searched (itself included), its evaluations of x
    and its rounds of evaluations; the last pass ends with (tried after its last search, 0,
    0)."""
    load, home, slots_g, window, cost, rules = batch
    calls = {"prune": 0, "eval": 0, "round": 0}
    per_move: list = []
    current: list = []

    def wrap(name, fn):
        key = {"_prune": "prune", "_eval_x": "eval", "_plan_round": "round"}.get(name)
        if key is not None:
            def counted(*a):
                calls[key] += 1
                return fn(*a)
            return counted
        if name == "_search":
            def search(*a):
                # (the pruning calls so far: the candidates tried)
                calls["eval"] = calls["round"] = 0
                out = fn(*a)
                current.append((calls["prune"], calls["eval"], calls["round"]))
                calls["prune"] = 0
                return out
            return search
        if name == "_after_k":  # (called once per move: its application, on one thread)
            def applied(*a):
                per_move.append(list(current))
                current.clear()
                return fn(*a)
            return applied
        return fn

    args = host_buffers(load[layer:layer + 1], home[layer:layer + 1], slots_g,
                        window[layer:layer + 1], cost.alpha, cost.beta, cost.token_time,
                        cost.transfer_time, rules)
    run_sequential(*args, num_layers=1, in_shared=True, slots=slots, wrap=wrap)
    current.append((calls["prune"], 0, 0))  # the last pass: tried, nothing searched after
    return per_move, current


def work_counts(batch, layer: int, threads: int = 128) -> dict:
    """Per move of one layer, run sequentially: candidates tried up to the first gaining one,
    those past the pruning (each searched by the whole block), the evaluations of x a search
    makes one after another (the CPU kernel's chain: one slot per round) and the rounds it
    takes with greedy_cuda.SLOTS slots (a block of 64 threads or more), and the dependent
    steps of a move on a block of `threads` threads: rounds of pruning (`threads` candidates
    each) plus the searches' rounds (before these changes: the rounds of pruning plus one
    thread's whole chain of evaluations)."""
    from probe.planner.greedy_cuda import SLOTS

    serial, last = _count_moves(batch, layer, 1)
    wide, last_wide = _count_moves(batch, layer, SLOTS)
    assert [[c[0] for c in m] for m in serial] == [[c[0] for c in m] for m in wide]
    moves = []
    for one, many in zip(serial, wide, strict=True):
        tried = sum(c[0] for c in one)
        prune_rounds = -(-tried // threads)
        moves.append({"tried": tried, "unpruned": len(one), "evals": [c[1] for c in one],
                      "rounds": [c[2] for c in many], "evals_made": [c[1] for c in many],
                      "chain_before": prune_rounds + sum(c[1] for c in one),
                      "chain_after": prune_rounds + sum(c[2] for c in many)})
    tried_last = sum(c[0] for c in last)
    no_gain = {"tried": tried_last, "unpruned": len(last) - 1,
               "evals": [c[1] for c in last[:-1]], "rounds": [c[2] for c in last_wide[:-1]]}
    evals = [n for m in moves for n in m["evals"]]
    rounds = [n for m in moves for n in m["rounds"]]
    made = [n for m in moves for n in m["evals_made"]]

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else 0.0

    return {"moves": len(moves), "per_move": moves, "no_gain_pass": no_gain,
            "threads": threads, "slots": SLOTS,
            "tried_per_move": mean([m["tried"] for m in moves]),
            "unpruned_per_move": mean([m["unpruned"] for m in moves]),
            "evals_per_unpruned": mean(evals), "evals_max": max(evals, default=0),
            "rounds_per_unpruned": mean(rounds), "rounds_max": max(rounds, default=0),
            "evals_made_per_round": sum(made) / max(sum(rounds), 1),
            "chain_before_per_move": mean([m["chain_before"] for m in moves]),
            "chain_after_per_move": mean([m["chain_after"] for m in moves])}


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
    work = report["work"]
    threads, slots = (work[0]["threads"], work[0]["slots"]) if work else (128, 64)
    lines += ["", "Work per layer (decode layers, the kernel run sequentially; per move: "
              "candidates tried up to the first gaining one, those past the pruning (each "
              "searched by the whole block), the evaluations of x a search makes one after "
              "another with one result slot per round (the CPU kernel's order; a step that "
              "asks for the amount the step before asked for reuses it), the rounds in which "
              f"a block with {slots} result slots makes them (a round: its evaluations side by "
              "side, one barrier, the walk), the evaluations such a round makes, and the "
              f"dependent steps of a move on {threads} threads: rounds of pruning plus, before, "
              "one thread's chain of evaluations, after, the searches' rounds; "
              "kernel_stats_before.md has the numbers of the kernel before its latency "
              "changes):", "",
              "| shape | layer | moves | tried / move | unpruned / move | evals / unpruned | "
              "max evals | rounds / unpruned | max rounds | evals made / round | "
              "chain / move before | chain / move after | no-gain pass: tried, unpruned |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in work:
        last = row["no_gain_pass"]
        lines.append(f"| {row['shape']} | {row['layer']} | {row['moves']} | "
                     f"{row['tried_per_move']:.1f} | {row['unpruned_per_move']:.2f} | "
                     f"{row['evals_per_unpruned']:.1f} | {row['evals_max']} | "
                     f"{row['rounds_per_unpruned']:.1f} | {row['rounds_max']} | "
                     f"{row['evals_made_per_round']:.1f} | "
                     f"{row['chain_before_per_move']:.1f} | {row['chain_after_per_move']:.1f} | "
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
    from experiments.planner.speed_harness import save
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
    save(run, out / "kernel_stats.json", report, _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
