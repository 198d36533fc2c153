"""Where PROBE-on-EPLB loses against the oracle: a per-case breakdown for docs/fair.md.

    PYTHONPATH=. python -m experiments.fair.diagnose [--case MODEL:WORKLOAD:TOK:K ...]

For each case (the study's trace and settings, experiments.fair.run) it replays
probe.sim.fair.simulate_fair at k slots and prints, in microseconds per MoE layer:

1. which oracle candidate wins how often (FairResult.oracle_picks: a policy, or a greedy on the
   true load over the sharded home or an EPLB-b layout, water-filled or with its own split);
2. auto's MoE time and overheads against the oracle's MoE time, eplb_async's time, and the
   "hindsight picker": per step and layer the best of auto_plus's candidates by side-mode time
   (what a perfect picker over the same candidate set would get; with the study's nested
   layouts, `--nested`, its b = k - 1 splits included), the run replayed with the study's
   --score-every, --rescore and --nested defaults;
3. planner variants on the steps before the first re-plan (the EPLB layouts are then the first
   ones, exactly those simulate_fair uses): the greedy with the paper's rules (auto's
   candidates), probe's default rules, an unlimited move budget, on the fitted or the
   datasheet line, over each EPLB-b layout and the sharded home, on the prediction
   (`topk:0.9`, the study's seed) and on the true load; each scored on the true load
   (water-filled over the copies, fitted line at the predicted heaviest expert) as MoE +
   exposed transfer, side-mode planner exposure and the assignment left out (they are the
   same for every variant of a layout).
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from experiments.fair.run import case_load, parse_args as run_args
from probe.placement import sharded_home
from probe.planner.check import transfer_times
from probe.planner.deepseek_eplb import eplb_copies
from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.solve import solve
from probe.planner.static import static_assignment
from probe.planner.window import default_window
from probe.sim.policies import apply_plan
from probe.sim.fair import auto_candidates, side_layer_time, simulate_fair, waterfill_split
from probe.sim.predict import make_predictor

CASES = ("gpt-oss-120b:shift:768:2", "gpt-oss-120b:repeat:1536:4",
         "qwen3-235b-a22b:repeat:256:3", "deepseek-v3@ep32:shift:256:2")
RULES = {"paper": GreedyRules.paper(), "paper_kinf": GreedyRules.paper(k_max=0),
         "default": GreedyRules(), "default_kinf": GreedyRules(k_max=0)}
LINES = ("fit", "datasheet")


def variants(load, costs, prior: int, slots: int, attention: float, seed: int,
             steps: int) -> dict:
    """{(layout, rules, line, source, split): mean MoE + exposed transfer, seconds} over the
    first `steps` measured steps and every layer (module docstring, item 3). source: the load
    planned on ("pred": the error model, "true", "prev": the step before's true load); split:
    "wf" water-filled on the true load over the copies, "plan" the plan's own split applied
    to the true load (probe.sim.policies.apply_plan)."""
    num_all, num_layers, num_ranks, num_experts = load.shape
    weight = load[:prior].sum(axis=2).mean(axis=0).astype(np.float64)  # window = prior
    layouts = {b: eplb_copies(weight, b, num_ranks) for b in range(slots + 1)}
    home = sharded_home(num_experts, num_ranks)
    predict = make_predictor("topk:0.9", seed=seed)
    out: dict = {}
    runs = [(r, line, src, split) for r in RULES for line in LINES for src in ("pred", "true")
            for split in ("wf",)]
    runs += [("paper", "fit", src, split) for src in ("pred", "true", "prev")
             for split in ("wf", "plan") if (src, split) not in (("pred", "wf"), ("true", "wf"))]
    for n in range(steps):
        for layer in range(num_layers):
            true = load[prior + n, layer].astype(np.int64)
            prev = load[prior + n - 1, layer].astype(np.int64)
            loads = {"true": true, "prev": prev,
                     "pred": np.asarray(predict(true, prev, n, layer), np.int64)}
            static_assign = static_assignment(true, home)
            real_window = attention + costs.compute_per_rank(static_assign.sum(axis=0).T,
                                                             home.astype(np.int64))
            bases = [(f"b{b}p{slots - b}", layouts[b][layer], slots - b)
                     for b in range(slots + 1)]
            bases.append(("home", home.astype(np.int64), slots))
            for tag, copies, p in bases:
                base = copies > 0
                for rname, line, src_name, split in runs:
                    src = loads[src_name]
                    cost = (costs.fitted_cost(src.sum(axis=0).max()) if line == "fit"
                            else costs.planner_cost)
                    win = default_window(src, base, cost) + attention
                    plan0 = solve(BalanceProblem(src, base, p, win, cost), "greedy",
                                  check=False, rules=RULES[rname]).plan
                    holds = copies + plan0.replicas
                    if split == "wf":
                        plan = Plan(plan0.replicas, plan0.sources,
                                    waterfill_split(true, holds, costs, cost=cost))
                    else:
                        plan = apply_plan(plan0, true, base)
                    recv, send = transfer_times(BalanceProblem(true, base, p, win, cost), plan)
                    exposed = float(np.maximum(np.maximum(recv, send) - real_window,
                                               0.0).max())
                    t = costs.moe_seconds(plan.assignment, holds)["moe"] + exposed
                    out.setdefault((tag, rname, line, src_name, split), []).append(t)
    return {key: float(np.mean(v)) for key, v in out.items()}


def diagnose(case: str, args) -> None:
    model, workload, batch, k = case.split(":")
    k = int(k)
    load, costs, prior, phase, _ = case_load(model, workload, int(batch), args)
    res = simulate_fair(load, costs, slots=k, prior=prior, window=prior, interval=prior,
                        predictor=args.predictor, seed=args.seed, phase=phase,
                        score_every=args.score_every, rescore=args.rescore, nested=args.nested,
                        respond=args.shift_response, guard=args.guard)
    cand = auto_candidates(k, plus=True, nested=args.nested)  # auto_plus's candidates
    us = 1e6
    print(f"\n## {case} (prior {prior}, measured {load.shape[0] - prior}, layers "
          f"{load.shape[1]}, G {load.shape[2]})")
    wins = Counter(label for row in res.oracle_picks for label in row)
    total = sum(wins.values())
    print("oracle winners: " + ", ".join(f"{lab} {c / total:.0%}"
                                         for lab, c in wins.most_common()))
    model_layers = res.meta["model_layers"]
    side = {q: side_layer_time(res.metrics[q], res.stall[q], model_layers, res.attention)
            for q in [*cand, "probe_on_eplb_auto", "probe_on_eplb_auto_plus"]}
    oracle = res.attention + res.metrics["oracle"]["moe"]
    hindsight = np.min([side[q] for q in cand], axis=0)
    which = Counter(cand[i] for i in np.argmin([side[q] for q in cand], axis=0).ravel())
    auto = res.metrics["probe_on_eplb_auto"]
    print(f"per layer: eplb_async {us * side['eplb_async'].mean():.1f}, auto "
          f"{us * side['probe_on_eplb_auto'].mean():.1f} (MoE {us * auto['moe'].mean():.1f} + "
          f"overheads {us * (side['probe_on_eplb_auto'] - res.attention - auto['moe']).mean():.1f}"
          f"), auto_plus {us * side['probe_on_eplb_auto_plus'].mean():.1f} (MoE "
          f"{us * res.metrics['probe_on_eplb_auto_plus']['moe'].mean():.1f}), hindsight pick "
          f"over auto_plus's candidates {us * hindsight.mean():.1f}, oracle "
          f"{us * oracle.mean():.1f} (attention {us * res.attention:.1f})")
    print("hindsight picks: " + ", ".join(f"{q} {c / hindsight.size:.0%}"
                                          for q, c in which.most_common()))
    print("auto_plus's candidates, side-mode us/layer (MoE = all-to-all + max compute): "
          + ", ".join(f"{q} {us * side[q].mean():.1f} ({us * res.metrics[q]['moe'].mean():.1f}"
                      f" = {us * res.metrics[q]['comm'].mean():.1f} + "
                      f"{us * (res.metrics[q]['moe'] - res.metrics[q]['comm']).mean():.1f})"
                      for q in cand))
    m = res.metrics
    print("their overheads us/layer (side exposure/assignment/transfer/stall): " + ", ".join(
        f"{q} {us * m[q]['side'].mean():.1f}/{us * m[q]['solve_side'].mean():.1f}"
        f"/{us * m[q]['transfer'].mean():.1f}/{us * res.stall[q].mean() / model_layers:.1f}"
        for q in cand))
    steps = min(prior, load.shape[0] - prior)  # before the first re-plan
    eplb0 = res.metrics["eplb_async"]["moe"][:steps].mean()
    oracle0 = res.metrics["oracle"]["moe"][:steps].mean()
    table = variants(load, costs, prior, k, res.attention, args.seed, steps)
    print(f"planner variants, first {steps} measured steps, MoE + exposed transfer us/layer "
          f"(eplb_async {us * eplb0:.1f}, oracle {us * oracle0:.1f}):")
    print("| layout | line | load | " + " | ".join(RULES) + " |")
    print("|---|---|---|" + "---:|" * len(RULES))
    tags = [f"b{b}p{k - b}" for b in range(k)] + ["home"]
    for tag in tags:
        for line in LINES:
            for src in ("pred", "true"):
                cells = " | ".join(f"{us * table[(tag, r, line, src, 'wf')]:.1f}" for r in RULES)
                print(f"| {tag} | {line} | {src} | {cells} |")
    print("the token split and the load planned on (paper's rules, fitted line):")
    cols = [(src, split) for src in ("pred", "true", "prev") for split in ("wf", "plan")]
    print("| layout | " + " | ".join(f"{src} {split}" for src, split in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for tag in tags:
        cells = " | ".join(f"{us * table[(tag, 'paper', 'fit', src, split)]:.1f}"
                           for src, split in cols)
        print(f"| {tag} | {cells} |")

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.fair.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=None,
                    help="MODEL:WORKLOAD:TOKENS_PER_RANK:SLOTS (repeatable; default: "
                         + ", ".join(CASES) + ")")
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args(argv)
    args = run_args([])
    args.seed = ns.seed
    for case in ns.case or CASES:
        diagnose(case, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
