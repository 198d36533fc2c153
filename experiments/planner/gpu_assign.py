"""Dispatch-time assignment on the GPU (probe.planner.assign_cuda) against the host kernel.

    python3 -m experiments.planner.gpu_assign --device cuda --out DIR
    python3 -m experiments.planner.gpu_assign --device cpu --quick --out DIR   (simulator)

1. Correctness: fresh random small instances (experiments.planner.assign_speed's generator,
   seeded by --seed, default a fresh seed that is recorded), three layers each, with and
   without the home, under the default "waves" schedule (half as many under "serial"),
   then every layer of the timing instances under both: the device assignment and its
   eq. 8 objective must equal the host kernel's (`assign._best`) exactly. A mismatch
   (or an error in one configuration) is recorded in the JSON and MD and the run goes on;
   the exit status is 1 only at the end, after everything is written. The number of
   assignment entries that differ from the host's (0 when the two agree bit for bit) is
   reported in all and per configuration.
2. Speed: one launch assigns all layers of an instance set (assign_speed.py's instances: the
   true decode load over EPLB layouts, ep=8 / 128 experts and ep=64 / 256 experts, +1 and +3
   slots per rank); median time per layer of the launch timed with CUDA events after warm-up,
   eagerly and as a replayed CUDA graph, beside the host kernel's median per layer; also the
   whole eager launch, and a launch for one layer alone, eager and as a replayed graph (what
   a runtime that assigns each layer at its dispatch waits for); each for both schedules of
   the descents ("serial", "waves": the same assignment, checked against the host for
   both). Configurations after the first not started by --budget seconds are skipped (and
   listed), so that the run stays under two minutes.
3. Objective gap against the exact LP, only where highspy is importable (it is not on the GPU
   machine; results/assign_speed.* has the 1,000-instance gap).

--device cpu runs the kernel under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set here
before Numba is imported) on small shapes (ep=4 / 16 experts): a smoke test, not a timing.
Writes gpu_assign.json, gpu_assign.md and gpu_assign.manifest.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from experiments.manifest import Manifest

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
QUICK_CONFIGS = (("ep=4, E=16", "qwen3-235b-a22b", "h200x8", 4, 16),)


def _to_host(value) -> np.ndarray:
    if hasattr(value, "copy_to_host"):
        return value.copy_to_host()
    if hasattr(value, "cpu"):
        return value.cpu().numpy()
    return np.asarray(value)


def _inputs(arrays, device: str):
    """numpy arrays as the assigner takes them, all int64 (one kernel signature, one compile):
    torch CUDA tensors, or numpy (simulator)."""
    arrays = [None if a is None else np.ascontiguousarray(a, dtype=np.int64) for a in arrays]
    if device == "cpu":
        return arrays
    import torch

    return [None if a is None else torch.from_numpy(a).to(device) for a in arrays]


def compare(cost, loads, copies, home, *, passes: int, device: str,
            schedule: str = "waves") -> tuple[list[str], int]:
    """(mismatches, empty when equal; the number of assignment entries that differ) of the
    device assigner (its `schedule`) against the host kernel on layers loads int [L, S, E],
    copies int [L, G, E] (home bool [L, G, E] or None)."""
    from probe.planner.assign import _best, kernel_args
    from probe.planner.assign_cuda import DeviceAssigner

    num_layers, _, num_experts = loads.shape
    assigner = DeviceAssigner(cost, num_experts, num_layers, passes=passes, schedule=schedule,
                              with_home=home is not None)
    out, obj, status = assigner(*_inputs((loads, copies, home), device))
    out, obj, status = _to_host(out), _to_host(obj), _to_host(status)
    problems, differing = [], 0
    for layer in range(num_layers):
        ref, ref_obj = _best(*kernel_args(loads[layer], copies[layer], cost, passes=passes,
                                          home=None if home is None else home[layer]))
        if status[layer] != 0:
            problems.append(f"layer {layer}: status {status[layer]}")
        entries = int((ref != out[layer]).sum())
        differing += entries
        if entries:
            problems.append(f"layer {layer}: assignment differs in {entries} entries")
        if ref_obj != obj[layer]:
            problems.append(f"layer {layer}: objective {obj[layer]!r} != host {ref_obj!r}")
    return problems, differing


def compare_random(count: int, seed: int, device: str = "cpu",
                   schedule: str = "waves") -> tuple[list[str], int]:
    """(mismatches, differing assignment entries) of the `schedule` over `count` random small
    instances, three layers each (the instance's load and two reshuffles of it over the
    sources), half with the home."""
    from experiments.planner.assign_speed import random_instance

    rng = np.random.default_rng(seed)
    problems, differing = [], 0
    for i in range(count):
        load, copies, home, cost = random_instance(rng)
        passes = int(rng.integers(1, 9))
        loads = np.stack([load, load[::-1], rng.permutation(load)])
        with_home = i % 2 == 1
        found, entries = compare(cost, loads, np.stack([copies] * 3),
                                 np.stack([home] * 3) if with_home else None, passes=passes,
                                 device=device, schedule=schedule)
        problems += [f"instance {i}: {p}" for p in found]
        differing += entries
    return problems, differing


def _stacked(instances):
    loads = np.stack([load for load, _ in instances]).astype(np.int64)
    copies = np.stack([c for _, c in instances]).astype(np.int64)
    return loads, copies


def _event_median(fn, repeats: int) -> float:
    import torch

    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3)
    return float(np.median(samples))


def _captured(fn):
    """A torch CUDA graph of fn() (warmed up on a side stream first), replayed once."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        fn()
    cuda_graph.replay()
    torch.cuda.synchronize()
    return cuda_graph


