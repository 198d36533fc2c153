"""`probe plan TRACE ...`: plan one step of a routing trace and show the plan and its metrics.

`register(app)` adds the `plan` command to the main `probe` typer app.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from probe.placement import sharded_home
from probe.planner.check import evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.greedy_rules import GreedyRules
from probe.planner.lite import LiteRules
from probe.planner.layers import attention_time, plan_step
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.solve import METHODS
from probe.planner.static import static_plan
from probe.specs import resolve_hardware, resolve_model
from probe.tables import fit_table

__all__ = ["plan_cmd", "register", "resolve_spec_option"]


def register(app: typer.Typer) -> None:
    """Add the `plan` command to the main app."""
    app.command("plan")(plan_cmd)


def _parse_window(text: str) -> str | float:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"expected 'auto' or seconds, got {text!r}",
                                 param_hint="--window") from None
    if not value >= 0:
        raise typer.BadParameter(f"window must be >= 0 seconds, got {text}",
                                 param_hint="--window")
    return value


def _check_seconds(value: float | None, option: str, *, positive: bool) -> None:
    """BadParameter naming `option` unless value is None or a number >= 0 (> 0 if positive;
    NaN never)."""
    if value is None:
        return
    if math.isnan(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise typer.BadParameter(f"must be {bound}, got {value}", param_hint=option)


def moved_tokens(problem: BalanceProblem, plan: Plan) -> int:
    """Tokens processed somewhere other than in the static plan."""
    diff = plan.assignment - static_plan(problem).assignment
    return int(np.abs(diff).sum() // 2)


def plan_cmd(
    trace: Annotated[Path, typer.Argument(help="routing trace file (probe trace format)")],
    method: Annotated[str, typer.Option("--method", "-m",
                                        help=f"one of {', '.join(sorted(METHODS))} (eplb: "
                                             "DeepSeek's EPLB re-packed from the previous 16 "
                                             "steps; eplb_addcopies: copies added to the home "
                                             "layout)")] = "greedy",
    step: Annotated[int, typer.Option(help="step of the trace (negative counts from the end)")] = 0,
    layer: Annotated[int | None, typer.Option(help="one MoE layer in detail (default: all, "
                                                   "one line each)")] = None,
    model: Annotated[str, typer.Option(help="ModelSpec preset or JSON file")] = "gpt-oss-120b",
    hardware: Annotated[str, typer.Option(help="HardwareSpec preset or JSON file (resized to "
                                               "the trace's ranks)")] = "h200x8",
    slots: Annotated[int, typer.Option(min=0, help="extra replica slots per rank")] = 3,
    window: Annotated[str, typer.Option(help="'auto' (each rank's static expert compute + "
                                             "attention) or seconds")] = "auto",
    attention_us: Annotated[float | None, typer.Option(
        help="attention time in the auto window, microseconds, >= 0 (default: estimated from "
             "the specs)")] = None,
    k_max: Annotated[int, typer.Option(min=0, help="greedy: most moves (0 = until no gain)")]
    = 16,
    paper: Annotated[bool, typer.Option(
        "--paper", help="greedy: the paper's Algorithm 1 rules instead of probe's defaults")]
    = False,
    also_paper: Annotated[bool, typer.Option(
        "--also-paper", help="greedy: also run the paper's rules and keep the better plan "
                             "(about twice the time)")] = False,
    time_limit: Annotated[float | None, typer.Option(help="seconds per layer solve, > 0")]
    = None,
    rounds: Annotated[int, typer.Option(min=1, help="lite: most rounds of moves")] = 16,
    hot_sixteenths: Annotated[int, typer.Option(
        min=1, max=16, help="lite: a rank is hot above mean + (1 - H/16) (max - mean); 16: "
                            "every rank above the mean (fewer rounds at ep=64 / 256 experts, "
                            "results/lite_rounds)")] = 12,
) -> None:
    """Plan one step of TRACE with METHOD and print the replicas, moved tokens and metrics."""
    from probe.traces.trace import RoutingTrace

    console = Console()
    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of: "
                                 f"{', '.join(sorted(METHODS))}", param_hint="--method")
    win = _parse_window(window)
    _check_seconds(attention_us, "--attention-us", positive=False)
    _check_seconds(time_limit, "--time-limit", positive=True)
    if paper and also_paper:
        raise typer.BadParameter("--paper and --also-paper exclude each other",
                                 param_hint="--also-paper")
    spec_model = resolve_spec_option(resolve_model, model, "--model")
    spec_hw = resolve_spec_option(resolve_hardware, hardware, "--hardware")
    try:
        routing = RoutingTrace.load(trace)
    except (ValueError, FileNotFoundError, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    if layer is not None and not 0 <= layer < routing.num_layers:
        raise typer.BadParameter(f"layer {layer} out of range (trace has {routing.num_layers})",
                                 param_hint="--layer")
    if not -routing.num_steps <= step < routing.num_steps:
        raise typer.BadParameter(f"step {step} out of range (trace has {routing.num_steps})",
                                 param_hint="--step")
    cost = CostModel.from_specs(spec_model, spec_hw, num_ranks=routing.num_ranks)
    attention_s = (attention_time(spec_model, spec_hw) if attention_us is None
                   else attention_us * 1e-6)
    home = sharded_home(routing.num_experts, routing.num_ranks)
    options = {}
    if method in ("greedy", "greedy_ref"):
        options["rules"] = (GreedyRules.paper(k_max=k_max) if paper
                            else GreedyRules(k_max=k_max, also_paper=also_paper))
    elif method in ("lite", "lite_ref"):
        options["rules"] = LiteRules(max_rounds=rounds, hot_sixteenths=hot_sixteenths)
    planned: list[BalanceProblem] = []  # the problems solved ("eplb": DeepSeek's layout)
    results = plan_step(routing, step, cost=cost, home=home, slots=slots, window=win,
                        method=method, attention_s=attention_s, time_limit=time_limit,
                        planned=planned, **options)
    loads = routing.load_counts(steps=[step])[0]  # [L, S, E]
    problems = [BalanceProblem.from_load(load, cost, slots, win, home, attention_time=attention_s)
                for load in loads]

    console.print(f"[bold]{trace.name}[/bold] step {step}: {routing.num_ranks} ranks, "
                  f"{routing.num_experts} experts, top-{routing.top_k}; {spec_model.name} on "
                  f"{spec_hw.name}; method {method}, {slots} slots/rank, window {window}")
    if layer is None:
        console.print(fit_table(_layers_table(problems, results, planned)))
    else:
        problem, result = problems[layer], results[layer]
        console.print(fit_table(_metrics_table(problem, result, layer, planned[layer])))
        if result.plan is not None:
            console.print(fit_table(_replicas_table(planned[layer], result.plan)))
        if result.message:
            console.print(f"{result.status}: {result.message}")


def resolve_spec_option(resolve, name: str, option: str):
    """resolve(name) (resolve_model or resolve_hardware: a preset name or a JSON file), with any
    error turned into a usage error (typer.BadParameter) naming `option`."""
    try:
        return resolve(name)
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise typer.BadParameter(str(err).splitlines()[0] if str(err) else repr(err),
                                 param_hint=option) from None


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def _layers_table(problems: list[BalanceProblem], results: list[SolveResult],
                  planned: list[BalanceProblem] | None = None) -> Table:
    """static on `problems` -> each result's plan scored on the problem it solved (`planned`,
    default the same)."""
    planned = problems if planned is None else planned
    table = Table(title="per layer: static -> plan (obj = eq. 8; times in microseconds)")
    for col in ("layer", "IR", "IR plan", "obj", "obj plan", "repl", "moved", "solve",
                "status"):
        table.add_column(col, justify="right")
    for i, (problem, result, solved) in enumerate(zip(problems, results, planned, strict=True)):
        base = evaluate_plan(problem, static_plan(problem))
        if result.plan is None:
            table.add_row(str(i), f"{base.imbalance:.3f}", "-", _us(base.objective), "-", "-",
                          "-", _us(result.wall_time), result.status)
            continue
        metrics = evaluate_plan(solved, result.plan)
        table.add_row(str(i), f"{base.imbalance:.3f}", f"{metrics.imbalance:.3f}",
                      _us(base.objective), _us(metrics.objective), str(metrics.num_replicas),
                      str(moved_tokens(solved, result.plan)), _us(result.wall_time),
                      result.status)
    return table


def _metrics_table(problem: BalanceProblem, result: SolveResult, layer: int,
                   solved: BalanceProblem | None = None) -> Table:
    table = Table(title=f"layer {layer}: metrics (times in microseconds)")
    table.add_column("metric")
    table.add_column("static", justify="right")
    table.add_column(result.method, justify="right")
    base = evaluate_plan(problem, static_plan(problem)).as_dict()
    solved = problem if solved is None else solved
    plan = evaluate_plan(solved, result.plan).as_dict() if result.plan is not None else {}
    rows = [("objective (eq. 8)", "objective", _us), ("IR (tokens)", "imbalance", "{:.3f}".format),
            ("compute skew", "compute_skew", "{:.3f}".format),
            ("max compute", "max_compute", _us), ("max communication", "max_comm", _us),
            ("max traffic (MB)", "max_traffic_bytes", lambda b: f"{b / 1e6:.2f}"),
            ("replicas", "num_replicas", str),
            ("bytes moved (MB)", "bytes_moved", lambda b: f"{b / 1e6:.1f}"),
            ("exposed transfer", "exposed_transfer", _us)]
    for label, key, fmt in rows:
        table.add_row(label, fmt(base[key]), fmt(plan[key]) if key in plan else "-")
    table.add_row("solve time", "", _us(result.wall_time))
    return table


def _replicas_table(problem: BalanceProblem, plan: Plan) -> Table:
    table = Table(title=f"replicas ({plan.num_replicas}); moved tokens "
                        f"{moved_tokens(problem, plan)}")
    for col in ("rank", "expert", "copied from", "tokens there", "from sources"):
        table.add_column(col, justify="right")
    tokens = plan.tokens_per_rank_expert()  # [G, E]
    for g, e in np.argwhere(plan.replicas):
        sources = np.flatnonzero(plan.assignment[:, e, g])
        table.add_row(str(g), str(e), str(plan.sources[g, e]), str(tokens[g, e]),
                      ", ".join(map(str, sources)) or "-")
    return table
