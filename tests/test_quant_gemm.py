"""The Triton grouped GEMM over packed expert weights, against its slow twin, on CPU through
Triton's interpreter (run in a subprocess: TRITON_INTERPRET must be set before the kernel is
defined)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from probe.runtime.quant import PackedWeight  # noqa: E402
from probe.runtime.quant_gemm import grouped_matmul_ref, tile_schedule  # noqa: E402

_CHECK = r"""
import json, sys, torch
from probe.runtime.quant import PackedWeight
from probe.runtime.quant_gemm import KernelConfig, grouped_matmul, grouped_matmul_ref
errors = []
for seed in range(6):
    g = torch.Generator().manual_seed(seed)
    num_experts = int(torch.randint(1, 6, (1,), generator=g))
    n = int(torch.randint(1, 5, (1,), generator=g)) * 24
    k = int(torch.randint(1, 6, (1,), generator=g)) * 64
    counts = torch.randint(0, 40, (num_experts,), generator=g)
    counts[0] = 0 if seed % 2 else counts[0]  # an expert with no rows
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    x = torch.randn(int(counts.sum()), k, generator=g).to(torch.bfloat16)
    w = torch.randn(num_experts, n, k, generator=g) * 0.1
    for fmt in ("bf16", "mxfp4", "fp8_block"):
        packed = PackedWeight.pack(w, fmt)
        out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16)
        # BK 64 and 128 (a partial last step where 128 does not divide K), both FP8 scalings
        # R = 1, 2, 4 row tiles per program (sub-tiles past an expert's rows skipped), tiles
        # computed transposed on odd seeds
        cfg = KernelConfig(block_m=16, block_n=16, block_k=64 if seed % 2 else 128,
                           fp8_scale="product" if seed % 3 else "weights",
                           row_tiles=(1, 2, 4)[seed % 3], swap_ab=bool(seed % 2))
        bias = torch.randn(num_experts, n, generator=g) if seed % 2 == 0 else None
        grouped_matmul(x, packed, offsets, config=cfg, bias=bias, out=out)
        # the twin on the weights as the kernel sees them (bf16), in fp32
        bf = PackedWeight("fp32", packed.shape, (packed.dense().to(torch.bfloat16).float(),))
        ref = grouped_matmul_ref(x, bf, offsets, bias)
        err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        errors.append([seed, fmt, err, bool(torch.isnan(out).any())])
        if fmt == "mxfp4":  # the other decodes, each on its own launch
            for decode in ("spread", "dot_scaled", "bits", "lut"):
                out.fill_(float("nan"))
                grouped_matmul(x, packed, offsets, out=out, bias=bias,
                               config=KernelConfig(block_m=16, block_n=16, block_k=cfg.block_k,
                                                   mxfp4_decode=decode,
                                                   row_tiles=cfg.row_tiles,
                                                   swap_ab=cfg.swap_ab))
                err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                errors.append([seed, f"mxfp4 {decode}", err, bool(torch.isnan(out).any())])
        # rows gathered by the kernel from x in token order (the permutation fused)
        tokens = torch.randperm(x.shape[0], generator=g)
        x_tok = torch.empty_like(x).index_copy_(0, tokens, x)  # x == x_tok[tokens]
        out.fill_(float("nan"))
        grouped_matmul(x_tok, packed, offsets, config=cfg, bias=bias, out=out,
                       x_index=tokens.to(torch.int32))
        err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        errors.append([seed, f"{fmt} x_index", err, bool(torch.isnan(out).any())])
