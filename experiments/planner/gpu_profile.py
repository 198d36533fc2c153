"""Launch each GPU planner kernel on one ep=8 decode layer, for a profiler to read.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --section LaunchStats --section InstructionStats \\
        -k regex:'_greedy_kernel|_assign_kernel|_parallel_kernel' -c 8 \\
        python3 -m experiments.planner.gpu_profile --launches 2 --repeats 0

(experiments/planner/gpu_profile.sh runs exactly that and saves the report.) With `--lite`, the
lite planner's kernel (probe.planner.lite_cuda) alone, on one decode layer at ep=8 / 128 experts
and at ep=64 / 256 (experiments/planner/lite_ncu.sh profiles it line by line). The greedy
(probe.planner.greedy_cuda, k_max 16 and 0: the start alone), the assigner
(probe.planner.assign_cuda) and the parallel greedy (probe.planner.parallel_cuda) each get
one layer of experiments.planner.gpu_latency's ep=8 / 128 experts decode batch, launched
`--launches` times in a row (the first compiles); each launch is also timed with CUDA events
and the medians printed, so the same run says how long a launch takes without the profiler.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from experiments.planner.gpu_greedy import decode_batch
from experiments.planner.gpu_harness import event_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=4, help="launches per kernel")
    parser.add_argument("--tokens", type=int, default=768, help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed launches per kernel after the others (0: none)")
    parser.add_argument("--lite", action="store_true",
                        help="the lite planner's kernel alone, at ep=8 and ep=64")
    args = parser.parse_args(argv)

    import torch

    runs = lite_runs(torch) if args.lite else planner_runs(torch, args.tokens)
    medians = {}
    for name, (fn, inputs) in runs.items():
        for _ in range(args.launches):
            fn(*inputs)
        torch.cuda.synchronize()
        if not args.repeats:
            continue
        medians[name] = float(np.median(event_us(lambda: fn(*inputs), args.repeats, 1.0)))  # noqa: B023
        print(f"{name}: {medians[name]:.1f} us per eager launch (median of up to 20)",
              flush=True)
    print(json.dumps(medians))
    return 0


def lite_runs(torch) -> dict:
    """The lite kernel's one-layer launches (default rules, 128 threads; 256 at ep=64)."""
    from experiments.planner.gpu_harness import decode_layers
    from probe.planner.lite import LiteRules
    from probe.planner.lite_cuda import CudaLite

    runs = {}
    for name, ranks, experts, threads in (("lite ep=8", 8, 128, 128),
                                          ("lite ep=64", 64, 256, 256)):
        load, home, slots, window, cost = decode_layers("qwen3-235b-a22b", "h200x8", ranks,
                                                        experts, 1)
        planner = CudaLite(home[0], slots, cost, LiteRules(), threads=threads)
        runs[name] = (planner.plan, (torch.as_tensor(load, device="cuda"),
                                     torch.as_tensor(window, device="cuda")))
    return runs


def planner_runs(torch, tokens: int) -> dict:
    """The greedy (k_max 16 and 0), the assigner and the parallel greedy on one ep=8 layer."""
    from experiments.planner.gpu_latency import copies_of
    from probe.planner.assign_cuda import DeviceAssigner
    from probe.planner.greedy_cuda import CudaGreedy
    from probe.planner.parallel_cuda import CudaParallel

    batch = decode_batch("qwen3-235b-a22b", "h200x8", 8, 128, 1, tokens_per_rank=tokens)
    load, home, slots, window, cost, rules = batch
    load_t = torch.as_tensor(load, device="cuda")
    window_t = torch.as_tensor(window, device="cuda")
    copies_t = torch.as_tensor(copies_of(batch, 0), device="cuda").unsqueeze(0)
    runs = {
        "greedy k_max=16": (CudaGreedy(home[0], slots, cost, rules, num_layers=1).plan,
                            (load_t, window_t)),
        "greedy k_max=0": (CudaGreedy(home[0], slots, cost, rules, num_layers=1,
                                      max_moves=0).plan, (load_t, window_t)),
        "assign": (DeviceAssigner(cost, 128, 1), (load_t, copies_t)),
    }
    from experiments.planner import gpu_parallel as gp

    pbatch = gp.decode_batch("qwen3-235b-a22b", "h200x8", 8, 128, 1,
                             tokens_per_rank=tokens)
    runs["parallel"] = (CudaParallel(pbatch[1][0], pbatch[2], pbatch[4], pbatch[5],
                                     num_layers=1).plan,
                        (torch.as_tensor(pbatch[0], device="cuda"),
                         torch.as_tensor(pbatch[3], device="cuda")))
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
