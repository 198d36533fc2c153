"""The expert-parallel decode step in CUDA graphs (`probe.runtime.decode.EPDecodeRunner`):
logits with graphs on equal logits with graphs off, and the time of both.

    python3 -m torch.distributed.run --nproc-per-node G -m experiments.runtime.ep_graphs \\
        --device cuda --out DIR
    python3 -m torch.distributed.run --nproc-per-node 2 -m experiments.runtime.ep_graphs \\
        --device cpu --quick --out DIR          # gloo, graphs off only (the CPU check)
    python3 -m experiments.runtime.ep_graphs --device cpu --quick --out DIR   # ep = 1

Every rank builds the same random model (one seed) and keeps its sharded home experts, wrapped
by an `EPRunner` with fixed-capacity dispatch and balancing off (the decode step is static EP).
Correctness first, in float32 (TF32 off): B fresh random rows per rank, one sequence each,
decode `--steps` positions through (a) the EP step eager, (b) the EP step replayed from CUDA
graphs (CUDA only; the NCCL all-to-alls captured inside) and (c) `decode_forward` of the
whole model on the same rank (every expert local), each on its own `StaticKVCache`; the
largest |logit difference| of (b) vs (a) and (a) vs (c) over all steps and ranks must be <= 1e-4
(the same kernels: (b) vs (a) is expected to be 0). Then timing in the model dtype (bf16 on
CUDA, fp32 on CPU): the median over `--iters` decode steps (after warm-up; CUDA events on the
GPU) of one step eager and one replayed, at B = 1, 8, 64 rows per rank (--quick: 1, 4); the
table prints ms per step and the speed-up. Rank 0 writes ep_graphs.json, ep_graphs.md and a
manifest into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from experiments.manifest import Manifest
from probe.placement import sharded_home
from probe.runtime.balancer import all_gather_fields
from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.decode import EPDecodeRunner, StaticKVCache, decode_forward
from probe.runtime.dispatch import DispatchOptions
from probe.runtime.dist import DistContext, init_distributed, shutdown
from probe.runtime.engine import random_model
from probe.runtime.pipeline import EPRunner, PipelineOptions

TOL = 1e-4


def config(quick: bool) -> MoEConfig:
    if quick:
        return MoEConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8, top_k=2,
                         moe_intermediate_size=16, rope=RopeConfig(theta=10000.0),
                         moe_layers=(0, 1), norm_topk_prob=True, qk_norm="head")
    return MoEConfig(model_type="qwen3_moe", vocab_size=4096, hidden_size=1024, num_layers=4,
                     num_heads=16, num_kv_heads=4, head_dim=64, num_experts=64, top_k=4,
                     moe_intermediate_size=512, rope=RopeConfig(theta=10000.0),
                     moe_layers=(0, 1, 2, 3), norm_topk_prob=True, qk_norm="head")


def _context(device: str) -> DistContext:
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return init_distributed(backend="nccl" if device == "cuda" else "gloo", timeout_s=60.0)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    return DistContext(0, 1, None, None, dev)


class _Models:
    """This rank's slice (EP runner attached) and the whole model, in one dtype."""

    def __init__(self, cfg: MoEConfig, ctx: DistContext, dtype: torch.dtype) -> None:
        ids = np.flatnonzero(sharded_home(cfg.num_experts, ctx.world_size)[ctx.rank]).tolist()
        self.full = random_model(cfg, seed=7, dtype=dtype, device=ctx.device, std=0.05)
        self.slice = random_model(cfg, seed=7, dtype=dtype, device=ctx.device, std=0.05,
                                  expert_ids=ids)
        self.runner = EPRunner(self.slice, ctx, PipelineOptions(
            balance=False, dispatch=DispatchOptions("fixed", capacity_factor=2.0)))

    def decoders(self, rows: int, steps: int, graphs: bool):
        """(EP eager, EP graphs or None, the whole model's cache): each over a fresh cache of
        `rows` slots, every slot taken (slot i holds row i)."""
        def cache(model):
            weight = model.embed.weight
            c = StaticKVCache(model.cfg, rows, max(16, steps), dtype=weight.dtype,
                              device=weight.device)
            for _ in range(rows):
                c.allocate()
            return c

        eager = EPDecodeRunner(self.slice, cache(self.slice), self.runner, use_graphs=False)
        replayed = (EPDecodeRunner(self.slice, cache(self.slice), self.runner, use_graphs=True)
                    if graphs else None)
        return eager, replayed, cache(self.full)


