"""Lean greedy path: per-layer cost of LeanGreedy.plan against the kernel alone and solve().

Seeded and reproducible; prints a table and writes results/lean_speed.json, lean_speed.md and
lean_speed.manifest.json (OUT's folder and stem).

    python -m experiments.planner.lean_speed [--quick] [--out results/lean_speed.json]

Instances: synthetic decode loads (probe.traces.generate("decode"), 768 tokens per rank, top-8,
3 slots per rank, window "auto" = static expert compute plus attention), ep=8 / 128 experts
(qwen3-235b-a22b on h200x8) and ep=32 / 64 with 256 experts (deepseek-v3 on h200x8-n4 / -n8),
default GreedyRules. Timed per call, after a warm-up, round-robin over instances so that every
method sees the same machine state: "kernel" = `greedy_arrays(*args)` with arguments converted
beforehand; "lean" = `LeanGreedy.plan(load, window)` with the bound (gap certificate);
"lean, no bound" = the same with bound=False; "bound" = `bound_arrays` alone;
"solve" = `solve(problem, "greedy")` on a prebuilt BalanceProblem (fewer samples: it is slow).
Medians over every (instance, repeat) sample; the load average is recorded before and after.
The gap columns: (lean objective - bound) / lean objective over the instances.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from experiments.manifest import Manifest, cpu_name
from probe.planner import BalanceProblem, CostModel, GreedyRules, solve
from probe.planner.greedy import _kernel_args, bound_arrays, greedy_arrays, problem_arrays
from probe.planner.layers import attention_time
from probe.planner.lean import LeanGreedy
from probe.specs import hardware_preset, model_preset
from probe.traces import generate

SLOTS = 3
CONFIGS = (("ep=8, E=128, top-8", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=32, E=256, top-8", "deepseek-v3", "h200x8-n4", 32, 256),
           ("ep=64, E=256, top-8", "deepseek-v3", "h200x8-n8", 64, 256))
TARGET = 1.5  # lean / kernel at ep=8


def _problems(model: str, hardware: str, ranks: int, experts: int, steps: int,
              layers: int) -> list[BalanceProblem]:
    spec_model, spec_hw = model_preset(model), hardware_preset(hardware)
    cost = CostModel.from_specs(spec_model, spec_hw, num_ranks=ranks)
    attention = attention_time(spec_model, spec_hw)
    trace = generate("decode", num_steps=steps, tokens_per_step=768 * ranks, num_layers=layers,
                     num_experts=experts, top_k=8, num_ranks=ranks, seed=1)
    loads = trace.load_counts()
    return [BalanceProblem.from_load(loads[s, layer], cost, SLOTS, "auto",
                                     attention_time=attention)
            for s in range(steps) for layer in range(layers)]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, problems: list[BalanceProblem], *, repeats: int,
            solve_every: int) -> dict:
    first = problems[0]
    lean = LeanGreedy(first.home, first.slots, first.cost, GreedyRules())
    lean_nb = LeanGreedy(first.home, first.slots, first.cost, GreedyRules(), bound=False)
    kargs = [_kernel_args(p, GreedyRules()) for p in problems]
    bargs = [problem_arrays(p) for p in problems]
    inputs = [(np.ascontiguousarray(p.load, dtype=np.int64),
               np.ascontiguousarray(p.window, dtype=np.float64)) for p in problems]
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("kernel", "lean", "lean_nb", "bound", "solve")}
    for i in range(len(problems)):  # warm-up (JIT cache load) and the plans' gaps
        greedy_arrays(*kargs[i])
        lean_nb.plan(*inputs[i])
        bound_arrays(*bargs[i])
        solve(problems[i], "greedy")
    gaps = []
    for i, p in enumerate(problems):
        out = lean.plan(*inputs[i])
        ref = solve(p, "greedy")
        if not np.isclose(out.objective, ref.objective, rtol=1e-9, atol=0.0):
            raise AssertionError(f"{name}: lean objective {out.objective} != solve's "
                                 f"{ref.objective}")
        gaps.append((ref.objective - out.bound) / ref.objective)
    for r in range(repeats):
        for i in range(len(problems)):
            samples["kernel"].append(_time(lambda i=i: greedy_arrays(*kargs[i])))
            samples["lean"].append(_time(lambda i=i: lean.plan(*inputs[i])))
            samples["lean_nb"].append(_time(lambda i=i: lean_nb.plan(*inputs[i])))
            samples["bound"].append(_time(lambda i=i: bound_arrays(*bargs[i])))
            if (r * len(problems) + i) % solve_every == 0:
                samples["solve"].append(_time(lambda i=i: solve(problems[i], "greedy")))
    med = {k: float(np.median(v) * 1e6) for k, v in samples.items()}
    return {
        "config": name, "instances": len(problems),
        "samples": {k: len(v) for k, v in samples.items()},
        **{f"{k}_median_us": v for k, v in med.items()},
        "kernel_p90_us": float(np.percentile(samples["kernel"], 90) * 1e6),
        "lean_p90_us": float(np.percentile(samples["lean"], 90) * 1e6),
        "lean_over_kernel": med["lean"] / med["kernel"],
        "lean_nb_over_kernel": med["lean_nb"] / med["kernel"],
        "solve_over_lean": med["solve"] / med["lean"],
        "gap_median": float(np.median(gaps)), "gap_p90": float(np.percentile(gaps, 90)),
        "within_5pct": float(np.mean(np.asarray(gaps) <= 0.05)),
    }


def _markdown(rows: list[dict], machine: dict, command: str) -> str:
    lines = [
        "# Lean greedy path: per-layer cost and the online gap certificate", "",
        "Command (seeded; JSON and manifest next to this file):", "", f"    {command}", "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['platform']}, Python "
        f"{machine['python']}; load average (1 min) {machine['load_before'][0]:.2f} before and "
        f"{machine['load_after'][0]:.2f} after the run (a shared 2-core box: other jobs run "
        f"beside it; {machine['utc']}).", "",
        "Per call, one layer, default GreedyRules (k_max 16), 3 slots per rank, window auto, "
        "synthetic decode loads (768 tokens per rank, top-8). kernel = `greedy_arrays` with "
        "pre-converted arguments; lean = `LeanGreedy.plan(load, window)` (shape/dtype checks, "
        "value checks and the bound inside the one compiled call); lean, no bound = "
        "`bound=False`; bound = `bound_arrays` alone; solve = `solve(problem, \"greedy\")` "
        "(dense Plan, check_plan, evaluate_plan) on a prebuilt problem. Medians in "
        "microseconds. gap = (greedy objective - bound) / greedy objective over the "
        "instances: how far the certificate proves the greedy plan from the optimum at most. "
        "The runtime's host planner is the lean path without the bound "
        "(probe.runtime.device_plan), and probe.sim.costs charges a host plan as the kernel's "
        "time times the 'no bound / kernel' ratio of this table at that shape.",
        "",
        "| config | kernel | lean | lean / kernel | lean, no bound | no bound / kernel | bound "
        "| solve | solve / lean | gap median | gap p90 | proven within 5% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['kernel_median_us']:.1f} | {r['lean_median_us']:.1f} | "
            f"**{r['lean_over_kernel']:.2f}x** | {r['lean_nb_median_us']:.1f} | "
            f"{r['lean_nb_over_kernel']:.2f}x | "
            f"{r['bound_median_us']:.1f} | {r['solve_median_us']:.0f} | "
            f"{r['solve_over_lean']:.0f}x | {100 * r['gap_median']:.1f}% | "
            f"{100 * r['gap_p90']:.1f}% | {100 * r['within_5pct']:.0f}% |")
    ep8 = rows[0]["lean_over_kernel"]
    verdict = "met" if ep8 <= TARGET else "missed"
    lines += ["", f"Target lean / kernel <= {TARGET}x at ep=8 / 128 experts: {verdict} "
              f"({ep8:.2f}x). Samples per method: "
              + "; ".join(f"{r['config']}: {r['samples']}" for r in rows) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances and repeats")
    parser.add_argument("--out", default="results/lean_speed.json")
    args = parser.parse_args(argv)
    run = Manifest.start("experiments.planner.lean_speed", argv)
    console = Console()
    load_before = os.getloadavg()
    rows = []
    for name, model, hardware, ranks, experts in CONFIGS:
        problems = _problems(model, hardware, ranks, experts, steps=4 if args.quick else 10,
                             layers=4 if args.quick else 8)
        small = ranks <= 8
        repeats = (10 if args.quick else 60) if small else (3 if args.quick else 10)
        rows.append(measure(name, problems, repeats=repeats, solve_every=4 if small else 8))
    load_after = os.getloadavg()

    table = Table(title="lean greedy path, one layer (medians, us)")
    for col in ("config", "kernel", "lean", "lean/kernel", "lean no bound", "bound", "solve",
                "solve/lean", "gap median", "within 5%"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["config"], f"{r['kernel_median_us']:.1f}", f"{r['lean_median_us']:.1f}",
                      f"{r['lean_over_kernel']:.2f}x", f"{r['lean_nb_median_us']:.1f}",
                      f"{r['bound_median_us']:.1f}", f"{r['solve_median_us']:.0f}",
                      f"{r['solve_over_lean']:.0f}x", f"{100 * r['gap_median']:.1f}%",
                      f"{100 * r['within_5pct']:.0f}%")
    console.print(table)
    console.print(f"load average before {load_before}, after {load_after}")

    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "cpu": cpu_name(), "cpus": os.cpu_count(), "quick": args.quick,
               "load_before": list(load_before), "load_after": list(load_after),
               "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    command = "python -m experiments.planner.lean_speed" + (" --quick" if args.quick else "")
    md = out.with_suffix(".md")
    md.write_text(_markdown(rows, machine, command))
    run.write(out.parent, [out, md], name=out.with_suffix(".manifest.json").name)
    console.print(f"wrote {out}, {md}")


if __name__ == "__main__":
    main()
