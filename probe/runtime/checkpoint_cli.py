"""`probe checkpoint ...`: inspect and check a Hugging Face MoE checkpoint before running it,
or write a small random one.

    probe checkpoint info PATH            architecture as probe reads it; tensors checked, not read
    probe checkpoint info PATH --run      also load it (fp32, cpu) and run one short forward pass
    probe checkpoint random --arch qwen3_moe --out DIR     a small random-weight checkpoint

A checkpoint that cannot be used gives one line on stderr naming the file and the problem, and
exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register"]

_ARCHS = ("qwen3_moe", "gpt_oss", "mixtral", "olmoe", "deepseek_v3")  # families.SUPPORTED


def _fail(err: Exception) -> typer.Exit:
    """Print `err` as one plain line on stderr (no markup, no wrapping); the exit to raise."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


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
            raise _fail(err) from None
        console.print(_describe(cfg))
        console.print("[green]tensors: all present with the shapes the config implies[/green]")
        if run:
            import torch

            from probe.runtime.checkpoint import load_model

            try:
                model = load_model(path)
            except (OSError, ValueError) as err:
                raise _fail(err) from None
            ids = torch.arange(8, dtype=torch.int64).remainder(cfg.vocab_size)[None]
            with torch.no_grad():
                out = model(ids, return_routing=True)
            finite = bool(torch.isfinite(out.logits).all())
            used = torch.cat([r.topk_ids.reshape(-1) for r in out.routing]).unique().numel()
            console.print(f"forward pass: logits {list(out.logits.shape)}, finite={finite}, "
                          f"{used} distinct experts used across the MoE layers")
            if not finite:
                raise typer.Exit(1)

    @group.command("random")
    def random(
        arch: Annotated[str, typer.Option(help="Family: " + ", ".join(_ARCHS) + ".")],
        out: Annotated[Path, typer.Option(help="Directory to write (new or empty).")],
        layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
        experts: Annotated[int, typer.Option(help="Experts E per MoE layer.")] = 8,
        top_k: Annotated[int, typer.Option(help="Experts K per token.")] = 2,
        hidden: Annotated[int, typer.Option(help="Hidden size D.")] = 64,
        expert_width: Annotated[int, typer.Option(help="Expert intermediate width F.")] = 32,
        heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
        kv_heads: Annotated[int, typer.Option(help="Key/value heads.")] = 2,
        vocab: Annotated[int, typer.Option(
            help="Vocabulary size; the default is the small model's byte vocabulary, so "
                 "`probe generate --prompt` works.")] = 272,
        seed: Annotated[int, typer.Option(help="Seeds every tensor.")] = 0,
        dtype: Annotated[str, typer.Option(help="Stored dtype: fp32 or bf16.")] = "fp32",
        weights: Annotated[str, typer.Option(
            help="dense, or shipped: the family's release format (gpt_oss: MXFP4 experts; "
                 "deepseek_v3: block-scaled FP8 projections).")] = "dense",
        force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out.")
                         ] = False,
    ) -> None:
        """Write a small random-weight checkpoint of a named architecture (config.json +
        model.safetensors, the Hugging Face layout) that probe and transformers load.

        Random weights: the text is noise, but EP, routing and balancing run as on a real model.
        """
        from probe.runtime.checkpoint import verify_checkpoint
        from probe.runtime.random_checkpoint import RandomCheckpointSpec, write_random_checkpoint

        try:
            spec = RandomCheckpointSpec(
                num_layers=layers, num_experts=experts, top_k=top_k, hidden_size=hidden,
                expert_width=expert_width, num_heads=heads, num_kv_heads=kv_heads,
                vocab_size=vocab)
            path = write_random_checkpoint(arch, out, spec, seed=seed, dtype=dtype,
                                           weights=weights, overwrite=force)
            cfg = verify_checkpoint(path)
        except (OSError, ValueError) as err:
            raise _fail(err) from None
        size_mb = (path / "model.safetensors").stat().st_size / 1e6
        typer.echo(f"wrote {path}: random {cfg.model_type}, {cfg.num_layers} layers "
                   f"({cfg.num_moe_layers} MoE), {cfg.num_experts} experts, top-{cfg.top_k}, "
                   f"hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}, {dtype}"
                   f"{'' if weights == 'dense' else ' + shipped format'}, "
                   f"{size_mb:.1f} MB")

    app.add_typer(group, name="checkpoint")
