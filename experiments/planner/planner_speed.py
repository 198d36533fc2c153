"""Greedy planner: speed (Numba kernel vs its Python twin) and balance on the decode workload.

Seeded and reproducible; prints tables and writes JSON (default results/planner_speed.json)
and its manifest (OUT with .manifest.json).

    python -m experiments.planner.planner_speed [--quick] [--out results/planner_speed.json]

Speed: one layer's `greedy_arrays` call (the kernel: arrays in, arrays out), after JIT warm-up,
on synthetic decode loads (768 tokens per rank, top-8, 3 slots per rank, window "auto" =
each rank's static expert compute plus an attention estimate): ep=8 / 128 experts
(qwen3-235b-a22b on h200x8) and ep=64 / 256 experts (deepseek-v3 on h200x8-n8). Medians over
every (instance, repeat) sample. The twin (greedy_ref) is timed on a few instances; `solve()`
overhead (dense Plan, checker, metrics) is measured separately.

Balance: the default decode workload at ep=8, top-4 of 128 experts (gpt-oss-120b on h200x8),
every layer of every step: mean IR (tokens, eq. 1) and mean objective (eq. 8, seconds) of
static EP, greedy (3 slots per rank), and EPLB-style (history: previous 16 steps, same slots
and windows).
"""

from __future__ import annotations

import os
import platform

import numpy as np
from rich.table import Table

from experiments.manifest import cpu_name
from experiments.planner.speed_harness import save, start, timed
from probe.planner import (
    BalanceProblem,
    CostModel,
    GreedyRules,
    evaluate_plan,
    solve,
    static_plan,
)
from probe.planner.greedy import _kernel_args, greedy_arrays, greedy_plan
from probe.planner.greedy_ref import greedy_ref
from probe.planner.layers import attention_time
from probe.specs import hardware_preset, model_preset
from probe.traces import generate

SLOTS = 3


def _problems(workload_knobs: dict, *, model: str, hardware: str, num_ranks: int,
              num_experts: int, top_k: int, steps: int, layers: int, tokens_per_rank: int | None,
              window: str | float = "auto", seed: int = 0):
    spec_model, spec_hw = model_preset(model), hardware_preset(hardware)
    cost = CostModel.from_specs(spec_model, spec_hw, num_ranks=num_ranks)
    attention = attention_time(spec_model, spec_hw)
    tokens = None if tokens_per_rank is None else tokens_per_rank * num_ranks
    trace = generate("decode", num_steps=steps, tokens_per_step=tokens, num_layers=layers,
                     num_experts=num_experts, top_k=top_k, num_ranks=num_ranks, seed=seed,
                     **workload_knobs)
    loads = trace.load_counts()  # [N, L, S, E]
    problems = []
    for step in range(loads.shape[0]):
        row = []
        for layer in range(loads.shape[1]):
            row.append(BalanceProblem.from_load(loads[step, layer], cost, SLOTS, window,
                                                attention_time=attention))
        problems.append(row)
    return problems, loads


def speed(name: str, problems: list[BalanceProblem], *, repeats: int, twin: int) -> dict:
    args = [_kernel_args(p, GreedyRules()) for p in problems]
    greedy_arrays(*args[0])  # JIT warm-up (loads the on-disk cache or compiles)
    kernel = []
    moves = []
    for a in args:
        kernel += timed(lambda a=a: greedy_arrays(*a), repeats)
        moves.append(greedy_arrays(*a)[3])
    ref = []
    for p in problems[:twin]:
        ref += timed(lambda p=p: greedy_ref(p), 1)
    kernel_same = kernel[: repeats * twin]
    plan_build = []
    full = []
    for p in problems[:twin]:
        plan_build += timed(lambda p=p: greedy_plan(p), 3)
        full += timed(lambda p=p: solve(p, "greedy"), 3)
    return {
        "config": name,
        "instances": len(problems),
        "samples": len(kernel),
        "kernel_median_us": float(np.median(kernel) * 1e6),
        "kernel_p90_us": float(np.percentile(kernel, 90) * 1e6),
        "mean_moves": float(np.mean(moves)),
        "twin_median_ms": float(np.median(ref) * 1e3),
        "twin_over_kernel": float(np.median(ref) / np.median(kernel_same)),
        "greedy_plan_median_us": float(np.median(plan_build) * 1e6),
        "solve_median_us": float(np.median(full) * 1e6),
    }


