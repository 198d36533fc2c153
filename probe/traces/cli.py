"""`probe trace ...` commands: gen, stats, convert (engine records, probe.traces.engines).

`register(app)` adds the `trace` sub-app to the main `probe` typer app; `python -m probe.traces`
runs the same commands on their own (`python -m probe.traces trace stats FILE`).
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from probe.placement import sharded_home
from probe.tables import fit_table
from probe.traces.stats import stats
from probe.traces.synthetic import WORKLOADS, generate
from probe.traces.trace import RoutingTrace

__all__ = ["register", "render_stats"]

trace_app = typer.Typer(help="Routing traces: generate, inspect, convert.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the `trace` command group (gen, stats, convert) to the main app."""
    app.add_typer(trace_app, name="trace")


def _parse_knobs(items: list[str]) -> dict:
    knobs = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        key, value = item.split("=", 1)
        try:
            knobs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            knobs[key.strip()] = value  # a bare string, e.g. shift_to=math
    return knobs


@trace_app.command("gen")
def gen_cmd(
    workload: Annotated[str, typer.Argument(help=f"one of {', '.join(WORKLOADS)}")],
    out: Annotated[Path, typer.Option("--out", "-o", help="trace file to write")],
    steps: Annotated[int | None, typer.Option(help="steps (default per workload)")] = None,
    tokens: Annotated[int | None, typer.Option(help="tokens per step (default per workload)")
                      ] = None,
    layers: Annotated[int, typer.Option(help="MoE layers L")] = 8,
    experts: Annotated[int, typer.Option(help="experts per layer E")] = 128,
    top_k: Annotated[int, typer.Option("--top-k", help="experts per token K")] = 4,
    ranks: Annotated[int, typer.Option(help="source ranks S the tokens are split over")] = 8,
    seed: Annotated[int, typer.Option(help="traffic seed")] = 0,
    gates: Annotated[bool, typer.Option(help="also store gate weights")] = False,
    knob: Annotated[list[str] | None, typer.Option(
        "--set", help="generator knob KEY=VALUE (JSON value), repeatable")] = None,
) -> None:
    """Generate a seeded synthetic trace and write it to --out."""
    console = Console()
    knobs = _parse_knobs(knob or [])
    if gates:
        knobs["gates"] = True
    start = time.perf_counter()
    with Progress(TextColumn("[bold]generating {task.description}"), BarColumn(),
                  TextColumn("{task.completed:,}/{task.total:,} tokens"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        spec = WORKLOADS.get(workload, {})
        total = (steps or spec.get("num_steps", 0)) * (tokens or spec.get("tokens_per_step", 0))
        task = progress.add_task(workload, total=total)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            trace = generate(workload, num_steps=steps, tokens_per_step=tokens,
                             num_layers=layers, num_experts=experts, top_k=top_k,
                             num_ranks=ranks, seed=seed, progress=report, **knobs)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    elapsed = time.perf_counter() - start
    trace.save(out)
    size = out.stat().st_size / 2**20
    console.print(f"wrote {out} ({size:.1f} MiB): {trace} in {elapsed:.2f} s")


def _bar(value: float, peak: float, width: int = 40) -> str:
    return "#" * (int(round(width * value / peak)) if peak > 0 else 0)


def render_stats(s: dict, console: Console | None = None, *, title: str = "") -> None:
    """Print the dict from probe.traces.stats.stats as rich tables and text bars."""
    console = console or Console()
    head = (f"{s['num_steps']} steps, {s['num_tokens']:,} tokens, L={s['num_layers']}, "
            f"E={s['num_experts']}, K={s['top_k']}, S={s['num_ranks']}; "
            f"static sharded placement at ep={s['ep']}")
    console.print(f"[bold]{title}[/bold] {head}" if title else head)
    table = Table(title="Imbalance ratio (max/mean rank load) per layer, across steps")
    for col in ("layer", "mean", "median", "p10", "p90", "max", "hot-8 Jaccard"):
        table.add_column(col, justify="right")
    for layer, row in enumerate(s["ir_per_layer"]):
        churn = s["churn_per_layer"][layer] if len(s["churn"]) else float("nan")
        table.add_row(str(layer), *(f"{row[k]:.2f}" for k in ("mean", "median", "p10", "p90",
                                                             "max")), f"{churn:.2f}")
    overall = s["ir_overall"]
    churn_all = float(np.mean(s["churn"])) if len(s["churn"]) else float("nan")
    table.add_row("all", *(f"{overall[k]:.2f}" for k in ("mean", "median", "p10", "p90", "max")),
                  f"{churn_all:.2f}", style="bold")
    console.print(fit_table(table))
    for phase in ("prefill", "decode"):
        if f"ir_{phase}" in s:
            p = s[f"ir_{phase}"]
            console.print(f"{phase} steps: IR mean {p['mean']:.2f}, p10 {p['p10']:.2f}, "
                          f"p90 {p['p90']:.2f}, max {p['max']:.2f}")
    for tag, p in s.get("ir_by_tag", {}).items():
        console.print(f"steps tagged {tag!r}: IR mean {p['mean']:.2f}, p10 {p['p10']:.2f}, "
                      f"p90 {p['p90']:.2f}, max {p['max']:.2f}")
    console.print(f"share of (step, layer) with IR in [1.4, 2.3]: {s['frac_ir_in_1.4_2.3']:.0%};"
                  f" IR > 2.6: {s['frac_ir_above_2.6']:.1%}")
    console.print("Expert load / mean expert load, over all (step, layer, expert):")
    edges, counts = s["load_hist"]["edges"], s["load_hist"]["counts"]
    total, peak = max(int(np.sum(counts)), 1), max(int(np.max(counts)), 1)
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        label = f"[{lo:g}, {hi:g})" if np.isfinite(hi) else f">= {lo:g}"
        console.print(f"  {label:>12} {c / total:6.1%} {_bar(c, peak)}", highlight=False)
    console.print(f"Hot-expert churn: mean Jaccard overlap of the top-{s['top']} experts between "
                  f"consecutive steps = {churn_all:.2f} (1 = same hot set)")
    if "churn_min" in s:
        console.print(f"Largest change at step {s['churn_min']['step']}: Jaccard "
                      f"{s['churn_min']['jaccard']:.2f}")


@trace_app.command("stats")
def stats_cmd(
    path: Annotated[Path, typer.Argument(help="trace file")],
    ranks: Annotated[int | None, typer.Option(
        help="EP ranks G of the static placement (default: the trace's source ranks)")] = None,
    top: Annotated[int, typer.Option(help="size of the hot-expert set for churn")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")
                       ] = False,
) -> None:
    """Per-layer imbalance under static sharded placement, load histogram, hot-expert churn."""
    console = Console()
    try:
        trace = RoutingTrace.load(path)
        home = sharded_home(trace.num_experts, ranks or trace.num_ranks)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    s = stats(trace, home, top=top)
    if as_json:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()
               if k not in ("ir", "churn")}
        out["load_hist"] = {"edges": [e if np.isfinite(e) else "inf" for e in
                                      s["load_hist"]["edges"]],
                            "counts": s["load_hist"]["counts"].tolist()}
        typer.echo(json.dumps(out, indent=1))
        return
    render_stats(s, console, title=str(path))


class Source(str, Enum):
    routed_experts = "routed-experts"
    vllm_eplb = "vllm-eplb"
    sglang_dump = "sglang-dump"
    megatron = "megatron"
    trtllm_stats = "trtllm-stats"


@trace_app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="input file, or directory (trtllm-stats)")],
    out: Annotated[Path, typer.Argument(help="trace file to write")],
    source: Annotated[Source, typer.Option(
        "--from", help="input format: routed-experts (.npy/.npz/.pt/.safetensors [T, L, K]), "
        "vllm-eplb (load-history JSON, or a load window .pt/.npy), sglang-dump (expert-"
        "distribution recorder .pt: stat, per_pass or per_token), megatron (routing record "
        ".pt), trtllm-stats (expert-statistics directory); docs/traces.md has the layouts")],
    experts: Annotated[int | None, typer.Option(
        help="experts per layer E (default: from the file, else max id + 1)")] = None,
    ranks: Annotated[int | None, typer.Option(
        help="source ranks S (routed-experts, megatron, vllm-eplb: default 8; sglang-dump "
        "stat: default 1; per_pass/per_token and trtllm-stats take the file's ranks)")] = None,
    tokens_per_step: Annotated[int | None, typer.Option(
        help="routed-experts, megatron: cut the tokens into steps of this size (default: one "
        "step)")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="experts per token K of count-only inputs (vllm-eplb: default 8; "
        "sglang-dump stat/per_pass: required; trtllm-stats: default from meta_info.json)")
                     ] = None,
) -> None:
    """Convert an engine's routing record (vLLM, SGLang, Megatron, TensorRT-LLM) to a trace."""
    from probe.traces.engines import (
        read_megatron_routing,
        read_sglang_dump,
        read_trtllm_expert_stats,
        read_vllm_eplb,
        read_vllm_routed_experts,
    )

    console = Console()
    try:
        if source is Source.routed_experts:
            trace = read_vllm_routed_experts(src, num_experts=experts, num_ranks=ranks or 8,
                                             tokens_per_step=tokens_per_step)
        elif source is Source.vllm_eplb:
            trace = read_vllm_eplb(src, top_k=top_k or 8, num_ranks=ranks or 8,
                                   num_experts=experts)
        elif source is Source.sglang_dump:
            trace = read_sglang_dump(src, top_k=top_k, num_experts=experts, num_ranks=ranks)
        elif source is Source.megatron:
            trace = read_megatron_routing(src, num_experts=experts, num_ranks=ranks or 8,
                                          tokens_per_step=tokens_per_step)
        else:
            trace = read_trtllm_expert_stats(src, top_k=top_k)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    trace.save(out)
    console.print(f"wrote {out}: {trace}")


def main() -> None:
    """Entry point of `python -m probe.traces`."""
    app = typer.Typer(help="probe routing traces", no_args_is_help=True)
    register(app)
    app()
