"""Depth test: train a deeper small MoE, distil lookahead predictors, score held out.

One script for one GPU call: (1) train experiments/smallmodel/train.py --arch deep (20 layers,
otherwise as the 8-layer "small" model) for --minutes; (2) teacher-forced (router input, router
logits) pairs from random windows of the corpus' train split in the decode traffic's domain mix
(experiments/predictor/distill_more.py's window draw, positions >= --min-pos of --window-byte
windows); (3) distil a PredictorSet (probe.predictor) on them; (4) score the frozen prior and the
distilled predictor per layer on teacher-forced windows of the held-out corpus (same mix, never
trained on), plus the cosine similarity of consecutive router inputs. Writes summary.json,
layers.csv, decode_loads.npz, train_summary.json and manifest.json to --out.

  GPU: python -m experiments.deepmodel.run --minutes 4.5 --out $OUT
  CPU smoke test (about a minute):
  python -m experiments.deepmodel.run --arch tiny --steps 3 --device cpu \
      --train-tokens 4000 --eval-tokens 2000 --window 128 --min-pos 16 --out /tmp/deep_out
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.manifest import Manifest
from experiments.predictor import distill_more
from probe.predictor.evaluate import (
    fidelity,
    predicted_ids,
    step_loads,
    true_ids,
)
from probe.predictor.model import PredictorSet
from probe.predictor.stream import router_pairs, train_streaming
from probe.runtime.checkpoint import load_model
from probe.runtime.smallmodel import encode, load_corpus

ROOT = Path(__file__).resolve().parents[2]


def collect(model, batches, tokens: int, min_pos: int, micro: int) -> tuple[np.ndarray, ...]:
    """Pairs (hidden [n, L, D], logits [n, L, E]) from window batches until `tokens` rows."""
    hs, ls, n = [], [], 0
    for windows, *_ in batches:
        for i in range(0, len(windows), micro):
            h, lg = router_pairs(model, windows[i:i + micro], min_pos=min_pos)
            hs.append(h)
            ls.append(lg)
            n += h.shape[0]
        if n >= tokens:
            break
    return np.concatenate(hs)[:tokens], np.concatenate(ls)[:tokens]


def heldout_batches(path: Path, mix: dict, window: int, min_pos: int, per_batch: int, seed: int):
    """Random windows of the held-out file's documents, domains drawn by `mix`."""
    docs: dict[str, list[np.ndarray]] = {}
    for rec in load_corpus(path):
        if rec["domain"] in mix:
            docs.setdefault(rec["domain"], []).append(encode(rec["text"]))
    domains = sorted(docs)
    p = np.array([mix[d] for d in domains], np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    while True:
        out = []
        while len(out) < per_batch:
            pool = docs[domains[int(rng.choice(len(domains), p=p))]]
            doc = pool[int(rng.integers(len(pool)))]
            if doc.shape[0] > window:
                s = int(rng.integers(doc.shape[0] - window + 1))
                doc = doc[s:s + window]
            if doc.shape[0] > min_pos:
                out.append(doc)
        yield (out,)


def decode_phases(path: Path, *, phases, ranks: int, per_rank: int, pre: int, steps: int,
                  seed: int) -> list[list[np.ndarray]]:
    """Per phase, ranks * per_rank held-out windows of exactly pre + steps bytes, domains drawn
    uniformly from the phase's domains (rank r holds windows r * per_rank ...)."""
    out = []
    for i, domains in enumerate(phases):
        mix = {d: 1 for d in domains}
        draw = heldout_batches(path, mix, pre + steps, pre, 4 * ranks * per_rank, seed + 100 + i)
        chosen: list[np.ndarray] = []
        for _ in range(100):
            if len(chosen) >= ranks * per_rank:
                break
            (batch,) = next(draw)
            chosen += [w for w in batch if w.shape[0] == pre + steps]
        if len(chosen) < ranks * per_rank:
            raise SystemExit(f"too few held-out {'/'.join(domains)} documents longer than "
                             f"{pre + steps} bytes for {ranks * per_rank} requests")
        out.append(chosen[: ranks * per_rank])
    return out


@torch.no_grad()
def decode_like_loads(model, psets: dict[str, PredictorSet], phases: list[list[np.ndarray]], *,
                      ranks: int, per_rank: int, pre: int, micro: int) -> dict:
    """Teacher-forced decode-like traffic and its loads.

    Each phase's ranks * per_rank windows advance together one byte per step after `pre` bytes
    of context: step t of the phase is every window's byte pre + t, so consecutive steps are the
    same requests one token on, and at a phase change every request is replaced (the abrupt
    domain shift of experiments/smallmodel/record.py's decode recording). Every token of a step is
    counted (no sampling). psets: name -> distilled PredictorSet (the first also gives the
    frozen prior). Returns {"truth", "prior", each name: int32 [n, L', S, E] over the layers
    predicted, "layers", "hidden", "logits", "step", "src_rank"}.
    """
    pset = next(iter(psets.values()))
    k, e = pset.top_k, pset.num_experts
    hs, ls, steps, srcs, offset = [], [], [], [], 0
    for windows in phases:
        n_steps = windows[0].shape[0] - pre
        h, lg = collect(model, [(windows,)], len(windows) * n_steps, pre, micro)
        w = np.repeat(np.arange(len(windows)), n_steps)
        hs.append(h)
        ls.append(lg)
        steps.append(offset + np.tile(np.arange(n_steps), len(windows)))
        srcs.append(w // per_rank)
        offset += n_steps
    hidden, logits = np.concatenate(hs), np.concatenate(ls)
    step, src = np.concatenate(steps), np.concatenate(srcs)
    ids = range(offset)
    which = [("prior", pset, True), *((name, p, False) for name, p in psets.items())]
    loads = {"truth": [], **{name: [] for name, _, _ in which}}
    for layer in pset.layers:
        sel = pset[layer].select
        loads["truth"].append(step_loads(true_ids(logits, layer, k, sel), step, src, ids,
                                         ranks, e))
        for name, p, prior in which:
            loads[name].append(step_loads(predicted_ids(p, hidden, layer, k, prior=prior),
                                          step, src, ids, ranks, e))
    out = {name: np.stack(v, axis=1).astype(np.int32) for name, v in loads.items()}
    return {**out, "layers": np.asarray(pset.layers), "hidden": hidden, "logits": logits,
            "step": step, "src_rank": src}


def consecutive_cosine(hidden: np.ndarray) -> list[float]:
    """Mean cosine between router inputs of layers l-1 and l, l = 1..L-1. hidden [n, L, D]."""
    h = torch.from_numpy(hidden).float()
    return [float(torch.nn.functional.cosine_similarity(h[:, i - 1], h[:, i], dim=-1).mean())
            for i in range(1, h.shape[1])]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="deep")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--corpus", type=Path, default=Path("data/smallmodel/corpus.jsonl"))
    ap.add_argument("--heldout", type=Path, default=Path("data/smallmodel/heldout.jsonl"))
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/deepmodel_ckpt"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-tokens", type=int, default=1_500_000)
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--window", type=int, default=640)
    ap.add_argument("--min-pos", type=int, default=64)
    ap.add_argument("--micro", type=int, default=32, help="windows per forward pass")
    ap.add_argument("--hidden", default="1024",
                    help="predictor residual MLP width(s), comma-separated: each is distilled "
                    "on the same pairs; the first is reported as 'distilled', the others as "
                    "'distilled_h<H>'")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=4096, help="distillation minibatch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-args", default="", help="extra train.py arguments")
    ap.add_argument("--decode-steps", type=int, default=64,
                    help="decode-like steps per phase (code, then prose_en + cjk)")
    ap.add_argument("--decode-pre", type=int, default=64, help="context bytes before step 0")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--per-rank", type=int, default=32, help="requests per rank and step")
    ap.add_argument("--no-train", action="store_true",
                    help="score the model already in --ckpt (e.g. models/smallmodel) instead")
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.deepmodel.run", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.time()
    budget = (["--minutes", str(args.minutes)] if args.minutes is not None
              else ["--steps", str(args.steps or 2000)])
    cmd = [sys.executable, "-m", "experiments.smallmodel.train", "--arch", args.arch,
           "--corpus", str(args.corpus), "--out", str(args.ckpt), "--device", args.device,
           *budget, *args.train_args.split()]
    if args.no_train:
        if not (args.ckpt / "train_summary.json").is_file():
            raise SystemExit(f"--no-train: no trained model in {args.ckpt} (train_summary.json)")
    else:
        print(" ".join(cmd), flush=True)
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": path})
    times["train_s"] = round(time.time() - t0, 1)
    train_summary = json.loads((args.ckpt / "train_summary.json").read_text())
    # Kept in --out at once, so a later step running out of time still leaves the training run.
    (args.out / "train_summary.json").write_text(json.dumps(train_summary, indent=1) + "\n")

    t1 = time.time()
    dev = torch.device(args.device)
    model = load_model(args.ckpt, device=dev).eval()
    dm = distill_more
    ns = argparse.Namespace(mix="decode", corpus=args.corpus, exclude_rec=None, exclude_k=32,
                            seed=args.seed, batch_windows=args.micro * 8, window=args.window,
                            min_pos=args.min_pos)
    docs, domains, weights, doc_index, banned = dm._corpus_stream(ns)
    batches = dm._window_batches(ns, docs, domains, weights, doc_index, banned)
    h_tr, l_tr = collect(model, batches, args.train_tokens, args.min_pos, args.micro)
    ho = heldout_batches(args.heldout, dm.DECODE_MIX, args.window, args.min_pos,
                         args.micro * 8, args.seed + 1)
    h_ev, l_ev = collect(model, ho, args.eval_tokens, args.min_pos, args.micro)
    times["collect_s"] = round(time.time() - t1, 1)
    print(f"pairs: train {h_tr.shape}, held-out {h_ev.shape} ({times['collect_s']} s)",
          flush=True)

    psets: dict[str, PredictorSet] = {}
    distill: dict[str, dict] = {}
    for i, width in enumerate(int(x) for x in args.hidden.split(",")):
        name = "distilled" if i == 0 else f"distilled_h{width}"
        t2 = time.time()
        torch.manual_seed(args.seed)
        psets[name] = PredictorSet.from_model(model, hidden=width).to(dev)
        res = train_streaming(psets[name], h_tr, l_tr, epochs=args.epochs, lr=args.lr,
                              seed=args.seed, batch_size=args.batch_size,
                              chunk=max(65536, args.batch_size))
        times[f"{name}_s"] = round(time.time() - t2, 1)
        distill[name] = {"epochs": args.epochs, "hidden": width, "lr": args.lr,
                         "batch_size": args.batch_size, "tokens_seen": res["tokens_seen"],
                         "loss": res["loss"]}
    pset = psets["distilled"]
    n = h_ev.shape[0]
    step, src = np.arange(n) // 128, (np.arange(n) % 128) // 16
    which = [("frozen", pset, True), *((name, p, False) for name, p in psets.items())]
    rows = {name: fidelity(p, h_ev, l_ev, step=step, src_rank=src, num_ranks=8, prior=prior)
            for name, p, prior in which}
    cos = consecutive_cosine(h_ev[: min(n, 50_000)])
    keys = ("topk_acc", "half_hit", "recall_2k")
    summary = {
        "arch": train_summary.get("args", {}).get("arch", args.arch),
        "layers": int(h_ev.shape[1]), "params": train_summary["params"],
        "train_steps": train_summary["steps"], "train_tokens": train_summary["tokens"],
        "heldout_ce": train_summary["final_val_ce"],
        "val_ce_by_domain": train_summary.get("val_ce_by_domain"),
        "pairs_train": int(h_tr.shape[0]), "pairs_heldout": int(n),
        "distill": distill["distilled"],
        "distill_other_widths": {nm: d for nm, d in distill.items() if nm != "distilled"},
        "mean": {nm: {k: float(np.mean([r[k] for r in rs])) for k in keys}
                 for nm, rs in rows.items()},
        "consecutive_cosine": cos, "mean_consecutive_cosine": float(np.mean(cos)),
        "times": {**times, "total_s": round(time.time() - t0, 1)},
        "device": train_summary.get("device"), "argv": sys.argv,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with (args.out / "layers.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "which", *keys, "expert_load_err", "cos_prev"])
        for nm, rs in rows.items():
            for r in rs:
                w.writerow([r["layer"], nm, *(round(r[k], 4) for k in keys),
                            round(r.get("expert_load_err", float("nan")), 4),
                            round(cos[r["layer"] - 1], 4)])
    print(json.dumps({k: summary[k] for k in ("layers", "heldout_ce", "mean",
                                               "mean_consecutive_cosine", "times")}, indent=1),
          flush=True)

    # Decode-like held-out traffic: per-step loads for experiments/deepmodel/plans.py.
    t3 = time.time()
    rec = dm._record_module()
    phases = decode_phases(args.heldout, phases=(rec.CODE_DOMAINS, rec.AFTER_SHIFT_DOMAINS),
                           ranks=args.ranks, per_rank=args.per_rank, pre=args.decode_pre,
                           steps=args.decode_steps, seed=args.seed)
    dl = decode_like_loads(model, psets, phases, ranks=args.ranks, per_rank=args.per_rank,
                           pre=args.decode_pre, micro=args.micro)
    np.savez_compressed(args.out / "decode_loads.npz", truth=dl["truth"], prior=dl["prior"],
                        **{name: dl[name] for name in psets}, layers=dl["layers"],
                        shift_step=np.int64(args.decode_steps), top_k=np.int64(pset.top_k))
    drows = {name: fidelity(p, dl["hidden"], dl["logits"], step=dl["step"],
                            src_rank=dl["src_rank"], num_ranks=args.ranks, prior=prior)
             for name, p, prior in which}
    summary["decode_like"] = {
        "steps": 2 * args.decode_steps, "shift_step": args.decode_steps,
        "ranks": args.ranks, "per_rank": args.per_rank, "pre": args.decode_pre,
        "tokens": int(dl["step"].size),
        "mean": {nm: {k: float(np.mean([r[k] for r in rs])) for k in keys}
                 for nm, rs in drows.items()},
        "layers": {nm: [{k: round(r[k], 4) for k in ("layer", *keys)} for r in rs]
                   for nm, rs in drows.items()}}
    times["decode_like_s"] = round(time.time() - t3, 1)
    summary["times"] = {**times, "total_s": round(time.time() - t0, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"decode_like": summary["decode_like"]["mean"],
                      "times": summary["times"]}, indent=1))
    run.write(args.out, [args.out / name for name in ("train_summary.json", "summary.json",
                                                      "layers.csv", "decode_loads.npz")])
    return summary


if __name__ == "__main__":
    main()
