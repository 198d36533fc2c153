"""Dispatch-time assignment at full size: eq. 8 gap to the LP, and the descents' wave counts.

Seeded and reproducible, CPU only (HiGHS); prints a table and writes JSON (OUT, default
results/assign_level.json), a Markdown table (OUT with .md) and the manifest (OUT with
.manifest.json).

    python -m experiments.planner.assign_level [--quick] [--count N] [--out OUT.json]

Instances: --count random layers (default 1,000) at each of ep=8 / 128 experts (qwen3-235b-a22b
on h200x8) and ep=64 / 256 experts (deepseek-v3 on h200x8-n8), 1, 2 and 3 extra slots per rank
in turn. A layer: skewed expert popularity (Pareto weights), each source rank's 768 tokens x
top-8 drawn from it, and DeepSeek EPLB's layout (probe.planner.deepseek_eplb.eplb_layout,
global policy) planned from a noisy forecast of the popularity (log-normal error, sigma 0.3),
so that the copies do not fit the true load exactly.

Methods, each scored by eq. 8 (evaluate_plan) against `assign_tokens(method="lp")` (the LP
relaxation, the same integer split): DeepSeek's even split over the copies
(`probe.planner.eplb.even_split`), and water-filling (`assign_tokens`, method "waterfill":
the default 8 descent passes and up to `default_moves(G)` exchange moves from each start (20 at
ep=8, 64 at ep=64); also without the exchange step, moves=0, and with LONG_PASSES descent
passes).
Both GPU schedules of `probe.planner.assign_cuda.DeviceAssigner` ("serial", "waves") give
water-filling's assignment integer for integer (tests/test_planner_assign_cuda.py), so one
column stands for all three; what differs is the critical path. For that the table gives,
per layer, M (the multi-copy experts the descents refill: the "serial" schedule's steps per
pass) and the waves of the "waves" schedule (`assign_cuda.descent_waves`: its steps per
pass), median, p99 and max.
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

from experiments.manifest import Manifest
from experiments.planner.assign_speed import objective
from probe.planner.assign import assign_tokens, default_moves
from probe.planner.assign_cuda import descent_waves
from probe.planner.cost import CostModel
from probe.planner.deepseek_eplb import eplb_layout
from probe.planner.eplb import even_split
from probe.specs import hardware_preset, model_preset

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
TOKENS_PER_RANK = 768
TOP_K = 8
LONG_PASSES = 32  # water-filling with more descent passes than the default 8


def random_layer(rng: np.random.Generator, num_ranks: int, num_experts: int, extra: int):
    """(load int64 [S, E], copies int64 [G, E]): a skewed true load and EPLB's layout with
    `extra` slots per rank beyond E / G, planned from a noisy forecast of the load."""
    weight = rng.pareto(1.0, num_experts) + 0.05  # [E] popularity
    weight /= weight.sum()
    load = np.stack([rng.multinomial(TOKENS_PER_RANK * TOP_K, weight)
                     for _ in range(num_ranks)])  # [S, E]
    forecast = weight * rng.lognormal(0.0, 0.3, num_experts)
    copies = eplb_layout(forecast, num_experts // num_ranks + extra, 1, 1, num_ranks)
    return load, copies


def _summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(values)), "p99": float(np.quantile(values, 0.99)),
            "max": float(values.max()), "mean": float(values.mean())}


def measure(name: str, cost: CostModel, num_ranks: int, num_experts: int, count: int,
            seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gaps = {"waterfill": [], "waterfill, no exchange": [],
            f"waterfill, {LONG_PASSES} passes": [], "even": []}
    multi, waves, by_extra = [], [], {1: [], 2: [], 3: []}
    worse_than_even = 0
    for i in range(count):
        extra = 1 + i % 3
        load, copies = random_layer(rng, num_ranks, num_experts, extra)
        ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
        ours = objective(load, copies, cost, assign_tokens(load, copies, cost))
        longer = objective(load, copies, cost,
                           assign_tokens(load, copies, cost, passes=LONG_PASSES))
        gaps[f"waterfill, {LONG_PASSES} passes"].append((longer - ref) / ref)
        plain = objective(load, copies, cost, assign_tokens(load, copies, cost, moves=0))
        gaps["waterfill, no exchange"].append((plain - ref) / ref)
        even = objective(load, copies, cost, even_split(load, copies))
        gaps["waterfill"].append((ours - ref) / ref)
        gaps["even"].append((even - ref) / ref)
        by_extra[extra].append((ours - ref) / ref)
        worse_than_even += ours > even * (1 + 1e-9)
        m, w = descent_waves(load, copies, cost)
        multi.append(m)
        waves.append(w)
    wf = np.array(gaps["waterfill"])
    return {"config": name, "instances": count, "seed": seed,
            "gap": {k: _summary(v) for k, v in gaps.items()},
            "gap_by_extra": {str(k): _summary(v) for k, v in by_extra.items() if v},
            "within_1pct": float(np.mean(wf <= 0.01)),
            "better_than_lp": float(np.mean(wf < -1e-9)),
            "worse_than_even": int(worse_than_even),
            "multi_experts": _summary(multi), "waves": _summary(waves),
            "waves_over_multi": _summary(np.array(waves) / np.maximum(multi, 1))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 instances per config")
    parser.add_argument("--count", type=int, default=1000, help="instances per config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/assign_level.json")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    run = Manifest.start("experiments.planner.assign_level", argv)
    count = 50 if args.quick else args.count
    wall = time.perf_counter()
    rows = []
    for name, model, hardware, ranks, experts in CONFIGS:
        cost = CostModel.from_specs(model_preset(model), hardware_preset(hardware),
                                    num_ranks=ranks)
        rows.append(measure(name, cost, ranks, experts, count, args.seed))
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "cpus": os.cpu_count(), "quick": args.quick, "count": count,
               "wall_s": time.perf_counter() - wall}
    Console().print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown(rows, machine, argv))
    run.write(out.parent, [out, md], name=out.with_suffix(".manifest.json").name)
    print(f"wrote {out} and {md}")


def _pct(value: float) -> str:
    return f"{value:+.3%}"


def _table(rows) -> Table:
    table = Table(title="eq. 8 gap to the LP; refills per descent pass (M serial, waves)")
    for col in ("config", "method", "gap median", "p99", "max", "M median / p99 / max",
                "waves median / p99 / max"):
        table.add_column(col, justify="right")
    for r in rows:
        for method in r["gap"]:
            g = r["gap"][method]
            m, w = r["multi_experts"], r["waves"]
            table.add_row(r["config"], method, _pct(g["median"]), _pct(g["p99"]),
                          _pct(g["max"]),
                          f"{m['median']:.0f} / {m['p99']:.0f} / {m['max']:.0f}",
                          f"{w['median']:.0f} / {w['p99']:.0f} / {w['max']:.0f}")
    return table


def markdown(rows, machine: dict, argv) -> str:
    command = "python -m experiments.planner.assign_level"
    if argv:
        command += " " + " ".join(argv)
    lines = ["# Dispatch-time assignment at full size: gap to the LP, and wave counts",
             "",
             f"Made by `{command}` on {machine['platform']} ({machine['cpus']} CPUs, "
             f"shared), Python {machine['python']}, {machine['wall_s']:.0f} s. "
             f"{machine['count']} random layers per configuration (seed {rows[0]['seed']}; "
             "Pareto-skewed popularity, 768 tokens x top-8 per source rank, DeepSeek EPLB's "
             "layout from a forecast with 30% log-normal error, 1-3 extra slots per rank in "
             "turn). Gap = (method - LP) / LP of eq. 8 (evaluate_plan), LP = "
             "`assign_tokens(method=\"lp\")`. Water-filling is `assign_tokens` (the default: "
             "8 descent passes, then up to `default_moves(G)` moves of the exchange step on "
             f"eq. 8 from each start ({default_moves(8)} at ep=8, {default_moves(64)} at "
             "ep=64), single moves and swaps; also "
             f"without the exchange step, moves=0, and with {LONG_PASSES} descent passes), "
             "and also both GPU schedules of `DeviceAssigner` (\"serial\", \"waves\"), which "
             "give its assignment integer for integer.",
             "",
             "| config | method | gap median | gap p99 | gap max | gap mean | within 1% "
             "| better than LP | worse than even |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["gap"]["waterfill"]
        lines.append(f"| {r['config']} | waterfill | {_pct(g['median'])} | {_pct(g['p99'])} "
                     f"| {_pct(g['max'])} | {_pct(g['mean'])} | {r['within_1pct']:.1%} | "
                     f"{r['better_than_lp']:.1%} | {r['worse_than_even']} |")
        for method in ("waterfill, no exchange", f"waterfill, {LONG_PASSES} passes", "even"):
            g = r["gap"][method]
            lines.append(f"| {r['config']} | {method} | {_pct(g['median'])} | "
                         f"{_pct(g['p99'])} | {_pct(g['max'])} | {_pct(g['mean'])} | | | |")
    lines += ["",
              "Water-filling's gap by extra slots per rank (median / p99 / max):",
              "",
              "| config | +1 | +2 | +3 |",
              "|---|---|---|---|"]
    for r in rows:
        cells = [f"{_pct(v['median'])} / {_pct(v['p99'])} / {_pct(v['max'])}"
                 for v in r["gap_by_extra"].values()]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    lines += ["",
              "Refills per descent pass: the \"serial\" schedule refills the M multi-copy "
              "experts one after another, the \"waves\" schedule in waves of experts that "
              "share no rank, side by side (`assign_cuda.descent_waves`). A refill of an "
              "expert with n holders is O(n^2) dependent steps, so the dependent steps drop "
              "less than the refills (`probe/planner/assign_cuda.py`'s docstring counts "
              "both):",
              "",
              "| config | M median | M p99 | M max | waves median | waves p99 | waves max "
              "| waves / M median |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, w, q = r["multi_experts"], r["waves"], r["waves_over_multi"]
        lines.append(f"| {r['config']} | {m['median']:.0f} | {m['p99']:.0f} | {m['max']:.0f} "
                     f"| {w['median']:.0f} | {w['p99']:.0f} | {w['max']:.0f} | "
                     f"{q['median']:.2f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
