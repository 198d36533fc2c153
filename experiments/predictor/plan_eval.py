"""Plan-quality study of already-trained predictors on the decode recording (no training).

Takes a predictor file (e.g. distilled on corpus text by experiments/predictor/distill_more.py, so
never trained on the recording) and writes the study's report (probe.predictor.report) for it:

- fidelity of the frozen prior and of the predictors on the held-out steps (the study's split);
- plan quality on the held-out steps: greedy plans from the prediction, the prior and the
  history baselines, scored on the true load, against the plan from the truth;
- the whole recording in time order (both domains and the shift), every step predicted before
  any update: with --online-updates 0 the predictors stay fixed (all 160 steps are then unseen
  traffic for corpus-trained predictors), with 1 they also adapt online after each step.

  python -m experiments.predictor.plan_eval --predictors W.safetensors \
      --out results/predictor/decode_more --online-updates 0
Writes the report's files (probe.predictor.report.write_report) and manifest.json to --out.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from experiments.manifest import Manifest
from probe.placement import sharded_home
from probe.predictor.cli import _cost
from probe.predictor.evaluate import fidelity
from probe.predictor.model import PredictorSet
from probe.predictor.report import write_report
from probe.predictor.samples import load_samples, split_steps
from probe.predictor.study import _online_part, _plan_part
from probe.traces.trace import RoutingTrace


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictors", type=Path, required=True)
    ap.add_argument("--samples", type=Path,
                    default=Path("/tmp/predrec/decode.samples.safetensors"))
    ap.add_argument("--trace", type=Path, default=Path("/tmp/predrec/decode.trace.safetensors"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-ranks", type=int, default=8)
    ap.add_argument("--cost-model", default="gpt-oss-120b")
    ap.add_argument("--hardware", default="h200x8")
    ap.add_argument("--tokens-per-rank", type=int, default=512)
    ap.add_argument("--max-plan-steps", type=int, default=40)
    ap.add_argument("--online-updates", type=int, default=0)
    ap.add_argument("--online-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summary", default=None, help="text of the report's first paragraph")
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.predictor.plan_eval", argv)
    torch.set_num_threads(args.threads)

    pset = PredictorSet.load(args.predictors)
    data = load_samples(args.samples)
    trace = RoutingTrace.load(args.trace)
    full = trace.load_counts()  # int32 [n, L, S, E]
    cost = _cost(args.cost_model, args.hardware, data.num_experts, pset.top_k, args.num_ranks)
    home = sharded_home(data.num_experts, args.num_ranks)
    train_mask, test_mask = split_steps(data.step, held_out=0.25, block=8, seed=0)
    test = data.subset(test_mask)
    kw = dict(step=test.step, src_rank=test.src_rank, num_ranks=args.num_ranks, home=home)
    res: dict = {"config": {"num_samples": int(data.step.size),
                            "num_steps_sampled": int(np.unique(data.step).size),
                            "test_samples": int(test_mask.sum()),
                            "train_samples": int(train_mask.sum()), "held_out": 0.25,
                            "block": 8, "seed": 0, "hidden": pset.hidden, "top_k": pset.top_k,
                            "num_ranks": args.num_ranks,
                            "tokens_per_rank": args.tokens_per_rank, "epochs": "-", "lr": "-",
                            "predictors": str(args.predictors)}}
    t0 = time.time()
    res["prior"] = fidelity(pset, test.hidden, test.logits, prior=True, **kw)
    res["distilled"] = fidelity(pset, test.hidden, test.logits, **kw)
    print(f"fidelity done ({time.time() - t0:.0f} s)", flush=True)
    res["plans"] = _plan_part(pset, test, full, cost=cost, home=home, num_ranks=args.num_ranks,
                              tokens_per_rank=args.tokens_per_rank, slots=3, window=None,
                              layers=None, max_steps=args.max_plan_steps, min_step_samples=32,
                              log=print)
    print(f"plans done ({time.time() - t0:.0f} s)", flush=True)
    plan_kw = {"home": home, "slots": 3, "cost": cost, "top_k": pset.top_k,
               "tokens_per_rank": args.tokens_per_rank,
               "window": 3 * float(cost.transfer_time.max())}
    online = _online_part(copy.deepcopy(pset), data, full, list(trace.step_tags),
                          num_ranks=args.num_ranks, updates=args.online_updates,
                          lr=args.online_lr, plan_kw=plan_kw)
    online["note"] = ("the corpus-distilled predictors, fixed: no update from the recording"
                      if args.online_updates == 0 else
                      f"{args.online_updates} AdamW update(s) of lr {args.online_lr} per step, "
                      "starting from the corpus-distilled predictors")
    online["name"] = "fixed" if args.online_updates == 0 else "online"
    res["online"] = online
    print(f"online done ({time.time() - t0:.0f} s)", flush=True)
    command = "python -m experiments.predictor.plan_eval " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("summary", "threads"))
    write_report(res, args.out, command=command,
                 title="Corpus-distilled lookahead predictor on the small model's decode",
                 summary=args.summary)
    run.write(args.out, [args.out / name for name in ("results.json", "fidelity.csv",
                                                      "plans.csv", "online.csv", "report.md")
                         if (args.out / name).is_file()])
    print(f"wrote {args.out}/report.md")


if __name__ == "__main__":
    main()
