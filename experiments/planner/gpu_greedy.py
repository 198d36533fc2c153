"""The greedy on the GPU (probe.planner.greedy_cuda): same plans as the CPU kernel, and its time.

    python -m experiments.planner.gpu_greedy --device cuda --out results/gpu_greedy
    python -m experiments.planner.gpu_greedy --device cpu --quick --out /tmp/gpu_greedy

The work, in this order (the report is rewritten after each step, so a run cut short keeps what
it finished; its "status" says how far it got):
1. Synthetic decode loads (probe.traces.generate("decode"), 768 tokens per rank, top-8, 3 slots
   per rank, window "auto", default GreedyRules) at ep=8 / 128 experts (qwen3-235b-a22b on
   h200x8) and ep=64 / 256 experts (deepseek-v3 on h200x8-n8), L = 32 layers (4 with --quick):
   plans identical to `greedy.greedy_arrays`', the CPU kernel's median time per layer, then the
   GPU's median per layer (CUDA events around the launch, after warm-up; the host's launch
   overhead is inside when the GPU waits for it) with one layer per launch and with L layers per
   launch (launch time / L). Checked beside them: the L-layer launch on torch tensors gives the
   CPU kernel's plans; on the whole output buffers, the one-layer launches equal the rows of the
   L-layer launch, a launch over scratch and output buffers filled with junk equals the first
   launch, and a runner reused on new loads (the layers in reverse order, the experts too)
   equals a fresh runner's plan.
2. The L-layer launch captured in a torch.cuda.CUDAGraph on a side stream: buffers filled with
   junk, replayed, compared with the eager plan; the new loads written into the captured input
   tensors, buffers junk again, replayed, compared with the fresh runner's plan; replays timed.
   A failed capture is recorded with its exact error.
3. Random small instances (2-8 ranks, 4-32 experts, skewed loads, random slots, windows, costs
   and rules 1-7 options; launches of 1-4 layers): identical plans to the CPU kernel, up to 100
   layers or 25 s (less if the time limit is near).
A comparison that fails is recorded (which one, how many entries differ per output, how many of
them inside the plan, a few examples) and the run goes on; a step that raises is recorded with
its traceback. Exit status 1 when a comparison failed, a capture failed or a step raised,
else 0. Targets: <= 10 us per layer at ep=8 / 128 experts, <= 50 us at ep=64 / 256. On the GPU
the process ends with os._exit once its files are written (no interpreter teardown with a CUDA
graph alive), and a watchdog (faulthandler) prints every thread's stack and exits if the run
passes --time-limit plus 5 s.

--device cpu runs the kernel in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set here before
numba.cuda is imported): correctness only (a few small instances, one small decode layer and the
junk-buffer and reuse checks; the simulator is about 0.5 s per layer); nothing is timed.
"""

from __future__ import annotations

import json
import time
import traceback

import numpy as np

from experiments.planner import gpu_harness as harness
from probe.planner.cost import CostModel
from probe.planner.greedy import greedy_arrays
from probe.planner.greedy_rules import GreedyRules

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128, 10.0),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256, 50.0))
# The random-instance check stops after this many layers or seconds.
RANDOM_LAYERS = 100
RANDOM_SECONDS = 25.0
# Junk written into a runner's buffers before a launch that must not depend on them: scratch
# gets 1 (an index in range for every shape here, so a kernel that read it before writing it
# would plan wrongly rather than fault), outputs -7 (NaN in the float output).
SCRATCH_JUNK = 1
OUT_JUNK = -7
# Examples kept per failed comparison.
EXAMPLES = 4


