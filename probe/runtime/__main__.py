"""torchrun entry point: serve synthetic or given prompts expert-parallel on N ranks.

    torchrun --nproc-per-node N -m probe.runtime --model DIR [options]      # NCCL on GPUs
    torchrun --nproc-per-node 2 -m probe.runtime --model DIR --device cpu   # gloo on CPU
    python -m probe.runtime --random-config gpt-oss-like --layers 4         # one process

Each rank loads only its home experts (static sharded placement) and serves its own requests
(attention is data parallel). Rank 0 prints a progress line to stderr every --progress-every
steps (--quiet: none), then a summary table, and writes `--out` (JSON). A bad request (empty
prompt, ids outside the vocabulary, prompt + max new tokens beyond the model's positions) is
rejected alone with a message; the summary lists it with the reason.

On one CUDA rank decode runs through a static KV cache and replays CUDA graphs captured per
batch-size bucket (--cuda-graphs, the default there; the MoE layers then run locally, without
the EPRunner); prefill stays eager.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["DeviceUnavailable", "build_parser", "check_device", "gpt_oss_like_config", "main",
           "run"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used by this torch (the CLI exits with code 2)."""


def check_device(device: str) -> None:
    """Raise `DeviceUnavailable` with one clear line if `device` ("cuda", "cuda:N", "cpu",
    "auto") cannot be used here; before any torch call that would fail deep inside torch."""
    if not str(device).startswith("cuda"):
        return
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise DeviceUnavailable(f"--device {device}: this torch build ({torch.__version__}) has "
                                "no CUDA support; use --device cpu or install a CUDA build")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {device}: torch has CUDA but no GPU is visible "
                                "(check CUDA_VISIBLE_DEVICES and the driver)")


