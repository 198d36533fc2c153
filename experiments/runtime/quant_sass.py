"""What the grouped GEMM's K loop costs per weight, per MXFP4 decode and kernel config, read
from its sm_90 machine code: no GPU needed.

    python -m experiments.runtime.quant_sass --out DIR            (every quant_layer config)
    python -m experiments.runtime.quant_sass --out DIR --quick    (one config per variant)

For each config of experiments/runtime/quant_layer.py (MXFP4, and its bf16 and FP8 configs for
comparison) it compiles probe.runtime.quant_gemm's kernel for sm_90 as gpt-oss-120b's gate/up
projection launches it (K 2880, x rows gathered through the index, a bias), disassembles it
with Triton's bundled cuobjdump and finds the K loop (the largest backward branch around an
MMA instruction). Reported per config:

- registers per thread, stack bytes (spills), shared memory per program;
- the loop's SASS instructions per weight (loop length x threads / (BN x BK): every thread
  runs the loop once per K step) and their mix: integer (LOP3, IMAD, SHF, PRMT, IADD3, SEL,
  ISETP, ...), conversions (F2F, F2FP, and HADD2.F32, sm_90's fp16 -> fp32), float (FMUL,
  FFMA, HMUL2 ...), shared memory (STS, LDS, LDSM), barriers and fences, MMA (HGMMA wgmma,
  HMMA mma.sync), uniform-datapath (U*) and the rest. With row tiles (R > 1) the loop holds
  the MMA of every sub-tile, which runs only where the sub-tile has rows: the same config is
  also compiled with R = 1, and the loop is split into that one-tile part (the decode, one
  sub-tile's loads and MMA) and the mean cost of each further sub-tile;
- the bytes one program loads per K step: packed weights, block exponents / scales, x rows;
- an issue-bound time of gpt-oss-120b's two expert GEMMs at 256 / 768 / 1536 tokens (the
  quant_layer router's first token set): the weights each program decodes (its expert's
  BM x R-row tiles, each decodes its N x K weights once) x the one-tile loop's instructions
  per weight, plus each further sub-tile with rows x its instructions per weight,
  over one warp instruction per SM sub-partition per cycle (132 SMs x 4 x 32 lanes at
  --clock-ghz). A floor for ALU-bound decoding, not a prediction: integer logic, shifts and
  permutes issue at half rate on Hopper, and loads, MMA and the loop's prologue are left out.
  Next to it, the MXFP4 weight bytes over --hbm-tbps (default: the H100's copy bandwidth
  measured in results/h100/quant_layer), which is quant_layer's roofline less the activations.

Writes quant_sass.json, quant_sass.md and a manifest into --out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from experiments.manifest import Manifest
from experiments.runtime.quant_layer import CONFIGS, SHAPES, TOKENS, kernel_config, routed
from probe.runtime import quant_gemm
from probe.runtime.quant_gemm import KernelConfig
from probe.specs import FP8_BLOCK, MXFP4_BLOCK, weight_bytes

HIDDEN = 2880  # gpt-oss-120b: the gate/up GEMM's K, the down GEMM's K and N
GATE_UP_N = 5760
KINDS = {  # SASS opcode (before the first ".") -> kind
    "integer": {"LOP3", "IMAD", "SHF", "PRMT", "IADD3", "SEL", "ISETP", "LEA", "VIADD",
                "VIMNMX", "IABS", "MOV", "PLOP3", "SGXT", "BMSK", "LOP", "IMNMX", "SHL",
                "SHR", "P2R", "R2P", "POPC", "FLO", "BREV", "IDP", "I2IP"},
    "convert": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"},
    "float": {"FMUL", "FFMA", "FADD", "HMUL2", "HFMA2", "HADD2", "FMNMX", "FSEL", "FSETP",
              "HMNMX2"},
    "shared": {"STS", "LDS", "LDSM", "STSM"},
    "global": {"LDG", "LDGSTS", "STG", "LDGDEPBAR", "RED", "ATOM", "UBLKCP", "UTMALDG"},
    "sync": {"BAR", "DEPBAR", "MEMBAR", "FENCE", "WARPGROUP", "WARPSYNC", "ERRBAR",
             "SYNCS", "CCTL"},
    "mma": {"HGMMA", "HMMA", "QGMMA", "IMMA"},
}
SMS, SUBPARTITIONS, LANES = 132, 4, 32
H100_COPY_TBPS = 2.96  # results/h100/quant_layer: bytes read + written per second, measured


def _compile(cfg: KernelConfig, fmt: str):
    """The kernel compiled for sm_90 as gpt-oss-120b's gate/up GEMM launches it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types, aligned = quant_gemm.kernel_arg_types(fmt, index="*i32")
    constants = quant_gemm.kernel_constants(fmt, cfg, 128, HIDDEN, gather=True, bias=True)
    signature = {**types, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(quant_gemm._grouped_kernel, signature, constants, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _cuobjdump(cubin: bytes, *args: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([tool, *args, path], capture_output=True, text=True,
                              check=True).stdout


def k_loop(sass: str) -> list[str]:
    """The instructions of the largest backward branch's body that holds an MMA (the K loop),
    from cuobjdump -sass text; [] if there is none."""
    code = []
    for line in sass.splitlines():
        hit = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if hit:
            code.append((int(hit.group(1), 16), hit.group(2).strip()))
    index = {addr: i for i, (addr, _) in enumerate(code)}
    best: list[str] = []
    for i, (addr, text) in enumerate(code):
        target = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target is None:
            continue
        start = int(target.group(1), 16)
        if start <= addr and start in index:
            body = [t for _, t in code[index[start]:i + 1]]
            if any(_opcode(t) in KINDS["mma"] for t in body) and len(body) > len(best):
                best = body
    return best


def _opcode(instruction: str) -> str:
    words = instruction.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def mix(body: list[str]) -> dict[str, int]:
    """Instructions of `body` by kind (KINDS; "uniform" for U* opcodes, else "other")."""
    counts: collections.Counter[str] = collections.Counter()
    for instruction in body:
        op = _opcode(instruction)
        if op == "HADD2" and ".F32" in instruction:
            kind = "convert"  # sm_90's fp16 -> fp32 conversion
        else:
            kind = next((k for k, ops in KINDS.items() if op in ops),
                        "uniform" if op.startswith("U") else "other")
        counts[kind] += 1
    return dict(counts)


def step_bytes(cfg: KernelConfig, fmt: str) -> dict[str, int]:
    """Bytes one program loads per K step: packed weights, scales, x rows (R x BM)."""
    n, k = cfg.block_n, cfg.block_k
    weights = {"mxfp4": n * k // 2, "fp8_block": n * k, "bf16": 2 * n * k}[fmt]
    scales = {"mxfp4": n * k // MXFP4_BLOCK, "fp8_block": 4 * math.ceil(n / FP8_BLOCK),
              "bf16": 0}[fmt]
    return {"weights": weights, "scales": scales, "x": 2 * cfg.row_tiles * cfg.block_m * k}


def decoded_weights(counts: list[int], rows_per_program: int) -> int:
    """Weights decoded by gpt-oss-120b's gate/up and down GEMMs: every program decodes its
    N x K weights once for its expert's rows_per_program rows."""
    programs = sum(-(-c // rows_per_program) for c in counts)
    return programs * (GATE_UP_N * HIDDEN + HIDDEN * HIDDEN)


def extra_subtiles(counts: list[int], block_m: int, row_tiles: int) -> int:
    """Sub-tiles with rows beyond each program's first, over both GEMMs' programs, in units
    of one GEMM pair's N x K weights (each such sub-tile runs its loads and MMA over them)."""
    tiles = sum(-(-c // block_m) for c in counts)
    programs = sum(-(-c // (block_m * row_tiles)) for c in counts)
    return tiles - programs


def token_counts(tokens_list) -> dict[int, list[int]]:
    """Rows per expert of gpt-oss-120b's MXFP4 runs in quant_layer (the first of the 4 token
    sets per token count, drawn after the bf16 runs' sets from the same generator)."""
    experts, top_k, hidden, _, _ = SHAPES["gpt-oss-120b"]
    gen = torch.Generator().manual_seed(0)
    out = {}
    for fmt in ("bf16", "mxfp4"):
        for tokens in tokens_list:
            sets = [routed(tokens, experts, top_k, hidden, "cpu", gen) for _ in range(4)]
            if fmt == "mxfp4":
                offsets = sets[0][3]
                out[tokens] = (offsets[1:] - offsets[:-1]).tolist()
    return out


def analyse(fmt: str, cfg: KernelConfig, counts: dict[int, list[int]], clock_ghz: float,
            hbm_tbps: float) -> dict:
    kernel = _compile(cfg, fmt)
    usage = _cuobjdump(kernel.asm["cubin"], "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    body = k_loop(_cuobjdump(kernel.asm["cubin"], "-sass"))
    threads = cfg.num_warps * 32
    per_weight = len(body) * threads / (cfg.block_n * cfg.block_k)
    one_tile, per_subtile = per_weight, 0.0  # the loop's one-tile part, each further sub-tile
    if cfg.row_tiles > 1:
        single = _compile(dataclasses.replace(cfg, row_tiles=1), fmt)
        one_tile = (len(k_loop(_cuobjdump(single.asm["cubin"], "-sass"))) * threads
                    / (cfg.block_n * cfg.block_k))
        per_subtile = (per_weight - one_tile) / (cfg.row_tiles - 1)
    row = {"format": fmt, "config": cfg.label(), "decode": cfg.mxfp4_decode if fmt == "mxfp4"
           else (cfg.fp8_scale if fmt == "fp8_block" else None),
           "registers": int(regs.group(1)) if regs else None,
           "stack_bytes": int(stack.group(1)) if stack else None,
           "shared_bytes": kernel.metadata.shared, "loop_instructions": len(body),
           "per_weight": per_weight, "one_tile_per_weight": one_tile,
           "per_subtile_per_weight": per_subtile,
           "mix_per_weight": {k: v * threads / (cfg.block_n * cfg.block_k)
                              for k, v in sorted(mix(body).items())},
           "step_bytes": step_bytes(cfg, fmt), "estimate": {}}
    lanes_per_s = SMS * SUBPARTITIONS * LANES * clock_ghz * 1e9
    experts = SHAPES["gpt-oss-120b"][0]
    for tokens, per_expert in counts.items():
        weights = decoded_weights(per_expert, cfg.block_m * cfg.row_tiles)
        subtiles = extra_subtiles(per_expert, cfg.block_m, cfg.row_tiles)
        instructions = (weights * one_tile
                        + subtiles * (GATE_UP_N * HIDDEN + HIDDEN * HIDDEN) * per_subtile)
        active = sum(c > 0 for c in per_expert)
        stream = 3 * active * weight_bytes(fmt, HIDDEN, HIDDEN) / (hbm_tbps * 1e12)
        row["estimate"][tokens] = {"decoded_weights": weights, "extra_subtiles": subtiles,
                                   "issue_bound_us": instructions / lanes_per_s * 1e6,
                                   "weight_stream_us": stream * 1e6, "active_experts": active,
                                   "experts": experts}
    return row


def write_md(path: Path, rows: list[dict], clock_ghz: float, hbm_tbps: float) -> None:
    tokens = sorted({int(t) for r in rows for t in r["estimate"]})
    kinds = ["integer", "convert", "float", "shared", "sync", "mma", "uniform", "global"]
    import triton

    lines = ["# Grouped GEMM K loop per weight, sm_90 machine code (gpt-oss-120b gate/up launch)",
             "", "Static counts read from the compiled code on a machine without a GPU: "
             "no kernel ran, none of these numbers is a GPU timing.", "",
             f"Compiled by Triton {triton.__version__} and its ptxas. Issue bound: "
             f"decoded weights x the one-tile loop instructions per weight, plus the further "
             f"sub-tiles with rows x theirs, over "
             f"{SMS} SMs x {SUBPARTITIONS} x {LANES} lanes at {clock_ghz} GHz; weight stream: "
             f"the format's bytes of the active experts over {hbm_tbps} TB/s.", "",
             "The loop's instructions per weight count every sub-tile's MMA (R > 1 row "
             "tiles); the next two columns split them into the one-tile part (the same "
             "config compiled with R = 1) and each further sub-tile, which runs only where "
             "it has rows (/pk: permute_k, the decoded tile in wgmma's register layout).",
             "",
             "| format | decode | config | regs | stack | smem KB | loop instr / weight | "
             "one tile | per further sub-tile | "
             + " | ".join(kinds) + " | bytes / step (w, scales, x) | "
             + " | ".join(f"T={t} issue us / stream us" for t in tokens) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|"
             + "---|" * len(tokens)]
    for r in rows:
        m = r["mix_per_weight"]
        b = r["step_bytes"]
        est = " | ".join(f"{r['estimate'][t]['issue_bound_us']:.0f} / "
                         f"{r['estimate'][t]['weight_stream_us']:.0f}" for t in tokens)
        lines.append(f"| {r['format']} | {r['decode'] or ''} | {r['config']} | "
                     f"{r['registers']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{r['per_weight']:.2f} | {r['one_tile_per_weight']:.2f} | "
                     f"{r['per_subtile_per_weight']:.2f} | "
                     + " | ".join(f"{m.get(k, 0):.2f}" for k in kinds)
                     + f" | {b['weights']}, {b['scales']}, {b['x']} | {est} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true",
                        help="one config per variant (portable, bits, lut, bf16, FP8)")
    parser.add_argument("--clock-ghz", type=float, default=1.755,
                        help="SM clock of the issue-bound estimate (default 1.755: an "
                             "assumed H100 clock under load, not a measured one)")
    parser.add_argument("--hbm-tbps", type=float, default=H100_COPY_TBPS,
                        help="bandwidth of the weight-stream column, TB/s (default 2.96: the "
                             "H100's copy bandwidth measured in results/h100/quant_layer)")
    args = parser.parse_args(argv)
    if args.clock_ghz <= 0 or args.hbm_tbps <= 0:
        parser.error("--clock-ghz and --hbm-tbps must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Manifest.start("experiments.runtime.quant_sass", argv, out=args.out)
    specs = [(fmt, spec) for fmt in ("mxfp4", "bf16", "fp8_block") for spec in CONFIGS[fmt]]
    if args.quick:
        wanted = {("mxfp4", "portable"), ("mxfp4", "bits"), ("mxfp4", "lut"), ("bf16", None),
                  ("fp8_block", "product")}
        picked, seen = [], set()
        for fmt, spec in specs:
            key = (fmt, spec[5] if len(spec) > 5 and isinstance(spec[5], str) else None)
            if key in wanted and key not in seen:
                seen.add(key)
                picked.append((fmt, spec))
        specs = picked
    counts = token_counts(TOKENS)
    rows = []
    t_start = time.perf_counter()
    for fmt, spec in specs:
        cfg = kernel_config(spec, fmt)
        try:
            row = analyse(fmt, cfg, counts, args.clock_ghz, args.hbm_tbps)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
            row = {"format": fmt, "config": cfg.label(), "error": f"{type(exc).__name__}: "
                                                                   f"{str(exc)[:300]}"}
            print(f"{fmt} {cfg.label()}: {row['error']}", flush=True)
            continue
        rows.append(row)
        est = "  ".join(f"T={t}: {e['issue_bound_us']:.0f}/{e['weight_stream_us']:.0f} us"
                        for t, e in row["estimate"].items())
        print(f"{fmt:9s} {row['decode'] or '':10s} {row['config']:24s} regs {row['registers']:3d} "
              f"stack {row['stack_bytes']:4d}  {row['per_weight']:5.2f} instr/weight  {est}",
              flush=True)
    import triton

    result = {"triton": triton.__version__, "clock_ghz": args.clock_ghz,
              "hbm_tbps": args.hbm_tbps, "rows": rows,
              "seconds_total": time.perf_counter() - t_start}
    json_path = args.out / "quant_sass.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path = args.out / "quant_sass.md"
    write_md(md_path, rows, args.clock_ghz, args.hbm_tbps)
    run.write(args.out, [json_path, md_path], name="quant_sass.manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
