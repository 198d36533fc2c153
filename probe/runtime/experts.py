"""One MoE layer's local experts run as one grouped GEMM per projection.

`GroupedExperts` holds the experts' stacked weights (`w_gate_up [E_local, 2F, D]`, gate rows
first, `w_down [E_local, D, F]`, optional `b_gate_up [E_local, 2F]`, `b_down [E_local, D]`) and
the family's nonlinearity `activate(gate_up [n, 2F]) -> [n, F]` (`MoEBlock.activate`: SiLU-GLU,
or GPT-OSS's clamped SwiGLU). A forward pass over rows that each name a local expert slot:

  1. permute on the device: `slot_sorted, order = sort(slot)` (stable; values and indices in
     one op), `offsets = searchsorted(slot_sorted, [0, 1, ..., E_local])` as int32
     [E_local + 1] (the rows with a smaller slot: a leading 0, then the end row of every
     expert's group; one op where counting and summing took five);
  2. `gate_up = grouped_mm(x[order], w_gate_up^T, offsets[1:])` (+ `b_gate_up[slot[order]]`),
     `h = activate(gate_up)`, `y = grouped_mm(h, w_down^T, offsets[1:])` (+ `b_down[...]`);
  3. un-permute: `out[order] = y`.
Options (both off by default): `glu` (a `GluSpec`) runs the gate/up bias and the nonlinearity as
one kernel on CUDA (`probe.runtime.glu.fused_glu`) instead of op by op; `backend="triton"` runs
dense bf16 weights through `probe.runtime.quant_gemm`'s grouped kernel (packed weights always
take it on CUDA), which adds the biases in its epilogue instead of gathering them per row;
`gemm_configs` (a `GemmConfigs`) sets that kernel's tile shape and launch options per
projection (None: `quant_gemm.DEFAULT_CONFIGS`), e.g. the winners of a tuning run
(experiments/runtime/moe_layer.py `--tune`); the other GEMMs ignore it.
No step reads a count back to the host, so the grouped path needs no synchronisation (and can be
captured in a CUDA graph). An expert with no rows is an empty group.

CUDA graphs. A forward on CUDA rows is capturable (`GroupedExperts.why_not_capturable(x)` is
None) when neither GEMM takes the per-group `F.linear` loop, the one step that reads the device
(the group sizes, `offs.tolist()`); every other step is device ops with host-known shapes
(rows T*K, experts E_local) or Triton launches whose grids depend on those alone. So:
  * capturable: `grouped` (`torch._grouped_mm` for dense weights of a dtype it takes, with
    16-byte aligned rows), `glu` fused or not, `backend="triton"` (bf16 rows; packed weights
    too), and every `permute` ("torch": sort, searchsorted, index_select, index_copy;
    "triton"/"gather": `probe.runtime.permute`'s launches);
  * not capturable: `grouped=False` (the per-expert loop), dense weights where
    `torch._grouped_mm` does not apply (float64, unaligned D or F, a build or device without
    it) and packed weights off the Triton kernel (expanded, then the same loop), since the loop
    reads the group sizes; and anything on the CPU (no graphs; the slot range check there reads
    the ids).
Before capturing, run the forward once outside the graph (torch asks for a warm-up on a side
stream anyway): that compiles the Triton kernels and runs the one-time `torch._grouped_mm`
probe (`grouped_mm_available`, which reads its result back), both of which must not happen
inside a capture.

`torch._grouped_mm` is used where it exists and works for the dtype and device: whether it does
is probed once per (device, dtype) on a small problem against a per-group matmul (torch 2.13 on
CPU: float32, bfloat16 and float16 work, float64 does not; on CUDA, bf16 on Hopper). It also
needs 16-byte aligned rows (D and F times the element size multiples of 16). Where it does not
apply, `grouped_linear` runs one `F.linear` per non-empty group of the sorted rows (this reads
the group sizes back to the host once).

`loop_experts` is the slow, obviously correct twin: a Python loop of `F.linear` per expert, the
way `MoEBlock.expert_forward` computes one expert.

Switch: the runtime uses the grouped path unless the environment sets
`PROBE_GROUPED_EXPERTS=0` (`grouped_default()`), or a caller passes `grouped=False`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from probe.runtime import permute as perm_kernels
from probe.runtime import quant_gemm
from probe.runtime.glu import GluSpec, fused_glu, fused_glu_applies
from probe.runtime.quant import PackedWeight
from probe.runtime.quant_gemm import KernelConfig, grouped_matmul

BACKENDS = ("torch", "triton")
PERMUTES = ("torch", "triton", "gather")

__all__ = [
    "BACKENDS",
    "PERMUTES",
    "GemmConfigs",
    "GroupedExperts",
    "gemm_path",
    "grouped_default",
    "grouped_linear",
    "grouped_mm_available",
    "loop_experts",
    "weighted_sum",
]

Activation = Callable[[torch.Tensor], torch.Tensor]
"""The expert nonlinearity: gate_up [n, 2F] (gate half first) -> [n, F]."""

_PROBED: dict[tuple[str, int | None, torch.dtype], bool] = {}


@dataclass(frozen=True)
class GemmConfigs:
    """The Triton grouped GEMM's `KernelConfig` for each projection of a `GroupedExperts`
    (None: `quant_gemm.DEFAULT_CONFIGS` for the weights' format). Used only where that kernel
    runs (backend "triton" on bf16 CUDA rows, or packed weights); the torch paths ignore it.
    A config changes the tiling and so the fp32 summation order, not what is summed: outputs
    agree to bf16 rounding, not bit for bit."""

    gate_up: KernelConfig | None = None
    down: KernelConfig | None = None

    def __post_init__(self) -> None:
        for name in ("gate_up", "down"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, KernelConfig):
                raise TypeError(f"GemmConfigs.{name} must be a KernelConfig or None, got "
                                f"{type(value).__name__}")

    def label(self) -> str:
        """"gate/up <config>, down <config>" ("default" for None)."""
        return ", ".join(f"{name} {'default' if cfg is None else cfg.label()}"
                         for name, cfg in (("gate/up", self.gate_up), ("down", self.down)))


def grouped_default() -> bool:
    """The runtime's default: grouped experts on, unless PROBE_GROUPED_EXPERTS is 0/false/off."""
    value = os.environ.get("PROBE_GROUPED_EXPERTS", "1").strip().lower()
    if value not in ("1", "0", "true", "false", "on", "off", "yes", "no", ""):
        raise ValueError(f"PROBE_GROUPED_EXPERTS must be 1 or 0, got {value!r}")
    return value in ("1", "true", "on", "yes", "")


def grouped_mm_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `torch._grouped_mm` runs and is right for `dtype` on `device` (probed once).

    The probe multiplies 11 rows in 3 groups (one empty) by a transposed weight view, the layout
    `grouped_linear` uses, and compares with one matmul per group in float32.
    """
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if key in _PROBED:
        return _PROBED[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("grouped_mm_available: the one-time probe reads its result back, "
                           "which a CUDA graph capture forbids; run one forward before "
                           "capturing")
    ok = False
    if hasattr(torch, "_grouped_mm"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(11, 16, generator=g)  # [n, K]
        w = torch.randn(3, 24, 16, generator=g)  # [G, N, K]
        ends = (4, 4, 11)
        want = torch.cat([x[s:e] @ w[i].T for i, (s, e) in
                          enumerate(zip((0, *ends[:-1]), ends, strict=True))])
        try:
            got = torch._grouped_mm(x.to(device, dtype), w.to(device, dtype).transpose(1, 2),
                                    offs=torch.tensor(ends, dtype=torch.int32, device=device))
            tol = 1e-4 if dtype == torch.float32 else 0.1
            ok = bool((got.float().cpu() - want).abs().max() <= tol * want.abs().max())
        except (RuntimeError, NotImplementedError, TypeError):
            ok = False
    _PROBED[key] = ok
    return ok


def _aligned(*tensors: torch.Tensor) -> bool:
    """16-byte aligned base pointers and row strides (what `_grouped_mm` asks of its operands)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[-2:] if s != 1):
            return False
    return True


