"""Paged vs contiguous (static) KV cache in the no-sync decode step: tokens/s, peak memory, and
how many concurrent requests a fixed memory budget holds next to replica slots.

    python3 -m experiments.runtime.paged_kv --device cuda --out results/paged_kv
    python3 -m experiments.runtime.paged_kv --device cpu --quick --out /tmp/paged_kv

Model: the small test-bench shape (`probe.runtime.smallmodel.SMALL_ARCH`: D 256, 8 MoE layers,
4/2 heads of 64, 64 experts, top-4, F 64), random weights (`probe.runtime.engine.random_model`);
--quick: TINY_ARCH.

Correctness first (fp32 on --device, TF32 off): 4 requests of different prompt lengths, 24
greedy steps through the static cache and through the paged cache (blocks of 16, handed out in
a scrambled order; CUDA graphs on CUDA): tokens equal, logits close, the first step's logits
close to the CPU twin (the same weights, static step, on the CPU); the Engine with paged KV and
a pool too small for all requests at once serves staggered requests with the default Engine's
tokens (none dropped, some waited); and one paged graph step (CUDA; eager on CPU) runs under
`probe.runtime.syncguard.no_host_sync` (on CUDA with `torch.cuda.set_sync_debug_mode("error")`).

Timing (bf16 on CUDA, fp32 on CPU): B concurrent requests (64 and 256; --quick 4 and 8), prompts
of 32 tokens prefilled, then `--steps` decode steps (the engine's step: the runner plus one host
read of the argmax), median over --repeats after a warm-up (graph capture), CUDA events. The
contiguous cache gives every request a slot of `--max-seq-len` positions (the Engine's default
S, 2048 for this model); the paged pool holds B x ceil((32 + steps) / 16) blocks (what the
requests need). Peak memory: torch.cuda.max_memory_allocated during cache build, prefill and
decode, minus the memory allocated before (the model's weights).

Budget: with a fixed per-rank budget for KV + replicas (`--budget-mib`, default 256 MiB), the
largest batch of requests of `--request-tokens` tokens (default 32 prompt + 96 new) that fits
with (a) 3 in-flight replica slots per rank, double-buffered (3 x 2 x expert bytes, the
`SlotPool` of probe.runtime.transfer) and (b) 2 resident redundant experts per MoE layer
(2 x L_moe x expert bytes, as static EPLB-style replication keeps them), from the model shape;
also for a bigger shape (D 768, 8 layers, 12/4 heads of 64, 64 experts, F 256). The small
shape's (a) is also built as an Engine (--quick: the tiny shape), whose summary()["memory"]
is written out.
Writes paged_kv.json, paged_kv.md and manifest.json into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from experiments.manifest import Manifest
from experiments.runtime.decode_graphs import Decoder
from probe.runtime import smallmodel
from probe.runtime.decode import DecodeRunner, StaticKVCache
from probe.runtime.engine import Engine, Request, random_model
from probe.runtime.families import config_from_hf
from probe.runtime.paged import (
    PagedDecodeRunner,
    PagedKVCache,
    expert_bytes,
    kv_block_bytes,
    plan_memory,
)
from probe.runtime.syncguard import no_host_sync

PROMPT_LEN = 32
BLOCK = 16
BIGGER_ARCH = {**smallmodel.SMALL_ARCH, "hidden_size": 768, "num_attention_heads": 12,
               "num_key_value_heads": 4, "moe_intermediate_size": 256}


def model_config(arch: dict):
    return config_from_hf({"model_type": "qwen3_moe",
                           **smallmodel.qwen3_moe_config_kwargs(arch)})


def _prompts(batch: int, vocab: int, seed: int, lengths=None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [PROMPT_LEN] * batch
    return [torch.randint(0, min(vocab, 256), (n,), generator=g).tolist() for n in lengths]


class Path_(Decoder):
    """Prefill prompts into one cache layout, then greedy decode steps through its runner
    (decode_graphs.Decoder's steps, on a static or a paged cache)."""

    def __init__(self, model, layout: str, batch: int, max_len: int, graphs: bool,
                 scramble: bool = False) -> None:
        self.model, self.layout, self.path = model, layout, layout
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.device = device
        if layout == "static":
            self.cache = StaticKVCache(model.cfg, batch, max_len, dtype=dtype, device=device)
            self.runner = DecodeRunner(model, self.cache, use_graphs=graphs)
        else:
            blocks = batch * -(-max_len // BLOCK)
            self.cache = PagedKVCache(model.cfg, blocks, BLOCK, max_len, dtype=dtype,
                                      device=device)
            if scramble:  # tables that are not runs of consecutive blocks
                g = torch.Generator().manual_seed(1)
                self.cache._free = torch.randperm(blocks, generator=g).tolist()
            self.runner = PagedDecodeRunner(model, self.cache, use_graphs=graphs,
                                            max_batch=batch)
        self.max_len = max_len

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        if self.layout == "static":
            self.cache.release_all()
            self.caches = [self.cache.sequence(self.cache.allocate()) for _ in prompts]
        else:
            for s in getattr(self, "caches", []):
                s.release()
            self.caches = [self.cache.sequence(self.max_len) for _ in prompts]
        flat = torch.tensor([t for p in prompts for t in p], device=self.device)
        logits = self.model(flat, seq_lens=[len(p) for p in prompts], caches=self.caches,
                            last_only=True).logits  # [B, V]
        return logits.argmax(-1).tolist()


def check(model, cpu_model, device: torch.device) -> dict:
    graphs = device.type == "cuda"
    steps = 24
    prompts = _prompts(4, model.cfg.vocab_size, seed=7, lengths=[5, 17, 12, 9])
    max_len = 64
    toks, first = {}, {}
    with torch.inference_mode():
        for layout in ("static", "paged"):
            p = Path_(model, layout, 4, max_len, graphs, scramble=True)
            start = p.prefill(prompts)
            first[layout] = p.logits(start).float().cpu()
            toks[layout] = [start, first[layout].argmax(-1).tolist(),
                            *p.run(first[layout].argmax(-1).tolist(), steps - 2)]
        twin = Path_(cpu_model, "static", 4, max_len, graphs=False)
        cpu_first = twin.logits(twin.prefill(prompts)).float()
    engine = engine_check(model, device)
    return {
        "tokens_equal": toks["paged"] == toks["static"],
        "max_abs_logit_diff_paged_vs_static": float((first["paged"] - first["static"])
                                                    .abs().max()),
        "max_abs_logit_diff_vs_cpu_twin": float((first["static"] - cpu_first).abs().max()),
        "logit_scale": float(first["static"].abs().max()),
        "engine": engine,
        "sync": sync_check(model, device),
    }


def engine_check(model, device: torch.device) -> dict:
    """Paged Engine (graphs on CUDA) with a pool too small for every request at once vs the
    default Engine: equal greedy tokens, none dropped, the blocks limited the batch."""
    g = torch.Generator().manual_seed(5)
    vocab = min(model.cfg.vocab_size, 256)

    def requests():
        g.manual_seed(5)
        return [Request(f"r{i}", torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist(),
                        max_new_tokens=4 + i, arrival_step=i // 2) for i in range(8)]

    want = Engine(model, max_batch_tokens=32, prefill_chunk=16).serve(requests())
    paged = Engine(model, max_batch_tokens=32, prefill_chunk=16, max_running=8, paged_kv=True,
                   block_size=8, kv_blocks=10, max_seq_len=64, cuda_graphs=device.type == "cuda")
    got = paged.serve(requests())
    return {"equal": sorted(got) == sorted(want)
            and all(got[rid].tokens == r.tokens for rid, r in want.items()),
            "served": len(got), "submitted": len(want), "peak_running": paged.peak_running,
            "free_blocks_after": paged.kv.free_blocks, "kv_blocks": paged.kv.num_blocks}


def sync_check(model, device: torch.device) -> str:
    """One paged step (a captured graph's replay on CUDA, eager on the CPU) under the guard."""
    cuda = device.type == "cuda"
    p = Path_(model, "paged", 4, 64, graphs=cuda)
    with torch.inference_mode():
        toks = p.prefill(_prompts(3, model.cfg.vocab_size, seed=3))
        p.logits(toks)  # allocates the buffers, captures the graph
        if cuda:
            torch.cuda.synchronize()
        args = (toks, [s.address for s in p.caches], [s.length for s in p.caches])
        try:
            with no_host_sync(cuda=cuda):  # on CUDA also torch's sync debug mode "error"
                p.runner(*args)
            return "no host sync"
        except RuntimeError as exc:
            return f"SYNC: {str(exc).splitlines()[0][:200]}"
        finally:
            if cuda:
                torch.cuda.synchronize()


def time_layout(model, layout: str, batch: int, args, device: torch.device) -> dict:
    """tokens/s (median) and peak memory above the weights of one layout at `batch`."""
    cuda = device.type == "cuda"
    max_len = args.max_seq_len if layout == "static" else PROMPT_LEN + args.steps + 1
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    samples = []
    with torch.inference_mode():
        p = Path_(model, layout, batch, max_len, graphs=cuda)
        cache_bytes = sum(t.numel() * t.element_size() for t in p.cache.keys + p.cache.values)
        prompts = _prompts(batch, model.cfg.vocab_size, seed=batch)
        for _ in range(args.repeats + 1):  # the first is warm-up (and graph capture)
            toks = p.prefill(prompts)
            if cuda:
                torch.cuda.synchronize()
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                p.run(toks, args.steps)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                p.run(toks, args.steps)
                samples.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    del p
    return {"tok_s": batch * args.steps / float(np.median(samples[1:])),
            "cache_bytes": cache_bytes, "peak_bytes_above_weights": peak,
            "positions_reserved_per_request": max_len}


def budget_rows(budget: int, request_tokens: int, dtype: torch.dtype) -> list[dict]:
    """Largest batch of `request_tokens`-token requests in `budget` bytes, per model shape,
    next to 3 in-flight replica slots (x2 buffers) vs 2 resident redundant experts per layer."""
    rows = []
    for name, arch in (("small", smallmodel.SMALL_ARCH), ("bigger", BIGGER_ARCH)):
        cfg = model_config(arch)
        w = expert_bytes(cfg, dtype)
        common = dict(block_size=BLOCK, tokens_per_request=request_tokens, budget_bytes=budget)
        row = {"model": name, "expert_bytes": w,
               "kv_block_bytes": kv_block_bytes(cfg, BLOCK, dtype),
               "moe_layers": cfg.num_moe_layers}
        for key, replicas, buffers in (("slots3", 3, 2), ("resident2", 2 * cfg.num_moe_layers,
                                                           1)):
            row[f"{key}_replica_bytes"] = replicas * buffers * w
            try:
                plan = plan_memory(cfg, dtype, replica_slots=replicas, num_buffers=buffers,
                                   **common)
            except ValueError:  # the replicas alone exceed the budget
                row[f"{key}_kv_blocks"] = row[f"{key}_max_batch"] = 0
                continue
            row[f"{key}_kv_blocks"] = plan.kv_blocks
            row[f"{key}_max_batch"] = plan.requests_that_fit
        rows.append(row)
    return rows


def engine_memory(model, budget: int, request_tokens: int) -> dict:
    """The Engine's own accounting (`summary()["memory"]`) for `model` with 3 replica slots
    in the budget (it allocates the pool)."""
    engine = Engine(model, paged_kv=True, block_size=BLOCK, memory_budget_bytes=budget,
                    replica_slots=3, max_seq_len=request_tokens, max_running=4096)
    mem = engine.summary()["memory"]
    del engine
    return mem


def _table(rows: list[dict], budget: list[dict], budget_mib: float) -> tuple[Table, Table]:
    t = Table(title="decode tokens/s (median) and peak memory above the weights")
    for col in ("batch", "layout", "tok/s", "cache MiB", "peak MiB", "positions/request"):
        t.add_column(col, justify="right")

    def mib(x):
        return "-" if x is None else f"{x / 2**20:,.1f}"

    for r in rows:
        t.add_row(str(r["batch"]), r["layout"], f"{r['tok_s']:,.0f}", mib(r["cache_bytes"]),
                  mib(r["peak_bytes_above_weights"]), str(r["positions_reserved_per_request"]))
    b = Table(title=f"largest batch in {budget_mib:g} MiB (KV + replicas)")
    for col in ("model", "expert KiB", "3 slots x2: replica MiB", "batch",
                "2 resident/layer: replica MiB", "batch"):
        b.add_column(col, justify="right")
    for r in budget:
        b.add_row(r["model"], f"{r['expert_bytes'] / 1024:,.0f}",
                  mib(r["slots3_replica_bytes"]), str(r["slots3_max_batch"]),
                  mib(r["resident2_replica_bytes"]), str(r["resident2_max_batch"]))
    return t, b


def _markdown(record: dict) -> str:
    lines = [f"Device: {record['device']}; model dtype {record['dtype']}; prompts of "
             f"{PROMPT_LEN} tokens, {record['steps']} decode steps; static slots of "
             f"{record['max_seq_len']} positions; paged blocks of {BLOCK}.", "",
             "| batch | layout | tokens/s | cache MiB | peak MiB above weights |",
             "|---|---|---|---|---|"]
    for r in record["rows"]:
        peak = r["peak_bytes_above_weights"]
        lines.append(f"| {r['batch']} | {r['layout']} | {r['tok_s']:.0f} | "
                     f"{r['cache_bytes'] / 2**20:.1f} | "
                     f"{'-' if peak is None else f'{peak / 2**20:.1f}'} |")
    lines += ["", f"Budget {record['budget_mib']:g} MiB per rank for KV + replicas, requests of "
              f"{record['request_tokens']} tokens ({record['budget_dtype']}):", "",
              "| model | expert KiB | KV block KiB | 3 slots x 2 buffers: replica MiB | batch | "
              "2 resident per MoE layer: replica MiB | batch |", "|---|---|---|---|---|---|---|"]
    for r in record["budget"]:
        lines.append(f"| {r['model']} | {r['expert_bytes'] / 1024:.0f} | "
                     f"{r['kv_block_bytes'] / 1024:.0f} | "
                     f"{r['slots3_replica_bytes'] / 2**20:.2f} | {r['slots3_max_batch']} | "
                     f"{r['resident2_replica_bytes'] / 2**20:.2f} | "
                     f"{r['resident2_max_batch']} |")
    lines += ["", f"- checks: {json.dumps(record['check'])}",
              f"- Engine memory summary ({record['engine_memory_model']}, 3 replica slots): "
              f"{json.dumps(record['engine_memory'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m experiments.runtime.paged_kv",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU test)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="positions per static slot (default 2048; --quick 128)")
    parser.add_argument("--budget-mib", type=float, default=256.0,
                        help="per-rank bytes for KV + replicas, MiB (default 256)")
    parser.add_argument("--request-tokens", type=int, default=PROMPT_LEN + 96,
                        help="tokens per request in the budget count (default 128)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Manifest.start("experiments.runtime.paged_kv", argv, out=out)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 checks in full fp32 (TF32 keeps 10 mantissa bits)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    batches = [4, 8] if args.quick else [64, 256]
    args.steps = args.steps or (4 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.max_seq_len = args.max_seq_len or (128 if args.quick else 2048)
    if args.max_seq_len < PROMPT_LEN + args.steps + 1:
        parser.error(f"--max-seq-len must be >= {PROMPT_LEN + args.steps + 1}")
    cfg = model_config(smallmodel.TINY_ARCH if args.quick else smallmodel.SMALL_ARCH)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # random_model draws with a generator on its device, so CPU and CUDA draws differ: the
    # twin is the same weights, drawn on the CPU and copied over
    cpu = random_model(cfg, seed=0, dtype=torch.float32, device="cpu")
    fp32 = copy.deepcopy(cpu).to(device)
    checks = check(fp32, cpu, device)
    del fp32, cpu
    model = random_model(cfg, seed=0, dtype=dtype, device=device)
    rows = []
    for batch in batches:
        for layout in ("static", "paged"):
            rows.append({"batch": batch, "layout": layout,
                         **time_layout(model, layout, batch, args, device)})
    budget = int(args.budget_mib * 2**20)
    bdtype = torch.bfloat16
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "tf32": False, "steps": args.steps,
              "repeats": args.repeats, "max_seq_len": args.max_seq_len, "block_size": BLOCK,
              "check": checks, "rows": rows, "budget_mib": args.budget_mib,
              "budget_dtype": str(bdtype), "request_tokens": args.request_tokens,
              "budget": budget_rows(budget, args.request_tokens, bdtype),
              "engine_memory_model": f"{'tiny' if args.quick else 'small'}, {dtype}",
              "engine_memory": engine_memory(model, budget, args.request_tokens)}
    (out / "paged_kv.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "paged_kv.md").write_text(_markdown(record))
    run.write(out, [out / "paged_kv.json", out / "paged_kv.md"])
    console = Console()
    console.print(f"checks: {checks}", overflow="fold")
    for table in _table(rows, record["budget"], args.budget_mib):
        console.print(table)
    ok = (checks["tokens_equal"] and checks["engine"]["equal"]
          and checks["sync"] == "no host sync")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
