"""The runtime's device planners and split on one GPU: what a call costs the host and the GPU,
launched eagerly or replayed from a CUDA graph, and that every way computes what the CPU twin
does.

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
- == CPU: every layer's replicas and sources equal the CPU twin's (the same class on CPU
  tensors), under both launches.
Each planner also with rank 0's row of the plan's token split made in the same launch or
graph (`split_rank=0`, `plan_split`: the dispatch's quota under device_split "plan"), checked
against the CPU twin's. Then a step's plans in one launch (`plan_layers`, what the history
predictor's step-ahead plans take: the model's layers, 94 for qwen3-235b-a22b, 58 for
deepseek-v3), and the dispatch-time split (DeviceSplit, water-filling without the exchange
step) of the layers' true counts over home + the lite plans' replicas (rank 0's quota).
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


def measure(call, count: int, repeats: int) -> dict:
    """Host, one-call and chained microseconds of call(i) over inputs i = 0 .. count - 1."""
    import torch

    host, one, chain = [], [], []
    for r in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        call(r % count)
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        one.append(start.elapsed_time(end) * 1e-3)
    for _ in range(max(3, repeats // CHAIN)):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for k in range(CHAIN):
            call(k % count)
        end.record()
        end.synchronize()
        chain.append(start.elapsed_time(end) * 1e-3 / CHAIN)
    return {"host_us": median_us(host), "one_call_us": median_us(one),
            "chained_us": median_us(chain)}


def timed_row(row: dict, make, check, call, count: int, repeats: int) -> dict:
    """Fill row: make() builds the object (its capture or compile timed as setup), check(obj)
    -> bool, then the timings of call(obj, i); an exception is recorded in the row."""
    import torch

    try:
        t0 = time.perf_counter()
        obj = make()
        torch.cuda.synchronize()
        row["setup_s"] = round(time.perf_counter() - t0, 2)
        row["equal_cpu"] = bool(check(obj))
        row.update(measure(lambda i: call(obj, i), count, repeats))
    except Exception as exc:  # recorded, and the run goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(row), flush=True)
    return row


def step_slack(model: str, hardware: str, window: np.ndarray) -> dict:
    """What a step's plans launched at the step's start have before they are needed, on the
    cost model: layer 1's replicas are posted at layer 0's router, after its attention
    (attention_us, the cost model's attention time that decode_layers' windows include);
    each later layer adds about one balanced layer (layer_us: the median over the layers of
    the ranks' mean "auto" window, static expert compute + attention)."""
    from probe.planner.layers import attention_time
    from probe.specs import hardware_preset, model_preset

    attention = attention_time(model_preset(model), hardware_preset(hardware))
    return {"attention_us": float(attention * 1e6),
            "layer_us": float(np.median(np.asarray(window).mean(axis=1)) * 1e6)}


def same_rows(got, want, ranks: int, experts: int) -> bool:
    """Whether two row arrays [R, 3] hold the same replicas and sources."""
    from probe.runtime.device_plan import rows_to_plan

    a, b = rows_to_plan(got, ranks, experts), rows_to_plan(want, ranks, experts)
    return bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


def config_rows(config, repeats: int) -> list[dict]:
    import torch

    from experiments.planner.gpu_harness import decode_layers
    from probe.runtime.device_plan import DeviceSplit, device_planner, rows_to_plan
    from probe.specs import model_preset

    name, model, hardware, ranks, experts = config
    load, home, slots, window, cost = decode_layers(model, hardware, ranks, experts, LAYERS)
    num_slots = int(slots[0])
    cpu = torch.device("cpu")
    loads = [torch.as_tensor(x, device="cuda") for x in load]
    windows = [torch.as_tensor(w, device="cuda") for w in window]
    rows = []
    copies = None
    for method in METHODS:
        twin = device_planner(method, home[0], num_slots, cost, cpu)
        want = [rows_to_plan(twin.plan(torch.as_tensor(x), torch.as_tensor(w)).numpy(),
                             ranks, experts) for x, w in zip(load, window, strict=True)]
        if method == "lite":  # the split's copies: home + the lite plans' replicas
            copies = [home[0].astype(np.int64) + rep.astype(np.int64) for rep, _ in want]

        def check(planner, want=want):
            got = [rows_to_plan(planner.plan(x, w).cpu().numpy(), ranks, experts)
                   for x, w in zip(loads, windows, strict=True)]
            return all(np.array_equal(g[0], r) and np.array_equal(g[1], src)
                       for g, (r, src) in zip(got, want, strict=True))

        def make(method=method, graph=False):
            planner = device_planner(method, home[0], num_slots, cost, torch.device("cuda"),
                                     graph=graph)
            planner.capture()  # graph: the capture (eager: nothing)
            planner.plan(loads[0], windows[0])  # eager: the kernel's compile
            return planner

        for launch in LAUNCHES:
            row = {"config": name, "what": f"plan ({method})", "launch": launch,
                   "replicas": int(np.median([rep.sum() for rep, _ in want]))}
            rows.append(timed_row(row, lambda m=make, g=launch == "graph": m(graph=g), check,
                                  lambda p, i: p.plan(loads[i], windows[i]), LAYERS, repeats))
        # the plan with rank 0's row of its token split, in the same launch or graph (the
        # dispatch's quota under device_split "plan")
        split_twin = device_planner(method, home[0], num_slots, cost, cpu, split_rank=0)
        qwant = [split_twin.plan_split(torch.as_tensor(x), torch.as_tensor(w))[1].numpy()
                 for x, w in zip(load, window, strict=True)]

        def check_quota(planner, qwant=qwant, check=check):
            return check(planner) and all(
                np.array_equal(planner.plan_split(x, w)[1].cpu().numpy(), q)
                for x, w, q in zip(loads, windows, qwant, strict=True))

        def make_quota(method=method, graph=False):
            planner = device_planner(method, home[0], num_slots, cost, torch.device("cuda"),
                                     graph=graph, split_rank=0)
            planner.capture()
            planner.plan_split(loads[0], windows[0])
            return planner

        for launch in LAUNCHES:
            row = {"config": name, "what": f"plan + rank 0's quota ({method})",
                   "launch": launch, "replicas": int(np.median([rep.sum() for rep, _ in want]))}
            rows.append(timed_row(row, lambda m=make_quota, g=launch == "graph": m(graph=g),
                                  check_quota, lambda p, i: p.plan_split(loads[i], windows[i]),
                                  LAYERS, repeats))
    # a step's plans in one launch (plan_layers: the history predictor's step-ahead plans)
    step_layers = model_preset(model).num_layers
    sload, _, _, swindow, _ = decode_layers(model, hardware, ranks, experts, step_layers)
    slack = step_slack(model, hardware, swindow)
    sload_d = torch.as_tensor(sload, device="cuda")
    swindow_d = torch.as_tensor(swindow, device="cuda")
    for method in METHODS:
        twin = device_planner(method, home[0], num_slots, cost, cpu)
        swant = twin.plan_layers(torch.as_tensor(sload), torch.as_tensor(swindow)).numpy()

        def check_layers(planner, swant=swant):
            got = planner.plan_layers(sload_d, swindow_d).cpu().numpy()
            return all(same_rows(g, w, ranks, experts) for g, w in zip(got, swant, strict=True))

        def make_layers(method=method, graph=False):
            planner = device_planner(method, home[0], num_slots, cost, torch.device("cuda"),
                                     graph=graph)
            planner.plan_layers(sload_d, swindow_d)  # compile (graph: capture)
            return planner

        for launch in LAUNCHES:
            row = {"config": name, "what": f"plan_layers ({method}), {step_layers} layers",
                   "launch": launch, "layers": step_layers, **slack,
                   "replicas": int(np.median((swant[:, :, 0] >= 0).sum(axis=1)))}
            rows.append(timed_row(row, lambda m=make_layers, g=launch == "graph": m(graph=g),
                                  check_layers,
                                  lambda p, i: p.plan_layers(sload_d, swindow_d), 1, repeats))
    # the dispatch-time split on the true counts over the lite plans' copies (rank 0's quota)
    split_cpu = DeviceSplit(cost, experts, 0, cpu)
    want = [split_cpu.quota(torch.as_tensor(x), torch.as_tensor(c)).numpy()
            for x, c in zip(load, copies, strict=True)]
    copies_d = [torch.as_tensor(c, device="cuda") for c in copies]

    def check_split(split):
        return all(np.array_equal(split.quota(x, c).cpu().numpy(), q)
                   for x, c, q in zip(loads, copies_d, want, strict=True))

    def make_split(graph):
        split = DeviceSplit(cost, experts, 0, torch.device("cuda"), graph=graph)
        split.capture()
        split.quota(loads[0], copies_d[0])
        return split

    for launch in LAUNCHES:
        row = {"config": name, "what": "split (water-filling)", "launch": launch,
               "replicas": int(np.median([c.sum() - home[0].sum() for c in copies]))}
        rows.append(timed_row(row, lambda g=launch == "graph": make_split(g), check_split,
                              lambda sp, i: sp.quota(loads[i], copies_d[i]), LAYERS, repeats))
    return rows


def markdown(report: dict) -> str:
    lines = [f"# The runtime's device planners and split, eager and graph-replayed "
             f"({report['gpu']})", "",
             f"Made by `{report['command']}` ({report['utc']}). Decode layers ({LAYERS} per "
             "config, 3 slots per rank; the split's copies: home + the lite plans' replicas); "
             "medians. 'host': the call's wall time on the host, the GPU not waited for; "
             "'one call': CUDA events around one call, the host waiting after each; "
             f"'chained': {CHAIN} calls back to back between two events, per call; "
             "'== CPU': every layer's result (replicas and sources; rank 0's quota) equals "
             "the CPU twin's; 'setup': the build and the capture or first launch.", "",
             "| config | what | launch | host (us) | one call (us) | chained (us) | "
             "replicas | == CPU | setup (s) |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    for r in report["rows"]:
        same = {True: "yes", False: "NO", None: "-"}[r.get("equal_cpu")]
        lines.append(f"| {r['config']} | {r['what']} | {r['launch']} | {f(r.get('host_us'))} "
                     f"| {f(r.get('one_call_us'))} | {f(r.get('chained_us'))} | "
                     f"{r.get('replicas', '-')} | {same} | {r.get('setup_s', '-')} |")
    lines += ["", "A step's launch (`plan_layers`) made at the step's start is needed first at "
              "layer 0's router (layer 1's transfer), after about one attention, then about "
              "one balanced layer later for each further layer (cost model):", ""]
    lines += [f"- {r['config']}, {r['what']}, {r['launch']}: attention {r['attention_us']:.0f} "
              f"us, a layer {r['layer_us']:.0f} us"
              for r in report["rows"] if "attention_us" in r]
    lines += [f"\nError ({r['config']}, {r['what']}, {r['launch']}): `{r['error']}`"
              for r in report["rows"] if r.get("error")]
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "device_planner_speed.json", out / "device_planner_speed.md"]
    report = {"gpu": torch.cuda.get_device_name(),
              "command": " ".join(["python3 -m experiments.runtime.device_planner_speed",
                                   *sys.argv[1:]]),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "chain": CHAIN,
              "layers": LAYERS, "rows": [], "finished": False}
    for config in CONFIGS:  # the files rewritten after each config: a run cut short keeps it
        report["rows"] += config_rows(config, args.repeats)
        report["ok"] = all(r.get("equal_cpu") is True and not r.get("error")
                           for r in report["rows"])
        report["finished"] = config is CONFIGS[-1]
        files[0].write_text(json.dumps(report, indent=1))
        files[1].write_text(markdown(report))
        run.write(out, files, name="device_planner_speed.manifest.json")
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from experiments.planner.gpu_harness import exit_after

    exit_after(main)  # no interpreter teardown against a live CUDA graph
