"""The host round trip a host planner or host assignment pays in side mode, measured.

    python3 -m experiments.planner.round_trip --device cuda --out results/round_trip

probe.sim.costs charges a planner or a dispatch-time assignment that runs on the host, fed
from the GPU and feeding it (side mode), its host time plus `host_round_trip_s`. This script
measures that round trip on the GPU machine with torch: a kernel writes the layer's load
(int64 [G, E]) on the GPU, it is copied to pinned host memory, the host waits for the copy
(an event's synchronize) and reads it, a plan of `plan_bytes` is copied from pinned host
memory back, and a kernel reads it. CUDA events before the first kernel and after the last
one time three sequences (median of the samples, us):
- gpu: the two kernels alone (what planning on the GPU would keep of the sequence);
- async: the two kernels and both copies queued without the host waiting;
- round trip: the full sequence, the host waiting for the load and queuing the plan's copy
  and the second kernel only then.
round trip - gpu is what `host_round_trip_s` stands for: the copies, the host's wake-up after
the synchronize and its launches of the copy and the kernel (the host planner's own time not
included: it is charged apart). Sizes: ep=8 / 128 experts and ep=64 / 256, a plan of 8 KB and
64 KB.
"""

from __future__ import annotations

import sys
import time

from experiments.planner import gpu_harness as harness

SIZES = (("ep=8, E=128", 8, 128, 8 << 10), ("ep=64, E=256", 64, 256, 64 << 10))
REPEATS = 300


def measure(ranks: int, experts: int, plan_bytes: int, repeats: int) -> dict:
    import numpy as np
    import torch

    load = torch.zeros(ranks * experts, dtype=torch.int64, device="cuda")
    plan = torch.zeros(plan_bytes // 8, dtype=torch.int64, device="cuda")
    load_host = torch.empty_like(load, device="cpu").pin_memory()
    plan_host = torch.ones(plan_bytes // 8, dtype=torch.int64).pin_memory()
    copied = torch.cuda.Event()

    def gpu():
        load.add_(1)
        plan.add_(1)

    def queued():
        load.add_(1)
        load_host.copy_(load, non_blocking=True)
        plan.copy_(plan_host, non_blocking=True)
        plan.add_(1)

    def round_trip():
        load.add_(1)
        load_host.copy_(load, non_blocking=True)
        copied.record()
        copied.synchronize()
        int(load_host[0])  # the host reads the load
        plan.copy_(plan_host, non_blocking=True)
        plan.add_(1)

    out = {}
    for name, fn in (("gpu", gpu), ("async", queued), ("round_trip", round_trip)):
        for _ in range(20):  # warm-up
            fn()
        torch.cuda.synchronize()
        samples = harness.event_us(fn, repeats, budget_s=60.0)
        out[f"{name}_us"] = float(np.median(samples))
        out[f"{name}_p90_us"] = float(np.percentile(samples, 90))
    out["host_round_trip_us"] = out["round_trip_us"] - out["gpu_us"]
    return out


def markdown(report: dict) -> str:
    lines = [f"# The host round trip, measured ({report['gpu']})", "",
             f"Made by `{report['command']}` ({report['utc']}); {report['repeats']} samples "
             "each, medians (p90 in brackets), us. 'host round trip' = round trip - gpu: what "
             "probe.sim.costs' `host_round_trip_s` stands for.", "",
             "| size | load bytes | plan bytes | gpu | async | round trip | host round trip |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['size']} | {r['load_bytes']} | {r['plan_bytes']} | "
                     f"{r['gpu_us']:.1f} ({r['gpu_p90_us']:.1f}) | "
                     f"{r['async_us']:.1f} ({r['async_p90_us']:.1f}) | "
                     f"{r['round_trip_us']:.1f} ({r['round_trip_p90_us']:.1f}) | "
                     f"{r['host_round_trip_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import json
    from pathlib import Path

    from experiments.manifest import Manifest

    args = harness.parse_args(__doc__, "round_trip", argv, "unused")
    import torch

    if args.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("round_trip needs a GPU")
    run = Manifest.start("experiments.planner.round_trip", argv)
    rows = []
    for size, ranks, experts, plan_bytes in SIZES:
        row = {"size": size, "load_bytes": 8 * ranks * experts, "plan_bytes": plan_bytes,
               **measure(ranks, experts, plan_bytes, REPEATS)}
        print(row, flush=True)
        rows.append(row)
    report = {"gpu": torch.cuda.get_device_name(), "repeats": REPEATS,
              "command": " ".join(["python3 -m experiments.planner.round_trip", *sys.argv[1:]]),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "round_trip.json").write_text(json.dumps(report, indent=1))
    (out / "round_trip.md").write_text(markdown(report))
    run.write(out, [out / "round_trip.json", out / "round_trip.md"],
              name="round_trip.manifest.json")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
