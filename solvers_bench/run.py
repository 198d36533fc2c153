"""Run every solver on every instance, cross-check the plans, write JSONL as results arrive.

One JSON line per instance (`run_instance`): the instance recipe, the static IR, and per method
its status, objective, bound, wall time, plan metrics and `check_plan` violations; then the
cross-solver fields: best proven bound, best objective, whether the optimum is proven, each
method's gap to the best bound (`gap`, an upper bound on its true gap) and to the best plan
found by any method (`gap_inc`, a lower bound), exact-backend agreement, and for greedy misses a
diagnosis (`greedy_miss`, see `diagnose_greedy`).

Methods (`METHODS`): static, greedy_paper (the paper's Algorithm 1: `GreedyRules.paper()`,
k_max 16), greedy (probe's default rules and k_max), greedy_unl (default rules, k_max
unlimited), lp, eplb_addcopies (probe's add-copies EPLB-style baseline, history = the previous
steps' loads of the layer; named "eplb" in results written before method "eplb" became DeepSeek's
EPLB, which re-packs the layout and so plans a different problem: not benchmarked here), cpsat,
highs. The
exact backends run one thread each so that `--workers` processes share the CPUs predictably.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from probe.planner.check import check_plan, evaluate_plan, rank_times, transfer_times
from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.solve import solve
from solvers_bench.instances import InstanceSpec, build_problem

__all__ = ["EXACT", "METHODS", "diagnose_greedy", "load_results", "machine_info",
           "run_instance", "run_all"]

# name -> (planner method, fixed options)
METHODS: dict[str, tuple[str, dict]] = {
    "static": ("static", {}),
    "greedy_paper": ("greedy", {"rules": GreedyRules.paper(k_max=16)}),
    "greedy": ("greedy", {}),
    "greedy_unl": ("greedy", {"rules": GreedyRules(k_max=0)}),
    "lp": ("lp", {}),
    "eplb_addcopies": ("eplb_addcopies", {}),
    "cpsat": ("cpsat", {"num_workers": 1}),
    "highs": ("highs", {"threads": 1}),
}
EXACT = ("cpsat", "highs")
# Two "optimal" objectives agree when within this relative tolerance (CP-SAT rounds times to
# quanta of 1e-4 of the smallest coefficient; HiGHS stops at mip_rel_gap 1e-6).
AGREE_TOL = 1e-4
# A plan whose objective is below the best proven bound by more than this is a bound error.
BOUND_TOL = 1e-6
# Greedy "misses" when it is this much worse than the best plan found.
MISS_GAP = 0.03


def _warm_up() -> None:
    """JIT-compile the greedy kernel once per process, before anything is timed."""
    from probe.planner.cost import CostModel

    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    prob = BalanceProblem.from_load(np.array([[6, 0], [2, 0]]), cost, slots=1, window=1.0)
    solve(prob, "greedy")
    solve(prob, "lp")


def _run_method(problem: BalanceProblem, name: str, time_limit: float,
                history: np.ndarray | None) -> tuple[dict, Plan | None]:
    method, options = METHODS[name]
    options = dict(options)
    if name == "eplb_addcopies" and history is not None:
        options["history"] = history
    limit = time_limit if name in EXACT or name == "lp" else None
    try:
        result = solve(problem, method, time_limit=limit, check=False, **options)
    except Exception as err:  # a crashing backend is a result to report, not a stop
        return {"status": "crash", "objective": None, "bound": None, "wall": None,
                "message": f"{type(err).__name__}: {err}"[:300], "violations": []}, None
    row = {"status": result.status, "bound": result.bound, "wall": result.wall_time,
           "message": result.message[:300]}
    if result.plan is None:
        row.update(objective=None, violations=[])
        return row, None
    violations = check_plan(problem, result.plan)
    metrics = evaluate_plan(problem, result.plan)
    row.update(objective=metrics.objective, imbalance=metrics.imbalance,
               compute_skew=metrics.compute_skew, bytes_moved=metrics.bytes_moved,
               exposed_transfer=metrics.exposed_transfer,
               max_traffic_bytes=metrics.max_traffic_bytes, num_replicas=metrics.num_replicas,
               violations=violations[:5], num_violations=len(violations))
    return row, result.plan


def _replica_list(plan: Plan) -> list[list[int]]:
    return [[int(g), int(e), int(plan.sources[g, e])] for g, e in np.argwhere(plan.replicas)]


def _away_from_holding_source(problem: BalanceProblem, plan: Plan) -> int:
    """Tokens that leave a source rank which itself holds their expert."""
    holds = problem.home | plan.replicas  # [G, E]
    sent = plan.assignment.sum(axis=2) - np.einsum("ses->se", plan.assignment)  # [S, E]
    return int((sent * holds).sum())


def diagnose_greedy(problem: BalanceProblem, greedy: Plan, best: Plan,
                    greedy_unl_objective: float | None) -> dict:
    """Why greedy is worse than the best plan: facts that point at the move it did not see.

    k_max_bound: unlimited moves do better than k_max = 16.
    same_replicas: the best plan uses no replica greedy lacks (the loss is in token placement).
    slots_full / window_full: ranks where greedy used every slot / >= 90% of a window side.
    best_moves_holding_source: tokens the best plan sends away from a source holding the expert
    (greedy keeps those local: its pool skips them).
    bottlenecks: greedy's slowest rank and the ranks the best plan's extra replicas sit on.
    """
    g_comp, g_comm = rank_times(problem, greedy.assignment)
    b_comp, b_comm = rank_times(problem, best.assignment)
    g_time, b_time = g_comp + g_comm, b_comp + b_comm
    recv, send = transfer_times(problem, greedy)
    window = np.maximum(problem.window, 1e-300)
    only_best = best.replicas & ~greedy.replicas
    only_greedy = greedy.replicas & ~best.replicas
    greedy_obj = float(g_time.max())
    return {
        "greedy_objective": greedy_obj,
        "best_objective": float(b_time.max()),
        "k_max_bound": bool(greedy_unl_objective is not None
                            and greedy_unl_objective < greedy_obj * (1 - 1e-9)),
        "greedy_replicas": _replica_list(greedy),
        "best_replicas": _replica_list(best),
        "replicas_only_in_best": int(only_best.sum()),
        "replicas_only_in_greedy": int(only_greedy.sum()),
        "same_replicas": bool(not only_best.any()),
        "slots_full": [int(g) for g in np.flatnonzero(
            (greedy.replicas.sum(axis=1) >= problem.slots) & (problem.slots > 0))],
        "window_full": [int(g) for g in np.flatnonzero(np.maximum(recv, send) >= 0.9 * window)],
        "greedy_slowest_rank": int(np.argmax(g_time)),
        "greedy_rank_time": [float(x) for x in g_time],
        "best_rank_time": [float(x) for x in b_time],
        "greedy_comm_share": float(g_comm[np.argmax(g_time)] / max(greedy_obj, 1e-300)),
        "greedy_moves_holding_source": _away_from_holding_source(problem, greedy),
        "best_moves_holding_source": _away_from_holding_source(problem, best),
        "best_active_experts_on_slowest": int((best.assignment.sum(axis=0).T > 0)
                                              [int(np.argmax(g_time))].sum()),
        "greedy_active_experts_on_slowest": int((greedy.assignment.sum(axis=0).T > 0)
                                                [int(np.argmax(g_time))].sum()),
    }


def run_instance(spec: InstanceSpec, time_limit: float,
                 methods: Iterable[str] = tuple(METHODS)) -> dict:
    """Solve one instance with every method; the JSON-able record described in the module doc."""
    start = time.perf_counter()
    problem, history = build_problem(spec)
    rows: dict[str, dict] = {}
    plans: dict[str, Plan] = {}
    for name in methods:
        row, plan = _run_method(problem, name, time_limit, history)
        rows[name] = row
        if plan is not None:
            plans[name] = plan
    record = {"id": spec.id, **spec.as_dict(), "time_limit": time_limit,
              "tokens": problem.total_tokens, "methods": rows, "anomalies": []}
    anomalies = record["anomalies"]

    # Best proven bound. An exact backend that says "optimal" proves its objective (to its own
    # tolerance) even where it reports no usable bound; that case is noted as an anomaly.
    bounds = []
    for name in EXACT:
        row = rows.get(name)
        if not row or row["objective"] is None:
            continue
        bound = row["bound"]
        if row["status"] == "optimal":
            if bound is None or bound < row["objective"] * (1 - 1e-3):
                anomalies.append(f"{name} says optimal but reports bound {bound} for objective "
                                 f"{row['objective']:.6g}")
            bound = row["objective"] * (1 - AGREE_TOL) if bound is None else max(
                bound, row["objective"] * (1 - AGREE_TOL))
        if bound is not None and math.isfinite(bound):
            bounds.append(bound)
    best_bound = max(bounds) if bounds else None
    feasible = {n: r["objective"] for n, r in rows.items()
                if r["objective"] is not None and not r["violations"]}
    best_name = min(feasible, key=feasible.get) if feasible else None
    best_obj = feasible[best_name] if best_name else None
    proven = any(rows.get(n, {}).get("status") == "optimal" for n in EXACT)
    record.update(best_bound=best_bound, best_objective=best_obj, best_method=best_name,
                  proven=proven,
                  certified_gap=(None if best_bound is None or not best_obj else
                                 max(0.0, (best_obj - best_bound) / best_obj)))

    for name, row in rows.items():
        if row["violations"]:
            anomalies.append(f"INFEASIBLE PLAN from {name}: {row['violations'][0]}")
        if row["status"] in ("crash", "error"):
            anomalies.append(f"{name} {row['status']}: {row['message']}")
        obj = row["objective"]
        row["gap"] = (None if obj is None or best_bound is None else
                      max(0.0, (obj - best_bound) / obj) if obj > 0 else 0.0)
        row["gap_inc"] = (None if obj is None or best_obj is None else
                          (obj - best_obj) / obj if obj > 0 else 0.0)
        if obj is not None and best_bound is not None and not row["violations"] \
                and obj < best_bound * (1 - BOUND_TOL) - 1e-15:
            anomalies.append(f"BOUND VIOLATED: {name} objective {obj:.9g} < best bound "
                             f"{best_bound:.9g}")
    cp, hi = rows.get("cpsat"), rows.get("highs")
    record["exact_agree"] = None
    if cp and hi and cp["status"] == "optimal" and hi["status"] == "optimal":
        diff = abs(cp["objective"] - hi["objective"]) / max(cp["objective"], hi["objective"])
        record["exact_agree"] = bool(diff <= AGREE_TOL)
        if diff > AGREE_TOL:
            anomalies.append(f"EXACT DISAGREE: cpsat {cp['objective']:.9g} vs highs "
                             f"{hi['objective']:.9g} (rel {diff:.2e}), both 'optimal'")
    static = rows.get("static")
    record["ir_static"] = static.get("imbalance") if static else None

    greedy = rows.get("greedy")
    if (greedy and "greedy" in plans and best_name and greedy["gap_inc"] is not None
            and greedy["gap_inc"] > MISS_GAP):
        unl = rows.get("greedy_unl", {}).get("objective")
        record["greedy_miss"] = diagnose_greedy(problem, plans["greedy"], plans[best_name], unl)
        record["greedy_miss"]["best_method"] = best_name
    record["wall_instance"] = time.perf_counter() - start
    return record


def _worker(args: tuple[dict, float, tuple[str, ...]]) -> dict:
    spec_dict, time_limit, methods = args
    spec = InstanceSpec.from_dict(spec_dict)
    try:
        return run_instance(spec, time_limit, methods)
    except Exception as err:  # keep the run going; the record says what broke
        return {"id": spec.id, **spec_dict, "fatal": f"{type(err).__name__}: {err}"[:500],
                "methods": {}, "anomalies": [f"FATAL: {type(err).__name__}: {err}"[:500]]}


# Results written before method "eplb" became DeepSeek's EPLB call the add-copies baseline
# "eplb" (e.g. the committed results/solvers_bench); load_results renames them.
LEGACY_NAMES = {"eplb": "eplb_addcopies"}


def load_results(path: Path) -> list[dict]:
    """Records of a JSONL results file (a torn last line from an interrupted run is skipped;
    legacy method names renamed with LEGACY_NAMES)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            methods = record.get("methods")
            if isinstance(methods, dict):
                for old, new in LEGACY_NAMES.items():
                    if old in methods and new not in methods:
                        methods[new] = methods.pop(old)
            records.append(record)
    return records


