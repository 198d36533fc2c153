"""The greedy on the GPU (probe.planner.greedy_cuda): same plans as the CPU kernel, and its time.

    python -m experiments.planner.gpu_greedy --device cuda --out results/gpu_greedy
    python -m experiments.planner.gpu_greedy --device cpu --quick --out /tmp/gpu_greedy

Correctness first: identical plans (replicas, changed experts, their assignment, moves) to
`greedy.greedy_arrays` on random small instances (2-8 ranks, 4-32 experts, skewed loads, random
slots, windows, costs and rules 1-7 options; launches of 1-4 layers) and on synthetic decode
loads (probe.traces.generate("decode"), 768 tokens per rank, top-8, 3 slots per rank, window
"auto", default GreedyRules) at ep=8 / 128 experts (qwen3-235b-a22b on h200x8) and ep=64 / 256
experts (deepseek-v3 on h200x8-n8), L = 32 layers (4 with --quick). Then, on those layers: the
median per-layer GPU time (CUDA events around the launch, after warm-up; the host's launch
overhead is inside when the GPU waits for it) with one layer per launch and L layers per launch
(launch time / L); the L-layer launch captured in a torch.cuda.CUDAGraph on a side stream and
replayed (the replayed plan checked equal to the eager one, then new loads written into the
captured inputs checked to give their own eager plan; replays timed); the CPU kernel's median
per layer beside them.
A failed capture is caught and its exact error recorded. Targets: <= 10 us per layer at ep=8 /
128 experts, <= 50 us at ep=64 / 256.

--device cpu runs the kernel in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set here before
numba.cuda is imported): correctness only, on a few small instances and one small decode layer
(the simulator is about 0.5 s per layer); nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np

from probe.planner.cost import CostModel
from probe.planner.greedy import greedy_arrays
from probe.planner.greedy_rules import GreedyRules

SLOTS = 3
CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128, 10.0),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256, 50.0))


def random_batch(rng: np.random.Generator, *, max_layers: int = 1, max_experts: int = 32):
    """A random launch: (load int64 [L, S, E], home bool [L, G, E], slots int64 [G], window
    float64 [L, G], cost, rules): 2-8 ranks, 4-max_experts experts, one home rank per expert
    (sometimes extra home copies), Zipf-skewed loads, 0-3 slots, windows 0 / random / inf,
    alpha and beta of several sizes, zero or random token times, random rules 1-7 options."""
    num_ranks = int(rng.integers(2, 9))
    num_experts = int(rng.integers(4, max_experts + 1))
    num_layers = int(rng.integers(1, max_layers + 1))
    shape = (num_ranks, num_experts)
    home = np.zeros((num_layers, *shape), bool)
    load = np.zeros((num_layers, *shape), np.int64)
    skew = float(rng.choice([0.0, 0.8, 1.5, 3.0]))
    for layer in range(num_layers):
        home[layer, rng.integers(0, num_ranks, num_experts), np.arange(num_experts)] = True
        if rng.random() < 0.25:
            home[layer] |= rng.random(shape) < 0.2
        weight = np.arange(1, num_experts + 1) ** -skew
        weight = weight[rng.permutation(num_experts)]
        per_rank = int(rng.choice([0, 10, 40, 200, 200]))
        load[layer] = rng.multinomial(per_rank, weight / weight.sum(), num_ranks)
    slots = rng.integers(0, 4, num_ranks)
    kind = rng.choice(3, p=[0.1, 0.45, 0.45])
    window = [np.zeros, lambda s: rng.random(s) * 3, lambda s: np.full(s, np.inf)][kind](
        (num_layers, num_ranks))
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


def cpu_layer(batch, layer: int) -> tuple:
    """greedy_arrays' outputs for one layer of a batch."""
    load, home, slots, window, cost, rules = batch
    return greedy_arrays(
        np.ascontiguousarray(load[layer], dtype=np.int64), np.ascontiguousarray(home[layer]),
        np.ascontiguousarray(slots, dtype=np.int64),
        np.ascontiguousarray(window[layer], dtype=np.float64), float(cost.alpha),
        float(cost.beta), cost.token_time, cost.transfer_time,
        rules.max_moves(home.shape[1]), rules.epsilon, *rules.flags.values())


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


