"""The parallel greedy on the GPU (probe.planner.parallel_cuda): same plans as the CPU kernel, and
its time.

    python -m experiments.planner.gpu_parallel --device cuda --out results/gpu_parallel
    python -m experiments.planner.gpu_parallel --device cpu --quick --out /tmp/gpu_parallel

The work, in this order (the report is rewritten after each step, so a run cut short keeps what
it finished; its "status" says how far it got):
1. Random small instances (2-12 ranks, 4-24 experts, skewed loads, random slots, windows, costs
   and ParallelRules; launches of 1-3 layers at 32-256 threads per block): plans identical to
   `parallel.parallel_arrays`', up to 60 layers or 20 s.
2. Synthetic decode loads (probe.traces.generate("decode"), 768 tokens per rank, top-8, 3 slots
   per rank, window "auto", default ParallelRules) at ep=8 / 128 experts (qwen3-235b-a22b on
   h200x8), ep=64 / 256 experts (deepseek-v3 on h200x8-n8) and ep=256 / 256 experts
   (deepseek-v3 on h200x8-n32), L layers (32, 32 and 4; 4, 4 and 2 with --quick): plans
   identical to the CPU kernel's (IR, rounds and moves reported from them), the CPU kernel's
   median time per layer, then the GPU's median per layer (CUDA events around the launch,
   after warm-up) with one layer per launch and with L layers per launch (launch time / L).
3. The L-layer launch captured in a torch.cuda.CUDAGraph on a side stream, its outputs
   overwritten with junk, replayed: the plan equals the eager launch's; replays timed. A
   failed capture is recorded with its exact error.
A failed comparison is recorded (which layers) and the run goes on; a step that raises is
recorded with its traceback. Exit status 1 when a comparison failed, a capture failed or a
step raised, else 0. Targets: <= 10 us per layer at ep=8 / 128 experts, <= 50 us at ep=64 /
256 (ep=256 has none: reported against its hiding window). On the GPU the process ends with
os._exit once its files are written, and a watchdog (faulthandler) ends it 5 s past
--time-limit.

--device cpu runs the kernel in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set here before
numba.cuda is imported): correctness only, on a few small instances and one small decode layer
(ep=4, 16 experts); nothing is timed.
"""

from __future__ import annotations

import time

import numpy as np

from experiments.planner import gpu_harness as harness
from probe.planner.check import rank_times
from probe.planner.cost import CostModel
from probe.planner.parallel import parallel_arrays, plan_from_blocks
from probe.planner.parallel_ref import ParallelRules
from probe.planner.problem import BalanceProblem

# (name, model, hardware, ranks, experts, target us per layer or None, layers, quick layers)
CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128, 10.0, 32, 4),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256, 50.0, 32, 4),
           ("ep=256, E=256", "deepseek-v3", "h200x8-n32", 256, 256, None, 4, 2))
# The simulator's decode layer (small: the simulator runs each thread as a Python thread).
SIM_CONFIG = ("ep=4, E=16 (simulator)", "qwen3-235b-a22b", "h200x8", 4, 16, None, 1, 1)
RANDOM_LAYERS = 60
RANDOM_SECONDS = 20.0
# Written into the outputs before a graph replay that must overwrite them.
OUT_JUNK = -7


def random_batch(rng: np.random.Generator, *, max_layers: int = 1, max_ranks: int = 12,
                 max_experts: int = 24):
    """A random launch: (load int64 [L, S, E], home bool [L, G, E], slots int64 [G], window
    float64 [L, G], cost, rules)."""
    num_ranks = int(rng.integers(2, max_ranks + 1))
    num_experts = int(rng.integers(4, max_experts + 1))
    num_layers = int(rng.integers(1, max_layers + 1))
    load, home = harness.random_layers(rng, num_layers, num_ranks, num_experts)
    slots = rng.integers(0, 4, num_ranks).astype(np.int64)
    window = harness.random_window(rng, num_layers, num_ranks)
    token_time = rng.random((num_ranks, num_ranks)) * float(rng.choice([0.0, 0.1, 0.4]))
    transfer_time = rng.random((num_ranks, num_ranks)) * 2.0
    cost = CostModel(float(rng.choice([0.0, 0.3, 5.0])), float(rng.choice([0.0, 1.0, 0.37])),
                     token_time, transfer_time)
    rules = ParallelRules(max_rounds=int(rng.choice([16, 1, 4, 0])),
                          epsilon=float(rng.choice([0.0, 0.0, 0.5])),
                          hot_fraction=float(rng.choice([0.75, 1.0, 0.3])))
    return load, home, slots, np.asarray(window, np.float64), cost, rules


