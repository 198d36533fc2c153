"""Hierarchical planning for multi-node EP: balance the nodes first, then the GPUs of each node.

`hierarchical_plan(problem, ranks_per_node, rules, node_rules)` plans in three stages, each
greedy stage the existing kernel (`greedy_arrays`) on a sub-problem, or the parallel greedy's
(`parallel.parallel_arrays`) when its rules are a ParallelRules:

1. **Nodes.** Ranks are aggregated per node (R = ranks_per_node GPUs, N = G / R nodes,
   `node_problem`): the node load [N, E] sums its sources' loads, a node holds an expert when
   any of its GPUs does, its slots are its GPUs' slots and its window the largest of its GPUs'
   windows (a copy lands on one GPU). A node computes on R GPUs at once: alpha / R and
   beta / R; a copy's tokens arrive at the one GPU that holds it, over that GPU's network
   link: token_time = the mean inter-node token time (not divided by R), transfer_time = the
   mean inter-node transfer time. The greedy (`node_rules`) on this N-rank problem picks the
   cross-node copies (node n copies expert e from node h).
2. **Placement of the cross-node copies.** Each goes to the GPU of node n with the lowest
   static rank time that has a free slot and whose window takes the transfer, copied from a
   home holder of e in node h whose window takes it (least already sent first); a copy that
   fits nowhere is dropped.
3. **GPUs.** The greedy (`rules`) on the full problem with those copies in place as holders,
   its slots and windows reduced by them, and every copy between nodes priced beyond any
   window, so that it copies over the intra-node link only. A copy it takes from a
   cross-node copy (not a home holder, as `check_plan` requires) is re-sourced to a home
   holder in the node whose window takes it, or dropped with its tokens sent to that
   cross-node copy. Stage 3 runs with and without the cross-node copies, and the plan with
   the lower eq. 8 is kept.

The plan is the full problem's: `check_plan` and `evaluate_plan` judge it as any other.
Per-node sub-problems for stage 3 (each node's GPUs alone, other nodes' tokens counted at the
GPU of the same local index) were tried first and balanced much worse (IR 1.75 against the
flat greedy's 1.06 at ep=64 / 256 experts): most of a rank's time is inter-node traffic,
which a node-only problem cannot price. With the default window (each GPU's static expert
compute, 0.05-1 ms in decode), a cross-node copy of a DeepSeek-V3 expert (44 MB over a
50 GB/s link, 0.88 ms) rarely fits; where the flat greedy does fit one (into a busy rank's
large window) the hierarchical planner, which keeps stage 3 inside the nodes, cannot, and it
balances worse than the flat greedy with the same budget (results/scale.md).
"""

from __future__ import annotations

import time

import numpy as np

from probe.planner.check import evaluate_plan, rank_times
from probe.planner.cost import CostModel
from probe.planner.greedy import _kernel_args, greedy_arrays, plan_from_arrays
from probe.planner.greedy_rules import GreedyRules
from probe.planner.parallel_ref import ParallelRules
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.static import static_assignment
from probe.planner.tolerance import fits_window

__all__ = ["hierarchical_plan", "node_problem", "solve_hierarchical", "timed_greedy"]

# Stage 3's transfer time between nodes, seconds: longer than any window, so no copy crosses.
BLOCKED_S = 1e6


def _checked_nodes(problem: BalanceProblem, ranks_per_node) -> int:
    if not isinstance(problem, BalanceProblem):
        raise TypeError(f"problem must be a BalanceProblem, got {type(problem).__name__}")
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, (int, np.integer)):
        raise TypeError(f"ranks_per_node must be an int, got {ranks_per_node!r}")
    if ranks_per_node < 1 or problem.num_ranks % ranks_per_node:
        raise ValueError(f"ranks_per_node must be >= 1 and divide the {problem.num_ranks} "
                         f"ranks, got {ranks_per_node}")
    return problem.num_ranks // int(ranks_per_node)


def node_problem(problem: BalanceProblem, ranks_per_node: int) -> BalanceProblem:
    """Stage 1's N-rank problem (module docstring): loads, holders, slots and windows
    aggregated per node, the cost model of a node of ranks_per_node GPUs."""
    num_nodes = _checked_nodes(problem, ranks_per_node)
    r, num_experts = int(ranks_per_node), problem.num_experts
    cost = problem.cost

    def between_nodes(matrix):  # mean over the GPU pairs of each node pair
        out = matrix.reshape(num_nodes, r, num_nodes, r).mean(axis=(1, 3))
        np.fill_diagonal(out, 0.0)
        return out

    node_cost = CostModel(cost.alpha / r, cost.beta / r, between_nodes(cost.token_time),
                          between_nodes(cost.transfer_time), cost.expert_bytes,
                          cost.token_bytes)
    return BalanceProblem(problem.load.reshape(num_nodes, r, num_experts).sum(axis=1),
                          problem.home.reshape(num_nodes, r, num_experts).any(axis=1),
                          problem.slots.reshape(num_nodes, r).sum(axis=1),
                          problem.window.reshape(num_nodes, r).max(axis=1), node_cost)


