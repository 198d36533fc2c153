"""DeepSeek's expert-parallel load balancer (EPLB), written from its published description.

DeepSeek's EPLB re-packs every expert, home copies included, over the physical expert slots of
the cluster; probe's `solve(problem, "eplb_addcopies")` (probe.planner.eplb; it was method
"eplb" before "eplb" became this algorithm) instead keeps a problem's home layout and only adds
copies. This module is the faithful algorithm and its bridge to the planner: method "eplb"
(alias "deepseek_eplb", its former name).

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` is a pure function
in the style of DeepSeek's public API. Names: L layers, E logical experts, R = num_replicas
physical expert slots (E + redundant), G = num_gpus, N = num_nodes. Per layer:

Hierarchical policy (used when N divides num_groups; experts 0..E-1 form num_groups groups of
E / num_groups consecutive ids):
    1. Pack the expert groups onto the N nodes, num_groups / N groups per node, balancing the
       summed group load (`balanced_packing`).
    2. On each node, share its R / N slots among its experts: each starts with one slot, every
       further slot goes to the expert with the highest load per slot (`replicate_experts`).
    3. Pack the node's physical experts (load = expert load / its slot count) onto the node's
       G / N GPUs, R / G per GPU (`balanced_packing`).
Global policy (otherwise): the hierarchical one with num_groups = N = 1.

Tie-breaking rules (they fix the output; with them the published example below comes out
exactly):
    - balanced packing takes items heaviest first, equal weights in increasing index, and puts
      each on the lightest pack that still has room, equal loads to the lowest pack; when every
      pack takes exactly one item, item i goes to pack i (any such packing is equally balanced);
    - a further slot goes to the expert with the highest load per slot, equal ratios to the
      lowest index;
    - on a node, experts are indexed group by group in the order the groups were packed onto
      that node, ids increasing within a group; its physical experts are indexed home copy of
      each expert first (in that order), then the extra copies in the order they were granted;
    - physical slot of an item = node * (R / N) + GPU within node * (R / G) + the order in which
      the item entered its GPU's pack; replica ranks (the second index of log2phy) count an
      expert's copies in the order they were granted, the home copy being rank 0.

Returns phy2log int64 [L, R] (logical expert of each slot; GPU g owns slots [g R/G, (g+1) R/G)),
log2phy int64 [L, E, R - E + 1] (slot of each replica rank, -1 padded) and logcnt int64 [L, E].

The published example (2 layers, 12 experts in 4 groups, 16 slots on 2 nodes of 4 GPUs):

>>> import numpy as np
>>> weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
...                    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
>>> phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
>>> for row in phy2log.tolist():
...     print(row)
[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
[7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
>>> logcnt.tolist()
[[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
>>> log2phy[0, 5].tolist(), log2phy.shape    # expert 5 of layer 0 sits in slots 0 and 2
([0, 2, -1, -1, -1], (2, 12, 5))

Planner bridge: a `BalanceProblem` has a fixed home layout and a `Plan` only adds copies to it,
so the faithful EPLB enters the planner as a new home. `eplb_layout` turns one layer's weights
into copies int64 [G, E] (physical copies of expert e on GPU g; EPLB may put two copies of an
expert on one GPU); `eplb_problem(problem, history=...)` re-packs a problem's physical slots
(home experts + extra slots of each rank, equal on every rank) and returns the problem rebuilt
on that layout (home = copies > 0, no extra slots) with the copies; `solve(p, "deepseek_eplb",
copies=copies)` then routes tokens as DeepSeek does: each (source, expert)'s tokens split evenly
over the expert's physical copies, no locality, no replicas, no transfers.
"""

from __future__ import annotations

import operator
import time

import numpy as np

from probe.planner.eplb import even_split, history_weight
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = [
    "balanced_packing",
    "check_count",
    "check_rebalance_args",
    "eplb_copies",
    "eplb_layout",
    "eplb_problem",
    "rebalance_experts",
    "replicate_experts",
    "solve_deepseek_eplb",
]


