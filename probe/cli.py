"""The `probe` command: one app, with sub-commands registered by each package."""

from __future__ import annotations

import time

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from probe.tables import fit_table

app = typer.Typer(
    help="PROBE: predictive expert balancing for MoE inference under expert parallelism.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
# Experts of the demo's synthetic trace (top-4 of 128).
DEMO_EXPERTS = 128


@app.callback()
def _root() -> None:
    """PROBE: predictive expert balancing for MoE inference under expert parallelism."""


# Installed packages add sub-commands under this entry-point group: each entry is a
# `register(app)` function (solvers_bench's `bench solvers` is one, see pyproject.toml).
COMMANDS_GROUP = "probe.commands"


def _register_all() -> None:
    from importlib.metadata import entry_points

    from probe.advise_cli import register as register_advise
    from probe.engines_cli import register as register_placement
    from probe.planner.cli import register as register_planner
    from probe.predictor.cli import register as register_predictor
    from probe.runtime.checkpoint_cli import register as register_checkpoint
    from probe.runtime.cli import register as register_runtime
    from probe.sim.cli import register as register_sim
    from probe.traces.cli import register as register_traces

    for register in (register_traces, register_planner, register_sim, register_predictor,
                     register_runtime, register_checkpoint, register_placement,
                     register_advise):
        register(app)
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(app)


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="Smaller trace and shorter exact solve."),
    model: str = typer.Option("gpt-oss-120b", help="ModelSpec preset or JSON file."),
    hardware: str = typer.Option("h200x8", help="HardwareSpec preset or JSON file."),
    slots: int = typer.Option(3, min=0, help="Extra replica slots per rank."),
    seed: int = typer.Option(0, min=0, help="Seed of the synthetic workload."),
) -> None:
    """Generate the built-in decode workload and show what probe does with it.

    1. a synthetic decode trace (ep=8, top-4 of 128 experts) and its imbalance under static EP;
    2. one layer of one step planned by static EP, the greedy (Algorithm 1 with probe's rules),
       the LP heuristic and the exact CP-SAT MILP, each plan re-checked by the independent
       checker;
    3. greedy over every layer of every step: mean imbalance before and after.
    """
    from probe.planner import BalanceProblem, CostModel, check_plan, evaluate_plan, solve
    from probe.planner.cli import resolve_spec_option
    from probe.specs import resolve_hardware, resolve_model
    from probe.traces import generate, stats

    model_spec = resolve_spec_option(resolve_model, model, "--model")
    hw = resolve_spec_option(resolve_hardware, hardware, "--hardware")
    if hw.num_ranks > DEMO_EXPERTS:
        raise typer.BadParameter(f"{hw.name} has {hw.num_ranks} ranks; the demo's trace has "
                                 f"{DEMO_EXPERTS} experts, so at most {DEMO_EXPERTS} ranks",
                                 param_hint="--hardware")
    num_steps = 12 if quick else 40
    start = time.perf_counter()
    trace = generate("decode", num_steps=num_steps, num_layers=4 if quick else 8,
                     num_experts=DEMO_EXPERTS, top_k=4, num_ranks=hw.num_ranks, seed=seed)
    summary = stats(trace)
    console.print(
        f"[bold]1. Trace[/bold]: synthetic decode, {trace.num_steps} steps x "
        f"{trace.tokens_in_step(0)} tokens, {trace.num_layers} MoE layers, top-{trace.top_k} of "
        f"{trace.num_experts} experts, {trace.num_ranks} source ranks "
        f"({time.perf_counter() - start:.1f} s to generate)")
    ir = summary["ir_overall"]
    console.print(f"   static EP imbalance ratio (max/mean tokens per rank): "
                  f"mean {ir['mean']:.2f}, "
                  f"p10 {ir['p10']:.2f}, p90 {ir['p90']:.2f}, max {ir['max']:.2f}")

    cost = CostModel.from_specs(model_spec, hw)
    counts = trace.load_counts()  # [N, L, S, E]
    step, layer = np.unravel_index(np.argmax(summary["ir"]), summary["ir"].shape)
    problem = BalanceProblem.from_load(counts[step, layer], cost, slots)  # window "auto"
    console.print(f"\n[bold]2. One layer[/bold] (step {step}, layer {layer}, the most imbalanced): "
                  f"{model_spec.name} on {hw.name}, {slots} replica slots per rank, hiding window "
                  f"{problem.window.max() * 1e6:.0f} us")
    table = Table("method", "status", "layer\nus", "IR", "skew", "repl", "moved\nMB", "gap",
                  "solve\ntime", "ok")
    solve(problem, "greedy")  # compile the Numba kernel before timing anything
    exact_limit = 5.0 if quick else 20.0
    for method, limit in (("static", None), ("greedy", None), ("lp", 1.0), ("cpsat", exact_limit)):
        result = solve(problem, method, time_limit=limit)
        metrics = evaluate_plan(problem, result.plan)
        feasible = "yes" if not check_plan(problem, result.plan) else "NO"
        gap = "-" if result.gap is None else f"{100 * result.gap:.1f}%"
        table.add_row(method, result.status, f"{metrics.objective * 1e6:.1f}",
                      f"{metrics.imbalance:.3f}", f"{metrics.compute_skew:.3f}",
                      str(metrics.num_replicas), f"{metrics.bytes_moved / 1e6:.0f}", gap,
                      _fmt_seconds(result.wall_time), feasible)
    console.print(fit_table(table))

    console.print(f"\n[bold]3. Every layer of every step[/bold] ({trace.num_steps} x "
                  f"{trace.num_layers} plans):")
    before, after, objective_ratio, wall = [], [], [], []
    for n in range(trace.num_steps):
        for ly in range(trace.num_layers):
            prob = BalanceProblem.from_load(counts[n, ly], cost, slots)
            base = evaluate_plan(prob, solve(prob, "static").plan)
            result = solve(prob, "greedy")
            metrics = evaluate_plan(prob, result.plan)
            before.append(base.imbalance)
            after.append(metrics.imbalance)
            objective_ratio.append(base.objective / metrics.objective)
            wall.append(result.wall_time)
    console.print(f"   mean IR static {np.mean(before):.2f} -> greedy {np.mean(after):.2f}; "
                  f"layer time {np.mean(objective_ratio):.2f}x faster on average; "
                  f"median greedy solve() {_fmt_seconds(float(np.median(wall)))} per layer")


def _fmt_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.1f} s"


def main() -> None:
    _register_all()
    app()


if __name__ == "__main__":
    main()
