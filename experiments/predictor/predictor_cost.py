"""Cost of one lookahead predictor per MoE layer vs the dispatch it must hide behind.

For each model preset (D, E, K), batch size T (tokens per rank) and residual width H it reports:
- analytic FLOPs: 2 T (D E + D H + H E) (router clone + residual MLP; top-k and the load count
  are O(T E) and O(T K));
- the roofline floor max(FLOPs / peak, bytes / HBM bandwidth) with the measured H200 ceilings of
  KINDS.md (788 TFLOP/s bf16, 4.3 TB/s copy);
- measured time of the whole predict_load (logits -> top-k -> [S, E] counts): on CUDA, replays of
  a captured CUDA graph timed with CUDA events (median over repeats; input buffers rotated so that
  repeated runs do not hit L2 with the same data), plus eager launches for reference; on CUDA
  also "chained": `--chain` calls captured one after another in ONE graph (over the rotated
  inputs), one replay between two events divided by the calls: the time the predictor holds a
  stream inside a step's graph, without a graph launch of its own per call (the separate
  replays above each pay one); on CPU, wall-clock medians;
- the dispatch time of that batch under the planner's cost model (probe.planner.CostModel):
  T K (G-1)/G token-expert pairs leave the rank (uniform routing, no deduplication), each
  costing token_time = D * bytes / link bandwidth; the predictor runs on the compute units
  while this network-bound phase runs, so it is hidden if it is shorter.

Run:  python -m experiments.predictor.predictor_cost --device cpu --tokens 64,128 --quick
      python -m experiments.predictor.predictor_cost --device cuda --out results/predictor
Seeded and reproducible; prints a table and writes predictor_cost_{device}.{json,csv} and
predictor_cost_{device}.manifest.json to --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from experiments.manifest import Manifest
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


def variants(pred, src, num_ranks, names: list[str], triton_block: int | None = None) -> dict:
    """name -> fn(h) giving the [S, E] predicted load: "plain" (`predict_load`: router, W1, W2
    as three products), "fused" (router and W1 in one product, W2 accumulated onto the prior:
    `fuse()` + `predict_load(fused=True)`), "triton" (one GEMM + one Triton kernel for SiLU, W2,
    top-k and counts: probe.predictor.fused_load), "triton_cublas" (the fused form's products,
    then a Triton top-k/count kernel), "compiled" (the fused form through torch.compile)."""
    out = {}
    if "plain" in names:
        out["plain"] = lambda h: pred.predict_load(h, src, num_ranks)
    if {"fused", "compiled", "triton"} & set(names):
        pred.fuse()
    if "fused" in names:
        out["fused"] = lambda h: pred.predict_load(h, src, num_ranks, fused=True)
    if "triton" in names or "triton_cublas" in names:
        from probe.predictor.fused_load import fused_available, fused_predict_load

        why = fused_available(pred, src.device)
        if why is None:
            kw = {} if triton_block is None else {"block": triton_block}
            if "triton" in names:
                out["triton"] = lambda h: fused_predict_load(pred, h, src, num_ranks, **kw)
            if "triton_cublas" in names:
                out["triton_cublas"] = lambda h: fused_predict_load(
                    pred, h, src, num_ranks, residual="cublas", **kw)
        else:
            print(f"variant triton skipped: {why}")
    if "compiled" in names:
        out["compiled"] = torch.compile(
            lambda h: pred.predict_load(h, src, num_ranks, fused=True), dynamic=False)
    return out


def event_times_us(step, repeats: int, iters: int) -> list[float]:
    """Per-step times (us), one per repeat: `iters` calls step(i) between two CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            step(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return times


def time_cuda(fn, inputs, tokens_k: int, repeats: int, iters: int, chain: int = 0) -> dict:
    """CUDA-graph replay and eager times (us) of fn(h) -> [S, E] load over rotated inputs; with
    chain > 0 also "chained_us": `chain` calls captured in one graph, per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    outs = []
    with torch.cuda.stream(stream):
        for h in inputs:  # warm-up: cuBLAS handles, kernels selected, compilation
            for _ in range(3):
                fn(h)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    for h in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(fn(h))
        graphs.append(g)
    # Check the captured graph computes the same counts as eager.
    graphs[0].replay()
    torch.cuda.synchronize()
    ref = fn(inputs[0])
    assert torch.equal(outs[0], ref), "graph replay differs from eager"
    assert int(ref.sum()) == tokens_k

    graph_times = event_times_us(lambda i: graphs[i % len(graphs)].replay(), repeats, iters)
    graph_med, graph_min = statistics.median(graph_times), min(graph_times)
    eager_med = statistics.median(event_times_us(lambda i: fn(inputs[i % len(inputs)]),
                                                 repeats, iters))
    out = {"graph_us": graph_med, "graph_min_us": graph_min, "eager_us": eager_med,
           "load": ref}
    if chain > 0:
        whole = torch.cuda.CUDAGraph()
        with torch.cuda.graph(whole):
            last = [fn(inputs[i % len(inputs)]) for i in range(chain)]
        whole.replay()
        torch.cuda.synchronize()
        assert torch.equal(last[0], ref), "chained replay differs from eager"
        # one replay per sample: the chain is the unit, `chain` calls long
        times = event_times_us(lambda i: whole.replay(), repeats, max(1, iters // chain))
        out["chained_us"] = statistics.median(times) / chain
    return out


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
    ap.add_argument("--hidden", default="256,1024", help="residual widths H")
    ap.add_argument("--hardware", default="h200x8")
    ap.add_argument("--num-ranks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--buffers", type=int, default=4, help="rotated input sets")
    ap.add_argument("--chain", type=int, default=20,
                    help="calls captured in one graph for the chained time (0: none)")
    ap.add_argument("--variants", default="plain,fused,triton,triton_cublas",
                    help="on CUDA: plain, fused, triton, triton_cublas, compiled "
                    "(comma-separated; the CPU run times plain only)")
    ap.add_argument("--triton-block", type=int, default=None,
                    help="tokens per Triton program (default: fused_predict_load's)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CPU smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="directory for json/csv")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="print a Markdown table of an earlier run's JSON file and exit")
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.predictor.predictor_cost", argv)
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
    _report(rows, args, run)
    return rows


def _one(args, pred, spec, hardware, hidden, tokens, gen, device, dtype, elem, repeats):
    name, dim, num_experts, top_k = spec.name, spec.hidden, spec.num_experts, spec.top_k
    inputs = [torch.randn(tokens, dim, generator=gen).to(device, dtype)
              for _ in range(args.buffers)]
    src = torch.randint(0, args.num_ranks, (tokens,), generator=gen).to(device)
    timing: dict = {}
    if args.device == "cuda":
        names = args.variants.split(",")
        plain = None
        for vname, fn in variants(pred, src, args.num_ranks, names,
                                  args.triton_block).items():
            try:
                t = time_cuda(fn, inputs, tokens * top_k, repeats, args.iters, args.chain)
            except Exception as err:  # e.g. no compiler: keep the other variants
                print(f"FAILED variant {vname} {name} H={hidden} T={tokens}: {err!r}")
                continue
            load = t.pop("load")
            if plain is None:
                plain = load
                ref32 = copy.deepcopy(pred).float()  # the same predictor in float32
                exact = ref32.predict_load(inputs[0].float(), src, args.num_ranks)
            t["agree_fp32"] = 1.0 - float((load.long() - exact).abs().sum()) / (2 * tokens * top_k)
            # bf16 rounding differs between the forms: 1 - (token-expert pairs that moved) / T K,
            # counted on the [S, E] loads, against plain and against a float32 copy
            t["agree"] = 1.0 - float((load.long() - plain).abs().sum()) / (2 * tokens * top_k)
            timing.update({(k if vname == "plain" else f"{vname}_{k}"): v for k, v in t.items()})
    else:
        timing = time_cpu(pred, inputs, src, args.num_ranks, repeats)
    row = {"model": name, "D": dim, "E": num_experts, "K": top_k, "H": hidden,
           "T": tokens, "device": torch.cuda.get_device_name() if
           args.device == "cuda" else "cpu", "dtype": str(dtype).split(".")[-1],
           **analytic(dim, num_experts, hidden, tokens, top_k, elem), **timing,
           "dispatch_us": dispatch_us(spec, hardware, tokens, args.num_ranks)}
    best = (min(v for k, v in row.items() if k.endswith("graph_us"))
            if args.device == "cuda" else row["eager_us"])
    row["best_us"] = best
    row["fraction_of_dispatch"] = best / row["dispatch_us"]
    return row


GRAPH_COLS = (("graph_us", "plain"), ("fused_graph_us", "fused"),
              ("triton_graph_us", "triton"), ("triton_cublas_graph_us", "triton_cublas"),
              ("compiled_graph_us", "compiled"))
# Chained (`--chain` calls in one graph, per call) where the run timed them.
CHAINED_COLS = (("chained_us", "plain"), ("fused_chained_us", "fused"),
                ("triton_chained_us", "triton"), ("triton_cublas_chained_us", "triton_cublas"))


def markdown(rows: list[dict]) -> str:
    """Rows of a run as a Markdown table (times in microseconds; CUDA-graph replays)."""
    nan = float("nan")
    lines = ["| model | D | E | K | H | T | GFLOP | floor us | plain us | fused us | "
             "triton us | triton_cublas us | compiled us | dispatch us | best / dispatch |",
             "|---" * 15 + "|"]
    for r in rows:
        graph = " | ".join(f"{r.get(k, nan):.1f}" for k, _ in GRAPH_COLS)
        lines.append(f"| {r['model']} | {r['D']} | {r['E']} | {r['K']} | {r['H']} | {r['T']} | "
                     f"{r['flops'] / 1e9:.2f} | {r['floor_us']:.1f} | {graph} | "
                     f"{r['dispatch_us']:.1f} | {r['fraction_of_dispatch']:.2f} |")
    if any(k in r for r in rows for k, _ in CHAINED_COLS):
        lines += ["", "Chained (calls captured one after another in one graph, per call):", "",
                  "| model | H | T | " + " | ".join(f"{label} us" for _, label in CHAINED_COLS)
                  + " |", "|---" * (3 + len(CHAINED_COLS)) + "|"]
        for r in rows:
            chained = " | ".join(f"{r.get(k, nan):.1f}" for k, _ in CHAINED_COLS)
            lines.append(f"| {r['model']} | {r['H']} | {r['T']} | {chained} |")
    return "\n".join(lines)


def _report(rows, args, run):
    nan = float("nan")
    print(f"{'model':16s} {'H':>4s} {'T':>5s} {'GFLOP':>7s} {'floor us':>8s} "
          + " ".join(f"{label + ' us':>11s}" for _, label in GRAPH_COLS)
          + f" {'eager us':>8s} {'dispatch us':>11s} {'best/disp':>9s}")
    for r in rows:
        print(f"{r['model']:16s} {r['H']:4d} {r['T']:5d} {r['flops'] / 1e9:7.3f} "
              f"{r['floor_us']:8.2f} "
              + " ".join(f"{r.get(k, nan):11.2f}" for k, _ in GRAPH_COLS)
              + f" {r['eager_us']:8.2f} {r['dispatch_us']:11.1f} "
              f"{r['fraction_of_dispatch']:9.3f}")
    if args.out is not None and rows:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = args.device
        (args.out / f"predictor_cost_{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with (args.out / f"predictor_cost_{tag}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
        run.write(args.out, [args.out / f"predictor_cost_{tag}.{ext}" for ext in ("json", "csv")],
                  name=f"predictor_cost_{tag}.manifest.json")


if __name__ == "__main__":
    main()