def _device_times(cost, loads, copies, *, device: str, repeats: int, schedule: str) -> dict:
    """Seconds of the device assigner with `schedule`: the whole eager launch for all layers,
    its replayed CUDA graph per layer, and a launch for the first layer alone, eager and
    graph-replayed (the graph times and graph_matches_eager, whether a replay writes the
    eager launch's assignment, are None without a GPU)."""
    from probe.planner.assign_cuda import DeviceAssigner

    num_layers = loads.shape[0]
    assigner = DeviceAssigner(cost, loads.shape[2], num_layers, schedule=schedule)
    args = _inputs((loads, copies), device)
    assigner(*args)  # compile and allocate
    single = DeviceAssigner(cost, loads.shape[2], 1, schedule=schedule)
    single_args = _inputs((loads[:1], copies[:1]), device)
    single(*single_args)
    graph = one_graph = graph_matches = None
    if device == "cpu":
        samples, one = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            assigner(*args)
            samples.append(time.perf_counter() - start)
            start = time.perf_counter()
            single(*single_args)
            one.append(time.perf_counter() - start)
        launch = float(np.median(samples))
        one_eager = float(np.median(one))
    else:
        import torch

        torch.cuda.synchronize()
        launch = _event_median(lambda: assigner(*args), repeats)
        one_eager = _event_median(lambda: single(*single_args), repeats)
        cuda_graph = _captured(lambda: assigner(*args))
        graph = _event_median(cuda_graph.replay, repeats) / num_layers
        one_graph = _event_median(_captured(lambda: single(*single_args)).replay, repeats)
        torch.cuda.synchronize()
        out = assigner(*args)[0]  # the buffer the graph writes too
        want = out.clone()
        out.zero_()
        cuda_graph.replay()
        torch.cuda.synchronize()
        graph_matches = bool(torch.equal(out, want))
    return {"launch": launch, "graph": graph, "one_eager": one_eager, "one_graph": one_graph,
            "graph_matches": graph_matches}


