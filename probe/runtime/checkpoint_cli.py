"""`probe checkpoint ...`: inspect and check a Hugging Face MoE checkpoint before running it.

    probe checkpoint info PATH            architecture as probe reads it; tensors checked, not read
    probe checkpoint info PATH --run      also load it (fp32, cpu) and run one short forward pass
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register"]


def _describe(cfg) -> Table:
    table = Table(title=f"{cfg.model_type} checkpoint", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    dense = cfg.num_layers - cfg.num_moe_layers
    rows = [
        ("layers", f"{cfg.num_layers} ({cfg.num_moe_layers} MoE, {dense} dense)"),
        ("hidden D", str(cfg.hidden_size)),
        ("experts E / top-k K", f"{cfg.num_experts} / {cfg.top_k}"),
        ("expert width F", str(cfg.moe_intermediate_size)),
        ("shared experts", str(cfg.num_shared_experts)),
        ("routing", cfg.router_scoring + (" + renorm" if cfg.norm_topk_prob else "")),
        ("attention", f"{cfg.attention}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv, "
                      f"head dim {cfg.head_dim}"),
        ("sliding window", f"{cfg.sliding_window} on {len(cfg.sliding_layers)} layers"
         if cfg.sliding_window else "none"),
        ("rope", f"{cfg.rope.kind}, theta {cfg.rope.theta:g}"
         + (f", factor {cfg.rope.factor:g}" if cfg.rope.kind != "default" else "")),
        ("vocabulary", str(cfg.vocab_size)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def register(app: typer.Typer) -> None:
    """Add the `checkpoint` command group to `app`."""
    group = typer.Typer(help="Inspect Hugging Face MoE checkpoints (config.json + safetensors).",
                        no_args_is_help=True)

    @group.command("info")
    def info(
        path: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
        run: Annotated[bool, typer.Option("--run", help="Load it and run one forward pass.")
                       ] = False,
    ) -> None:
        """Show the architecture probe reads from PATH and check every tensor's name and shape."""
        from probe.runtime.checkpoint import verify_checkpoint

        console = Console()
        try:
            cfg = verify_checkpoint(path)
        except (OSError, ValueError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from None
        console.print(_describe(cfg))
        console.print("[green]tensors: all present with the shapes the config implies[/green]")
        if run:
            import torch

            from probe.runtime.checkpoint import load_model

            model = load_model(path)
            ids = torch.arange(8, dtype=torch.int64).remainder(cfg.vocab_size)[None]
            with torch.no_grad():
                out = model(ids, return_routing=True)
            finite = bool(torch.isfinite(out.logits).all())
            used = torch.cat([r.topk_ids.reshape(-1) for r in out.routing]).unique().numel()
            console.print(f"forward pass: logits {list(out.logits.shape)}, finite={finite}, "
                          f"{used} distinct experts used across the MoE layers")
            if not finite:
                raise typer.Exit(1)

    app.add_typer(group, name="checkpoint")
