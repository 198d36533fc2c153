"""One lite plan's latency measured two ways, and the floor under each: what a launch costs
before any planning.

    python3 -m experiments.planner.gpu_floor --device cuda --out results/gpu_floor

Decode layers at ep=8 / 128 experts and ep=64 / 256 (experiments.planner.gpu_harness.
decode_layers, the layers experiments.planner.gpu_lite times). Each launch is timed
1. "single": captured in a CUDA graph, that graph replayed alone between two CUDA events, the
   host waiting for the end event before the next sample (gpu_lite's one-layer figure): the
   events, the graph's launch from the host and an idle GPU's start all count;
2. "chained": CHAIN launches of it captured one after another on one stream in one graph
   (each depends on the one before), one replay between two events, divided by CHAIN: the
   time a launch holds the stream when it runs among other work, as a planner does on its
   side stream inside a step's graph.
Rows: a torch op on a one-element tensor and an empty Numba kernel (one array argument, then
the planner kernel's own argument tuple: the same parameter buffer), the floors; then the lite
kernel (probe.planner.lite_cuda.CudaLite: the small-layer kernel at ep=8, the generic one at
ep=64) with its rounds capped at 1, 2 and 4 and with the default rules, each plan checked
against the CPU kernel's; at ep=64 also 4, 6 and 8 rounds with every rank above the mean
hot (hot_sixteenths 16). A GPU only (the simulator has no graphs).
"""

from __future__ import annotations

import sys

from experiments.planner import gpu_harness as harness

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256, 512))
ROUND_CAPS = (1, 2, 4, None)
# At ep=64 also the rules with every rank above the mean hot (hot_sixteenths 16): more pairs a
# round, and fewer rounds for a given IR on these layers (experiments.planner.lite_rounds).
HOT_ALL = ((4, 16), (6, 16), (8, 16))
CHAIN = 20


def empty_kernel(num_args: int):
    """A Numba kernel of num_args arguments that does nothing."""
    from probe.planner.numba_cuda import cuda

    names = ", ".join(f"a{i}" for i in range(num_args))
    scope: dict = {}
    exec(f"def empty({names}):\n    pass\n", scope)  # noqa: S102 (a generated signature)
    return cuda.jit(scope["empty"])


def chained(fn, count: int):
    """A launch that calls fn count times on the current stream."""
    def run():
        for _ in range(count):
            fn()
    return run


def config_rows(config, repeats: int, budget_s: float) -> list[dict]:
    import torch

    from experiments.planner.gpu_lite import cpu_layer, gpu_layers, same
    from probe.planner.lite import LiteRules
    from probe.planner.lite_cuda import CudaLite, launch_args
    from probe.planner.numba_cuda import cuda

    name, model, hardware, ranks, experts, threads = config
    load, home, slots, window, cost = harness.decode_layers(model, hardware, ranks, experts, 1)
    load_d = torch.as_tensor(load, device="cuda")
    window_d = torch.as_tensor(window, device="cuda")
    out = []

    def timed(label, fn, **extra):
        single = harness.timed(fn, graph=True, repeats=repeats, budget_s=budget_s)
        chain = harness.timed(chained(fn, CHAIN), graph=True, repeats=repeats,
                              budget_s=budget_s)
        row = {"config": name, "launch": label, "single_us": single.get("median_us"),
               "chained_us": (chain["median_us"] / CHAIN if "median_us" in chain else None),
               "error": single.get("error") or chain.get("error"), **extra}
        print(f"{name} {label}: single {row['single_us']} us, chained {row['chained_us']} us "
              f"{row['error'] or ''}", flush=True)
        out.append(row)

    def stream():
        return cuda.external_stream(torch.cuda.current_stream().cuda_stream)

    one = torch.zeros(1, device="cuda")
    timed("torch add_ on one element", lambda: one.add_(1.0))
    single = empty_kernel(1)
    flat = cuda.as_cuda_array(one)
    timed("empty Numba kernel, 1 array", lambda: single[1, threads, stream()](flat))

    runner = CudaLite(home, slots, cost, LiteRules(), num_layers=1, threads=threads)
    ld, wd, _ = runner.launch_inputs(load_d, window_d)
    args = launch_args(ld, runner._home, wd, runner._consts, runner._scratch, runner.out)
    wide = empty_kernel(len(args))
    timed(f"empty Numba kernel, the planner kernel's {len(args)} arguments",
          lambda: wide[1, threads, stream()](*args), arguments=len(args))

    variants = [LiteRules() if cap is None else LiteRules(max_rounds=cap) for cap in ROUND_CAPS]
    if ranks > 16:
        variants += [LiteRules(max_rounds=r, hot_sixteenths=h) for r, h in HOT_ALL]
    for rules in variants:
        lite = CudaLite(home, slots, cost, rules, num_layers=1, threads=threads)
        got = gpu_layers(lite.plan(load_d, window_d), 1)[0]
        ref = cpu_layer(load[0], home[0], slots, window[0], cost, rules)
        kernel = "small" if lite.small else "generic"
        label = f"lite, {kernel} kernel, max_rounds {rules.max_rounds}"
        if rules.hot_sixteenths != LiteRules().hot_sixteenths:
            label += f", hot_sixteenths {rules.hot_sixteenths}"
        timed(label, lambda lite=lite: lite.plan(load_d, window_d), rounds=int(ref[4]),
              moves=int(ref[5]), same_plan=same(ref, got), threads=threads)
    return out


def markdown(report: dict) -> str:
    lines = [f"# One lite plan's latency and the launch floor ({report['gpu']})", "",
             f"Made by `{report['command']}` ({report['utc']}). One decode layer per config; "
             "'single': the launch captured in a CUDA graph and replayed alone between two "
             "events (median); 'chained': "
             f"{CHAIN} launches captured one after another in one graph, one replay, divided "
             f"by {CHAIN} (median over replays). Threads per block: ep=8 "
             f"{CONFIGS[0][5]}, ep=64 {CONFIGS[1][5]}.", "",
             "| config | launch | single (us) | chained (us) | rounds run | moves | plan == CPU |",
             "|---|---|---:|---:|---:|---:|---|"]

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    for r in report["rows"]:
        same = {True: "yes", False: "NO", None: "-"}[r.get("same_plan")]
        lines.append(f"| {r['config']} | {r['launch']} | {f(r['single_us'])} | "
                     f"{f(r['chained_us'])} | {r.get('rounds', '-')} | {r.get('moves', '-')} "
                     f"| {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import json
    import time
    from pathlib import Path

    from experiments.manifest import Manifest

    args = harness.parse_args(__doc__, "gpu_floor", argv, "unused")
    if args.device != "cuda":
        raise SystemExit("gpu_floor needs a GPU (CUDA graphs)")
    run = Manifest.start("experiments.planner.gpu_floor", argv)
    repeats = 50 if args.quick else 200
    rows = []
    for config in CONFIGS:
        rows += config_rows(config, repeats, 5.0)
    report = {"gpu": harness.gpu_name(),
              "command": " ".join(["python3 -m experiments.planner.gpu_floor", *sys.argv[1:]]),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "chain": CHAIN,
              "rows": rows}
    report["ok"] = all(r.get("same_plan") is not False and r["error"] is None for r in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_floor.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_floor.md").write_text(markdown(report))
    run.write(out, [out / "gpu_floor.json", out / "gpu_floor.md"], name="gpu_floor.manifest.json")
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    harness.exit_after(main)