def packed_kernel_applies(x: torch.Tensor, weight: PackedWeight | torch.Tensor) -> bool:
    """Whether `grouped_linear` can run the weights through the Triton kernel
    (probe.runtime.quant_gemm: bf16 rows on a CUDA device; a PackedWeight, or a dense bf16
    tensor), rather than expanding them / using torch."""
    fmt = weight.fmt if isinstance(weight, PackedWeight) else (
        "bf16" if weight.dtype == torch.bfloat16 else None)
    return (x.is_cuda and x.dtype == torch.bfloat16 and quant_gemm.triton is not None
            and fmt in ("bf16", "mxfp4", "fp8_block"))


def gemm_path(x: torch.Tensor, weight: torch.Tensor | PackedWeight, *,
              use_grouped_mm: bool = True, backend: str = "torch") -> str:
    """Which GEMM `grouped_linear` runs for rows like x (dtype, device, alignment; a non-empty
    batch) and `weight`: "triton" (probe.runtime.quant_gemm's kernel), "grouped_mm"
    (`torch._grouped_mm`, of the weights expanded first when they are a PackedWeight) or
    "loop" (one F.linear per non-empty group: reads the group sizes back to the host, so it
    cannot be captured in a CUDA graph)."""
    if packed_kernel_applies(x, weight) and (backend == "triton"
                                             or isinstance(weight, PackedWeight)):
        return "triton"
    if isinstance(weight, PackedWeight):  # expanded to x's dtype: a fresh contiguous tensor
        dtype, w_ok = x.dtype, weight.shape[2] * x.element_size() % 16 == 0
    else:
        dtype, w_ok = weight.dtype, _aligned(weight.transpose(1, 2))
    if (use_grouped_mm and x.dtype == dtype and w_ok and _aligned(x)
            and weight.shape[1] * x.element_size() % 16 == 0
            and grouped_mm_available(x.dtype, x.device)):
        return "grouped_mm"
    return "loop"


