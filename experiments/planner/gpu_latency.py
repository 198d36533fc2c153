"""One layer's planning latency on the GPU: the greedy, the parallel greedy and the assigner.

    python3 -m experiments.planner.gpu_latency --device cuda --out results/gpu_latency
    python3 -m experiments.planner.gpu_latency --device cpu --quick --out /tmp/gpu_latency

A runtime plans layer by layer (the predictor predicts the next layer only), so what counts is
how long ONE layer's plan takes, not layers per second. On synthetic decode loads
(experiments.planner.gpu_greedy.decode_batch: 768 tokens per rank, top-8, 3 slots per rank,
window "auto", default rules) at ep=8 / 128 experts and ep=64 / 256 experts, in this order (the
report is rewritten after each step, so a run cut short keeps what it finished):
1. Correctness first: the greedy's one-layer plans (probe.planner.greedy_cuda, each memory
   variant: working arrays in shared memory where they fit, and in global scratch) equal the
   CPU kernel's (`greedy.greedy_arrays`) on 4 layers, and the L-layer launch's on all L.
2. The greedy's one-layer latency (median, CUDA events, after warm-up), as a replayed CUDA
   graph (the kernel alone) and eager (the host's launch overhead inside), at the default
   threads per block and memory; then the breakdowns, graph replays: k_max in {0, 1, 4, 16}
   (0 = the start alone; per move = (t(k) - t(0)) / moves made), threads per block in
   {64, 128, 256, 512, 1024} (a launch the GPU refuses is recorded as invalid, with the
   error), and both memory variants where shared memory fits.
3. The L-layer throughput (L = 32 layers in one launch, graph replay, time / L).
4. The assignment kernel (probe.planner.assign_cuda.DeviceAssigner, with its default
   exchange step (assign.default_moves(G) moves) and without it (moves=0, the runtime's dispatch
   split); copies: the home layout plus the greedy's replicas) and the parallel greedy
   (probe.planner.parallel_cuda.CudaParallel, as is): one layer, checked against their CPU
   kernels, then timed eager and as a graph.
A step that raises is recorded with its traceback and the run goes on; a step is skipped
(recorded so) when fewer than 10 s of --time-limit are left (the first launches compile the
CUDA and CPU kernels: should that leave too little time, run `--configs ep8` and `--configs
ep64` apart). Exit status 1 when a plan differs,
a capture fails or a step raises, else 0. On the GPU the process ends with os._exit once its
files are written (no interpreter teardown with a CUDA graph alive), and a watchdog
(faulthandler) ends a run that passes --time-limit plus 5 s.

--device cpu runs the kernels in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set here
before numba.cuda is imported) on one small layer (8 ranks, 16 experts, 256 tokens per rank:
the greedy makes 9 moves there): correctness only, nothing timed.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from experiments.planner.gpu_greedy import cpu_layer, decode_batch, layer_plan, same_layer
from experiments.planner.gpu_harness import timed as _timed

CONFIGS = (("ep=8, E=128", "qwen3-235b-a22b", "h200x8", 8, 128),
           ("ep=64, E=256", "deepseek-v3", "h200x8-n8", 64, 256))
SIM_CONFIGS = (("ep=8, E=16", "deepseek-v3", "h200x8-n8", 8, 16),)
K_MAX = (0, 1, 4, 16)
THREADS = (64, 128, 256, 512, 1024)
# Layers checked one by one, and layers per launch for the throughput.
CHECK_LAYERS = 4
THROUGHPUT_LAYERS = 32
# A step starts only with at least this many seconds of --time-limit left.
STEP_MARGIN_S = 10.0
def _torch_inputs(*arrays):
    import torch

    return [torch.as_tensor(np.ascontiguousarray(a), device="cuda") for a in arrays]


def _device_inputs(sim: bool, *arrays):
    if not sim:
        return _torch_inputs(*arrays)
    from probe.planner.numba_cuda import cuda

    return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


def _host(plan):
    from experiments.planner.gpu_greedy import host_plan

    return host_plan(plan)


def memories(num_ranks: int, num_experts: int) -> list[str]:
    """The greedy's memory variants for a shape: shared (where it fits) and global."""
    from probe.planner.greedy_cuda import SHARED_LIMIT, shared_bytes

    fits = shared_bytes(num_ranks, num_experts) <= SHARED_LIMIT
    return ["shared", "global"] if fits else ["global"]


