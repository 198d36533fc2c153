"""MoE expert time with weights kept in MXFP4 / block-scaled FP8 against bf16, and the roofline
of each format.

    python3 -m experiments.runtime.quant_layer --device cuda --out DIR
    python -m experiments.runtime.quant_layer --device cpu --quick --out DIR   (a smoke run)

One MoE layer's experts on one GPU (all E experts local, as at ep = 1): T tokens routed top-k
by a skewed random router (Zipf-like expert popularity), token rows gathered in expert order on
the device, then gate/up GEMM, SwiGLU, down GEMM and the weighted scatter back to the tokens.
Shapes: gpt-oss-120b (E 128, top-4, hidden 2880, expert width 2880; shipped in MXFP4) and
deepseek-v3 (E 256, top-8, hidden 7168, width 2048; shipped in block-scaled FP8), at 256, 768
and 1536 tokens. Variants: bf16 through torch._grouped_mm (where the build has it), and
probe.runtime.quant_gemm's Triton kernel on bf16 and on the shipped format (weights never
expanded in memory): FP8 once, MXFP4 once per decode ("portable", "spread", "dot_scaled",
"bits", "lut"; see `KernelConfig.mxfp4_decode`), each with the kernel config (tile shape,
warps, stages, row tiles per program, transposed tiles, the decode into wgmma's register
layout, FP8 scale placement) that timed best of a few; every config's time is in the second
table.

Roofline: the active experts' weight bytes in that format (read once) plus the activations
(rows x hidden read and written per GEMM) over the HBM bandwidth measured here (a large
device copy, bytes read plus written), and the FLOPs over the bf16 matmul rate measured here;
the larger is the floor. Correctness first: each variant against the dequantized fp32 twin on
fresh inputs (relative Frobenius error). Timing: CUDA events, median of repeats after warm-up,
inputs rotated over several token sets. Each variant's best config is also timed replayed as
CUDA graphs (one per token set, captured once; what a serving engine's decode step runs, with
no host launch overhead), its replayed output checked against the eager one; on the CPU the
graph columns are n/a and the .md says why.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from experiments.calibration.calibrate_h200 import Timer
from experiments.manifest import Manifest
from experiments.runtime.moe_layer import GRAPHS_OFF_CPU, time_graph
from probe.runtime.quant import PackedWeight
from probe.runtime.quant_gemm import KernelConfig, grouped_matmul, grouped_matmul_ref
from probe.specs import weight_bytes

SHAPES = {  # name: (experts, top_k, hidden, width, shipped format)
    "gpt-oss-120b": (128, 4, 2880, 2880, "mxfp4"),
    "deepseek-v3": (256, 8, 7168, 2048, "fp8_block"),
}
QUICK_SHAPES = {"tiny-mxfp4": (8, 2, 128, 64, "mxfp4"), "tiny-fp8": (8, 2, 128, 64, "fp8_block")}
TOKENS = (256, 768, 1536)
# Kernel configs tried per format, (BM, BN, BK, warps, stages[, decode][, {more KernelConfig
# fields}]); the best correct one is reported and every trial goes to the JSON (a config that
# fails to compile or exceeds shared memory is recorded, not fatal). MXFP4 is one variant per
# decode: "portable", "spread", "dot_scaled" (each with its best two configs of the H100 run in
# results/h100/quant_layer), "bits" and "lut" (the integer decodes, 10 configs each; see
# experiments/runtime/quant_sass.py for their instruction counts per config); row_tiles 2
# decodes each weight tile once for 2 BM-row tiles; swap_ab computes the tile transposed
# (weight rows on the MMA's M side, so BM 16 / 32 still runs Hopper's wgmma). FP8 tries both
# places for its scale.
R2, SWAP = {"row_tiles": 2}, {"swap_ab": True}
SWAP_PK = {"swap_ab": True, "permute_k": True}
# per integer decode: wgmma on 64-row tiles (BK 128: the most weights per loop overhead; BN 256
# with 8 warps: fewer registers, and no K mask where 64 divides K), transposed 16 / 32-row
# tiles (experts with few rows; a 4-stage BK 64 one with about 90 registers, more programs per
# SM), two 64-row tiles per program (experts with many rows); then transposed tiles decoded
# straight into the wgmma's register operand (permute_k: no shared-memory round trip of the
# decoded tile, results/quant_sass): the 16 x 64 one (about 96 registers), the same with two
# and with four 16-row tiles per program (weights decoded once per 32 / 64 rows, MMAs skipped
# per 16 rows; about 128 / 204 registers), and BK 128
INTEGER_DECODE = [(64, 128, 128, 4, 3), (64, 256, 64, 8, 3), (16, 128, 128, 4, 3, SWAP),
                  (32, 128, 128, 4, 3, SWAP), (16, 128, 64, 4, 4, SWAP), (64, 128, 64, 4, 3, R2),
                  (16, 128, 64, 4, 4, SWAP_PK), (16, 128, 64, 4, 4, SWAP_PK, R2),
                  (16, 128, 64, 4, 4, SWAP_PK, {"row_tiles": 4}), (16, 128, 128, 4, 3, SWAP_PK)]
CONFIGS = {
    "bf16": [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3),
             (32, 128, 64, 4, 3, SWAP)],
    "mxfp4": [(64, 128, 64, 4, 3, "portable"), (32, 128, 64, 4, 3, "portable", SWAP),
              (64, 128, 64, 4, 3, "spread"), (32, 128, 64, 4, 3, "spread", SWAP),
              (64, 128, 64, 4, 3, "dot_scaled"), (32, 128, 128, 4, 3, "dot_scaled"),
              *[(*c[:5], "bits", *c[5:]) for c in INTEGER_DECODE],
              *[(*c[:5], "lut", *c[5:]) for c in INTEGER_DECODE]],
    "fp8_block": [(64, 128, 128, 8, 3, "product"), (32, 128, 128, 4, 3, "product"),
                  (64, 256, 128, 8, 3, "product"), (64, 128, 128, 8, 3, "weights"),
                  (32, 128, 128, 4, 3, "product", SWAP)],
}
# (wide column tiles: few programs, which is what costs time under the interpreter)
QUICK_CONFIGS = {"bf16": [(16, 64, 64, 4, 1)],
                 "mxfp4": [(16, 64, 128, 4, 1, "portable"), (16, 64, 128, 4, 1, "portable", R2),
                           (16, 64, 128, 4, 1, "spread", SWAP), (16, 64, 128, 4, 1, "dot_scaled"),
                           (16, 64, 128, 4, 1, "bits", R2), (16, 64, 128, 4, 1, "lut", SWAP),
                           (16, 64, 128, 4, 1, "bits", SWAP_PK)],
                 "fp8_block": [(16, 64, 128, 4, 1, "product")]}
MAX_REL_ERROR = 3e-2  # a config further than this from the fp32 twin is reported, not kept


def kernel_config(spec: tuple, fmt: str) -> KernelConfig:
    """KernelConfig from a CONFIGS entry: a string after the first five items is the format's
    decode (MXFP4) or scale placement (FP8), a dict more KernelConfig fields."""
    bm, bn, bk, warps, stages = spec[:5]
    extra = {}
    for item in spec[5:]:
        if isinstance(item, dict):
            extra.update(item)
        else:
            extra["mxfp4_decode" if fmt == "mxfp4" else "fp8_scale"] = item
    return KernelConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                        **extra)


def config_label(cfg: KernelConfig, fmt: str) -> str:
    decode = {"mxfp4": f" {cfg.mxfp4_decode}", "fp8_block": f" {cfg.fp8_scale}"}.get(fmt, "")
    return cfg.label() + decode


def measure_ceilings(device: str) -> dict:
    """HBM bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured."""
    if device != "cuda":
        return {"hbm_bytes_per_s": float("nan"), "bf16_flops": float("nan")}
    a = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_ms = _time(lambda: b.copy_(a), repeats=20)
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = _time(lambda: m @ m, repeats=10)
    return {"hbm_bytes_per_s": 2 * a.numel() / (copy_ms * 1e-3),
            "bf16_flops": 2 * 8192 ** 3 / (mm_ms * 1e-3)}


def _time(fn, *, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def random_packed(experts, rows, cols, fmt, device, *, seed) -> PackedWeight:
    """Random expert weights [E, rows, cols] (std cols^-0.5) packed in `fmt` on `device`, drawn
    and packed one expert at a time (a whole layer in fp32 would not fit in memory)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for _ in range(experts):
        w = torch.randn(1, rows, cols, generator=gen, device=device) * cols ** -0.5
        parts.append(PackedWeight.pack(w, fmt).data)
    data = tuple(torch.cat(group) for group in zip(*parts, strict=True))
    return PackedWeight(fmt, (experts, rows, cols), data)


