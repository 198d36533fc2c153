"""Exact MILP backends and the LP heuristic on ep=8, 128-expert decode steps.

For each instance (one decode step of one MoE layer; top-4 = gpt-oss-120b, top-8 =
qwen3-235b-a22b, on the h200x8 preset; 768 tokens per rank; 3 replica slots per rank; a window
of 3 expert transfers on every rank, both directions) it reports static, greedy and lp
objectives, then CP-SAT and HiGHS MIP with a time limit (default 60 s): status, objective,
proven bound, gap. Separately it times `lp` (median wall time and process CPU time over many
steps, after warm-up; on a shared machine the CPU time is the better estimate of an idle
machine's wall time) and reports the mean IR of static, greedy and lp over those steps.

Loads come from probe.traces.synthetic's "decode" workload (seed 0); if that module cannot be
imported, from a seeded Zipf stand-in (the report says which).

Run:  python -m experiments.planner.exact_speed                  # 1 instance per top-k
      python -m experiments.planner.exact_speed --instances 3 --time-limit 60 --workers 2
Writes results/exact_speed.{json,md} and results/exact_speed.manifest.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from experiments.manifest import Manifest
from probe.planner.check import evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.cpsat import solve_cpsat
from probe.planner.highs import solve_highs
from probe.planner.lp import solve_lp
from probe.planner.warmstart import warm_start
from probe.planner.problem import BalanceProblem
from probe.specs import hardware_preset, model_preset

MODELS = {4: "gpt-oss-120b", 8: "qwen3-235b-a22b"}
NUM_RANKS, NUM_EXPERTS, TOKENS_PER_RANK, SLOTS, WINDOW_COPIES = 8, 128, 768, 3, 3


def decode_loads(top_k: int, num_steps: int, seed: int) -> tuple[np.ndarray, str]:
    """int [N, S, E] decode-step loads of one layer, and where they come from."""
    try:
        from probe.traces.synthetic import generate
    except ImportError as err:
        rng = np.random.default_rng(seed)
        loads = np.zeros((num_steps, NUM_RANKS, NUM_EXPERTS), np.int64)
        for n in range(num_steps):
            pop = (np.arange(NUM_EXPERTS) + 1.0) ** -1.0
            logp = np.log(pop[rng.permutation(NUM_EXPERTS)])
            for s in range(NUM_RANKS):
                keys = logp[None, :] + rng.gumbel(size=(TOKENS_PER_RANK, NUM_EXPERTS))
                top = np.argpartition(-keys, top_k, axis=1)[:, :top_k]
                loads[n, s] = np.bincount(top.ravel(), minlength=NUM_EXPERTS)
        return loads, f"seeded Zipf(1.0) stand-in (synthetic unavailable: {err})"
    trace = generate("decode", num_steps=num_steps, tokens_per_step=TOKENS_PER_RANK * NUM_RANKS,
                     num_layers=1, num_experts=NUM_EXPERTS, top_k=top_k, num_ranks=NUM_RANKS,
                     seed=seed)
    return trace.load_counts()[:, 0].astype(np.int64), "probe.traces.synthetic decode, seed " \
        f"{seed}, layer 0"


def make_problem(load: np.ndarray, top_k: int) -> BalanceProblem:
    cost = CostModel.from_specs(model_preset(MODELS[top_k]), hardware_preset("h200x8"))
    window = WINDOW_COPIES * float(cost.transfer_time[0, 1])
    return BalanceProblem.from_load(load, cost, SLOTS, window)


def exact_row(problem: BalanceProblem, step: int, top_k: int, time_limit: float,
              workers: int) -> dict:
    from probe.planner.static import static_plan

    from probe.planner.greedy import solve_greedy

    static = evaluate_plan(problem, static_plan(problem))
    greedy = evaluate_plan(problem, solve_greedy(problem).plan)
    lp = solve_lp(problem)
    row = {"top_k": top_k, "step": step, "static_us": 1e6 * static.objective,
           "static_ir": static.imbalance, "warm_start": warm_start(problem)[1],
           "greedy_us": 1e6 * greedy.objective, "greedy_ir": greedy.imbalance,
           "lp_us": 1e6 * lp.objective}
    for name, run in (("cpsat", lambda: solve_cpsat(problem, time_limit=time_limit,
                                                     num_workers=workers)),
                      ("highs", lambda: solve_highs(problem, time_limit=time_limit))):
        start = time.perf_counter()
        result = run()
        row[name] = {"status": result.status, "objective_us": 1e6 * result.objective,
                     "bound_us": None if result.bound is None else 1e6 * result.bound,
                     "gap": result.gap, "wall_s": time.perf_counter() - start,
                     "ir": evaluate_plan(problem, result.plan).imbalance,
                     "message": result.message}
    return row


def lp_timing(top_k: int, num_steps: int, repeats: int, seed: int) -> dict:
    from probe.planner.greedy import solve_greedy
    from probe.planner.static import static_plan

    loads, _ = decode_loads(top_k, num_steps, seed)
    problems = [make_problem(load, top_k) for load in loads]
    solve_lp(problems[0])  # warm-up (JIT of greedy, HiGHS load)
    times, cpu_times, irs, objs = [], [], [], []
    for problem in problems:
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            result = solve_lp(problem)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        greedy = evaluate_plan(problem, solve_greedy(problem).plan)
        static = evaluate_plan(problem, static_plan(problem))
        lp = evaluate_plan(problem, result.plan)
        irs.append((static.imbalance, greedy.imbalance, lp.imbalance))
        objs.append((static.objective, greedy.objective, lp.objective))
    irs_a, objs_a = np.array(irs), np.array(objs)
    return {"top_k": top_k, "steps": num_steps, "repeats": repeats,
            "lp_median_ms": 1e3 * statistics.median(times),
            "lp_p90_ms": 1e3 * float(np.percentile(times, 90)),
            "lp_cpu_median_ms": 1e3 * statistics.median(cpu_times),
            "load_average": os.getloadavg()[0],
            "mean_ir": dict(zip(("static", "greedy", "lp"), irs_a.mean(axis=0).tolist(),
                                strict=True)),
            "mean_objective_us": dict(zip(("static", "greedy", "lp"),
                                          (1e6 * objs_a.mean(axis=0)).tolist(), strict=True)),
            "lp_better_than_greedy": int((objs_a[:, 2] < objs_a[:, 1] * (1 - 1e-9)).sum())}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def write_markdown(path: Path, report: dict) -> None:
    lines = ["# Exact MILP backends and the LP heuristic at ep=8, 128 experts", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Loads: {report['source']}  ", f"Setup: {report['setup']}", ""]
    if report["exact"]:
        lines += [
             "## CP-SAT and HiGHS MIP "
             f"({report['time_limit']:g} s limit, CP-SAT num_workers={report['workers']})", "",
             "| top-k | step | static us (IR) | greedy us (IR) | lp us | CP-SAT status | "
             "CP-SAT us | CP-SAT bound | CP-SAT gap | HiGHS status | HiGHS us | HiGHS bound "
             "| HiGHS gap |", "|" + "---|" * 13]
    for row in report["exact"]:
        cells = [str(row["top_k"]), str(row["step"]),
                 f"{row['static_us']:.1f} ({row['static_ir']:.2f})",
                 f"{row['greedy_us']:.1f} ({row['greedy_ir']:.2f})", f"{row['lp_us']:.1f}"]
        for name in ("cpsat", "highs"):
            r = row[name]
            cells += [r["status"], f"{r['objective_us']:.1f}",
                      "-" if r["bound_us"] is None else f"{r['bound_us']:.1f}",
                      "-" if r["gap"] is None else f"{100 * r['gap']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## `lp` heuristic wall time and balance", "",
              "| top-k | steps x repeats | median ms (wall) | p90 ms | median ms (process CPU) "
              "| load avg | mean IR static | greedy | lp | mean objective us static | greedy | lp "
              "| steps lp < greedy |",
              "|" + "---|" * 13]
    for t in report["lp_timing"]:
        ir, ob = t["mean_ir"], t["mean_objective_us"]
        lines.append(f"| {t['top_k']} | {t['steps']} x {t['repeats']} | {t['lp_median_ms']:.2f}"
                     f" | {t['lp_p90_ms']:.2f} | {t['lp_cpu_median_ms']:.2f} | "
                     f"{t['load_average']:.1f} | {ir['static']:.3f} | {ir['greedy']:.3f} | "
                     f"{ir['lp']:.3f} | {ob['static']:.1f} | {ob['greedy']:.1f} | "
                     f"{ob['lp']:.1f} | {t['lp_better_than_greedy']}/{t['steps']} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1,
                        help="exact solves per top-k (0: only time lp)")
    parser.add_argument("--top-k", default="4,8", help="comma-separated top-k values")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="CP-SAT num_workers")
    parser.add_argument("--lp-steps", type=int, default=40)
    parser.add_argument("--lp-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/exact_speed")
    parser.add_argument("--note", action="append", default=[], help="extra note for the report")
    args = parser.parse_args(argv)
    run = Manifest.start("experiments.planner.exact_speed", argv)
    console = Console()
    load_start = os.getloadavg()[0]
    top_ks = [int(k) for k in args.top_k.split(",")]
    report = {"command": "python -m experiments.planner.exact_speed " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": machine(), "time_limit": args.time_limit, "workers": args.workers,
              "setup": f"G={NUM_RANKS}, E={NUM_EXPERTS}, {TOKENS_PER_RANK} tokens per rank, "
                       f"{SLOTS} slots per rank, window = {WINDOW_COPIES} expert transfers, "
                       "h200x8 preset", "exact": [], "lp_timing": [], "notes": list(args.note)}
    for top_k in top_ks:
        num_steps = max(args.instances * 10, args.lp_steps)
        loads, report["source"] = decode_loads(top_k, num_steps, args.seed)
        stride = max(num_steps // max(args.instances, 1), 1)
        steps = list(range(0, num_steps, stride))[:args.instances]
        for step in steps:
            console.print(f"top-{top_k} step {step}: CP-SAT and HiGHS, {args.time_limit:g} s "
                          "each ...")
            row = exact_row(make_problem(loads[step], top_k), step, top_k, args.time_limit,
                            args.workers)
            report["exact"].append(row)
        console.print(f"top-{top_k}: timing lp on {args.lp_steps} steps ...")
        report["lp_timing"].append(lp_timing(top_k, args.lp_steps, args.lp_repeats, args.seed))

    load_end = os.getloadavg()[0]
    report["notes"] += [
        "CP-SAT and HiGHS are warm-started from the best of static, greedy and lp (JSON field "
        "warm_start); 'timeout' means the time limit ended the search with that incumbent or "
        "a better one, and the gap is (objective - proven bound) / objective.",
        "CP-SAT solves times rounded down to a quantum (probe/planner/cpsat.py), so its bound "
        "is a true lower bound; HiGHS's bound holds up to its feasibility tolerances.",
        f"Load average {load_start:.1f} at start and {load_end:.1f} at the end on "
        f"{os.cpu_count()} CPUs; where it is well above 0 other jobs inflate wall times and the "
        "process-CPU median of lp is the closer estimate of an idle machine's wall time.",
    ]
    table = Table(title="exact backends (objective us / bound us / gap)")
    for col in ("top-k", "step", "static", "greedy", "lp", "CP-SAT", "HiGHS"):
        table.add_column(col, justify="right")
    for row in report["exact"]:
        cells = [f"{row[n]['status']} {row[n]['objective_us']:.1f} / "
                 + ("-" if row[n]["bound_us"] is None else f"{row[n]['bound_us']:.1f}")
                 + (" / -" if row[n]["gap"] is None else f" / {100 * row[n]['gap']:.2f}%")
                 for n in ("cpsat", "highs")]
        table.add_row(str(row["top_k"]), str(row["step"]), f"{row['static_us']:.1f}",
                      f"{row['greedy_us']:.1f}", f"{row['lp_us']:.1f}", *cells)
    console.print(table)
    timing = Table(title="lp heuristic")
    for col in ("top-k", "median ms", "p90 ms", "CPU median ms", "mean IR static/greedy/lp"):
        timing.add_column(col, justify="right")
    for t in report["lp_timing"]:
        ir = t["mean_ir"]
        timing.add_row(str(t["top_k"]), f"{t['lp_median_ms']:.2f}", f"{t['lp_p90_ms']:.2f}",
                       f"{t['lp_cpu_median_ms']:.2f}",
                       f"{ir['static']:.3f} / {ir['greedy']:.3f} / {ir['lp']:.3f}")
    console.print(timing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown(out.with_suffix(".md"), report)
    run.write(out.parent, [out.with_suffix(".json"), out.with_suffix(".md")],
              name=out.with_suffix(".manifest.json").name)
    console.print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
