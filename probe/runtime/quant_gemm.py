"""Grouped GEMM over experts whose weights stay in MXFP4 or block-scaled FP8 (a Triton kernel).

    y[rows of expert e] = x[rows of expert e] @ W_e^T

x is bf16 [M, K] with its rows sorted by expert, `offsets` int32 [E + 1] the row where each
expert's tokens start (offsets[E] = M), W a `PackedWeight` [E, N, K] in "mxfp4" or "fp8_block"
(or "bf16"). Each program computes a BM x BN tile of one expert's rows: it reads its packed
weight tile (once per BM rows of the expert: experts with more rows re-read it, mostly from L2),
expands it to bf16 in registers and accumulates the product in fp32. The weights are never
expanded in memory, so the bytes read per expert are the format's own (17/32 of a byte per
weight for MXFP4, about 1 for FP8, against 2 for bf16).

With a few dozen rows per expert the kernel is bound by the weight stream and by the ALU work
per weight, since every weight is decoded once per BM-row tile of its expert
(`KernelConfig.row_tiles` lets one program cover several BM-row tiles of its expert with one
decode). MXFP4 at the HBM roofline asks an H100 for some 23 decoded weights per SM per cycle
(gpt-oss-120b: 3.1 G weights a layer in 571 us); with 4 x 32 lanes issuing one instruction
each per cycle that leaves about 5 instructions per weight in all, so the decode's instruction
count decides. Counts below are SASS instructions per weight in the K loop as Triton 3.6
compiles it for sm_90 (results/quant_sass). `KernelConfig.mxfp4_decode` picks the decode:

- "portable" / "spread": each e2m1 code (sign, 2 exponent bits, 1 mantissa bit) placed in an
  e4m3 byte, which the hardware converts (the value times 2^-6, the subnormal 0.5 included),
  then to fp32, times the block's power of two, rounded to bf16; on packed bytes, so every byte
  is taken apart and put together again: 10.7-11.8, and 3.8-6.2x the roofline measured on an
  H100.
- "dot_scaled": Triton's microscaled dot (bf16 x e2m1), its own decode: 8.3-9.6.
- "bits": the packed weights read as 32-bit words of 8 codes, each byte's two codes made into
  one bf16 pair (the code's bits in place: the value times 2^-126) by integer mask-multiply-
  adds on the whole pair, then one bf16x2 multiply by 2^(scale - 64) per pair; the fp32
  product is multiplied by 2^63 once, in the epilogue (exact for block exponents 65..191,
  i.e. scales 2^-62..2^64). No conversion instruction: 4.9-6.1.
- "lut": the same words, but 4 codes at a time looked up in two 8-entry byte tables by PTX
  byte permutes (prmt: the exact bf16 of each magnitude, no subnormal), the signs and the
  interleave into pairs by permutes too, then a bf16x2 multiply by 2^(scale - 127): 15 integer
  instructions and 4 multiplies per word: 4.3-5.5. Inline PTX, so the interpreter runs
  "bits" in its place (an earlier inline-PTX decode did not compile on the H200; this one
  assembles for sm_90: tests/test_kernels_sm90.py, and results/quant_sass with Triton 3.6;
  tests/test_quant_gemm.py runs its program in numpy).

The e8m0 exponents (BK / 32 bytes a row, rows K / 32 bytes apart: too narrow and unaligned
for the asynchronous copies that pipeline the other loads) are loaded one K step ahead. The
weight loads need no column mask (columns past N read row N - 1, whose products are not
stored) and, where BK divides K, no K mask. The activation loads keep their row mask: a
decode tile is mostly rows past its expert's, and reading a valid row for each of them costs
L2 traffic (the gathered gate/up GEMM ran up to 2.2x slower without it on an H100,
1.47x at the default config).
experiments/runtime/quant_sass.py counts the K loop's instructions of each config without a GPU;
which config is fastest is for the GPU benchmark to say (experiments/runtime/quant_layer.py).

FP8 converts to bf16 exactly and applies the 128 x 128 tile's scale_inv to each step's
partial product (BK divides 128), not to each weight.

Transposed tiles (`swap_ab`) give the decoded weights to Hopper's wgmma as its left operand,
which it reads from registers, in a layout of its own (each thread 2 consecutive k of every 8,
four threads a row, a warp 8 rows and 8 rows further). The decode leaves each thread whole
words of one row instead, and Triton moves the [BN, BK] tile between the two layouts through
shared memory (stores, ldmatrix and a barrier every K step: 0.33 shared-memory instructions
per weight for 16x128x64). `KernelConfig.permute_k` avoids the move: the packed words are read
BK / 32 to a thread (four threads a row), the weight rows are loaded in a permuted order, and
the decoded tile's rows and k are relabelled (`_mma_order`: a reshape and a permute, which
move no data) into the MMA's order, with x's columns read in the same permuted k order
(`_mma_k`; a permutation of k on both operands leaves the product unchanged). No ldmatrix is
left in the loop (tests/test_kernels_sm90.py): 0.05-0.19 shared-memory instructions per weight
and 0.5-0.6 fewer in all (results/quant_sass; static counts, not yet timed on a GPU). The x
tile is then read in 4-byte pieces.

The grid is (row tiles, N tiles), with row tiles = ceil(M / BM) + E, a bound on the BM-row
tiles of all experts together; each program derives its expert and first row from `offsets`
(a cumulative sum over the E experts' tile counts, inside the kernel: one launch, no host read
of the counts, so the launch can be captured in a CUDA graph); tiles past the last return at
once. `tile_schedule` is the same mapping in torch, kept as the readable twin.

With `x_index` the kernel's A loads gather the rows (row i of the product reads x[x_index[i]]):
x stays in token order and the MoE permutation's [M, K] row copy is not needed (the "gather"
form of a grouped GEMM).

`grouped_matmul_ref` is the slow twin (dequantize with probe.runtime.quant, then one matmul per
expert), used by the tests. On CPU the kernel runs under Triton's interpreter
(TRITON_INTERPRET=1), which multiplies the tiles in fp32 because its bf16 dot is wrong; the GPU
path multiplies bf16 tiles on the tensor cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from probe.runtime.quant import FP8_BLOCK, MXFP4_BLOCK, PackedWeight

__all__ = ["DEFAULT_CONFIGS", "KernelConfig", "grouped_matmul", "grouped_matmul_ref",
           "tile_schedule"]

try:  # pragma: no cover - triton is optional (runtime extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_FORMAT_CODE = {"bf16": 0, "mxfp4": 1, "fp8_block": 2}
_MXFP4_DECODE = {"portable": 0, "spread": 1, "dot_scaled": 2, "bits": 3, "lut": 4}

# "lut" on the GPU: the bf16 pairs of the uint32 word $4 of 8 e2m1 codes, times the bf16
# pair $5 (the block's 2^(scale - 127) twice), into $0..$3 (pair j from byte j, the low
# nibble in the low half), by byte permutes. PTX prmt d, a, b, c: byte k of d is byte
# (c >> 4k) & 7 of the 8 bytes {b, a} (a's bytes 0..3), or that byte's sign bit replicated
# where bit 4k + 3 of c is set. Two 8-entry tables hold the low and high bytes of the bf16 of
# each magnitude 0, 0.5, ..., 6 (exact values, no subnormal), looked up four codes at a time
# (the selector with the codes' sign bits cleared); the signs (code bit 3 to the high byte's
# bit 7) come from a permute of the word and the word shifted left by 4; the low and high
# bytes are interleaved into pairs; one bf16x2 multiply applies the scale. 15 integer
# instructions and 4 multiplies a word, against about 23 and 4 for "bits" (`_e2m1_pairs`). One op a
# tuple (op, destination, sources...); tests/test_quant_gemm.py runs the list in numpy.
E2M1_LUT_PROGRAM = (
    ("mov", "lo_a", 0xC0800000), ("mov", "lo_b", 0xC0804000),  # low bytes, codes 0-3 / 4-7
    ("mov", "hi_a", 0x3F3F3F00), ("mov", "hi_b", 0x40404040),  # high bytes without the sign
    ("mov", "msb", 0x80808080),
    ("and", "sel", "$4", 0x77777777), ("shr", "selh", "sel", 16), ("shl", "w4", "$4", 4),
    ("prmt", "lo03", "lo_a", "lo_b", "sel"), ("prmt", "lo47", "lo_a", "lo_b", "selh"),
    ("prmt", "hi03", "hi_a", "hi_b", "sel"), ("prmt", "hi47", "hi_a", "hi_b", "selh"),
    ("prmt", "sg03", "w4", "$4", 0x5140), ("prmt", "sg47", "w4", "$4", 0x7362),
    ("andor", "hi03", "sg03", "msb", "hi03"), ("andor", "hi47", "sg47", "msb", "hi47"),
    ("prmt", "p0", "lo03", "hi03", 0x5140), ("prmt", "p1", "lo03", "hi03", 0x7362),
    ("prmt", "p2", "lo47", "hi47", 0x5140), ("prmt", "p3", "lo47", "hi47", 0x7362),
    ("mul", "$0", "p0", "$5"), ("mul", "$1", "p1", "$5"), ("mul", "$2", "p2", "$5"),
    ("mul", "$3", "p3", "$5"),
)


def _ptx(program: tuple) -> str:
    """PTX text of an `E2M1_LUT_PROGRAM`-style op list: "andor" d, a, b, c is (a & b) | c,
    "mul" a bf16x2 product; operands named $i are the asm block's, others its registers."""
    def arg(a):
        if isinstance(a, int):
            return f"{a:#010x}"
        return a if a.startswith("$") else f"%{a}"
    names = sorted({op[1] for op in program if not op[1].startswith("$")})
    lines = ["{", ".reg .b32 " + ", ".join(f"%{n}" for n in names) + ";"]
    for op, dst, *src in program:
        operands = ", ".join(arg(a) for a in (dst, *src))
        if op in ("mov", "and", "prmt"):
            lines.append(f"{op}.b32 {operands};")
        elif op in ("shr", "shl"):
            lines.append(f"{op}.b32 {arg(dst)}, {arg(src[0])}, {src[1]};")
        elif op == "andor":  # lop3's truth table of (a & b) | c
            lines.append(f"lop3.b32 {operands}, 0xEA;")
        else:
            lines.append(f"mul.rn.bf16x2 {operands};")
    return "\n".join([*lines, "}"])