def greedy_checks(batch, memory: str, *, sim: bool, threads: int) -> list:
    """The greedy's one-layer plans in one memory variant ("auto": the default) and, on the
    GPU with "auto", the L-layer launch, against the CPU kernel. Returns check dicts."""
    from probe.planner.greedy_cuda import CudaGreedy

    load, home, slots, window, cost, rules = batch
    num_layers = load.shape[0]
    differing, moves = [], []
    for layer in range(min(CHECK_LAYERS, num_layers)):
        moves.append(int(cpu_layer(batch, layer)[3]))
        runner = CudaGreedy(home[layer], slots, cost, rules, num_layers=1, threads=threads,
                            memory=memory)
        load_d, window_d = _device_inputs(sim, load[layer:layer + 1], window[layer:layer + 1])
        if not same_layer(batch, layer, layer_plan(_host(runner.plan(load_d, window_d)), 0)):
            differing.append(layer)
    checks = [{"check": f"greedy one-layer plans ({runner.memory}) == CPU kernel",
               "ok": not differing, "differing_layers": differing, "cpu_moves": moves}]
    if not sim and memory == "auto":
        runner = CudaGreedy(home, slots, cost, rules, num_layers=num_layers, threads=threads)
        plan = _host(runner.plan(*_torch_inputs(load, window)))
        differing = [i for i in range(num_layers) if not same_layer(batch, i, layer_plan(plan, i))]
        checks.append({"check": f"greedy {num_layers}-layer launch == CPU kernel",
                       "ok": not differing, "differing_layers": differing})
    return checks


class GreedyTimer:
    """Times the greedy on layer 0 of a batch (and all L layers for the throughput) on the
    GPU; each call appends rows (skipped ones when the time limit is near)."""

    def __init__(self, config: str, batch, *, threads: int, repeats: int, budget_s: float,
                 time_left) -> None:
        self.config, self.batch, self.threads = config, batch, threads
        self.repeats, self.budget_s, self.time_left = repeats, budget_s, time_left
        load, window = batch[0], batch[3]
        self.load_t, self.window_t = _torch_inputs(load, window)
        self.one = (self.load_t[:1], self.window_t[:1])
        self.rows: list = []

    def runner(self, *, layers: int = 1, **options):
        from probe.planner.greedy_cuda import CudaGreedy

        load, home, slots, window, cost, rules = self.batch
        return CudaGreedy(home[0] if layers == 1 else home, slots, cost, rules,
                          num_layers=layers, **{"threads": self.threads, **options})

    def row(self, part: str, value, runner, *, graph: bool = True) -> None:
        mode = "graph" if graph else "eager"
        base = {"config": self.config, "planner": "greedy", "part": part, "value": value,
                "mode": mode}
        if self.time_left() < STEP_MARGIN_S:
            self.rows.append({**base, "skipped": "time limit"})
            return
        args = self.one if runner.num_layers == 1 else (self.load_t, self.window_t)
        timed = _timed(lambda: runner.plan(*args), graph=graph, repeats=self.repeats,
                       budget_s=self.budget_s)
        row = {**base, "threads": runner.threads, "memory": runner.memory,
               "layers": runner.num_layers, **timed}
        if "median_us" in timed:
            row["moves"] = int(_host(runner.out).num_moves[0])
            if runner.num_layers > 1:
                row["per_layer_us"] = timed["median_us"] / runner.num_layers
        self.rows.append(row)

    def one_layer(self) -> list:
        """The default runner, one layer: graph replay and eager."""
        runner = self.runner()
        for graph in (True, False):
            self.row("one layer", f"k_max={self.batch[5].k_max}", runner, graph=graph)
        return self.rows

    def breakdowns(self) -> list:
        """k_max (start vs per move), threads per block, memory variants, L-layer throughput."""
        for k in K_MAX:
            self.row("k_max", k, self.runner(max_moves=k))
        start = next((r.get("median_us") for r in self.rows
                      if r["part"] == "k_max" and r["value"] == 0), None)
        for r in self.rows:
            if (r["part"] == "k_max" and start is not None and r.get("median_us") is not None
                    and r.get("moves")):
                r["per_move_us"] = (r["median_us"] - start) / r["moves"]
        for t in THREADS:
            self.row("threads", t, self.runner(threads=t))
        num_ranks, num_experts = self.batch[0].shape[1:]
        for memory in memories(num_ranks, num_experts):
            self.row("memory", memory, self.runner(memory=memory))
        self.row("throughput", f"{self.batch[0].shape[0]} layers",
                 self.runner(layers=self.batch[0].shape[0]))
        return self.rows


