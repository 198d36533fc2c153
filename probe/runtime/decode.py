"""Decode without host synchronisation: a preallocated KV cache, a static-shape decode step and
its CUDA graphs.

Shape legend (as in `probe.runtime.model`): B decode rows (one new token per sequence), Bp rows
after padding to a bucket, N slots of the cache, S positions per slot, Hkv key/value heads, G
query heads per kv head, Dq key width, Dv value width, D hidden, V vocabulary, E experts, K top-k,
F expert intermediate size.

- `StaticKVCache` holds the keys and values of N sequences, S positions each, per layer, in
  buffers allocated once: keys[l] [N + 1, Hkv, S, Dq], values[l] [N + 1, Hkv, S, Dv]. The extra
  slot N is scratch: padded rows of a bucket write there. `sequence(slot)` gives a view with
  the `KVCache` interface (`length`, `append`), so eager prefill fills a slot through the
  model's own forward; decode writes one position per row with an index op.
- `decode_forward` runs one token per row through the whole model with shapes fixed by Bp
  and a host-chosen kv length alone: no `.item()`, `.tolist()`, `.cpu()`, `bool(tensor)`,
  `nonzero` or data-dependent shape anywhere, so it can be captured in a CUDA graph. Attention
  reads the first kv-length positions of each slot and masks those past the row's own; the MoE
  layers use `static_experts`.
- `DecodeRunner` pads a decode batch to its bucket (1, 2, 4, ... up to N), picks the positions
  attention reads (a power of two above the batch's largest position), copies the inputs into
  static buffers and replays that pair's CUDA graph (captured on first use), or runs
  `decode_forward` eagerly when graphs are off.

The MoE layers run locally (every expert held: expert parallelism of one rank). With more ranks
the dispatch and combine need collectives whose sizes are fixed in the same way (rows padded to
a capacity known to the host): `probe.runtime.dispatch` has them (eager); a multi-rank capture
is not built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from probe.runtime.experts import GroupedExperts
from probe.runtime.model import MoEBlock, MoETransformer, _wide

__all__ = [
    "DecodeRunner",
    "EPDecodeRunner",
    "SlotCache",
    "StaticKVCache",
    "decode_forward",
    "default_buckets",
    "masked_attention",
    "static_attend",
    "static_experts",
]


def _kv_shape(cfg) -> tuple[int, int, int]:
    """(Hkv, Dq, Dv) of the cached keys and values for `cfg`'s attention."""
    if cfg.attention == "mla":  # expanded per-head keys and values (see LatentAttention)
        return cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
    return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim


class StaticKVCache:
    """Keys and values of `num_slots` sequences of at most `max_len` tokens, every layer,
    allocated once.

    keys[l] [N + 1, Hkv, S, Dq], values[l] [N + 1, Hkv, S, Dv] (slot N is scratch for padded
    rows). `allocate()` hands out a free slot, `release(slot)` returns it.
    """

    def __init__(self, cfg, num_slots: int, max_len: int, *, dtype: torch.dtype,
                 device: str | torch.device) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        hkv, dq, dv = _kv_shape(cfg)
        self.num_slots = num_slots
        self.max_len = max_len
        self.scratch = num_slots
        self.keys = [torch.zeros(num_slots + 1, hkv, max_len, dq, dtype=dtype, device=device)
                     for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(num_slots + 1, hkv, max_len, dv, dtype=dtype, device=device)
                       for _ in range(cfg.num_layers)]
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A free slot (RuntimeError when all are taken)."""
        if not self._free:
            raise RuntimeError(f"StaticKVCache: all {self.num_slots} slots are in use")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not an allocated slot")
        self._free.append(slot)

    def release_all(self) -> None:
        """Every slot free again (the contents stay until overwritten)."""
        self._free = list(range(self.num_slots - 1, -1, -1))

    def sequence(self, slot: int) -> SlotCache:
        """A `KVCache`-like view of `slot`, starting empty."""
        return SlotCache(self, slot)

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                   positions: torch.Tensor, kv_len: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k [B, Hkv, Dq], v [B, Hkv, Dv] at (slot, position) of `layer`; return the
        first kv_len positions (default all S) of each row's slot: keys [B, Hkv, s, Dq],
        values [B, Hkv, s, Dv]. slots, positions [B] int64."""
        keys, values = self.keys[layer], self.values[layer]  # [N+1, Hkv, S, .]
        heads = torch.arange(k.shape[1], device=k.device)  # [Hkv]
        at = (slots[:, None], heads[None, :], positions[:, None])  # [B, Hkv] each broadcast
        keys.index_put_(at, k.to(keys.dtype))
        values.index_put_(at, v.to(values.dtype))
        kv_len = self.max_len if kv_len is None else kv_len
        return keys[slots, :, :kv_len], values[slots, :, :kv_len]