def check_count(name: str, value, low: int = 1) -> int:
    """`value` as an int >= low; TypeError/ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return operator.index(value)


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items of `weight` float [n] into num_packs packs of n / num_packs items each.

    Heaviest item first (equal weights: lower index first) onto the lightest pack that still
    has room (equal loads: lower pack); with one item per pack, item i goes to pack i.
    Returns (pack int64 [n], position int64 [n]): the item's pack and the order in which it
    entered it.

    >>> pack, position = balanced_packing(np.array([5.0, 1.0, 4.0, 2.0]), 2)
    >>> pack.tolist(), position.tolist()                # packs {5, 1} and {4, 2}
    ([0, 0, 1, 1], [0, 1, 0, 1])
    """
    num_items = weight.shape[0]
    per_pack = num_items // num_packs
    assert per_pack * num_packs == num_items, "callers pass a multiple of num_packs items"
    if per_pack == 1:
        return np.arange(num_items, dtype=np.int64), np.zeros(num_items, np.int64)
    pack = np.empty(num_items, np.int64)
    position = np.empty(num_items, np.int64)
    pack_load = np.zeros(num_packs)
    pack_size = np.zeros(num_packs, np.int64)
    for item in np.argsort(-weight, kind="stable"):
        open_packs = np.flatnonzero(pack_size < per_pack)
        p = open_packs[np.argmin(pack_load[open_packs])]
        pack[item], position[item] = p, pack_size[p]
        pack_load[p] += weight[item]
        pack_size[p] += 1
    return pack, position


