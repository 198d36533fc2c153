"""The lite planner on the GPU: plans checked against the CPU kernel, one layer's latency, IR.

    python3 -m experiments.planner.gpu_lite --device cuda --out results/gpu_lite
    python3 -m experiments.planner.gpu_lite --device cpu --quick --out /tmp/gpu_lite

Synthetic decode layers (experiments.planner.gpu_harness.decode_layers: 768 tokens per rank,
top-8, 3 slots per rank, window "auto") at ep=8 / 128 experts (qwen3-235b-a22b, one H200 node),
ep=16, 32 and 64 / 256 experts and ep=256 / 256 (deepseek-v3, nodes of 8 H200s). Per config:
1. the L-layer launch's plans (probe.planner.lite_cuda.CudaLite) equal the CPU kernel's
   (lite.lite_arrays) on every layer, entry for entry, with either start (inside the planner's
   block, or the start kernels first); CudaLite plans a shape that fits the small-layer kernel
   (probe.planner.lite_small: ep=8 / 128 experts) with it, and the generic kernel is then
   checked and timed beside it on the same layer, at 128 and 256 threads;
2. one layer's latency (a runtime plans the next layer only): median CUDA-event time of the
   launch replayed as a CUDA graph (the kernel alone) and eager (the Python launch included),
   at 32-1024 threads per block (--threads), chained at the best one (20 launches in one
   graph, per launch: what a plan holds its stream for, without the single replay's floor,
   experiments.planner.gpu_floor); and the L-layer launch's time per layer,
   graph-replayed, at 128 threads and at the best one-layer block size (--layers L, default
   8: what a layer costs when a step's layers are planned in one launch, not a layer ahead);
3. the plan's IR (max / mean rank time, eq. 8 in seconds, from the CPU kernel's plan) against
   the static plan's, and the smallest rank's window (what planning can hide behind).
Then random small layers (experiments.planner.gpu_harness.random_layers, 1,000 by default) in
launches of 20 (every other launch on the generic kernel), each equal to the CPU kernel.
Targets: at most 10 us
per layer at ep=8 / 128 experts and 50 us at ep=64 / 256, plans identical to the CPU kernel.
--profile first times where a round's time goes (the kernel's profiling variants, whose rounds
end after each step in turn) at ep=8 and ep=64; --profile-only runs that alone.
--device cpu runs the kernel in Numba's CUDA simulator: ep=8 / 16 experts and a few random
layers, correctness only.
"""

from __future__ import annotations

import sys

import numpy as np

from experiments.planner import gpu_harness as harness

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=16, E=256", "deepseek-v3", "h200x8-n2", 16, 256),
           ("ep=32, E=256", "deepseek-v3", "h200x8-n4", 32, 256),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256),
           ("ep=256, E=256", "deepseek-v3", "h200x8-n32", 256, 256))
SIM_CONFIGS = (("ep=8, E=16", "deepseek-v3", "h200x8", 8, 16),)
GOALS_US = {"ep=8, E=128": 10.0, "ep=64, E=256": 50.0}
THREADS = (32, 64, 128, 256, 512, 1024)
LAYERS = 8
RANDOM_LAYERS = 1000
RANDOM_PER_LAUNCH = 20


def cpu_layer(load, home, slots, window, cost, rules):
    """lite.lite_arrays' result for one layer."""
    from probe.planner.lite import cost_ticks, home_lists, lite_arrays, plan_limits, windows_ticks

    a, b, tt, xt = cost_ticks(cost.alpha, cost.beta, cost.token_time, cost.transfer_time)
    wt = windows_ticks(window)
    reps, blocks = plan_limits(slots, home.shape[1], home.shape[0])
    return lite_arrays(np.ascontiguousarray(load, np.int64), np.ascontiguousarray(home),
                       np.ascontiguousarray(slots, np.int64), wt, a, b, tt, xt,
                       *home_lists(home), rules.max_rounds, rules.eps_ppm, rules.hot_sixteenths,
                       reps, blocks)