def random_batch(rng: np.random.Generator, *, max_layers: int = 1, max_experts: int = 32):
    """A random launch: (load int64 [L, S, E], home bool [L, G, E], slots int64 [G], window
    float64 [L, G], cost, rules): 2-8 ranks, 4-max_experts experts, one home rank per expert
    (sometimes extra home copies), Zipf-skewed loads, 0-3 slots, windows 0 / random / inf,
    alpha and beta of several sizes, zero or random token times, random rules 1-7 options."""
    num_ranks = int(rng.integers(2, 9))
    num_experts = int(rng.integers(4, max_experts + 1))
    num_layers = int(rng.integers(1, max_layers + 1))
    load, home = harness.random_layers(rng, num_layers, num_ranks, num_experts)
    slots = rng.integers(0, 4, num_ranks)
    window = harness.random_window(rng, num_layers, num_ranks)
    alpha = float(rng.choice([0.0, 0.3, 5.0]))
    beta = float(rng.choice([0.0, 1.0, 0.37, 1.0]))
    token_time = rng.random((num_ranks, num_ranks)) * float(rng.choice([0.0, 0.1, 0.4]))
    np.fill_diagonal(token_time, 0.0)
    transfer_time = rng.random((num_ranks, num_ranks)) * 2.0
    np.fill_diagonal(transfer_time, 0.0)
    cost = CostModel(alpha, beta, token_time, transfer_time)
    rules = GreedyRules(k_max=[16, 1, 4, 0, "auto"][int(rng.integers(5))],
                        epsilon=float(rng.choice([0.0, 0.0, 0.0, 0.5])),
                        move_local=bool(rng.random() < 0.8), evacuate=bool(rng.random() < 0.2),
                        two_phase=bool(rng.random() < 0.8), mean_cap=bool(rng.random() < 0.3))
    return load, home, slots, window, cost, rules


def cpu_args(batch, layer: int) -> tuple:
    """greedy_arrays' arguments for one layer of a batch: every array a fresh writable C copy,
    so that numba compiles the CPU kernel once (a read-only array is another signature)."""
    rules = batch[5]
    return (*harness.layer_arrays(batch, layer), int(rules.max_moves(batch[1].shape[1])),
            float(rules.epsilon), *(bool(v) for v in rules.flags.values()))


def cpu_layer(batch, layer: int) -> tuple:
    """greedy_arrays' outputs for one layer of a batch."""
    return greedy_arrays(*cpu_args(batch, layer))


def same_layer(batch, layer: int, out: tuple) -> bool:
    """True when out (replicas, blk_expert, blk_assign, num_moves, ...) is the CPU kernel's
    plan of that layer, exactly."""
    ref = cpu_layer(batch, layer)
    pairs = zip(ref[:3], out[:3], strict=True)
    return (all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
            and int(ref[3]) == int(out[3]))


def run_batch(batch, threads: int) -> list:
    from probe.planner.greedy_cuda import greedy_cuda_arrays

    load, home, slots, window, cost, rules = batch
    return greedy_cuda_arrays(load, home, slots, window, cost.alpha, cost.beta,
                              cost.token_time, cost.transfer_time,
                              rules.max_moves(home.shape[1]), rules.epsilon,
                              *rules.flags.values(), threads=threads)


def check_random(rng: np.random.Generator, *, max_batches: int, max_layers: int,
                 threads=(128,), max_experts: int = 32, layer_cap: int | None = None,
                 budget_s: float | None = None) -> dict:
    """Up to max_batches random launches through greedy_cuda_arrays (threads per block cycling
    through `threads`), stopping once layer_cap layers or budget_s seconds are done; every layer
    compared with the CPU kernel. Returns {layers, batches, seconds, differing_layers, examples,
    ok}."""
    start = time.perf_counter()
    layers = batches = 0
    differing = []
    for i in range(max_batches):
        if layer_cap is not None and layers >= layer_cap:
            break
        if budget_s is not None and time.perf_counter() - start >= budget_s:
            break
        batch = random_batch(rng, max_layers=max_layers, max_experts=max_experts)
        outs = run_batch(batch, threads[i % len(threads)])
        for layer, out in enumerate(outs):
            if not same_layer(batch, layer, out):
                differing.append({"batch": i, "layer": layer,
                                  "ranks_experts": list(batch[0].shape[1:]),
                                  "rules": repr(batch[5])})
            layers += 1
        batches += 1
    return {"layers": layers, "batches": batches,
            "seconds": round(time.perf_counter() - start, 1),
            "differing_layers": len(differing), "examples": differing[:EXAMPLES],
            "ok": not differing}


def compare_random(rng: np.random.Generator, num_batches: int, *, max_layers: int,
                   threads=(128,), max_experts: int = 32) -> int:
    """check_random over num_batches launches; AssertionError when a plan differs from the CPU
    kernel's. Returns the layers compared."""
    result = check_random(rng, max_batches=num_batches, max_layers=max_layers,
                          threads=threads, max_experts=max_experts)
    if not result["ok"]:
        raise AssertionError(f"{result['differing_layers']} layers: CUDA plan differs from the "
                             f"CPU kernel's, e.g. {result['examples'][0]}")
    return result["layers"]


