"""The MoE token permutation (rows sorted by expert) and the weighted un-permute, as Triton kernels.

Shapes: T tokens, K top-k, D hidden, E experts, n = T * K (token, k) pairs; pair r = t * K + j.

    permute:  topk_ids [T, K] -> rows sorted by expert (stable: within an expert, by pair
              index, the order of `torch.argsort(topk_ids.flatten(), stable=True)`), offsets
              [E + 1] (where each expert's rows start), the inverse map inv [T, K] (the sorted
              row of every pair) and, optionally, the gathered rows x[token of row] [n, D];
    combine:  y[t] = sum_j w[t, j] * out[inv[t, j]]  (fp32 sum over j in order, one rounding).

`permute` is three launches and never reads a count on the host (so it can be captured in a
CUDA graph): (1) every BLOCK pairs count their experts (a one-hot sum) into a [blocks, E]
table; (2) one program scans the table, many blocks per step: the expert offsets (cumulative
counts) and, per block and expert, the first sorted row the block writes; (3) every block
ranks each pair among the earlier pairs of the block with the same expert, which gives its
sorted row, writes the index maps and copies the token rows of x into place, BD columns per
program (contiguous loads and stores of whole row segments). `combine` is one launch: one
program per token and BD columns reads the token's K expert-output rows once and writes the
output row once.

`permute_ref` and `combine_ref` are the obviously correct torch twins (argsort, scatter_add,
cumsum, index_select; a loop over K), and the tests compare the kernels with them: the index
maps and rows bitwise, the combine bitwise for fp32 outputs under the interpreter and within
one rounding for bf16 (the interpreter truncates to bf16; on a GPU the compiler may also
contract the multiply-add into an FMA).

The kernels run on CUDA tensors and under Triton's interpreter (TRITON_INTERPRET=1);
`triton_applies` says when.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["Permutation", "combine", "combine_ref", "permute", "permute_ref", "triton_applies"]

try:  # pragma: no cover - triton is optional (runtime extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass(frozen=True)
class Permutation:
    """Where every (token, k) pair goes when the pairs are sorted by expert.

    Attributes:
        token: int64 [n], the token of each sorted row (x row to read).
        slot: int64 [n], the expert of each sorted row (non-decreasing).
        offsets: int32 [E + 1], expert e's rows are offsets[e]:offsets[e + 1].
        inv: int64 [T, K], the sorted row of pair (t, j).
        rows: [n, D] = x[token] in x's dtype, or None when not gathered.
    """

    token: torch.Tensor
    slot: torch.Tensor
    offsets: torch.Tensor
    inv: torch.Tensor
    rows: torch.Tensor | None = None


def triton_applies(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: triton present, and a CUDA tensor or the
    interpreter switched on."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _check(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got {list(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T, K] with T = {x.shape[0]}, got "
                         f"{list(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if topk_ids.device.type == "cpu" and topk_ids.numel() and (
            int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts}), got "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")


def permute_ref(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
                gather_rows: bool = True) -> Permutation:
    """The torch twin of `permute` (a stable argsort of the flattened ids)."""
    _check(x, topk_ids, num_experts)
    n_tok, k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)  # [n]
    order = torch.argsort(flat, stable=True)  # [n] pair of each sorted row
    slot = flat.index_select(0, order)  # [n]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    inv = torch.empty_like(order).index_copy_(0, order, torch.arange(
        order.numel(), device=x.device)).view(n_tok, k)  # [T, K]
    token = order // k  # [n]
    rows = x.index_select(0, token) if gather_rows else None  # [n, D]
    return Permutation(token, slot, offsets, inv, rows)


def combine_ref(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The torch twin of `combine`: out [T, D] in y's dtype = sum over j (in order, fp32) of
    weights[t, j] * y[inv[t, j]]."""
    n_tok, k = inv.shape
    picked = y.index_select(0, inv.reshape(-1)).view(n_tok, k, y.shape[1]).float()  # [T, K, D]
    w = weights.float()
    acc = torch.zeros((n_tok, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(k):
        acc = acc + w[:, j, None] * picked[:, j]  # [T, D]
    return acc.to(y.dtype)


if triton is not None:

    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, n, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """counts[b, e]: pairs of block b routed to expert e (padding experts included, 0)."""
        b = tl.program_id(0)
        r = b * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(ids_ptr + r, mask=r < n, other=-1)
        idx = tl.arange(0, E_PAD)
        hits = tl.sum((e[:, None] == idx[None, :]).to(tl.int32), axis=0)  # [E_PAD]
        tl.store(counts_ptr + b * E_PAD + idx, hits)

    @triton.jit
    def _scan_kernel(counts_ptr, base_ptr, offs_ptr, num_blocks, E, E_PAD: tl.constexpr,
                     CB: tl.constexpr):
        """offsets[e] = rows of experts < e; base[b, e] = offsets[e] + rows of expert e in
        blocks < b (the first sorted row block b writes for expert e). One program, CB blocks
        of the table per step (a sequential loop over blocks would wait on one load each)."""
        idx = tl.arange(0, E_PAD)
        chunk = tl.arange(0, CB)
        total = tl.zeros((E_PAD,), dtype=tl.int32)
        for b0 in range(0, num_blocks, CB):
            rows = b0 + chunk
            table = tl.load(counts_ptr + rows[:, None] * E_PAD + idx[None, :],
                            mask=(rows < num_blocks)[:, None], other=0)  # [CB, E_PAD]
            total += tl.sum(table, axis=0)
        start = tl.cumsum(total, 0) - total  # [E_PAD] exclusive
        tl.store(offs_ptr + idx, start, mask=idx < E)
        tl.store(offs_ptr + E, tl.sum(total, 0))
        run = start
        for b0 in range(0, num_blocks, CB):
            rows = b0 + chunk
            live = (rows < num_blocks)[:, None]
            table = tl.load(counts_ptr + rows[:, None] * E_PAD + idx[None, :], mask=live,
                            other=0)
            before = tl.cumsum(table, axis=0) - table  # rows of earlier blocks in the chunk
            tl.store(base_ptr + rows[:, None] * E_PAD + idx[None, :], run[None, :] + before,
                     mask=live)
            run += tl.sum(table, axis=0)

    @triton.jit
    def _place_kernel(ids_ptr, base_ptr, x_ptr, rows_ptr, token_ptr, slot_ptr, inv_ptr, n, D,
                      K, stride_x, stride_rows, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
                      BD: tl.constexpr, GATHER: tl.constexpr):
        """Block b's pairs to their sorted rows: the maps (column program 0) and the rows of x
        (BD columns per program)."""
        b = tl.program_id(0)
        pid_d = tl.program_id(1)
        lane = tl.arange(0, BLOCK)
        r = b * BLOCK + lane
        live = r < n
        e = tl.load(ids_ptr + r, mask=live, other=-1).to(tl.int32)
        # rank among the earlier pairs of this block with the same expert (stable order)
        same = (e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)  # [BLOCK]
        first = tl.load(base_ptr + b * E_PAD + e, mask=live, other=0)
        dest = (first + rank).to(tl.int64)  # [BLOCK] sorted row of each pair
        token = (r // K).to(tl.int64)
        if pid_d == 0:
            tl.store(token_ptr + dest, token, mask=live)
            tl.store(slot_ptr + dest, e.to(tl.int64), mask=live)
            tl.store(inv_ptr + r, dest, mask=live)
        if GATHER:
            cols = pid_d * BD + tl.arange(0, BD)
            mask = live[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=mask)
            tl.store(rows_ptr + dest[:, None] * stride_rows + cols[None, :], v, mask=mask)

    @triton.jit
    def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, D, K, stride_y, stride_out,
                        BD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        mask = cols < D
        acc = tl.zeros((BD,), dtype=tl.float32)
        for j in range(K):
            row = tl.load(inv_ptr + t * K + j)
            wt = tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += wt * tl.load(y_ptr + row * stride_y + cols, mask=mask).to(tl.float32)
        tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_d(d: int) -> int:
    """Columns per program for row copies: whole rows up to 1024 (16 KB of fp32)."""
    return max(16, min(1024, triton.next_power_of_2(max(d, 1))))


@functools.lru_cache(maxsize=512)
def _plan(n: int, num_experts: int, d: int, gather_rows: bool) -> tuple[int, ...]:
    """Launch parameters of `permute` for n pairs, E experts and D columns, worked out once per
    shape: (E_PAD, BLOCK, blocks, scan chunk, BD, column programs)."""
    e_pad = triton.next_power_of_2(num_experts)
    # the one-hot count holds BLOCK x E_PAD values; the rank, BLOCK x BLOCK
    block = max(16, min(128, 8192 // e_pad))
    num_blocks = triton.cdiv(n, block)
    chunk = min(triton.next_power_of_2(num_blocks), max(1, 8192 // e_pad))
    bd = _block_d(d)
    grid_d = triton.cdiv(d, bd) if gather_rows and d else 1
    return e_pad, block, num_blocks, chunk, bd, grid_d


def permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
            gather_rows: bool = True) -> Permutation:
    """The (token, k) pairs sorted by expert, on the device (three Triton launches, no host
    read): x [T, D], topk_ids int [T, K] in [0, num_experts) -> `Permutation` (rows gathered
    when gather_rows). Ids are range-checked on the CPU only (a device check needs a read).
    The index maps share one int64 allocation, the offsets and the two [blocks, E_PAD]
    tables one int32 allocation (three allocations a call with the rows, not seven)."""
    if not triton_applies(x):
        raise RuntimeError("permute needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    _check(x, topk_ids, num_experts)
    n_tok, k = topk_ids.shape
    n = n_tok * k
    dev = x.device
    maps = torch.empty(3 * n, dtype=torch.int64, device=dev)  # token, slot, inv
    token, slot, inv = maps[:n], maps[n:2 * n], maps[2 * n:].view(n_tok, k)
    rows = x.new_empty((n, x.shape[1])) if gather_rows else None
    if n == 0:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
        return Permutation(token, slot, offsets, inv, rows)
    ids = topk_ids.reshape(-1).contiguous()
    e_pad, block, num_blocks, chunk, bd, grid_d = _plan(n, num_experts, x.shape[1],
                                                        gather_rows)
    table = num_blocks * e_pad
    # the tables first: with E_PAD >= 2 every part starts 16-byte aligned (as Triton likes)
    ints = torch.empty(2 * table + num_experts + 1, dtype=torch.int32, device=dev)
    counts = ints[:table].view(num_blocks, e_pad)
    base = ints[table:2 * table].view(num_blocks, e_pad)
    offsets = ints[2 * table:]
    _count_kernel[(num_blocks,)](ids, counts, n, E_PAD=e_pad, BLOCK=block)
    _scan_kernel[(1,)](counts, base, offsets, num_blocks, num_experts, E_PAD=e_pad, CB=chunk)
    x_c = x if x.stride(-1) == 1 else x.contiguous()
    _place_kernel[(num_blocks, grid_d)](
        ids, base, x_c, x_c if rows is None else rows, token, slot, inv, n, x.shape[1], k,
        x_c.stride(0), 0 if rows is None else rows.stride(0), E_PAD=e_pad, BLOCK=block, BD=bd,
        GATHER=gather_rows and x.shape[1] > 0)
    return Permutation(token, slot, offsets, inv, rows)


def combine(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [T, D] in y's dtype: out[t] = sum_j weights[t, j] * y[inv[t, j]], summed in fp32
    over j in order and rounded once; one Triton launch. y [n, D] (expert outputs in sorted
    order), inv int64 [T, K] (`Permutation.inv`), weights [T, K] (any float dtype)."""
    if not triton_applies(y):
        raise RuntimeError("combine needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if y.dim() != 2 or inv.dim() != 2 or tuple(weights.shape) != tuple(inv.shape):
        raise ValueError(f"y must be [n, D], inv and weights [T, K]; got {list(y.shape)}, "
                         f"{list(inv.shape)}, {list(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    n_tok, k = inv.shape
    d = y.shape[1]
    out = y.new_empty((n_tok, d))
    if n_tok == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    y = y if y.stride(-1) == 1 else y.contiguous()
    bd = _block_d(d)
    _combine_kernel[(n_tok, triton.cdiv(d, bd))](
        y, inv.contiguous(), weights.contiguous(), out, d, k, y.stride(0), out.stride(0), BD=bd)
    return out