def decode_batch(model: str, hardware: str, ranks: int, experts: int, layers: int,
                 tokens_per_rank: int = 768):
    """Synthetic decode layers as a batch (default ParallelRules)."""
    return (*harness.decode_layers(model, hardware, ranks, experts, layers, tokens_per_rank),
            ParallelRules())


def cpu_args(batch, layer: int) -> tuple:
    """parallel_arrays' arguments for one layer (fresh writable C arrays: one signature)."""
    rules = batch[5]
    return (*harness.layer_arrays(batch, layer), rules.rounds_limit, rules.epsilon,
            rules.hot_fraction)


def same_layer(ref: tuple, out: tuple) -> bool:
    """True when out (replicas, blk_expert, blk_assign, rounds, moves, makespan) is ref."""
    return (all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(ref[:3], out[:3], strict=True))
            and tuple(int(v) for v in ref[3:5]) == tuple(int(v) for v in out[3:5])
            and float(ref[5]) == float(out[5]))


def host_plan(plan):
    """A CudaParallelPlan of device arrays or torch tensors copied into numpy arrays."""
    from probe.planner.parallel_cuda import CudaParallelPlan

    return CudaParallelPlan(*(a.copy_to_host() if hasattr(a, "copy_to_host") else
                              np.array(a.cpu().numpy(), copy=True) for a in plan))


def layer_out(plan, layer: int) -> tuple:
    """Layer `layer` of a host plan as parallel_arrays' outputs."""
    n_rep, n_blk = int(plan.num_replicas[layer]), int(plan.num_blocks[layer])
    return (plan.replicas[layer, :n_rep], plan.blk_expert[layer, :n_blk],
            plan.blk_assign[layer, :n_blk], int(plan.num_rounds[layer]),
            int(plan.num_moves[layer]), float(plan.objective[layer]))


def run_batch(batch, threads: int) -> list:
    from probe.planner.parallel_cuda import parallel_cuda_arrays

    load, home, slots, window, cost, rules = batch
    return parallel_cuda_arrays(load, home, slots, window, cost.alpha, cost.beta,
                                cost.token_time, cost.transfer_time, rules, threads=threads)


def check_random(rng: np.random.Generator, *, threads=(128,), layer_cap: int,
                 budget_s: float, max_layers: int = 3, max_ranks: int = 12,
                 max_experts: int = 24) -> dict:
    """Random launches until layer_cap layers or budget_s seconds; every layer compared with
    the CPU kernel. Returns {layers, seconds, differing_layers, examples, ok}."""
    start = time.perf_counter()
    layers, differing, i = 0, [], 0
    while layers < layer_cap and time.perf_counter() - start < budget_s:
        batch = random_batch(rng, max_layers=max_layers, max_ranks=max_ranks,
                             max_experts=max_experts)
        for layer, out in enumerate(run_batch(batch, threads[i % len(threads)])):
            if not same_layer(parallel_arrays(*cpu_args(batch, layer)), out):
                differing.append({"batch": i, "layer": layer,
                                  "ranks_experts": list(batch[0].shape[1:]),
                                  "rules": repr(batch[5])})
            layers += 1
        i += 1
    return {"layers": layers, "seconds": round(time.perf_counter() - start, 1),
            "differing_layers": len(differing), "examples": differing[:4], "ok": not differing}


def quality(batch, outs: list) -> dict:
    """Median IR (max / mean rank time, eq. 8's times), rounds and moves of the CPU plans, and
    the smallest rank's window (median over the layers, us)."""
    load, home, slots, window, cost, _ = batch
    irs = []
    for layer, out in enumerate(outs):
        problem = BalanceProblem(load[layer], home[layer], slots, window[layer], cost)
        compute, comm = rank_times(problem, plan_from_blocks(problem, *out[:3]).assignment)
        times = compute + comm
        irs.append(float(times.max() / times.mean()))
    return {"ir": float(np.median(irs)), "rounds": float(np.median([o[3] for o in outs])),
            "moves": float(np.median([o[4] for o in outs])),
            "window_us": float(np.median(window.min(axis=1)) * 1e6)}


