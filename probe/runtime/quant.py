"""Expert weights in the formats checkpoints ship in: MXFP4 (GPT-OSS) and block-scaled FP8
(DeepSeek-V3), besides plain bf16/fp32.

A format is how one weight matrix [N, K] is stored:

- ``mxfp4``: 4-bit e2m1 values, two per byte (low nibble first), in blocks of 32 along K; each
  block shares one power-of-two scale stored as a biased exponent (uint8, bias 127). Tensors
  ``blocks`` uint8 [N, K/32, 16] and ``scales`` uint8 [N, K/32]: 17/32 bytes per weight.
- ``fp8_block``: float8 e4m3 values [N, K] and one fp32 ``scale_inv`` per 128 x 128 tile
  [ceil(N/128), ceil(K/128)] (the value is fp8 x scale_inv): 1 byte per weight plus 4 bytes
  per tile.
- ``bf16`` / ``fp32``: the matrix itself.

`PackedWeight` holds one stacked expert matrix [E, N, K] in a format. It is what experts keep
in memory, what a replica slot holds and what a replica transfer moves (`nbytes` is exactly the
bytes of its tensors); `dense()` expands it for compute. `weight_bytes` gives the same count
from shapes alone, for the cost model and the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from probe.specs import FP8_BLOCK, MXFP4_BLOCK, WEIGHT_FORMATS, check_weight_format, weight_bytes

FORMATS = WEIGHT_FORMATS
__all__ = ["FORMATS", "FP8_BLOCK", "MXFP4_BLOCK", "PackedWeight", "dequantize_fp8_block",
           "dequantize_mxfp4", "quantize_fp8_block", "quantize_mxfp4", "weight_bytes"]

_FP8_MAX = 448.0  # largest finite float8 e4m3fn value

# The 16 e2m1 codes: sign bit 3, then magnitude 0, 0.5, 1, 1.5, 2, 3, 4, 6.
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4_MAX = 6.0


# ---------------------------------------------------------------------------------------------
# MXFP4


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> fp32 [..., G * 32]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"mxfp4: blocks {list(blocks.shape)} do not fit scales "
                         f"{list(scales.shape)}")
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.uint8)
    values = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    values = values.reshape(*b.shape[:-1], MXFP4_BLOCK)  # [..., G, 32]
    exponent = scales.to(torch.int32) - 127  # [..., G]
    return torch.ldexp(values, exponent[..., None]).reshape(*b.shape[:-2], -1)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp [..., K] -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    Each block's scale is the smallest power of two that brings its largest magnitude to at
    most 6 (e2m1's largest value); values round to the nearest e2m1 code (ties to the lower
    magnitude). Values already on that grid come back exactly.
    """
    if w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 needs the last dim divisible by {MXFP4_BLOCK}, "
                         f"got shape {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("mxfp4: weights hold NaN or inf")
    x = w.detach().to(torch.float32).reshape(*w.shape[:-1], -1, MXFP4_BLOCK)  # [..., G, 32]
    amax = x.abs().amax(dim=-1)  # [..., G]
    tiny = torch.finfo(torch.float32).tiny
    exponent = torch.ceil(torch.log2(torch.clamp(amax, min=tiny) / _FP4_MAX))
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent)).clamp(-127, 127)
    scaled = torch.ldexp(x, -exponent.to(torch.int32)[..., None])  # |scaled| <= 6
    grid = torch.tensor(_FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    magnitude = torch.argmin((scaled.abs()[..., None] - grid).abs(), dim=-1)  # [..., G, 32]
    codes = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], MXFP4_BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


# ---------------------------------------------------------------------------------------------
# Block-scaled FP8


def _tiles(shape: torch.Size) -> tuple[int, int]:
    return math.ceil(shape[-2] / FP8_BLOCK), math.ceil(shape[-1] / FP8_BLOCK)


