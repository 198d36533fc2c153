"""Grouped GEMM over experts whose weights stay in MXFP4 or block-scaled FP8 (a Triton kernel).

    y[rows of expert e] = x[rows of expert e] @ W_e^T

x is bf16 [M, K] with its rows sorted by expert, `offsets` int32 [E + 1] the row where each
expert's tokens start (offsets[E] = M), W a `PackedWeight` [E, N, K] in "mxfp4" or "fp8_block"
(or "bf16"). Each program computes a BM x BN tile of one expert's rows: it reads its packed
weight tile (once per BM rows of the expert: experts with more rows re-read it, mostly from L2),
expands it to bf16 in registers (MXFP4: decode the two e2m1 codes of each
byte and scale each run of 32 by its power of two; FP8: convert and scale by the tile's
scale_inv) and accumulates the product in fp32. The weights are never expanded in memory, so
the bytes read per expert are the format's own (17/32 of a byte per weight for MXFP4, about 1
for FP8, against 2 for bf16).

The grid is (row tiles, N tiles), with row tiles = ceil(M / BM) + E, a bound on the BM-row
tiles of all experts together; `tile_schedule` maps each row tile to its expert and first row
on the device (tiles past the last return at once), so no host read of the counts is needed
and the launch can be captured in a CUDA graph.

`grouped_matmul_ref` is the slow twin (dequantize with probe.runtime.quant, then one matmul per
expert), used by the tests. On CPU the kernel runs under Triton's interpreter
(TRITON_INTERPRET=1), which multiplies the tiles in fp32 because its bf16 dot is wrong; the GPU
path multiplies bf16 tiles on the tensor cores.
"""

from __future__ import annotations

import os

import torch

from probe.runtime.quant import FP8_BLOCK, MXFP4_BLOCK, PackedWeight

__all__ = ["grouped_matmul", "grouped_matmul_ref", "tile_schedule"]

try:  # pragma: no cover - triton is optional (runtime extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_FORMAT_CODE = {"bf16": 0, "mxfp4": 1, "fp8_block": 2}