def speed(name, cost, instances, *, device: str, repeats: int) -> dict:
    """Median microseconds per layer of one launch for all the layers (eager and
    graph-replayed), of the whole eager launch and of a launch for the first layer alone
    (graph-replayed, and eager), for each schedule: the keys device_* are the "serial"
    schedule (the kernel's first layout), waves_* the "waves" schedule; the host kernel's
    median per layer; graph_matches_eager: whether graph replays write the eager launches'
    assignments (None without a GPU); waves: the number of multi-copy experts and of waves
    of the first layer (`assign_cuda.descent_waves`), the largest over the layers too."""
    from probe.planner.assign import _best, kernel_args
    from probe.planner.assign_cuda import descent_waves

    loads, copies = _stacked(instances)
    num_layers = loads.shape[0]
    times = {schedule: _device_times(cost, loads, copies, device=device, repeats=repeats,
                                     schedule=schedule) for schedule in ("serial", "waves")}
    kargs = [kernel_args(load, c, cost) for load, c in instances]
    _best(*kargs[0])
    host = []
    for a in kargs:
        for _ in range(max(1, repeats // 4)):
            start = time.perf_counter()
            _best(*a)
            host.append(time.perf_counter() - start)
    shape = [descent_waves(load, c, cost) for load, c in instances]
    row = {"config": name, "layers_per_launch": num_layers, "repeats": repeats,
           "multi_experts_first": shape[0][0], "waves_first": shape[0][1],
           "multi_experts_max": max(m for m, _ in shape), "waves_max": max(w for _, w in shape),
           "host_kernel_us": float(np.median(host)) * 1e6}
    matches = [t["graph_matches"] for t in times.values()]
    row["graph_matches_eager"] = None if None in matches else all(matches)
    for prefix, schedule in (("device", "serial"), ("waves", "waves")):
        t = times[schedule]
        row[f"{prefix}_eager_us"] = t["launch"] / num_layers * 1e6
        row[f"{prefix}_launch_us"] = t["launch"] * 1e6
        row[f"{prefix}_graph_us"] = None if t["graph"] is None else t["graph"] * 1e6
        # device_one_layer_us: graph-replayed on a GPU (eager in the simulator), as before.
        row[f"{prefix}_one_layer_us"] = (t["one_eager"] if t["one_graph"] is None
                                         else t["one_graph"]) * 1e6
        row[f"{prefix}_one_layer_eager_us"] = t["one_eager"] * 1e6
    return row


def lp_gap(cost, instances, device: str) -> dict | None:
    """(device - LP) / LP of eq. 8 on these layers, or None without highspy."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return None
    from experiments.planner.assign_speed import objective
    from probe.planner.assign import assign_tokens
    from probe.planner.assign_cuda import DeviceAssigner

    loads, copies = _stacked(instances)
    out, _, _ = DeviceAssigner(cost, loads.shape[2], loads.shape[0])(
        *_inputs((loads, copies), device))
    out = _to_host(out)
    gaps = []
    for layer, (load, c) in enumerate(instances):
        ref = objective(load, c, cost, assign_tokens(load, c, cost, method="lp"))
        gaps.append((objective(load, c, cost, out[layer]) - ref) / ref)
    return {"median": float(np.median(gaps)), "max": float(np.max(gaps))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="folder for gpu_assign.{json,md}")
    parser.add_argument("--quick", action="store_true", help="fewer instances and repeats")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random correctness instances (default: fresh)")
    parser.add_argument("--budget", type=float, default=75.0,
                        help="seconds after which no further timing configuration is started "
                             "(default 75; each takes a few seconds on the H200)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        if "numba" in sys.modules:
            print("--device cpu needs NUMBA_ENABLE_CUDASIM=1 before Numba is imported",
                  file=sys.stderr)
            return 2
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("CUDA not available", file=sys.stderr)
            return 2
    from experiments.planner.assign_speed import layer_instances

    run = Manifest.start("experiments.planner.gpu_assign", argv)
    wall = time.perf_counter()
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    quick = args.quick or args.device == "cpu"
    count = 6 if args.device == "cpu" else (20 if args.quick else 100)
    serial_count = max(1, count // 2)  # the "serial" schedule, on the first instances
    differing = {}  # configuration -> assignment entries that differ from the host's
    problems = []
    for key, schedule, number in (("random instances", "waves", count),
                                  ("random instances, serial", "serial", serial_count)):
        try:
            found, differing[key] = compare_random(number, seed, args.device, schedule)
            problems += [f"{schedule}: {p}" for p in found]
        except Exception as error:  # recorded, and the timings still run
            problems.append(f"{key}: {type(error).__name__}: {error}")
    print(f"random instances: {count} (serial {serial_count}) x 3 layers, seed {seed}: "
          f"{'equal' if not problems else problems[:5]}", flush=True)

    configs = QUICK_CONFIGS if args.device == "cpu" else CONFIGS
    rows, gaps, checked, skipped = [], {}, 0, []
    for name, model, hardware, ranks, experts in configs:
        for extra in (1, 3):
            label = f"{name}, +{extra} slots/rank"
            if (rows or skipped) and time.perf_counter() - wall > args.budget:
                skipped.append(label)  # the first configuration always runs
                continue
            try:
                cost, instances = layer_instances(model=model, hardware=hardware,
                                                  num_ranks=ranks, num_experts=experts,
                                                  extra=extra, steps=1 if quick else 6,
                                                  layers=2 if quick else 4, seed=1)
                loads, copies = _stacked(instances)
                for schedule in ("waves", "serial"):
                    key = label if schedule == "waves" else f"{label}, serial"
                    found, differing[key] = compare(cost, loads, copies, None, passes=8,
                                                    device=args.device, schedule=schedule)
                    problems += [f"{name} +{extra} {schedule}: {p}" for p in found]
                checked += loads.shape[0]
                rows.append(speed(label, cost, instances, device=args.device,
                                  repeats=3 if args.device == "cpu" else 20))
                if rows[-1]["graph_matches_eager"] is False:
                    problems.append(f"{label}: the replayed graph's assignment differs")
                gap = lp_gap(cost, instances, args.device)
                if gap is not None:
                    gaps[label] = gap
            except Exception as error:  # recorded; the other configurations still run
                problems.append(f"{label}: {type(error).__name__}: {error}")
            print(f"{label}: done at {time.perf_counter() - wall:.0f} s", flush=True)
    print(f"timing instances: {checked} layers: {'equal' if not problems else problems[:5]}",
          flush=True)

    result = {"device": args.device, "quick": quick, "seed": seed,
              "random_instances": count, "random_instances_serial": serial_count,
              "layers_checked": checked + 3 * count,
              "mismatches": problems, "differing_entries": sum(differing.values()),
              "differing_entries_by_config": differing, "speed": rows, "skipped_configs": skipped,
              "lp_gap": gaps or "skipped: highspy is not importable here",
              "wall_s": time.perf_counter() - wall,
              "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    if args.device == "cuda":
        import torch

        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, md = out / "gpu_assign.json", out / "gpu_assign.md"
    path.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown(result))
    run.write(out, [path, md], name="gpu_assign.manifest.json")
    print(f"mismatches: {len(problems)}; differing assignment entries: "
          f"{result['differing_entries']}; skipped: {skipped or 'none'}; "
          f"{result['wall_s']:.0f} s")
    print(table(result))
    return 1 if problems else 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def table(result: dict) -> str:
    lines = ["| config | multi-copy experts / waves (first layer; max) | layers / launch "
             "| schedule | device eager (us/layer) | device graph (us/layer) "
             "| host kernel (us/layer) | whole launch, eager (us) | one layer, eager (us) "
             "| one-layer graph (us) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["speed"]:
        for prefix, schedule in (("device", "serial"), ("waves", "waves")):
            one_graph = (None if r[f"{prefix}_graph_us"] is None
                         else r[f"{prefix}_one_layer_us"])
            lines.append(
                f"| {r['config']} | {r['multi_experts_first']} / {r['waves_first']}; "
                f"{r['multi_experts_max']} / {r['waves_max']} | {r['layers_per_launch']} | "
                f"{schedule} | {_fmt(r[f'{prefix}_eager_us'])} | "
                f"{_fmt(r[f'{prefix}_graph_us'])} | {_fmt(r['host_kernel_us'])} | "
                f"{_fmt(r[f'{prefix}_launch_us'])} | {_fmt(r[f'{prefix}_one_layer_eager_us'])} "
                f"| {_fmt(one_graph)} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    gap = result["lp_gap"]
    if isinstance(gap, dict):
        gap_lines = [f"- {name}: median {g['median']:+.4%}, max {g['max']:+.4%}"
                     for name, g in gap.items()]
    else:
        gap_lines = [f"- {gap} (results/assign_speed.md has the gap on 1,000 instances)"]
    return "\n".join([
        "# Dispatch-time assignment on the GPU",
        "",
        f"Made by `python3 -m experiments.planner.gpu_assign --device {result['device']}"
        + (" --quick" if result["quick"] else "") + f"` (seed {result['seed']}); "
        f"{result['machine'].get('gpu', result['machine']['platform'])}. "
        + ("Under Numba's CUDA simulator: the times are not GPU times. "
           if result["device"] == "cpu" else ""),
        "",
        f"Correctness: {result['layers_checked']} layers compared with the host kernel "
        f"(assignment and eq. 8 objective exactly) under the \"waves\" schedule, "
        f"{result['random_instances_serial']} of the random instances and every timing "
        f"layer under \"serial\" too: "
        f"{result['differing_entries']} assignment entries differ in all "
        f"({', '.join(f'{k}: {v}' for k, v in result['differing_entries_by_config'].items())}); "
        + ("all equal." if not result["mismatches"]
           else f"{len(result['mismatches'])} mismatches:"),
        "",
        *[f"- {p}" for p in result["mismatches"][:20]],
        *([f"- ... and {len(result['mismatches']) - 20} more", ""]
          if len(result["mismatches"]) > 20 else [""] if result["mismatches"] else []),
        *([f"Skipped (time budget): {', '.join(result['skipped_configs'])}.", ""]
          if result["skipped_configs"] else []),
        "Median time per layer, one launch for all the layers (CUDA events; host kernel: "
        "`assign._best` per layer, dense output); the whole eager launch, and a launch for "
        "the first layer alone, eager and as a replayed CUDA graph; each for both schedules "
        "(the same assignment; \"waves\" runs every descent across the block, the experts "
        "of one wave side by side, \"serial\" each descent on one thread):",
        "",
        table(result),
        "",
        "Objective gap (device - LP) / LP:",
        "",
        *gap_lines,
        ""])


if __name__ == "__main__":
    raise SystemExit(main())