def routed(tokens, experts, top_k, hidden, device, gen):
    """(x bf16 [T, D], order int64 [T*K] token of each expert-sorted row, weights [T*K],
    offsets int32 [E + 1]) from a skewed router."""
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 0.8
    popularity = popularity[torch.randperm(experts, generator=gen)]
    choice = torch.multinomial(popularity.expand(tokens, -1), top_k, replacement=False,
                               generator=gen)  # [T, K]
    gates = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    flat = choice.reshape(-1)
    perm = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    offsets = torch.zeros(experts + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    return (x.to(device), (perm // top_k).to(device), gates.reshape(-1)[perm].to(device),
            offsets.to(device), int((counts > 0).sum()))


def experts_layer(gemm, x, order, gates, offsets, gate_up, down):
    """One MoE layer's expert part: gather, gate/up, SwiGLU, down, weighted scatter."""
    rows = x.index_select(0, order)
    h = gemm(rows, gate_up, offsets)
    width = h.shape[1] // 2
    h = (torch.nn.functional.silu(h[:, :width].float()) * h[:, width:].float()).to(x.dtype)
    y = gemm(h, down, offsets)
    out = torch.zeros_like(x, dtype=torch.float32)
    out.index_add_(0, order, y.float() * gates[:, None])
    return out


def _rotating(gemm, sets, gate_up, down):
    """A step that runs the layer on the next token set each call (inputs not cache-hot)."""
    turns = itertools.cycle(sets)

    def step():
        experts_layer(gemm, *next(turns)[:4], gate_up, down)
    return step


def _grouped_mm_bf16(rows, weight, offsets):
    return torch._grouped_mm(rows, weight.data[0].transpose(1, 2), offs=offsets[1:])


def _triton(cfg: KernelConfig):
    return lambda rows, weight, offsets: grouped_matmul(rows, weight, offsets, config=cfg)


def _twin(rows, weight, offsets):
    return grouped_matmul_ref(rows, weight, offsets).to(torch.bfloat16)


def _graph_row(row: dict, fn, sets, gate_up, down, eager_out, graph_timer) -> None:
    """The layer with `fn`'s GEMMs replayed as CUDA graphs (one per token set, captured once
    after a warm-up on a side stream) into row: graph_us, graph_over_roofline, and the replayed
    output against the eager one (graph_bitwise: the scatter back to the tokens adds fp32
    rows with atomics, whose order may differ between runs, so equality is not promised;
    graph_rel_err); on the CPU graph_skipped says why not."""
    if graph_timer is None:
        row["graph_skipped"] = GRAPHS_OFF_CPU
        return

    def call(x, order, gates, offsets, *_):
        return experts_layer(fn, x, order, gates, offsets, gate_up, down)
    try:
        res = time_graph(call, sets, graph_timer, eager_out)
    except Exception as exc:  # noqa: BLE001 - a capture that fails is reported
        row["graph_skipped"] = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
        return
    row["graph_bitwise"], row["graph_rel_err"] = res["bitwise"], res["rel_err"]
    if res["rel_err"] > 1e-3:
        row["graph_skipped"] = f"replayed output differs from eager (rel err {res['rel_err']:.2e})"
        return
    row["graph_us"] = res["seconds"] * 1e6
    row["graph_over_roofline"] = row["graph_us"] / row["roofline_us"]


def run_shape(name, spec, tokens_list, device, ceilings, repeats, gen, configs, trials,
              graph_timer=None):
    experts, top_k, hidden, width, shipped = spec
    rows_out = []
    for fmt in ("bf16", shipped):
        gate_up = random_packed(experts, 2 * width, hidden, fmt, device, seed=1)
        down = random_packed(experts, hidden, width, fmt, device, seed=2)
        # one Triton variant per MXFP4 decode (each with its best config), one per other format
        if fmt == "mxfp4":
            variants = {f"triton mxfp4 {d}": d for d in dict.fromkeys(c[5] for c in configs[fmt])}
        else:
            variants = {f"triton {fmt}": fmt}
        if fmt == "bf16" and device == "cuda" and hasattr(torch, "_grouped_mm"):
            variants["torch._grouped_mm bf16"] = _grouped_mm_bf16
        for tokens in tokens_list:
            sets = [routed(tokens, experts, top_k, hidden, device, gen) for _ in range(4)]
            x, order, gates, offsets, active = sets[0]
            # correctness on fresh inputs, against the fp32 twin of the same packed weights
            ref = experts_layer(_twin, x, order, gates, offsets, gate_up, down)
            for label, gemm in list(variants.items()):
                if isinstance(gemm, str):  # the Triton kernel: every config of the variant
                    cfgs = [kernel_config(c, fmt) for c in configs[fmt]
                            if fmt != "mxfp4" or c[5] == gemm]
                    candidates = [(config_label(c, fmt), _triton(c)) for c in cfgs]
                else:
                    candidates = [(None, gemm)]
                best = None
                for block, fn in candidates:
                    trial = {"shape": name, "tokens": tokens, "variant": label, "config": block}
                    trials.append(trial)
                    try:
                        got = experts_layer(fn, x, order, gates, offsets, gate_up, down)
                        err = float((got - ref).norm() / ref.norm())
                        trial["rel_error"] = err
                        if not err <= MAX_REL_ERROR:
                            trial["error"] = f"rel. error {err:.2e} over {MAX_REL_ERROR}"
                            continue
                        ms = _time(_rotating(fn, sets, gate_up, down), repeats=repeats,
                                   warmup=0 if repeats <= 2 else 3)
                    except Exception as exc:  # noqa: BLE001 - a config that fails is reported
                        trial["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        print(f"{name} T={tokens} {label} {block}: {trial['error']}", flush=True)
                        continue
                    trial["median_us"] = ms * 1e3
                    if best is None or ms < best[1]:
                        best = (block, ms, err, fn, got)
                if best is None:  # every config failed: in the trials table, not fatal
                    print(f"{name} T={tokens} {label}: no config ran correctly", flush=True)
                    continue
                block, ms, err, best_fn, best_out = best
                weights = 3 * active * weight_bytes(fmt, width, hidden)
                acts = 2 * top_k * tokens * (hidden + 2 * width) * 2
                flops = 2 * top_k * tokens * 3 * hidden * width
                floor_s = max((weights + acts) / ceilings["hbm_bytes_per_s"],
                              flops / ceilings["bf16_flops"])
                row = {"shape": name, "tokens": tokens, "variant": label, "format": fmt,
                       "config": block, "median_us": ms * 1e3, "rel_error": err,
                       "active_experts": active, "weight_bytes": weights,
                       "roofline_us": floor_s * 1e6, "over_roofline": ms * 1e-3 / floor_s}
                with torch.no_grad():
                    _graph_row(row, best_fn, sets, gate_up, down, best_out, graph_timer)
                rows_out.append(row)
                graph = (f"graph {row['graph_us']:9.1f} us x{row['graph_over_roofline']:.2f}"
                         if "graph_us" in row else f"graph n/a ({row['graph_skipped'][:40]})")
                print(f"{name:13s} T={tokens:5d} {label:24s} {block} "
                      f"{ms * 1e3:9.1f} us  roofline {floor_s * 1e6:8.1f} us  "
                      f"x{row['over_roofline']:.2f}  err {err:.1e}  {graph}", flush=True)
    return rows_out


def model_check(device: str, tmp: Path) -> list[dict]:
    """Whole models with packed experts against the same models dequantized on load: random
    GPT-OSS (MXFP4 experts) and DeepSeek-V3 (FP8 projections) checkpoints in their release
    format, loaded with and without keep_format, in bf16 on `device` (on a GPU the packed
    experts run through the Triton kernel); relative error of the logits and expert bytes."""
    from probe.runtime.checkpoint import load_model
    from probe.runtime.random_checkpoint import RandomCheckpointSpec, write_random_checkpoint

    spec = RandomCheckpointSpec(num_layers=2, num_experts=16, top_k=4, hidden_size=256,
                                expert_width=256, num_heads=4, num_kv_heads=2)
    out = []
    for arch in ("gpt_oss", "deepseek_v3"):
        path = write_random_checkpoint(arch, tmp / arch, spec, weights="shipped",
                                       overwrite=True)
        ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
        dense = load_model(path, dtype=torch.bfloat16, device=device)
        packed = load_model(path, dtype=torch.bfloat16, device=device, keep_format=True)
        with torch.no_grad():
            want = dense(ids.to(device)).logits.float()
            got = packed(ids.to(device)).logits.float()
        gate_up, down = packed.moe_blocks[0].packed
        ref = dense.moe_blocks[0]
        dense_bytes = 2 * (ref.w_gate_up.numel() + ref.w_down.numel())
        out.append({"arch": arch, "format": gate_up.fmt,
                    "rel_error": float((got - want).norm() / want.norm()),
                    "packed_expert_bytes": gate_up.nbytes + down.nbytes,
                    "bf16_expert_bytes": dense_bytes})
        print(f"model check {arch}: {gate_up.fmt} experts, logits rel. error "
              f"{out[-1]['rel_error']:.2e} vs the dequantized bf16 model; expert bytes per layer "
              f"{out[-1]['packed_expert_bytes']} vs {dense_bytes} in bf16", flush=True)
    return out


def write_md(path: Path, rows: list[dict], ceilings: dict, device_name: str,
             trials: list[dict]) -> None:
    lines = [f"# MoE expert time by weight format ({device_name})", "",
             f"HBM {ceilings['hbm_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
             f"{ceilings['bf16_flops'] / 1e12:.0f} TFLOP/s, both measured in this run.", "",
             "Median us is the eager layer (host launches included); graph us is the same "
             "layer captured as CUDA graphs and replayed (no host launch overhead; = marks a "
             "replayed output bitwise equal to the eager one).", "",
             "| shape | tokens | variant | best config | median us | roofline us | x roofline "
             "| active experts | weight MB | rel. error | graph us | graph x roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "graph_us" in r:
            graph = (f"{r['graph_us']:.1f}{' =' if r['graph_bitwise'] else ''} | "
                     f"{r['graph_over_roofline']:.2f}")
        else:
            graph = "n/a | n/a"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['config']} | "
                     f"{r['median_us']:.1f} | {r['roofline_us']:.1f} | {r['over_roofline']:.2f} | "
                     f"{r['active_experts']} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['rel_error']:.1e} | {graph} |")
    skipped = sorted({r["graph_skipped"] for r in rows if "graph_skipped" in r})
    lines += ["", *(f"Graph replay: {why}" for why in skipped)] if skipped else []
    lines += ["", "Every config tried (BMxBNxBK/warps/stages, decode), median us or why not:", "",
              "| shape | variant | config | " + " | ".join(
                  f"T={t}" for t in sorted({t['tokens'] for t in trials})) + " |"]
    token_list = sorted({t["tokens"] for t in trials})
    lines.append("|---|---|---|" + "---|" * len(token_list))
    keys = list(dict.fromkeys((t["shape"], t["variant"], t["config"]) for t in trials))
    for key in keys:
        cells = []
        for tokens in token_list:
            hit = [t for t in trials if (t["shape"], t["variant"], t["config"]) == key
                   and t["tokens"] == tokens]
            if not hit:
                cells.append("")
            elif "median_us" in hit[0]:
                cells.append(f"{hit[0]['median_us']:.1f}")
            else:
                cells.append(hit[0].get("error", "?")[:60].replace("|", "/"))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Manifest.start("experiments.runtime.quant_layer", argv, out=args.out)
    gen = torch.Generator().manual_seed(0)
    ceilings = measure_ceilings(args.device)
    if args.device == "cpu":  # nominal H200 ceilings, only so the smoke run fills the table
        ceilings = {"hbm_bytes_per_s": 4.8e12, "bf16_flops": 989e12}
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = (16,) if args.quick else TOKENS
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    repeats = 1 if args.quick else args.repeats
    graph_timer = (Timer(torch.device("cuda"), warmup=2, repeats=min(repeats, 10))
                   if args.device == "cuda" else None)
    rows, trials = [], []
    t_start = time.perf_counter()
    for name, spec in shapes.items():
        rows += run_shape(name, spec, tokens, args.device, ceilings, repeats, gen, configs,
                          trials, graph_timer)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        models = model_check(args.device, Path(tmp))
    result = {"device": device_name, "ceilings": ceilings, "rows": rows, "trials": trials,
              "model_check": models, "seconds_total": time.perf_counter() - t_start}
    json_path = args.out / "quant_layer.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path = args.out / "quant_layer.md"
    write_md(md_path, rows, ceilings, device_name, trials)
    with md_path.open("a") as md:
        md.write("\nWhole models, packed experts against the same model dequantized on load "
                 "(bf16 logits):\n\n| model | format | logits rel. error | expert bytes / layer "
                 "| bf16 bytes |\n|---|---|---|---|---|\n")
        for m in models:
            md.write(f"| {m['arch']} | {m['format']} | {m['rel_error']:.2e} | "
                     f"{m['packed_expert_bytes']} | {m['bf16_expert_bytes']} |\n")
    run.write(args.out, [json_path, md_path], name="quant_layer.manifest.json")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