def gpu_layers(out, num_layers: int) -> list:
    """A CudaLitePlan (any device arrays) as lite_core's per-layer results."""
    host = [a.copy_to_host() if hasattr(a, "copy_to_host") else np.array(a.cpu().numpy())
            for a in out]
    rep, n_rep, blk_e, blk_a, n_blk, rounds, moves, makespan, status = host
    return [(int(status[i]), rep[i, :n_rep[i]], blk_e[i, :n_blk[i]], blk_a[i, :n_blk[i]],
             int(rounds[i]), int(moves[i]), int(makespan[i])) for i in range(num_layers)]


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def inputs(sim: bool, *arrays):
    if sim:
        from probe.planner.numba_cuda import cuda

        return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
    import torch

    return [torch.as_tensor(np.ascontiguousarray(a), device="cuda") for a in arrays]


def ir_of(load, home, slots, window, cost, result) -> tuple[float, float]:
    """(IR of the plan, IR of the static plan), eq. 8's rank times in seconds."""
    from probe.planner.check import rank_times
    from probe.planner.greedy import plan_from_arrays
    from probe.planner.problem import BalanceProblem
    from probe.planner.static import static_plan

    problem = BalanceProblem(load, home, slots, window, cost)
    out = []
    for plan in (plan_from_arrays(problem, *result[1:4]), static_plan(problem)):
        comp, comm = rank_times(problem, plan.assignment)
        times = comp + comm
        out.append(float(times.max() / times.mean()))
    return out[0], out[1]