def copies_of(batch, layer: int) -> np.ndarray:
    """The copies the greedy's CPU plan leaves on layer `layer`: home plus its replicas,
    int64 [G, E] (what the assigner then splits tokens over)."""
    home = batch[1]
    copies = home[layer].astype(np.int64)
    replicas = cpu_layer(batch, layer)[0]
    copies[replicas[:, 0], replicas[:, 1]] = 1
    return copies


def assign_check_and_rows(config: str, batch, *, sim: bool, repeats: int, budget_s: float):
    """The assigner on layer 0: (checks, rows)."""
    from experiments.planner.gpu_assign import compare
    from probe.planner.assign import default_moves
    from probe.planner.assign_cuda import DeviceAssigner

    load, cost = batch[0], batch[4]
    copies = copies_of(batch, 0)[None]
    problems, differing = compare(cost, load[:1], copies, None, passes=8,
                                  device="cpu" if sim else "cuda")
    checks = [{"check": "assigner one-layer assignment == CPU kernel", "ok": not problems,
               "differing_entries": differing, "problems": problems[:4]}]
    if sim:
        return checks, []
    load_t, copies_t = _torch_inputs(load[:1], copies)
    rows = []
    # The default exchange step (assign.default_moves(G) moves), and none (the runtime's
    # dispatch split, probe.runtime.device_plan.DISPATCH_MOVES): what the step costs on this card.
    for moves in (default_moves(cost.num_ranks), 0):
        assigner = DeviceAssigner(cost, load.shape[2], 1, moves=moves)
        rows += [{"config": config, "planner": "assign", "part": "one layer",
                  "value": f"passes=8, moves={moves}", "mode": "graph" if graph else "eager",
                  "layers": 1,
                  **_timed(lambda a=assigner: a(load_t, copies_t), graph=graph,
                           repeats=repeats, budget_s=budget_s)} for graph in (True, False)]
    return checks, rows


def parallel_check_and_rows(config: str, name_model: tuple, *, sim: bool, repeats: int,
                            budget_s: float, tokens_per_rank: int):
    """The parallel greedy on layer 0 of its own decode batch (default ParallelRules):
    (checks, rows)."""
    from experiments.planner import gpu_parallel as gp
    from probe.planner.parallel import parallel_arrays
    from probe.planner.parallel_cuda import CudaParallel

    model, hardware, ranks, experts = name_model
    batch = gp.decode_batch(model, hardware, ranks, experts, 1, tokens_per_rank=tokens_per_rank)
    load, home, slots, window, cost, rules = batch
    runner = CudaParallel(home[0], slots, cost, rules, num_layers=1, threads=32 if sim else 128)
    inputs = _device_inputs(sim, load[:1], window[:1])
    out = gp.layer_out(gp.host_plan(runner.plan(*inputs)), 0)
    ok = gp.same_layer(parallel_arrays(*gp.cpu_args(batch, 0)), out)
    checks = [{"check": "parallel greedy one-layer plan == CPU kernel", "ok": bool(ok)}]
    if sim:
        return checks, []
    rows = [{"config": config, "planner": "parallel", "part": "one layer", "value": "default",
             "mode": "graph" if graph else "eager", "layers": 1, "threads": runner.threads,
             **_timed(lambda: runner.plan(*inputs), graph=graph, repeats=repeats,
                      budget_s=budget_s)} for graph in (True, False)]
    return checks, rows


def _fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(row: dict) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "error" in row:
        return "invalid: " + row["error"].splitlines()[0][:80]
    return _fmt(row.get("median_us"))