if triton is not None:

    @triton.jit
    def _e2m1(code):
        """e2m1 code (int32, 0..15) -> float32 value: sign bit 3, exponent bits 2-1, mantissa
        bit 0; exponent 0 is subnormal (0 or 0.5)."""
        sign = (code >> 3) & 1
        exponent = (code >> 1) & 3
        mantissa = (code & 1).to(tl.float32)
        normal = (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
        magnitude = tl.where(exponent == 0, 0.5 * mantissa, normal)
        return tl.where(sign == 1, -magnitude, magnitude)

    @triton.jit
    def _grouped_kernel(x_ptr, w_ptr, s_ptr, offs_ptr, tile_e_ptr, tile_r_ptr, y_ptr, N, K,
                        stride_xm, stride_ym,
                        FORMAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
                        DOT_FP32: tl.constexpr):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_e_ptr + tile)  # -1: past the last tile
        row0 = tl.load(tile_r_ptr + tile)
        if e >= 0:
            end = tl.load(offs_ptr + e + 1)
            rows = row0 + tl.arange(0, BM)
            rmask = rows < end
            cols = pid_n * BN + tl.arange(0, BN)
            cmask = cols < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            e64 = e.to(tl.int64)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                wmask = cmask[:, None] & kmask[None, :]
                if FORMAT == 0:  # bf16 [E, N, K]
                    w = tl.load(w_ptr + (e64 * N + cols[:, None]) * K + ks[None, :],
                                mask=wmask, other=0.0)
                elif FORMAT == 1:  # mxfp4 blocks [E, N, K / 2] bytes, scales [E, N, K / 32]
                    kb = k0 // 2 + tl.arange(0, BK // 2)
                    bmask = cmask[:, None] & (kb < K // 2)[None, :]
                    packed = tl.load(w_ptr + (e64 * N + cols[:, None]) * (K // 2) + kb[None, :],
                                     mask=bmask, other=0).to(tl.int32)
                    values = tl.interleave(_e2m1(packed & 15), _e2m1(packed >> 4))  # [BN, BK]
                    groups = k0 // GROUP + tl.arange(0, BK // GROUP)
                    gmask = cmask[:, None] & (groups < K // GROUP)[None, :]
                    exps = tl.load(s_ptr + (e64 * N + cols[:, None]) * (K // GROUP)
                                   + groups[None, :], mask=gmask, other=127).to(tl.float32)
                    scale = tl.exp2(exps - 127.0)  # [BN, BK / 32]
                    values = tl.reshape(values, (BN, BK // GROUP, GROUP)) * scale[:, :, None]
                    w = tl.reshape(values, (BN, BK)).to(tl.bfloat16)
                else:  # fp8 [E, N, K], scale_inv [E, ceil(N / 128), ceil(K / 128)]
                    raw = tl.load(w_ptr + (e64 * N + cols[:, None]) * K + ks[None, :],
                                  mask=wmask, other=0.0).to(tl.float32)
                    tiles_n = (N + TILE - 1) // TILE
                    tiles_k = (K + TILE - 1) // TILE
                    scale = tl.load(s_ptr + (e64 * tiles_n + cols // TILE) * tiles_k + k0 // TILE,
                                    mask=cmask, other=1.0)  # BK divides TILE: one k tile
                    w = (raw * scale[:, None]).to(tl.bfloat16)
                if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly
                    acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
                else:
                    acc += tl.dot(x, tl.trans(w))
            tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


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


def grouped_matmul(x: torch.Tensor, weight: PackedWeight, offsets: torch.Tensor, *,
                   block_m: int = 64, block_n: int = 64, block_k: int = 64,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """y bf16 [M, N]: every expert's rows of x times its (packed) weight, transposed.

    offsets int32 [E + 1] lives on x's device and is never read on the host. block_k must
    divide 128 (one FP8 tile) and be a multiple of 32 (one MXFP4 group).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("grouped_matmul needs triton (pip install 'probe[runtime]')")
    _check(x, weight, offsets)
    if weight.fmt not in _FORMAT_CODE:
        raise ValueError(f"grouped_matmul supports {sorted(_FORMAT_CODE)}, got {weight.fmt!r}")
    if block_k % MXFP4_BLOCK or FP8_BLOCK % block_k:
        raise ValueError(f"block_k must be a multiple of {MXFP4_BLOCK} dividing {FP8_BLOCK}, "
                         f"got {block_k}")
    num_experts, n, k = weight.shape
    m = x.shape[0]
    x = x.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    if num_experts == 0 or m == 0:
        return out
    w = weight.data[0].contiguous()
    scales = weight.data[1].contiguous() if len(weight.data) > 1 else w
    tile_expert, tile_row = tile_schedule(offsets, m, block_m)
    grid = (tile_expert.numel(), triton.cdiv(n, block_n))
    _grouped_kernel[grid](x, w, scales, offsets, tile_expert, tile_row, out, n, k,
                          x.stride(0), out.stride(0),
                          FORMAT=_FORMAT_CODE[weight.fmt], BM=block_m, BN=block_n, BK=block_k,
                          GROUP=MXFP4_BLOCK, TILE=FP8_BLOCK,
                          DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1")
    return out


def grouped_matmul_ref(x: torch.Tensor, weight: PackedWeight,
                       offsets: torch.Tensor) -> torch.Tensor:
    """The slow twin: dequantize every expert, one fp32 matmul per expert's rows."""
    _check(x, weight, offsets)
    bounds = offsets.tolist()
    out = torch.zeros((x.shape[0], weight.shape[1]), dtype=torch.float32, device=x.device)
    for e in range(weight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:  # one expert dequantized at a time: large layers fit
            out[a:b] = x[a:b].to(torch.float32) @ weight.rows([e]).dense(torch.float32)[0].T
    return out
