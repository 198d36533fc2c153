"""The experts' gated nonlinearity (plus the gate/up bias) in one pass over gate_up.

    h = act(gate + b_gate[slot]) * (up + b_up[slot])        gate_up [n, 2F] -> h [n, F]

`GluSpec` names the two forms the families use: "silu" (SiLU-GLU: silu(gate) * up) and
"clamped_swiglu" (GPT-OSS: gate clamped above at `limit`, up clamped to [-limit, limit], then
(up + 1) * gate * sigmoid(alpha * gate)). Calling a spec runs the torch reference, the same
expression as `MoEBlock.activate`, one elementwise op at a time (about eight kernels over
[n, F] for the clamped form, plus two for a gathered bias). `fused_glu` is one Triton kernel
that reads gate_up (and the bias row of each row's expert) once and writes h once, in fp32
inside; it runs on CUDA tensors and under Triton's interpreter (TRITON_INTERPRET=1), and
`fused_glu_applies` says when.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["GLU_KINDS", "GluSpec", "fused_glu", "fused_glu_applies"]

try:  # pragma: no cover - triton is optional (runtime extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

GLU_KINDS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class GluSpec:
    """An expert nonlinearity on gate_up [n, 2F] (gate half first) -> [n, F].

    Attributes:
        kind: "silu" or "clamped_swiglu".
        alpha, limit: the clamped SwiGLU's sigmoid slope and clamp (unused by "silu").
    """

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in GLU_KINDS:
            raise ValueError(f"GluSpec.kind must be one of {GLU_KINDS}, got {self.kind!r}")
        if not self.limit > 0:
            raise ValueError(f"GluSpec.limit must be > 0, got {self.limit}")

    @classmethod
    def of_config(cls, cfg) -> GluSpec:
        """The spec of a model config (`expert_act`, `swiglu_alpha`, `swiglu_limit`)."""
        if cfg.expert_act == "clamped_swiglu":
            return cls("clamped_swiglu", float(cfg.swiglu_alpha), float(cfg.swiglu_limit))
        return cls("silu")

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The torch reference (op by op, in gate_up's dtype)."""
        gate, up = gate_up.chunk(2, dim=-1)  # [n, F] each
        if self.kind == "clamped_swiglu":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _glu_kernel(gu_ptr, b_ptr, slot_ptr, h_ptr, F, stride_gu, stride_h, stride_b, alpha,
                    limit, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BF + tl.arange(0, BF)
        mask = cols < F
        gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = tl.load(slot_ptr + row).to(tl.int64)
            gate += tl.load(b_ptr + e * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
            up += tl.load(b_ptr + e * stride_b + F + cols, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:  # silu(gate) * up
            h = gate * tl.sigmoid(gate) * up
        else:  # GPT-OSS clamped SwiGLU
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            h = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


def fused_glu_applies(gate_up: torch.Tensor) -> bool:
    """Whether `fused_glu` can run on gate_up: triton present, and a CUDA tensor or the
    interpreter switched on."""
    return triton is not None and (gate_up.is_cuda
                                   or os.environ.get("TRITON_INTERPRET") == "1")


def fused_glu(gate_up: torch.Tensor, spec: GluSpec, bias: torch.Tensor | None = None,
              slot: torch.Tensor | None = None) -> torch.Tensor:
    """h [n, F] in gate_up's dtype = spec applied to gate_up [n, 2F] (+ bias [E, 2F] row
    slot[i] on row i; slot int [n]), one kernel."""
    if not fused_glu_applies(gate_up):
        raise RuntimeError("fused_glu needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [n, 2F], got {list(gate_up.shape)}")
    if (bias is None) != (slot is None):
        raise ValueError("fused_glu: bias and slot go together")
    n, two_f = gate_up.shape
    width = two_f // 2
    if bias is not None and (bias.dim() != 2 or bias.shape[1] != two_f
                             or tuple(slot.shape) != (n,)):
        raise ValueError(f"bias must be [E, {two_f}] and slot [{n}], got {list(bias.shape)} "
                         f"and {list(slot.shape)}")
    gate_up = gate_up if gate_up.stride(1) == 1 else gate_up.contiguous()
    h = torch.empty((n, width), dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return h
    block = min(1024, triton.next_power_of_2(width))
    b = gate_up if bias is None else bias.contiguous()
    s = gate_up if slot is None else slot
    _glu_kernel[(n, triton.cdiv(width, block))](
        gate_up, b, s, h, width, gate_up.stride(0), h.stride(0),
        0 if bias is None else b.stride(0), float(spec.alpha), float(spec.limit),
        KIND=GLU_KINDS.index(spec.kind), HAS_BIAS=bias is not None, BF=block)
    return h
