"""Decode tokens/s: CUDA-graph decode vs the same static step eager vs the default eager path vs
transformers `generate`, on the same weights.

    python3 -m experiments.runtime.decode_graphs --device cuda --out results/decode_graphs
    python3 -m experiments.runtime.decode_graphs --device cpu --quick --out /tmp/decode_graphs

Models: the small test-bench model (Qwen3-MoE, `probe.runtime.smallmodel.SMALL_ARCH`): the
trained checkpoint when `models/smallmodel/config.json` exists (it is git-ignored; carry it to
the GPU machine), else random weights of that shape (the JSON says which); and, unless --quick,
a bigger random Qwen3-MoE (D 768, 8 layers, 12/4 heads, 64 experts, top-8, F 256; 0.3 B
parameters). Each is saved in the
Hugging Face layout and loaded by both probe (`checkpoint.load_model`) and transformers
(`Qwen3MoeForCausalLM.from_pretrained`), so all paths read the same bytes.

Correctness first, in fp32 on --device: for a batch of prompts, prefill, then 8 greedy decode
steps through (a) the default path (`MoETransformer.forward` with growing `KVCache`s), (b) the
static no-sync step (`probe.runtime.decode`) eager and (c) replayed from CUDA graphs (CUDA only);
tokens must be equal (also to transformers' greedy `generate`) and logits close, and the first
step's logits must match the CPU twin (the same weights on the CPU); and the Engine with static
decode and with paged KV (graphs on CUDA) must serve staggered requests (slots and blocks
reused, kv-length buckets crossed) with the default Engine's tokens: in fp32 with TF32 off
they must be equal; in the timing dtype (bf16 on CUDA) the fraction of equal tokens is
reported, not required (the default Engine batches decode rows with prefill chunks, the static
step runs them alone: other GEMM shapes, and a near-tie of two random-weight logits flips in
bf16, after which the sequences differ). Then
one eager static step and one graph step (input copy + replay) run under
`torch.cuda.set_sync_debug_mode("error")` plus `probe.runtime.syncguard.no_host_sync` (CPU: the
guard alone): any host sync raises and is reported.

Timing (model dtype: bf16 on CUDA, fp32 on CPU): batch 1/8/64 (--quick: 1/4), prompts of 32
tokens, `--steps` decode steps after a warm-up, each step as the engine runs it (one host read
of the argmax per step). tokens/s = batch * steps / median wall time over --repeats, timed with
CUDA events. transformers: `generate(max_new_tokens=steps + 1)` minus `generate(max_new_tokens=1)`
(the prefill), greedy, default cache.
Writes decode_graphs.json, decode_graphs.md and manifest.json into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from experiments.manifest import Manifest
from probe.runtime import smallmodel
from probe.runtime.checkpoint import load_model
from probe.runtime.decode import DecodeRunner, StaticKVCache, decode_forward
from probe.runtime.engine import Engine, Request
from probe.runtime.syncguard import no_host_sync

TRAINED = Path("models/smallmodel")
BIGGER_ARCH = {**smallmodel.SMALL_ARCH, "hidden_size": 768, "num_hidden_layers": 8,
               "num_attention_heads": 12, "num_key_value_heads": 4, "num_experts": 64,
               "num_experts_per_tok": 8, "moe_intermediate_size": 256,
               "max_position_embeddings": 4096}
PROMPT_LEN = 32


def _hf_config(arch: dict):
    import transformers

    return transformers.Qwen3MoeConfig(**smallmodel.qwen3_moe_config_kwargs(arch))


def write_checkpoint(arch: dict, folder: Path, seed: int) -> None:
    """A random Qwen3-MoE of `arch` in the Hugging Face layout (transformers' own init)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(_hf_config(arch))
    model.save_pretrained(folder)


def hf_model(folder: Path, device: str, dtype: torch.dtype):
    import transformers

    model = transformers.Qwen3MoeForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


class _Timer:
    """Wall seconds of a block: CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 256), (batch, PROMPT_LEN), generator=g).tolist()


class Decoder:
    """Prefill `prompts`, then greedy decode steps through one path: "default" (forward with
    KVCache), "static" (the no-sync step, eager) or "graphs" (its CUDA graphs)."""

    def __init__(self, model, path: str, max_batch: int, max_len: int) -> None:
        self.model, self.path = model, path
        self.device = next(model.parameters()).device
        if path != "default":
            self.cache = StaticKVCache(model.cfg, max_batch, max_len,
                                       dtype=next(model.parameters()).dtype, device=self.device)
            self.runner = DecodeRunner(model, self.cache, use_graphs=path == "graphs")

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        flat = torch.tensor([t for p in prompts for t in p], device=self.device)
        if self.path == "default":
            self.caches = [self.model.new_cache() for _ in prompts]
        else:
            self.cache.release_all()
            self.caches = [self.cache.sequence(self.cache.allocate()) for _ in prompts]
        logits = self.model(flat, seq_lens=[len(p) for p in prompts], caches=self.caches,
                            last_only=True).logits  # [B, V]
        return logits.argmax(-1).tolist()

    def logits(self, toks: list[int]) -> torch.Tensor:
        """One decode step's logits [B, V] for the last tokens `toks`."""
        if self.path == "default":
            return self.model(torch.tensor(toks, device=self.device), seq_lens=[1] * len(toks),
                              caches=self.caches, last_only=True).logits
        out = self.runner(toks, [c.address for c in self.caches],
                          [c.length for c in self.caches])
        for c in self.caches:
            c.length += 1
        return out

    def run(self, toks: list[int], steps: int) -> list[list[int]]:
        out = []
        for _ in range(steps):
            toks = self.logits(toks).argmax(-1).tolist()  # the engine's one host read per step
            out.append(toks)
        return out


def check(model, cpu_model, hf, paths: list[str], batch: int, device: torch.device) -> dict:
    """Greedy tokens of every path (and of transformers' `hf`, fp32, unless None) equal,
    logits close, first step close to the CPU twin."""
    prompts = _prompts(batch, model.cfg.vocab_size, seed=7)
    steps = 8
    toks, first = {}, {}
    with torch.inference_mode():
        for path in paths:
            dec = Decoder(model, path, batch, PROMPT_LEN + steps + 1)
            start = dec.prefill(prompts)
            first[path] = dec.logits(start).float().cpu()
            second = first[path].argmax(-1).tolist()
            toks[path] = [start, second, *dec.run(second, steps - 2)]  # steps tokens
        twin = Decoder(cpu_model, "default", batch, PROMPT_LEN + steps + 1)
        cpu_first = twin.logits(twin.prefill(prompts)).float()
        hf_equal = None
        if hf is not None:
            gen = hf.generate(torch.tensor(prompts, device=device), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False,
                              pad_token_id=smallmodel.PAD_ID, eos_token_id=None)
            hf_equal = gen[:, PROMPT_LEN:].T.tolist() == toks["default"]
    ref = first["default"]
    engine = engine_check(model, device)
    return {
        "batch": batch, "steps": steps,
        "tokens_equal": all(toks[p] == toks["default"] for p in paths),
        "engine_tokens_equal": engine["equal"],
        "engine_fp32": engine,
        "hf_generate_tokens_equal": hf_equal,
        "max_abs_logit_diff_vs_default": {p: float((first[p] - ref).abs().max()) for p in paths},
        "max_abs_logit_diff_vs_cpu_twin": float((ref - cpu_first).abs().max()),
        "logit_scale": float(ref.abs().max()),
    }


def engine_check(model, device: torch.device) -> dict:
    """The Engine with static decode and with paged KV (graphs on CUDA) against the default
    Engine on staggered requests of several lengths (slots and blocks get reused, the
    kv-length bucket grows mid-run): the fraction of greedy tokens equal (position by
    position), per variant, and whether all are equal."""
    g = torch.Generator().manual_seed(5)
    vocab = min(model.cfg.vocab_size, 256)

    def requests():
        g.manual_seed(5)
        return [Request(f"r{i}", torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist(),
                        max_new_tokens=4 + i, arrival_step=i) for i in range(8)]

    want = Engine(model, max_batch_tokens=32, prefill_chunk=16).serve(requests())
    graphs = device.type == "cuda"
    variants = {  # 4 slots / 12 blocks of 8 for 8 requests: slots and blocks are reused
        "static": dict(static_decode=True, max_running=4),
        "paged": dict(paged_kv=True, block_size=8, kv_blocks=12, max_running=4),
    }
    out = {}
    for name, kw in variants.items():
        got = Engine(model, max_batch_tokens=32, prefill_chunk=16, cuda_graphs=graphs,
                     max_seq_len=64, **kw).serve(requests())
        pairs = [(a, b) for rid, r in want.items() for a, b in zip(got[rid].tokens, r.tokens,
                                                                  strict=True)]
        out[f"{name}_fraction_equal"] = sum(a == b for a, b in pairs) / len(pairs)
    out["equal"] = all(v == 1.0 for v in out.values())
    return out


def sync_check(model, device: torch.device) -> dict:
    """Run the static step under the sync guard: eager and (CUDA) one captured replay."""
    out = {}
    cache = StaticKVCache(model.cfg, 4, PROMPT_LEN + 4, dtype=next(model.parameters()).dtype,
                          device=device)
    prompts = _prompts(3, model.cfg.vocab_size, seed=3)
    with torch.inference_mode():
        seqs = [cache.sequence(cache.allocate()) for _ in prompts]
        for p, s in zip(prompts, seqs, strict=True):
            model(torch.tensor(p, device=device), caches=[s])
        ids = torch.tensor([1, 2, 3], device=device)
        slots = torch.tensor([s.slot for s in seqs], device=device)
        pos = torch.tensor([s.length for s in seqs], device=device)
        runner = DecodeRunner(model, cache, use_graphs=device.type == "cuda")
        row_args = ([1, 2, 3], [s.slot for s in seqs], [s.length for s in seqs])
        runner(*row_args)  # allocates the bucket's buffers and captures its graph
        if device.type == "cuda":
            torch.cuda.synchronize()
        for name, fn in (("eager_step", lambda: decode_forward(model, cache, ids, slots, pos)),
                         ("graph_step", lambda: runner(*row_args))):
            if name == "graph_step" and device.type != "cuda":
                continue
            try:
                with no_host_sync(cuda=device.type == "cuda"):
                    fn()
                out[name] = "no host sync"
            except RuntimeError as exc:
                out[name] = f"SYNC: {str(exc).splitlines()[0][:200]}"
        if device.type == "cuda":
            torch.cuda.synchronize()
    return out


def time_path(model, path: str, batch: int, steps: int, repeats: int, timer) -> float:
    prompts = _prompts(batch, model.cfg.vocab_size, seed=batch)
    dec = Decoder(model, path, batch, PROMPT_LEN + steps + 8)
    samples = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is warm-up (and graph capture)
            toks = dec.prefill(prompts)
            samples.append(timer(lambda t=toks: dec.run(t, steps)))
    return batch * steps / float(np.median(samples[1:]))


def time_hf(hf, batch: int, steps: int, repeats: int, timer, device) -> float:
    ids = torch.tensor(_prompts(batch, hf.config.vocab_size, seed=batch), device=device)
    kw = dict(do_sample=False, pad_token_id=smallmodel.PAD_ID, eos_token_id=None)

    def gen(n):
        return lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    with torch.inference_mode():
        gen(2)()
        full = [timer(gen(steps + 1)) for _ in range(repeats)]
        pre = [timer(gen(1)) for _ in range(repeats)]
    return batch * steps / max(float(np.median(full)) - float(np.median(pre)), 1e-9)


def bench_model(name: str, folder: Path, args, device: torch.device, source: str) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    paths = ["default", "static"] + (["graphs"] if device.type == "cuda" else [])
    fp32 = load_model(folder, dtype=torch.float32, device=device)
    cpu = load_model(folder, dtype=torch.float32, device="cpu")
    try:
        hf = hf_model(folder, str(device), torch.float32)
        hf_error = None
    except Exception as exc:  # noqa: BLE001 - report, keep the probe numbers
        hf, hf_error = None, f"{type(exc).__name__}: {exc}"
    result = {"model": name, "weights": source, "dtype": str(dtype),
              "check": check(fp32, cpu, hf, paths, 4, device), "sync": sync_check(fp32, device)}
    del fp32, cpu
    model = load_model(folder, dtype=dtype, device=device)
    with torch.inference_mode():  # reported, not required (see the module docstring)
        result["engine_in_timing_dtype"] = engine_check(model, device)
    if hf is not None:
        hf = hf.to(dtype)
    timer = _Timer(device)
    rows = []
    for batch in args.batches:
        row = {"batch": batch}
        for path in paths:
            row[f"{path}_tok_s"] = time_path(model, path, batch, args.steps, args.repeats, timer)
        row["hf_generate_tok_s"] = (time_hf(hf, batch, args.steps, args.repeats, timer, device)
                                    if hf is not None else None)
        rows.append(row)
    result["rows"] = rows
    result["hf_error"] = hf_error
    return result


def _table(results: list[dict]) -> Table:
    t = Table(title="decode tokens/s (median)")
    for col in ("model", "batch", "default", "static eager", "graphs", "HF generate",
                "graphs / default"):
        t.add_column(col, justify="right")

    def f(x):
        return "-" if x is None else f"{x:,.0f}"

    for r in results:
        for row in r["rows"]:
            g = row.get("graphs_tok_s")
            t.add_row(r["model"], str(row["batch"]), f(row["default_tok_s"]),
                      f(row["static_tok_s"]), f(g), f(row["hf_generate_tok_s"]),
                      "-" if g is None else f"{g / row['default_tok_s']:.2f}x")
    return t


def _markdown(results: list[dict]) -> str:
    lines = ["| model | weights | batch | default | static eager | graphs | HF generate |",
             "|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.0f}"

    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {r['weights']} | {row['batch']} | "
                         f"{f(row['default_tok_s'])} | {f(row['static_tok_s'])} | "
                         f"{f(row.get('graphs_tok_s'))} | {f(row['hf_generate_tok_s'])} |")
    lines.append("")
    for r in results:
        lines.append(f"- {r['model']}: tokens equal across paths: "
                     f"{r['check']['tokens_equal']}; Engine static = default: "
                     f"{r['check']['engine_tokens_equal']} (fp32); Engine tokens equal in "
                     f"{r['dtype']}: {r['engine_in_timing_dtype']}; equal to transformers "
                     f"generate: "
                     f"{r['check']['hf_generate_tokens_equal']}; sync check: {r['sync']}"
                     + (f"; transformers failed: {r['hf_error']}" if r["hf_error"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m experiments.runtime.decode_graphs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU test)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-bigger", action="store_true", help="skip the bigger random model")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Manifest.start("experiments.runtime.decode_graphs", argv, out=out)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 checks in full fp32 (TF32 keeps 10 mantissa bits)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.batches = [1, 4] if args.quick else [1, 8, 64]
    args.steps = args.steps or (4 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        if args.quick:
            folder = Path(tmp) / "tiny"
            write_checkpoint(smallmodel.TINY_ARCH, folder, seed=0)
            models.append(("tiny (TINY_ARCH)", folder, "random"))
        else:
            if (TRAINED / "config.json").is_file():
                models.append(("small (SMALL_ARCH)", TRAINED, f"trained checkpoint {TRAINED}"))
            else:
                folder = Path(tmp) / "small"
                write_checkpoint(smallmodel.SMALL_ARCH, folder, seed=0)
                models.append(("small (SMALL_ARCH)", folder, "random (no trained checkpoint)"))
            if not args.no_bigger:
                folder = Path(tmp) / "bigger"
                write_checkpoint(BIGGER_ARCH, folder, seed=1)
                models.append(("bigger (D768 L8 E64 K8)", folder, "random"))
        for name, folder, source in models:
            results.append(bench_model(name, folder, args, device, source))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "tf32": False, "prompt_len": PROMPT_LEN, "steps": args.steps,
              "repeats": args.repeats,
              "results": results}
    (out / "decode_graphs.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "decode_graphs.md").write_text(_markdown(results))
    run.write(out, [out / "decode_graphs.json", out / "decode_graphs.md"])
    console = Console()
    for r in results:
        console.print(f"{r['model']} ({r['weights']}): check {r['check']}, sync {r['sync']}, "
                      f"Engine in {r['dtype']}: {r['engine_in_timing_dtype']}", overflow="fold")
    console.print(_table(results))
    ok = all(r["check"]["tokens_equal"] and r["check"]["engine_tokens_equal"]
             and all(v == "no host sync" for v in r["sync"].values()) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