def config_row(name, model, hardware, ranks, experts, *, sim: bool, quick: bool,
               layers: int = LAYERS, threads_list: tuple = THREADS) -> dict:
    from probe.planner.lite import LiteRules
    from probe.planner.lite_cuda import CudaLite, starts_inline

    layers = 2 if sim else layers
    load, home, slots, window, cost = harness.decode_layers(model, hardware, ranks, experts,
                                                            layers)
    rules = LiteRules()
    runner = CudaLite(home, slots, cost, rules, num_layers=layers, threads=32 if sim else 128)
    load_d, window_d = inputs(sim, load, window)
    got = gpu_layers(runner.plan(load_d, window_d), layers)
    kernel_name = "small" if runner.small else "generic"
    ref = [cpu_layer(load[i], home[i], slots, window[i], cost, rules) for i in range(layers)]
    ok = [same(r, g) for r, g in zip(ref, got, strict=True)]
    # The same launch with the start the shape does not choose (start kernels, or inline).
    other = not starts_inline(ranks, experts)
    runner_other = CudaLite(home, slots, cost, rules, num_layers=layers,
                            threads=32 if sim else 128, inline_start=other)
    got_other = gpu_layers(runner_other.plan(load_d, window_d), layers)
    ok_other = [same(r, g) for r, g in zip(ref, got_other, strict=True)]
    irs = [ir_of(load[i], home[i], slots, window[i], cost, ref[i]) for i in range(layers)]
    row = {"config": name, "model": model, "hardware": hardware, "layers": layers,
           "kernel": kernel_name,
           "checks": [{"check": f"{layers}-layer launch == CPU kernel", "ok": all(ok),
                       "differing_layers": [i for i, k in enumerate(ok) if not k]},
                      {"check": f"{layers}-layer launch == CPU kernel, "
                                f"{'inline' if other else 'separate'} start",
                       "ok": all(ok_other),
                       "differing_layers": [i for i, k in enumerate(ok_other) if not k]}],
           "ir": float(np.median([x[0] for x in irs])), "ir_max": float(max(x[0] for x in irs)),
           "ir_static": float(np.median([x[1] for x in irs])),
           "window_us": float(np.median(window.min(axis=1)) * 1e6),
           "rounds": float(np.median([r[4] for r in ref])),
           "moves": float(np.median([r[5] for r in ref])),
           "replicas": float(np.median([len(r[1]) for r in ref]))}
    if sim:
        return row
    repeats, budget = (50, 3.0) if quick else (300, 8.0)
    one_load, one_window = inputs(False, load[:1], window[:1])
    def one_layer(threads: int, small: bool | None = None) -> dict:
        """One layer's plan checked against the CPU kernel and its launch timed, graph-replayed,
        at this block size (small: which kernel, as CudaLite takes it)."""
        one = CudaLite(home[0], slots, cost, rules, num_layers=1, threads=threads, small=small)
        try:  # a block size the kernel's registers do not allow is refused at launch
            check = gpu_layers(one.plan(one_load, one_window), 1)[0]
        except Exception as exc:  # recorded, the run goes on
            return {"graph": {"error": f"{type(exc).__name__}: {exc}"[:200]}, "same_plan": None}
        graph = harness.timed(lambda: one.plan(one_load, one_window), graph=True,
                              repeats=repeats, budget_s=budget)
        return {"graph": graph, "same_plan": same(check, ref[0]),
                "kernel": "small" if one.small else "generic"}

    per_threads = {threads: one_layer(threads) for threads in threads_list}
    if runner.small:  # the generic kernel on the same layer, in the same run
        generic = {}
        for threads in (128, 256):
            timed = one_layer(threads, small=False)
            generic[str(threads)] = {"graph_us": timed["graph"].get("median_us"),
                                     "same_plan": timed["same_plan"]}
        row["generic_threads"] = generic
        row["checks"].append({"check": "one-layer plans of the generic kernel == CPU kernel",
                              "ok": all(v["same_plan"] for v in generic.values()),
                              "differing_layers": []})
    default = per_threads.get(128, {"graph": {}})
    row["one_layer_graph_us"] = default["graph"].get("median_us")
    row["graph_replay_us"] = row["one_layer_graph_us"]  # what the target is judged on
    runner_one = CudaLite(home[0], slots, cost, rules)
    eager = harness.timed(lambda: runner_one.plan(one_load, one_window), graph=False,
                          repeats=repeats, budget_s=budget)
    row["one_layer_eager_us"] = eager.get("median_us")
    row["threads"] = {str(k): {"graph_us": v["graph"].get("median_us"),
                               "error": v["graph"].get("error"), "same_plan": v["same_plan"],
                               "kernel": v.get("kernel")}
                      for k, v in per_threads.items()}
    row["checks"].append({"check": "one-layer plans == CPU kernel at "
                                   f"{'/'.join(map(str, threads_list))} threads",
                          "ok": all(v["same_plan"] for v in per_threads.values()
                                    if v["same_plan"] is not None),
                          "differing_layers": []})

    def per_layer_us(launcher) -> float | None:
        """The L-layer launch's graph-replayed median time divided by its layers."""
        timed = harness.timed(lambda: launcher.plan(load_d, window_d), graph=True,
                              repeats=repeats, budget_s=budget)
        return timed["median_us"] / layers if "median_us" in timed else None

    row["per_layer_in_launch_us"] = per_layer_us(runner)
    best = [v["graph"]["median_us"] for v in per_threads.values() if "median_us" in v["graph"]]
    row["best_one_layer_us"] = min(best) if best else None
    row["best_threads"] = (min((v["graph"]["median_us"], k) for k, v in per_threads.items()
                               if "median_us" in v["graph"])[1] if best else None)
    # One layer chained on a stream (CHAIN launches in one graph, per launch): the time a
    # plan holds its stream among other work, without the single replay's 10-18 us floor
    # (results/h100/run17), at the best block size.
    if row["best_threads"] is not None:
        from experiments.planner.gpu_floor import CHAIN, chained

        one = CudaLite(home[0], slots, cost, rules, num_layers=1, threads=row["best_threads"])
        timed = harness.timed(chained(lambda: one.plan(one_load, one_window), CHAIN),
                              graph=True, repeats=repeats, budget_s=budget)
        row["one_layer_chained_us"] = (timed["median_us"] / CHAIN if "median_us" in timed
                                       else None)
    if row["best_threads"] not in (None, 128):  # the L-layer launch at the best block size too
        row["per_layer_in_launch_best_us"] = per_layer_us(CudaLite(
            home, slots, cost, rules, num_layers=layers, threads=row["best_threads"]))
    else:
        row["per_layer_in_launch_best_us"] = row["per_layer_in_launch_us"]
    return row