def _tile_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """x [..., N, K] zero-padded to whole tiles, viewed as [..., tn, 128, tk, 128]."""
    n, k = x.shape[-2:]
    tn, tk = _tiles(x.shape)
    padded = torch.nn.functional.pad(x, (0, tk * FP8_BLOCK - k, 0, tn * FP8_BLOCK - n))
    return padded.reshape(*x.shape[:-2], tn, FP8_BLOCK, tk, FP8_BLOCK), n, k


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """weight float8_e4m3fn [..., N, K], scale_inv fp32 [..., ceil(N/128), ceil(K/128)]
    -> fp32 [..., N, K]."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_block: weight must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() < 2 or tuple(scale_inv.shape) != (*weight.shape[:-2], *_tiles(weight.shape)):
        raise ValueError(f"fp8_block: scale_inv {list(scale_inv.shape)} does not fit weight "
                         f"{list(weight.shape)} in {FP8_BLOCK}x{FP8_BLOCK} tiles")
    tiles, n, k = _tile_view(weight.to(torch.float32))
    out = tiles * scale_inv.to(torch.float32)[..., :, None, :, None]
    out = out.reshape(*weight.shape[:-2], out.shape[-4] * FP8_BLOCK, -1)
    return out[..., :n, :k].contiguous()


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp [..., N, K] -> (float8_e4m3fn [..., N, K], scale_inv fp32 [..., N/128, K/128]),
    one scale per 128 x 128 tile: the tile's largest magnitude maps to 448."""
    if w.dim() < 2:
        raise ValueError(f"fp8_block needs a matrix, got shape {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("fp8_block: weights hold NaN or inf")
    tiles, n, k = _tile_view(w.detach().to(torch.float32))
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., tn, tk]
    scale_inv = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX)
    q = q.reshape(*w.shape[:-2], tiles.shape[-4] * FP8_BLOCK, -1)[..., :n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()


# ---------------------------------------------------------------------------------------------
# Stacked expert weights in a format


@dataclass(frozen=True)
class PackedWeight:
    """One stacked expert matrix [E, N, K] kept in its storage format.

    Attributes:
        fmt: one of FORMATS.
        shape: (E, N, K) of the dense matrix it stands for.
        data: the stored tensors, all with dim 0 = expert: (w,) for fp32/bf16,
            (blocks, scales) for mxfp4, (weight, scale_inv) for fp8_block.
    """

    fmt: str
    shape: tuple[int, int, int]
    data: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        check_weight_format(self.fmt)
        if len(self.shape) != 3 or self.shape[0] < 0 or min(self.shape[1:]) <= 0:
            raise ValueError(f"PackedWeight.shape must be (E >= 0, N > 0, K > 0), "
                             f"got {self.shape}")
        want = 1 if self.fmt in ("fp32", "bf16") else 2
        if len(self.data) != want or any(t.shape[0] != self.shape[0] for t in self.data):
            raise ValueError(f"PackedWeight({self.fmt}) needs {want} tensors with "
                             f"{self.shape[0]} experts in dim 0, got "
                             f"{[list(t.shape) for t in self.data]}")

    @classmethod
    def pack(cls, w: torch.Tensor, fmt: str) -> PackedWeight:
        """Store the dense [E, N, K] weights `w` in `fmt` (quantizing if needed)."""
        check_weight_format(fmt)
        if w.dim() != 3:
            raise ValueError(f"expert weights must be [E, N, K], got {list(w.shape)}")
        shape = tuple(int(s) for s in w.shape)
        if fmt == "fp32":
            return cls(fmt, shape, (w.detach().to(torch.float32).contiguous(),))
        if fmt == "bf16":
            return cls(fmt, shape, (w.detach().to(torch.bfloat16).contiguous(),))
        if fmt == "mxfp4":
            return cls(fmt, shape, quantize_mxfp4(w))
        return cls(fmt, shape, quantize_fp8_block(w))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (what a replica slot holds and a transfer moves)."""
        return sum(t.numel() * t.element_size() for t in self.data)

    def expert_bytes(self) -> int:
        """Bytes of one expert's matrix (= weight_bytes(fmt, N, K))."""
        return weight_bytes(self.fmt, self.shape[1], self.shape[2])

    def rows(self, experts: torch.Tensor | list[int]) -> PackedWeight:
        """The same format, only `experts` (indices into dim 0), in that order."""
        idx = torch.as_tensor(experts, dtype=torch.long, device=self.data[0].device)
        if idx.dim() != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= self.shape[0])):
            raise ValueError(f"expert indices must be a 1-D list in [0, {self.shape[0]})")
        data = tuple(t.index_select(0, idx) for t in self.data)
        return PackedWeight(self.fmt, (int(idx.numel()), *self.shape[1:]), data)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights as a dense [E, N, K] tensor of `dtype`."""
        if self.fmt in ("fp32", "bf16"):
            return self.data[0].to(dtype)
        if self.fmt == "mxfp4":
            return dequantize_mxfp4(*self.data).to(dtype)
        return dequantize_fp8_block(*self.data).to(dtype)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.fmt, self.shape, tuple(t.to(device) for t in self.data))