def grouped_linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, offs: torch.Tensor,
                   bias: torch.Tensor | None = None, slot: torch.Tensor | None = None, *,
                   use_grouped_mm: bool = True, backend: str = "torch",
                   x_index: torch.Tensor | None = None,
                   config: KernelConfig | None = None) -> torch.Tensor:
    """Rows grouped by expert through their expert's linear map: x [n, K] -> [n, N].

    Args:
        x: [n, K], rows sorted by expert (group i is rows offs[i-1]:offs[i]).
        weight: [G, N, K] (nn.Linear layout per expert), dense or a `PackedWeight` (kept in
            MXFP4 / FP8: on a GPU the Triton kernel expands its tiles in registers; elsewhere
            the layer is dequantized to x's dtype for the call).
        offs: int32 [G], end row of each group (cumulative counts, offs[-1] == n); or int32
            [G + 1] with a leading 0 (`Permutation.offsets`), which the Triton kernel takes
            as it is (no concatenated copy).
        bias: [G, N] or None; needs `slot`.
        slot: int64 [n], the group of each row (sorted), for the bias gather.
        use_grouped_mm: allow `torch._grouped_mm` (it is used only where it applies).
        backend: "torch" (grouped_mm / per-group F.linear for dense weights) or "triton" (dense
            bf16 weights through probe.runtime.quant_gemm's kernel too, where it applies: bf16
            rows on CUDA). Packed weights take the Triton kernel wherever it applies. On the
            Triton path the bias is added in the kernel's epilogue (no gathered [n, N] copy).
        x_index: int [n] or None; given, x is [T, K] in token order and sorted row i is
            x[x_index[i]]: the Triton kernel gathers the rows in its loads, other paths
            index_select them first.
        config: the Triton kernel's tile shape and launch options (None: its default for the
            weights' format); ignored where another GEMM runs.
    """
    if bias is not None and slot is None:
        raise ValueError("grouped_linear: bias needs slot (the group of each row)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    groups = weight.shape[0]
    if offs.dim() != 1 or offs.shape[0] not in (groups, groups + 1):
        raise ValueError(f"offs must be [G] group ends or [G + 1] offsets (G = {groups}), got "
                         f"{list(offs.shape)}")
    full = offs.shape[0] == groups + 1  # [G + 1], leading 0
    ends = offs[1:] if full else offs  # [G] (a view)
    if backend == "triton" and not isinstance(weight, PackedWeight) \
            and packed_kernel_applies(x, weight):
        weight = PackedWeight("bf16", tuple(weight.shape), (weight.contiguous(),))
    if isinstance(weight, PackedWeight):
        if packed_kernel_applies(x, weight):
            if not full:
                starts = torch.zeros(1, dtype=torch.int32, device=x.device)
                offs = torch.cat((starts, offs.to(torch.int32)))
            return grouped_matmul(x, weight, offs, bias=bias, x_index=x_index, config=config)
        weight = weight.dense(x.dtype)
    if x_index is not None:
        x = x.index_select(0, x_index)  # [n, K]  # the twin: expand the whole layer, then as dense
    w_t = weight.transpose(1, 2)  # [G, K, N]
    if (use_grouped_mm and x.dtype == weight.dtype and x.shape[0] > 0
            and grouped_mm_available(x.dtype, x.device) and _aligned(x, w_t)
            and weight.shape[1] * x.element_size() % 16 == 0):
        y = torch._grouped_mm(x, w_t, offs=ends)  # [n, N]
    else:
        y = x.new_empty((x.shape[0], weight.shape[1]))
        start = 0
        # (no rows: nothing to read back; otherwise the one host read of this path)
        for i, end in enumerate(ends.tolist() if x.shape[0] else ()):
            if end > start:
                y[start:end] = F.linear(x[start:end], weight[i])
            start = end
    if bias is not None:
        y = y + bias.index_select(0, slot)  # [n, N]
    return y


class GroupedExperts:
    """One layer's local experts, stacked, run in one grouped GEMM per projection.

    Args:
        w_gate_up: [E_local, 2F, D], gate rows first, then up rows.
        w_down: [E_local, D, F]. Both dense tensors, or both `PackedWeight`s (expert weights
            kept in their storage format; see `grouped_linear`).
        activate: the family's nonlinearity (`MoEBlock.activate`).
        b_gate_up, b_down: [E_local, 2F] and [E_local, D], or None (no expert biases).
        grouped: use `torch._grouped_mm` where it applies (None: `grouped_default()`).
        glu: the nonlinearity as a `GluSpec` (the same function as `activate`); given, the
            gate/up bias and the nonlinearity run as one kernel (`probe.runtime.glu.fused_glu`)
            where it applies (CUDA), instead of `activate` op by op.
        backend: "torch" or "triton": the GEMM for dense bf16 weights on CUDA (see
            `grouped_linear`); the Triton kernel also adds the biases in its epilogue.
        permute: how rows are sorted by expert and put back. "torch" (a stable sort,
            searchsorted, index_select; un-permute by index_copy, then the combine); "triton"
            (`probe.runtime.permute`: three launches that sort and gather the rows, and `moe`'s
            weighted sum as one kernel reading each expert output row once); "gather" (as
            "triton", but where the gate/up GEMM is the Triton kernel its loads gather the
            token rows, so the sorted [T*K, D] copy is never written). The Triton forms apply
            on CUDA (or under TRITON_INTERPRET=1); elsewhere "torch" runs.
        gemm_configs: a `GemmConfigs`: the Triton GEMM's config per projection (None: its
            defaults), where that kernel runs.
    The tensors are referenced, not copied.
    """

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, activate: Activation, *,
                 b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
                 grouped: bool | None = None, glu: GluSpec | None = None,
                 backend: str = "torch", permute: str = "torch",
                 gemm_configs: GemmConfigs | None = None) -> None:
        if len(w_gate_up.shape) != 3 or len(w_down.shape) != 3:
            raise ValueError(f"w_gate_up [E, 2F, D] and w_down [E, D, F] must be 3-d, got "
                             f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
        if isinstance(w_gate_up, PackedWeight) != isinstance(w_down, PackedWeight):
            raise ValueError("w_gate_up and w_down must both be tensors or both PackedWeight")
        e, two_f, d = w_gate_up.shape
        if two_f % 2 or tuple(w_down.shape) != (e, d, two_f // 2):
            raise ValueError(f"w_down {tuple(w_down.shape)} does not fit w_gate_up "
                             f"{tuple(w_gate_up.shape)}: expected {(e, d, two_f // 2)}")
        if (b_gate_up is None) != (b_down is None):
            raise ValueError("b_gate_up and b_down go together (both or neither)")
        if b_gate_up is not None and (tuple(b_gate_up.shape) != (e, two_f)
                                      or tuple(b_down.shape) != (e, d)):
            raise ValueError(f"b_gate_up {tuple(b_gate_up.shape)} / b_down "
                             f"{tuple(b_down.shape)} must be {(e, two_f)} / {(e, d)}")
        self.w_gate_up, self.w_down = w_gate_up, w_down
        self.b_gate_up, self.b_down = b_gate_up, b_down
        if glu is not None and not isinstance(glu, GluSpec):
            raise TypeError(f"glu must be a GluSpec or None, got {type(glu).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if permute not in PERMUTES:
            raise ValueError(f"permute must be one of {PERMUTES}, got {permute!r}")
        if gemm_configs is not None and not isinstance(gemm_configs, GemmConfigs):
            raise TypeError(f"gemm_configs must be a GemmConfigs or None, got "
                            f"{type(gemm_configs).__name__}")
        self.gemm_configs = gemm_configs or GemmConfigs()
        self.permute = permute
        self._bounds_cache: dict[torch.device, torch.Tensor] = {}
        self.activate = activate
        self.grouped = grouped_default() if grouped is None else bool(grouped)
        self.glu = glu
        self.backend = backend

    @classmethod
    def from_block(cls, block, grouped: bool | None = None, *, fused: bool = False,
                   backend: str = "torch", permute: str = "torch",
                   gemm_configs: GemmConfigs | None = None) -> GroupedExperts:
        """The experts of a `MoEBlock` (its parameters, or its packed weights, referenced);
        fused: run bias and nonlinearity as one kernel where it applies (`glu`)."""
        bias = block.cfg.expert_bias
        w_gate_up, w_down = block.packed or (block.w_gate_up, block.w_down)
        return cls(w_gate_up, w_down, block.activate,
                   b_gate_up=block.b_gate_up if bias else None,
                   b_down=block.b_down if bias else None, grouped=grouped,
                   glu=GluSpec.of_config(block.cfg) if fused else None, backend=backend,
                   permute=permute, gemm_configs=gemm_configs)

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    def uses_grouped_mm(self, dtype: torch.dtype | None = None) -> bool:
        """Whether forward runs `torch._grouped_mm` (rather than one F.linear per expert).
        Packed weights never do (they run the Triton kernel or are expanded), nor bf16 on
        CUDA with backend "triton"."""
        w = self.w_gate_up
        if isinstance(w, PackedWeight):
            return False
        dtype = w.dtype if dtype is None else dtype
        if (self.backend == "triton" and w.is_cuda and dtype == torch.bfloat16
                and quant_gemm.triton is not None):
            return False
        return (self.grouped and dtype == w.dtype and grouped_mm_available(dtype, w.device)
                and _aligned(w.transpose(1, 2), self.w_down.transpose(1, 2))
                and w.shape[1] * w.element_size() % 16 == 0)

    def forward_sorted(self, x: torch.Tensor, offs: torch.Tensor,
                       slot: torch.Tensor | None = None, *,
                       x_index: torch.Tensor | None = None) -> torch.Tensor:
        """Rows already grouped by expert: x [n, D], offs int32 [E_local] (group ends; or
        [E_local + 1] with a leading 0, see `grouped_linear`) -> [n, D] unweighted expert
        outputs. slot int64 [n] (each row's expert) is needed only
        with biases. x_index int [n]: x is [T, D] in token order and sorted row i is
        x[x_index[i]] (gathered by the gate/up GEMM where it is the Triton kernel)."""
        if tuple(offs.shape) not in ((self.num_experts,), (self.num_experts + 1,)):
            raise ValueError(f"offs must have one end per expert ({self.num_experts}) or be the "
                             f"[E + 1] offsets with a leading 0, got {tuple(offs.shape)}")
        if self.b_gate_up is not None and slot is None:
            raise ValueError("forward_sorted: experts with biases need slot")
        opts = {"use_grouped_mm": self.grouped, "backend": self.backend}
        fuse = self.glu is not None and fused_glu_applies(x)
        # the bias goes where it costs least: the Triton GEMM's epilogue, else the fused GLU
        bias_in_gemm = self.b_gate_up is not None and (
            not fuse or (packed_kernel_applies(x, self.w_gate_up)
                         and (self.backend == "triton"
                              or isinstance(self.w_gate_up, PackedWeight))))
        gate_up = grouped_linear(x, self.w_gate_up, offs,
                                 self.b_gate_up if bias_in_gemm else None,
                                 slot if bias_in_gemm else None, x_index=x_index,
                                 config=self.gemm_configs.gate_up, **opts)  # [n, 2F]
        if fuse:
            glu_bias = None if bias_in_gemm or self.b_gate_up is None else self.b_gate_up
            h = fused_glu(gate_up, self.glu, glu_bias, slot if glu_bias is not None else None)
        else:
            h = self.activate(gate_up)
        h = h.to(x.dtype)  # [n, F]
        return grouped_linear(h, self.w_down, offs, self.b_down, slot,
                              config=self.gemm_configs.down, **opts).to(x.dtype)  # [n, D]

    def __call__(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Each row through its expert, unweighted: x [n, D], slot int64 [n] (local expert
        index, on x's device) -> [n, D]. Sorting and un-permuting stay on the device; on the
        CPU an out-of-range slot is a ValueError (on an accelerator it is not checked, which
        would need a host read)."""
        if slot.shape != x.shape[:1]:
            raise ValueError(f"slot {tuple(slot.shape)} must have one entry per row of x "
                             f"{tuple(x.shape)}")
        if self._triton_permute(x):
            p, y = self._forward_permuted(x, slot.to(x.device)[:, None])
            return y.index_select(0, p.inv[:, 0])  # un-permute
        order, slot_sorted, offs = self._permutation(slot, x.device)
        y = self.forward_sorted(x.index_select(0, order), offs, slot_sorted)  # [n, D]
        return torch.empty_like(y).index_copy_(0, order, y)  # un-permute

    def why_not_capturable(self, x: torch.Tensor) -> str | None:
        """None when `moe` / `__call__` on rows like x [T, D] (dtype, device) read nothing back
        to the host and launch work of host-known shapes only, so they can be captured in a
        CUDA graph (after one warm-up call outside it); else the reason (see the module
        docstring). Runs the one-time `torch._grouped_mm` probe, so call it before capturing."""
        if not x.is_cuda:
            return "x is not on a CUDA device (a CUDA graph captures CUDA work only)"
        d, f = self.w_gate_up.shape[2], self.w_down.shape[2]
        opts = {"use_grouped_mm": self.grouped, "backend": self.backend}
        # the rows each GEMM reads are fresh contiguous tensors: an empty one of the same
        # width has their dtype, device and row stride
        for name, w, width in (("gate/up", self.w_gate_up, d), ("down", self.w_down, f)):
            if gemm_path(x.new_empty((0, width)), w, **opts) != "loop":
                continue
            if not self.grouped:
                why = "grouped=False"
            elif isinstance(w, PackedWeight):
                why = f"{w.fmt} weights off the Triton kernel are expanded and looped"
            else:
                why = (f"torch._grouped_mm does not apply to {w.dtype} weights and {x.dtype} "
                       f"rows on {x.device} (or the rows are not 16-byte aligned)")
            return (f"the {name} GEMM runs one F.linear per expert, which reads the group "
                    f"sizes back to the host ({why})")
        return None

    def _triton_permute(self, x: torch.Tensor) -> bool:
        """Whether this call sorts rows with the Triton kernels (option on, and they apply)."""
        return self.permute != "torch" and perm_kernels.triton_applies(x)

    def _gathers_in_gemm(self, x: torch.Tensor) -> bool:
        """Whether permute "gather" leaves the row gather to the gate/up GEMM: the Triton
        kernel runs it (packed weights, or backend "triton")."""
        return (self.permute == "gather" and packed_kernel_applies(x, self.w_gate_up)
                and (self.backend == "triton" or isinstance(self.w_gate_up, PackedWeight)))

    def _forward_permuted(self, x: torch.Tensor, topk_slot: torch.Tensor):
        """(Permutation, expert outputs [T*K, D] in sorted order) through the Triton
        permutation: x [T, D], topk_slot [T, K] local slots."""
        in_gemm = self._gathers_in_gemm(x)
        p = perm_kernels.permute(x, topk_slot, self.num_experts, gather_rows=not in_gemm)
        # the [E_local + 1] offsets as they are (the Triton GEMM takes them without a copy)
        if in_gemm:
            y = self.forward_sorted(x, p.offsets, p.slot, x_index=p.token)
        else:
            y = self.forward_sorted(p.rows, p.offsets, p.slot)
        return p, y  # y [T*K, D]

    def _permutation(self, slot: torch.Tensor, device: torch.device):
        """(order int64 [n]: rows sorted by slot, stable; slot[order]; offsets int32
        [E_local + 1]: a leading 0, then each group's end), on the device, without a host
        read: one stable sort (values and indices together) and one searchsorted of the
        sorted slots for the group bounds 0..E_local (offsets[e] = rows with slot < e, the
        cumulative counts)."""
        slot = slot.to(device=device, dtype=torch.int64)
        if device.type == "cpu" and slot.numel() and (
                int(slot.min()) < 0 or int(slot.max()) >= self.num_experts):
            raise ValueError(f"slot must lie in [0, {self.num_experts}), got "
                             f"[{int(slot.min())}, {int(slot.max())}]")
        slot_sorted, order = torch.sort(slot, stable=True)  # [n], [n]
        offsets = torch.searchsorted(slot_sorted, self._bounds(device),
                                     out_int32=True)  # [E_local + 1]
        return order, slot_sorted, offsets

    def _bounds(self, device: torch.device) -> torch.Tensor:
        """int64 [E_local + 1] = 0..E_local on `device`, made once per device outside a CUDA
        graph capture (inside one it is made by the graph, and not kept)."""
        cached = self._bounds_cache.get(device)
        if cached is not None:
            return cached
        bounds = torch.arange(self.num_experts + 1, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self._bounds_cache[device] = bounds
        return bounds

    def moe(self, x: torch.Tensor, topk_slot: torch.Tensor, topk_weights: torch.Tensor,
            combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
            ) -> torch.Tensor:
        """A whole routed MoE: x [T, D], topk_slot [T, K], topk_weights [T, K] -> [T, D]:
        every (token, k) pair through its expert, then `combine(y [T, K, D], topk_weights)`;
        combine None is `MoEBlock.combine`'s weighted sum (fp32, one rounding to x's dtype),
        which permute "triton" / "gather" run as one kernel straight from the sorted rows."""
        n_tok, k = topk_slot.shape
        if tuple(topk_weights.shape) != (n_tok, k) or x.shape[0] != n_tok:
            raise ValueError(f"x [T, D], topk_slot and topk_weights [T, K] disagree: "
                             f"{tuple(x.shape)}, {tuple(topk_slot.shape)}, "
                             f"{tuple(topk_weights.shape)}")
        if self._triton_permute(x):
            p, y = self._forward_permuted(x, topk_slot.to(x.device))
            if combine is None:
                return perm_kernels.combine(y, p.inv, topk_weights)  # [T, D]
            y = y.index_select(0, p.inv.reshape(-1))  # un-permute, [T*K, D]
        else:
            order, slot_sorted, offs = self._permutation(topk_slot.reshape(-1), x.device)
            # row r of the (token, k) pairs is token r // K: gather the sorted rows straight
            # from x (no [T*K, D] copy of the repeated tokens first)
            y = self.forward_sorted(x.index_select(0, order // k), offs,
                                    slot_sorted)  # [T*K, D]
            y = torch.empty_like(y).index_copy_(0, order, y)  # un-permute
        return (combine or weighted_sum)(y.view(n_tok, k, -1), topk_weights)


def weighted_sum(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """`MoEBlock.combine`: y [T, K, D], topk_weights [T, K] -> [T, D], the sum over K in fp32
    (fp64 for fp64 y), rounded once to y's dtype."""
    wide = torch.promote_types(y.dtype, torch.float32)
    return (y.to(wide) * topk_weights.to(wide)[..., None]).sum(dim=1).to(y.dtype)


def loop_experts(x: torch.Tensor, slot: torch.Tensor, w_gate_up: torch.Tensor,
                 w_down: torch.Tensor, activate: Activation,
                 b_gate_up: torch.Tensor | None = None,
                 b_down: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin of `GroupedExperts.__call__`: one F.linear pair per expert, in a Python loop.

    x [n, D], slot int64 [n] (local expert index) -> [n, D] unweighted expert outputs.
    """
    out = torch.empty_like(x)
    for i in range(w_gate_up.shape[0]):
        rows = torch.nonzero(slot == i).flatten()  # [n_i]
        if rows.numel() == 0:
            continue
        gate_up = F.linear(x[rows], w_gate_up[i],
                           None if b_gate_up is None else b_gate_up[i])  # [n_i, 2F]
        out[rows] = F.linear(activate(gate_up), w_down[i],
                             None if b_down is None else b_down[i]).to(x.dtype)  # [n_i, D]
    return out
