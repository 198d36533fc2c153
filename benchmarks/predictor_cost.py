"""Cost of one lookahead predictor per MoE layer vs the dispatch it must hide behind.

For each model preset (D, E, K), batch size T (tokens per rank) and residual width H it reports:
- analytic FLOPs: 2 T (D E + D H + H E) (router clone + residual MLP; top-k and the load count
  are O(T E) and O(T K));
- the roofline floor max(FLOPs / peak, bytes / HBM bandwidth) with the measured H200 ceilings of
  KINDS.md (788 TFLOP/s bf16, 4.3 TB/s copy);
- measured time of the whole predict_load (logits -> top-k -> [S, E] counts): on CUDA, replays of
  a captured CUDA graph timed with CUDA events (median over repeats; input buffers rotated so that
  repeated runs do not hit L2 with the same data), plus eager launches for reference; on CPU,
  wall-clock medians;
- the dispatch time of that batch under the planner's cost model (probe.planner.CostModel):
  T K (G-1)/G token-expert pairs leave the rank (uniform routing, no deduplication), each
  costing token_time = D * bytes / link bandwidth; the predictor runs on the compute units
  while this network-bound phase runs, so it is hidden if it is shorter.

Run:  PYTHONPATH=. python benchmarks/predictor_cost.py --device cpu --tokens 64,128 --quick
      PYTHONPATH=. python benchmarks/predictor_cost.py --device cuda --out results/predictor
Seeded and reproducible; prints a table and writes predictor_cost.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from probe.predictor.model import LookaheadPredictor
from probe.specs import resolve_hardware, resolve_model

PEAK_FLOPS = 788e12   # bf16 matrix product measured on an H200 here (KINDS.md)
HBM_BW = 4.3e12       # device-to-device copy measured on an H200 here (KINDS.md)


def analytic(dim: int, num_experts: int, hidden: int, tokens: int, top_k: int,
             elem_bytes: int) -> dict:
    flops = 2 * tokens * (dim * num_experts + dim * hidden + hidden * num_experts)
    weights = (dim * num_experts + num_experts + dim * hidden + hidden + hidden * num_experts
               + num_experts) * elem_bytes
    # h read once, logits written and read once (top-k), ids written, counts written.
    acts = tokens * dim * elem_bytes + 2 * tokens * num_experts * elem_bytes + tokens * top_k * 8
    nbytes = weights + acts
    return {"flops": flops, "bytes": nbytes,
            "floor_us": 1e6 * max(flops / PEAK_FLOPS, nbytes / HBM_BW)}


def dispatch_us(model, hardware, tokens: int, num_ranks: int) -> float:
    pairs_out = tokens * model.top_k * (num_ranks - 1) / num_ranks
    try:
        from probe.planner import CostModel

        token_time = float(CostModel.from_specs(model, hardware, num_ranks=num_ranks)
                           .token_time[0, 1])
    except ImportError:  # the same number from the specs (one node: NVLink bandwidth)
        token_time = model.token_bytes / hardware.link_bw(0, 1)
    return 1e6 * pairs_out * token_time


def time_cuda(pred, inputs, src, num_ranks, repeats: int, iters: int) -> dict:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    outs = []
    with torch.cuda.stream(stream):
        for h in inputs:  # warm-up: cuBLAS handles, kernels selected
            for _ in range(3):
                pred.predict_load(h, src, num_ranks)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    for h in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(pred.predict_load(h, src, num_ranks))
        graphs.append(g)
    # Check the captured graph computes the same counts as eager.
    graphs[0].replay()
    torch.cuda.synchronize()
    ref = pred.predict_load(inputs[0], src, num_ranks)
    assert torch.equal(outs[0], ref), "graph replay differs from eager predict_load"
    assert int(ref.sum()) == src.numel() * pred.top_k

    def run(fn):
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        return statistics.median(times), min(times)

    graph_med, graph_min = run(lambda i: graphs[i % len(graphs)].replay())
    eager_med, _ = run(lambda i: pred.predict_load(inputs[i % len(inputs)], src, num_ranks))
    return {"graph_us": graph_med, "graph_min_us": graph_min, "eager_us": eager_med}


def time_cpu(pred, inputs, src, num_ranks, repeats: int) -> dict:
    for h in inputs:
        pred.predict_load(h, src, num_ranks)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pred.predict_load(inputs[r % len(inputs)], src, num_ranks)
        times.append((time.perf_counter() - t0) * 1e6)
    return {"graph_us": float("nan"), "graph_min_us": float("nan"),
            "eager_us": statistics.median(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--models", default="gpt-oss-120b,qwen3-235b-a22b")
    ap.add_argument("--tokens", default="512,1024,8192", help="T, tokens per rank")
    ap.add_argument("--hidden", default="256,512", help="residual widths H")
    ap.add_argument("--hardware", default="h200x8")
    ap.add_argument("--num-ranks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--buffers", type=int, default=4, help="rotated input sets")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CPU smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="directory for json/csv")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="print a Markdown table of an earlier run's JSON file and exit")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        rows = json.loads(args.markdown.read_text())
        print(markdown(rows))
        return rows
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    elem = 2 if dtype == torch.bfloat16 else 4
    repeats = 3 if args.quick else args.repeats
    hardware = resolve_hardware(args.hardware)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    rows = []
    for name in args.models.split(","):
        spec = resolve_model(name)
        dim, num_experts, top_k = spec.hidden, spec.num_experts, spec.top_k
        for hidden in (int(x) for x in args.hidden.split(",")):
            weight = (torch.randn(num_experts, dim, generator=gen) / dim ** 0.5)
            pred = LookaheadPredictor(weight.to(device), None, hidden=hidden, top_k=top_k,
                                      dtype=dtype).eval()
            with torch.no_grad():  # a trained-looking residual, not zeros (METHOD.md)
                pred.w2.weight.normal_(0, 0.02, generator=None)
            for tokens in (int(x) for x in args.tokens.split(",")):
                try:
                    rows.append(_one(args, pred, spec, hardware, hidden, tokens, gen, device,
                                     dtype, elem, repeats))
                except Exception as err:  # keep the other configurations' numbers
                    print(f"FAILED {name} H={hidden} T={tokens}: {err!r}")
    _report(rows, args)
    return rows


def _one(args, pred, spec, hardware, hidden, tokens, gen, device, dtype, elem, repeats):
    name, dim, num_experts, top_k = spec.name, spec.hidden, spec.num_experts, spec.top_k
    inputs = [torch.randn(tokens, dim, generator=gen).to(device, dtype)
              for _ in range(args.buffers)]
    src = torch.randint(0, args.num_ranks, (tokens,), generator=gen).to(device)
    if args.device == "cuda":
        timing = time_cuda(pred, inputs, src, args.num_ranks, repeats, args.iters)
    else:
        timing = time_cpu(pred, inputs, src, args.num_ranks, repeats)
    row = {"model": name, "D": dim, "E": num_experts, "K": top_k, "H": hidden,
           "T": tokens, "device": torch.cuda.get_device_name() if
           args.device == "cuda" else "cpu", "dtype": str(dtype).split(".")[-1],
           **analytic(dim, num_experts, hidden, tokens, top_k, elem), **timing,
           "dispatch_us": dispatch_us(spec, hardware, tokens, args.num_ranks)}
    best = row["graph_us"] if args.device == "cuda" else row["eager_us"]
    row["fraction_of_dispatch"] = best / row["dispatch_us"]
    return row


def markdown(rows: list[dict]) -> str:
    """Rows of a run as a Markdown table (times in microseconds)."""
    lines = ["| model | D | E | K | H | T | GFLOP | floor us | graph us | eager us | "
             "dispatch us | graph / dispatch |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['D']} | {r['E']} | {r['K']} | {r['H']} | {r['T']} | "
                     f"{r['flops'] / 1e9:.2f} | {r['floor_us']:.1f} | {r['graph_us']:.1f} | "
                     f"{r['eager_us']:.1f} | {r['dispatch_us']:.1f} | "
                     f"{r['fraction_of_dispatch']:.2f} |")
    return "\n".join(lines)


def _report(rows, args):
    header = (f"{'model':16s} {'H':>4s} {'T':>5s} {'GFLOP':>7s} {'floor us':>8s} "
              f"{'graph us':>8s} {'eager us':>8s} {'dispatch us':>11s} {'pred/disp':>9s}")
    print(header)
    for r in rows:
        print(f"{r['model']:16s} {r['H']:4d} {r['T']:5d} {r['flops'] / 1e9:7.3f} "
              f"{r['floor_us']:8.2f} {r['graph_us']:8.2f} {r['eager_us']:8.2f} "
              f"{r['dispatch_us']:11.1f} {r['fraction_of_dispatch']:9.3f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = args.device
        (args.out / f"predictor_cost_{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
        with (args.out / f"predictor_cost_{tag}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
