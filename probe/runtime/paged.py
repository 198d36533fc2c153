"""A paged KV cache for the no-sync decode step, and the memory accounting of a rank.

Shape legend (as in `probe.runtime.decode`): B decode rows, Bp rows after padding to a bucket,
P blocks in the pool, b positions per block (`block_size`), nb blocks a row's table holds,
Hkv key/value heads, Dq key width, Dv value width.

- `PagedKVCache` holds every layer's keys and values in ONE pool of fixed-size blocks,
  allocated once: keys[l] [P + 1, b, Hkv, Dq], values[l] [P + 1, b, Hkv, Dv] (block P is
  scratch: padding rows and the unused entries of a block table point there). A sequence owns
  a list of blocks (its block table): position j lives at offset j % b of block table[j // b].
  `sequence(num_tokens)` reserves the blocks of a whole request (prompt + max new tokens) up
  front, so a running request never runs out of blocks and nothing is ever preempted; a
  request that does not fit waits (`fits`), and its blocks return to the pool when it ends.
  Nothing is reallocated per step and no sequence is padded to the longest: a request holds
  ceil(its tokens / b) blocks.
- `write_read` (what `decode_forward` calls per layer) writes the new token's key and value
  at (table[position // b], position % b) and gathers the nb blocks of each row's table
  (one copy, [B, nb, b, Hkv, .], read as [B, Hkv, nb * b, .]);
  `probe.runtime.decode.masked_attention` then masks every position past the row's own
  (and outside a sliding window), so scratch and stale entries never count. The gathered keys
  hold the same values in the same order as the static cache's first nb * b positions, so
  the logits equal the static path's (within 1e-12 in fp64 on the CPU, tests/test_paged.py).
- `PagedDecodeRunner` is `DecodeRunner` with block tables: the host builds one [Bp, 2 + nb]
  int64 buffer per step (id, position, then the row's block table padded with the scratch
  block), nb = the kv-length bucket / b, so a (batch bucket, kv-length bucket) pair has fixed
  shapes and one CUDA graph.

Memory (`MemoryPlan`, `plan_memory`): a budget of bytes per rank pays for the replica slots
first (R slots x the bytes of one expert x 2 buffers, the double-buffered `SlotPool` of
`probe.runtime.transfer`; experts kept packed in MXFP4 / FP8 cost their packed bytes per slot),
the rest becomes KV blocks; the plan states both and the number of requests of a given length
that fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from probe.runtime.decode import DecodeRunner, _kv_shape, decode_forward
from probe.specs import weight_bytes

__all__ = [
    "MemoryPlan",
    "PagedDecodeRunner",
    "PagedKVCache",
    "PagedSequence",
    "expert_bytes",
    "kv_block_bytes",
    "plan_memory",
]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_block_bytes(cfg, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block (b positions of keys and values, every layer) for `cfg`."""
    hkv, dq, dv = _kv_shape(cfg)
    return cfg.num_layers * block_size * hkv * (dq + dv) * _element_size(dtype)


def expert_bytes(cfg, dtype: torch.dtype, weight_format: str | None = None) -> int:
    """Bytes of one routed expert's weights (gate/up, down and their biases if any): `dtype`
    throughout, or with the two matrices kept in `weight_format` ("mxfp4", "fp8_block":
    `probe.specs.weight_bytes`, scales included; biases stay `dtype`), which is what one
    replica slot of packed experts holds (`probe.runtime.transfer.SlotPool.slot_bytes`)."""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    bias = ((2 * f + d) if cfg.expert_bias else 0) * _element_size(dtype)
    if weight_format is None:
        return (2 * f * d + d * f) * _element_size(dtype) + bias
    return weight_bytes(weight_format, 2 * f, d) + weight_bytes(weight_format, d, f) + bias