_FP8_SCALE = {"weights": 0, "product": 1}

if triton is not None:
    _E2M1_PTX = tl.constexpr(_ptx(E2M1_LUT_PROGRAM))  # (a jitted function reads constexprs)

    @triton.jit
    def _schedule(offs_ptr, tile, E: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr):
        """(expert, first row, end row) of BM-row tile `tile` in expert order, from the offsets
        alone (each program derives it: no host-side schedule); expert E when past the last."""
        idx = tl.arange(0, E_PAD)
        live = idx < E
        starts = tl.load(offs_ptr + idx, mask=live, other=0)
        ends_row = tl.load(offs_ptr + idx + 1, mask=live, other=0)
        tiles = (ends_row - starts + BM - 1) // BM  # [E_PAD], 0 for padding
        last = tl.cumsum(tiles, 0)  # tiles of experts 0..e
        e = tl.sum((last <= tile).to(tl.int32), 0)
        mine = idx == e
        first_tile = tl.sum(tl.where(mine, last - tiles, 0), 0)
        row0 = tl.sum(tl.where(mine, starts, 0), 0) + (tile - first_tile) * BM
        end = tl.sum(tl.where(mine, ends_row, 0), 0)
        return e, row0, end

    @triton.jit
    def _load_k(ptrs, ks, K, EVEN_K: tl.constexpr):
        """tl.load of ptrs [rows, len(ks)], its columns at k = ks: unmasked where BK divides K
        (EVEN_K; the kernel clamps rows and columns past the matrices to valid ones, whose
        products it does not store), else zero past K."""
        return tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=(ks < K)[None, :], other=0.0)

    @triton.jit
    def _scales(s_ptr, e64, cols, k0, N, K, stride_s, FORMAT: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        """The e8m0 exponents uint8 [BN, BK / 32] of MXFP4 K step k0 (127 past K; a constant
        for the other formats). The kernel loads them one step ahead: they are too narrow
        (BK / 32 bytes a row, rows K / 32 bytes apart) for the asynchronous copies that
        pipeline the other loads, so a load issued in the step that uses it would stall it."""
        groups = k0 // GROUP + tl.arange(0, BK // GROUP)
        if FORMAT == 1:
            exps = tl.load(s_ptr + (e64 * N + cols[:, None]) * stride_s + groups[None, :],
                           mask=(groups < K // GROUP)[None, :], other=127)
        else:
            exps = tl.full((BN, BK // GROUP), 127, tl.uint8)
        return exps

    @triton.jit
    def _e2m1_pairs(b):
        """bf16 bits of the two e2m1 codes in the low byte of uint32 `b` (higher bits
        ignored): the low nibble's in bits 0..15, the high nibble's in 16..31, each code's sign
        at bit 15 and its 2 exponent and 1 mantissa bits at bits 8..6: the code's value times
        2^-126 (0.5 a bf16 subnormal). Both codes' magnitude bits move in one multiply
        (x (2^6 + 2^18)), their signs in another (x (2^12 + 2^24)), then one mask: about 23
        integer instructions a word of 8 codes. (Two codes a multiply, one per 16-bit lane,
        then pairs taken from two words' halves, needs 17, and Triton 3.9 compiles it so, but
        Triton 3.6, the GPU machine's, adds byte permutes that make it the slower.)"""
        return ((b & 0x77) * 0x40040 + (b & 0x88) * 0x1001000) & 0x81C081C0

    @triton.jit
    def _bf16_tile(p0, p1, p2, p3, BN: tl.constexpr, BK: tl.constexpr):
        """uint16 [BN, BK] in k order from the bf16 pairs p0..p3 [BN, BK / 8] of each word's
        bytes 0..3 (no data moves: each pair stays one 32-bit register)."""
        pairs = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (BN, BK // 2))
        halves = tl.join((pairs & 0xFFFF).to(tl.uint16), (pairs >> 16).to(tl.uint16))
        return tl.reshape(halves, (BN, BK))

    @triton.jit
    def _mma_order(w, BN: tl.constexpr, BK: tl.constexpr):
        """The decoded tile w [BN, BK] (k in memory order, each thread holding BK / 32
        consecutive words of its row, rows from `_mma_rows`) relabelled into the order in
        which Hopper's wgmma reads its left operand from registers (`permute_k`): thread t of
        a row quad holds k = 2t, 2t + 1 (mod 8) of every 8, a warp 8 rows and again 8 rows
        further, the warps 16 rows apart. Memory k = h + 2q + 8r + 8ct (c = BK / 32 words a
        thread, r < c, pair q < 4 of the word, half h) becomes k = h + 2t + 8q + 32r, and row
        lane + 8 warp + 32 j + 64 a (the load's order) becomes lane + 8 j + 16 warp + 64 a:
        permutations of register and lane bits, no data moved (`_mma_k` reads x so)."""
        w = tl.reshape(w, (BN // 64, 2, 4, 8, 4, BK // 32, 4, 2))
        return tl.reshape(tl.permute(w, (0, 2, 1, 3, 5, 6, 4, 7)), (BN, BK))

    @triton.jit
    def _mma_k(k0, BK: tl.constexpr):
        """The memory k of each column of a `_mma_order` tile (x's columns, read in that
        order: the same permutation on both operands leaves the product unchanged)."""
        c: tl.constexpr = BK // 32
        ks = (tl.arange(0, c)[:, None, None, None] * 8 + tl.arange(0, 4)[None, :, None, None] * 2
              + tl.arange(0, 4)[None, None, :, None] * (8 * c)
              + tl.arange(0, 2)[None, None, None, :])
        return k0 + tl.max_contiguous(tl.multiple_of(tl.reshape(ks, (BK,)), 2), 2)

    @triton.jit
    def _mma_rows(n0, BN: tl.constexpr):
        """The weight columns n0 .. n0 + BN - 1 in the row order that `_mma_order` undoes:
        row i of the load holds column n0 + (i & 7) + 8 ((i >> 5) & 1) + 16 ((i >> 3) & 3)
        + 64 (i >> 6)."""
        i = tl.arange(0, BN)
        return n0 + (i & 7) + ((i >> 5) & 1) * 8 + ((i >> 3) & 3) * 16 + (i >> 6) * 64

    @triton.jit
    def _weight_tile(w_rows, exps, cols, k0, N, K, FORMAT: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                     TILE: tl.constexpr, DECODE: tl.constexpr, EVEN_K: tl.constexpr,
                     INTERPRETED: tl.constexpr, s_ptr, e64, PERMUTE_K: tl.constexpr):
        """(w, post) of one K step: w the bf16 [BN, BK] tile (for "dot_scaled" the packed
        bytes [BN, BK / 2]; MXFP4's exponents `exps` [BN, BK / 32] come from `_scales`), post
        a per-column factor of the product (FP8 "product": the tile's scale_inv)."""
        ks = k0 + tl.arange(0, BK)
        post = tl.full((BN,), 1.0, tl.float32)
        if FORMAT == 0:  # bf16 [E, N, K]
            w = _load_k(w_rows + ks[None, :], ks, K, EVEN_K)
        elif FORMAT == 1:  # mxfp4 blocks [E, N, K / 2] bytes, scales [E, N, K / 32]
            if DECODE >= 3:  # "bits" / "lut": 32-bit words of 8 codes, pairs built as integers
                kw = tl.arange(0, BK // 8)
                if PERMUTE_K:  # BK / 32 words a thread, so that 4 threads share a row
                    kw = tl.max_contiguous(kw, BK // 32)
                kw = k0 // 8 + kw
                words = _load_k(w_rows.to(tl.pointer_type(tl.uint32)) + kw[None, :], kw,
                                K // 8, EVEN_K)  # [BN, BK / 8]
                if DECODE == 4 and not INTERPRETED:  # "lut": exact bf16 pairs x 2^(scale-127)
                    mult = tl.minimum(exps.to(tl.uint32), 254) << 7  # [BN, BK / 32]
                    words = tl.reshape(words, (BN, BK // GROUP, GROUP // 8))
                    p0, p1, p2, p3 = tl.inline_asm_elementwise(
                        asm=_E2M1_PTX, constraints="=r,=r,=r,=r,r,r",
                        args=[words, (mult | (mult << 16))[:, :, None]],
                        dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32), is_pure=True,
                        pack=1)
                    w = _bf16_tile(tl.reshape(p0, (BN, BK // 8)), tl.reshape(p1, (BN, BK // 8)),
                                   tl.reshape(p2, (BN, BK // 8)), tl.reshape(p3, (BN, BK // 8)),
                                   BN, BK).to(tl.bfloat16, bitcast=True)
                    if PERMUTE_K:
                        w = _mma_order(w, BN, BK)
                else:  # "bits" (and "lut" under the interpreter, which runs no PTX)
                    halves = _bf16_tile(_e2m1_pairs(words), _e2m1_pairs(words >> 8),
                                        _e2m1_pairs(words >> 16), _e2m1_pairs(words >> 24),
                                        BN, BK)
                    halves = tl.reshape(halves, (BN, BK // GROUP, GROUP))  # code x 2^-126
                    # x 2^(scale - 127 + 63) (a normal bf16 for exponents up to 191) gives the
                    # weights x 2^-63 in one bf16 multiply per pair, exact and no subnormal
                    # left for exponents 65 and up; the epilogue multiplies the fp32 product
                    # by 2^63.
                    mult = tl.minimum(exps.to(tl.int32) + 63, 254)  # [BN, BK / 32] exponent
                    if INTERPRETED:  # (its bf16 products and bf16 -> fp32 flush subnormals:
                        # the same product in fp32, from the same bits)
                        values = (halves.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                        mult = (mult << 23).to(tl.float32, bitcast=True)
                        values = (values * mult[:, :, None]).to(tl.bfloat16)
                    else:
                        mult = (mult << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
                        values = halves.to(tl.bfloat16, bitcast=True) * mult[:, :, None]
                    w = tl.reshape(values, (BN, BK))
                    if PERMUTE_K:
                        w = _mma_order(w, BN, BK)
            else:
                kb = k0 // 2 + tl.arange(0, BK // 2)
                packed = _load_k(w_rows + kb[None, :], kb, K // 2, EVEN_K)  # uint8
                # e2m1 (sign, 2 exponent bits, 1 mantissa bit) placed in an e4m3 byte is the
                # value times 2^-6, subnormal 0.5 included: the hardware converts it, and
                # 2^(scale - 127 + 6) is built from exponent bits.
                bits = tl.minimum(exps.to(tl.int32) + 6, 254) << 23
                scale = bits.to(tl.float32, bitcast=True)  # [BN, BK / 32]
                if DECODE == 1:  # "spread": the bytes spread to k order first, then one decode
                    both = tl.reshape(tl.join(packed, packed), (BN, BK))  # byte of each weight
                    code = (both >> ((ks & 1) * 4).to(tl.uint8)[None, :]) & 0xF  # its nibble
                    e4m3 = ((code & 7) << 2) | ((code & 8) << 4)
                    values = e4m3.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                    values = tl.reshape(values, (BN, BK // GROUP, GROUP)) * scale[:, :, None]
                    w = tl.reshape(values, (BN, BK)).to(tl.bfloat16)
                elif DECODE == 2:  # "dot_scaled": decoded inside tl.dot_scaled
                    w = packed
                else:  # "portable": low / high nibbles, interleaved back into k order
                    lo = ((packed & 7) << 2) | ((packed & 8) << 4)
                    hi = ((packed >> 2) & 0x1C) | (packed & 0x80)
                    values = tl.interleave(lo.to(tl.float8e4nv, bitcast=True).to(tl.float32),
                                           hi.to(tl.float8e4nv, bitcast=True).to(tl.float32))
                    values = tl.reshape(values, (BN, BK // GROUP, GROUP)) * scale[:, :, None]
                    w = tl.reshape(values, (BN, BK)).to(tl.bfloat16)
        else:  # fp8 [E, N, K], scale_inv [E, ceil(N / 128), ceil(K / 128)]
            raw = _load_k(w_rows + ks[None, :], ks, K, EVEN_K)
            tiles_n = (N + TILE - 1) // TILE
            tiles_k = (K + TILE - 1) // TILE
            # (BK divides TILE: one k tile)
            scale = tl.load(s_ptr + (e64 * tiles_n + cols // TILE) * tiles_k + k0 // TILE)
            if DECODE == 1:  # fp8 -> bf16 is exact; the scale goes on the product
                w = raw.to(tl.float32).to(tl.bfloat16)  # (a conversion sm_90 has)
                post = scale
            else:
                w = (raw.to(tl.float32) * scale[:, None]).to(tl.bfloat16)
        return w, post

    @triton.jit
    def _accumulate(acc, x_ptr, src, rmask, k0, K, stride_xm, w, exps, post,
                    FORMAT: tl.constexpr, BK: tl.constexpr, DECODE: tl.constexpr,
                    INTERPRETED: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr,
                    PERMUTE_K: tl.constexpr):
        """acc + (rows src of x, K step k0) @ w^T: acc [BM, BN], or its transpose [BN, BM]
        with SWAP (then w is the MMA's left operand: its BN rows fill the MMA's M side).
        PERMUTE_K: w's columns are in `_mma_order`, x's are read in the same order.
        x's rows past the expert's (not rmask) are masked, not read: in decode most of a
        tile's rows are such padding, and reading them (one valid row again and again, from
        L2) made the gathered gate/up GEMM up to 2.2x slower on an H100 (1.47x at the
        default config)."""
        ks = _mma_k(k0, BK) if PERMUTE_K else k0 + tl.arange(0, BK)
        xmask = rmask[:, None] if EVEN_K else rmask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :], mask=xmask, other=0.0)
        # (one return at the end: the compiler builds the code after a constexpr branch that
        # returns as well, and the two shapes would clash)
        if SWAP:
            if FORMAT == 1 and DECODE == 2:
                part = tl.dot_scaled(w, exps, "e2m1", tl.trans(x), None, "bf16")
            elif INTERPRETED:  # Triton's CPU interpreter multiplies bf16 tiles wrongly
                part = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)))
            else:
                part = tl.dot(w, tl.trans(x))
            if FORMAT == 2 and DECODE == 1:
                part = part * post[:, None]
        else:
            if FORMAT == 1 and DECODE == 2:
                part = tl.dot_scaled(x, None, "bf16", tl.trans(w), exps, "e2m1")
            elif INTERPRETED:
                part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                part = tl.dot(x, tl.trans(w))
            if FORMAT == 2 and DECODE == 1:
                part = part * post[None, :]
        return acc + part

    @triton.jit
    def _zeros(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
        return tl.zeros((BN, BM) if SWAP else (BM, BN), dtype=tl.float32)

    @triton.jit
    def _sources(xi_ptr, rows, row0, end, GATHER_X: tl.constexpr):
        """The x row of each product row: x_index[rows] (the permutation fused), or rows;
        rows past the expert's (end) read a valid row, x's row 0 or the tile's first (their
        products are not stored); the x loads mask them too (see _accumulate)."""
        if GATHER_X:
            src = tl.load(xi_ptr + rows, mask=rows < end, other=0).to(tl.int64)
        else:
            src = tl.where(rows < end, rows, row0).to(tl.int64)
        return src

    @triton.jit
    def _store(y_ptr, acc, bias, rows, rmask, cols, cmask, stride_ym, SWAP: tl.constexpr,
               UNBIAS: tl.constexpr):
        if SWAP:
            acc = tl.trans(acc)  # [BM, BN]
        if UNBIAS:  # the weights were multiplied by 2^-63: undone exactly
            acc = acc * 9223372036854775808.0
        acc += bias[None, :]  # the expert's bias row in fp32 (zeros without), one rounding
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _k_step(acc0, acc1, acc2, acc3, exps, k0, x_ptr, src0, src1, src2, src3, row0, end,
                w_rows, s_ptr, e64, cols, N, K, stride_s, stride_xm,
                FORMAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                GROUP: tl.constexpr, TILE: tl.constexpr, DECODE: tl.constexpr,
                INTERPRETED: tl.constexpr, R: tl.constexpr, SWAP: tl.constexpr,
                EVEN_K: tl.constexpr, PERMUTE_K: tl.constexpr):
        """One K step: the weight tile at k0 decoded once and multiplied into the R
        accumulators whose rows exist; returns them and the next step's MXFP4 exponents
        (`exps` is this step's, loaded a step ahead). EVEN_K: BK divides K, no K masks."""
        exps_next = _scales(s_ptr, e64, cols, k0 + BK, N, K, stride_s, FORMAT, BN, BK, GROUP)
        w, post = _weight_tile(w_rows, exps, cols, k0, N, K, FORMAT, BN, BK, GROUP, TILE,
                               DECODE, EVEN_K, INTERPRETED, s_ptr, e64, PERMUTE_K)
        rows = row0 + tl.arange(0, BM)
        acc0 = _accumulate(acc0, x_ptr, src0, rows < end, k0, K, stride_xm, w, exps, post,
                           FORMAT, BK, DECODE, INTERPRETED, SWAP, EVEN_K, PERMUTE_K)
        if R > 1:  # noqa: SIM102 - a compile-time test around a runtime one
            if row0 + BM < end:  # sub-tiles past the expert's rows skip the MMA
                acc1 = _accumulate(acc1, x_ptr, src1, rows + BM < end, k0, K, stride_xm, w,
                                   exps, post, FORMAT, BK, DECODE, INTERPRETED, SWAP, EVEN_K,
                                   PERMUTE_K)
        if R > 2:
            if row0 + 2 * BM < end:
                acc2 = _accumulate(acc2, x_ptr, src2, rows + 2 * BM < end, k0, K, stride_xm,
                                   w, exps, post, FORMAT, BK, DECODE, INTERPRETED, SWAP,
                                   EVEN_K, PERMUTE_K)
            if row0 + 3 * BM < end:
                acc3 = _accumulate(acc3, x_ptr, src3, rows + 3 * BM < end, k0, K, stride_xm,
                                   w, exps, post, FORMAT, BK, DECODE, INTERPRETED, SWAP,
                                   EVEN_K, PERMUTE_K)
        return acc0, acc1, acc2, acc3, exps_next

    @triton.jit
    def _grouped_kernel(x_ptr, xi_ptr, w_ptr, s_ptr, offs_ptr, y_ptr, b_ptr, N, K, stride_w,
                        stride_s, stride_xm, stride_ym, stride_b, HAS_BIAS: tl.constexpr,
                        GATHER_X: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                        FORMAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
                        DECODE: tl.constexpr, INTERPRETED: tl.constexpr, R: tl.constexpr,
                        SWAP: tl.constexpr, EVEN_K: tl.constexpr, PERMUTE_K: tl.constexpr):
        # A program owns R consecutive BM-row tiles of one expert (R = 1, 2 or 4): it decodes
        # each weight tile once and multiplies it into every sub-tile that has rows. Where BK
        # divides K (EVEN_K) the K loop loads without masks; else every step masks k < K (a
        # masked last step peeled off the loop made Triton 3.6 spill FP8 tiles for K 2880).
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e, row0, end = _schedule(offs_ptr, tile, E, E_PAD, BM * R)
        if e < E:
            cols = pid_n * BN + tl.arange(0, BN)
            cmask = cols < N
            if PERMUTE_K:  # the weight rows in the order that `_mma_order` undoes
                wcols = tl.minimum(_mma_rows(pid_n * BN, BN), N - 1)
            else:
                wcols = tl.minimum(cols, N - 1)  # (columns past N read row N - 1, not stored)
            e64 = e.to(tl.int64)
            w_rows = w_ptr + (e64 * N + wcols[:, None]) * stride_w  # [BN, 1] row starts
            rows0 = row0 + tl.arange(0, BM)
            src0 = _sources(xi_ptr, rows0, row0, end, GATHER_X)
            src1 = src0  # (the sub-tiles past R are never used)
            src2 = src0
            src3 = src0
            if R > 1:
                src1 = _sources(xi_ptr, rows0 + BM, row0, end, GATHER_X)
            if R > 2:
                src2 = _sources(xi_ptr, rows0 + 2 * BM, row0, end, GATHER_X)
                src3 = _sources(xi_ptr, rows0 + 3 * BM, row0, end, GATHER_X)
            acc0 = _zeros(BM, BN, SWAP)
            acc1 = _zeros(BM, BN, SWAP)
            acc2 = _zeros(BM, BN, SWAP)
            acc3 = _zeros(BM, BN, SWAP)
            exps = _scales(s_ptr, e64, wcols, 0, N, K, stride_s, FORMAT, BN, BK, GROUP)
            for k0 in range(0, K, BK):
                acc0, acc1, acc2, acc3, exps = _k_step(
                    acc0, acc1, acc2, acc3, exps, k0, x_ptr, src0, src1, src2, src3, row0, end,
                    w_rows, s_ptr, e64, wcols, N, K, stride_s, stride_xm, FORMAT, BM, BN, BK,
                    GROUP, TILE, DECODE, INTERPRETED, R, SWAP, EVEN_K, PERMUTE_K)
            bias = tl.zeros((BN,), dtype=tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + e64 * stride_b + cols, mask=cmask,
                               other=0.0).to(tl.float32)
            # "bits" (and "lut" under the interpreter) multiplied the weights by 2^-63
            unbias = FORMAT == 1 and (DECODE == 3 or (DECODE == 4 and INTERPRETED))
            _store(y_ptr, acc0, bias, rows0, rows0 < end, cols, cmask, stride_ym, SWAP, unbias)
            if R > 1:
                _store(y_ptr, acc1, bias, rows0 + BM, rows0 + BM < end, cols, cmask, stride_ym,
                       SWAP, unbias)
            if R > 2:
                _store(y_ptr, acc2, bias, rows0 + 2 * BM, rows0 + 2 * BM < end, cols, cmask,
                       stride_ym, SWAP, unbias)
                _store(y_ptr, acc3, bias, rows0 + 3 * BM, rows0 + 3 * BM < end, cols, cmask,
                       stride_ym, SWAP, unbias)


def _check(x: torch.Tensor, weight: PackedWeight, offsets: torch.Tensor) -> None:
    num_experts, _, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {list(x.shape)}")
    if offsets.dim() != 1 or offsets.numel() != num_experts + 1:
        raise ValueError(f"offsets must be [E + 1] = [{num_experts + 1}], "
                         f"got {list(offsets.shape)}")


def tile_schedule(offsets: torch.Tensor, num_rows: int,
                  block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert int32 [R], first row int32 [R]) of each BM-row tile, R = ceil(M / BM) + E,
    tiles in expert order; -1 for the tiles past the last. Device ops only (no host sync)."""
    num_experts = offsets.numel() - 1
    starts = offsets[:-1].long()
    counts = offsets[1:].long() - starts
    tiles = (counts + block_m - 1) // block_m  # [E]
    ends = tiles.cumsum(0)  # [E]: tiles of experts 0..e
    total = -(-num_rows // block_m) + num_experts
    t = torch.arange(total, device=offsets.device)
    expert = torch.searchsorted(ends, t, right=True)  # [R] in 0..E
    valid = expert < num_experts
    safe = expert.clamp(max=num_experts - 1)
    row0 = starts[safe] + (t - (ends - tiles)[safe]) * block_m
    return (torch.where(valid, safe, -1).to(torch.int32),
            torch.where(valid, row0, 0).to(torch.int32))


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and code path of one `grouped_matmul` launch.

    Attributes:
        block_m, block_n: rows of x and output columns per program (powers of two, >= 16).
        block_k: K per step, a multiple of 32 (one MXFP4 group) dividing 128 (one FP8 tile).
        num_warps, num_stages: Triton launch options (the interpreter ignores them).
        mxfp4_decode: how MXFP4 tiles become bf16 for the product (the module docstring
            compares them). "portable": the packed bytes' low and high nibbles each placed in
            an e4m3 byte, converted by the hardware, interleaved back into k order and
            multiplied by the block's power of two; "spread": the packed bytes first spread to
            k order (each byte twice), then every weight picks its nibble and is decoded
            elementwise; "dot_scaled": Triton's `tl.dot_scaled` (bf16 x e2m1 with the e8m0
            block scales), which leaves the decode to Triton's own lowering (on Hopper: an
            upcast to bf16, then a bf16 MMA); "bits": 32-bit words of 8 codes made into bf16
            pairs by integer operations and one bf16x2 multiply per pair (exact for block
            exponents 65..191); "lut": the pairs by PTX byte-permute table lookups, then the
            multiply (exact for exponents 1..254; GPU only: the interpreter runs "bits").
        fp8_scale: "product" (fp8 -> bf16 exactly, the tile's scale_inv multiplies each step's
            partial product, BM x BN multiplies instead of BN x BK) or "weights" (each weight
            scaled, then rounded to bf16).
        row_tiles: R = 1, 2 or 4 BM-row tiles of one expert per program: each weight tile is
            decoded (and read) once for R * BM rows, and a sub-tile without rows skips its
            MMA, so an expert with up to R * BM rows has its weights decoded once in all
            (against once per BM rows with R = 1), while small experts pay no MMA for the
            padding that one BM = R * BM tile would multiply.
        swap_ab: compute each tile transposed, W_tile x^T ([BN, BM]), so the weight tile's BN
            rows fill the MMA's M side (Hopper's wgmma needs M >= 64) and a small BM (16, 32:
            experts with a few rows) becomes the MMA's N; the accumulator is transposed once,
            at the store.
        permute_k: with swap_ab and the "bits" / "lut" decodes (4 warps, BN a multiple of 64,
            BK 64 or 128): decode the weights straight into the layout in which wgmma reads
            its register operand (weight rows and k permuted alike on both operands; the
            module docstring says how), instead of moving the decoded tile through shared
            memory every K step.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    mxfp4_decode: str = "portable"
    fp8_scale: str = "product"
    row_tiles: int = 1
    swap_ab: bool = False
    permute_k: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")
        if self.block_k % MXFP4_BLOCK or FP8_BLOCK % self.block_k:
            raise ValueError(f"KernelConfig.block_k must be a multiple of {MXFP4_BLOCK} dividing "
                             f"{FP8_BLOCK}, got {self.block_k}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1) or self.num_stages < 1:
            raise ValueError(f"KernelConfig: num_warps must be a power of two and num_stages "
                             f">= 1, got {self.num_warps}, {self.num_stages}")
        if self.mxfp4_decode not in _MXFP4_DECODE:
            raise ValueError(f"KernelConfig.mxfp4_decode must be one of {sorted(_MXFP4_DECODE)}, "
                             f"got {self.mxfp4_decode!r}")
        if not isinstance(self.swap_ab, bool):
            raise TypeError(f"KernelConfig.swap_ab must be a bool, got {self.swap_ab!r}")
        if not isinstance(self.permute_k, bool):
            raise TypeError(f"KernelConfig.permute_k must be a bool, got {self.permute_k!r}")
        if self.permute_k and not (self.swap_ab and self.mxfp4_decode in ("bits", "lut")
                                   and self.num_warps == 4 and self.block_n % 64 == 0
                                   and self.block_k in (64, 128)):
            raise ValueError("KernelConfig.permute_k needs swap_ab, mxfp4_decode 'bits' or "
                             "'lut', num_warps 4, block_n a multiple of 64 and block_k 64 or "
                             f"128, got {self.label()} {self.mxfp4_decode}")
        if self.row_tiles not in (1, 2, 4):
            raise ValueError(f"KernelConfig.row_tiles must be 1, 2 or 4, got {self.row_tiles}")
        if self.fp8_scale not in _FP8_SCALE:
            raise ValueError(f"KernelConfig.fp8_scale must be one of {sorted(_FP8_SCALE)}, "
                             f"got {self.fp8_scale!r}")

    def label(self) -> str:
        """Short text for tables: BMxBNxBK/warps/stages (/rR with row tiles, /swap)."""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}/w{self.num_warps}"
                f"/s{self.num_stages}" + (f"/r{self.row_tiles}" if self.row_tiles > 1 else "")
                + ("/swap" if self.swap_ab else "") + ("/pk" if self.permute_k else ""))


# What grouped_matmul runs when no config is given: a guess from the kernel's arithmetic (large
# BN so x is re-read from L2 fewer times, BK 128 for wide packed-weight loads, BM 64 so most
# experts' rows fit one tile and their weights are decoded once). The H200 benchmark
# experiments/runtime/quant_layer.py measures a list of configs per format and reports the best.
DEFAULT_CONFIGS = {
    "bf16": KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    # "lut", two 64-row tiles a program: on an H100 (results/h100/run5/quant_layer) 1.14-1.27x
    # faster than "portable" at 256-1536 tokens, and exact over every block exponent ("bits",
    # as fast, is exact for exponents 65..191 only); the interpreter runs it as "bits"
    "mxfp4": KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3,
                          mxfp4_decode="lut", row_tiles=2),
    "fp8_block": KernelConfig(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3),
}


def grouped_matmul(x: torch.Tensor, weight: PackedWeight, offsets: torch.Tensor, *,
                   config: KernelConfig | None = None, bias: torch.Tensor | None = None,
                   out: torch.Tensor | None = None,
                   x_index: torch.Tensor | None = None) -> torch.Tensor:
    """y bf16 [M, N]: every expert's rows of x times its (packed) weight, transposed, plus
    the expert's bias row when `bias` [E, N] is given (added in the kernel's epilogue).

    offsets int32 [E + 1] lives on x's device and is never read on the host: each program
    derives its expert and rows from it. config: `KernelConfig` (None: DEFAULT_CONFIGS[fmt]).
    x_index: int [M] or None; given, row i of the product reads x[x_index[i]] (x [T, K] in
    token order, the rows gathered by the kernel's A loads: the MoE permutation fused into
    the GEMM, no [M, K] copy of the sorted rows).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("grouped_matmul needs triton (pip install 'probe[runtime]')")
    if x_index is not None:
        if x_index.dim() != 1 or x_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"x_index must be a 1-d int32/int64 tensor, got "
                             f"{list(x_index.shape)} {x_index.dtype}")
        if x.dim() != 2:
            raise ValueError(f"x must be [T, K], got {list(x.shape)}")
    _check(x if x_index is None else x[:0], weight, offsets)
    if weight.fmt not in _FORMAT_CODE:
        raise ValueError(f"grouped_matmul supports {sorted(_FORMAT_CODE)}, got {weight.fmt!r}")
    cfg = DEFAULT_CONFIGS[weight.fmt] if config is None else config
    if not isinstance(cfg, KernelConfig):
        raise TypeError(f"config must be a KernelConfig, got {type(cfg).__name__}")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    num_experts, n, k = weight.shape
    if bias is not None and tuple(bias.shape) != (num_experts, n):
        raise ValueError(f"bias must be [E, N] = [{num_experts}, {n}], got {list(bias.shape)}")
    m = x.shape[0] if x_index is None else x_index.shape[0]
    x = x.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    if num_experts == 0 or m == 0:
        return out
    w = weight.data[0].contiguous()
    scales = weight.data[1].contiguous() if len(weight.data) > 1 else w
    if weight.fmt == "mxfp4":
        stride_w, stride_s = k // 2, k // MXFP4_BLOCK
    else:
        stride_w, stride_s = k, 0
    rows_per_program = cfg.block_m * cfg.row_tiles
    grid = (triton.cdiv(m, rows_per_program) + num_experts, triton.cdiv(n, cfg.block_n))
    b = w if bias is None else bias.contiguous()
    xi = offsets if x_index is None else x_index.contiguous()
    _grouped_kernel[grid](x, xi, w, scales, offsets, out, b, n, k, stride_w, stride_s,
                          x.stride(0), out.stride(0), 0 if bias is None else b.stride(0),
                          **kernel_constants(weight.fmt, cfg, num_experts, k,
                                             gather=x_index is not None,
                                             bias=bias is not None, interpret=interpret),
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def kernel_constants(fmt: str, cfg: KernelConfig, num_experts: int, k: int, *, gather: bool,
                     bias: bool, interpret: bool = False) -> dict:
    """The grouped kernel's compile-time arguments for weights of format fmt under cfg, with
    num_experts experts and K = k, rows gathered through an index (gather) or not, with a
    bias or not: what `grouped_matmul` launches with, and what an ahead-of-time compile of
    the kernel needs (`kernel_arg_types` gives the rest)."""
    if fmt == "mxfp4":
        decode = _MXFP4_DECODE[cfg.mxfp4_decode]
    else:
        decode = _FP8_SCALE[cfg.fp8_scale] if fmt == "fp8_block" else 0
    return {"HAS_BIAS": bias, "GATHER_X": gather, "E": num_experts,
            "E_PAD": triton.next_power_of_2(num_experts), "FORMAT": _FORMAT_CODE[fmt],
            "BM": cfg.block_m, "BN": cfg.block_n, "BK": cfg.block_k, "GROUP": MXFP4_BLOCK,
            "TILE": FP8_BLOCK, "DECODE": decode, "INTERPRETED": interpret, "R": cfg.row_tiles,
            "SWAP": cfg.swap_ab, "EVEN_K": k % cfg.block_k == 0,
            "PERMUTE_K": cfg.permute_k and fmt == "mxfp4"}


def kernel_arg_types(fmt: str, index: str = "*i64") -> tuple[dict[str, str], list[str]]:
    """For an ahead-of-time compile of the grouped kernel (tests/test_kernels_sm90.py,
    experiments/runtime/quant_sass.py): Triton's type of each runtime argument for weights of
    format fmt (index: the row index's pointer type, "*i32" or "*i64"), and the arguments a
    launch sees as multiples of 16 (every pointer and stride but stride_s: an MXFP4 row of
    K / 32 scales, 90 for K 2880, is not)."""
    weight = {"bf16": "*bf16", "mxfp4": "*u8", "fp8_block": "*fp8e4nv"}[fmt]
    scale = {"bf16": "*bf16", "mxfp4": "*u8", "fp8_block": "*fp32"}[fmt]
    types = {"x_ptr": "*bf16", "xi_ptr": index, "w_ptr": weight, "s_ptr": scale,
             "offs_ptr": "*i32", "y_ptr": "*bf16", "b_ptr": "*bf16", "N": "i32", "K": "i32",
             "stride_w": "i32", "stride_s": "i32", "stride_xm": "i32", "stride_ym": "i32",
             "stride_b": "i32"}
    aligned = [n for n in types if n.endswith("_ptr")] + ["N", "K", "stride_w", "stride_xm",
                                                          "stride_ym", "stride_b"]
    return types, aligned


def grouped_matmul_ref(x: torch.Tensor, weight: PackedWeight, offsets: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin: dequantize every expert, one fp32 matmul per expert's rows (+ bias)."""
    _check(x, weight, offsets)
    bounds = offsets.tolist()
    out = torch.zeros((x.shape[0], weight.shape[1]), dtype=torch.float32, device=x.device)
    for e in range(weight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:  # one expert dequantized at a time: large layers fit
            out[a:b] = x[a:b].to(torch.float32) @ weight.rows([e]).dense(torch.float32)[0].T
            if bias is not None:
                out[a:b] += bias[e].to(torch.float32)
    return out
