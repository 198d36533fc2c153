"""Command line of the solver benchmark: `python -m solvers_bench` (or `probe-solvers-bench`)
and `probe bench solvers`.

`register(app)` adds a `bench` sub-app with the `solvers` command to the main `probe` app;
probe finds it through the "probe.commands" entry point that pyproject.toml declares.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn

__all__ = ["MODES", "register", "solvers_cmd"]

# mode -> (proof-tier instances, scale-tier instances, exact time limit in seconds, proof sizes,
#          scale sizes)
MODES = {
    "tiny": (3, 0, 0.5, ((4, 64),), ((16, 128),)),
    "quick": (14, 2, 1.0, ((4, 64), (8, 64)), ((16, 128),)),
    "full": (240, 24, 6.0, ((4, 64), (4, 64), (4, 128), (8, 64), (8, 128)),
             ((16, 128), (16, 256), (32, 256))),
}


def register(app: typer.Typer) -> None:
    """Add `bench solvers` to the main app."""
    bench = typer.Typer(help="benchmarks", no_args_is_help=True)
    bench.command("solvers")(solvers_cmd)
    app.add_typer(bench, name="bench")


def solvers_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="small grid, 1 s limits (default)")]
    = False,
    full: Annotated[bool, typer.Option("--full", help="the committed grid: ~264 instances, "
                                                      "6 s exact limits")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="3 instances (tests)")] = False,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("results/solvers_bench"),
    workers: Annotated[int, typer.Option(help="parallel instance processes")] = 1,
    time_limit: Annotated[float | None, typer.Option(
        help="seconds per exact solve (default: the mode's)")] = None,
    proof: Annotated[int | None, typer.Option(help="proof-tier instances (default: mode's)")]
    = None,
    scale: Annotated[int | None, typer.Option(help="scale-tier instances (default: mode's)")]
    = None,
    seed: Annotated[int, typer.Option(help="grid seed")] = 0,
    resume: Annotated[bool, typer.Option(help="skip instances already in OUT/results.jsonl "
                                              "(--no-resume: stop if that file exists)")]
    = True,
    report_only: Annotated[bool, typer.Option(help="only rebuild the report from OUT")] = False,
    plots: Annotated[bool, typer.Option(help="draw PNG plots")] = True,
    windows: Annotated[str | None, typer.Option(
        help="comma-separated window kinds of the proof tier (default: all of "
             "tight,1copy,x0.5,x1,x2,x4)")] = None,
    proof_sizes: Annotated[str | None, typer.Option(
        help="comma-separated GxE sizes of the proof tier, e.g. 4x64,8x64 (default: mode's)")]
    = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="stop after this many minutes, keeping what is done")] = None,
) -> None:
    """Heuristics vs exact solvers: gaps, times, tables and plots (docs/solvers_bench.md)."""
    from solvers_bench.instances import WINDOWS, sample_grid
    from solvers_bench.report import write_report
    from solvers_bench.run import machine_info, run_all

    console = Console(stderr=True)
    if sum((quick, full, tiny)) > 1:
        raise typer.BadParameter("choose at most one of --quick, --full, --tiny")
    mode = "full" if full else "tiny" if tiny else "quick"
    num_proof, num_scale, limit, mode_proof_sizes, scale_sizes = MODES[mode]
    num_proof = num_proof if proof is None else proof
    num_scale = num_scale if scale is None else scale
    limit = limit if time_limit is None else time_limit
    if workers < 1:
        raise typer.BadParameter("workers must be >= 1", param_hint="--workers")
    if not limit > 0:
        raise typer.BadParameter("time limit must be > 0", param_hint="--time-limit")
    if proof_sizes is not None:
        try:
            proof_sizes = tuple(tuple(int(x) for x in item.lower().split("x"))
                                for item in proof_sizes.split(","))
        except ValueError:
            raise typer.BadParameter("sizes look like 4x64,8x64",
                                     param_hint="--proof-sizes") from None
        if any(len(z) != 2 or min(z) < 1 for z in proof_sizes):
            raise typer.BadParameter("sizes look like 4x64,8x64", param_hint="--proof-sizes")
    else:
        proof_sizes = mode_proof_sizes
    kinds = WINDOWS if windows is None else tuple(w.strip() for w in windows.split(","))
    if not kinds or set(kinds) - set(WINDOWS):
        raise typer.BadParameter(f"window kinds must come from {','.join(WINDOWS)}",
                                 param_hint="--windows")
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    meta_path = out / "run_meta.json"
    if not report_only:
        specs = sample_grid(num_proof=num_proof, num_scale=num_scale, seed=seed,
                            proof_sizes=proof_sizes, scale_sizes=scale_sizes, windows=kinds)
        meta = {"command": "python -m solvers_bench " + shlex.join(sys.argv[1:]),
                "mode": mode, "num_instances": len(specs), "time_limit": limit,
                "workers": workers, "seed": seed, "started": time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine_info()}
        meta_path.write_text(json.dumps(meta, indent=1))
        anomalies = 0
        with Progress(TextColumn("[bold]solvers_bench[/]"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[note]}"), console=console) as progress:
            task = progress.add_task("run", total=len(specs), note="")

            def on_result(record: dict) -> None:
                nonlocal anomalies
                anomalies += len(record.get("anomalies", []))
                for line in record.get("anomalies", []):
                    if line.startswith(("INFEASIBLE", "EXACT DISAGREE", "BOUND", "FATAL")):
                        progress.console.print(f"[red]{record['id']}: {line}[/]")
                progress.update(task, advance=1, note=f"anomalies {anomalies}")

            done = run_all(specs, jsonl, time_limit=limit, workers=workers, resume=resume,
                           on_result=on_result,
                           max_seconds=None if max_minutes is None else 60 * max_minutes)
            progress.update(task, completed=len(done))
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        meta["machine_end"] = machine_info()
        meta_path.write_text(json.dumps(meta, indent=1))
    summary = write_report(out, plots=plots)
    Console().print(summary)
