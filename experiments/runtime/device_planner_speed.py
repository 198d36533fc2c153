"""The runtime's device planners on one GPU: what a plan costs the host and the GPU, launched
eagerly or replayed from a CUDA graph, and that every way plans what the CPU twin plans.

    python3 -m experiments.runtime.device_planner_speed --out results/device_planner_speed

Decode layers (experiments.planner.gpu_harness.decode_layers: 768 tokens per rank, top-8,
3 slots per rank, window "auto") at ep=8 / 128 experts (qwen3-235b-a22b, one H200 node) and
ep=64 / 256 (deepseek-v3, nodes of 8). For each planner of probe.runtime.device_plan
(DeviceGreedy, method "greedy"; DeviceLite, method "lite") and each launch ("eager": Numba
launches the kernel from Python at every plan, what `--plan-on device` did; "graph": the
launch captured once and replayed, `DevicePlanner(graph=True)`):
- host: median wall time of the plan() call on the host, the GPU not waited for (what the
  runtime's main thread pays per MoE layer before it goes on);
- one plan: median time between CUDA events recorded before and after the call, the host
  waiting after each (the host's launch and the GPU's work, the GPU idle before);
- chained: CHAIN plans issued back to back between two events, the host waiting at the end
  only, per plan (what a plan holds the side stream for when the host keeps ahead);
- plans: every layer's replicas and sources equal the CPU twin's (the same class on CPU
  tensors), under both launches.
A GPU only (CUDA graphs and events).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
METHODS = ("greedy", "lite")
LAUNCHES = ("eager", "graph")
LAYERS = 4
CHAIN = 20


def median_us(samples) -> float:
    return float(np.median(samples) * 1e6)


def measure(planner, loads, windows, repeats: int) -> dict:
    """Host, one-plan and chained microseconds of planner.plan over the layers' inputs."""
    import torch

    host, one, chain = [], [], []
    for r in range(repeats):
        load, window = loads[r % len(loads)], windows[r % len(windows)]
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        planner.plan(load, window)
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        one.append(start.elapsed_time(end) * 1e-3)
    for _ in range(max(3, repeats // CHAIN)):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for k in range(CHAIN):
            planner.plan(loads[k % len(loads)], windows[k % len(windows)])
        end.record()
        end.synchronize()
        chain.append(start.elapsed_time(end) * 1e-3 / CHAIN)
    return {"host_us": median_us(host), "one_plan_us": median_us(one),
            "chained_us": median_us(chain)}


def config_rows(config, repeats: int) -> list[dict]:
    import torch

    from experiments.planner.gpu_harness import decode_layers
    from probe.runtime.device_plan import device_planner, rows_to_plan

    name, model, hardware, ranks, experts = config
    load, home, slots, window, cost = decode_layers(model, hardware, ranks, experts, LAYERS)
    num_slots = int(slots[0])
    loads = [torch.as_tensor(x, device="cuda") for x in load]
    windows = [torch.as_tensor(w, device="cuda") for w in window]
    rows = []
    for method in METHODS:
        twin = device_planner(method, home[0], num_slots, cost, torch.device("cpu"))
        want = [rows_to_plan(twin.plan(torch.as_tensor(x), torch.as_tensor(w)).numpy(),
                             ranks, experts) for x, w in zip(load, window, strict=True)]
        for launch in LAUNCHES:
            row = {"config": name, "method": method, "launch": launch}
            try:
                planner = device_planner(method, home[0], num_slots, cost,
                                         torch.device("cuda"), graph=launch == "graph")
                t0 = time.perf_counter()
                planner.capture()  # graph: the capture (eager: nothing)
                planner.plan(loads[0], windows[0])  # eager: the kernel's compile
                torch.cuda.synchronize()
                row["setup_s"] = round(time.perf_counter() - t0, 2)
                same = []
                for x, w, (rep, src) in zip(loads, windows, want, strict=True):
                    got = rows_to_plan(planner.plan(x, w).cpu().numpy(), ranks, experts)
                    same.append(bool(np.array_equal(got[0], rep) and np.array_equal(got[1], src)))
                row["plans_equal_cpu"] = all(same)
                row["replicas"] = int(np.median([rep.sum() for rep, _ in want]))
                row.update(measure(planner, loads, windows, repeats))
            except Exception as exc:  # recorded, and the run goes on
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# The runtime's device planners, eager and graph-replayed ({report['gpu']})", "",
             f"Made by `{report['command']}` ({report['utc']}). Decode layers ({LAYERS} per "
             "config, 3 slots per rank); medians. 'host': the plan() call's wall time on the "
             "host, the GPU not waited for; 'one plan': CUDA events around one call, the host "
             f"waiting after each; 'chained': {CHAIN} calls back to back between two events, "
             "per call; 'plans == CPU': every layer's replicas and sources equal the CPU "
             "twin's.", "",
             "| config | planner | launch | host (us) | one plan (us) | chained (us) | "
             "replicas | plans == CPU | setup (s) |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    for r in report["rows"]:
        same = {True: "yes", False: "NO", None: "-"}[r.get("plans_equal_cpu")]
        lines.append(f"| {r['config']} | {r['method']} | {r['launch']} | {f(r.get('host_us'))} "
                     f"| {f(r.get('one_plan_us'))} | {f(r.get('chained_us'))} | "
                     f"{r.get('replicas', '-')} | {same} | {r.get('setup_s', '-')} |")
    errors = [r for r in report["rows"] if r.get("error")]
    lines += [f"\nError ({r['config']}, {r['method']}, {r['launch']}): `{r['error']}`"
              for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from experiments.manifest import Manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/device_planner_speed", help="output folder")
    parser.add_argument("--repeats", type=int, default=100, help="timed plans per row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("device_planner_speed needs a GPU (CUDA graphs and events)")
    run = Manifest.start("experiments.runtime.device_planner_speed", argv)
    rows = []
    for config in CONFIGS:
        rows += config_rows(config, args.repeats)
    report = {"gpu": torch.cuda.get_device_name(),
              "command": " ".join(["python3 -m experiments.runtime.device_planner_speed",
                                   *sys.argv[1:]]),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "chain": CHAIN,
              "layers": LAYERS, "rows": rows}
    report["ok"] = all(r.get("plans_equal_cpu") is True and not r.get("error") for r in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "device_planner_speed.json", out / "device_planner_speed.md"]
    files[0].write_text(json.dumps(report, indent=1))
    files[1].write_text(markdown(report))
    run.write(out, files, name="device_planner_speed.manifest.json")
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from experiments.planner.gpu_harness import exit_after

    exit_after(main)  # no interpreter teardown against a live CUDA graph