def machine_info() -> dict:
    """What ran the benchmark (for the report)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    # PROBE_GIT_COMMIT names the commit where the tree's .git cannot be trusted (a copy sent
    # to another machine, whose .git may be stale).
    commit = os.environ.get("PROBE_GIT_COMMIT")
    try:
        commit = commit or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git_commit": commit, "cpu": cpu, "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in load]}


def run_all(specs: list[InstanceSpec], out_jsonl: Path, *, time_limit: float, workers: int = 1,
            methods: Iterable[str] = tuple(METHODS), resume: bool = True,
            on_result: Callable[[dict], None] | None = None,
            max_seconds: float | None = None) -> list[dict]:
    """Run `specs`, appending one line per finished instance to `out_jsonl`; returns all records.

    resume: skip the instances already in the file (an interrupted run continues where it
    stopped); off, an existing file is an error. Records of instances outside `specs` stay in
    the file (a different grid run into the same folder adds to it, it never deletes) but are
    not returned. on_result(record) is called after each instance.
    max_seconds: stop after this many seconds, also while waiting for a slow solve (a solver
    that overruns its time limit, say): the unfinished instances are dropped, the worker
    processes are killed, what is written stays.
    """
    started = time.perf_counter()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    methods = tuple(methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    if out_jsonl.exists() and not resume:
        raise FileExistsError(f"{out_jsonl} exists and resume is off: move it away or choose "
                              "another output folder (nothing was overwritten)")
    kept = load_results(out_jsonl)
    wanted = {s.id for s in specs}
    done = [r for r in kept if r.get("id") in wanted]
    done_ids = {r["id"] for r in done}
    todo = [(s.as_dict(), time_limit, methods) for s in specs if s.id not in done_ids]
    records = list(done)
    # Rewrite the kept records (those of other grids too) first, so that a torn last line of
    # an interrupted run cannot stay.
    with out_jsonl.open("w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    with out_jsonl.open("a") as f:
        if workers == 1:
            _warm_up()
            results = map(_worker, todo)
            pool = None
        else:
            _warm_up()  # compile once here: the forked workers inherit the compiled kernels
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_warm_up)
            results = pool.imap_unordered(_worker, todo, chunksize=1)
        try:
            for _ in range(len(todo)):
                left = None if max_seconds is None else max_seconds - (
                    time.perf_counter() - started)
                if left is not None and left <= 0:
                    break
                try:
                    record = (next(results) if pool is None or left is None
                              else results.next(timeout=left))
                except multiprocessing.TimeoutError:
                    break
                f.write(json.dumps(record) + "\n")
                f.flush()
                records.append(record)
                if on_result is not None:
                    on_result(record)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return records
