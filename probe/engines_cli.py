"""The `probe placement` commands: write an engine's placement file, compare with EPLB."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

placement_app = typer.Typer(help="Expert placements for vLLM / SGLang: write, compare.",
                            no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the `placement` command group (write, compare) to the main app."""
    app.add_typer(placement_app, name="placement")


def _weights(path: Path) -> np.ndarray:
    """Expert load float [L, E] from a .npy [L, E] or a vLLM EPLB load-history JSON (summed)."""
    from probe.traces.readers import read_vllm_eplb_load_history

    try:
        if path.suffix == ".npy":
            weight = np.load(path, allow_pickle=False)
        else:
            weight = read_vllm_eplb_load_history(path).sum(axis=0)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="WEIGHTS") from None
    if weight.ndim != 2:
        raise typer.BadParameter(f"{path}: expected [layers, experts] loads, got shape "
                                 f"{list(weight.shape)}", param_hint="WEIGHTS")
    return weight


def _policy(name: str, home: str = "packed"):
    from probe.engines import probe_rebalance_experts
    from probe.planner.deepseek_eplb import rebalance_experts

    if name == "deepseek":
        return rebalance_experts
    if name in ("greedy", "lp"):
        return lambda *args: probe_rebalance_experts(*args, method=name, home=home)
    raise typer.BadParameter(f"expected deepseek, greedy or lp, got {name!r}",
                             param_hint="--policy")


@placement_app.command("write")
def write(
    weights: Annotated[Path, typer.Argument(help="Expert loads: .npy [layers, experts] or a "
                                            "vLLM EPLB load-history JSON (records summed).")],
    out: Annotated[Path, typer.Option("--out", help="Placement file to write.")],
    replicas: Annotated[int, typer.Option(min=1, help="Physical expert slots per layer (R).")],
    gpus: Annotated[int, typer.Option(min=1, help="Expert-parallel GPUs (G).")],
    groups: int = typer.Option(1, min=1, help="Expert groups (DeepSeek's num_groups)."),
    nodes: int = typer.Option(1, min=1, help="Nodes (DeepSeek's num_nodes)."),
    policy: str = typer.Option("greedy", help="deepseek (DeepSeek's EPLB), greedy or lp "
                               "(probe's planner)."),
    engine: str = typer.Option("sglang", help="sglang (--init-expert-location JSON), vllm (the "
                               "three maps under vLLM's EPLB state names) or json "
                               "(probe's JSON with all three maps)."),
) -> None:
    """Plan a placement from expert loads and write it as an engine's start-up file."""
    from probe.engines import ENGINES, placement_imbalance, write_placement

    if engine not in ENGINES:
        raise typer.BadParameter(f"expected one of {', '.join(ENGINES)}, got {engine!r}",
                                 param_hint="--engine")
    weight = _weights(weights)
    try:
        maps = _policy(policy)(weight, replicas, groups, nodes, gpus)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    write_placement(out, *maps, engine=engine)
    ir = placement_imbalance(weight, maps[0], gpus)
    typer.echo(f"wrote {out} ({engine}): {weight.shape[0]} layers, {replicas} slots on {gpus} "
               f"GPUs, mean IR {ir.mean():.3f} (max {ir.max():.3f}) with an even split")


@placement_app.command("compare")
def compare(
    experts: int = typer.Option(128, min=1, help="Logical experts (E)."),
    gpus: int = typer.Option(8, min=1, help="GPUs (G)."),
    replicas: int = typer.Option(160, min=1, help="Physical slots (R)."),
    layers: int = typer.Option(8, min=1, help="Random layers."),
    skew: float = typer.Option(0.0, min=0.0, help="0: uniform random loads in [0, 1000); "
                               "> 0: Pareto loads with this shape (smaller = heavier tail)."),
    seed: int = typer.Option(0, min=0, help="Random seed."),
    home: str = typer.Option("packed", help="Home layout of probe's policy: packed or "
                             "sharded."),
) -> None:
    """IR (max GPU load / mean, even split over copies) of DeepSeek's EPLB vs probe's."""
    from probe.engines import placement_imbalance

    rng = np.random.default_rng(seed)
    if skew == 0:
        weight = rng.integers(0, 1000, (layers, experts)).astype(np.float64)
    else:
        weight = np.floor(rng.pareto(skew, (layers, experts)) * 100) + 1
    base = None
    for name in ("deepseek", "greedy", "lp"):
        try:
            maps = _policy(name, home)(weight, replicas, 1, 1, gpus)
        except (TypeError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None
        ir = placement_imbalance(weight, maps[0], gpus)
        wins = "" if base is None else f", below DeepSeek in {int((ir < base - 1e-9).sum())}" \
            f"/{layers} layers"
        base = ir if base is None else base
        typer.echo(f"{name:9s} mean IR {ir.mean():.3f} (max {ir.max():.3f}){wins}")
