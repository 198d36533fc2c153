"""What the dispatch-time split buys over the plan's own split when the plan was made on a
prediction: the two `--device-split` choices, on the cost model.

    python -m experiments.runtime.split_choice --out results/split_choice

Synthetic routing (probe.traces: "decode" and "shift", 768 tokens per rank, top-8), 3 slots per
rank, window "auto", the sharded home. Each layer of step t is planned on step t's counts (the
history predictor's prediction for step t + 1) by the runtime's device planner methods
("greedy", "lite"), and run on step t + 1's TRUE counts with every planned replica present:
- plan: the plan's own split as the runtime's dispatch applies it (`device_split="plan"`, the
  host path's PROBE policy): each source rank's row of the plan's assignment scaled to its
  true counts (`probe.runtime.ep.split_counts`);
- water-filling: the true counts split over home + the plan's replicas by `assign_tokens`
  without its exchange step (`moves=0`, the runtime's DeviceSplit) and with it (the default);
- static: every pair at home (no balancing).
IR = max / mean of eq. 8's rank times (probe.planner.check.rank_times), medians and maxima over
layers and steps. CPU only; what each split costs at dispatch is a GPU measurement
(experiments.runtime.device_planner_speed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.manifest import Manifest
from experiments.planner.lite_rounds import ir, write_report

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
WORKLOADS = ("decode", "shift")
METHODS = ("greedy", "lite")
STEPS = 5
LAYERS = 4


def plan_split(plan, home, counts) -> np.ndarray:
    """[S, E, G]: every source's row of the plan's assignment scaled to its true counts, every
    planned replica present (the runtime's dispatch under the plan's split)."""
    from probe.runtime.ep import split_counts

    owner = home.argmax(axis=0)
    usable = home | plan.replicas
    return np.stack([split_counts(plan.assignment[s], usable, owner, counts[s])
                     for s in range(counts.shape[0])])


def study(config, workload: str) -> list[dict]:
    from probe.planner.assign import assign_tokens
    from probe.planner.cost import CostModel
    from probe.planner.layers import attention_time
    from probe.planner.problem import BalanceProblem
    from probe.runtime.balancer import solve_plan
    from probe.specs import hardware_preset, model_preset
    from probe.traces import generate

    name, model, hardware, ranks, experts = config
    spec_model, spec_hw = model_preset(model), hardware_preset(hardware)
    cost = CostModel.from_specs(spec_model, spec_hw, num_ranks=ranks)
    attention = attention_time(spec_model, spec_hw)
    loads = generate(workload, num_steps=STEPS + 1, tokens_per_step=768 * ranks,
                     num_layers=LAYERS, num_experts=experts, top_k=8, num_ranks=ranks,
                     seed=1).load_counts()
    rows = []
    for method in METHODS:
        cols: dict[str, list] = {k: [] for k in ("static", "plan", "waterfill0", "waterfill")}
        for step in range(STEPS):
            for layer in range(LAYERS):
                pred, true = (BalanceProblem.from_load(loads[t, layer], cost, 3, "auto",
                                                       attention_time=attention)
                              for t in (step, step + 1))
                plan = solve_plan(pred, method)
                copies = pred.home | plan.replicas
                at_home = np.zeros((ranks, experts, ranks), np.int64)  # [S, E, G]
                at_home[:, np.arange(experts), pred.home.argmax(axis=0)] = true.load
                cols["static"].append(ir(true, at_home))
                cols["plan"].append(ir(true, plan_split(plan, pred.home, true.load)))
                cols["waterfill0"].append(ir(true, assign_tokens(true.load, copies, cost,
                                                                 home=pred.home, moves=0)))
                cols["waterfill"].append(ir(true, assign_tokens(true.load, copies, cost,
                                                                home=pred.home)))
        row = {"config": name, "workload": workload, "method": method,
               "layers": len(cols["plan"]),
               **{f"ir_{k}": float(np.median(v)) for k, v in cols.items()},
               **{f"ir_{k}_max": float(np.max(v)) for k, v in cols.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = ["# The plan's own split against the dispatch-time water-filling", "",
             f"Made by `{report['command']}` ({report['utc']}, {report['machine']}). Each "
             f"layer planned on step t's counts and run on step t + 1's ({STEPS} steps x "
             f"{LAYERS} layers, 768 tokens per rank, top-8, 3 slots per rank), every planned "
             "replica present. IR (eq. 8 rank times, max / mean): median (max). plan: the "
             "runtime's `--device-split plan` (each source's row of the plan scaled to its "
             "true counts); water-filling: `assign_tokens` on the true counts over home + the "
             "plan's replicas, without the exchange step (the runtime's DeviceSplit) and with "
             "it; static: all home.", "",
             "| config | workload | planner | static | plan's split | water-filling, no "
             "exchange | water-filling, exchange |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [f"{r[f'ir_{k}']:.3f} ({r[f'ir_{k}_max']:.3f})"
                 for k in ("static", "plan", "waterfill0", "waterfill")]
        lines.append(f"| {r['config']} | {r['workload']} | {r['method']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/split_choice", help="output folder")
    args = parser.parse_args(argv)
    run = Manifest.start("experiments.runtime.split_choice", argv)
    rows = []
    for config in CONFIGS:
        for workload in WORKLOADS:
            rows += study(config, workload)
    write_report(run, Path(args.out), "split_choice", {"rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