def gpu_times(batch, repeats: int, budget_s: float) -> tuple[dict, list]:
    """Eager launches on torch tensors (one layer per launch, all L per launch), then the
    L-layer launch in a CUDA graph. Returns (row values, checks)."""
    import torch

    from probe.planner.parallel_cuda import CudaParallel

    load, home, slots, window, cost, rules = batch
    num_layers = load.shape[0]
    load_t = torch.as_tensor(load, device="cuda")
    window_t = torch.as_tensor(window, device="cuda")
    every = CudaParallel(home, slots, cost, rules, num_layers=num_layers)
    first = host_plan(every.plan(load_t, window_t))
    refs = [parallel_arrays(*cpu_args(batch, i)) for i in range(num_layers)]
    differing = [i for i in range(num_layers) if not same_layer(refs[i], layer_out(first, i))]
    checks = [{"check": "L-layer launch on torch tensors == CPU kernel", "ok": not differing,
               "differing_layers": differing}]
    one = [CudaParallel(home[i], slots, cost, rules, num_layers=1) for i in range(num_layers)]
    single = []
    for i in range(num_layers):
        single += harness.event_us(
            lambda i=i: one[i].plan(load_t[i:i + 1], window_t[i:i + 1]),
            max(3, 2 * repeats // num_layers), budget_s / (3 * num_layers), warm_up=True)
    batched = [t / num_layers for t in harness.event_us(
        lambda: every.plan(load_t, window_t), repeats, budget_s / 3, warm_up=True)]
    row = {"one_per_launch_us": float(np.median(single)),
           "all_per_launch_us": float(np.median(batched))}
    graph = torch.cuda.CUDAGraph()
    harness.ALIVE.append((graph, every, load_t, window_t))
    try:
        harness.capture(graph, lambda: every.plan(load_t, window_t))
    except Exception as exc:  # recorded exactly for the reader
        row.update(graph="capture failed", graph_error=f"{type(exc).__name__}: {exc}")
        return row, checks
    for t in every.torch_out():
        t.fill_(float("nan") if t.dtype.is_floating_point else OUT_JUNK)
    graph.replay()
    replayed = host_plan(every.torch_out())
    same = all(same_layer(layer_out(first, i), layer_out(replayed, i))
               for i in range(num_layers))
    checks.append({"check": "graph replay over junk outputs == eager launch", "ok": same})
    replays = [t / num_layers
               for t in harness.event_us(graph.replay, repeats, budget_s / 3, warm_up=True)]
    torch.cuda.synchronize()
    row.update(graph="captured", graph_replay_us=float(np.median(replays)))
    return row, checks


def _fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(report: dict) -> str:
    rnd = report["random"]
    random_line = ("Random instances: not run." if rnd is None else
                   f"Random instances: {rnd['layers']} layers in {rnd['seconds']} s, "
                   f"{rnd['differing_layers']} differ from the CPU kernel.")
    lines = ["# The parallel greedy on the GPU (probe.planner.parallel_cuda)", "", "Command:", "",
             f"    {report['command']}", "", f"Device: {report['device']}. Status: "
             f"{report['status']}. {random_line} Per layer, medians in microseconds (CUDA "
             "events; L layers per launch: launch time / L); IR, rounds and moves: medians over "
             "the layers' plans; window: the smallest rank's hiding window.", "",
             "| config | layers identical | IR | rounds | moves | one per launch | L per launch "
             "| graph replay | CPU kernel | window | target | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        target = "none" if r["target_us"] is None else f"{r['target_us']:.0f}"
        lines.append(f"| {r['config']} | {r.get('identical_layers', 'n/a')} / {r['layers']} | "
                     f"{_fmt(r.get('ir'), 3)} | {_fmt(r.get('rounds'), 0)} | "
                     f"{_fmt(r.get('moves'), 0)} | {_fmt(r.get('one_per_launch_us'))} | "
                     f"{_fmt(r.get('all_per_launch_us'))} | {_fmt(r.get('graph_replay_us'))} | "
                     f"{_fmt(r.get('cpu_us'))} | {_fmt(r.get('window_us'), 0)} | {target} | "
                     f"{r.get('met', 'n/a')} |")
    lines += ["", "| config | check | result | differing |", "|---|---|---|---|"]
    for config, check in harness.all_checks(report):
        lines.append(f"| {config} | {check['check']} | {'ok' if check['ok'] else 'FAILED'} | "
                     f"{check.get('differing_layers', '') or ''} |")
    return "\n".join(lines + harness.markdown_tail(report)) + "\n"


def _summary(report: dict) -> str:
    lines = [f"{'per layer, us (medians)':<26}{'IR':>7}{'rounds':>8}{'one/launch':>12}"
             f"{'L/launch':>10}{'graph':>9}{'CPU':>9}{'target':>8}  met"]
    for r in report["rows"]:
        target = "-" if r["target_us"] is None else f"{r['target_us']:.0f}"
        lines.append(f"{r['config']:<26}{_fmt(r.get('ir'), 3):>7}{_fmt(r.get('rounds'), 0):>8}"
                     f"{_fmt(r.get('one_per_launch_us')):>12}"
                     f"{_fmt(r.get('all_per_launch_us')):>10}"
                     f"{_fmt(r.get('graph_replay_us')):>9}{_fmt(r.get('cpu_us')):>9}"
                     f"{target:>8}  {r.get('met', 'n/a')}")
    return "\n".join(lines + harness.summary_tail(report))


def main(argv: list[str] | None = None) -> int:
    """Run the steps; returns the exit status (0: every comparison equal, every capture made,
    no step raised)."""
    args = harness.parse_args(__doc__, "gpu_parallel", argv,
                      "seconds: the random instances stop early enough to fit; on the GPU a "
                      "watchdog ends the process 5 s after it (default 105)")
    from probe.planner import parallel_cuda

    sim = args.device == "cpu"
    run = harness.Report("gpu_parallel", args, argv, {"random": None}, _markdown,
                 lambda row: row["target_us"] if row["target_us"] is not None
                 else row["window_us"])
    report = run.data
    with run.stage("random instances vs the CPU kernel (first launch compiles)"):
        rng = np.random.default_rng(2026)
        if sim:
            result = check_random(rng, threads=(32,), layer_cap=2, budget_s=60.0, max_layers=2,
                                  max_ranks=4, max_experts=6)
        else:
            result = check_random(rng, threads=(128, 32, 256), layer_cap=RANDOM_LAYERS,
                                  budget_s=min(RANDOM_SECONDS, args.time_limit / 4))
        report["random"] = result
        print(f"random instances: {result['layers']} layers in {result['seconds']} s, "
              f"{result['differing_layers']} differ", flush=True)
    repeats = 3 if sim else (20 if args.quick else 100)
    for name, model, hardware, ranks, experts, target, layers, quick in (
            (SIM_CONFIG,) if sim else CONFIGS):
        row = {"config": name, "layers": quick if args.quick else layers, "target_us": target,
               "checks": []}
        report["rows"].append(row)
        with run.stage(f"{name}: decode plans vs the CPU kernel, CPU kernel timed"):
            batch = decode_batch(model, hardware, ranks, experts, row["layers"],
                                 tokens_per_rank=64 if sim else 768)
            refs = [parallel_arrays(*cpu_args(batch, i)) for i in range(row["layers"])]
            outs = run_batch(batch, 32 if sim else parallel_cuda.THREADS)
            same = [same_layer(ref, o) for ref, o in zip(refs, outs, strict=True)]
            row["identical_layers"] = int(sum(same))
            row["checks"].append({"check": "decode plans == CPU kernel", "ok": all(same),
                                  "differing_layers": [i for i, ok in enumerate(same)
                                                       if not ok]})
            row.update(quality(batch, refs))
            row["cpu_us"] = harness.cpu_us(parallel_arrays,
                                   [cpu_args(batch, i) for i in range(row["layers"])],
                                   repeats, 1.0 if sim else 3.0)
        if not sim and "cpu_us" in row:
            with run.stage(f"{name}: eager launches and CUDA graph, timed"):
                values, checks = gpu_times(batch, repeats, budget_s=9.0)
                row.update(values)
                row["checks"] += checks
        print({k: v for k, v in row.items() if k != "checks"}, flush=True)
        run.write()
    return run.finish(_summary)


if __name__ == "__main__":
    harness.exit_after(main)
