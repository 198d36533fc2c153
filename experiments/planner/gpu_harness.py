"""What the GPU planner experiments (gpu_greedy, gpu_parallel) share.

Inputs: random small launches (`random_layers`, `random_window`) and synthetic decode layers
(`decode_layers`); the CPU kernel's per-layer arguments (`layer_arrays`) and its median time
(`cpu_us`). GPU: CUDA-event timing (`event_us`) and a launch captured in a CUDA graph on a side
stream (`capture`). The run: the command line (`parse_args`, which switches on Numba's CUDA
simulator for --device cpu before numba.cuda is imported), the report written after every step
with its markdown and manifest (`Report`, `Report.stage`), the checks of a report
(`all_checks`), the end of the printed summary (`summary_tail`), and the process exit that
skips the interpreter's teardown (`exit_after`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from probe.planner.cost import CostModel

# Replica slots per rank of the decode layers.
SLOTS = 3
# CUDA graphs and everything they point at, kept alive until os._exit: never torn down.
ALIVE: list = []


def random_layers(rng: np.random.Generator, num_layers: int, num_ranks: int,
                  num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(load int64 [L, S, E], home bool [L, G, E]) of random layers: one home rank per expert
    (sometimes extra home copies), Zipf-skewed loads of 0-200 tokens per rank."""
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
    return load, home


def random_window(rng: np.random.Generator, num_layers: int, num_ranks: int) -> np.ndarray:
    """Windows [L, G]: zero, random in [0, 3) or infinite (one kind per launch)."""
    kind = rng.choice(3, p=[0.1, 0.45, 0.45])
    return [np.zeros, lambda s: rng.random(s) * 3, lambda s: np.full(s, np.inf)][kind](
        (num_layers, num_ranks))


def decode_layers(model: str, hardware: str, ranks: int, experts: int, layers: int,
                  tokens_per_rank: int = 768) -> tuple:
    """Synthetic decode layers (probe.traces.generate("decode"), top-8, SLOTS slots per rank,
    window "auto"): (load int64 [L, S, E], home bool [L, G, E], slots int64 [G], window float64
    [L, G], cost)."""
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
            np.stack([p.window for p in problems]).astype(np.float64), cost)


def layer_arrays(batch, layer: int) -> tuple:
    """The CPU kernels' leading arguments for one layer of a batch (load, home, slots, window,
    alpha, beta, token_time, transfer_time): every array a fresh writable C copy, so that
    numba compiles the CPU kernel once (a read-only array is another signature)."""
    load, home, slots, window, cost = batch[:5]

    def own(a, dtype):
        return np.array(a, dtype=dtype, order="C")

    return (own(load[layer], np.int64), own(home[layer], np.bool_), own(slots, np.int64),
            own(window[layer], np.float64), float(cost.alpha), float(cost.beta),
            own(cost.token_time, np.float64), own(cost.transfer_time, np.float64))


def cpu_us(kernel, args: list, repeats: int, budget_s: float) -> float:
    """Median microseconds of kernel(*a) over the layers' arguments `args`, `repeats` rounds or
    until budget_s seconds have passed."""
    samples = []
    stop = time.perf_counter() + budget_s
    for _ in range(repeats):
        for a in args:
            start = time.perf_counter()
            kernel(*a)
            samples.append(time.perf_counter() - start)
        if time.perf_counter() > stop:
            break
    return float(np.median(samples) * 1e6)


def event_us(fn, repeats: int, budget_s: float, *, warm_up: bool = False) -> list:
    """Microseconds of fn() between two CUDA events (after one untimed call when warm_up), up
    to `repeats` samples (at least 3) or budget_s seconds."""
    import torch

    if warm_up:
        fn()
    samples = []
    stop = time.perf_counter() + budget_s
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
        if len(samples) >= 3 and time.perf_counter() > stop:
            break
    return samples


def timed(fn, *, graph: bool, repeats: int, budget_s: float) -> dict:
    """{median_us, samples} of fn eager or as a replayed CUDA graph (captured here and kept in
    ALIVE), after 3 warm-up calls; {error} when the launch or the capture fails (e.g. more
    threads per block than the kernel's registers allow)."""
    import torch

    try:
        run = fn
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            ALIVE.append((cuda_graph, fn))
            capture(cuda_graph, fn)
            run = cuda_graph.replay
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        samples = event_us(run, repeats, budget_s)
    except Exception as exc:  # recorded: the caller decides
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"median_us": float(np.median(samples)), "samples": len(samples)}