def replicate_experts(weight: np.ndarray,
                      num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Share num_slots >= n slots among n experts of load `weight` float [n].

    Slot i < n holds expert i; each further slot goes to the expert with the highest load per
    slot (equal ratios: lowest index). Returns (expert int64 [num_slots], replica rank int64
    [num_slots], count int64 [n]).

    >>> expert, rank, count = replicate_experts(np.array([90.0, 40.0, 10.0]), 5)
    >>> expert.tolist(), rank.tolist(), count.tolist()  # 90 -> 45 per copy, still above 40
    ([0, 1, 2, 0, 0], [0, 0, 0, 1, 2], [3, 1, 1])
    """
    num_experts = weight.shape[0]
    expert = np.arange(num_slots, dtype=np.int64)  # slots >= n are overwritten below
    rank = np.zeros(num_slots, np.int64)
    count = np.ones(num_experts, np.int64)
    for slot in range(num_experts, num_slots):
        e = int(np.argmax(weight / count))
        expert[slot], rank[slot] = e, count[e]
        count[e] += 1
    return expert, rank, count


def _rebalance_layer(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                     num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer of the hierarchical policy: (phy2log [R], replica rank [R], logcnt [E])."""
    num_experts = weight.shape[0]
    group_size = num_experts // num_groups
    slots_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    group_load = weight.reshape(num_groups, group_size).sum(axis=1)  # [num_groups]
    group_node, group_position = balanced_packing(group_load, num_nodes)
    phy2log = np.empty(num_replicas, np.int64)
    phy_rank = np.empty(num_replicas, np.int64)
    logcnt = np.zeros(num_experts, np.int64)
    for node in range(num_nodes):
        groups = np.flatnonzero(group_node == node)
        groups = groups[np.argsort(group_position[groups])]
        experts = (groups[:, None] * group_size + np.arange(group_size)).ravel()  # node order
        local, rank, count = replicate_experts(weight[experts], slots_per_node)
        logcnt[experts] = count
        gpu, position = balanced_packing(weight[experts][local] / count[local],
                                         num_gpus // num_nodes)
        slot = node * slots_per_node + gpu * slots_per_gpu + position
        phy2log[slot] = experts[local]
        phy_rank[slot] = rank
    return phy2log, phy_rank, logcnt


def check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus,
                         ) -> tuple[np.ndarray, int, int, int, int]:
    """The arguments of a `rebalance_experts`-style policy, validated: weight as float64
    [L, E] (finite, >= 0) and the four counts as ints; ValueError/TypeError naming the
    argument otherwise. Shared by every policy with this signature (probe.engines too)."""
    weight = np.asarray(weight)
    if weight.dtype.kind not in "iuf" or weight.ndim != 2 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a numeric [L, E] array with E >= 1, got shape "
                         f"{weight.shape} and dtype {weight.dtype}")
    weight = weight.astype(np.float64)
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("weight must hold finite, non-negative loads (no NaN)")
    num_experts = weight.shape[1]
    num_replicas = check_count("num_replicas", num_replicas)
    num_groups = check_count("num_groups", num_groups)
    num_nodes = check_count("num_nodes", num_nodes)
    num_gpus = check_count("num_gpus", num_gpus)
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of experts "
                         f"E = {num_experts}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus "
                         f"({num_gpus})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts "
                         f"E = {num_experts}")
    return weight, num_replicas, num_groups, num_nodes, num_gpus


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB layout of every layer (see the module docstring for the rules).

    weight: float [L, E], load of each logical expert per layer (finite, >= 0).
    num_replicas: R, physical expert slots in all (E <= R, a multiple of num_gpus).
    num_groups: expert groups (divides E); num_nodes: server nodes (divides num_gpus);
    num_gpus: G. The hierarchical policy runs when num_nodes divides num_groups, else the
    global one. Returns (phy2log int64 [L, R], log2phy int64 [L, E, R - E + 1], logcnt int64
    [L, E]).
    """
    weight, num_replicas, num_groups, num_nodes, num_gpus = check_rebalance_args(
        weight, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes:  # global policy: one group, one node
        num_groups = num_nodes = 1
    phy2log = np.empty((num_layers, num_replicas), np.int64)
    log2phy = np.full((num_layers, num_experts, num_replicas - num_experts + 1), -1, np.int64)
    logcnt = np.empty((num_layers, num_experts), np.int64)
    slots = np.arange(num_replicas)
    for layer in range(num_layers):
        phy2log[layer], rank, logcnt[layer] = _rebalance_layer(
            weight[layer], num_replicas, num_groups, num_nodes, num_gpus)
        log2phy[layer, phy2log[layer], rank] = slots
    return phy2log, log2phy, logcnt


def eplb_layout(weight: np.ndarray, slots_per_gpu: int, num_groups: int, num_nodes: int,
                num_gpus: int) -> np.ndarray:
    """One layer's EPLB layout as copies int64 [G, E]: physical copies of expert e on GPU g.

    weight: float [E]; slots_per_gpu: physical slots of each GPU (R = slots_per_gpu * G).
    `copies > 0` is the layout as a `BalanceProblem` home; every row sums to slots_per_gpu.

    >>> eplb_layout(np.array([6.0, 1.0, 1.0]), 2, 1, 1, 2).tolist()  # expert 0 on both GPUs
    [[1, 1, 0], [1, 0, 1]]
    """
    weight = np.asarray(weight)
    if weight.ndim != 1:
        raise ValueError(f"weight must be a 1-D [E] array, got shape {weight.shape}")
    slots_per_gpu = check_count("slots_per_gpu", slots_per_gpu)
    num_gpus = check_count("num_gpus", num_gpus)
    phy2log, _, _ = rebalance_experts(weight[None, :], slots_per_gpu * num_gpus, num_groups,
                                      num_nodes, num_gpus)
    gpu = np.arange(slots_per_gpu * num_gpus) // slots_per_gpu
    copies = np.zeros((num_gpus, weight.shape[0]), np.int64)
    np.add.at(copies, (gpu, phy2log[0]), 1)
    return copies


def eplb_problem(problem: BalanceProblem, *, history: np.ndarray | None = None,
                 num_groups: int = 1, num_nodes: int = 1) -> tuple[BalanceProblem, np.ndarray]:
    """`problem` rebuilt on DeepSeek EPLB's layout of its physical slots.

    Each rank's physical slots are its home experts plus its extra slots (capped at E), which
    must be the same number P on every rank. The weights are the mean load of `history` (int
    [H, S, E] or [H, E], as for method "eplb_addcopies") or, with None, the problem's own load
    summed over sources. Returns (the problem with home = copies > 0 and no extra slots, copies
    int64 [G, E]); plan it with `solve(new_problem, "eplb", copies=copies)`.

    >>> from probe.placement import sharded_home
    >>> from probe.planner.cost import CostModel
    >>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    >>> prob = BalanceProblem(np.array([[6, 1, 1, 0], [6, 0, 0, 2]]), sharded_home(4, 2),
    ...                       slots=1, window=1.0, cost=cost)
    >>> new, copies = eplb_problem(prob)   # weights 12, 1, 1, 2 over 2 x 3 slots
    >>> copies.tolist()                    # expert 0: 3 copies (4 each), 2 of them on rank 0
    [[2, 0, 1, 0], [1, 1, 0, 1]]
    >>> from probe.planner.solve import solve
    >>> result = solve(new, "eplb", copies=copies)
    >>> result.plan.tokens_per_rank_expert().tolist(), result.objective
    ([[8, 0, 1, 0], [4, 1, 0, 2]], 9.0)
    """
    if not isinstance(problem, BalanceProblem):
        raise TypeError(f"problem must be a BalanceProblem, got {type(problem).__name__}")
    num_experts = problem.num_experts
    home_count = problem.home.sum(axis=1)
    physical = home_count + np.minimum(problem.slots, num_experts - home_count)  # [G]
    if np.any(physical != physical[0]):
        raise ValueError(f"home experts + slots must be equal on every rank for EPLB, got "
                         f"{physical.tolist()}")
    weight = history_weight(problem, history)
    copies = eplb_layout(weight, int(physical[0]), num_groups, num_nodes, problem.num_ranks)
    return BalanceProblem(problem.load, copies > 0, 0, problem.window, problem.cost), copies


def solve_deepseek_eplb(problem: BalanceProblem, *, time_limit: float | None = None,
                        copies: np.ndarray | None = None) -> SolveResult:
    """Backend for `solve(problem, "eplb", copies=...)` (alias "deepseek_eplb"): DeepSeek's
    token routing.

    Tokens of each (source, expert) are split evenly over the expert's physical copies
    (`even_split`, no locality); no replicas are added. copies: int [G, E], physical copies
    per rank with copies > 0 exactly where problem.home is (as `eplb_problem` returns); None
    counts one copy per home holder (the problem's extra slots stay unused: method "eplb" does
    not re-pack a raw problem; `plan_layers` / `plan_step` do it). Build the problem with
    `eplb_problem` to plan DeepSeek EPLB end to end. time_limit is accepted and ignored.
    """
    del time_limit
    start = time.perf_counter()
    if copies is None:
        copies = problem.home.astype(np.int64)
    else:
        copies = np.asarray(copies)
        if copies.shape != problem.home.shape or copies.dtype.kind not in "iu":
            raise ValueError(f"copies must be an int [G, E] array of shape {problem.home.shape}"
                             f", got shape {copies.shape} and dtype {copies.dtype}")
        if np.any(copies < 0) or not np.array_equal(copies > 0, problem.home):
            raise ValueError("copies must be >= 0 and > 0 exactly where problem.home is True")
    num_ranks, num_experts = problem.home.shape
    plan = Plan(np.zeros((num_ranks, num_experts), bool),
                np.full((num_ranks, num_experts), -1, np.int64), even_split(problem.load, copies))
    return SolveResult("feasible", plan, float("nan"), None, None, time.perf_counter() - start,
                       f"DeepSeek EPLB routing over {int(copies.sum())} physical experts",
                       "eplb")


def eplb_copies(weight: np.ndarray, resident: int, num_ranks: int) -> np.ndarray:
    """int64 [L, G, E]: physical copies per rank of DeepSeek's global-policy layout with
    `resident` redundant slots per rank (E / G + resident physical slots each), from weights
    float [L, E]."""
    num_layers, num_experts = weight.shape
    phy2log, _, _ = rebalance_experts(weight, num_experts + resident * num_ranks, 1, 1,
                                      num_ranks)
    per_gpu = phy2log.shape[1] // num_ranks
    gpu = np.arange(phy2log.shape[1]) // per_gpu
    copies = np.zeros((num_layers, num_ranks, num_experts), np.int64)
    for layer in range(num_layers):
        np.add.at(copies[layer], (gpu, phy2log[layer]), 1)
    return copies