def gpt_oss_like_config(num_layers: int = 4, *, vocab_size: int = 201088):
    """MoEConfig with GPT-OSS-120B's layer sizes (hidden 2880, 128 experts, top-4, expert FFN
    2880, 64 query / 8 kv heads of 64, attention sinks, alternating 128-token sliding window)."""
    from probe.runtime.config import MoEConfig, RopeConfig

    return MoEConfig(
        model_type="gpt_oss", vocab_size=vocab_size, hidden_size=2880, num_layers=num_layers,
        num_heads=64, num_kv_heads=8, head_dim=64, num_experts=128, top_k=4,
        moe_intermediate_size=2880, rope=RopeConfig(theta=150000.0),
        moe_layers=tuple(range(num_layers)), router_scoring="topk_softmax", router_bias=True,
        expert_act="clamped_swiglu", expert_bias=True, attention_bias=True,
        attention_sinks=True, sliding_window=128,
        sliding_layers=tuple(range(0, num_layers, 2)), rms_norm_eps=1e-5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m probe.runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face checkpoint directory")
    src.add_argument("--random-config", help="'gpt-oss-like' or a config.json path: random "
                                             "weights with that architecture")
    p.add_argument("--layers", type=int, default=4, help="layers of a gpt-oss-like model")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--keep-format", action="store_true",
                   help="keep --model's MXFP4 / block-scaled FP8 experts in that format (in "
                        "memory, in replica slots and in transfers) instead of dequantizing "
                        "them to --dtype on load")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--prompts", help="JSON lines file: {\"ids\": [...]} per request")
    p.add_argument("--requests", type=int, default=8, help="synthetic requests per rank")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stagger", type=int, default=1, help="steps between request arrivals")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                   help="balancing per --policy; --no-balance: static EP whatever --policy")
    p.add_argument("--policy", choices=["static", "eplb", "eplb-lp", "probe", "probe-on-eplb"],
                   default="probe",
                   help="static EP | DeepSeek EPLB layout, even split | EPLB + LP split on the "
                        "true counts | PROBE (per-step replicas on the sharded home) | "
                        "PROBE-on-EPLB (EPLB layout + per-step replicas, water-filling on the "
                        "true counts); docs/runtime.md 'Policies'")
    p.add_argument("--slots", type=int, default=3, help="replica slots per rank per buffer "
                                                        "(the extra slots k when --extra-slots "
                                                        "is not given)")
    p.add_argument("--extra-slots", type=int, default=None, metavar="K",
                   help="extra expert slots per rank, the same for every policy: EPLB keeps K "
                        "redundant experts resident, PROBE K per-step slots, PROBE-on-EPLB "
                        "splits them (--resident-slots); default --slots")
    p.add_argument("--resident-slots", type=int, default=None, metavar="B",
                   help="probe-on-eplb: resident EPLB slots of the K (default K - max(1, K // 2))")
    p.add_argument("--replan-interval", type=int, default=50,
                   help="steps between EPLB re-plans (the weight moves run at a step boundary)")
    p.add_argument("--replan-window", type=int, default=50,
                   help="steps of observed load an EPLB re-plan averages")
    p.add_argument("--predictor", default="history",
                   help="history | router | path of a saved PredictorSet")
    p.add_argument("--method", default="greedy",
                   help="planner method (probe.planner.solve); with --plan-on device: greedy "
                        "or lite (the lite planner's GPU kernel, faster a layer)")
    p.add_argument("--hardware", default="h200x8", help="HardwareSpec preset for the planner")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per collective")
    p.add_argument("--profile", help="write a torch.profiler table of one prefill and one "
                                     "decode step to this file (rank 0)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="serve this many throw-away requests first (JIT, allocator)")
    p.add_argument("--dispatch", choices=["exact", "fixed"], default="exact",
                   help="EP dispatch/combine: exact (all-to-all sizes read back to the host; "
                        "the default) | fixed (C rows per peer, equal static all-to-all "
                        "sizes; no host sync inside an MoE layer under --policy static, "
                        "probe with the history predictor, or probe with --plan-on device; an "
                        "overflow ends the run "
                        "with the capacity it needed); docs/runtime.md 'Fixed-capacity "
                        "dispatch'")
    p.add_argument("--capacity-factor", type=float, default=2.0,
                   help="--dispatch fixed: C = ceil(factor x T_max x K / G) rows per peer, "
                        "T_max the group's largest token count of the step")
    p.add_argument("--capacity", type=int, default=None, metavar="C",
                   help="--dispatch fixed: C rows per peer, fixed (overrides "
                        "--capacity-factor; no per-step agreement on T_max)")
    p.add_argument("--plan-on", choices=["host", "device"], default="host",
                   help="--policy probe: where each next MoE layer is predicted and planned: "
                        "host (the host planner; default) | device (predicted loads stay "
                        "tensors, the --method planner runs on the GPU on a side stream, or "
                        "its CPU twin on CPU, and each layer's TRUE counts are split over the "
                        "copies present "
                        "by the assignment kernel; with --dispatch fixed no host read per MoE "
                        "layer for either predictor); docs/runtime.md 'Planning on the device'")
    p.add_argument("--device-split", choices=["plan", "waterfill"], default="plan",
                   help="--plan-on device: each layer's dispatch-time split: plan (the plan's "
                        "own split, made with the plan on the side stream and scaled to the "
                        "true counts, as the host path runs PROBE's plans: nothing solved at "
                        "dispatch; default) | waterfill (the TRUE counts over the copies "
                        "present, solved between the router and the dispatch)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through the static KV cache and per-batch-size CUDA graphs "
                        "(one rank: on by default for CUDA, off on CPU, where it runs the same "
                        "no-sync step eagerly). With more ranks off by default; --cuda-graphs "
                        "with --dispatch fixed captures the decode step with its MoE layers "
                        "dispatched expert-parallel by NCCL inside the graph (static EP: no "
                        "replicas in decode steps; prefill stays eager and balanced; on CPU the "
                        "same step runs eagerly)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per request in the static KV cache of --cuda-graphs "
                        "(default: min(max_position_embeddings, 2048))")
    p.add_argument("--out", help="JSON summary (rank 0)")
    p.add_argument("--step-log", metavar="PATH",
                   help="rank 0 writes the per-step log here (.npz: every rank's true routing "
                        "counts and per-layer phase seconds, IR, replicas; "
                        "probe/runtime/steplog.py), what `python -m "
                        "experiments.runtime.sim_error` replays through the simulator")
    p.add_argument("--progress-every", type=int, default=10, metavar="N",
                   help="rank 0 prints steps done, tokens/s and IR to stderr every N steps")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--metrics-file", metavar="PATH",
                   help="rank 0 writes the balancing metrics in Prometheus text format here "
                        "(refreshed with every progress line, and at the end)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="rank 0 serves the same text at http://127.0.0.1:PORT/metrics while "
                        "it runs")
    return p