def capture(graph, launch) -> None:
    """Capture launch() into the torch.cuda.CUDAGraph `graph` on a side stream, after one
    warm-up launch there (probe.planner.numba_cuda.capture_graph); raises what the capture
    raises."""
    from probe.planner.numba_cuda import capture_graph

    capture_graph(graph, launch)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def parse_args(doc: str, name: str, argv: list[str] | None, time_limit_help: str,
               extra=None):
    """The scripts' command line (--device, --quick, --out results/<name>, --time-limit, and
    what extra(parser) adds).
    --device cpu switches on Numba's CUDA simulator here, before numba.cuda is imported, and
    stops (SystemExit) when numba.cuda was imported without it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the GPU; cpu: Numba's CUDA simulator (correctness only)")
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats")
    parser.add_argument("--out", default=f"results/{name}", help="output folder")
    parser.add_argument("--time-limit", type=float, default=105.0, help=time_limit_help)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.device == "cpu":  # must precede the first import of numba.cuda
        import numba

        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        numba.config.ENABLE_CUDASIM = 1
    from probe.planner.numba_cuda import SIMULATOR

    if args.device == "cpu" and not SIMULATOR:
        raise SystemExit("--device cpu needs NUMBA_ENABLE_CUDASIM=1 before numba.cuda is "
                         "imported (run this module as a fresh process)")
    return args


def all_checks(report: dict) -> list:
    """(config, check) for every comparison of the run, the random instances' included."""
    out = [(row["config"], check) for row in report["rows"] for check in row["checks"]]
    if report["random"] is not None:
        out.append(("random", {"check": "random instances == CPU kernel",
                               "ok": report["random"]["ok"],
                               "differing_layers": report["random"]["differing_layers"]}))
    return out


def markdown_tail(report: dict) -> list[str]:
    """The markdown's last lines: failed graph captures and steps that raised."""
    lines = []
    for r in report["rows"]:
        if r.get("graph_error"):
            lines += ["", f"Graph capture failed ({r['config']}): `{r['graph_error']}`"]
    for err in report["errors"]:
        lines += ["", f"Step '{err['stage']}' raised `{err['error']}`"]
    return lines


def summary_tail(report: dict) -> list[str]:
    """The summary's last lines: checks passed and failed, errors, status."""
    checks = all_checks(report)
    failed = [f"{config}: {check['check']}" for config, check in checks if not check["ok"]]
    lines = [f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed"
             + "".join(f"\n  FAILED {name}" for name in failed)]
    lines += [f"  ERROR in '{err['stage']}': {err['error']}" for err in report["errors"]]
    lines.append(f"status: {report['status']}, {report['elapsed_s']} s")
    return lines


class Report:
    """A run's report, rewritten (json, markdown, manifest) after each step so that a run cut
    short keeps what it finished. name: the script's (experiments.planner.<name>, files
    <name>.json / .md / .manifest.json in args.out); fields: the report's keys after "device",
    "command", "status", "time_limit_s" and "elapsed_s" (the others it needs: "rows",
    "checks_failed", "errors", "stage_seconds", "utc", set here; "random" from fields);
    markdown(report) -> str; goal(row) -> the per-layer microseconds a row must meet (its
    "met": the best of L per launch and graph replay at most that). On the GPU a watchdog
    (faulthandler) prints every thread's stack and ends the process 5 s past args.time_limit."""

    def __init__(self, name: str, args, argv, fields: dict, markdown, goal) -> None:
        import faulthandler

        from experiments.manifest import Manifest

        sim = args.device == "cpu"
        self.began = time.perf_counter()
        if not sim:  # a hang (a kernel that never ends, a stuck teardown) still ends the process
            faulthandler.dump_traceback_later(args.time_limit + 5.0, exit=True)
        self.run = Manifest.start(f"experiments.planner.{name}", argv)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.name, self.markdown, self.goal = name, markdown, goal
        command = f"python -m experiments.planner.{name} --device {args.device}" + (
            " --quick" if args.quick else "")
        self.data = {"device": "Numba CUDA simulator" if sim else gpu_name(),
                     "command": command, "status": "starting", "time_limit_s": args.time_limit,
                     "elapsed_s": 0.0, **fields, "rows": [], "checks_failed": [], "errors": [],
                     "stage_seconds": {},
                     "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def write(self) -> None:
        report = self.data
        report["elapsed_s"] = round(time.perf_counter() - self.began, 1)
        for row in report["rows"]:
            best = min(row.get("all_per_launch_us", np.inf), row.get("graph_replay_us", np.inf))
            if np.isfinite(best):
                row["met"] = bool(best <= self.goal(row))
        report["checks_failed"] = [f"{config}: {check['check']}"
                                   for config, check in all_checks(report) if not check["ok"]]
        json_path = self.out / f"{self.name}.json"
        md_path = self.out / f"{self.name}.md"
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(self.markdown(report))
        self.run.write(self.out, [json_path, md_path], name=f"{self.name}.manifest.json")

    @contextlib.contextmanager
    def stage(self, name: str):
        """A step: recorded in the report; an exception is recorded, not raised."""
        report = self.data
        report["status"] = f"running: {name}"
        self.write()
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

    def finish(self, summary) -> int:
        """Status "finished", the files, the markdown and summary(report) printed; returns the
        exit status: 1 when a check failed, a step raised or a CUDA graph capture failed."""
        import faulthandler

        report = self.data
        report["status"] = "finished"
        self.write()
        faulthandler.cancel_dump_traceback_later()
        print(self.markdown(report))
        print(summary(report), flush=True)
        failed_capture = any(row.get("graph") == "capture failed" for row in report["rows"])
        return 1 if report["checks_failed"] or report["errors"] or failed_capture else 0


def exit_after(main) -> None:
    """Run main() and end the process with its status through os._exit: no interpreter
    teardown, so a CUDA graph, numba's and torch's finalizers are never run against each other
    (a run hung there once); the files are written by then. 2 when main raised."""
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