def random_batch(rng: np.random.Generator, num_layers: int, ranks=(2, 3, 4, 8, 16)):
    """A random launch of num_layers layers: (load [L, S, E], home [L, G, E], slots [G], window
    [L, G], cost, rules), with costs of the size real layers have (microseconds)."""
    from probe.planner.cost import CostModel
    from probe.planner.lite import LiteRules

    num_ranks = int(rng.choice(ranks))
    num_experts = int(rng.choice([num_ranks, 2 * num_ranks, 4 * num_ranks, 32]))
    load, home = harness.random_layers(rng, num_layers, num_ranks, num_experts)
    window = harness.random_window(rng, num_layers, num_ranks) * 1e-4
    slots = rng.integers(0, 4, num_ranks).astype(np.int64)
    token_time = rng.uniform(0, 3e-8, (num_ranks, num_ranks))
    cost = CostModel(float(rng.choice([0.0, 1e-6, 2e-5])), float(rng.uniform(1e-8, 1e-7)),
                     token_time, rng.uniform(1e-5, 2e-4, (num_ranks, num_ranks)))
    rules = LiteRules(max_rounds=int(rng.integers(1, 17)), eps_ppm=int(rng.choice([0, 1000])),
                      hot_sixteenths=int(rng.choice([16, 12, 4])))
    return load, home, slots, np.asarray(window, np.float64), cost, rules


def random_check(count: int, *, sim: bool) -> dict:
    from probe.planner.lite_cuda import CudaLite

    rng = np.random.default_rng(11)
    done = differ = 0
    by_kernel = {"small": 0, "generic": 0}
    while done < count:
        layers = min(RANDOM_PER_LAUNCH, count - done)
        load, home, slots, window, cost, rules = random_batch(rng, layers)
        # Every shape here fits the small-layer kernel: every other launch takes the generic one.
        runner = CudaLite(home, slots, cost, rules, num_layers=layers,
                          threads=int(rng.choice([32, 64, 128])),
                          small=None if rng.integers(2) else False)
        by_kernel["small" if runner.small else "generic"] += layers
        load_d, window_d = inputs(sim, load, window)
        got = gpu_layers(runner.plan(load_d, window_d), layers)
        for i in range(layers):
            ref = cpu_layer(load[i], home[i], slots, window[i], cost, rules)
            differ += not same(ref, got[i])
        done += layers
    return {"layers": done, "differing_layers": differ, "ok": differ == 0,
            "layers_by_kernel": by_kernel}


PROFILE_CONFIGS = (CONFIGS[0], CONFIGS[3])
PROFILE_ROUNDS = 4
STEPS = ("start", "rank order", "pair tests", "matching", "pair moves (experts, pools, amounts)",
         "admission", "new blocks", "apply (the full round)")