def _markdown(report: dict) -> str:
    lines = ["# One layer's planning latency on the GPU", "", "Command:", "",
             f"    {report['command']}", "", f"Device: {report['device']}. Status: "
             f"{report['status']}. Medians in microseconds (CUDA events after warm-up; graph: "
             "a replayed CUDA graph, the kernel alone; eager: the launch from Python, its host "
             "overhead inside). Per move: (t(k_max) - t(0)) / moves made.", "",
             "| config | planner | part | value | mode | threads | memory | moves | median us "
             "| per move us | per layer us |", "|---|---|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['planner']} | {r['part']} | {r['value']} | "
                     f"{r['mode']} | {r.get('threads', '')} | {r.get('memory', '')} | "
                     f"{'' if r.get('moves') is None else r['moves']} | {_cell(r)} | "
                     f"{_fmt(r['per_move_us']) if 'per_move_us' in r else ''} | "
                     f"{_fmt(r['per_layer_us']) if 'per_layer_us' in r else ''} |")
    lines += ["", "| config | check | result | detail |", "|---|---|---|---|"]
    for config, check in _all_checks(report):
        detail = check.get("differing_layers") or check.get("problems") or ""
        lines.append(f"| {config} | {check['check']} | {'ok' if check['ok'] else 'FAILED'} | "
                     f"{detail} |")
    for err in report["errors"]:
        lines += ["", f"Step '{err['stage']}' raised `{err['error']}`"]
    if report["skipped"]:
        lines += ["", "Skipped (time limit near): " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def _all_checks(report: dict) -> list:
    return [(config, check) for config, checks in report["checks"].items() for check in checks]


def _summary(report: dict) -> str:
    """The short table printed last: one-layer latencies per planner and config."""
    lines = [f"{'one layer, us (medians)':<34}{'graph':>10}{'eager':>10}"]
    for config in report["configs"]:
        for planner in ("greedy", "parallel", "assign"):
            ones = [r for r in report["rows"] if r["config"] == config
                    and r["planner"] == planner and r["part"] == "one layer"]
            # The assigner has a row pair per exchange step (moves=...), named in its line.
            values = list(dict.fromkeys(r["value"] for r in ones)) if planner == "assign" \
                else [None]
            for value in values:
                picked = {r["mode"]: r for r in ones if value is None or r["value"] == value}
                if not picked:
                    continue
                label = config + ", " + planner
                if value is not None and "moves" in value:
                    label += ", " + value.split(", ")[-1]
                lines.append(f"{label:<34}"
                             f"{_cell(picked['graph']) if 'graph' in picked else 'n/a':>10}"
                             f"{_cell(picked['eager']) if 'eager' in picked else 'n/a':>10}")
        for r in report["rows"]:
            if r["config"] == config and r["part"] == "throughput" and "per_layer_us" in r:
                lines.append(f"{config + ', greedy per layer of ' + str(r['layers']):<34}"
                             f"{_fmt(r['per_layer_us']):>10}")
    checks = _all_checks(report)
    failed = [f"{config}: {check['check']}" for config, check in checks if not check["ok"]]
    lines.append(f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed"
                 + "".join(f"\n  FAILED {name}" for name in failed))
    lines += [f"  ERROR in '{err['stage']}': {err['error']}" for err in report["errors"]]
    lines.append(f"status: {report['status']}, {report['elapsed_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the steps; returns the exit status (0: every plan equal, no step raised)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the GPU; cpu: Numba's CUDA simulator (correctness only)")
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats")
    parser.add_argument("--out", default="results/gpu_latency", help="output folder")
    parser.add_argument("--configs", default="all", choices=("all", "ep8", "ep64"),
                        help="the GPU configurations to run (all: ep=8 / E=128 and ep=64 / "
                             "E=256; one of them, should a run of both not fit the time limit)")
    parser.add_argument("--time-limit", type=float, default=110.0,
                        help="seconds: no step starts with less than 10 s left; on the GPU a "
                             "watchdog ends the process 5 s after it (default 110)")
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.device == "cpu":  # must precede the first import of numba.cuda
        import numba

        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        numba.config.ENABLE_CUDASIM = 1
    from experiments.manifest import Manifest
    from probe.planner import greedy_cuda
    from probe.planner.numba_cuda import SIMULATOR

    sim = args.device == "cpu"
    if sim and not SIMULATOR:
        raise SystemExit("--device cpu needs NUMBA_ENABLE_CUDASIM=1 before numba.cuda is "
                         "imported (run this module as a fresh process)")
    began = time.perf_counter()
    if not sim:  # a hang still ends the process
        faulthandler.dump_traceback_later(args.time_limit + 5.0, exit=True)
    run = Manifest.start("experiments.planner.gpu_latency", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_latency.json", out / "gpu_latency.md"
    command = f"python3 -m experiments.planner.gpu_latency --device {args.device}" + (
        " --quick" if args.quick else "") + (
        f" --configs {args.configs}" if args.configs != "all" else "")
    configs = SIM_CONFIGS if sim else tuple(
        c for c in CONFIGS if args.configs == "all" or c[0].startswith(f"ep={args.configs[2:]},"))
    report = {"device": "Numba CUDA simulator" if sim else _gpu_name(), "command": command,
              "status": "starting", "time_limit_s": args.time_limit, "elapsed_s": 0.0,
              "configs": [c[0] for c in configs], "rows": [], "checks": {}, "errors": [],
              "skipped": [],
              "stage_seconds": {}, "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def time_left() -> float:
        return args.time_limit - (time.perf_counter() - began)

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - began, 1)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(_markdown(report))
        run.write(out, [json_path, md_path], name="gpu_latency.manifest.json")

    @contextlib.contextmanager
    def stage(name: str):
        """A step: recorded in the report; an exception is recorded, not raised."""
        report["status"] = f"running: {name}"
        write()
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            report["errors"].append({"stage": name, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            print(f"{name}: raised {type(exc).__name__}: {exc}", flush=True)
        finally:
            report["stage_seconds"][name] = round(time.perf_counter() - start, 2)

    def skipped(name: str) -> bool:
        if time_left() >= STEP_MARGIN_S:
            return False
        report["skipped"].append(name)
        return True

    layers = 1 if sim else (4 if args.quick else THROUGHPUT_LAYERS)
    repeats = 3 if sim else (20 if args.quick else 100)
    budget_s = 0.5 if args.quick else 1.0
    threads = 32 if sim else greedy_cuda.THREADS
    tokens = 256 if sim else 768
    batches, timers = {}, {}
    # 1. Per config: the greedy's plans (default memory) and its one-layer latency.
    for name, model, hardware, ranks, experts in configs:
        checks = report["checks"].setdefault(name, [])
        if skipped(f"{name}: greedy plans and one-layer latency"):
            continue
        with stage(f"{name}: greedy plans vs the CPU kernel, one-layer latency"):
            batch = decode_batch(model, hardware, ranks, experts, layers,
                                 tokens_per_rank=tokens)
            checks += greedy_checks(batch, "auto", sim=sim, threads=threads)
            batches[name] = batch
            if not sim:
                timers[name] = GreedyTimer(name, batch, threads=threads, repeats=repeats,
                                           budget_s=budget_s, time_left=time_left)
                report["rows"] += list(timers[name].one_layer())
        write()
    # 2. Per config: the assigner and the parallel greedy, one layer.
    for name, model, hardware, ranks, experts in configs:
        checks = report["checks"].setdefault(name, [])
        if name in batches and not skipped(f"{name}: assigner"):
            with stage(f"{name}: assigner, one layer"):
                more, rows = assign_check_and_rows(name, batches[name], sim=sim,
                                                   repeats=repeats, budget_s=budget_s)
                checks += more
                report["rows"] += rows
        if not skipped(f"{name}: parallel greedy"):
            with stage(f"{name}: parallel greedy, one layer"):
                more, rows = parallel_check_and_rows(name, (model, hardware, ranks, experts),
                                                     sim=sim, repeats=repeats,
                                                     budget_s=budget_s, tokens_per_rank=tokens)
                checks += more
                report["rows"] += rows
        write()
    if not sim:
        print(_summary(report), flush=True)  # the one-layer table, in case the rest is cut
    # 3. Per config: the greedy's other memory variant (plans, then time) and the breakdowns.
    for name, _, _, ranks, experts in configs:
        if name not in batches:
            continue
        checks = report["checks"][name]
        for memory in memories(ranks, experts)[1:]:  # the first is "auto"'s, checked in 1.
            if not skipped(f"{name}: greedy plans ({memory})"):
                with stage(f"{name}: greedy plans ({memory}) vs the CPU kernel"):
                    checks += greedy_checks(batches[name], memory, sim=sim, threads=threads)
        if name in timers and not skipped(f"{name}: greedy breakdowns"):
            with stage(f"{name}: greedy breakdowns"):
                before = len(timers[name].rows)
                report["rows"] += timers[name].breakdowns()[before:]
        write()
    report["status"] = "finished"
    write()
    faulthandler.cancel_dump_traceback_later()
    print(_markdown(report))
    print(_summary(report), flush=True)
    failed = [c for _, c in _all_checks(report) if not c["ok"]]
    return 1 if failed or report["errors"] else 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    # The exit skips the interpreter's teardown: a CUDA graph, numba's and torch's finalizers
    # are never run against each other; the files are written by then.
    try:
        status = main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        status = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
