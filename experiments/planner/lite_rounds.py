"""How many rounds the lite planner needs, by hot fraction, and what the dispatch-time split
adds to its replicas.

    python -m experiments.planner.lite_rounds --out results/lite_rounds

The GPU kernel's time grows with the rounds it runs (results/h100/run18, gpu_floor: at
ep=64 / 256 experts about 43 us a round on an H100, 16 rounds 643 us, against a smallest
rank window of about 170-200 us), so what a round achieves decides whether the plan fits its
window. Default decode layers (probe.traces "decode", 768 tokens per rank, top-8, 3 slots per
rank, window "auto"; the layers experiments.planner.scale and gpu_lite use, 8 of them) at
ep=8 / 16 / 32 / 64. For each hot fraction (LiteRules.hot_sixteenths: 12, the default, a rank
is hot above mean + 0.25 (max - mean); 16, every rank above the mean) and round cap, the
medians over the layers of:
- IR, plan: max / mean of eq. 8's rank times under the lite plan's own token assignment;
- IR, split: the same replicas (home + the plan's copies), the tokens split by the
  dispatch-time water-filling (`assign_tokens`) without its exchange step (moves=0: what the
  runtime's DeviceSplit runs) and with it (the default moves);
- replicas, moves and rounds run (the CPU kernel's stats).
CPU only (the plans are the GPU kernel's too: tests compare them entry for entry).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from experiments.manifest import Manifest

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=16, E=128", "qwen3-235b-a22b", "h200x8-n2", 16, 128),
           ("ep=32, E=256", "deepseek-v3", "h200x8-n4", 32, 256),
           ("ep=64, E=128", "qwen3-235b-a22b", "h200x8-n8", 64, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
HOT = (12, 16)
ROUNDS = (2, 3, 4, 6, 8, 16)
LAYERS = 8


def ir(problem, assignment) -> float:
    """max / mean of eq. 8's rank times under `assignment` [S, E, G]."""
    from probe.planner.check import rank_times

    comp, comm = rank_times(problem, assignment)
    times = comp + comm
    return float(times.max() / times.mean())


def problems(model: str, hardware: str, ranks: int, experts: int, layers: int) -> list:
    from probe.planner.cost import CostModel
    from probe.planner.layers import attention_time
    from probe.planner.problem import BalanceProblem
    from probe.specs import hardware_preset, model_preset
    from probe.traces import generate

    spec_model, spec_hw = model_preset(model), hardware_preset(hardware)
    cost = CostModel.from_specs(spec_model, spec_hw, num_ranks=ranks)
    attention = attention_time(spec_model, spec_hw)
    trace = generate("decode", num_steps=1, tokens_per_step=768 * ranks, num_layers=layers,
                     num_experts=experts, top_k=8, num_ranks=ranks, seed=1)
    loads = trace.load_counts()
    return [BalanceProblem.from_load(loads[0, layer], cost, 3, "auto",
                                     attention_time=attention) for layer in range(layers)]


def study(config, layers: int) -> list[dict]:
    from probe.planner import solve
    from probe.planner.assign import assign_tokens
    from probe.planner.lite import LiteRules, lite_plan

    name, model, hardware, ranks, experts = config
    probs = problems(model, hardware, ranks, experts, layers)
    window_us = float(np.median([p.window.min() for p in probs]) * 1e6)
    static = [ir(p, solve(p, "static").plan.assignment) for p in probs]
    rows = []
    for hot in HOT:
        for cap in ROUNDS:
            cols: dict[str, list] = {k: [] for k in ("plan", "split0", "split", "replicas",
                                                     "moves", "rounds")}
            for p in probs:
                stats: dict = {}
                plan = lite_plan(p, LiteRules(max_rounds=cap, hot_sixteenths=hot), stats=stats)
                copies = p.home | plan.replicas
                cols["plan"].append(ir(p, plan.assignment))
                cols["split0"].append(ir(p, assign_tokens(p.load, copies, p.cost, home=p.home,
                                                          moves=0)))
                cols["split"].append(ir(p, assign_tokens(p.load, copies, p.cost, home=p.home)))
                cols["replicas"].append(int(plan.replicas.sum()))
                cols["moves"].append(stats["moves"])
                cols["rounds"].append(stats["rounds"])
            row = {"config": name, "model": model, "hardware": hardware, "ranks": ranks,
                   "experts": experts, "hot_sixteenths": hot, "max_rounds": cap,
                   "window_min_us": window_us, "ir_static": float(np.median(static)),
                   **{f"ir_{k}": float(np.median(cols[k])) for k in ("plan", "split0", "split")},
                   **{f"ir_{k}_max": float(np.max(cols[k]))
                      for k in ("plan", "split0", "split")},
                   **{k: float(np.median(cols[k])) for k in ("replicas", "moves", "rounds")}}
            print(f"{name} hot {hot} rounds {cap}: IR plan {row['ir_plan']:.3f}, split "
                  f"{row['ir_split0']:.3f} / {row['ir_split']:.3f}", flush=True)
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = ["# The lite planner's rounds: IR by round cap and hot fraction", "",
             f"Made by `{report['command']}` ({report['utc']}, {report['machine']}). "
             f"{report['layers']} default decode layers per config (768 tokens per rank, "
             "top-8, 3 slots per rank, window \"auto\"); medians over the layers (max in "
             "brackets). hot: LiteRules.hot_sixteenths (12, the default: hot above mean + "
             "0.25 (max - mean); 16: every rank above the mean). IR plan: the lite plan's "
             "own token assignment; IR split, no exchange / exchange: the plan's copies with "
             "the tokens split by the dispatch-time water-filling (`assign_tokens`, moves=0 "
             "as the runtime's DeviceSplit runs it / the default exchange step). window: the "
             "smallest rank's, median over the layers.", "",
             "| config | window (us) | IR static | hot | max rounds | rounds run | moves | "
             "replicas | IR plan | IR split, no exchange | IR split, exchange |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['window_min_us']:.0f} | {r['ir_static']:.3f} | "
            f"{r['hot_sixteenths']} | {r['max_rounds']} | {r['rounds']:.0f} | {r['moves']:.0f} "
            f"| {r['replicas']:.0f} | {r['ir_plan']:.3f} ({r['ir_plan_max']:.3f}) | "
            f"{r['ir_split0']:.3f} ({r['ir_split0_max']:.3f}) | {r['ir_split']:.3f} "
            f"({r['ir_split_max']:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/lite_rounds", help="output folder")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decode layers per config")
    args = parser.parse_args(argv)
    run = Manifest.start("experiments.planner.lite_rounds", argv)
    rows = []
    for config in CONFIGS:
        rows += study(config, args.layers)
    write_report(run, Path(args.out), "lite_rounds", {"layers": args.layers, "rows": rows},
                 markdown)
    return 0


def write_report(run: Manifest, out: Path, stem: str, fields: dict, markdown) -> None:
    """OUT/STEM.json (the command, the time, the machine and `fields`), OUT/STEM.md
    (markdown(report)) and the manifest, and print the markdown."""
    import platform

    report = {"command": run.command, "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.platform()}, Python {platform.python_version()}",
              **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    run.write(out, [out / f"{stem}.json", out / f"{stem}.md"])
    print(markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
