"""Plan quality from the decode-like loads that experiments/deepmodel/run.py saves (CPU, no model).

For every MoE layer and every step after the first, greedy plans are made from each prediction
(the distilled predictor, the frozen prior, and two history baselines: last step's load and the
mean of the last 8 steps) and from the true load, all scored on the true load (probe.predictor.
evaluate.plan_study: loads rescaled to --tokens-per-rank tokens per rank, the gpt-oss-120b
expert cost with the recorded model's E and K, 8 x H200, 3 replica slots, a window of 3 transfers,
as experiments/predictor/plan_eval.py). Reported per predictor: the mean over layers and steps of
IR(plan from prediction) / IR(plan from truth), overall, per phase (code before the shift,
prose_en + cjk after it) and for the first 8 steps after the shift, and the share of
(layer, step) pairs within 5% of the truth's IR.

  python -m experiments.deepmodel.plans results/deepmodel/run2/decode_loads.npz \
      --out results/deepmodel/run2/plans.json
Writes --out and its manifest (--out with .manifest.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from experiments.manifest import Manifest
from probe.placement import sharded_home
from probe.predictor.cli import _cost
from probe.predictor.evaluate import history_loads, plan_study

HISTORY = ("last_step", "avg_8")
AFTER_SHIFT = 8  # steps counted as "right after the shift"


def _layer(job: tuple) -> tuple[np.ndarray, dict]:
    """IR ratios [predictor, step] of one layer (steps 1 .. n-1) and the layer's mean IRs."""
    truth, preds, kw = job
    res = plan_study(truth[1:], {name: p[1:] for name, p in preds.items()}, **kw)
    ratios = np.array([np.array(res[n]["ir_per_step"]) / np.array(res[n]["ir_truth_per_step"])
                       for n in preds])
    means = {"ir_truth": res["prior"]["ir_truth"], "ir_static": res["prior"]["ir_static"],
             **{f"ir_{n}": res[n]["ir"] for n in preds}}
    return ratios, means


def study(loads: dict, *, cost_model: str, hardware: str, tokens_per_rank: int, slots: int,
          processes: int | None = None) -> dict:
    truth = loads["truth"]  # [n, L', S, E]
    n, num_layers, num_ranks, num_experts = truth.shape
    top_k, shift = int(loads["top_k"]), int(loads["shift_step"])
    cost = _cost(cost_model, hardware, num_experts, top_k, num_ranks)
    kw = {"home": sharded_home(num_experts, num_ranks), "slots": slots,
          "window": slots * float(cost.transfer_time.max()), "cost": cost,
          "tokens_per_rank": tokens_per_rank, "top_k": top_k}
    # every distilled predictor in the file ("distilled", "distilled_h<H>"), then the baselines
    names = [k for k in loads if k.startswith("distilled")] + ["prior"]
    jobs = []
    for j in range(num_layers):
        t = truth[:, j]
        hist = history_loads(t, (1, 8))
        preds = {name: loads[name][:, j] for name in names}
        preds.update({name: hist[name] for name in HISTORY})
        jobs.append((t, preds, kw))
    if processes == 1:
        out = [_layer(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            out = pool.map(_layer, jobs)
    ratios = np.stack([r for r, _ in out], axis=1)  # [predictor, layer, step 1..n-1]
    steps = np.arange(1, n)
    parts = {"all": steps >= 1, "before_shift": steps < shift, "after_shift": steps >= shift,
             f"first_{AFTER_SHIFT}_after_shift": (steps >= shift) & (steps < shift + AFTER_SHIFT)}
    summary = {}
    for i, name in enumerate([*names, *HISTORY]):
        r = ratios[i]
        summary[name] = {part: float(r[:, m].mean()) for part, m in parts.items()}
        summary[name]["within_5pct"] = float((r <= 1.05 + 1e-12).mean())
    return {"config": {"steps": n, "shift_step": shift, "layers": loads["layers"].tolist(),
                       "num_ranks": num_ranks, "num_experts": num_experts, "top_k": top_k,
                       "cost_model": cost_model, "hardware": hardware, "slots": slots,
                       "window_s": kw["window"], "tokens_per_rank": tokens_per_rank},
            "ir_ratio": summary,
            "per_layer": {str(int(layer)): m for layer, (_, m) in zip(loads["layers"], out,
                                                                       strict=True)}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("loads", type=Path, help="decode_loads.npz from experiments/deepmodel/run.py")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--cost-model", default="gpt-oss-120b")
    ap.add_argument("--hardware", default="h200x8")
    ap.add_argument("--tokens-per-rank", type=int, default=512)
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--processes", type=int, default=None)
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.deepmodel.plans", argv)
    if not args.loads.is_file():
        raise SystemExit(f"no such loads file: {args.loads}")
    with np.load(args.loads) as f:
        loads = {k: f[k] for k in f.files}
    t0 = time.time()
    res = study(loads, cost_model=args.cost_model, hardware=args.hardware,
                tokens_per_rank=args.tokens_per_rank, slots=args.slots,
                processes=args.processes)
    res["seconds"] = round(time.time() - t0, 1)
    res["command"] = "python -m experiments.deepmodel.plans " + " ".join(
        argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    run.write(args.out.parent, [args.out], name=args.out.with_suffix(".manifest.json").name)
    cols = ("all", "before_shift", "after_shift", f"first_{AFTER_SHIFT}_after_shift",
            "within_5pct")
    print("| prediction | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in res["ir_ratio"].items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    print(f"({res['seconds']} s) wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