class SlotCache:
    """One slot of a `StaticKVCache` behind the `KVCache` interface of `probe.runtime.model`:
    `length` tokens cached; `append(layer, k, v)` writes in place and returns views."""

    def __init__(self, store: StaticKVCache, slot: int) -> None:
        self.store = store
        self.slot = slot
        self.length = 0

    @property
    def address(self) -> int:
        """Where `DecodeRunner` finds this sequence: its slot."""
        return self.slot

    def release(self) -> None:
        """Give the slot back to the cache."""
        self.store.release(self.slot)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k [t, Hkv, Dq], v [t, Hkv, Dv] after the cached tokens of `layer`; return all
        keys [s, Hkv, Dq] and values [s, Hkv, Dv] of the slot (views, no copy)."""
        end = self.length + k.shape[0]
        if end > self.store.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's max_len "
                             f"{self.store.max_len}")
        keys = self.store.keys[layer][self.slot]  # [Hkv, S, Dq]
        values = self.store.values[layer][self.slot]  # [Hkv, S, Dv]
        keys[:, self.length:end] = k.transpose(0, 1)
        values[:, self.length:end] = v.transpose(0, 1)
        return keys[:, :end].transpose(0, 1), values[:, :end].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# The static decode step


def static_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: StaticKVCache, *,
                  layer: int, slots: torch.Tensor, positions: torch.Tensor, scale: float,
                  window: int | None = None, sinks: torch.Tensor | None = None,
                  kv_len: int | None = None) -> torch.Tensor:
    """One new token per row against its slot: q [B, H, Dq], k [B, Hkv, Dq], v [B, Hkv, Dv];
    slots [B] int64 (cache slot of each row), positions [B] int64 (position of the new token).

    Writes k, v at (slot, position) of `layer`, then attends to positions <= the row's own
    (and > position - window when `window` is given), reading only the first `kv_len` positions
    of each slot (default: all S; the caller guarantees every position < kv_len). sinks [H]:
    one extra logit per head. Returns [B, H * Dv].
    """
    k_all, v_all = cache.write_read(layer, k, v, slots, positions, kv_len)  # [B, Hkv, s, .]
    return masked_attention(q, k_all, v_all, positions, scale=scale, window=window, sinks=sinks)


def masked_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                     positions: torch.Tensor, *, scale: float, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row against s cached positions: q [B, H, Dq], k_all [B, Hkv, s, Dq],
    v_all [B, Hkv, s, Dv] (position j of a row at index j), positions [B] int64 (the query's
    position). Key positions > the row's own (and <= position - window) are masked, so
    whatever lies there (stale or scratch entries) never counts. sinks [H]: one extra logit
    per head. Returns [B, H * Dv]."""
    n_rows, h, dq = q.shape
    hkv, kv_len, dv = v_all.shape[1], v_all.shape[2], v_all.shape[3]
    k_pos = torch.arange(kv_len, device=q.device)  # [s]
    allowed = k_pos[None, :] <= positions[:, None]  # [B, s]
    if window is not None:
        allowed = allowed & (k_pos[None, :] > positions[:, None] - window)
    # The G query heads of one kv head act as G query rows against that head's keys.
    q_g = q.view(n_rows, hkv, h // hkv, dq)  # [B, Hkv, G, Dq]
    mask = allowed[:, None, None, :]  # [B, 1, 1, s]
    if sinks is None:
        out = F.scaled_dot_product_attention(q_g, k_all, v_all, attn_mask=mask,
                                             scale=scale)  # [B, Hkv, G, Dv]
        return out.reshape(n_rows, h * dv)
    scores = _wide(q_g @ k_all.transpose(-1, -2) * scale)  # [B, Hkv, G, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, hkv, h // hkv, 1).expand(n_rows, -1, -1, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]  # [B, Hkv, G, s]
    out = probs.to(v_all.dtype) @ v_all  # [B, Hkv, G, Dv]
    return out.reshape(n_rows, h * dv)


def static_experts(block: MoEBlock, h: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Every token through its K experts with shapes fixed by T alone: h [T, D], topk_ids
    [T, K] (global ids; the block must hold every expert) -> unweighted outputs [T, K, D].

    Two fixed-capacity formulations, chosen by shape only:
    - 3*T*K <= E: gather the T*K chosen experts' weights and multiply row by row (exact
      compute; the gathered copy is written and read again, about three passes over T*K
      experts' weights);
    - otherwise: every expert gets a buffer of capacity T (a token picks an expert at most
      once), filled by scatter, multiplied as one batched GEMM [E, T, D] and read back by
      gather (reads each expert's weights once; computes E*T rows, of which T*K are used).
    No expert count ever reaches the host.

    Experts kept packed (`block.packed`, MXFP4 / FP8) run as the grouped GEMM over the packed
    weights instead (`GroupedExperts.moe`: rows sorted by expert on the device, group ends by
    scatter_add + cumsum; on a GPU with bf16 rows the Triton kernel, which derives each tile's
    expert from the group ends on the device; elsewhere the dequantising twin). The grid is
    bounded by T*K rows + E, so its shapes are fixed by T alone too.
    """
    if block.packed is not None:
        ones = torch.ones(topk_ids.shape, dtype=h.dtype, device=h.device)  # [T, K], unused
        return GroupedExperts.from_block(block).moe(h, topk_ids, ones,
                                                    lambda y, _w: y)  # [T, K, D]
    n_tok, k = topk_ids.shape
    e = block.w_gate_up.shape[0]
    bias = block.cfg.expert_bias
    if 3 * n_tok * k <= e:
        ids = topk_ids.reshape(-1)  # [T*K]
        x = h[:, None, :].expand(n_tok, k, -1).reshape(n_tok * k, -1)  # [T*K, D]
        gate_up = torch.bmm(block.w_gate_up[ids], x[:, :, None])[..., 0]  # [T*K, 2F]
        if bias:
            gate_up = gate_up + block.b_gate_up[ids]
        y = torch.bmm(block.w_down[ids], block.activate(gate_up)[:, :, None])[..., 0]  # [T*K, D]
        if bias:
            y = y + block.b_down[ids]
        return y.view(n_tok, k, -1)  # [T, K, D]
    tokens = torch.arange(n_tok, device=h.device)[:, None].expand(n_tok, k)  # [T, K]
    buf = h.new_zeros(e, n_tok, h.shape[1])  # [E, T, D]
    buf.index_put_((topk_ids, tokens), h[:, None, :].expand(n_tok, k, -1))
    gate_up = torch.bmm(buf, block.w_gate_up.transpose(1, 2))  # [E, T, 2F]
    if bias:
        gate_up = gate_up + block.b_gate_up[:, None, :]
    y = torch.bmm(block.activate(gate_up), block.w_down.transpose(1, 2))  # [E, T, D]
    if bias:
        y = y + block.b_down[:, None, :]
    return y[topk_ids, tokens]  # [T, K, D]


def _moe(block: MoEBlock, h: torch.Tensor) -> torch.Tensor:
    """MoEBlock.forward's output without host sync: h [T, D] -> [T, D]."""
    topk_ids, topk_weights = block.select(block.router(h))  # [T, K] x2
    out = block.combine(static_experts(block, h, topk_ids), topk_weights)  # [T, D]
    shared = block.shared_forward(h)
    return out if shared is None else out + shared


def _check_local(model: MoETransformer) -> None:
    for layer in model.layers:
        if not layer.is_moe:
            continue
        block = layer.moe
        if not isinstance(block, MoEBlock):
            raise TypeError(f"layer {layer.layer}: the static decode runs plain MoEBlocks, got "
                            f"{type(block).__name__} (an EPRunner is attached?)")
        if tuple(block.expert_ids) != tuple(range(model.cfg.num_experts)):
            raise ValueError(f"layer {layer.layer}: the static decode needs every expert held "
                             f"(this block holds {len(block.expert_ids)} of "
                             f"{model.cfg.num_experts})")


def _check_packed_graphs(model: MoETransformer) -> None:
    """Packed experts run without host reads only through the Triton kernel (bf16 activations
    on a CUDA device, triton installed); their dequantising twin reads group sizes back to the
    host where `torch._grouped_mm` does not apply, which a CUDA graph cannot capture."""
    from probe.runtime import quant_gemm

    dtype = next(model.parameters()).dtype
    for block in model.moe_blocks:
        if block.packed is None:
            continue
        if dtype != torch.bfloat16 or quant_gemm.triton is None:
            raise ValueError(f"CUDA graphs over packed ({block.packed[0].fmt}) experts need "
                             f"the packed grouped GEMM: a bfloat16 model and triton (the model "
                             f"is {dtype}, triton "
                             f"{'missing' if quant_gemm.triton is None else 'present'}); "
                             "decode without graphs, or load bfloat16")


def decode_forward(model: MoETransformer, cache: StaticKVCache, ids: torch.Tensor,
                   slots: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                   moe: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """One decode token per row, no host sync: ids, positions [B] int64 on the model's
    device -> logits [B, V]. `slots` says where each row's sequence lives: [B] int64 slots of a
    `StaticKVCache`, or a block table [B, nb] int64 of a `probe.runtime.paged.PagedKVCache`.
    Writes each row's keys and values at its position; the caller advances its own lengths.
    kv_len (static cache): attention reads that many positions per slot (a bound on every
    position + 1 that the host knows; default the cache's max_len); a paged cache reads the
    nb blocks of the table. moe: (MoE layer index, h [B, D]) -> [B, D], the MoE layers'
    forward (default: every expert held locally, `static_experts`)."""
    cfg = model.cfg
    moe_index = 0
    x = model.embed(ids)  # [B, D]
    cos, sin = model._rope(positions, x.dtype)  # [B, Hd/2] x2
    for layer in model.layers:
        attn = layer.attn
        q, k, v = attn.project(layer.attn_norm(x), cos, sin)
        k_all, v_all = cache.write_read(layer.layer, k, v, slots, positions, kv_len)
        out = masked_attention(q, k_all, v_all, positions, scale=attn.scale,
                               window=cfg.sliding_window if attn.sliding else None,
                               sinks=getattr(attn, "sinks", None) if cfg.attention_sinks
                               else None)  # [B, H*Dv]
        x = x + attn.o_proj(out)  # [B, D]
        h = layer.mlp_norm(x)  # [B, D]
        if layer.is_moe:
            x = x + (_moe(layer.moe, h) if moe is None else moe(moe_index, h))  # [B, D]
            moe_index += 1
        else:
            x = x + layer.mlp(h)  # [B, D]
    x = model.norm(x)
    head = model.embed.weight if cfg.tie_word_embeddings else model.lm_head.weight
    return F.linear(x, head)  # [B, V]


def default_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch: 1, 2, 4, ..., max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class DecodeRunner:
    """Runs decode batches through `decode_forward`, padded to a bucket, replaying one CUDA
    graph per (batch bucket, kv-length bucket) when `use_graphs` (captured on first use).

    The kv-length bucket is the next power of two (at least 16, at most the cache's max_len)
    above the batch's largest position: attention reads only that many positions per slot.
    Each (batch bucket, kv-length bucket) pair has its own input buffers on the device (the
    graph reads them), refilled before every replay.

    Args:
        model: a `MoETransformer` holding every expert (no EPRunner attached).
        cache: the StaticKVCache the batches' slots belong to.
        use_graphs: capture and replay CUDA graphs (the model must be on a CUDA device).
        buckets: padded batch sizes (default `default_buckets(cache.num_slots)`).
    """

    def __init__(self, model: MoETransformer, cache, *, use_graphs: bool,
                 buckets: Sequence[int] | None = None) -> None:
        _check_local(model)
        self._setup(model, cache, next(model.parameters()).device, use_graphs, buckets)

    def _setup(self, model: MoETransformer, cache, device: torch.device, use_graphs: bool,
               buckets: Sequence[int] | None) -> None:
        """What every decode runner keeps: the model, the cache, the device, the buckets and
        the (empty) input buffers and graphs per bucket."""
        self.model = model
        self.cache = cache
        self.device = device
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        if use_graphs:
            _check_packed_graphs(model)
        self.use_graphs = use_graphs
        self.buckets = sorted(set(buckets or default_buckets(cache.num_slots)))
        if self.buckets[0] < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets}")
        # (batch bucket, kv-length bucket) -> input buffers on the device (`_host_inputs`)
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        # (batch bucket, kv-length bucket) -> (graph, its logits [Bp, V])
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, n_rows: int) -> int:
        for b in self.buckets:
            if b >= n_rows:
                return b
        raise ValueError(f"decode batch of {n_rows} rows exceeds the largest bucket "
                         f"{self.buckets[-1]}")

    def kv_bucket(self, max_position: int) -> int:
        """Positions attention reads for a batch whose largest position is `max_position`."""
        need = max(16, max_position + 1)
        return min(self.cache.max_len, 1 << (need - 1).bit_length())

    # -- what a cache layout changes (`probe.runtime.paged.PagedDecodeRunner` overrides these)

    def _host_inputs(self, ids: Sequence[int], where: Sequence, positions: Sequence[int],
                     bucket: int, kv_len: int) -> torch.Tensor:
        """The step's inputs on the host, padded to `bucket` rows: [3, Bp] int64 (ids, slots,
        positions); padded rows are token 0 at position 0 of the scratch slot."""
        pad = bucket - len(ids)
        return torch.tensor([[*ids, *[0] * pad], [*where, *[self.cache.scratch] * pad],
                             [*positions, *[0] * pad]], dtype=torch.int64)  # [3, Bp]

    def _run(self, inputs: torch.Tensor, kv_len: int) -> torch.Tensor:
        return decode_forward(self.model, self.cache, inputs[0], inputs[1], inputs[2], kv_len)

    # -- buffers and graphs

    def _buffers(self, bucket: int, kv_len: int) -> torch.Tensor:
        key = (bucket, kv_len)
        if key not in self._inputs:
            self._inputs[key] = self._host_inputs([], [], [], bucket, kv_len).to(self.device)
        return self._inputs[key]

    def _scratch_inputs(self, bucket: int, kv_len: int) -> None:
        """Point every row of the pair's input buffers at scratch (token 0, position 0)."""
        self._buffers(bucket, kv_len).copy_(self._host_inputs([], [], [], bucket, kv_len))

    def _warm_up(self, bucket: int, kv_len: int) -> None:
        """Run the step eagerly twice (lazy inits, autotuning) before a capture. The runs
        really execute and write keys and values, so they read scratch rows only: buffers
        still holding an earlier batch's rows would write into slots that may since have been
        released and handed to other requests (corrupting live sequences)."""
        self._scratch_inputs(bucket, kv_len)
        for _ in range(2):
            self._run(self._buffers(bucket, kv_len), kv_len)

    def _capture(self, bucket: int, kv_len: int) -> None:
        inputs = self._buffers(bucket, kv_len)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up outside the graph
            self._warm_up(bucket, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(inputs, kv_len)
        self._pool = graph.pool()
        self._graphs[bucket, kv_len] = (graph, logits)

    def _check_rows(self, ids: Sequence[int], where: Sequence, positions: Sequence[int]) -> None:
        if not len(ids) == len(where) == len(positions):
            raise ValueError("ids, slots and positions must have the same length")
        if max(positions, default=0) >= self.cache.max_len:
            raise ValueError(f"position {max(positions)} is past the cache's max_len "
                             f"{self.cache.max_len}")

    def __call__(self, ids: Sequence[int], slots: Sequence, positions: Sequence[int]
                 ) -> torch.Tensor:
        """Decode one token for each row: ids, slots, positions (host ints, B each; a paged
        runner takes each row's block list for its slot) -> logits [B, V] on the device (a
        view of the bucket's output; read it before the next call)."""
        self._check_rows(ids, slots, positions)
        return self._step(ids, slots, positions, self.bucket(len(ids)),
                          self.kv_bucket(max(positions)))

    def _step(self, ids: Sequence[int], slots: Sequence, positions: Sequence[int],
              bucket: int, kv_len: int) -> torch.Tensor:
        """The rows padded to `bucket`, attention over `kv_len` positions: replay (capturing
        the pair first) or run eagerly. Returns logits [B, V] (a view)."""
        n_rows = len(ids)
        host = self._host_inputs(ids, slots, positions, bucket, kv_len)
        inputs = self._buffers(bucket, kv_len)
        if self.use_graphs and (bucket, kv_len) not in self._graphs:
            self._capture(bucket, kv_len)
        # After any capture: the warm-up ran on scratch rows, the real rows go in now.
        if self.device.type == "cuda":  # an asynchronous copy from pinned memory
            inputs.copy_(host.pin_memory(), non_blocking=True)
        else:
            inputs.copy_(host)
        if self.use_graphs:
            graph, logits = self._graphs[bucket, kv_len]
            graph.replay()
        else:
            logits = self._run(inputs, kv_len)
        return logits[:n_rows]


class EPDecodeRunner(DecodeRunner):
    """`DecodeRunner` at any ep: the MoE layers run expert-parallel through an `EPRunner`'s
    layers with fixed-capacity dispatch, so the step (collectives included) has no host sync
    and is captured per (batch bucket, kv-length bucket) with NCCL when `use_graphs`.

    Inside the step every MoE layer is static EP: each pair runs on its expert's home rank
    (no replicas, no balancer: a replica set that changes per step cannot live in a graph);
    the runner's balancing applies to the prefill chunks, which stay eager. The capacity of a
    bucket Bp is C = `capacity_for(runner.dispatch, Bp, K, G)` rows per peer, fixed per
    bucket; padding rows send no pair (they would all pick token 0's experts and could
    overflow one peer) and read zero. Every rank must run the same sequence of collectives,
    so every rank calls `agree` each step (one all_gather of its decode rows, largest
    position and other tokens) and then runs the group's bucket and kv-length bucket, a rank
    without decode rows on scratch rows only; so every rank captures the same pairs in the
    same order. Overflow (a peer needed more than C rows) is counted on the device in this
    runner's own `FixedState` per layer (`probe.runtime.dispatch`) and raised by `check()`, on
    every rank, after the step.
    At ep = 1 (`ctx.group` None) the same step runs with no collective at all.

    Args:
        model: the `MoETransformer` wrapped by `runner` (this rank's expert slice).
        cache: the StaticKVCache of this rank's sequences (attention is data parallel).
        runner: the `probe.runtime.pipeline.EPRunner` whose layers hold the home experts; its
            dispatch must be "fixed".
        use_graphs: capture and replay CUDA graphs (CUDA only); False runs the step eagerly.
        buckets: padded batch sizes (default `default_buckets(cache.num_slots)`).
    """

    def __init__(self, model: MoETransformer, cache, runner, *, use_graphs: bool,
                 buckets: Sequence[int] | None = None) -> None:
        if not runner.dispatch.fixed:
            raise ValueError("the expert-parallel decode step needs fixed-capacity dispatch "
                             "(DispatchOptions('fixed'), --dispatch fixed)")
        self.runner = runner
        self.ctx = runner.ctx
        self._setup(model, cache, runner.device, use_graphs, buckets)
        from probe.runtime.dispatch import FixedState

        self.states = [FixedState(self.device) for _ in runner.layers]
        self._capacity: dict[int, int] = {}  # bucket -> C
        self._ran = False  # a step ran since the last check()

    def capacity(self, bucket: int) -> int:
        from probe.runtime.dispatch import capacity_for

        if bucket not in self._capacity:
            self._capacity[bucket] = capacity_for(self.runner.dispatch, bucket,
                                                  self.model.cfg.top_k, self.ctx.world_size)
        return self._capacity[bucket]

    def agree(self, num_rows: int, max_position: int, num_other: int = 0
              ) -> tuple[int, int, int]:
        """The group's largest decode row count, decode position and `num_other` (e.g. the
        prefill tokens), by one all_gather (every rank calls it every step)."""
        from probe.runtime.balancer import all_gather_fields

        got = all_gather_fields(self.ctx, {"v": np.array([num_rows, max_position, num_other],
                                                         dtype=np.float64)},
                                "decode rows all_gather")["v"].max(axis=0)
        return int(got[0]), int(got[1]), int(got[2])

    def _ep_moe(self, index: int, h: torch.Tensor, bucket: int,
                valid: torch.Tensor) -> torch.Tensor:
        block = self.runner.blocks[index]
        topk_ids, topk_weights = block.select(block.router(h))  # [Bp, K] x2
        out, _ = self.runner.layers[index].forward(h, topk_ids, topk_weights,
                                                   capacity=self.capacity(bucket),
                                                   state=self.states[index],
                                                   valid=valid)  # [Bp, D]
        shared = block.shared_forward(h)
        return out if shared is None else out + shared

    def _run(self, inputs: torch.Tensor, kv_len: int) -> torch.Tensor:
        bucket = inputs.shape[1]
        valid = inputs[1] != self.cache.scratch  # [Bp]: padding rows dispatch nothing
        return decode_forward(self.model, self.cache, inputs[0], inputs[1], inputs[2], kv_len,
                              moe=lambda index, h: self._ep_moe(index, h, bucket, valid))

    def run(self, ids: Sequence[int], slots: Sequence, positions: Sequence[int],
            most_rows: int, most_position: int) -> torch.Tensor:
        """Decode this rank's rows (possibly none) in the group's bucket for `most_rows` and
        kv-length bucket for `most_position` (from `agree`; the same on every rank) -> logits
        [B, V] (a view; read it before the next call)."""
        self._check_rows(ids, slots, positions)
        if most_rows < len(ids) or (len(ids) and most_position < max(positions)):
            raise ValueError("most_rows / most_position must be the group's maxima (agree)")
        for state in self.states:  # outside any graph: this step's counters start at zero
            state.reset()
        self._ran = True
        return self._step(ids, slots, positions, self.bucket(most_rows),
                          self.kv_bucket(most_position))

    def __call__(self, ids: Sequence[int], slots: Sequence, positions: Sequence[int]
                 ) -> torch.Tensor:
        """`agree`, then `run` (every rank must call it, with or without rows)."""
        most_rows, most_position, _ = self.agree(len(ids), max(positions, default=0))
        return self.run(ids, slots, positions, most_rows, most_position)

    def check(self) -> None:
        """After a step (a host read and one all_gather; every rank calls it): raise
        `CapacityOverflow` when a decode layer overflowed its capacity on any rank, or
        RuntimeError when rows reached a rank that cannot run them."""
        from probe.runtime.balancer import all_gather_fields
        from probe.runtime.dispatch import CapacityOverflow

        if not self._ran:
            return
        self._ran = False
        local = {"needed": np.array([int(s.needed) for s in self.states]),  # [L]
                 "capacity": np.array([s.capacity for s in self.states]),
                 "unrunnable": np.array([int(s.unrunnable) for s in self.states])}
        got = all_gather_fields(self.ctx, local, "decode overflow all_gather")
        bad = np.flatnonzero(got["unrunnable"].sum(axis=0) > 0)
        if bad.size:
            raise RuntimeError(f"decode MoE layer {int(bad[0])}: rows reached a rank without "
                               "their expert")
        over = np.argwhere(got["needed"] > got["capacity"])  # (rank, layer)
        if over.size:
            rank, layer = (int(v) for v in over[0])
            need = int(got["needed"].max())
            raise CapacityOverflow(
                f"fixed-capacity dispatch overflowed at MoE layer {layer} of the decode step: "
                f"rank {rank} sent {int(got['needed'][rank, layer])} rows to one peer, the "
                f"capacity is {int(got['capacity'][rank, layer])} rows per peer; the step's "
                f"output is wrong and was discarded. Rerun with --capacity {need} or more, a "
                f"larger --capacity-factor, or --no-cuda-graphs")
