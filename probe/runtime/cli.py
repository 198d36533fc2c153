"""`probe serve` (expert-parallel serving through torchrun) and `probe generate` (one process).

    probe serve --nproc 8 --model CKPT_DIR --requests 64 --out summary.json   # GPUs: NCCL
    probe serve --nproc 2 --device cpu --random-config CONFIG.json           # CPU: gloo
    probe generate --model CKPT_DIR --prompt "def add(a, b):" --max-new-tokens 32

`probe serve` passes every option after its own to `python -m probe.runtime` (see
`python -m probe.runtime --help`); with --nproc > 1 it starts them under torchrun.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["register"]

_console = Console()


def _tokenizer(model_dir: Path | None, vocab_size: int):
    """(encode, decode) for a checkpoint: its tokenizer.json via transformers, the small
    model's byte tokenizer when the vocabulary matches it, else None."""
    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
            return (lambda s: tok.encode(s)), (lambda ids: tok.decode(ids))
        except Exception:  # noqa: BLE001 - fall back to the byte tokenizer or ids
            pass
    from probe.runtime import smallmodel

    if vocab_size == smallmodel.VOCAB_SIZE:
        return (lambda s: smallmodel.encode(s, bos=True).tolist()), smallmodel.decode
    return None


def _device_arg(args: list[str]) -> str:
    """The value of --device among pass-through options ("auto" when absent)."""
    for i, a in enumerate(args):
        if a == "--device" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "auto"


def _require_device(device: str) -> None:
    """Exit 2 with one line when `device` cannot be used by this torch (no deep traceback)."""
    from probe.runtime.__main__ import DeviceUnavailable, check_device

    try:
        check_device(device)
    except DeviceUnavailable as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    """Add `serve` and `generate` to the `probe` app."""

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def serve(
        ctx: typer.Context,
        nproc: Annotated[int, typer.Option(help="ranks (GPUs, or CPU processes with gloo)")] = 1,
    ) -> None:
        """Serve requests expert-parallel with PROBE balancing; other options go to
        `python -m probe.runtime` (--model DIR | --random-config ..., --requests, --out, ...)."""
        if nproc < 1:
            raise typer.BadParameter("--nproc must be >= 1")
        args = list(ctx.args)
        _require_device(_device_arg(args))
        if nproc == 1:
            from probe.runtime.__main__ import main

            raise typer.Exit(main(args))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "-m", "probe.runtime", *args]
        raise typer.Exit(subprocess.call(cmd))

    @app.command()
    def generate(
        model: Annotated[Path | None, typer.Option(help="HF checkpoint directory")] = None,
        random_config: Annotated[str | None, typer.Option(
            help="config.json path or 'gpt-oss-like': random weights instead of --model")] = None,
        prompt: Annotated[str | None, typer.Option(help="prompt text")] = None,
        ids: Annotated[str | None, typer.Option(help="prompt token ids, comma separated")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
        temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
        top_k: Annotated[int, typer.Option(min=0)] = 0,
        seed: int = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
        dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16")] = "fp32",
        cuda_graphs: Annotated[bool | None, typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="decode through a static KV cache and CUDA graphs (default: on for cuda; "
                 "on cpu the same no-sync step runs eagerly)")
        ] = None,
    ) -> None:
        """Generate from one prompt in a single process (greedy by default)."""

        from probe.runtime.__main__ import _DTYPES, gpt_oss_like_config
        from probe.runtime.engine import Engine, Request, random_model

        if (model is None) == (random_config is None):
            raise typer.BadParameter("give exactly one of --model and --random-config")
        if dtype not in _DTYPES:
            raise typer.BadParameter(f"--dtype must be one of {sorted(_DTYPES)}")
        _require_device(device)
        graphs = device.startswith("cuda") if cuda_graphs is None else cuda_graphs
        torch_dtype = _DTYPES[dtype]
        if model is not None:
            from probe.runtime.checkpoint import load_model

            try:
                net = load_model(model, dtype=torch_dtype, device=device)
            except (OSError, ValueError) as err:  # names the file and the problem
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(1) from None
        else:
            import json

            from probe.runtime.families import config_from_hf

            cfg = (gpt_oss_like_config(2) if random_config == "gpt-oss-like"
                   else config_from_hf(json.loads(Path(random_config).read_text())))
            net = random_model(cfg, seed=seed, dtype=torch_dtype, device=device)
        tok = _tokenizer(model, net.cfg.vocab_size)
        if ids is not None:
            prompt_ids = [int(x) for x in ids.split(",") if x.strip()]
        elif prompt is not None:
            if tok is None:
                raise typer.BadParameter("this checkpoint has no tokenizer probe can use: "
                                         "pass --ids")
            prompt_ids = list(tok[0](prompt))
        else:
            raise typer.BadParameter("give --prompt or --ids")
        engine = Engine(net, max_batch_tokens=max(len(prompt_ids), 1) + 1,
                        prefill_chunk=max(len(prompt_ids), 1), static_decode=graphs,
                        cuda_graphs=graphs and device.startswith("cuda"),
                        max_seq_len=len(prompt_ids) + max_new_tokens if graphs else None)
        res = engine.serve([Request("cli", prompt_ids, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, seed=seed)])["cli"]
        text = tok[1](res.tokens) if tok is not None else None
        _console.print(f"ids: {res.tokens}")
        if text is not None:
            _console.print(f"text: {text!r}")
        _console.print(f"TTFT {res.ttft_s * 1e3:.1f} ms, decode {res.decode_tokens_per_s:.1f} "
                       "tokens/s")
