"""The lp heuristic's gap to proven optima, against greedy's, and its time per instance size.

    PYTHONPATH=. python benchmarks/lp_gap.py [--out results/lp_gap.md] [--repeats 3]

Instances: every non-fatal record of the solvers_bench result files (default:
results/solvers_bench/results.jsonl) is rebuilt from its recipe
(`solvers_bench.instances.build_problem`) and planned by greedy (default options) and the lp
heuristic (`solve_lp(...)`), both with the code at HEAD. The earlier single-rounding lp
heuristic (`variant="round"`, since removed; results/lp_gap.md compares it with the dives) is
compared by checking out an older revision that still has it and running this script there;
`--baseline REV` times lp.py as committed at REV alongside (REV's lp.py must import against the
planner modules at HEAD).

Gap = (objective - best bound) / objective with the record's best bound, over three sets (as in
solvers_bench/report.py): proven (cpsat or highs reported "optimal"), non-trivial proven
(static is not already optimal, `solvers_bench.report._trivial`) and certified (the best plan
of the run was within `CERTIFIED` of the best bound). The lp and greedy objectives stored in the
records (code of the bench run) are shown as well.

Time: wall time of each call, the median of `--repeats` calls per instance, then the median per
size G x E over all instances of that size (every record, proven or not) and over the
non-trivial proven ones; process CPU time alongside, as the machine may be shared (the load
average is printed). Every plan is checked with check_plan, and lp against greedy.
Writes OUT (markdown) and OUT with .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.planner_speed import _cpu_name
from probe.planner import check_plan, evaluate_plan
from probe.planner.greedy import solve_greedy
from probe.planner.lp import solve_lp
from solvers_bench.instances import InstanceSpec, build_problem
from solvers_bench.report import CERTIFIED, _trivial

SOURCES = ("results/solvers_bench/results.jsonl",)
METHODS = ("greedy", "lp")
TIMED = METHODS + ("lp_base",)
TITLES = {"greedy": "greedy", "lp": "lp (dive)", "rec_greedy": "greedy, bench run",
          "rec_lp": "lp, bench run"}


def _records(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if not rec.get("fatal"):
                    out.append(rec)
    return out


def _proven(rec: dict) -> bool:
    return any(rec["methods"].get(m, {}).get("status") == "optimal" for m in ("cpsat", "highs"))


def _certified(rec: dict) -> bool:
    return rec.get("certified_gap") is not None and rec["certified_gap"] <= CERTIFIED


def _gap(objective: float, bound: float | None) -> float | None:
    if bound is None:
        return None
    return max((objective - bound) / objective, 0.0) if objective > 0 else 0.0


def _timed(func, repeats: int) -> tuple[object, float, float]:
    """(last result, median wall seconds, median process CPU seconds) of `repeats` calls."""
    walls, cpus = [], []
    result = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = func()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return result, float(np.median(walls)), float(np.median(cpus))


def _baseline(rev: str):
    """solve_lp of probe/planner/lp.py as committed at git revision `rev` (for its time)."""
    source = subprocess.run(["git", "show", f"{rev}:probe/planner/lp.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"lp_at_{rev}")
    exec(compile(source, f"lp.py@{rev}", "exec"), module.__dict__)  # noqa: S102
    return module.solve_lp


def run(records: list[dict], repeats: int, base=None) -> list[dict]:
    rows = []
    solve_lp(build_problem(InstanceSpec.from_dict(records[0]))[0])  # JIT and import warm-up
    for rec in records:
        problem, _ = build_problem(InstanceSpec.from_dict(rec))
        calls = {"greedy": lambda p=problem: solve_greedy(p).plan,
                 "lp": lambda p=problem: solve_lp(p).plan}
        if base is not None:
            calls["lp_base"] = lambda p=problem: base(p).plan
        bound = rec.get("best_bound")
        row = {"id": rec["id"], "size": f"{rec['ep']}x{rec['num_experts']}",
               "family": rec["family"], "proven": _proven(rec), "certified": _certified(rec),
               "nontrivial": _proven(rec) and not _trivial(rec), "bound": bound}
        for name in calls:
            plan, wall, cpu = _timed(calls[name], repeats)
            obj = evaluate_plan(problem, plan).objective
            row[name] = {"objective": obj, "gap": _gap(obj, bound), "wall": wall, "cpu": cpu,
                         "feasible": not check_plan(problem, plan),
                         "replicas": plan.num_replicas}
        for name, key in (("rec_greedy", "greedy"), ("rec_lp", "lp")):
            m = rec["methods"][key]
            row[name] = {"objective": m["objective"], "gap": _gap(m["objective"], bound),
                         "wall": m.get("wall")}
        rows.append(row)
    return rows


def _stats(rows: list[dict], name: str) -> dict:
    g = np.array([r[name]["gap"] for r in rows], dtype=float)
    if g.size == 0:
        return {"n": 0}
    return {"n": int(g.size), "median": float(np.median(g)), "p95": float(np.percentile(g, 95)),
            "max": float(g.max()), "mean": float(g.mean()),
            "share_le_1pct": float((g <= 0.01).mean())}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/lp_gap.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--baseline", default=None,
                        help="also time probe/planner/lp.py as committed at this git revision")
    args = parser.parse_args()
    records = _records(args.sources)
    base = _baseline(args.baseline) if args.baseline else None
    load_start = os.getloadavg()
    start = time.time()
    rows = run(records, args.repeats, base)
    elapsed = time.time() - start
    load_end = os.getloadavg()

    sets = {"proven_nontrivial": [r for r in rows if r["nontrivial"]],
            "proven": [r for r in rows if r["proven"]],
            "certified": [r for r in rows if r["certified"]]}
    names = ("rec_greedy", "rec_lp", "greedy", "lp")
    stats = {label: {name: _stats(subset, name) for name in names}
             for label, subset in sets.items()}
    checks = {
        "plans": len(rows) * len(METHODS),
        "infeasible": sum(not r[m]["feasible"] for r in rows for m in METHODS),
        "lp_worse_than_greedy": sum(r["lp"]["objective"] > r["greedy"]["objective"]
                                    * (1 + 1e-12) for r in rows),
        "lp_better_than_greedy": sum(r["lp"]["objective"] < r["greedy"]["objective"]
                                     * (1 - 1e-9) for r in rows),
    }
    sizes = sorted({r["size"] for r in rows}, key=lambda s: tuple(map(int, s.split("x"))))
    times = {}
    for size in sizes:
        entry = {}
        for label, subset in (("all", [r for r in rows if r["size"] == size]),
                              ("nontrivial", [r for r in rows if r["size"] == size
                                              and r["nontrivial"]])):
            if not subset:
                continue
            e = {"n": len(subset)}
            for name in (n for n in TIMED if n in subset[0]):
                e[f"{name}_wall_ms"] = 1e3 * float(np.median([r[name]["wall"] for r in subset]))
                e[f"{name}_cpu_ms"] = 1e3 * float(np.median([r[name]["cpu"] for r in subset]))
            rec_walls = [r["rec_lp"]["wall"] for r in subset if r["rec_lp"]["wall"] is not None]
            e["rec_lp_wall_ms"] = 1e3 * float(np.median(rec_walls)) if rec_walls else None
            if "lp_base_wall_ms" in e:
                e["ratio_lp_base_wall"] = e["lp_wall_ms"] / e["lp_base_wall_ms"]
            entry[label] = e
        times[size] = entry

    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "cpu": _cpu_name(), "cpus": os.cpu_count(),
               "loadavg_start": [round(x, 2) for x in load_start],
               "loadavg_end": [round(x, 2) for x in load_end]}
    command = (f"PYTHONPATH=. python benchmarks/lp_gap.py --out {args.out} "
               f"--repeats {args.repeats}"
               + (f" --baseline {args.baseline}" if args.baseline else "")
               + (f" --sources {' '.join(args.sources)}" if args.sources != list(SOURCES)
                  else ""))
    lines = ["# lp heuristic: gap to proven optima and time per size", "",
             f"Command: `{command}`  ",
             f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, Python {machine['python']}; "
             f"load average (1/5/15 min) {machine['loadavg_start']} at start, "
             f"{machine['loadavg_end']} at the end; {elapsed:.0f} s.", "",
             f"Instances: {len(rows)} solvers_bench records ({', '.join(args.sources)}), "
             "rebuilt from their recipes. *lp* = `solve_lp(problem)` (dives over the "
             "relaxation, per-rank candidate experts, assignment LP per placement, best of); "
             "greedy with its default options; both at HEAD. *bench run* = objectives stored "
             "in the "
             "records (the code of the bench run). Gap = (objective - best bound) / objective; "
             "non-trivial: static is not already optimal; certified: the run's best plan was "
             f"within {100 * CERTIFIED:g}% of its best bound.", ""]
    for label, title in (("proven_nontrivial", "Non-trivial proven instances"),
                         ("proven", "All proven instances"),
                         ("certified", f"Certified instances (gap known within "
                                       f"{100 * CERTIFIED:g}%)")):
        n = stats[label]["lp"]["n"]
        lines += [f"## {title} (n = {n})", "",
                  "| method | median gap | p95 gap | max gap | mean gap | share <= 1% |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in names:
            s = stats[label][name]
            if not s.get("n"):
                continue
            lines.append(f"| {TITLES[name]} | {_pct(s['median'])} | {_pct(s['p95'])} | "
                         f"{_pct(s['max'])} | {_pct(s['mean'])} | "
                         f"{100 * s['share_le_1pct']:.0f}% |")
        lines.append("")
    has_base = base is not None
    lines += ["## Time per size (median ms per call)", "",
              f"Median over instances of the median of {args.repeats} calls; wall (process "
              "CPU). *bench lp* = the lp wall time stored in the records (the bench run's own "
              "timing, on the machine its report names)."
              + (f" *lp at {args.baseline}* = lp.py as committed at {args.baseline}."
                 if has_base else ""), "",
              "| G x E | set | n | greedy | lp |"
              + (f" lp at {args.baseline} | lp / lp at {args.baseline} |" if has_base else "")
              + " bench lp |",
              "|---|---|---:|---:|---:|" + ("---:|---:|" if has_base else "") + "---:|"]
    for size in sizes:
        for label, e in times[size].items():
            bench = "-" if e["rec_lp_wall_ms"] is None else f"{e['rec_lp_wall_ms']:.1f}"
            extra = ""
            if has_base:
                extra = (f" {e['lp_base_wall_ms']:.1f} ({e['lp_base_cpu_ms']:.1f}) | "
                         f"{e['ratio_lp_base_wall']:.2f} |")
            lines.append(
                f"| {size} | {label} | {e['n']} | {e['greedy_wall_ms']:.2f} "
                f"({e['greedy_cpu_ms']:.2f}) | {e['lp_wall_ms']:.1f} "
                f"({e['lp_cpu_ms']:.1f}) |{extra} {bench} |")
    lines += ["", "## Checks", "",
              f"- {checks['plans']} plans, {checks['infeasible']} infeasible (check_plan).",
              f"- lp worse than greedy on {checks['lp_worse_than_greedy']} instances, better "
              f"on {checks['lp_better_than_greedy']}.", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine, "elapsed_s": elapsed, "stats": stats,
         "times": times, "checks": checks, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