def compare_random(rng: np.random.Generator, num_batches: int, *, max_layers: int,
                   threads=(128,), max_experts: int = 32) -> int:
    """Run num_batches random launches through greedy_cuda_arrays (threads per block cycling
    through `threads`); AssertionError at the first plan that differs. Returns the layers."""
    layers = 0
    for i in range(num_batches):
        batch = random_batch(rng, max_layers=max_layers, max_experts=max_experts)
        outs = run_batch(batch, threads[i % len(threads)])
        for layer, out in enumerate(outs):
            if not same_layer(batch, layer, out):
                raise AssertionError(f"batch {i} layer {layer}: CUDA plan differs from the CPU "
                                     f"kernel's ({batch[5]})")
            layers += 1
    return layers


def decode_batch(model: str, hardware: str, ranks: int, experts: int, layers: int,
                 tokens_per_rank: int = 768):
    """Synthetic decode layers as a batch (default rules), as experiments.planner.lean_speed."""
    from probe.planner.layers import attention_time
    from probe.planner.problem import BalanceProblem
    from probe.specs import hardware_preset, model_preset
    from probe.traces import generate

    spec_model, spec_hw = model_preset(model), hardware_preset(hardware)
    cost = CostModel.from_specs(spec_model, spec_hw, num_ranks=ranks)
    attention = attention_time(spec_model, spec_hw)
    trace = generate("decode", num_steps=1, tokens_per_step=tokens_per_rank * ranks,
                     num_layers=layers, num_experts=experts, top_k=8, num_ranks=ranks, seed=1)
    loads = trace.load_counts()
    problems = [BalanceProblem.from_load(loads[0, layer], cost, SLOTS, "auto",
                                         attention_time=attention) for layer in range(layers)]
    return (np.stack([p.load for p in problems]).astype(np.int64),
            np.stack([p.home for p in problems]), np.asarray(problems[0].slots, np.int64),
            np.stack([p.window for p in problems]).astype(np.float64), cost, GreedyRules())


def _cpu_us(batch, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        for layer in range(batch[0].shape[0]):
            start = time.perf_counter()
            cpu_layer(batch, layer)
            samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e6)


def time_gpu(batch, repeats: int) -> dict:
    """Per-layer medians (us) with CUDA events: one layer per launch, all L per launch, and a
    captured CUDA graph of the L-layer launch replayed; plus the capture's outcome."""
    import torch

    from probe.planner.greedy_cuda import CudaGreedy

    load, home, slots, window, cost, rules = batch
    num_layers = load.shape[0]
    load_t = torch.as_tensor(load, device="cuda")
    window_t = torch.as_tensor(window, device="cuda")
    one = [CudaGreedy(home[i], slots, cost, rules, num_layers=1) for i in range(num_layers)]
    every = CudaGreedy(home, slots, cost, rules, num_layers=num_layers)
    eager = every.plan(load_t, window_t)
    for i in range(num_layers):  # warm-up, and the one-layer runner agrees with the L-layer one
        got = one[i].plan(load_t[i:i + 1], window_t[i:i + 1])
        torch.cuda.synchronize()
        if not torch.equal(got.blk_assign[0, :int(got.num_blocks[0])],
                           eager.blk_assign[i, :int(eager.num_blocks[i])]):
            raise AssertionError(f"layer {i}: one-layer launch differs from the L-layer launch")
    eager = [t.clone() for t in every.plan(load_t, window_t)]
    torch.cuda.synchronize()

    def events(fn, n):
        out = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3)  # us
        return out

    single = []
    for i in range(num_layers):
        single += events(lambda i=i: one[i].plan(load_t[i:i + 1], window_t[i:i + 1]), repeats)
    batched = [t / num_layers for t in events(lambda: every.plan(load_t, window_t), repeats)]
    row = {"one_per_launch_us": float(np.median(single)),
           "all_per_launch_us": float(np.median(batched)), "graph": "not tried"}
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            every.plan(load_t, window_t)  # warm-up on the side stream
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph, stream=side):
            every.plan(load_t, window_t)
        for t in every.torch_out():
            t.zero_()
        graph.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(every.torch_out(), eager, strict=True))
        # New loads written into the captured input tensors: the replay plans them.
        flipped_load, flipped_window = load_t.flip(0).contiguous(), window_t.flip(0).contiguous()
        check = CudaGreedy(home, slots, cost, rules, num_layers=num_layers)
        fresh = [t.clone() for t in check.plan(flipped_load, flipped_window)]
        load_t.copy_(flipped_load)
        window_t.copy_(flipped_window)
        graph.replay()
        torch.cuda.synchronize()
        same_new = all(torch.equal(a, b) for a, b in zip(every.torch_out(), fresh, strict=True))
        replays = [t / num_layers for t in events(graph.replay, repeats)]
        row.update(graph="captured", graph_same_plan=bool(same and same_new),
                   graph_replay_us=float(np.median(replays)))
        if not (same and same_new):
            raise AssertionError("replayed graph's plan differs from the eager launch's")
    except AssertionError:
        raise
    except Exception as exc:  # the lead decides: record the exact error
        row.update(graph="capture failed", graph_error=f"{type(exc).__name__}: {exc}",
                   graph_traceback=traceback.format_exc())
        print("CUDA graph capture failed:", row["graph_error"])
    return row


