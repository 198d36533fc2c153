"""The GPU greedy's critical path without a GPU: Python lines per thread between barriers.

    python -m experiments.planner.kernel_trace --ep64 --out results/kernel_trace
    python -m experiments.planner.kernel_trace --quick --out /tmp/kernel_trace

A proxy for the instructions of one layer of probe.planner.greedy_cuda (nothing here is timed,
and a Python line is not an instruction): the kernel runs in Numba's CUDA simulator (one Python
thread per CUDA thread, NUMBA_ENABLE_CUDASIM=1, set here for a subprocess) with a line tracer on
every thread, counting the lines each thread executes in probe.planner's files (the kernel, its
device functions and the scalar rules' twins), line by line, between one barrier and the next.
A warp runs its 32 lanes together where they run the same line and one after the other where
they branch apart, so in an interval a warp costs each line as often as its busiest lane runs
it (six lanes on six different loops cost the six loops); the block's threads meet at every
barrier, so an interval lasts as long as its costliest warp. Per layer:
- critical path: the sum over barrier intervals of the costliest warp's lines (the chain of
  lines one after another, barriers between: what a latency-bound block waits for);
- warp lines: the sum over intervals of every warp's lines (a proxy for the warp instructions
  Nsight Compute counts);
- thread lines: every thread's lines together (all the work, redundant work included);
- barriers: the intervals (every thread meets every barrier);
each for the whole layer and for the start alone (max_moves=0), and per move: (layer - start) /
moves. The per-interval critical lines are also summed by the kernel line of the barrier that
ends the interval, to show where the critical path goes. The synthetic decode layers of
experiments.planner.gpu_latency (768 tokens per rank, default rules, k_max 16) at ep=8 / 128
experts (shared memory); --ep64 adds ep=64 / 256 experts (global scratch; some 30 s in the
simulator). Writes kernel_trace.json, kernel_trace.md and a manifest into --out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLANNER = str(ROOT / "probe" / "planner")
SHAPES = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
          ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
WARP = 32


class _Tracer:
    """Counts lines per simulated thread between barriers (the simulator's BlockThread.
    syncthreads is wrapped to close a thread's interval)."""

    def __init__(self) -> None:
        # thread ident -> {(code, line): times} in the open interval
        self.count: dict = defaultdict(lambda: defaultdict(int))
        self.intervals: dict = defaultdict(list)  # (block, tid) -> [(lines, barrier line)]

    def local(self, frame, event, arg):
        if event == "line":
            self.count[threading.get_ident()][(frame.f_code, frame.f_lineno)] += 1
        return self.local

    def call(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(PLANNER):
            return self.local
        return None

    def close(self, thread, where: int) -> None:
        ident = threading.get_ident()
        key = (thread.blockIdx.x, thread.threadIdx.x)
        lines = self.count.pop(ident, {})
        self.intervals[key].append((dict(lines), where))

    def summary(self, threads: int) -> dict:
        blocks = sorted({b for b, _ in self.intervals})
        out = {"critical": 0, "warp_lines": 0, "thread_lines": 0, "barriers": 0,
               "by_barrier": defaultdict(int)}
        for block in blocks:
            rows = [self.intervals.get((block, t), []) for t in range(threads)]
            n = len(rows[0])
            if any(len(r) != n for r in rows):
                raise RuntimeError("threads met different numbers of barriers")
            for i in range(n):
                warps = [_warp_lines([r[i][0] for r in rows[w:w + WARP]])
                         for w in range(0, threads, WARP)]
                worst = max(warps)
                out["critical"] += worst
                out["by_barrier"][rows[0][i][1]] += worst
                out["thread_lines"] += sum(sum(r[i][0].values()) for r in rows)
                out["warp_lines"] += sum(warps)
            out["barriers"] += n
        out["by_barrier"] = dict(out["by_barrier"])
        return out


def _warp_lines(lanes: list) -> int:
    """A warp's lines in one barrier interval: its lanes' lines run together where they run
    the same line, one after the other where they diverge, so each kernel line counts as
    often as the lane that runs it most often (a lane's loop of n turns is n turns of the
    warp; six lanes on six different branches are six branches one after another)."""
    most: dict = {}
    for lines in lanes:
        for key, n in lines.items():
            if n > most.get(key, 0):
                most[key] = n
    return sum(most.values())


def trace_layers(load, home, slots, window, cost, rules, *, threads: int, max_moves=None):
    """Runs the kernel on the layers (one block each) in the simulator with the tracer on;
    returns (summary, moves per layer). Needs NUMBA_ENABLE_CUDASIM=1 before numba.cuda is
    first imported."""
    from numba.cuda.simulator import kernel as sim_kernel

    from probe.planner.greedy_cuda import CudaGreedy

    tracer = _Tracer()
    original = sim_kernel.BlockThread.syncthreads

    def syncthreads(self):
        # the kernel line of the barrier: the first caller frame in the planner's files
        frame = sys._getframe(1)
        while frame is not None and not frame.f_code.co_filename.startswith(PLANNER):
            frame = frame.f_back
        tracer.close(self, frame.f_lineno if frame is not None else -1)
        return original(self)

    runner = CudaGreedy(home, slots, cost, rules, num_layers=load.shape[0], threads=threads,
                        max_moves=max_moves)
    sim_kernel.BlockThread.syncthreads = syncthreads
    threading.settrace(tracer.call)
    try:
        plan = runner.plan(load, window)
    finally:
        threading.settrace(None)
        sim_kernel.BlockThread.syncthreads = original
    # (the lines after a thread's last barrier, its writes of the outputs, are not counted)
    summary = tracer.summary(threads)
    return summary, [int(m) for m in plan.num_moves]


def _measure(shape: tuple, layers: int, threads: int) -> dict:
    from experiments.planner.gpu_greedy import decode_batch

    label, model, hardware, ranks, experts = shape
    load, home, slots, window, cost, rules = decode_batch(model, hardware, ranks, experts,
                                                          layers)
    full, moves = trace_layers(load, home, slots, window, cost, rules, threads=threads)
    start, _ = trace_layers(load, home, slots, window, cost, rules, threads=threads,
                            max_moves=0)
    num_moves = sum(moves)
    row = {"shape": label, "layers": layers, "threads": threads, "moves": num_moves}
    for key in ("critical", "warp_lines", "thread_lines", "barriers"):
        row[key] = full[key]
        row[key + "_start"] = start[key]
        row[key + "_per_move"] = (full[key] - start[key]) / max(num_moves, 1)
    by = defaultdict(float)
    for line, n in full["by_barrier"].items():
        by[line] += n
    for line, n in start["by_barrier"].items():
        by[line] -= n
    row["critical_per_move_by_barrier"] = {str(k): v / max(num_moves, 1)
                                           for k, v in sorted(by.items()) if v}
    return row


def _markdown(report: dict) -> str:
    lines = ["# The GPU greedy's critical path in the CUDA simulator (Python lines, not a GPU "
             "timing)", "", "Command:", "", f"    {report['command']}", "",
             "Per move: (layer - start alone) / moves. A warp's lines in a barrier interval: "
             "each line as often as its busiest lane runs it (lanes that branch apart take "
             "turns). Critical path: the sum over intervals of the costliest warp's lines; warp "
             "lines: the sum over intervals and warps; thread lines: all threads' lines.", "",
             "| shape | threads | layers | moves | critical / move | barriers / move | "
             "warp lines / move | thread lines / move | critical, start | barriers, start |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['shape']} | {row['threads']} | {row['layers']} | {row['moves']} "
                     f"| {row['critical_per_move']:.0f} | {row['barriers_per_move']:.1f} | "
                     f"{row['warp_lines_per_move']:.0f} | {row['thread_lines_per_move']:.0f} | "
                     f"{row['critical_start'] / row['layers']:.0f} | "
                     f"{row['barriers_start'] / row['layers']:.0f} |")
    lines += ["", "Critical path per move by the kernel line of the barrier that ends the "
              "interval (probe/planner/greedy_cuda.py):", ""]
    for row in report["rows"]:
        parts = ", ".join(f"{k}: {v:.0f}" for k, v in row["critical_per_move_by_barrier"].items())
        lines.append(f"- {row['shape']}: {parts}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kernel_trace", help="output folder")
    parser.add_argument("--quick", action="store_true", help="32 threads, ep=8 only")
    parser.add_argument("--layers", type=int, default=1, help="decode layers per shape")
    parser.add_argument("--threads", type=int, default=128, help="threads per block")
    parser.add_argument("--ep64", action="store_true", help="also ep=64 / 256 experts (slow)")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.threads < 1 or args.threads % WARP:
        parser.error(f"--threads must be a positive multiple of {WARP}, got {args.threads}")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":  # the simulator, in a fresh process
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, "-m", "experiments.planner.kernel_trace",
                               *argv], env=env, cwd=ROOT).returncode
    from experiments.manifest import Manifest
    from experiments.planner.speed_harness import save

    run = Manifest.start("experiments.planner.kernel_trace", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = 32 if args.quick else args.threads
    shapes = SHAPES if args.ep64 and not args.quick else SHAPES[:1]
    report = {"command": "python -m experiments.planner.kernel_trace "
              + " ".join(sys.argv[1:] if argv is None else argv), "rows": []}
    for shape in shapes:
        report["rows"].append(_measure(shape, args.layers, threads))
    save(run, out / "kernel_trace.json", report, _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
