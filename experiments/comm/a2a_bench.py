"""Dispatch-shaped all-to-all and point-to-point copy times between the GPUs of one host (NCCL).

All-to-all: every rank holds T tokens routed to K experts each, spread evenly over the G ranks
(uniform routing): it sends T K / G rows of D bf16 values to every rank (itself included) with
one `all_to_all_single`, the shape of an expert-parallel dispatch. Timed with CUDA events over
--iters back-to-back calls, median of --repeats; a configuration's time is the slowest rank's.
Printed next to the planner cost model's bandwidth-only estimate for the same G
(T K (G-1)/G rows x D x 2 bytes over the preset's link bandwidth, no latency term), which is the
dispatch time experiments/predictor/predictor_cost.py compares the predictor with.

Point-to-point: rank 0 sends --p2p-mb megabytes to rank 1 (batch_isend_irecv), the copy an
expert replica prefetch makes; reported as GB/s.

  torchrun --nproc-per-node 2 -m experiments.comm.a2a_bench --out results/a2a
  torchrun --nproc-per-node 2 -m experiments.comm.a2a_bench --device cpu --tokens 16 \
      --p2p-mb 1 --iters 2 --repeats 1   # gloo smoke test of the script (float32, wall clock)
With --out, rank 0 writes a2a.json and a2a.manifest.json there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.manifest import Manifest
from probe.specs import resolve_hardware, resolve_model


def timed(fn, iters: int, repeats: int, cuda: bool) -> float:
    """Median over repeats of the mean microseconds per call of fn(): CUDA events on a GPU,
    the wall clock on the CPU."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            times.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(times)


def slowest(us: float, device: str) -> float:
    t = torch.tensor([us], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def model_us(spec, hardware, tokens: int, world: int) -> float:
    from probe.planner import CostModel

    token_time = float(CostModel.from_specs(spec, hardware, num_ranks=world).token_time[0, 1])
    return 1e6 * tokens * spec.top_k * (world - 1) / world * token_time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt-oss-120b,qwen3-235b-a22b")
    ap.add_argument("--tokens", default="128,512,1024,8192", help="T, tokens per rank")
    ap.add_argument("--p2p-mb", default="4,16,64,256")
    ap.add_argument("--hardware", default="h200x8")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda: NCCL, bf16; cpu: gloo, float32 (a smoke test of this script)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.comm.a2a_bench", argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu for gloo)")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dtype = torch.bfloat16 if cuda else torch.float32
    if world < 2:
        raise SystemExit("needs at least 2 ranks (torchrun --nproc-per-node G, G >= 2)")
    hardware = resolve_hardware(args.hardware)
    rows = []
    for name in args.models.split(","):
        spec = resolve_model(name)
        for tokens in (int(x) for x in args.tokens.split(",")):
            per_peer = tokens * spec.top_k // world
            inp = torch.randn(per_peer * world, spec.hidden, device=args.device, dtype=dtype)
            out = torch.empty_like(inp)
            us = slowest(timed(lambda i=inp, o=out: dist.all_to_all_single(o, i),
                               args.iters, args.repeats, cuda), args.device)
            leaving = per_peer * (world - 1) * spec.hidden * inp.element_size()
            rows.append({"kind": "all_to_all", "model": name, "G": world, "T": tokens,
                         "K": spec.top_k, "D": spec.hidden, "bytes_out_per_rank": leaving,
                         "measured_us": us, "GBps_out": leaving / us / 1e3,
                         "cost_model_us": model_us(spec, hardware, tokens, world)})
    for mb in (int(x) for x in args.p2p_mb.split(",")):
        buf = torch.empty(mb * 2**20, dtype=torch.uint8, device=args.device)

        def copy(b=buf):
            if rank == 0:
                ops = [dist.P2POp(dist.isend, b, 1)]
            elif rank == 1:
                ops = [dist.P2POp(dist.irecv, b, 0)]
            else:
                return
            for req in dist.batch_isend_irecv(ops):
                req.wait()

        us = slowest(timed(copy, max(1, args.iters // 5), args.repeats, cuda), args.device)
        rows.append({"kind": "p2p", "G": world, "MB": mb, "measured_us": us,
                     "GBps": mb * 2**20 / us / 1e3,
                     "preset_GBps": hardware.link_bw(0, 1) / 1e9})
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu (gloo)"
        comm = ("NCCL " + ".".join(map(str, torch.cuda.nccl.version()))) if cuda else "gloo"
        print(f"{name} x {world}, torch {torch.__version__}, {comm}")
        for r in rows:
            if r["kind"] == "all_to_all":
                print(f"a2a {r['model']:16s} T={r['T']:5d} {r['bytes_out_per_rank'] / 1e6:7.2f}"
                      f" MB out  {r['measured_us']:8.1f} us  ({r['GBps_out']:6.1f} GB/s)"
                      f"  cost model {r['cost_model_us']:7.1f} us")
            else:
                print(f"p2p {r['MB']:4d} MB  {r['measured_us']:8.1f} us  {r['GBps']:6.1f} GB/s"
                      f"  (preset {r['preset_GBps']:.0f} GB/s)")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            meta = {"device": name, "world": world, "torch": torch.__version__,
                    "comm": comm, "args": vars(args)}
            (args.out / "a2a.json").write_text(
                json.dumps({"meta": {**meta, "out": str(args.out)}, "rows": rows},
                           indent=1, default=str) + "\n")
            run.write(args.out, [args.out / "a2a.json"], name="a2a.manifest.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
