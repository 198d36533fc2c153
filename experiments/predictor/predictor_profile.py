"""Where the Triton predictor's time goes, and which launch shape is fastest (CUDA only).

For each model preset, residual width H and batch T it times, as CUDA-graph replays:
- "gemm": the one product [T, D] x [D, E + H] (router clone and W1 side by side);
- "zero": the memset of the [S, E] counts;
- "kernel": the Triton kernel alone (SiLU, W2, top-k, counts) for every (BLOCK, CHUNK,
  num_warps) in the sweep;
- "whole": `fused_predict_load` with the best kernel shape, and with the default shape; and
  "whole_default_in10": the default shape, ten calls per graph (per call: the graph's own
  launch cost spread, as when the predictor is one part of a layer's graph).
Every kernel shape is first checked to give the same counts as the default shape.

Run:  python3 -m experiments.predictor.predictor_profile --out $OUT
Prints a table and writes predictor_profile.{json,csv} and manifest.json to --out.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
from pathlib import Path

import torch

from experiments.manifest import Manifest
from experiments.predictor.predictor_cost import event_times_us
from probe.predictor.model import LookaheadPredictor
from probe.specs import resolve_model


def graph_us(fn, repeats: int = 7, iters: int = 100, calls: int = 1) -> float:
    """Median time (us) per fn() call, from replays of a CUDA graph that calls fn() `calls`
    times in a row (calls > 1 spreads the graph's own launch cost, as inside a layer's graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return statistics.median(event_times_us(lambda _: g.replay(), repeats, iters)) / calls


def profile_one(pred, spec, tokens: int, num_ranks: int, shapes, gen) -> list[dict]:
    from probe.predictor import fused_load as fl

    dev = torch.device("cuda")
    h = torch.randn(tokens, spec.hidden, generator=gen).to(dev, torch.bfloat16)
    src = torch.randint(0, num_ranks, (tokens,), generator=gen).to(dev)
    weight_t, bias, w2_t = pred._fused
    num_experts, hidden, top_k = pred.num_experts, pred.hidden, pred.top_k
    y = torch.addmm(bias, h, weight_t)
    out = torch.zeros(num_ranks * num_experts, dtype=torch.int32, device=dev)
    base = {"model": spec.name, "H": hidden, "T": tokens}
    rows = [{**base, "part": "gemm", "us": graph_us(lambda: torch.addmm(bias, h, weight_t))},
            {**base, "part": "zero", "us": graph_us(out.zero_)}]
    ref = fl.fused_predict_load(pred, h, src, num_ranks)

    def launch(block, chunk, warps):
        grid = (fl.triton.cdiv(tokens, block),)
        fl._residual_topk_count[grid](y, w2_t, src, out, tokens, y.stride(0), E=num_experts,
                                      H=hidden, K=top_k, BLOCK=block,
                                      CHUNK=min(chunk, hidden), num_warps=warps)

    kernel = []
    for block, chunk, warps in shapes:
        out.zero_()
        launch(block, chunk, warps)
        same = torch.equal(out.view(num_ranks, num_experts), ref)
        us = graph_us(lambda b=block, c=chunk, w=warps: launch(b, c, w))
        kernel.append({**base, "part": "kernel", "block": block, "chunk": chunk,
                       "warps": warps, "us": us, "same_counts": same})
    rows += kernel
    best = min([r for r in kernel if r["same_counts"]] or kernel, key=lambda r: r["us"])
    rows.append({**base, "part": "whole_default",
                 "us": graph_us(lambda: fl.fused_predict_load(pred, h, src, num_ranks))})
    rows.append({**base, "part": "whole_best", "block": best["block"], "chunk": best["chunk"],
                 "warps": best["warps"],
                 "us": graph_us(lambda: fl.fused_predict_load(
                     pred, h, src, num_ranks, block=best["block"], chunk=best["chunk"],
                     num_warps=best["warps"]))})
    rows.append({**base, "part": "whole_default_in10", "us": graph_us(
        lambda: fl.fused_predict_load(pred, h, src, num_ranks), iters=20, calls=10)})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt-oss-120b,qwen3-235b-a22b")
    ap.add_argument("--tokens", default="256,512,768,1024")
    ap.add_argument("--hidden", default="256,1024")
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--chunks", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--num-ranks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.predictor.predictor_profile", argv)
    if not torch.cuda.is_available():
        raise SystemExit("predictor_profile needs a CUDA GPU")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    shapes = list(itertools.product(ints(args.blocks), ints(args.chunks), ints(args.warps)))
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for name in args.models.split(","):
        spec = resolve_model(name)
        for hidden in ints(args.hidden):
            weight = torch.randn(spec.num_experts, spec.hidden, generator=gen) / spec.hidden ** 0.5
            pred = LookaheadPredictor(weight.cuda(), None, hidden=hidden, top_k=spec.top_k,
                                      dtype=torch.bfloat16).eval()
            with torch.no_grad():
                pred.w2.weight.normal_(0, 0.02)
            pred.fuse()
            for tokens in ints(args.tokens):
                part = profile_one(pred, spec, tokens, args.num_ranks, shapes, gen)
                rows += part
                by = {r["part"]: r for r in part}
                best = min((r for r in part if r["part"] == "kernel"), key=lambda r: r["us"])
                print(f"{name:16s} H={hidden:5d} T={tokens:5d} gemm {by['gemm']['us']:6.2f} "
                      f"zero {by['zero']['us']:5.2f} kernel best {best['us']:6.2f} "
                      f"(b{best['block']} c{best['chunk']} w{best['warps']}, same "
                      f"{best['same_counts']}) whole default {by['whole_default']['us']:6.2f} "
                      f"best {by['whole_best']['us']:6.2f} in10 "
                      f"{by['whole_default_in10']['us']:6.2f}", flush=True)
                if args.out:  # after every configuration: a timeout keeps what was measured
                    write(args.out, rows)
                    run.write(args.out, [args.out / "predictor_profile.json",
                                         args.out / "predictor_profile.csv"])
    return rows


def write(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictor_profile.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
    keys = ["model", "H", "T", "part", "block", "chunk", "warps", "us", "same_counts"]
    with (out / "predictor_profile.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
