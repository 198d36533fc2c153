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

Expert parallelism moves weights as named plain tensors ({name: tensor}, one name per stored
tensor): `split_packed` names a `PackedWeight`'s parts after its weight ("w_gate_up.blocks",
"w_gate_up.scales" for MXFP4; "w_gate_up.weight", "w_gate_up.scale_inv" for FP8), and
`join_packed` rebuilds the `PackedWeight`s from such names, for a stack of experts or for one
expert (a replica slot).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from probe.specs import FP8_BLOCK, MXFP4_BLOCK, WEIGHT_FORMATS, check_weight_format, weight_bytes

FORMATS = WEIGHT_FORMATS
__all__ = ["FORMATS", "FP8_BLOCK", "MXFP4_BLOCK", "PACKED_PARTS", "PackedWeight",
           "dequantize_fp8_block", "dequantize_mxfp4", "join_packed", "quantize_fp8_block",
           "quantize_mxfp4", "split_packed", "weight_bytes"]

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
        want = _layout(self.fmt, self.shape)
        got = [(tuple(t.shape), t.dtype) for t in self.data]
        if got != want:
            names = PACKED_PARTS.get(self.fmt, ("weight",))
            raise ValueError(f"PackedWeight({self.fmt}) of shape {self.shape} needs "
                             + ", ".join(f"{n} {list(s)} {d}" for n, (s, d)
                                         in zip(names, want, strict=True))
                             + f"; got {[(list(s), d) for s, d in got]}")

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


# The stored tensors of each packed format, in `PackedWeight.data` order; `split_packed` names
# them "<weight>.<part>".
PACKED_PARTS = {"mxfp4": ("blocks", "scales"), "fp8_block": ("weight", "scale_inv")}


def _layout(fmt: str, shape: tuple[int, int, int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of a `fmt` PackedWeight standing for [E, N, K] `shape`."""
    e, n, k = shape
    if fmt == "fp32":
        return [((e, n, k), torch.float32)]
    if fmt == "bf16":
        return [((e, n, k), torch.bfloat16)]
    if fmt == "mxfp4":
        if k % MXFP4_BLOCK:
            raise ValueError(f"PackedWeight(mxfp4) needs K divisible by {MXFP4_BLOCK}, "
                             f"got shape {shape}")
        g = k // MXFP4_BLOCK
        return [((e, n, g, MXFP4_BLOCK // 2), torch.uint8), ((e, n, g), torch.uint8)]
    tn, tk = math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)
    return [((e, n, k), torch.float8_e4m3fn), ((e, tn, tk), torch.float32)]


def split_packed(name: str, weight: PackedWeight) -> dict[str, torch.Tensor]:
    """The tensors of `weight` named after it: {"<name>.<part>": tensor [E, ...]} for MXFP4 and
    FP8 (parts in `PACKED_PARTS`), {name: tensor [E, N, K]} for fp32 / bf16 (plain weights)."""
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"split_packed: {name} must be a PackedWeight, got "
                        f"{type(weight).__name__}")
    if "." in name:
        raise ValueError(f"split_packed: weight name {name!r} must not contain '.'")
    if weight.fmt not in PACKED_PARTS:
        return {name: weight.data[0]}
    return {f"{name}.{part}": t for part, t in zip(PACKED_PARTS[weight.fmt], weight.data,
                                                    strict=True)}


def join_packed(tensors: Mapping[str, torch.Tensor], *, stacked: bool = True
                ) -> dict[str, torch.Tensor | PackedWeight]:
    """Undo `split_packed`: every "<name>.<part>" group becomes one `PackedWeight` under
    `name`; other tensors pass through unchanged.

    stacked: the tensors carry the expert dim first (a layer's [E, ...] stack); False: they are
    ONE expert's (a replica slot's views), and each PackedWeight gets E = 1 (views, no copy).
    A group whose parts do not name a format, or whose shapes or dtypes do not fit it, is a
    ValueError naming the weight.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor | PackedWeight] = {}
    for key, t in tensors.items():
        if "." in key:
            name, part = key.split(".", 1)
            groups.setdefault(name, {})[part] = t
        else:
            out[key] = t
    for name, parts in groups.items():
        fmt = next((f for f, names in PACKED_PARTS.items() if set(names) == set(parts)), None)
        if fmt is None:
            known = "; ".join(f"{f}: {', '.join(p)}" for f, p in PACKED_PARTS.items())
            raise ValueError(f"join_packed: {name} has parts {sorted(parts)}, which name no "
                             f"packed format ({known})")
        data = [parts[p] if stacked else parts[p].unsqueeze(0) for p in PACKED_PARTS[fmt]]
        if name in out:
            raise ValueError(f"join_packed: {name} is both a plain tensor and packed parts")
        lead = data[0]
        if lead.dim() < 3:
            raise ValueError(f"join_packed: {name}.{PACKED_PARTS[fmt][0]} has shape "
                             f"{list(lead.shape)}, too few dims for {fmt}")
        k = lead.shape[2] * lead.shape[3] * 2 if fmt == "mxfp4" and lead.dim() == 4 \
            else lead.shape[-1]
        try:
            out[name] = PackedWeight(fmt, (int(lead.shape[0]), int(lead.shape[1]), int(k)),
                                     tuple(data))
        except ValueError as err:
            raise ValueError(f"join_packed: {name}: {err}") from None
    return out