def check(models: _Models, ctx: DistContext, rows: int, steps: int, graphs: bool) -> dict:
    eager, replayed, full_cache = models.decoders(rows, steps, graphs)
    slots = list(range(rows))
    g = torch.Generator().manual_seed(100 + ctx.rank)
    worst = {"graph_vs_eager": 0.0 if graphs else None, "ep_vs_local": 0.0}
    with torch.inference_mode():
        for pos in range(steps):
            ids = torch.randint(0, models.full.cfg.vocab_size, (rows,), generator=g).tolist()
            a = eager(ids, slots, [pos] * rows).float().clone()
            eager.check()
            dev = models.full.embed.weight.device
            t = torch.tensor
            c = decode_forward(models.full, full_cache, t(ids, device=dev), t(slots, device=dev),
                               t([pos] * rows, device=dev)).float()
            worst["ep_vs_local"] = max(worst["ep_vs_local"], float((a - c).abs().max()))
            if replayed is not None:
                b = replayed(ids, slots, [pos] * rows).float()
                replayed.check()
                worst["graph_vs_eager"] = max(worst["graph_vs_eager"], float((b - a).abs().max()))
    return worst


def _median_step(decoder, rows: int, iters: int, device: torch.device) -> float:
    """Median seconds of one decode step (inputs copied in, then run or replayed)."""
    slots, ids = list(range(rows)), [1] * rows
    times = []
    with torch.inference_mode():
        for i in range(iters + 3):
            pos = i % 8
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                decoder(ids, slots, [pos] * rows)
                end.record()
                end.synchronize()
                sec = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                decoder(ids, slots, [pos] * rows)
                sec = time.perf_counter() - t0
            if i >= 3:
                times.append(sec)
    decoder.check()
    return statistics.median(times)


def timing(models: _Models, rows: int, iters: int, graphs: bool) -> dict:
    eager, replayed, _ = models.decoders(rows, 16, graphs)
    device = models.runner.device
    out = {"rows": rows, "eager_ms": 1e3 * _median_step(eager, rows, iters, device)}
    out["graph_ms"] = (1e3 * _median_step(replayed, rows, iters, device)
                       if replayed is not None else None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m experiments.runtime.ep_graphs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="output folder (rank 0 writes)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU test)")
    parser.add_argument("--steps", type=int, default=None, help="decode positions checked")
    parser.add_argument("--iters", type=int, default=None, help="decode steps timed")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible")
    ctx = _context(args.device)
    out = Path(args.out)
    run = None
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run = Manifest.start("experiments.runtime.ep_graphs", argv, out=out)
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = config(args.quick)
    steps = args.steps or (3 if args.quick else 8)
    iters = args.iters or (3 if args.quick else 30)
    checks = {}
    models = _Models(cfg, ctx, torch.float32)
    for rows in ([2] if args.quick else [1, 8]):
        worst = check(models, ctx, rows, steps, graphs=cuda)  # this rank's
        got = all_gather_fields(ctx, {"v": np.array([worst["graph_vs_eager"] or 0.0,
                                                    worst["ep_vs_local"]])},
                                "check all_gather")["v"].max(axis=0)  # every rank's worst
        checks[rows] = {"graph_vs_eager": float(got[0]) if cuda else None,
                        "ep_vs_local": float(got[1])}
    models.runner.close()
    models = _Models(cfg, ctx, torch.bfloat16 if cuda else torch.float32)
    rows_list = [1, 4] if args.quick else [1, 8, 64]
    times = [timing(models, rows, iters, graphs=cuda) for rows in rows_list]
    models.runner.close()
    ok = all(v is None or v <= TOL for c in checks.values() for v in c.values())
    if ctx.rank == 0:
        record = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                  "ranks": ctx.world_size, "backend": ctx.backend, "tolerance": TOL,
                  "config": {"hidden": cfg.hidden_size, "layers": cfg.num_layers,
                             "experts": cfg.num_experts, "top_k": cfg.top_k,
                             "ffn": cfg.moe_intermediate_size},
                  "check_float32": {str(k): v for k, v in checks.items()},
                  "timing": times, "timing_dtype": "bfloat16" if cuda else "float32",
                  "ok": ok}
        (out / "ep_graphs.json").write_text(json.dumps(record, indent=1) + "\n")
        lines = ["| rows per rank | eager ms | graph ms | speed-up |", "|---|---|---|---|"]
        table = Table("rows per rank", "eager ms", "graph ms", "speed-up",
                      title=f"EP decode step, ep = {ctx.world_size} ({record['device']})")
        for t in times:
            g = t["graph_ms"]
            cells = (str(t["rows"]), f"{t['eager_ms']:.3f}", "-" if g is None else f"{g:.3f}",
                     "-" if g is None else f"{t['eager_ms'] / g:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
            table.add_row(*cells)
        md = (f"# EP decode step in CUDA graphs\n\nep = {ctx.world_size}, {record['device']}, "
              f"checks (max |logit diff|, float32): {record['check_float32']}\n\n"
              + "\n".join(lines) + "\n")
        (out / "ep_graphs.md").write_text(md)
        run.write(out, [out / "ep_graphs.json", out / "ep_graphs.md"])
        console = Console()
        console.print(f"checks (max |logit diff|, float32): {record['check_float32']}, "
                      f"ok: {ok}")
        console.print(table)
    if ctx.group is not None:
        shutdown(ctx)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