def profile_row(name, model, hardware, ranks, experts, *, quick: bool, sim: bool = False,
                variants: bool = True) -> dict:
    """Where a round's time goes: graph-replayed one-layer launches of the profiling variants
    (lite_cuda.kernel(upto=k): rounds that end after step k and apply no move, so each round
    repeats the first round's work), PROFILE_ROUNDS rounds, 128 and 256 threads. In the
    simulator (sim): each variant launched once with 32 threads, to show it ends, untimed.
    With the GPU also the full kernel's clock stamps (stamp_profile); variants=False: those
    alone."""
    from probe.planner.lite import LiteRules
    from probe.planner.lite_cuda import FULL, CudaLite

    load, home, slots, window, cost = harness.decode_layers(model, hardware, ranks, experts, 1)
    rules = LiteRules(max_rounds=PROFILE_ROUNDS)
    one_load, one_window = inputs(sim, load, window)
    repeats, budget = (30, 1.5) if quick else (100, 3.0)
    row = {"config": name, "rounds": PROFILE_ROUNDS, "steps": list(STEPS), "threads": {}}
    if sim:
        statuses = [gpu_layers(CudaLite(home[0], slots, cost, rules, threads=32, upto=upto)
                               .plan(one_load, one_window), 1)[0][0] for upto in range(FULL + 1)]
        row["ended"] = {"statuses": statuses}
        return row
    row["stamps"] = stamp_profile(model, hardware, ranks, experts)
    for threads in (128, 256) if variants else ():
        times = []
        for upto in range(FULL + 1):
            runner = CudaLite(home[0], slots, cost, rules, threads=threads, upto=upto)
            times.append(harness.timed(lambda r=runner: r.plan(one_load, one_window),
                                       graph=True, repeats=repeats,
                                       budget_s=budget).get("median_us"))
        row["threads"][str(threads)] = times
    return row