def _markdown(report: dict, command: str) -> str:
    lines = ["# The greedy on the GPU (probe.planner.greedy_cuda)", "", "Command:", "",
             f"    {command}", "", f"Device: {report['device']}. Random instances with "
             f"identical plans: {report['random_layers']} layers. Per layer, medians in "
             "microseconds (CUDA events; L layers per launch: launch time / L).", "",
             "| config | decode layers identical | one per launch | L per launch | graph replay "
             "| CPU kernel | target | met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['identical_layers']} | "
                     f"{r.get('one_per_launch_us', float('nan')):.1f} | "
                     f"{r.get('all_per_launch_us', float('nan')):.1f} | "
                     f"{r.get('graph_replay_us', float('nan')):.1f} | {r['cpu_us']:.1f} | "
                     f"{r['target_us']:.0f} | {r.get('met', 'n/a')} |")
    for r in report["rows"]:
        if r.get("graph_error"):
            lines += ["", f"Graph capture failed ({r['config']}): `{r['graph_error']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the GPU; cpu: Numba's CUDA simulator (correctness only)")
    parser.add_argument("--quick", action="store_true", help="fewer instances and repeats")
    parser.add_argument("--out", default="results/gpu_greedy", help="output folder")
    args = parser.parse_args(argv)
    if args.device == "cpu":  # must precede the first import of numba.cuda
        import numba

        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        numba.config.ENABLE_CUDASIM = 1
    from experiments.manifest import Manifest
    from probe.planner import greedy_cuda

    if args.device == "cpu" and not greedy_cuda.SIMULATOR:
        raise SystemExit("--device cpu needs NUMBA_ENABLE_CUDASIM=1 before numba.cuda is "
                         "imported (run this module as a fresh process)")
    run = Manifest.start("experiments.planner.gpu_greedy", argv)
    sim = args.device == "cpu"
    rng = np.random.default_rng(2026)
    if sim:
        random_layers = compare_random(rng, 3, max_layers=2, threads=(32,), max_experts=12)
    else:
        random_layers = compare_random(rng, 20 if args.quick else 200, max_layers=4,
                                       threads=(128, 64, 256))
    print(f"random instances: {random_layers} layers, identical plans")
    rows = []
    for name, model, hardware, ranks, experts, target in CONFIGS:
        if sim and ranks > 8:
            continue
        layers = 1 if sim else (4 if args.quick else 32)
        batch = decode_batch(model, hardware, ranks, experts, layers,
                             tokens_per_rank=16 if sim else 768)
        outs = run_batch(batch, 32 if sim else 128)
        identical = sum(same_layer(batch, i, out) for i, out in enumerate(outs))
        if identical != layers:
            raise AssertionError(f"{name}: {layers - identical} decode layers differ")
        row = {"config": name, "layers": layers, "identical_layers": identical,
               "target_us": target, "cpu_us": _cpu_us(batch, 3 if sim else 20)}
        if not sim:
            row.update(time_gpu(batch, 20 if args.quick else 200))
            best = min(row["all_per_launch_us"], row.get("graph_replay_us", np.inf))
            row["met"] = bool(best <= target)
        rows.append(row)
        print(row)
    device = "Numba CUDA simulator" if sim else _gpu_name()
    report = {"device": device, "random_layers": random_layers, "rows": rows,
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu_greedy.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    command = f"python -m experiments.planner.gpu_greedy --device {args.device}" + (
        " --quick" if args.quick else "")
    md = out / "gpu_greedy.md"
    md.write_text(_markdown(report, command))
    run.write(out, [json_path, md], name="gpu_greedy.manifest.json")
    print(_markdown(report, command))


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    main()