def _load(args, ctx, device, dtype):
    from probe.placement import sharded_home
    from probe.runtime.engine import random_model

    if args.model:
        from probe.runtime.checkpoint import load_config, load_model

        cfg = load_config(args.model)
        ids = np.flatnonzero(sharded_home(cfg.num_experts, ctx.world_size)[ctx.rank]).tolist()
        return load_model(args.model, dtype=dtype, device=device, expert_ids=ids,
                          keep_format=args.keep_format)
    if args.random_config == "gpt-oss-like":
        cfg = gpt_oss_like_config(args.layers)
    else:
        from probe.runtime.families import config_from_hf

        cfg = config_from_hf(json.loads(Path(args.random_config).read_text()))
    ids = np.flatnonzero(sharded_home(cfg.num_experts, ctx.world_size)[ctx.rank]).tolist()
    return random_model(cfg, seed=args.seed, dtype=dtype, device=device, expert_ids=ids)


def _prompt_request(args, text: str, i: int, j: int, tag: str):
    """The request of line i of --prompts (arriving j-th on its rank), or the reason it is
    refused: (Request, None) or (None, reason)."""
    from probe.runtime.engine import Request

    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"line {i + 1} is not valid JSON ({exc.msg})"
    ids = d.get("ids") if isinstance(d, dict) else None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        return None, f'line {i + 1}: "ids" must be a list of integer token ids'
    max_new = d.get("max_new_tokens", args.max_new_tokens)
    if not isinstance(max_new, int) or isinstance(max_new, bool):
        return None, f'line {i + 1}: "max_new_tokens" must be an integer'
    try:
        return Request(f"{tag}{i}", ids, max_new_tokens=max_new, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed + i,
                       arrival_step=j * args.stagger), None
    except ValueError as exc:
        return None, str(exc).removeprefix(f"request {tag}{i}: ")


def _requests(args, rank: int, world: int, vocab: int, *, tag: str = "r",
              rejected: dict | None = None) -> list:
    """This rank's requests: --prompts lines i with i % world == rank, or synthetic ones.
    Lines that make no valid request go to `rejected` (request id -> reason)."""
    from probe.runtime.engine import Request

    if args.prompts:
        lines = [x for x in Path(args.prompts).read_text().splitlines() if x.strip()]
        mine = [(i, x) for i, x in enumerate(lines) if i % world == rank]
        out = []
        for j, (i, text) in enumerate(mine):
            req, reason = _prompt_request(args, text, i, j, tag)
            if req is not None:
                out.append(req)
            elif rejected is not None:
                rejected[f"{tag}{i}"] = reason
        return out
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    out = []
    for j in range(args.requests):
        n = max(1, int(args.prompt_len * (0.5 + torch.rand(1, generator=g).item())))
        prompt = torch.randint(0, min(vocab, 256), (n,), generator=g).tolist()
        out.append(Request(f"{tag}{rank}-{j}", prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k,
                           seed=args.seed + 7919 * rank + j, arrival_step=j * args.stagger))
    return out


