"""`probe simulate TRACE ...`: replay a trace under policies, print a table, write plots/CSV.
`probe calibrate-links A2A_JSON --out DIR`: fit link figures to a multi-GPU bench's output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `simulate` and `calibrate-links` commands to the main app."""
    app.command("simulate")(simulate_command)
    app.command("calibrate-links")(calibrate_links_command)


def calibrate_links_command(
    results: Annotated[Path, typer.Argument(
        help="a2a.json of experiments/comm/a2a_bench.py (device_multigpu.sh's OUT/a2a.json).")],
    out: Annotated[Path, typer.Option(help="Folder for links.json and hardware.json.")],
    base: str = typer.Option("h200x8", help="HardwareSpec preset the measured links go into."),
) -> None:
    """Fit all-to-all and p2p latency + bandwidth to measured link times; write links.json
    (FairCosts overrides, probe.sim.links.load_links) and hardware.json (a HardwareSpec preset
    file for any --hardware option)."""
    from rich.console import Console

    from probe.sim.links import fit_links
    from probe.specs import save_spec

    console = Console()
    try:
        links = fit_links(results)
        spec = links.hardware(base)
    except (ValueError, TypeError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    out.mkdir(parents=True, exist_ok=True)
    links.save(out / "links.json")
    save_spec(spec, out / "hardware.json")
    console.print(f"{links.device} x {links.num_ranks} ({links.comm}): all-to-all "
                  f"{links.a2a_latency_s * 1e6:.1f} us + bytes / "
                  f"{links.a2a_bandwidth / 1e9:.1f} GB/s (worst fit error "
                  f"{100 * links.a2a_max_rel_residual:.0f}% over {links.a2a_points} points); "
                  f"p2p {links.p2p_latency_s * 1e6:.1f} us + bytes / "
                  f"{links.p2p_bandwidth / 1e9:.1f} GB/s")
    console.print(f"wrote {out / 'links.json'} and {out / 'hardware.json'} ({spec.name})")


def _attention_for(model_name: str, hw_name: str, use_calibration: bool, model, hardware):
    from probe.sim.attention import AttentionModel
    from probe.sim.calibration import calibrated_attention, has_calibration

    if use_calibration and hw_name.startswith("h200") and has_calibration(model_name):
        return calibrated_attention(model_name)
    return AttentionModel.roofline(model, hardware)


def simulate_command(
    trace: Annotated[Path, typer.Argument(help="RoutingTrace file (.safetensors).")],
    model: str = typer.Option("gpt-oss-120b", help="ModelSpec preset or JSON file."),
    hardware: str = typer.Option("h200x8", help="HardwareSpec preset or JSON file."),
    policies: str = typer.Option("static,eplb,probe,oracle",
                                 help="Comma list of static, eplb (DeepSeek's EPLB), "
                                      "eplb_addcopies (copies added to the home layout), probe, "
                                      "probe-unbounded, oracle."),
    ep: int = typer.Option(None, help="EP ranks (default: the trace's ranks)."),
    slots: int = typer.Option(3, help="PROBE replica slots per rank per layer."),
    eplb_slots: int = typer.Option(2, help="EPLB redundant experts per rank per layer (eplb "
                                           "and eplb_addcopies)."),
    eplb_interval: int = typer.Option(100, help="EPLB rebalance period in steps."),
    eplb_window: int = typer.Option(100, help="EPLB history window in steps."),
    predictor: str = typer.Option("topk:0.9", help="perfect, previous, topk:ACC, noise:SIGMA."),
    planner: str = typer.Option("greedy", help="solve() method for probe and oracle."),
    steps: int = typer.Option(None, help="Simulate only the first STEPS steps."),
    calibration: bool = typer.Option(True, help="Use the measured H200 calibration for h200 "
                                                "presets (datasheet otherwise)."),
    out: Annotated[Path | None, typer.Option(help="Folder for plot, CSV, summary JSON.")] = None,
    seed: int = typer.Option(0, help="Seed of the prediction-error model."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Simulate TRACE step by step under each policy and print per-policy results."""
    from rich.console import Console

    from probe.sim.calibration import calibrated_hardware, has_calibration
    from probe.sim.engine import simulate
    from probe.sim.report import plot_result, result_table, write_csv, write_summary
    from probe.specs import resolve_hardware, resolve_model
    from probe.tables import fit_table
    from probe.traces.trace import RoutingTrace

    console = Console()
    try:
        model_spec = resolve_model(model)
        hw = resolve_hardware(hardware)
        if calibration and hw.name.startswith("h200") and has_calibration(model_spec.name):
            hw = calibrated_hardware(hw.name, model_spec.name)
        tr = RoutingTrace.load(trace)
        attention = _attention_for(model_spec.name, hw.name, calibration, model_spec, hw)
        chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
        result = simulate(tr, model=model_spec, hardware=hw, policies=chosen, ep=ep,
                          slots=slots, eplb_slots=eplb_slots, eplb_interval=eplb_interval,
                          eplb_window=eplb_window, predictor=predictor, attention=attention,
                          planner=planner, steps=None if steps is None else slice(0, steps),
                          seed=seed, progress=progress)
    except (ValueError, TypeError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    console.print(fit_table(result_table(result)))
    console.print(f"hardware: {result.meta['hardware_source']}")
    console.print(f"attention: {result.meta['attention']}; predictor: {result.meta['predictor']}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = trace.name.split(".")[0]
        write_csv(result, out / f"{stem}.csv")
        write_summary(result, out / f"{stem}.summary.json")
        console.print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.summary.json')}")
        try:
            paths = plot_result(result, out, prefix=stem)
        except ImportError:
            console.print("matplotlib is not installed (pip install probe-moe[plot]): no plot")
        else:
            for path in paths:
                console.print(f"wrote {path}")