def _fill(supply: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """int64 [len(supply), len(demand)]: supply poured into demand in order (both sum to the
    same total): the overlap of their cumulative intervals."""
    lo_s = np.concatenate([[0], np.cumsum(supply)[:-1]])
    hi_s = lo_s + supply
    lo_d = np.concatenate([[0], np.cumsum(demand)[:-1]])
    hi_d = lo_d + demand
    return np.maximum(np.minimum(hi_s[:, None], hi_d[None, :])
                      - np.maximum(lo_s[:, None], lo_d[None, :]), 0)


def hierarchical_plan(problem: BalanceProblem, ranks_per_node: int,
                      rules: GreedyRules | ParallelRules | None = None,
                      node_rules: GreedyRules | ParallelRules | None = None,
                      *, timings: dict | None = None) -> Plan:
    """The two-level plan of `problem` (module docstring).

    ranks_per_node: GPUs per node (an int dividing G; G // ranks_per_node == 1 is the flat
        greedy). rules: the greedy's rules inside each node (None: GreedyRules()); a
        ParallelRules runs the parallel greedy (probe.planner.parallel) there instead.
    node_rules: the rules of the node stage (None: `rules`), GreedyRules or ParallelRules.
    timings: a dict to receive "node_s" and "gpu_s", the seconds of the kernel calls of the
        node stage and of the GPU stage (two calls when there are cross-node copies).
    """
    num_nodes = _checked_nodes(problem, ranks_per_node)
    for name, value in (("rules", rules), ("node_rules", node_rules)):
        if value is not None and not isinstance(value, (GreedyRules, ParallelRules)):
            raise TypeError(f"{name} must be a GreedyRules or a ParallelRules, got "
                            f"{type(value).__name__}")
    if timings is not None and not isinstance(timings, dict):
        raise TypeError(f"timings must be a dict or None, got {type(timings).__name__}")
    timings = {} if timings is None else timings
    if num_nodes == 1:
        plan, seconds = timed_greedy(problem, rules)
        timings.update(node_s=0.0, gpu_s=seconds)
        return plan
    r = int(ranks_per_node)
    num_ranks, num_experts = problem.home.shape
    load, home, cost = problem.load, problem.home, problem.cost
    node_of = np.arange(num_ranks) // r

    # 1. Nodes.
    nodes = node_problem(problem, r)
    node_plan, timings["node_s"] = timed_greedy(nodes, node_rules if node_rules is not None
                                                else rules)
    flow = node_plan.assignment.copy()  # [N src, E, N dst]

    # 2. Cross-node copies onto GPUs.
    static_time = sum(rank_times(problem, static_assignment(load, home)))
    used = np.zeros(num_ranks, np.int64)
    recv = np.zeros(num_ranks)
    send = np.zeros(num_ranks)
    replicas = np.zeros((num_ranks, num_experts), bool)
    sources = np.full((num_ranks, num_experts), -1, np.int64)
    for n, e in np.argwhere(node_plan.replicas):
        h = int(node_plan.sources[n, e])
        best = None
        for g in sorted(range(n * r, (n + 1) * r), key=lambda g: (static_time[g], g)):
            if home[g, e] or used[g] >= problem.slots[g]:
                continue
            holders = [s for s in range(h * r, (h + 1) * r) if home[s, e]]
            for s in sorted(holders, key=lambda s: (send[s], s)):
                t = cost.transfer_time[s, g]
                if (fits_window(np.array([recv[g] + t]), problem.window[g:g + 1])[0]
                        and fits_window(np.array([send[s] + t]), problem.window[s:s + 1])[0]):
                    best = (g, s, t)
                    break
            if best is not None:
                break
        if best is None:  # no GPU takes it: its tokens go back to the expert's own node
            back = flow[:, e, n].copy()
            flow[:, e, n] = 0
            own = np.flatnonzero(nodes.home[:, e])
            for src in np.flatnonzero(back):
                dst = src if nodes.home[src, e] else int(own[0])
                flow[src, e, dst] += back[src]
            continue
        g, s, t = best
        replicas[g, e], sources[g, e] = True, s
        used[g] += 1
        recv[g] += t
        send[s] += t

    # 3. GPUs, with and without the cross-node copies; the lower eq. 8 is kept.
    with_copies, timings["gpu_s"] = _gpu_stage(problem, rules, node_of, replicas, sources,
                                               used, recv, send)
    plans = [with_copies]
    if replicas.any():
        zero = np.zeros(num_ranks)
        plan, seconds = _gpu_stage(problem, rules, node_of, np.zeros_like(replicas),
                                   np.full_like(sources, -1), np.zeros_like(used), zero,
                                   zero.copy())
        plans.append(plan)
        timings["gpu_s"] += seconds
    return min(plans, key=lambda plan: evaluate_plan(problem, plan).objective)


def timed_greedy(problem: BalanceProblem,
                 rules: GreedyRules | ParallelRules | None) -> tuple[Plan, float]:
    """The greedy plan of `problem` and the seconds of its kernel call alone: the parallel
    greedy's (probe.planner.parallel) for ParallelRules, else the greedy's."""
    if isinstance(rules, ParallelRules):
        from probe.planner.parallel import kernel_args, parallel_arrays, plan_from_blocks

        args = kernel_args(problem, rules)
        start = time.perf_counter()
        out = parallel_arrays(*args)
        seconds = time.perf_counter() - start
        return plan_from_blocks(problem, *out[:3]), seconds
    args = _kernel_args(problem, rules)
    start = time.perf_counter()
    out = greedy_arrays(*args)
    seconds = time.perf_counter() - start
    return plan_from_arrays(problem, *out[:3]), seconds


def _gpu_stage(problem, rules, node_of, replicas, sources, used, recv,
               send) -> tuple[Plan, float]:
    """Stage 3: the greedy on the full problem with the cross-node copies in place (as home
    holders), its copies restricted to the intra-node link (a cross-node copy never fits
    its window here); copies it takes from a cross-node copy are re-sourced to a home holder
    in the node where one fits, else dropped with their tokens sent to that cross-node copy."""
    load, home, cost = problem.load, problem.home, problem.cost
    replicas, sources, recv, send = replicas.copy(), sources.copy(), recv.copy(), send.copy()
    blocked = np.where(node_of[:, None] == node_of[None, :], cost.transfer_time, BLOCKED_S)
    stage = BalanceProblem(load, home | replicas, problem.slots - used,
                           np.maximum(problem.window - np.maximum(recv, send), 0.0),
                           CostModel(cost.alpha, cost.beta, cost.token_time, blocked,
                                     cost.expert_bytes, cost.token_bytes))
    inner, seconds = timed_greedy(stage, rules)
    assignment = inner.assignment.copy()
    picks = np.argwhere(inner.replicas)
    from_home = home[inner.sources[picks[:, 0], picks[:, 1]], picks[:, 1]]
    for g, e in np.concatenate([picks[from_home], picks[~from_home]]):
        src = int(inner.sources[g, e])
        if not home[src, e]:
            tt = cost.transfer_time
            found = [int(s) for s in np.flatnonzero(home[:, e] & (node_of == node_of[g]))
                     if fits_window(np.array([send[s] + tt[s, g]]), problem.window[s:s + 1])[0]
                     and fits_window(np.array([recv[g] + tt[s, g]]), problem.window[g:g + 1])[0]]
            if not found:
                assignment[:, e, src] += assignment[:, e, g]
                assignment[:, e, g] = 0
                continue
            src = found[0]
        t = cost.transfer_time[src, g]
        replicas[g, e], sources[g, e] = True, src
        recv[g] += t
        send[src] += t
    return Plan(replicas, sources, assignment), seconds


def solve_hierarchical(problem: BalanceProblem, *, time_limit: float | None = None,
                       ranks_per_node: int | None = None,
                       rules: GreedyRules | ParallelRules | None = None,
                       node_rules: GreedyRules | ParallelRules | None = None) -> SolveResult:
    """Backend for `solve(problem, "hierarchical", ranks_per_node=..., rules=...,
    node_rules=...)` (ranks_per_node None: 8 GPUs per node, one node below 8 ranks; rules and
    node_rules GreedyRules or ParallelRules, as in `hierarchical_plan`); time_limit is only
    reported against."""
    if ranks_per_node is None and isinstance(problem, BalanceProblem):
        ranks_per_node = min(8, problem.num_ranks)
    timings: dict = {}
    start = time.perf_counter()
    plan = hierarchical_plan(problem, ranks_per_node, rules, node_rules, timings=timings)
    wall = time.perf_counter() - start
    status = "timeout" if time_limit is not None and wall > time_limit else "feasible"
    kernel = timings["node_s"] + timings["gpu_s"]
    return SolveResult(status, plan, float("nan"), None, None, wall,
                       f"{plan.num_replicas} replicas; kernels {kernel * 1e3:.3f} ms "
                       "(node stage + GPU stage)", "hierarchical")