def _profile(engine, args, ctx, vocab: int) -> str:
    """torch.profiler table of one prefill step and a few decode steps."""
    from torch.profiler import ProfilerActivity, profile

    from probe.runtime.engine import Request

    acts = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    g = torch.Generator().manual_seed(99 + ctx.rank)
    reqs = [Request(f"prof{ctx.rank}-{i}", torch.randint(0, min(vocab, 256), (args.prompt_len,),
                                                         generator=g).tolist(),
                    max_new_tokens=4, arrival_step=engine.step_index)
            for i in range(max(1, args.requests))]
    with profile(activities=acts, record_shapes=False) as prof:
        engine.serve(reqs)
    averages = prof.key_averages()
    if engine.device.type != "cuda":
        return averages.table(sort_by="self_cpu_time_total", row_limit=30)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=30)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(sort_by="self_cpu_time_total", row_limit=30)


def run(args) -> dict | None:
    """Serve per `args` on this process's rank. Returns the summary on rank 0."""
    from probe.runtime.dispatch import CapacityOverflow, DispatchOptions
    from probe.runtime.dist import DistContext, init_distributed, shutdown
    from probe.runtime.engine import Engine
    from probe.runtime.pipeline import EPRunner, PipelineOptions

    check_device(args.device)
    dispatch = DispatchOptions(args.dispatch, args.capacity_factor, args.capacity)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    # --cuda-graphs: the static no-sync decode step, replayed from CUDA graphs on CUDA (on the
    # CPU the same step runs eagerly; there are no graphs to capture).
    graphs = use_cuda if args.cuda_graphs is None else args.cuda_graphs
    import os

    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) >= 1 \
            and "MASTER_ADDR" in os.environ:
        ctx = init_distributed(backend="nccl" if use_cuda else "gloo", timeout_s=args.timeout)
    else:  # plain `python -m probe.runtime`: one process, no process group
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        ctx = DistContext(0, 1, None, None, device)
    device = ctx.device
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if use_cuda else torch.float32)
    t0 = time.perf_counter()
    model = _load(args, ctx, device, dtype)
    load_s = time.perf_counter() - t0
    expert_format = model.expert_format  # "mxfp4" / "fp8_block" with --keep-format, else None
    predictor = args.predictor
    if predictor == "router":  # the frozen router prior; history if there is nothing to predict
        from probe.predictor import router_prior

        predictor = router_prior(model)
        if predictor is None:
            predictor = "history"
    elif predictor != "history":
        from probe.predictor import PredictorSet

        predictor = PredictorSet.load(predictor).to(device)
    if ctx.world_size > 1 and args.cuda_graphs is None:
        graphs = False  # at ep > 1 the captured step is static EP: opt in with --cuda-graphs
    if graphs and ctx.world_size > 1 and not dispatch.fixed:
        if ctx.rank == 0:
            sys.stderr.write("probe.runtime: --cuda-graphs at ep > 1 needs --dispatch fixed; "
                             "decoding eagerly expert-parallel\n")
        graphs = False
    # One rank with graphs: the MoE layers run locally inside the captured step (no EPRunner).
    # More ranks with graphs (--dispatch fixed): the decode step runs the runner's layers with
    # fixed-capacity dispatch, captured per batch bucket with NCCL (EPDecodeRunner).
    ep_graphs = graphs and ctx.world_size > 1
    from probe.runtime.policies import policy_slots

    extra = args.slots if args.extra_slots is None else args.extra_slots
    slots = policy_slots(args.policy if args.balance else "static", extra, args.resident_slots
                         if args.balance and args.policy == "probe-on-eplb" else None)
    runner = None if graphs and not ep_graphs else EPRunner(model, ctx, PipelineOptions(
        balance=args.balance and ctx.world_size > 1, num_slots=slots.per_step,
        predictor=predictor, method=args.method, hardware=args.hardware, policy=slots.policy,
        resident_slots=slots.resident, replan_interval=args.replan_interval,
        replan_window=args.replan_window, record_steps=bool(args.step_log),
        dispatch=dispatch, plan_on=args.plan_on, device_split=args.device_split))
    if args.step_log and runner is None:
        raise SystemExit("probe.runtime: --step-log needs the expert-parallel runner "
                         "(more than one rank, or --no-cuda-graphs)")
    engine_options = dict(max_batch_tokens=args.max_batch_tokens,
                          prefill_chunk=args.prefill_chunk, static_decode=graphs,
                          cuda_graphs=graphs and use_cuda, max_seq_len=args.max_seq_len)
    engine = Engine(model, runner, ctx, **engine_options)
    vocab = model.cfg.vocab_size
    if args.warmup_steps:
        warm = _requests(args, ctx.rank, ctx.world_size, vocab, tag="warm")[:1]
        for r in warm:
            r.max_new_tokens = max(1, args.warmup_steps)
            r.prompt = r.prompt[:64]
        engine.serve(warm)
        engine = Engine(model, runner, ctx, **engine_options)
    reqs = _requests(args, ctx.rank, ctx.world_size, vocab, rejected=engine.rejected)
    show = ctx.rank == 0 and not args.quiet and args.progress_every > 0
    exporter = _MetricsExport(engine, args) if ctx.rank == 0 else None
    progress = _Progress(engine, args.progress_every, show=show, exporter=exporter)
    step_offset = runner.step if runner is not None else 0  # runner steps of the warm-up
    t1 = time.perf_counter()
    try:
        results = engine.serve(reqs, reject_invalid=True, on_step=progress)
    except CapacityOverflow:  # every rank raises it at the same step: leave the groups cleanly
        if runner is not None:
            runner.close()
        if ctx.group is not None:
            shutdown(ctx)
        raise
    finally:
        if exporter is not None:
            exporter.close()
    serve_s = time.perf_counter() - t1
    for rid, reason in engine.rejected.items():
        sys.stderr.write(f"probe.runtime: rank {ctx.rank}: request {rid} rejected: {reason}\n")
    from probe.runtime.metrics import run_metrics

    summary = engine.summary()
    summary["metrics"] = run_metrics(engine.records)
    summary.update({"rank": ctx.rank, "load_s": load_s, "serve_s": serve_s,
                    "planner_warmup_s": runner.planner_warmup_s if runner else 0.0,
                    "cuda_graphs": graphs,
                    "dispatch": {"mode": dispatch.mode,
                                 "capacity_factor": dispatch.capacity_factor,
                                 "capacity": runner.capacity if runner else None,
                                 "no_sync_layers": runner.no_sync_layers if runner else False,
                                 "plan_on": ("device" if runner and runner.device_plans
                                             else "host"),
                                 "device_split": (args.device_split if runner
                                                  and runner.device_plans else None)},
                    "generated_tokens": sum(len(r.tokens) for r in results.values()),
                    "tokens": {rid: r.tokens for rid, r in results.items()}})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    summary["layer_breakdown_last_step_s"] = runner.breakdown() if runner else {}
    prefill_recs = [r for r in engine.records if r.prefill_tokens > 0]
    summary["first_prefill_step_s"] = prefill_recs[0].seconds if prefill_recs else None
    if args.profile:
        table = _profile(engine, args, ctx, vocab)
        if ctx.rank == 0:
            Path(args.profile).write_text(table)
    summaries = [summary]
    if ctx.group is not None and ctx.world_size > 1:
        import torch.distributed as dist

        summaries = [None] * ctx.world_size
        dist.all_gather_object(summaries, summary, group=ctx.group)
    out = None
    if ctx.rank == 0:
        first = summaries[0]
        out = {"world_size": ctx.world_size, "device": str(device), "dtype": str(dtype),
               "model": args.model or args.random_config, "expert_format": expert_format,
               "balance": args.balance,
               "policy": runner.policy if runner else "static",
               "extra_slots": extra,
               "resident_slots": runner.resident.resident if runner and runner.resident else 0,
               "per_step_slots": (runner.opts.num_slots
                                  if runner and runner.plans_replicas else 0),
               "resident_bytes_per_rank": (runner.resident.bytes
                                           if runner and runner.resident else 0),
               "config": {k: v for k, v in vars(model.cfg).items() if k != "extra"},
               # group-wide: prefetched bytes counted once (replicas that arrived in time,
               # summed over ranks), replicas, planner time (max over ranks per step)
               "bytes_prefetched_total": float(sum(s["bytes_prefetched"] for s in summaries)),
               "replicas_planned": first["replicas_planned"],
               "replicas_arrived": first["replicas_arrived"],
               "replicas_late": first["replicas_late"],
               "plan_s_total": first["plan_s_total"],
               # per layer and step (IR, replicas, exposed transfer, predictor and planner
               # time are group-wide; tokens/s are rank 0's; each rank's under "ranks")
               "metrics": first["metrics"],
               "group_tokens_per_s": (sum(s["generated_tokens"] for s in summaries)
                                      / max(serve_s, 1e-12)),
               "planner_warmup_s": max(s["planner_warmup_s"] for s in summaries),
               "rejected": sorted((r for s in summaries for r in s["rejected"]),
                                  key=lambda r: r["rid"]),
               "ranks": summaries,
               "sample": {rid: r.tokens[:16] for rid, r in list(results.items())[:2]},
               # the command line's options (which requests, seed, policy: the trace it ran)
               "args": vars(args)}
        if args.step_log:
            from probe.runtime.steplog import write_step_log

            write_step_log(args.step_log, engine.records)
            # the log's path, relative to the summary's folder where it lies inside it
            out["step_log"] = _relative_to(args.step_log, args.out)
            out["step_offset"] = step_offset  # the runner's step count at the log's step 0
        _print_table(out)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    if runner is not None:
        runner.close()
    if ctx.group is not None:
        shutdown(ctx)
    return out


