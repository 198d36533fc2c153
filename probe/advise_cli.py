"""`probe advise TRACE`: the best static placement for vLLM / SGLang from a recorded trace.

Prints per-layer and overall tables, writes advise.json, advise.png (when matplotlib is
installed) and the placement file of the chosen engine into --out, and prints the engine's
command line. probe/advise.py has the method.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from probe.tables import fit_table

__all__ = ["register"]

ENGINE_LINES = {
    "sglang": ("python -m sglang.launch_server --model-path MODEL --ep-size {G} "
               "--ep-num-redundant-experts {extra} --init-expert-location {path} "
               "--ep-dispatch-algorithm static  # leave --enable-eplb off to keep this layout"),
    "vllm": ("vLLM loads no start-up placement: {path} holds the three maps under the names "
             "of vLLM's EPLB state (physical_to_logical_map, logical_to_physical_map, "
             "logical_replica_count) for your own loader or policy; serve with "
             "--enable-expert-parallel --enable-eplb --eplb-config "
             "'{{\"num_redundant_experts\": {extra}}}' to get the same slot count "
             "(docs/engines.md)"),
}


def register(app: typer.Typer) -> None:
    """Add the `advise` command to the main app."""
    app.command("advise")(advise_cmd)


def advise_cmd(
    trace_path: Annotated[Path, typer.Argument(metavar="TRACE", help="recorded trace (probe "
                                               "format, or an engine record with --from)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("advise"),
    fmt: Annotated[str, typer.Option(
        "--from", help="TRACE format: probe, sglang-dump, routed-experts, vllm-eplb, "
        "megatron, trtllm-stats (docs/traces.md)")] = "probe",
    top_k: Annotated[int | None, typer.Option("--top-k", help="K for count-only records")
                     ] = None,
    ranks: Annotated[int | None, typer.Option(help="source ranks for records without them")
                     ] = None,
    model: Annotated[str, typer.Option(help="model preset or JSON (probe.specs); its widths "
                                       "cost the trace's experts")] = "gpt-oss-120b",
    hardware: Annotated[str, typer.Option(help="hardware preset or JSON, resized to the "
                                          "trace's ranks")] = "h200x8",
    slots: Annotated[int, typer.Option(min=0, help="extra slots per GPU of the placement "
                                       "file (the replica budget)")] = 1,
    max_slots: Annotated[int, typer.Option(min=0, help="gain curve over 0..max extra slots")
                         ] = 4,
    steps: Annotated[int | None, typer.Option(min=1, help="evaluate at most this many steps, "
                                              "evenly spaced (default all)")] = None,
    milp_steps: Annotated[int, typer.Option(min=1, help="steps whose mean load the MILP "
                                            "plans")] = 4,
    milp_time: Annotated[float, typer.Option(min=0.01, help="HiGHS seconds per layer and "
                                             "budget")] = 3.0,
    milp: Annotated[bool, typer.Option(help="run the exact MILP (HiGHS)")] = True,
    probe_slots: Annotated[int, typer.Option(min=0, help="PROBE's per-step replica slots per "
                                             "GPU")] = 1,
    engine: Annotated[str, typer.Option(help="placement file for: sglang or vllm")] = "sglang",
) -> None:
    """Best static placement (DeepSeek EPLB, probe's greedy, exact MILP) on a recorded trace,
    what PROBE per step adds, and the gain curve over extra slots; writes the engine's file."""
    from probe.advise import advise
    from probe.engines import write_placement
    from probe.specs import resolve_hardware, resolve_model
    from probe.traces.engines import read_engine_trace

    console = Console()
    if engine not in ENGINE_LINES:
        raise typer.BadParameter(f"expected sglang or vllm, got {engine!r}",
                                 param_hint="--engine")
    try:
        model_spec = resolve_model(model)
        hw = resolve_hardware(hardware)
        trace = read_engine_trace(trace_path, fmt, top_k=top_k, num_ranks=ranks)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    budgets = sorted({*range(max_slots + 1), slots})
    console.print(f"{trace_path}: {trace}")
    start = time.perf_counter()
    with console.status("planning") as status:
        try:
            result = advise(trace, model_spec, hw, slots=budgets, steps=steps,
                            milp_steps=milp_steps, milp_time=milp_time, use_milp=milp,
                            probe_slots=probe_slots, progress=status.update)
        except (ValueError, TypeError) as exc:
            console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
    seconds = time.perf_counter() - start
    for note in result.notes:
        console.print(f"note: {note}")
    _layer_table(console, result, slots)
    _curve_table(console, result)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    data["meta"].update({"trace": str(trace_path), "format": fmt, "engine": engine,
                         "placement_slots": slots, "seconds": round(seconds, 1)})
    (out / "advise.json").write_text(json.dumps(data, indent=1))
    written = ["advise.json"]
    if _plot(result, out / "advise.png", console):
        written.append("advise.png")
    path = out / f"placement.{engine}.json"
    write_placement(path, *result.placement(slots), engine=engine)
    written.append(path.name)
    console.print(f"wrote {', '.join(str(out / w) for w in written)} in {seconds:.0f} s")
    console.print("use it: " + ENGINE_LINES[engine].format(
        G=trace.num_ranks, extra=result.per_gpu[slots] * trace.num_ranks - trace.num_experts,
        path=path), soft_wrap=True, highlight=False)


def _layer_table(console: Console, result, k: int) -> None:
    policies = [p for p in ("static", "deepseek", "greedy", "milp", "probe")
                if p in result.time]
    table = Table(title=f"{k} extra slot(s) per GPU: modelled MoE us per layer (IR) on the "
                  "recorded traffic")
    table.add_column("layer", justify="right")
    for p in policies:
        table.add_column(p if p != "probe" else f"probe +{result.meta['probe_slots']}/step",
                         justify="right")
    table.add_column("best static", justify="left")
    if "milp" in result.time:
        table.add_column("MILP gap", justify="right")
    for layer in range(result.meta["layers"]):
        row = [str(layer)]
        for p in policies:
            row.append(f"{1e6 * result.mean_time(p, k)[layer]:.1f} "
                       f"({result.ir[p][k][:, layer].mean():.2f})")
        row.append(result.best_policy[k][layer])
        if "milp" in result.time:
            gap = result.milp_gap[k][layer]
            row.append("-" if np.isnan(gap) else f"{gap:.1%}")
        table.add_row(*row)
    row = ["all"] + [f"{1e6 * result.overall(p, k):.1f} ({result.ir[p][k].mean():.2f})"
                     for p in policies] + [""]
    if "milp" in result.time:
        row.append("")
    table.add_row(*row, style="bold")
    console.print(fit_table(table))


def _curve_table(console: Console, result) -> None:
    policies = [p for p in ("deepseek", "greedy", "milp", "best", "probe") if p in result.time]
    table = Table(title="Gain over static EP (modelled MoE time, static / policy) against "
                  "extra slots per GPU")
    table.add_column("extra slots", justify="right")
    for p in policies:
        table.add_column(p, justify="right")
    for k in result.slots:
        table.add_row(str(k), *(f"{result.overall('static', k) / result.overall(p, k):.3f}x"
                                for p in policies))
    console.print(fit_table(table))
    console.print(f"static EP: {1e6 * result.overall('static', result.slots[0]):.1f} us per "
                  f"layer; probe = best static layout + {result.meta['probe_slots']} per-step "
                  f"slot(s) planned on the true load, charged "
                  f"{1e6 * result.probe_overhead_s:.1f} us per layer")


def _plot(result, path: Path, console: Console) -> bool:
    try:
        import matplotlib
    except ImportError:
        console.print("matplotlib is not installed (pip install probe-moe[plot]): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ks = result.slots
    for p in ("static", "deepseek", "greedy", "milp", "best", "probe"):
        if p not in result.time:
            continue
        us = [1e6 * result.overall(p, k) for k in ks]
        style = "--" if p in ("static", "probe") else "-"
        left.plot(ks, us, style, marker="o", label=p)
        right.plot(ks, [result.overall("static", k) / (u / 1e6) for k, u in zip(ks, us,
                                                                                 strict=True)],
                   style, marker="o", label=p)
    for ax in (left, right):
        ax.set_xticks(ks)
    left.set_xlabel("extra slots per GPU")
    left.set_ylabel("modelled MoE time per layer (us)")
    right.set_xlabel("extra slots per GPU")
    right.set_ylabel("speed-up over static EP")
    right.axhline(1.0, color="grey", lw=0.5)
    left.legend(fontsize=8)
    fig.suptitle(f"{result.meta['model']} costs, {result.meta['gpus']} GPUs, "
                 f"E={result.meta['experts']}, K={result.meta['top_k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
