"""`probe predictor train|eval|study`: distil lookahead predictors and measure them.

    probe predictor train --samples S.safetensors --model CKPT_DIR --out PRED.safetensors
    probe predictor eval  --samples S.safetensors --predictors PRED.safetensors [--trace T]
    probe predictor study --samples S.safetensors --model CKPT_DIR --trace T --out DIR

Training and evaluation hold out whole steps (see probe/predictor/samples.py); with the same
--held-out/--block/--seed, `eval` scores exactly the steps `train` did not see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from probe.tables import fit_table

__all__ = ["register"]

_console = Console()
_Samples = Annotated[Path, typer.Option(help="router samples side file (Recorder)")]
_Model = Annotated[Path, typer.Option(help="HF checkpoint directory (for the routers)")]
_HeldOut = Annotated[float, typer.Option(help="fraction of step blocks held out")]
_Block = Annotated[int, typer.Option(help="steps per held-out block")]
_Ranks = Annotated[int, typer.Option(help="S, source ranks (load error, plans)")]


def _routers(model_dir: Path, hidden: int):
    from probe.predictor.model import PredictorSet

    try:
        from probe.runtime.checkpoint import load_model
    except ImportError as err:  # pragma: no cover - runtime ships with probe
        raise typer.BadParameter(f"cannot load checkpoints: {err}") from err
    if not (model_dir / "config.json").is_file():
        raise typer.BadParameter(f"{model_dir} has no config.json", param_hint="--model")
    model = load_model(model_dir, expert_ids=[0])  # routers are all we need
    return lambda: PredictorSet.from_model(model, hidden=hidden)


def _fidelity_table(title: str, rows_by_name: dict[str, list[dict]]) -> Table:
    table = Table(title=title)
    table.add_column("layer", justify="right")
    names = list(rows_by_name)
    metrics = [("topk_acc", "top-k acc"), ("half_hit", "top-half hit"),
               ("recall_2k", "2k recall"), ("expert_load_err", "load err")]
    for name in names:
        for _, label in metrics:
            table.add_column(f"{name}\n{label}", justify="right")
    first = rows_by_name[names[0]]
    for i, row in enumerate(first):
        cells = [str(row["layer"])]
        for name in names:
            r = rows_by_name[name][i]
            cells += [f"{r[m]:.3f}" if m in r else "-" for m, _ in metrics]
        table.add_row(*cells)
    means = ["mean"]
    for name in names:
        rows = rows_by_name[name]
        means += [f"{np.mean([r[m] for r in rows]):.3f}" if m in rows[0] else "-"
                  for m, _ in metrics]
    table.add_row(*means, style="bold")
    return table


def register(app: typer.Typer) -> None:
    """Add the `predictor` command group to the main `probe` app."""
    sub = typer.Typer(help="Lookahead predictor: distil, evaluate, study.",
                      no_args_is_help=True)
    app.add_typer(sub, name="predictor")

    @sub.command("train")
    def train(samples: _Samples, model: _Model,
              out: Annotated[Path, typer.Option(help="predictor weights to write")],
              epochs: int = 4, hidden: int = 256, lr: float = 2e-3, batch_size: int = 512,
              held_out: _HeldOut = 0.25, block: _Block = 8, seed: int = 0,
              num_ranks: _Ranks = 8) -> None:
        """Distil predictors offline on the training steps; print held-out fidelity."""
        from probe.placement import sharded_home
        from probe.predictor.distill import train_offline
        from probe.predictor.evaluate import fidelity
        from probe.predictor.samples import load_samples, split_steps

        data = load_samples(samples)
        make = _routers(model, hidden)
        pset = make()
        if pset.num_layers != data.num_layers:
            raise typer.BadParameter(f"model has {pset.num_layers} MoE layers, samples "
                                     f"{data.num_layers}", param_hint="--samples")
        tr, te = split_steps(data.step, held_out=held_out, block=block, seed=seed)
        train_s, test_s = data.subset(tr), data.subset(te)
        _console.print(f"{train_s.step.size} training tokens, {test_s.step.size} held-out "
                       f"tokens; {len(pset.layers)} predictors of width {hidden}")
        torch.manual_seed(seed)
        home = sharded_home(data.num_experts, num_ranks)
        args = dict(step=test_s.step, src_rank=test_s.src_rank, num_ranks=num_ranks, home=home)
        prior = fidelity(pset, test_s.hidden, test_s.logits, prior=True, **args)
        train_offline(pset, torch.from_numpy(train_s.hidden), torch.from_numpy(train_s.logits),
                      epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      progress=lambda e, n, losses: _console.print(
                          f"epoch {e + 1}/{n}: mean loss {np.mean(list(losses.values())):.4f}"))
        pset.save(out)
        rows = fidelity(pset, test_s.hidden, test_s.logits, **args)
        _console.print(fit_table(_fidelity_table("held-out fidelity",
                                                 {"prior": prior, "distilled": rows})))
        _console.print(f"wrote {out}")

    @sub.command("eval")
    def evaluate(samples: _Samples,
                 predictors: Annotated[Path, typer.Option(help="predictor weights")],
                 held_out: _HeldOut = 0.25, block: _Block = 8, seed: int = 0,
                 all_steps: Annotated[bool, typer.Option(
                     help="score every step, not only the held-out ones")] = False,
                 num_ranks: _Ranks = 8,
                 json_out: Annotated[Path | None, typer.Option(
                     "--json", help="write the rows here")] = None) -> None:
        """Per-layer fidelity of saved predictors (and of their frozen prior)."""
        from probe.placement import sharded_home
        from probe.predictor.evaluate import fidelity
        from probe.predictor.model import PredictorSet
        from probe.predictor.samples import load_samples, split_steps

        data = load_samples(samples)
        pset = PredictorSet.load(predictors)
        if not all_steps:
            data = data.subset(split_steps(data.step, held_out=held_out, block=block,
                                           seed=seed)[1])
        home = sharded_home(data.num_experts, num_ranks)
        args = dict(step=data.step, src_rank=data.src_rank, num_ranks=num_ranks, home=home)
        rows = {"prior": fidelity(pset, data.hidden, data.logits, prior=True, **args),
                "distilled": fidelity(pset, data.hidden, data.logits, **args)}
        _console.print(fit_table(_fidelity_table(f"fidelity on {data.step.size} tokens", rows)))
        if json_out is not None:
            json_out.write_text(json.dumps(rows, indent=1) + "\n")

    @sub.command("study")
    def study(samples: _Samples, model: _Model,
              out: Annotated[Path, typer.Option(help="output directory (report, JSON, CSV)")],
              trace: Annotated[Path | None, typer.Option(
                  help="RoutingTrace of the recording")] = None,
              epochs: int = 4, hidden: int = 256, lr: float = 2e-3, num_ranks: _Ranks = 8,
              cost_model: Annotated[str, typer.Option(
                  help="ModelSpec preset pricing experts and tokens")] = "gpt-oss-120b",
              hardware: str = "h200x8", tokens_per_rank: int = 512, seed: int = 0,
              max_plan_steps: int = 48, held_out: _HeldOut = 0.25, block: _Block = 8,
              batch_size: int = 512, online_lr: float = 1e-3,
              plan_layers: Annotated[str | None, typer.Option(
                  help="comma-separated layers for the plan study (default all)")] = None,
              ) -> None:
        """Full study: prior vs distilled, plan quality vs history, online distillation."""
        from probe.predictor.report import write_report
        from probe.predictor.samples import load_samples
        from probe.predictor.study import run_study

        data = load_samples(samples)
        make = _routers(model, hidden)
        tr = None
        if trace is not None:
            from probe.traces.trace import RoutingTrace

            tr = RoutingTrace.load(trace)
        cost = _cost(cost_model, hardware, data.num_experts, make().top_k, num_ranks)
        layers = None if plan_layers is None else [int(x) for x in plan_layers.split(",")]
        res = run_study(make, data, num_ranks=num_ranks, trace=tr, cost=cost, epochs=epochs,
                        lr=lr, seed=seed, tokens_per_rank=tokens_per_rank,
                        max_plan_steps=max_plan_steps, plan_layers=layers,
                        held_out=held_out, block=block, batch_size=batch_size,
                        online_lr=online_lr, log=_console.print)
        out.mkdir(parents=True, exist_ok=True)
        res["predictors"].save(out / "predictors.safetensors")
        command = ("probe predictor study " + f"--samples {samples} --model {model} "
                   + (f"--trace {trace} " if trace else "") + f"--out {out} --epochs {epochs} "
                   f"--hidden {hidden} --lr {lr} --num-ranks {num_ranks} "
                   f"--cost-model {cost_model} --hardware {hardware} "
                   f"--tokens-per-rank {tokens_per_rank} --seed {seed} "
                   f"--max-plan-steps {max_plan_steps} --held-out {held_out} "
                   f"--block {block} --batch-size {batch_size} --online-lr {online_lr}"
                   + (f" --plan-layers {plan_layers}" if plan_layers else ""))
        text = write_report(res["results"], out, command=command)
        _console.print(text)


def _cost(preset: str, hardware: str, num_experts: int, top_k: int, num_ranks: int):
    """A CostModel pricing experts like `preset` but with the recorded model's E and K."""
    import dataclasses

    from probe.planner import CostModel
    from probe.specs import resolve_hardware, resolve_model

    spec = dataclasses.replace(resolve_model(preset), name=f"{preset}-E{num_experts}",
                               num_experts=num_experts, top_k=top_k)
    return CostModel.from_specs(spec, resolve_hardware(hardware), num_ranks=num_ranks)