def _relative_to(path: str, summary: str | None) -> str:
    """`path` relative to the folder of `summary` when it lies inside it, else as given."""
    if summary is None:
        return str(path)
    try:
        return Path(path).resolve().relative_to(Path(summary).resolve().parent).as_posix()
    except ValueError:
        return str(path)


class _MetricsExport:
    """Rank 0's Prometheus text: --metrics-file (rewritten on `refresh`) and --metrics-port."""

    def __init__(self, engine, args) -> None:
        self.engine, self.path, self.server = engine, args.metrics_file, None
        if args.metrics_port is not None:
            from probe.runtime.metrics import serve_metrics

            self.server = serve_metrics(args.metrics_port, self.text)

    def text(self) -> str:
        from probe.runtime.metrics import prometheus_text, run_metrics

        return prometheus_text(run_metrics(list(self.engine.records)))

    def refresh(self) -> None:
        if self.path:
            Path(self.path).write_text(self.text())

    def close(self) -> None:
        self.refresh()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _Progress:
    """Rank 0's progress line on stderr every `every` steps: steps, requests, tokens, tokens/s
    since the first step, and the step's balancing metrics: mean IR, replicas planned /
    arrived / used (late), exposed transfer, predictor and planner time."""

    def __init__(self, engine, every: int, *, show: bool = True, exporter=None) -> None:
        self.engine, self.every, self.show, self.exporter = engine, every, show, exporter
        self.t0 = time.perf_counter()
        self.tokens = 0

    def __call__(self, rec) -> None:
        self.tokens += rec.tokens
        steps = len(self.engine.records)
        if steps % self.every:
            return
        if self.exporter is not None:
            self.exporter.refresh()
        if not self.show:
            return
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        ir = rec.ep.get("mean_ir")
        plan = rec.ep.get("plan_seconds")
        line = (f"probe.runtime: step {steps}: {rec.running} running, "
                f"{len(self.engine.pending)} waiting, {len(self.engine.results)} done, "
                f"{self.tokens} tokens, {rate:.1f} tok/s (rank 0)"
                + (f", IR {ir:.3f}" if ir is not None else ""))
        if "replicas_planned" in rec.ep:
            planned, arrived, used, late = (sum(rec.ep[f"replicas_{k}"])
                                            for k in ("planned", "arrived", "used", "late"))
            line += (f", replicas {planned}/{arrived}/{used} planned/arrived/used ({late} late)"
                     f", exposed {rec.ep['exposed_transfer_s'] * 1e3:.1f} ms"
                     f", predictor {rec.ep.get('predict_seconds', 0.0) * 1e3:.1f} ms")
        if plan is not None:
            line += f", planner {plan * 1e3:.1f} ms"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _print_table(out: dict, console=None) -> None:
    """Two tables that fit 80 columns: one row per rank, then the group's totals."""
    from rich.console import Console
    from rich.table import Table

    def f(x, spec=".3g"):
        return "-" if x is None else format(x, spec)

    console = console or Console()
    console.print(f"probe.runtime: {out['model']} on {out['world_size']} rank(s), "
                  f"{out['device']}, {out['dtype']}", overflow="fold")
    t = Table(title="per rank")
    for col in ("rank", "requests", "TTFT s", "prefill tok/s", "decode tok/s", "MB in"):
        t.add_column(col, justify="right", no_wrap=True)
    for s in out["ranks"]:
        t.add_row(str(s["rank"]), str(s["requests"]), f(s["ttft_s_mean"]),
                  f(s["prefill_tokens_per_s"], ".1f"), f(s["decode_tokens_per_s"], ".1f"),
                  f(s["bytes_prefetched"] / 1e6, ".2f"))
    console.print(t)
    first = out["ranks"][0]
    totals = out.get("metrics", {}).get("totals", {})
    g = Table(title="group")
    g.add_column("metric", no_wrap=True)
    g.add_column("value", justify="right", no_wrap=True)
    rows = [
        ("mean IR", f(first["mean_ir"])),
        ("replicas planned / in time / late",
         f"{out['replicas_planned']} / {out['replicas_arrived']} / {out['replicas_late']}"),
        ("MB prefetched (arrived, all ranks)", f(out["bytes_prefetched_total"] / 1e6, ".2f")),
        ("exposed transfer s", f(first["exposed_transfer_s"])),
        ("policy", out.get("policy", "-")),
        ("planner s (all steps)", f(out["plan_s_total"])),
        ("dispatch split s (all steps)", f(totals.get("split_s"))),
        ("EPLB re-plan moves s", f(totals.get("replan_s"))),
        ("planner warm-up s (start-up)", f(out["planner_warmup_s"])),
        ("requests rejected", str(len(out["rejected"]))),
    ]
    for row in rows:
        g.add_row(*row)
    console.print(g)
    for r in out["rejected"]:
        console.print(f"rejected {r['rid']}: {r['reason']}", overflow="fold")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.progress_every < 1:
        build_parser().error("--progress-every must be >= 1")
    if args.keep_format and not args.model:
        build_parser().error("--keep-format needs --model (a checkpoint with MXFP4 / FP8 "
                             "experts)")
    from probe.runtime.dispatch import CapacityOverflow, DispatchOptions

    try:
        DispatchOptions(args.dispatch, args.capacity_factor, args.capacity)
    except ValueError as exc:
        build_parser().error(f"--capacity-factor / --capacity: {exc}")
    if args.plan_on == "device" and args.balance and args.policy not in ("probe", "static"):
        build_parser().error(f"--plan-on device plans --policy probe's replicas; --policy "
                             f"{args.policy} plans on the host")
    if args.plan_on == "device" and args.balance and args.policy == "probe":
        from probe.runtime.device_plan import DEVICE_PLANNERS

        if args.method not in DEVICE_PLANNERS:
            build_parser().error(f"--plan-on device plans with --method "
                                 f"{' | '.join(sorted(DEVICE_PLANNERS))}, got {args.method}")
    try:
        run(args)
    except DeviceUnavailable as exc:
        sys.stderr.write(f"probe.runtime: error: {exc}\n")
        return 2
    except CapacityOverflow as exc:  # raised on every rank after the step (gathered counts)
        sys.stderr.write(f"probe.runtime: error: {exc}\n")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