@dataclass(frozen=True)
class MemoryPlan:
    """How one rank's memory budget splits between replica slots and the KV pool.

    budget_bytes: the budget (None: the pool was sized by block count). replica_bytes: R slots
    x expert bytes x num_buffers, reserved first. kv_blocks, block_size, kv_pool_bytes: the
    pool. requests_that_fit: concurrent requests of `tokens_per_request` tokens the pool holds.
    weight_format: the packed format the expert bytes were priced in (None: the dtype's).
    """

    budget_bytes: int | None
    replica_slots: int
    replica_bytes: int
    num_buffers: int
    expert_bytes: int
    kv_blocks: int
    block_size: int
    kv_block_bytes: int
    kv_pool_bytes: int
    tokens_per_request: int
    requests_that_fit: int
    weight_format: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_memory(cfg, dtype: torch.dtype, *, block_size: int, tokens_per_request: int,
                budget_bytes: int | None = None, kv_blocks: int | None = None,
                replica_slots: int = 0, num_buffers: int = 2,
                weight_format: str | None = None) -> MemoryPlan:
    """Split a rank's memory between replica slots and KV blocks.

    Give either `budget_bytes` (the pool gets what the replica slots leave) or `kv_blocks`.
    tokens_per_request: the length (prompt + max new tokens) `requests_that_fit` counts in.
    weight_format: the experts' storage format when kept packed (`MoETransformer.expert_format`):
    a slot then costs the packed bytes (`expert_bytes`), not `dtype`'s.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if tokens_per_request < 1:
        raise ValueError(f"tokens_per_request must be >= 1, got {tokens_per_request}")
    if replica_slots < 0:
        raise ValueError(f"replica_slots must be >= 0, got {replica_slots}")
    if (budget_bytes is None) == (kv_blocks is None):
        raise ValueError("give exactly one of budget_bytes and kv_blocks")
    w = expert_bytes(cfg, dtype, weight_format)
    replica = replica_slots * w * num_buffers
    block = kv_block_bytes(cfg, block_size, dtype)
    if budget_bytes is not None:
        if budget_bytes < replica + block:
            raise ValueError(f"budget_bytes {budget_bytes} does not hold the replica slots "
                             f"({replica} bytes) and one KV block ({block} bytes)")
        kv_blocks = (budget_bytes - replica) // block
    elif kv_blocks < 1:
        raise ValueError(f"kv_blocks must be >= 1, got {kv_blocks}")
    per_request = math.ceil(tokens_per_request / block_size)
    return MemoryPlan(budget_bytes, replica_slots, replica, num_buffers, w, int(kv_blocks),
                      block_size, block, int(kv_blocks) * block, tokens_per_request,
                      int(kv_blocks) // per_request, weight_format)


class PagedKVCache:
    """Keys and values of any number of sequences in one pool of `num_blocks` blocks of
    `block_size` positions, every layer, allocated once.

    keys[l] [P + 1, b, Hkv, Dq], values[l] [P + 1, b, Hkv, Dv] (block P is scratch).
    max_len: the most positions one sequence may hold (its block table's width is
    ceil(max_len / b)).
    """

    def __init__(self, cfg, num_blocks: int, block_size: int, max_len: int, *,
                 dtype: torch.dtype, device: str | torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        hkv, dq, dv = _kv_shape(cfg)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_len = max_len
        self.max_blocks = math.ceil(max_len / block_size)  # table width of one sequence
        self.scratch = num_blocks
        self.keys = [torch.zeros(num_blocks + 1, block_size, hkv, dq, dtype=dtype, device=device)
                     for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(num_blocks + 1, block_size, hkv, dv, dtype=dtype,
                                   device=device) for _ in range(cfg.num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` positions can be reserved now."""
        return self.blocks_for(num_tokens) <= len(self._free)

    def sequence(self, num_tokens: int) -> PagedSequence:
        """Reserve the blocks of a sequence of at most `num_tokens` positions (RuntimeError
        when too few blocks are free; ValueError when it exceeds max_len)."""
        if not 1 <= num_tokens <= self.max_len:
            raise ValueError(f"num_tokens must lie in [1, {self.max_len}] (max_len), "
                             f"got {num_tokens}")
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"PagedKVCache: {need} blocks needed, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(need)]
        return PagedSequence(self, blocks, num_tokens)

    def release(self, blocks: Sequence[int]) -> None:
        held = set(self._free)
        for blk in blocks:
            if not 0 <= blk < self.num_blocks or blk in held:
                raise ValueError(f"block {blk} is not an allocated block")
            held.add(blk)
        self._free.extend(reversed(list(blocks)))

    def table(self, blocks: Sequence[int], width: int) -> list[int]:
        """A block table of `width` entries: `blocks`, then the scratch block."""
        if len(blocks) > width:
            blocks = blocks[:width]
        return [*blocks, *[self.scratch] * (width - len(blocks))]

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
                   positions: torch.Tensor, kv_len: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k [B, Hkv, Dq], v [B, Hkv, Dv] at each row's position of `layer` and return
        the row's nb blocks gathered: keys [B, Hkv, nb * b, Dq], values [B, Hkv, nb * b, Dv].
        tables [B, nb] int64 (block ids, scratch past the sequence), positions [B] int64
        (< nb * b). kv_len is ignored: the table's width says how much is read."""
        keys, values = self.keys[layer], self.values[layer]  # [P+1, b, Hkv, .]
        n_rows, nb = tables.shape
        bsz = self.block_size
        block = tables.gather(1, (positions // bsz)[:, None])[:, 0]  # [B]
        at = (block, positions % bsz)  # [B] each: a row's key lands at keys[block, offset]
        keys.index_put_(at, k.to(keys.dtype))
        values.index_put_(at, v.to(values.dtype))
        k_all = keys[tables].view(n_rows, nb * bsz, *keys.shape[2:])  # [B, nb*b, Hkv, Dq]
        v_all = values[tables].view(n_rows, nb * bsz, *values.shape[2:])  # [B, nb*b, Hkv, Dv]
        return k_all.transpose(1, 2), v_all.transpose(1, 2)  # [B, Hkv, nb*b, .]


class PagedSequence:
    """One sequence's blocks of a `PagedKVCache` behind the `KVCache` interface of
    `probe.runtime.model` (eager prefill): `length` tokens cached; `append(layer, k, v)`
    writes in place and returns copies of all its keys and values."""

    def __init__(self, store: PagedKVCache, blocks: list[int], capacity: int) -> None:
        self.store = store
        self.blocks = blocks
        self.capacity = capacity
        self.length = 0
        self._released = False

    @property
    def address(self) -> list[int]:
        """Where `PagedDecodeRunner` finds this sequence: its block list."""
        return self.blocks

    def release(self) -> None:
        """Give the blocks back to the pool (once)."""
        if self._released:
            raise ValueError("sequence already released")
        self._released = True
        self.store.release(self.blocks)

    def _index(self, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, end)
        blocks = torch.tensor(self.blocks, dtype=torch.int64)[pos // self.store.block_size]
        return blocks.to(device), (pos % self.store.block_size).to(device)  # [t] x2

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k [t, Hkv, Dq], v [t, Hkv, Dv] after the cached tokens of `layer`; return all
        keys [s, Hkv, Dq] and values [s, Hkv, Dv] of the sequence."""
        end = self.length + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"sequence of {end} tokens exceeds the {self.capacity} positions "
                             f"reserved for it")
        keys, values = self.store.keys[layer], self.store.values[layer]  # [P+1, b, Hkv, .]
        blk, off = self._index(self.length, end, k.device)
        keys[blk, off] = k.to(keys.dtype)  # [t, Hkv, Dq]
        values[blk, off] = v.to(values.dtype)
        blk, off = self._index(0, end, k.device)
        return keys[blk, off], values[blk, off]  # [s, Hkv, .]


class PagedDecodeRunner(DecodeRunner):
    """`DecodeRunner` over a `PagedKVCache`: each row names its block list instead of a slot.

    Per (batch bucket, kv-length bucket) the device holds one [Bp, 2 + nb] int64 buffer (id,
    position, block table padded with the scratch block; padding rows: token 0 at position 0,
    all scratch), nb = ceil(kv-length bucket / b). Buckets default to powers of two up to
    `max_batch`.
    """

    def __init__(self, model, cache: PagedKVCache, *, use_graphs: bool, max_batch: int,
                 buckets: Sequence[int] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        from probe.runtime.decode import default_buckets

        super().__init__(model, cache, use_graphs=use_graphs,
                         buckets=buckets or default_buckets(max_batch))

    def _width(self, kv_len: int) -> int:
        return min(self.cache.max_blocks, math.ceil(kv_len / self.cache.block_size))

    def _host_inputs(self, ids: Sequence[int], where: Sequence, positions: Sequence[int],
                     bucket: int, kv_len: int) -> torch.Tensor:
        nb = self._width(kv_len)
        scratch = [0, 0, *[self.cache.scratch] * nb]
        rows = [[i, p, *self.cache.table(blocks, nb)]
                for i, blocks, p in zip(ids, where, positions, strict=True)]
        return torch.tensor(rows + [scratch] * (bucket - len(rows)),
                            dtype=torch.int64).view(bucket, 2 + nb)  # [Bp, 2 + nb]

    def _run(self, inputs: torch.Tensor, kv_len: int) -> torch.Tensor:
        return decode_forward(self.model, self.cache, inputs[:, 0], inputs[:, 2:],
                              inputs[:, 1])

    def _check_rows(self, ids, where, positions) -> None:
        super()._check_rows(ids, where, positions)
        bsz = self.cache.block_size
        for blocks, p in zip(where, positions, strict=True):
            if p // bsz >= len(blocks):
                raise ValueError(f"position {p} lies past the row's {len(blocks)} blocks")