def balance(name: str, knobs: dict, *, steps: int, layers: int, window: str | float,
            k_max: int | None = 16) -> dict:
    problems, loads = _problems(knobs, model="gpt-oss-120b", hardware="h200x8", num_ranks=8,
                                num_experts=128, top_k=4, steps=steps, layers=layers,
                                tokens_per_rank=None, window=window)
    # "eplb_addcopies": the add-copies baseline (named "eplb" in planner_speed results written
    # before method "eplb" became DeepSeek's EPLB)
    rows = {"static": [], "greedy": [], "eplb_addcopies": []}
    replicas = []
    for step, row in enumerate(problems):
        for layer, problem in enumerate(row):
            history = loads[max(0, step - 16):step, layer] if step > 0 else None
            rows["static"].append(evaluate_plan(problem, static_plan(problem)))
            plan = greedy_plan(problem, GreedyRules(k_max=k_max))
            rows["greedy"].append(evaluate_plan(problem, plan))
            replicas.append(plan.num_replicas)
            rows["eplb_addcopies"].append(evaluate_plan(problem, solve(
                problem, "eplb_addcopies", history=history).plan))
    out = {"config": name, "knobs": knobs, "window": window, "k_max": k_max,
           "instances": len(rows["static"]), "greedy_mean_replicas": float(np.mean(replicas))}
    for method, metrics in rows.items():
        out[f"{method}_ir"] = float(np.mean([m.imbalance for m in metrics]))
        out[f"{method}_objective_us"] = float(np.mean([m.objective for m in metrics]) * 1e6)
        out[f"{method}_compute_skew"] = float(np.mean([m.compute_skew for m in metrics]))
    return out


def main(argv: list[str] | None = None) -> None:
    args, run, console = start(__doc__, "planner_speed", argv)
    quick = args.quick

    speed_rows = []
    for name, model, hardware, ranks, experts in (
            ("ep=8, E=128, top-8", "qwen3-235b-a22b", "h200x8", 8, 128),
            ("ep=64, E=256, top-8", "deepseek-v3", "h200x8-n8", 64, 256)):
        problems, _ = _problems({}, model=model, hardware=hardware, num_ranks=ranks,
                                num_experts=experts, top_k=8, steps=4 if quick else 10,
                                layers=4 if quick else 8, tokens_per_rank=768, seed=1)
        flat = [p for row in problems for p in row]
        speed_rows.append(speed(name, flat, repeats=10 if quick else 50,
                                twin=3 if quick else 8))
    table = Table(title="greedy speed, one layer (k_max=16, 3 slots/rank, window auto)")
    for col in ("config", "kernel median (us)", "p90 (us)", "moves", "twin median (ms)",
                "twin / kernel", "greedy_plan (us)", "solve() (us)"):
        table.add_column(col, justify="right")
    for r in speed_rows:
        table.add_row(r["config"], f"{r['kernel_median_us']:.1f}", f"{r['kernel_p90_us']:.1f}",
                      f"{r['mean_moves']:.1f}", f"{r['twin_median_ms']:.2f}",
                      f"{r['twin_over_kernel']:.0f}x", f"{r['greedy_plan_median_us']:.0f}",
                      f"{r['solve_median_us']:.0f}")
    console.print(table)

    steps, layers = (10, 4) if quick else (60, 8)
    balance_rows = [
        balance("decode (default)", {}, steps=steps, layers=layers, window="auto"),
        balance("decode (default)", {}, steps=steps, layers=layers, window="auto", k_max=None),
        balance("decode (default)", {}, steps=steps, layers=layers, window=float("inf")),
        balance("decode, temperature=0.6", {"temperature": 0.6}, steps=steps, layers=layers,
                window="auto"),
    ]
    table = Table(title="balance, ep=8, top-4 of 128 (gpt-oss-120b on h200x8), 3 slots/rank")
    for col in ("workload", "window", "k_max", "IR static", "IR greedy", "IR eplb_addcopies",
                "obj static (us)", "obj greedy (us)", "obj eplb_addcopies (us)",
                "greedy replicas"):
        table.add_column(col, justify="right")
    for r in balance_rows:
        table.add_row(r["config"], str(r["window"]), str(r["k_max"]), f"{r['static_ir']:.3f}",
                      f"{r['greedy_ir']:.3f}", f"{r['eplb_addcopies_ir']:.3f}",
                      f"{r['static_objective_us']:.1f}", f"{r['greedy_objective_us']:.1f}",
                      f"{r['eplb_addcopies_objective_us']:.1f}",
                      f"{r['greedy_mean_replicas']:.1f}")
    console.print(table)

    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "cpu": cpu_name(), "cpus": os.cpu_count(), "quick": quick}
    (out,) = save(run, args.out, {"machine": machine, "speed": speed_rows,
                                  "balance": balance_rows})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