def decode_batch(model: str, hardware: str, ranks: int, experts: int, layers: int,
                 tokens_per_rank: int = 768):
    """Synthetic decode layers as a batch (default rules), as experiments.planner.lean_speed."""
    return (*harness.decode_layers(model, hardware, ranks, experts, layers, tokens_per_rank),
            GreedyRules())


def new_inputs(load: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Other loads of the same shape for the reuse checks: the layers in reverse order and the
    experts too (a different instance even for one layer), windows with the layers."""
    return (np.ascontiguousarray(load[::-1, :, ::-1]), np.ascontiguousarray(window[::-1]))


def host_plan(plan):
    """A CudaPlan (torch CUDA tensors, numba device arrays, simulator arrays) copied into numpy
    arrays; torch tensors are read on torch's current stream."""
    from probe.planner.greedy_cuda import CudaPlan

    return CudaPlan(*(a.copy_to_host() if hasattr(a, "copy_to_host") else
                      np.array(a.cpu().numpy(), copy=True) for a in plan))


def layer_plan(plan, layer: int) -> tuple:
    """Layer `layer` of a host CudaPlan as greedy_arrays' outputs (replicas, blk_expert,
    blk_assign, num_moves, objective)."""
    n_rep, n_blk = int(plan.num_replicas[layer]), int(plan.num_blocks[layer])
    return (plan.replicas[layer, :n_rep], plan.blk_expert[layer, :n_blk],
            plan.blk_assign[layer, :n_blk], int(plan.num_moves[layer]),
            float(plan.objective[layer]))


def stack_plans(plans: list):
    """One-layer host plans stacked as one L-layer plan."""
    from probe.planner.greedy_cuda import CudaPlan

    return CudaPlan(*(np.concatenate(parts) for parts in zip(*plans, strict=True)))


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    same = a == b
    if a.dtype.kind == "f":
        same |= np.isnan(a) & np.isnan(b)
    return same


def _differing_in_plan(got, want) -> int:
    """Entries that differ among the plan's own entries (want's counts: replicas rows before
    num_replicas, blocks before num_blocks, and the per-layer values), the rest left out."""
    count = sum(int((~_same(getattr(got, f), getattr(want, f))).sum())
                for f in ("num_replicas", "num_blocks", "num_moves", "objective", "status"))
    for layer in range(len(want.num_replicas)):
        n_rep = max(int(want.num_replicas[layer]), 0)
        n_blk = max(int(want.num_blocks[layer]), 0)
        for f, n in (("replicas", n_rep), ("blk_expert", n_blk), ("blk_assign", n_blk)):
            count += int((getattr(got, f)[layer, :n] != getattr(want, f)[layer, :n]).sum())
    return count


def plan_diff(name: str, got, want) -> dict:
    """Compare two host plans (CudaPlan of numpy arrays) entry by entry, every buffer whole (the
    kernel writes every entry). Returns {check, ok, differing_entries: {output: count},
    differing_in_plan: count among the plan's own entries, examples}."""
    differing, examples = {}, []
    for field, a, b in zip(want._fields, got, want, strict=True):
        if a.shape != b.shape:
            differing[field] = f"shape {list(a.shape)} != {list(b.shape)}"
            continue
        wrong = np.argwhere(~_same(a, b))
        if len(wrong):
            differing[field] = len(wrong)
            examples += [{"output": field, "index": [int(i) for i in idx],
                          "got": a[tuple(idx)].item(), "want": b[tuple(idx)].item()}
                         for idx in wrong[:2]]
    shapes_equal = all(a.shape == b.shape for a, b in zip(got, want, strict=True))
    return {"check": name, "ok": not differing, "differing_entries": differing,
            "differing_in_plan": _differing_in_plan(got, want) if shapes_equal else None,
            "examples": examples[:EXAMPLES]}


def fill_junk(runner, *, sim: bool) -> None:
    """Overwrite a CudaGreedy's scratch (SCRATCH_JUNK) and output buffers (OUT_JUNK, NaN in
    floats): on the GPU with torch ops on torch's current stream, the stream plan launches on."""
    buffers = [(a, SCRATCH_JUNK) for a in runner.scratch] + [(a, OUT_JUNK) for a in runner.out]
    for arr, junk in buffers:
        value = np.nan if np.dtype(arr.dtype).kind == "f" else junk
        if sim:
            arr.copy_to_device(np.full(arr.shape, value, arr.dtype))
        else:
            import torch

            torch.as_tensor(arr, device="cuda").fill_(value)


def reuse_checks(batch, inputs, *, sim: bool, threads: int, runner=None) -> tuple[list, dict]:
    """The launch does not depend on its buffers' earlier contents: (1) a launch over junk
    buffers equals the first launch, (2) the runner reused on new_inputs equals a fresh runner
    (its buffers junk) on them. inputs(load, window) puts numpy arrays on the device. Returns
    the checks and {first, new_plan, new_inputs} (host plans, device inputs)."""
    from probe.planner.greedy_cuda import CudaGreedy

    load, home, slots, window, cost, rules = batch
    num_layers = load.shape[0]
    if runner is None:
        runner = CudaGreedy(home, slots, cost, rules, num_layers=num_layers, threads=threads)
    load_d, window_d = inputs(load, window)
    first = host_plan(runner.plan(load_d, window_d))
    fill_junk(runner, sim=sim)
    checks = [plan_diff("launch over junk buffers == first launch",
                        host_plan(runner.plan(load_d, window_d)), first)]
    new_d = inputs(*new_inputs(load, window))
    fresh = CudaGreedy(home, slots, cost, rules, num_layers=num_layers, threads=threads)
    fill_junk(fresh, sim=sim)
    new_plan = host_plan(fresh.plan(*new_d))
    checks.append(plan_diff("runner reused on new loads == fresh runner",
                            host_plan(runner.plan(*new_d)), new_plan))
    return checks, {"first": first, "new_plan": new_plan, "new_inputs": new_d}


def _torch_inputs(load: np.ndarray, window: np.ndarray) -> tuple:
    import torch

    return (torch.as_tensor(np.ascontiguousarray(load, dtype=np.int64), device="cuda"),
            torch.as_tensor(np.ascontiguousarray(window, dtype=np.float64), device="cuda"))


def gpu_eager(batch, repeats: int, budget_s: float) -> tuple[dict, list, dict]:
    """The eager launches on torch tensors: the checks (one-layer launches against the L-layer
    launch, reuse_checks) and the per-layer medians (us) with one layer per launch and all L per
    launch. Returns (row values, checks, state for gpu_graph)."""
    from probe.planner.greedy_cuda import CudaGreedy

    load, home, slots, window, cost, rules = batch
    num_layers = load.shape[0]
    load_t, window_t = _torch_inputs(load, window)
    start = time.perf_counter()
    every = CudaGreedy(home, slots, cost, rules, num_layers=num_layers)
    first = host_plan(every.plan(load_t, window_t))
    row = {"first_torch_launch_s": round(time.perf_counter() - start, 2)}
    one = [CudaGreedy(home[i], slots, cost, rules, num_layers=1) for i in range(num_layers)]
    singles = [host_plan(one[i].plan(load_t[i:i + 1], window_t[i:i + 1]))
               for i in range(num_layers)]
    differing = [i for i in range(num_layers) if not same_layer(batch, i, layer_plan(first, i))]
    checks = [{"check": "L-layer launch on torch tensors == CPU kernel", "ok": not differing,
               "differing_layers": differing},
              plan_diff("one-layer launches == rows of the L-layer launch", stack_plans(singles),
                        first)]
    per_layer = max(3, 2 * repeats // num_layers)
    single = []
    for i in range(num_layers):
        single += harness.event_us(
            lambda i=i: one[i].plan(load_t[i:i + 1], window_t[i:i + 1]), per_layer,
            budget_s / (2 * num_layers))
    batched = [t / num_layers for t in harness.event_us(
        lambda: every.plan(load_t, window_t), repeats, budget_s / 2)]
    row.update(one_per_launch_us=float(np.median(single)), one_per_launch_samples=len(single),
               all_per_launch_us=float(np.median(batched)), all_per_launch_samples=len(batched))
    more, state = reuse_checks(batch, _torch_inputs, sim=False, threads=every.threads,
                               runner=every)
    state.update(runner=every, load_t=load_t, window_t=window_t)
    return row, checks + more, state


def gpu_graph(state: dict, repeats: int, budget_s: float) -> tuple[dict, list]:
    """The L-layer launch captured in a CUDA graph on a side stream: replayed over junk buffers
    (== the eager plan), replayed after new loads are written into the captured inputs (== a
    fresh runner's plan), replays timed. Returns (row values, checks)."""
    import torch

    every, load_t, window_t = state["runner"], state["load_t"], state["window_t"]
    num_layers = every.num_layers
    graph = torch.cuda.CUDAGraph()
    harness.ALIVE.append((graph, state))
    try:
        harness.capture(graph, lambda: every.plan(load_t, window_t))
    except Exception as exc:  # the lead decides: record the exact error
        print("CUDA graph capture failed:", f"{type(exc).__name__}: {exc}", flush=True)
        return {"graph": "capture failed", "graph_error": f"{type(exc).__name__}: {exc}",
                "graph_traceback": traceback.format_exc()}, []
    fill_junk(every, sim=False)
    graph.replay()
    checks = [plan_diff("graph replay over junk buffers == eager launch",
                        host_plan(every.torch_out()), state["first"])]
    new_load, new_window = state["new_inputs"]
    load_t.copy_(new_load)
    window_t.copy_(new_window)
    fill_junk(every, sim=False)
    graph.replay()
    checks.append(plan_diff("graph replay on new loads in the captured inputs == fresh runner",
                            host_plan(every.torch_out()), state["new_plan"]))
    replays = [t / num_layers for t in harness.event_us(graph.replay, repeats, budget_s)]
    torch.cuda.synchronize()
    return {"graph": "captured", "graph_replay_us": float(np.median(replays)),
            "graph_replay_samples": len(replays)}, checks


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _markdown(report: dict) -> str:
    rnd = report["random"]
    random_line = ("Random instances: not run." if rnd is None else
                   f"Random instances: {rnd['layers']} layers in {rnd['seconds']} s, "
                   f"{rnd['differing_layers']} differ from the CPU kernel.")
    lines = ["# The greedy on the GPU (probe.planner.greedy_cuda)", "", "Command:", "",
             f"    {report['command']}", "", f"Device: {report['device']}. Status: "
             f"{report['status']}. First launch (compiles the kernels): "
             f"{_fmt(report['compile_s'])} s. {random_line} Per layer, medians in microseconds "
             "(CUDA events; L layers per launch: launch time / L).", "",
             "| config | decode layers identical | one per launch | L per launch | graph replay "
             "| CPU kernel | target | met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r.get('identical_layers', 'n/a')} / {r['layers']} | "
                     f"{_fmt(r.get('one_per_launch_us'))} | {_fmt(r.get('all_per_launch_us'))} | "
                     f"{_fmt(r.get('graph_replay_us'))} | {_fmt(r.get('cpu_us'))} | "
                     f"{r['target_us']:.0f} | {r.get('met', 'n/a')} |")
    lines += ["", "| config | check | result | differing entries per output | of them in the "
              "plan |", "|---|---|---|---|---:|"]
    for config, check in harness.all_checks(report):
        differing = check.get("differing_entries", check.get("differing_layers", ""))
        lines.append(f"| {config} | {check['check']} | {'ok' if check['ok'] else 'FAILED'} | "
                     f"{differing or ''} | {check.get('differing_in_plan', '')} |")
    for config, check in harness.all_checks(report):
        if not check["ok"] and check.get("examples"):
            lines += ["", f"{config}, {check['check']}: first differing entries "
                      f"`{json.dumps(check['examples'])}`"]
    return "\n".join(lines + harness.markdown_tail(report)) + "\n"


def _summary(report: dict) -> str:
    """The short table printed last."""
    lines = [f"{'per layer, us (medians)':<24}{'one/launch':>12}{'L/launch':>12}"
             f"{'graph':>12}{'CPU':>12}{'target':>8}  met"]
    for r in report["rows"]:
        lines.append(f"{r['config']:<24}{_fmt(r.get('one_per_launch_us')):>12}"
                     f"{_fmt(r.get('all_per_launch_us')):>12}"
                     f"{_fmt(r.get('graph_replay_us')):>12}{_fmt(r.get('cpu_us')):>12}"
                     f"{r['target_us']:>8.0f}  {r.get('met', 'n/a')}")
    return "\n".join(lines + harness.summary_tail(report))


def main(argv: list[str] | None = None) -> int:
    """Run the steps; returns the exit status (0: every comparison equal, every capture made,
    no step raised)."""
    args = harness.parse_args(__doc__, "gpu_greedy", argv,
                      "seconds: the random instances stop 10 s before it; on the GPU a "
                      "watchdog ends the process 5 s after it (default 105)")
    from probe.planner import greedy_cuda

    sim = args.device == "cpu"
    run = harness.Report("gpu_greedy", args, argv, {"compile_s": None, "random_layers": 0,
                                             "random": None},
                 _markdown, lambda row: row["target_us"])
    report, began, stage = run.data, run.began, run.stage
    layers = 1 if sim else (4 if args.quick else 32)
    repeats = 3 if sim else (20 if args.quick else 200)
    threads = 32 if sim else greedy_cuda.THREADS
    if not sim:
        with stage("first launch (compiles the CUDA and CPU kernels)"):
            start = time.perf_counter()
            batch = random_batch(np.random.default_rng(1), max_layers=2, max_experts=8)
            for layer, plan in enumerate(run_batch(batch, threads)):
                same_layer(batch, layer, plan)
            report["compile_s"] = round(time.perf_counter() - start, 1)
    batches, states = {}, {}
    for name, model, hardware, ranks, experts, target in CONFIGS:
        if sim and ranks > 8:
            continue
        row = {"config": name, "layers": layers, "target_us": target, "checks": []}
        report["rows"].append(row)
        with stage(f"{name}: decode plans vs the CPU kernel, CPU kernel timed"):
            batch = decode_batch(model, hardware, ranks, experts, layers,
                                 tokens_per_rank=16 if sim else 768)
            row["layers"] = int(batch[0].shape[0])
            same = [same_layer(batch, i, plan) for i, plan in enumerate(run_batch(batch, threads))]
            row["identical_layers"] = int(sum(same))
            row["checks"].append({"check": "decode plans == CPU kernel", "ok": all(same),
                                  "differing_layers": [i for i, ok in enumerate(same) if not ok]})
            args_per_layer = [cpu_args(batch, i) for i in range(row["layers"])]
            row["cpu_us"] = harness.cpu_us(greedy_arrays, args_per_layer, repeats,
                                           1.0 if sim else 3.0)
            batches[name] = batch
        if name not in batches:
            continue
        if sim:
            with stage(f"{name}: junk buffers and reuse (simulator)"):
                checks, _ = reuse_checks(batches[name], _sim_inputs, sim=True, threads=threads)
                row["checks"] += checks
        else:
            with stage(f"{name}: eager launches, timed"):
                values, checks, states[name] = gpu_eager(batches[name], repeats, budget_s=8.0)
                row.update(values)
                row["checks"] += checks
        print({k: v for k, v in row.items() if k != "checks"}, flush=True)
    run.write()
    for row in report["rows"]:  # after every timing is written
        if row["config"] in states:
            with stage(f"{row['config']}: CUDA graph"):
                values, checks = gpu_graph(states[row["config"]], repeats, budget_s=3.0)
                row.update(values)
                row["checks"] += checks
    if not sim:
        report["status"] = "timings and graphs written, random instances next"
        run.write()
        print(_summary(report), flush=True)  # the table so far, in case the rest is cut short
    with stage("random instances vs the CPU kernel"):
        rng = np.random.default_rng(2026)
        if sim:
            result = check_random(rng, max_batches=3, max_layers=2, threads=(32,),
                                  max_experts=12)
        else:
            result = check_random(rng, max_batches=10_000, max_layers=4, threads=(128, 64, 256),
                                  layer_cap=20 if args.quick else RANDOM_LAYERS,
                                  budget_s=min(RANDOM_SECONDS,
                                               args.time_limit - 10.0 - (time.perf_counter()
                                                                         - began)))
        report["random"] = result
        report["random_layers"] = result["layers"]
        print(f"random instances: {result['layers']} layers in {result['seconds']} s, "
              f"{result['differing_layers']} differ", flush=True)
    return run.finish(_summary)


def _sim_inputs(load: np.ndarray, window: np.ndarray) -> tuple:
    from probe.planner.numba_cuda import cuda

    return (cuda.to_device(np.ascontiguousarray(load, dtype=np.int64)),
            cuda.to_device(np.ascontiguousarray(window, dtype=np.float64)))


if __name__ == "__main__":
    harness.exit_after(main)
