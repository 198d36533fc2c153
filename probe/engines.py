"""Meet vLLM and SGLang where they are: an EPLB-compatible policy and placement files.

`probe_rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` has the
signature and return convention of DeepSeek's `rebalance_experts`
(`probe.planner.deepseek_eplb`), the policy function that engines' EPLB calls, but picks the
layout with probe's planner. Per layer:

    1. home, one copy of every expert, as many per GPU as static EP's sharding gives
       (E/G, rounded down or up as `sharded_home` spreads E % G): home="packed" (default)
       packs the experts heaviest first onto the lightest GPU with room; home="sharded" is
       static EP itself, GPU g holding experts [g E/G, (g+1) E/G) (`sharded_home`);
    2. the planner (`solve(BalanceProblem(...), method)`) plans the layer's weight
       as a [S = G, E] load (each expert's load arriving at its home rank) with R/G - (home
       experts of g) extra slots on rank g, no transfer charge and an unlimited window: its
       replicas are the redundant copies;
    3. slots the planner left unused are filled one by one with a further copy of the expert
       of highest load per copy, on the GPU with a free slot whose load (each expert's load
       split evenly over its copies, as the engines route) is lowest.

Every GPU then holds exactly R/G slots, every expert >= 1 copy and `logcnt` sums to R.
Within a GPU's block of slots come its home experts in increasing id, then its planned
replicas in increasing id, then the fill copies in the order they were granted;
`log2phy[l, e]` lists e's slots in increasing order, -1 padded to R - E + 1 columns.
num_groups and num_nodes are validated as DeepSeek's function does but do not shape the
layout (pass a `cost` built for the cluster to make the planner topology-aware). The
planner balances with its own uneven token split; the engines split an expert's tokens
evenly over its copies, and under that split DeepSeek's own re-pack balances better
(docs/engines.md has the measured comparison).

`write_placement` / `read_placement` store a placement (phy2log [L, R], log2phy, logcnt) as
the file an engine loads at start-up: SGLang's `--init-expert-location` takes a JSON (or .pt)
file holding {"physical_to_logical_map": [L][R]} and nothing else; engine="json" writes
probe's own JSON with all three maps. docs/engines.md has the command lines.

>>> import numpy as np
>>> weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
>>> phy2log, log2phy, logcnt = probe_rebalance_experts(weight, 16, 4, 2, 8)
>>> phy2log.shape, log2phy.shape, int(logcnt.sum())
((1, 16), (1, 12, 5), 16)
>>> check_placement(phy2log, log2phy, logcnt, num_gpus=8)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from probe.placement import sharded_home
from probe.planner.cost import CostModel
from probe.planner.deepseek_eplb import check_count, check_rebalance_args
from probe.planner.problem import BalanceProblem
from probe.planner.solve import solve

__all__ = [
    "ENGINES",
    "check_placement",
    "gpu_load",
    "placement_imbalance",
    "probe_rebalance_experts",
    "read_placement",
    "write_placement",
]

# File formats `write_placement` knows: SGLang's --init-expert-location JSON, the three maps
# under vLLM's EPLB state names (vLLM has no start-up placement file: docs/engines.md), probe's
# JSON.
ENGINES = ("sglang", "vllm", "json")
# Keys of the "vllm" file: the names of the maps in vLLM's EPLB state.
VLLM_KEYS = ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")
# Format tag of probe's own placement JSON.
PLACEMENT_FORMAT = "probe-placement"
PLACEMENT_VERSION = 1
# Home layouts the planner starts from (see the module docstring).
HOMES = ("packed", "sharded")
# Float weights are scaled to integer token counts with this largest value for the planner.
FLOAT_SCALE = 1 << 20


def _token_counts(weight: np.ndarray) -> np.ndarray:
    """One layer's weight float [E] as int64 token counts for the planner (scaled if not
    whole numbers)."""
    if np.all(weight == np.round(weight)) and weight.max(initial=0.0) <= FLOAT_SCALE:
        return weight.astype(np.int64)
    top = weight.max(initial=0.0)
    return np.rint(weight * (FLOAT_SCALE / top)).astype(np.int64) if top > 0 else \
        np.zeros(weight.shape, np.int64)


def gpu_load(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """float64 [L, G]: each GPU's load when each expert's load is split evenly over its
    copies (as DeepSeek's EPLB assumes). weight [L, E], phy2log [L, R]."""
    weight = np.asarray(weight, dtype=np.float64)
    phy2log = np.asarray(phy2log)
    num_layers, num_slots = phy2log.shape
    out = np.zeros((num_layers, num_gpus))
    for layer in range(num_layers):
        count = np.bincount(phy2log[layer], minlength=weight.shape[1])
        share = weight[layer][phy2log[layer]] / count[phy2log[layer]]
        out[layer] = share.reshape(num_gpus, num_slots // num_gpus).sum(axis=1)
    return out


def placement_imbalance(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """float64 [L]: max GPU load / mean GPU load of each layer (1.0 for an idle layer)."""
    loads = gpu_load(weight, phy2log, num_gpus)
    mean = loads.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def _home(weight: np.ndarray, num_gpus: int, home: str) -> np.ndarray:
    """bool [G, E]: the layer's home layout, "sharded" or "packed" (module docstring)."""
    num_experts = weight.shape[0]
    if home == "sharded":
        return sharded_home(num_experts, num_gpus)
    room = sharded_home(num_experts, num_gpus).sum(axis=1)  # same counts as "sharded"
    gpu_load = np.zeros(num_gpus)
    layout = np.zeros((num_gpus, num_experts), bool)
    for e in np.argsort(-weight, kind="stable"):  # heaviest first onto the lightest open GPU
        open_gpus = np.flatnonzero(room > 0)
        g = open_gpus[np.argmin(gpu_load[open_gpus])]
        layout[g, e] = True
        gpu_load[g] += weight[e]
        room[g] -= 1
    return layout


def _layer_layout(weight: np.ndarray, num_gpus: int, per_gpu: int, cost: CostModel,
                  method: str, home_kind: str, time_limit: float | None) -> np.ndarray:
    """One layer: phy2log int64 [R] (steps 1-3 of the module docstring)."""
    num_experts = weight.shape[0]
    home = _home(weight, num_gpus, home_kind)
    owner = np.argmax(home, axis=0)
    load = np.zeros((num_gpus, num_experts), np.int64)
    load[owner, np.arange(num_experts)] = _token_counts(weight)
    slots = per_gpu - home.sum(axis=1)
    problem = BalanceProblem(load, home, slots, math.inf, cost)
    result = solve(problem, method, time_limit=time_limit)
    if result.plan is None:
        raise RuntimeError(f"planner method {method!r} returned no plan: {result.message}")
    held = [list(np.flatnonzero(home[g])) + list(np.flatnonzero(result.plan.replicas[g]))
            for g in range(num_gpus)]
    count = np.zeros(num_experts, np.int64)
    for experts in held:
        np.add.at(count, experts, 1)
    # Fill the slots the planner left free: next copy by load per copy, lightest GPU.
    free = [per_gpu - len(experts) for experts in held]
    while sum(free) > 0:
        e = int(np.argmax(weight / count))
        count[e] += 1
        share = weight / count
        loads = np.array([share[experts].sum() if free[g] else np.inf
                          for g, experts in enumerate(held)])
        g = int(np.argmin(loads))
        held[g].append(e)
        free[g] -= 1
    return np.array([e for experts in held for e in experts], np.int64)


def _maps(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy [L, E, X] in increasing slot order, -1 padded; logcnt [L, E]); X = R - E + 1,
    or more when some expert has no slot (which `check_placement` then reports)."""
    num_layers, num_slots = phy2log.shape
    width = max(num_slots - num_experts + 1,
                max(int(np.bincount(row).max()) for row in phy2log))
    log2phy = np.full((num_layers, num_experts, width), -1, np.int64)
    logcnt = np.zeros((num_layers, num_experts), np.int64)
    for layer in range(num_layers):
        for slot, e in enumerate(phy2log[layer]):
            log2phy[layer, e, logcnt[layer, e]] = slot
            logcnt[layer, e] += 1
    return log2phy, logcnt


def probe_rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int,
                            num_nodes: int, num_gpus: int, *, cost: CostModel | None = None,
                            method: str = "greedy", home: str = "packed",
                            time_limit: float | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layout of every layer chosen by probe's planner, in DeepSeek EPLB's convention.

    weight: float [L, E], load of each logical expert per layer (finite, >= 0).
    num_replicas: R physical slots in all (E <= R, a multiple of num_gpus). num_groups
    (divides E) and num_nodes (divides num_gpus): validated, not used (see the module
    docstring). num_gpus: G <= E.
    home: "packed" or "sharded", the layout the planner adds copies to.
    cost: the planner's CostModel for G ranks (None: pure compute balance, alpha = 0,
    beta = 1, free links). method: a planner method that adds replicas ("greedy", "lp",
    "cpsat", ...). time_limit: seconds per layer for the planner (None: its default).
    Returns (phy2log int64 [L, R], log2phy int64 [L, E, R - E + 1], logcnt int64 [L, E]).
    """
    weight, num_replicas, num_groups, num_nodes, num_gpus = check_rebalance_args(
        weight, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_experts = weight.shape
    if num_gpus > num_experts:
        raise ValueError(f"num_gpus ({num_gpus}) must be <= the number of experts "
                         f"E = {num_experts}: the sharded home gives every GPU an expert")
    if home not in HOMES:
        raise ValueError(f"home must be one of {', '.join(HOMES)}, got {home!r}")
    per_gpu = num_replicas // num_gpus  # >= ceil(E / G), the fullest home, since R >= E
    if cost is None:
        cost = CostModel.uniform(num_gpus, alpha=0.0, beta=1.0, token_time=0.0,
                                 transfer_time=0.0)
    elif not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel or None, got {type(cost).__name__}")
    elif cost.num_ranks != num_gpus:
        raise ValueError(f"cost is for {cost.num_ranks} ranks, num_gpus is {num_gpus}")
    phy2log = np.empty((num_layers, num_replicas), np.int64)
    for layer in range(num_layers):
        phy2log[layer] = _layer_layout(weight[layer], num_gpus, per_gpu, cost, method, home,
                                       time_limit)
    log2phy, logcnt = _maps(phy2log, num_experts)
    return phy2log, log2phy, logcnt


def _problems(phy2log, log2phy, logcnt, num_gpus: int | None) -> list[str]:
    """What is wrong with a placement (empty list: nothing)."""
    phy2log, log2phy, logcnt = (np.asarray(a) for a in (phy2log, log2phy, logcnt))
    for name, arr, ndim in (("phy2log", phy2log, 2), ("log2phy", log2phy, 3),
                            ("logcnt", logcnt, 2)):
        if arr.dtype.kind not in "iu" or arr.ndim != ndim:
            return [f"{name} must be an integer array with {ndim} dimensions, got shape "
                    f"{arr.shape} and dtype {arr.dtype}"]
    num_layers, num_slots = phy2log.shape
    num_experts = logcnt.shape[1]
    if logcnt.shape[0] != num_layers or log2phy.shape[:2] != (num_layers, num_experts):
        return [f"shapes disagree: phy2log {list(phy2log.shape)} is [L, R], logcnt "
                f"{list(logcnt.shape)} must be [L, E] and log2phy {list(log2phy.shape)} "
                "[L, E, X]"]
    if num_gpus is not None and num_slots % num_gpus:
        return [f"phy2log has {num_slots} slots per layer, not a multiple of num_gpus "
                f"({num_gpus})"]
    if np.any(phy2log < 0) or np.any(phy2log >= num_experts):
        return [f"phy2log must name experts in [0, {num_experts}) in every slot"]
    found = []
    slots = np.arange(num_slots)
    for layer in range(num_layers):
        count = np.bincount(phy2log[layer], minlength=num_experts)
        if not np.array_equal(count, logcnt[layer]):
            e = int(np.flatnonzero(count != logcnt[layer])[0])
            found.append(f"layer {layer}: logcnt[{e}] = {int(logcnt[layer, e])} but phy2log "
                         f"has {int(count[e])} slot(s) of expert {e}")
            continue
        if np.any(count == 0):
            found.append(f"layer {layer}: expert {int(np.flatnonzero(count == 0)[0])} has "
                         "no slot")
        row = log2phy[layer]
        if log2phy.shape[2] < count.max():
            found.append(f"layer {layer}: log2phy has {log2phy.shape[2]} columns, expert "
                         f"{int(np.argmax(count))} has {int(count.max())} copies")
            continue
        for e in range(num_experts):
            listed = row[e][row[e] >= 0]
            want = slots[phy2log[layer] == e]
            if np.any(row[e, :count[e]] < 0) or np.any(row[e, count[e]:] != -1) or \
                    not np.array_equal(np.sort(listed), want):
                found.append(f"layer {layer}: log2phy[{e}] = {row[e].tolist()} does not list "
                             f"exactly expert {e}'s slots {want.tolist()} (then -1)")
                break
    return found


def check_placement(phy2log, log2phy, logcnt, *, num_gpus: int | None = None) -> None:
    """ValueError naming the first problem(s) unless the three maps describe one placement:
    phy2log int [L, R] of experts in [0, E), logcnt int [L, E] its per-expert slot counts
    (every expert >= 1), log2phy int [L, E, X] listing each expert's slots (any order)
    followed by -1; with num_gpus, R a multiple of it."""
    found = _problems(phy2log, log2phy, logcnt, num_gpus)
    if found:
        more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
        raise ValueError("inconsistent placement: " + "; ".join(found[:3]) + more)


def write_placement(path: str | os.PathLike, phy2log, log2phy, logcnt, *,
                    engine: str = "sglang") -> Path:
    """Write a checked placement as the file `engine` loads; returns the path.

    engine "sglang": JSON {"physical_to_logical_map": [L][R]} for SGLang's
    `--init-expert-location` (SGLang rebuilds the other maps from it and rejects extra keys).
    engine "vllm": JSON {"physical_to_logical_map": [L][R], "logical_to_physical_map":
    [L][E][X], "logical_replica_count": [L][E]}, the maps under the names of vLLM's EPLB
    state; vLLM itself loads no placement file (docs/engines.md says how to use it).
    engine "json": probe's JSON {"format": "probe-placement", "version": 1,
    "physical_to_logical_map", "logical_to_physical_map", "logical_count"}.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_placement(phy2log, log2phy, logcnt)
    path = Path(path)
    phy2log = np.asarray(phy2log).tolist()
    if engine == "sglang":
        data = {"physical_to_logical_map": phy2log}
    elif engine == "vllm":
        data = dict(zip(VLLM_KEYS, (phy2log, np.asarray(log2phy).tolist(),
                                    np.asarray(logcnt).tolist()), strict=True))
    else:
        data = {"format": PLACEMENT_FORMAT, "version": PLACEMENT_VERSION,
                "physical_to_logical_map": phy2log,
                "logical_to_physical_map": np.asarray(log2phy).tolist(),
                "logical_count": np.asarray(logcnt).tolist()}
    path.write_text(json.dumps(data))
    return path


def _int_array(path: Path, data: dict, key: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(data[key])
    except ValueError:
        raise ValueError(f"{path}: {key!r} is not a rectangular array") from None
    if arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{path}: {key!r} must be a {ndim}-D array of integers, got shape "
                         f"{list(arr.shape)} and dtype {arr.dtype}")
    return arr.astype(np.int64)


def read_placement(path: str | os.PathLike, *, num_experts: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log [L, R], log2phy [L, E, X], logcnt [L, E]) int64 from a placement file.

    Reads every format of `write_placement`. An SGLang file holds only phy2log: log2phy and
    logcnt are rebuilt from it (log2phy in increasing slot order, R - E + 1 columns), with
    E = num_experts (None: the largest expert id + 1). Probe's JSON is checked for
    consistency, as is a vllm file. Malformed files raise ValueError naming the path and
    the problem.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(data, dict) or "physical_to_logical_map" not in data:
        raise ValueError(f"{path}: expected a JSON object with 'physical_to_logical_map'")
    phy2log = _int_array(path, data, "physical_to_logical_map", 2)
    if set(data) == set(VLLM_KEYS):
        log2phy = _int_array(path, data, "logical_to_physical_map", 3)
        logcnt = _int_array(path, data, "logical_replica_count", 2)
        if num_experts is not None and logcnt.shape[1] != num_experts:
            raise ValueError(f"{path}: holds {logcnt.shape[1]} experts, expected {num_experts}")
    elif data.get("format") == PLACEMENT_FORMAT:
        if data.get("version") != PLACEMENT_VERSION:
            raise ValueError(f"{path}: unsupported {PLACEMENT_FORMAT} version "
                             f"{data.get('version')!r} (this probe reads {PLACEMENT_VERSION})")
        for key in ("logical_to_physical_map", "logical_count"):
            if key not in data:
                raise ValueError(f"{path}: {PLACEMENT_FORMAT} file has no {key!r}")
        log2phy = _int_array(path, data, "logical_to_physical_map", 3)
        logcnt = _int_array(path, data, "logical_count", 2)
        if num_experts is not None and logcnt.shape[1] != num_experts:
            raise ValueError(f"{path}: holds {logcnt.shape[1]} experts, expected {num_experts}")
    else:
        extra = sorted(set(data) - {"physical_to_logical_map"})
        if extra:
            raise ValueError(f"{path}: an SGLang placement holds only "
                             f"'physical_to_logical_map', found also {extra}")
        if phy2log.size == 0 or np.any(phy2log < 0):
            raise ValueError(f"{path}: physical_to_logical_map must be non-empty with expert "
                             "ids >= 0")
        if num_experts is None:
            num_experts = int(phy2log.max()) + 1
        num_experts = check_count("num_experts", num_experts)
        if phy2log.max() >= num_experts or phy2log.shape[1] < num_experts:
            raise ValueError(f"{path}: physical_to_logical_map [L, R] = "
                             f"{list(phy2log.shape)} must hold ids < E = {num_experts} "
                             "with R >= E")
        log2phy, logcnt = _maps(phy2log, num_experts)
    try:
        check_placement(phy2log, log2phy, logcnt)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return phy2log, log2phy, logcnt