json.dump(errors, sys.stdout)
"""


def test_kernel_matches_the_twin_in_every_format():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(errors) == 6 * (3 + 4 + 3)
    assert {fmt for _, fmt, _, _ in errors} == {
        "bf16", "mxfp4", "fp8_block", "mxfp4 spread", "mxfp4 dot_scaled", "mxfp4 bits",
        "mxfp4 lut", "bf16 x_index", "mxfp4 x_index", "fp8_block x_index"}
    for seed, fmt, err, has_nan in errors:
        assert not has_nan, (seed, fmt)  # every output row written
        # bf16 output rounding; fp8 weights are scaled then rounded to bf16 in the kernel,
        # which the interpreter may truncate rather than round: twice the error at most
        assert err < (1e-2 if fmt.startswith("fp8_block") else 4e-3), (seed, fmt, err)


def test_tile_schedule_covers_every_row_once():
    offsets = torch.tensor([0, 0, 5, 70, 73, 200], dtype=torch.int32)
    expert, row0 = tile_schedule(offsets, 200, 32)
    assert expert.numel() == 7 + 5
    covered = torch.zeros(200, dtype=torch.int64)
    for e, r in zip(expert.tolist(), row0.tolist(), strict=True):
        if e < 0:
            continue
        end = int(offsets[e + 1])
        assert int(offsets[e]) <= r < end
        covered[r:min(r + 32, end)] += 1
    assert torch.equal(covered, torch.ones(200, dtype=torch.int64))


def test_twin_dequantizes_each_format():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(2, 8, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    for fmt in ("mxfp4", "fp8_block"):
        packed = PackedWeight.pack(w, fmt)
        y = grouped_matmul_ref(x, packed, offsets)
        dense = packed.dense()
        assert torch.allclose(y[:2], x[:2] @ dense[0].T)
        assert torch.allclose(y[2:], x[2:] @ dense[1].T)
    with pytest.raises(ValueError, match=r"offsets must be \[E \+ 1\]"):
        grouped_matmul_ref(x, PackedWeight.pack(w, "bf16"), offsets[:2])
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        grouped_matmul_ref(x[:, :32], PackedWeight.pack(w, "bf16"), offsets)


def test_quant_layer_benchmark_runs_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "experiments.runtime.quant_layer", "--device",
                          "cpu", "--quick", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "quant_layer.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {
        "triton bf16", "triton mxfp4 portable", "triton mxfp4 spread", "triton mxfp4 dot_scaled",
        "triton mxfp4 bits", "triton mxfp4 lut", "triton fp8_block"}
    assert all(r["rel_error"] < 3e-2 for r in rows)
    # graph replay is CUDA only: each row says so, and the .md too
    assert all("graph_us" not in r and "CUDA graphs need a CUDA device" in r["graph_skipped"]
               for r in rows)
    assert "Graph replay: not graph-timed" in (tmp_path / "quant_layer.md").read_text()
    trials = json.loads((tmp_path / "quant_layer.json").read_text())["trials"]
    assert len(trials) == 10 and all(t["median_us"] > 0 and "error" not in t for t in trials)
    assert {"16x64x128/w4/s1/r2 portable", "16x64x128/w4/s1/swap spread",
            "16x64x128/w4/s1/r2 bits", "16x64x128/w4/s1/swap lut",
            "16x64x128/w4/s1/swap/pk bits"} <= {
        t["config"] for t in trials}
    assert "Every config tried" in (tmp_path / "quant_layer.md").read_text()
    assert (tmp_path / "quant_layer.manifest.json").exists()


def test_kernel_config_names_its_choices():
    from probe.runtime.quant_gemm import KernelConfig

    assert KernelConfig(mxfp4_decode="dot_scaled").mxfp4_decode == "dot_scaled"
    assert KernelConfig(row_tiles=4).label() == "64x128x64/w4/s3/r4"
    assert KernelConfig(swap_ab=True).label() == "64x128x64/w4/s3/swap"
    assert KernelConfig(block_m=16, swap_ab=True, mxfp4_decode="lut",
                        permute_k=True).label() == "16x128x64/w4/s3/swap/pk"
    with pytest.raises(ValueError, match="permute_k needs swap_ab"):
        KernelConfig(mxfp4_decode="lut", permute_k=True)  # not transposed
    with pytest.raises(ValueError, match="permute_k needs swap_ab"):
        KernelConfig(swap_ab=True, mxfp4_decode="lut", permute_k=True, num_warps=8)
    with pytest.raises(ValueError, match="permute_k needs swap_ab"):
        KernelConfig(swap_ab=True, permute_k=True)  # "portable" decodes no words
    with pytest.raises(TypeError, match="permute_k must be a bool"):
        KernelConfig(permute_k=1)
    with pytest.raises(TypeError, match="swap_ab must be a bool"):
        KernelConfig(swap_ab=1)
    with pytest.raises(ValueError, match="row_tiles must be 1, 2 or 4, got 3"):
        KernelConfig(row_tiles=3)
    assert KernelConfig(mxfp4_decode="lut").mxfp4_decode == "lut"
    with pytest.raises(ValueError, match=r"mxfp4_decode must be one of \['bits', 'dot_scaled', "
                                         r"'lut', 'portable', 'spread'\], got 'ptx'"):
        KernelConfig(mxfp4_decode="ptx")


def _run_ptx_program(program, word: int, mult: int) -> list[int]:
    """The uint32 outputs $0..$3 of an `E2M1_LUT_PROGRAM`-style op list on one word, each op
    as the PTX ISA defines it (prmt in its default mode: selector nibble k picks byte k from
    {b, a}, its bit 3 replicating the picked byte's sign bit; mul: a bf16x2 product)."""
    regs = {"$4": word, "$5": mult}

    def val(a):
        return a if isinstance(a, int) else regs[a]

    def bf16x2_mul(a, b):
        halves = [torch.tensor([x & 0xFFFF, x >> 16], dtype=torch.int32).to(torch.int16)
                  .view(torch.bfloat16).float() for x in (a, b)]
        out = (halves[0] * halves[1]).to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
        return int(out[0]) | int(out[1]) << 16

    for op, dst, *src in program:
        a = [val(x) for x in src]
        if op == "mov":
            out = a[0]
        elif op == "and":
            out = a[0] & a[1]
        elif op == "shr":
            out = a[0] >> a[1]
        elif op == "shl":
            out = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "andor":
            out = (a[0] & a[1]) | a[2]
        elif op == "prmt":
            pool = (a[1] << 32 | a[0]).to_bytes(8, "little")
            out = 0
            for k in range(4):
                sel = (a[2] >> 4 * k) & 0xF
                byte = pool[sel & 7]
                if sel & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * k
        else:
            assert op == "mul", op
            out = bf16x2_mul(a[0], a[1])
        regs[dst] = out
    return [regs[f"${j}"] for j in range(4)]


def test_lut_ptx_program_gives_the_bf16_of_every_code():
    """The "lut" decode's PTX (which the interpreter cannot run) as a program in numpy: every
    byte value in every byte of the word, times scales 2^-3, 1 and 2^5, gives each code's
    exact bf16 (low nibble in the pair's low half), as the twin's dequantization does."""
    from probe.runtime.quant import dequantize_mxfp4
    from probe.runtime.quant_gemm import E2M1_LUT_PROGRAM, _ptx

    assert _ptx(E2M1_LUT_PROGRAM).count("prmt.b32") == 10  # the PTX text holds the same ops
    gen = torch.Generator().manual_seed(4)
    words = [b * 0x01010101 for b in range(256)]
    words += [int(w) for w in torch.randint(0, 2 ** 32, (64,), generator=gen)]
    for scale in (124, 127, 132):
        mult = (scale << 7) * 0x10001
        for word in words:
            blocks = torch.tensor(list(word.to_bytes(4, "little")) + [0] * 12,
                                  dtype=torch.uint8).reshape(1, 16)
            want = dequantize_mxfp4(blocks, torch.tensor([scale], dtype=torch.uint8))[:8]
            bits = want.to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
            got = _run_ptx_program(E2M1_LUT_PROGRAM, word, mult)
            assert got == [int(bits[2 * j]) | int(bits[2 * j + 1]) << 16 for j in range(4)], \
                (hex(word), scale)


_EXACT = r"""
import json, sys, torch
from probe.runtime.quant import PackedWeight
from probe.runtime.quant_gemm import KernelConfig, grouped_matmul
# every code in every row, block exponents across what "bits" keeps exact (65..191)
codes = torch.arange(16, dtype=torch.uint8)
blocks = (codes | (codes.roll(3) << 4)).repeat(16, 2, 1)  # [N 16, groups 2, 16 bytes]
for n in range(16):
    blocks[n] = blocks[n].roll(n, dims=-1)
scales = torch.tensor([65, 80, 100, 120, 127, 140, 160, 191], dtype=torch.uint8)
scales = scales.repeat(4)[:32].reshape(16, 2)
packed = PackedWeight("mxfp4", (1, 16, 64), (blocks[None], scales[None]))
dense = packed.dense()[0]  # [16, 64] fp32, exact in bf16
x = torch.eye(64, dtype=torch.bfloat16)  # row m picks weight column m: y = W^T exactly
offsets = torch.tensor([0, 64], dtype=torch.int32)
result = {}
for decode in ("portable", "bits", "lut"):
    cfg = KernelConfig(block_m=16, block_n=16, block_k=64, mxfp4_decode=decode)
    y = grouped_matmul(x, packed, offsets, config=cfg).float()
    result[decode] = bool(torch.equal(y, dense.T))
json.dump(result, sys.stdout)
"""


def test_bits_decode_is_exact_for_block_exponents_65_to_191():
    """"bits" builds code x 2^-126 and multiplies by 2^(scale - 64), undoing 2^-63 on the
    product: every code at exponents 65..191 comes out exactly (one-hot rows of x read the
    weights back), as from the e4m3 decode."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _EXACT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "portable": True, "bits": True, "lut": True}


_PERMUTED = r"""
import json, sys, torch
from experiments.runtime.quant_layer import CONFIGS, kernel_config
from probe.runtime.quant import PackedWeight
from probe.runtime.quant_gemm import KernelConfig, grouped_matmul, grouped_matmul_ref
result = {"exact": {}, "errors": {}}
# 1. exactness: every code in every row of 128, block exponents 65..191 ("bits" keeps them
# exact), x the identity: y = W^T bit for bit, so each decoded weight landed at its own
# (column, k) through the row and k permutations
codes = torch.arange(16, dtype=torch.uint8)
blocks = (codes | (codes.roll(5) << 4)).repeat(128, 4, 1)  # [N 128, groups 4, 16 bytes]
for n in range(128):
    blocks[n] = blocks[n].roll(n, dims=-1).roll(n // 16, dims=0)
scales = torch.tensor([65, 80, 100, 120, 127, 140, 160, 191], dtype=torch.uint8)
scales = scales.repeat(64)[:512].reshape(128, 4).roll(3, dims=0)
packed = PackedWeight("mxfp4", (1, 128, 128), (blocks[None], scales[None]))
dense = packed.dense()[0]  # [128, 128] fp32, exact in bf16
x = torch.eye(128, dtype=torch.bfloat16)
offsets = torch.tensor([0, 128], dtype=torch.int32)
for bm, bk, rows in ((16, 64, 1), (16, 64, 4), (32, 128, 2)):
    for decode in ("bits", "lut"):
        cfg = KernelConfig(block_m=bm, block_n=128, block_k=bk, mxfp4_decode=decode,
                           row_tiles=rows, swap_ab=True, permute_k=True)
        y = grouped_matmul(x, packed, offsets, config=cfg).float()
        result["exact"][f"{cfg.label()} {decode}"] = bool(torch.equal(y, dense.T))
# 2. every permute_k config that quant_layer times, and BN 64, against the twin: experts with
# 0, 37 and 70 rows (sub-tiles with and without rows), N and K not multiples of the tile
# (K 160: a masked last step), a bias, rows gathered through an index
g = torch.Generator().manual_seed(3)
counts = torch.tensor([0, 37, 70])
offsets = torch.zeros(4, dtype=torch.int32)
offsets[1:] = counts.cumsum(0)
x = torch.randn(int(counts.sum()), 160, generator=g).to(torch.bfloat16)
packed = PackedWeight.pack(torch.randn(3, 80, 160, generator=g) * 0.1, "mxfp4")
bias = torch.randn(3, 80, generator=g)
bf = PackedWeight("fp32", packed.shape, (packed.dense().to(torch.bfloat16).float(),))
ref = grouped_matmul_ref(x, bf, offsets, bias)
tokens = torch.randperm(x.shape[0], generator=g)
x_tok = torch.empty_like(x).index_copy_(0, tokens, x)  # x == x_tok[tokens]
cfgs = [kernel_config(s, "mxfp4") for s in CONFIGS["mxfp4"]]
cfgs = [c for c in cfgs if c.permute_k]
cfgs.append(KernelConfig(block_m=16, block_n=64, block_k=64, mxfp4_decode="bits",
                         row_tiles=2, swap_ab=True, permute_k=True))
for cfg in cfgs:
    out = torch.full((x.shape[0], 80), float("nan"), dtype=torch.bfloat16)
    grouped_matmul(x_tok, packed, offsets, config=cfg, bias=bias, out=out,
                   x_index=tokens.to(torch.int32))
    err = float((out.float() - ref).norm() / ref.norm())
    result["errors"][f"{cfg.label()} {cfg.mxfp4_decode}"] = [err, bool(torch.isnan(out).any())]
json.dump(result, sys.stdout)
"""


def test_permuted_k_configs_match_the_twin():
    """permute_k (the decoded tile relabelled into wgmma's register layout, x read in the same
    permuted k order, the weight rows loaded permuted): exact weights back through identity
    rows at BK 64 and 128 with 1, 2 and 4 row tiles, and every such quant_layer config within
    bf16 rounding of the twin with gathered rows, a bias and partial tiles."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _PERMUTED], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result["exact"]) == 6 and all(result["exact"].values()), result["exact"]
    assert len(result["errors"]) >= 7, result["errors"]  # 3 per decode in quant_layer, + 1
    for label, (err, has_nan) in result["errors"].items():
        assert not has_nan and err < 4e-3, (label, err)