def stamp_profile(model, hardware, ranks, experts) -> dict:
    """Where the full kernel's cycles go, step by step: the kernel made with clock stamps
    (lite_cuda.kernel(stamps=True): thread 0 reads the SM's cycle counter after every step), one
    launch of LAYERS decode layers (a block each, default rules), 128 and 256 threads; per step
    the median over the layers of its cycles summed over the rounds, and us at the SM clock."""
    from probe.planner.lite import LiteRules
    from probe.planner.lite_cuda import STAMP_STEPS, CudaLite, step_cycles
    from probe.planner.numba_cuda import cuda

    load, home, slots, window, cost = harness.decode_layers(model, hardware, ranks, experts,
                                                            LAYERS)
    load_d, window_d = inputs(False, load, window)
    try:
        mhz = cuda.get_current_device().CLOCK_RATE / 1000.0
    except Exception:  # noqa: BLE001 (a device without the attribute: cycles alone)
        mhz = None
    out = {"clock_mhz": mhz, "steps": ["start", *STAMP_STEPS, "total"], "threads": {}}
    for threads in (128, 256):
        try:
            runner = CudaLite(home, slots, cost, LiteRules(), num_layers=LAYERS,
                              threads=threads, stamps=True)
            runner.plan(load_d, window_d)  # compiles
            runner.plan(load_d, window_d)
            cuda.synchronize()
            layers = step_cycles(runner)
        except Exception as exc:  # noqa: BLE001 (the stamped kernel failed: say so, go on)
            out["threads"][str(threads)] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        out["threads"][str(threads)] = {
            "rounds": float(np.median([c["rounds"] for c in layers])),
            "cycles": {k: float(np.median([c[k] for c in layers])) for k in out["steps"]},
            # each round's cycles, to set the first round beside the later ones
            "per_round": [float(np.median([c["per_round"][r] for c in layers
                                           if len(c["per_round"]) > r]))
                          for r in range(max(len(c["per_round"]) for c in layers))]}
        if runner.small:  # the small-layer kernel also stamps its start's parts
            from probe.planner.lite_small import start_cycles

            parts = start_cycles(runner)
            out["threads"][str(threads)]["start_parts"] = {
                k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    return out


def stamp_lines(r: dict) -> list[str]:
    """The clock stamps' table of a profile row (stamp_profile), in markdown."""
    stamps = r.get("stamps")
    if not stamps:
        return []
    mhz = stamps["clock_mhz"]
    lines = ["", f"Clock stamps, {r['config']}: the full kernel ({LAYERS} decode layers, one "
                 "launch); median over the layers of each step's cycles summed over the rounds"
                 + (f", and us at the {mhz:.0f} MHz SM clock" if mhz else "") + ".", ""]
    heads, rules = [], []
    for t, v in stamps["threads"].items():
        if "error" in v:
            lines.append(f"{t} threads: {v['error']}")
            continue
        heads.append(f"{t} threads ({v['rounds']:.0f} rounds): cycles | us")
        rules.append("---:|---:|")
    if not heads:
        return lines
    lines += ["| step | " + " | ".join(heads) + " |", "|---|" + "".join(rules)]
    for step in stamps["steps"]:
        cells = []
        for v in stamps["threads"].values():
            if "error" not in v:
                cyc = v["cycles"][step]
                cells += [f"{cyc:.0f}", f"{cyc / mhz:.1f}" if mhz else "-"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for t, v in stamps["threads"].items():
        if v.get("per_round"):
            lines.append(f"\nEach round's cycles at {t} threads: "
                         + ", ".join(f"{c:.0f}" for c in v["per_round"]) + ".")
        if "start_parts" in v:
            lines.append(f"\nThe start's parts at {t} threads (cycles): " + ", ".join(
                f"{k} {c:.0f}" for k, c in v["start_parts"].items()) + ".")
    return lines


def launch_layers(report: dict) -> str:
    """The multi-layer launch's layer count(s) of a report's rows."""
    counts = sorted({r["layers"] for r in report["rows"]})
    return ", ".join(map(str, counts)) or str(LAYERS)


def markdown(report: dict) -> str:
    lines = [f"# The lite planner on the GPU ({report['device']})", "",
             f"Made by `{report['command']}` ({report['utc']}). One layer's plan, median "
             "CUDA-event time of the launch replayed as a CUDA graph (128 threads per block; "
             "best: the fastest of the block sizes tried), chained (at the best block size, "
             "20 launches captured one after another in one graph, per launch: what a plan "
             "holds a stream for, without the single replay's floor), eager (the Python "
             "launch included) "
             f"and per layer in an L-layer launch (L = {launch_layers(report)}; graph-replayed, "
             "at 128 threads and at the best one-layer block size: when a step's layers are "
             "planned together, not a layer ahead); IR from the plans (the static plan's "
             "beside it); window: the smallest rank's, median over the layers.", "",
             "| config | kernel | graph, 1 layer (us) | best threads (us) | chained (us) | "
             "eager (us) | "
             "per layer in launch (us) | per layer in launch, best threads (us) | "
             "generic kernel, 128 / 256 threads (us) | target (us) | "
             "IR | IR max | IR static | window (us) | rounds | replicas | plans == CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---|"]

    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    for r in report["rows"]:
        generic = r.get("generic_threads")
        generic_us = ("-" if not generic else
                      " / ".join(f(generic[t]["graph_us"]) for t in ("128", "256")))
        lines.append(
            f"| {r['config']} | {r.get('kernel', '-')} | {f(r.get('one_layer_graph_us'))} | "
            f"{f(r.get('best_one_layer_us'))} ({r.get('best_threads', '-')}) | "
            f"{f(r.get('one_layer_chained_us'))} | {f(r.get('one_layer_eager_us'))} | "
            f"{f(r.get('per_layer_in_launch_us'))} | "
            f"{f(r.get('per_layer_in_launch_best_us'))} | {generic_us} | "
            f"{f(GOALS_US.get(r['config']), 0)} | {f(r['ir'], 3)} | {f(r['ir_max'], 3)} | "
            f"{f(r['ir_static'], 3)} | {f(r['window_us'], 0)} | {f(r['rounds'], 0)} | "
            f"{f(r['replicas'], 0)} | {'yes' if all(c['ok'] for c in r['checks']) else 'NO'} |")
    for r in report.get("profile", []):
        if "ended" in r:
            lines += ["", f"Profiling variants, {r['config']}: each ended (statuses "
                          f"{r['ended']['statuses']}), untimed."]
            continue
        if not r["threads"]:  # the clock stamps alone
            lines += stamp_lines(r)
            continue
        lines += ["", f"Profile, {r['config']}: graph-replayed one-layer launches whose "
                      f"{r['rounds']} rounds end after each step (no move applied: each round "
                      "repeats the first round's work); us, and the step's own cost per round.",
                  "", "| step | " + " | ".join(f"{t} threads (us) | per round" for t in
                                              r["threads"]) + " |",
                  "|---|" + "---:|---:|" * len(r["threads"])]
        for k, step in enumerate(r["steps"]):
            cells = []
            for times in r["threads"].values():
                own = (None if k == 0 or times[k] is None or times[k - 1] is None
                       else (times[k] - times[k - 1]) / r["rounds"])
                cells += [f(times[k]), f(own)]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines += stamp_lines(r)
    if report["random"] is not None:
        rnd = report["random"]
        split = rnd.get("layers_by_kernel")
        lines += ["", f"Random layers: {rnd['layers']}"
                      + (f" ({split['small']} on the small-layer kernel, {split['generic']} on "
                         "the generic one)" if split else "")
                      + f", differing from the CPU kernel: {rnd['differing_layers']}."]
    return "\n".join(lines + harness.markdown_tail(report)) + "\n"


def main(argv: list[str] | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--profile", action="store_true",
                            help="first time the profiling variants (where a round's time "
                                 "goes) at ep=8 and ep=64")
        parser.add_argument("--profile-only", action="store_true",
                            help="the profile alone (implies --profile)")
        parser.add_argument("--stamps", action="store_true",
                            help="first the full kernel's clock stamps per step at ep=8 and "
                                 "ep=64 (a GPU; without --profile, no profiling variants)")
        parser.add_argument("--max-ranks", type=int, default=None,
                            help="only the configs (and profiles) with at most this many ranks")
        parser.add_argument("--ranks", type=int, nargs="+", default=None,
                            help="only the configs (and profiles) with these rank counts")
        parser.add_argument("--layers", type=int, default=LAYERS,
                            help="layers in the multi-layer launch (a block each)")
        parser.add_argument("--random", type=int, default=None,
                            help=f"random layers checked against the CPU kernel (default "
                                 f"{RANDOM_LAYERS}, 20 in the simulator; 0: none)")
        parser.add_argument("--threads", type=int, nargs="+", default=list(THREADS),
                            help="block sizes of the one-layer sweep (multiples of 32)")

    args = harness.parse_args(__doc__, "gpu_lite", argv, "seconds for the whole run", options)
    variants = args.profile or args.profile_only
    args.profile = variants or args.stamps
    sim = args.device == "cpu"
    report = harness.Report("gpu_lite", args, argv, {"random": None, "profile": []}, markdown,
                            lambda row: GOALS_US.get(row["config"], np.inf))
    def wanted(config) -> bool:  # --max-ranks and --ranks
        return ((args.max_ranks is None or config[3] <= args.max_ranks)
                and (args.ranks is None or config[3] in args.ranks))

    if args.profile:
        for config in filter(wanted, SIM_CONFIGS if sim else PROFILE_CONFIGS):
            with report.stage(f"profile {config[0]}"):
                report.data["profile"].append(profile_row(*config, quick=args.quick, sim=sim,
                                                          variants=variants))
    configs = list(filter(wanted, SIM_CONFIGS if sim else CONFIGS))
    for config in configs if not args.profile_only else ():
        with report.stage(config[0]):
            report.data["rows"].append(config_row(*config, sim=sim, quick=args.quick,
                                                  layers=args.layers,
                                                  threads_list=tuple(args.threads)))
    count = args.random if args.random is not None else 20 if sim else RANDOM_LAYERS
    if not args.profile_only and count > 0:
        with report.stage("random layers"):
            report.data["random"] = random_check(count, sim=sim)

    def summary(rep: dict) -> str:
        return "\n".join(harness.summary_tail(rep))

    return report.finish(summary)


if __name__ == "__main__":
    harness.exit_after(lambda: main(sys.argv[1:]))
