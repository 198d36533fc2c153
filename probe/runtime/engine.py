"""Inference engine: continuous batching, chunked prefill, decode, KV cache, sampling, metrics.

One `Engine` per rank. Attention is data parallel, so every rank serves its own requests; the
MoE layers run expert-parallel through an `EPRunner` (or locally when there is none). Every rank
must run the same number of steps, because each step's MoE layers are collectives: `serve()`
all-reduces "has work" each step, and a rank without tokens runs `EPRunner.idle_step()`.

A step's batch: one decode token for every running request, then prefill chunks of waiting
requests (first come, first served, at most `prefill_chunk` tokens of one request per step)
until `max_batch_tokens`. Requests join at their `arrival_step` and leave when they reach
`max_new_tokens` or emit a stop id. Each request has its own `KVCache`.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), optionally
restricted to the top_k logits, drawn with a per-request generator seeded by `seed` (so a run is
reproducible whatever else is in the batch).

Admission: `submit` checks every request against the model: prompt ids in [0, vocab) and
prompt length + max_new_tokens <= the model's `max_position_embeddings` (requests that would run
past the positions are REJECTED, not clamped). By default a bad request raises `ValueError`;
with `reject_invalid=True` it is left out alone, with its reason in `Engine.rejected`, and the
other requests are served (a multi-rank job must not die for one bad prompt).

Static decode (`static_decode=True`; single process with no EPRunner, or expert parallel
through an EPRunner with fixed-capacity dispatch: `_ep_static_step`): every request gets a slot of
one preallocated `StaticKVCache` (`max_seq_len` positions), prefill chunks fill it through the
model's eager forward, and the step's decode tokens run as one separate batch through
`probe.runtime.decode.DecodeRunner`, whose layers never synchronise with the host; with
`cuda_graphs=True` that batch is padded to a bucket and replayed from a CUDA graph. Greedy
tokens equal the default path's (the same arithmetic, batched differently).

Paged KV (`paged_kv=True`, implies static decode): one pool of `block_size`-position blocks
(`probe.runtime.paged.PagedKVCache`) instead of one `max_seq_len` slot per request. A request
reserves ceil((prompt + max_new_tokens) / block_size) blocks when it is admitted and returns
them when it ends; a request that does not fit in the free blocks WAITS (first come, first
served: later requests wait behind it), and one that needs more blocks than the whole pool is
rejected. The pool is `kv_blocks` blocks, or what `memory_budget_bytes` leaves after the
`replica_slots` replica slots (x expert bytes x 2 buffers); `summary()["memory"]` states the
split and how many requests of `max_seq_len` tokens fit.

Metrics per step (`StepRecord`): tokens, prefill and decode tokens, wall seconds, and the
EPRunner's per-layer IR, replicas planned and arrived, bytes prefetched, exposed transfer time,
planner time; per request: TTFT (arrival to first token, wall clock), decode tokens/s.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from probe.runtime.dist import DistContext, guarded

__all__ = ["Engine", "Request", "RequestResult", "StepRecord", "random_model", "slice_experts"]


@dataclass
class Request:
    """One generation request.

    prompt: token ids (non-empty). max_new_tokens: >= 1. temperature: 0 for greedy.
    top_k: sample among the top_k logits (0: all). seed: sampling seed.
    arrival_step: the engine step at which the request joins. stop_ids: ids that end it.
    """

    rid: str
    prompt: Sequence[int]
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    arrival_step: int = 0
    stop_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if len(self.prompt) == 0:
            raise ValueError(f"request {self.rid}: prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.rid}: max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"request {self.rid}: temperature must be >= 0")


@dataclass
class RequestResult:
    rid: str
    tokens: list[int]
    ttft_s: float
    decode_tokens_per_s: float
    finish_step: int


@dataclass
class StepRecord:
    step: int
    tokens: int
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    running: int
    ep: dict = field(default_factory=dict)


@dataclass
class _Live:
    req: Request
    cache: object
    done_prompt: int = 0
    out: list[int] = field(default_factory=list)
    t_arrive: float = 0.0
    t_first: float | None = None
    t_last: float = 0.0
    generator: torch.Generator | None = None


class Engine:
    """Serves requests on this rank.

    Args:
        model: a `MoETransformer` (this rank's expert slice when `runner` is given).
        runner: the `EPRunner` wrapping `model`, or None for single-process MoE.
        ctx: the DistContext (None for single-process).
        max_batch_tokens: tokens per step (decode + prefill).
        prefill_chunk: prefill tokens of one request per step.
        max_running: requests in flight at once.
        static_decode: decode through the preallocated cache and the no-sync decode step
            (runner=None: the MoE layers run locally; with a runner, whose dispatch must be
            "fixed", they run expert-parallel in `probe.runtime.decode.EPDecodeRunner`).
        cuda_graphs: replay the decode step from CUDA graphs (implies static_decode; CUDA only).
        max_seq_len: positions per request in the static cache (prompt + max_new_tokens must
            fit); default min(max_position_embeddings, 2048).
        paged_kv: a paged KV pool instead of one slot per request (implies static_decode).
        block_size: positions per KV block (paged_kv).
        kv_blocks: blocks in the pool (paged_kv; default max_running * blocks of max_seq_len,
            the static cache's size), or
        memory_budget_bytes: bytes for replica slots + the KV pool on this rank (paged_kv);
            the pool gets what the replica slots leave.
        replica_slots: R replica slots whose bytes (R x expert bytes x 2 buffers) the budget
            reserves first (paged_kv with memory_budget_bytes; accounting only: the static
            decode runs every expert locally).
    """

    def __init__(self, model, runner=None, ctx: DistContext | None = None, *,
                 max_batch_tokens: int = 256, prefill_chunk: int = 64,
                 max_running: int = 64, static_decode: bool = False, cuda_graphs: bool = False,
                 max_seq_len: int | None = None, paged_kv: bool = False, block_size: int = 16,
                 kv_blocks: int | None = None, memory_budget_bytes: int | None = None,
                 replica_slots: int = 0) -> None:
        if max_batch_tokens < 1 or prefill_chunk < 1 or max_running < 1:
            raise ValueError("max_batch_tokens, prefill_chunk and max_running must be >= 1")
        if not paged_kv and (kv_blocks is not None or memory_budget_bytes is not None
                             or replica_slots):
            raise ValueError("kv_blocks, memory_budget_bytes and replica_slots need paged_kv")
        if kv_blocks is not None and memory_budget_bytes is not None:
            raise ValueError("give kv_blocks or memory_budget_bytes, not both")
        if replica_slots and memory_budget_bytes is None:
            raise ValueError("replica_slots are reserved from memory_budget_bytes: give it")
        static_decode = static_decode or cuda_graphs or paged_kv
        dispatch = getattr(runner, "dispatch", None)  # an EPRunner's DispatchOptions
        if static_decode and runner is not None and (
                paged_kv or dispatch is None or not dispatch.fixed):
            raise ValueError("static_decode/cuda_graphs with an EPRunner need its "
                             "fixed-capacity dispatch (DispatchOptions('fixed')) and no "
                             "paged_kv; else give runner=None (the MoE layers run locally)")
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.model = model
        self.runner = runner
        self.ctx = ctx
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.max_running = max_running
        self.device = next(model.parameters()).device
        self.pending: list[Request] = []
        self.live: list[_Live] = []
        self.results: dict[str, RequestResult] = {}
        self.records: list[StepRecord] = []
        self.rejected: dict[str, str] = {}  # request id -> why it was not served
        self.step_index = 0
        self.kv = self.decoder = None
        self.max_seq_len = None
        self.paged = paged_kv
        self.memory: dict | None = None  # how the cache (and replica slots) use memory
        self.peak_running = 0
        if static_decode:
            from probe.runtime.decode import DecodeRunner, StaticKVCache

            cfg = model.cfg
            self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 2048)
            dtype = next(model.parameters()).dtype
            if paged_kv:
                from probe.runtime.paged import PagedDecodeRunner, PagedKVCache, plan_memory

                if block_size < 1:
                    raise ValueError(f"block_size must be >= 1, got {block_size}")
                if kv_blocks is None and memory_budget_bytes is None:
                    kv_blocks = max_running * -(-self.max_seq_len // block_size)
                plan = plan_memory(cfg, dtype, block_size=block_size,
                                   tokens_per_request=self.max_seq_len,
                                   budget_bytes=memory_budget_bytes, kv_blocks=kv_blocks,
                                   replica_slots=replica_slots,
                                   weight_format=model.expert_format)
                self.kv = PagedKVCache(cfg, plan.kv_blocks, block_size, self.max_seq_len,
                                       dtype=dtype, device=self.device)
                self.decoder = PagedDecodeRunner(model, self.kv, use_graphs=cuda_graphs,
                                                 max_batch=max_running)
                self.memory = {"kv": "paged", **plan.as_dict(),
                               "max_concurrent_requests": min(max_running,
                                                              plan.requests_that_fit)}
            else:
                self.kv = StaticKVCache(cfg, max_running, self.max_seq_len, dtype=dtype,
                                        device=self.device)
                if runner is not None:  # expert parallel: the step's MoE layers dispatch
                    from probe.runtime.decode import EPDecodeRunner

                    self.decoder = EPDecodeRunner(model, self.kv, runner,
                                                  use_graphs=cuda_graphs)
                else:
                    self.decoder = DecodeRunner(model, self.kv, use_graphs=cuda_graphs)
                pool = sum(t.numel() * t.element_size() for t in self.kv.keys + self.kv.values)
                self.memory = {"kv": "static", "kv_pool_bytes": pool, "replica_slots": 0,
                               "replica_bytes": 0, "tokens_per_request": self.max_seq_len,
                               "max_concurrent_requests": max_running}

    def check(self, request: Request) -> str | None:
        """Why this model cannot serve `request` (None if it can): ids outside the vocabulary,
        or prompt + max_new_tokens beyond the model's positions."""
        cfg = self.model.cfg
        vocab = cfg.vocab_size
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            bad = next(int(t) for t in request.prompt if not 0 <= t < vocab)
            return f"prompt ids must lie in [0, {vocab}) (got {bad})"
        need = len(request.prompt) + request.max_new_tokens
        if need > cfg.max_position_embeddings:
            return (f"prompt ({len(request.prompt)} tokens) + max_new_tokens "
                    f"({request.max_new_tokens}) = {need} exceeds the model's "
                    f"{cfg.max_position_embeddings} positions (max_position_embeddings)")
        if self.max_seq_len is not None and need > self.max_seq_len:
            return (f"prompt ({len(request.prompt)} tokens) + max_new_tokens "
                    f"({request.max_new_tokens}) = {need} exceeds the static cache's "
                    f"{self.max_seq_len} positions (max_seq_len)")
        if self.paged and self.kv.blocks_for(need) > self.kv.num_blocks:
            return (f"{need} tokens need {self.kv.blocks_for(need)} KV blocks, the pool holds "
                    f"{self.kv.num_blocks}")
        return None

    def submit(self, requests: Sequence[Request], *, reject_invalid: bool = False) -> None:
        """Queue `requests`. A request `check` refuses raises ValueError, or, with
        `reject_invalid`, is left out and recorded in `self.rejected` (the others are queued)."""
        ok = []
        for r in requests:
            reason = self.check(r)
            if reason is None:
                ok.append(r)
            elif reject_invalid:
                self.rejected[r.rid] = reason
            else:
                raise ValueError(f"request {r.rid}: {reason}")
        self.pending.extend(ok)
        self.pending.sort(key=lambda r: r.arrival_step)

    @property
    def has_work(self) -> bool:
        return bool(self.pending or self.live)

    def _admit(self) -> None:
        """Move arrived requests into the running set, first come first served, while there
        is room (max_running; with paged KV also the request's blocks: a request that does not
        fit waits, and so do the ones behind it)."""
        now = time.perf_counter()
        while (self.pending and self.pending[0].arrival_step <= self.step_index
               and len(self.live) < self.max_running):
            req = self.pending[0]
            need = len(req.prompt) + req.max_new_tokens
            if self.paged and not self.kv.fits(need):
                break
            self.pending.pop(0)
            gen = None
            if req.temperature > 0:
                gen = torch.Generator(device="cpu").manual_seed(int(req.seed))
            if self.paged:
                cache = self.kv.sequence(need)
            elif self.kv is not None:
                cache = self.kv.sequence(self.kv.allocate())
            else:
                cache = self.model.new_cache()
            self.live.append(_Live(req, cache, t_arrive=now, generator=gen))
        self.peak_running = max(self.peak_running, len(self.live))

    def _sample_rows(self, lives: Sequence[_Live], logits: torch.Tensor) -> list[int]:
        """One token per row of logits [B, V]: greedy rows by one argmax over the batch (one
        host read per step), the others by `_sample`."""
        greedy = torch.argmax(logits, dim=-1).tolist()  # [B]
        return [g if lv.req.temperature == 0 else self._sample(lv, logits[i])
                for i, (lv, g) in enumerate(zip(lives, greedy, strict=True))]

    def _sample(self, live: _Live, logits: torch.Tensor) -> int:
        req = live.req
        if req.temperature == 0:
            return int(torch.argmax(logits).item())
        scores = logits.float().cpu() / req.temperature  # [V]
        if req.top_k > 0:
            kth = torch.topk(scores, min(req.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=live.generator).item())

    def step(self) -> StepRecord | None:
        """Run one step on this rank (an idle step if it has no tokens). Returns its record."""
        self._admit()
        t0 = time.perf_counter()
        ids: list[int] = []
        seq_lens: list[int] = []
        members: list[tuple[_Live, bool]] = []  # (request, produces a token this step)
        budget = self.max_batch_tokens
        n_decode = n_prefill = 0
        for lv in self.live:  # decode first
            if lv.done_prompt == len(lv.req.prompt) and budget > 0:
                ids.append(lv.out[-1])
                seq_lens.append(1)
                members.append((lv, True))
                budget -= 1
                n_decode += 1
        for lv in self.live:  # then prefill chunks
            left = len(lv.req.prompt) - lv.done_prompt
            if left > 0 and budget > 0:
                n = min(left, self.prefill_chunk, budget)
                ids.extend(lv.req.prompt[lv.done_prompt:lv.done_prompt + n])
                seq_lens.append(n)
                lv.done_prompt += n
                members.append((lv, lv.done_prompt == len(lv.req.prompt)))
                budget -= n
                n_prefill += n
        if self.runner is not None and self.decoder is not None:
            ep = self._ep_static_step(ids, seq_lens, members, n_decode)
        else:
            ep = self._step_forward(ids, seq_lens, members, n_decode)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rec = StepRecord(self.step_index, len(ids), n_prefill, n_decode,
                         time.perf_counter() - t0, len(self.live), ep)
        self.records.append(rec)
        self._retire()
        self.step_index += 1
        return rec

    def _step_forward(self, ids: list[int], seq_lens: list[int],
                      members: list[tuple[_Live, bool]], n_decode: int) -> dict:
        """The step's forward (static decode on one rank, or the runner's layers for every
        token). Returns the runner's step stats (empty without a runner)."""
        if self.runner is not None:
            self.runner.begin_step(num_tokens=len(ids))
        if ids and self.decoder is not None:
            self._static_forward(ids, seq_lens, members, n_decode)
        elif ids:
            flat = torch.tensor(ids, dtype=torch.int64, device=self.device)
            with torch.inference_mode():
                logits = self.model(flat, seq_lens=seq_lens,
                                    caches=[lv.cache for lv, _ in members],
                                    last_only=True).logits  # [B, V]
            self._emit([lv for lv, produces in members if produces],
                       logits[[i for i, (_, produces) in enumerate(members) if produces]])
        elif self.runner is not None:
            with torch.inference_mode():
                self.runner.idle_step()
        return self.runner.end_step().as_dict() if self.runner is not None else {}

    def _ep_static_step(self, ids: list[int], seq_lens: list[int],
                        members: list[tuple[_Live, bool]], n_decode: int) -> dict:
        """The step with the expert-parallel decode step (`EPDecodeRunner`): the group agrees
        on its decode bucket and whether anyone prefills (one all_gather); every rank runs the
        decode step (its rows, or scratch rows only) and checks its overflow counters, then, if
        any rank prefills, the prefill chunks through the runner's eager layers (idle ranks
        take part with `idle_step`). Returns the runner's stats of the prefill part ({} when
        no rank prefilled)."""
        lives = [lv for lv, _ in members[:n_decode]]
        positions = [lv.cache.length for lv in lives]
        n_prefill = len(ids) - n_decode
        most_rows, most_position, most_prefill = self.decoder.agree(
            n_decode, max(positions, default=0), n_prefill)
        ep: dict = {}
        with torch.inference_mode():
            if most_rows:
                logits = self.decoder.run(ids[:n_decode], [lv.cache.address for lv in lives],
                                          positions, most_rows, most_position)  # [B, V]
                self.decoder.check()  # every rank: overflow raises before any token is kept
                for lv in lives:
                    lv.cache.length += 1
                self._emit(lives, logits)
            if most_prefill:
                self.runner.begin_step(num_tokens=n_prefill)
                prefill = members[n_decode:]
                if prefill:
                    flat = torch.tensor(ids[n_decode:], dtype=torch.int64, device=self.device)
                    logits = self.model(flat, seq_lens=seq_lens[n_decode:],
                                        caches=[lv.cache for lv, _ in prefill],
                                        last_only=True).logits  # [B, V]
                    rows = [i for i, (_, produces) in enumerate(prefill) if produces]
                    self._emit([prefill[i][0] for i in rows], logits[rows])
                else:
                    self.runner.idle_step()
                ep = self.runner.end_step().as_dict()
        return ep

    def _emit(self, lives: Sequence[_Live], logits: torch.Tensor) -> None:
        """Sample one token for each of `lives` from logits [B, V]."""
        if not lives:
            return
        toks = self._sample_rows(lives, logits)
        now = time.perf_counter()
        for lv, tok in zip(lives, toks, strict=True):
            lv.out.append(tok)
            if lv.t_first is None:
                lv.t_first = now
            lv.t_last = now

    def _static_forward(self, ids: list[int], seq_lens: list[int],
                        members: list[tuple[_Live, bool]], n_decode: int) -> None:
        """The step with static decode: the first `n_decode` members (one token each) through
        the DecodeRunner, then the prefill chunks through the model's eager forward."""
        with torch.inference_mode():
            if n_decode:
                lives = [lv for lv, _ in members[:n_decode]]
                logits = self.decoder(ids[:n_decode], [lv.cache.address for lv in lives],
                                      [lv.cache.length for lv in lives])  # [B, V]
                for lv in lives:
                    lv.cache.length += 1
                self._emit(lives, logits)
            if len(members) > n_decode:
                flat = torch.tensor(ids[n_decode:], dtype=torch.int64, device=self.device)
                prefill = members[n_decode:]
                logits = self.model(flat, seq_lens=seq_lens[n_decode:],
                                    caches=[lv.cache for lv, _ in prefill],
                                    last_only=True).logits  # [B, V]
                rows = [i for i, (_, produces) in enumerate(prefill) if produces]
                self._emit([prefill[i][0] for i in rows], logits[rows])

    def _retire(self) -> None:
        keep = []
        for lv in self.live:
            req = lv.req
            done = len(lv.out) >= req.max_new_tokens or (lv.out and lv.out[-1] in req.stop_ids)
            if not done:
                keep.append(lv)
                continue
            if self.kv is not None:
                lv.cache.release()
            n_dec = len(lv.out) - 1
            span = lv.t_last - lv.t_first if lv.t_first is not None else 0.0
            self.results[req.rid] = RequestResult(
                req.rid, list(lv.out), (lv.t_first or lv.t_arrive) - lv.t_arrive,
                n_dec / span if span > 0 else float("nan"), self.step_index)
        self.live = keep

    def _any_work(self) -> bool:
        flag = self.has_work
        if self.ctx is None or self.ctx.group is None or self.ctx.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        if self.ctx.backend == "nccl":
            t = t.to(self.ctx.device)
        with guarded("has-work all_reduce", self.ctx.rank, self.ctx.watchdog):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.group)
        return bool(t.item())

    def serve(self, requests: Sequence[Request] = (), *, max_steps: int = 100_000,
              reject_invalid: bool = False,
              on_step: Callable[[StepRecord], None] | None = None) -> dict[str, RequestResult]:
        """Run steps until every rank's requests are done. Returns this rank's results.

        reject_invalid: see `submit`. on_step: called with every step's record (progress).
        """
        self.submit(requests, reject_invalid=reject_invalid)
        while self._any_work():
            if self.step_index >= max_steps:
                raise RuntimeError(f"serve: still busy after {max_steps} steps")
            rec = self.step()
            if on_step is not None:
                on_step(rec)
        return self.results

    def summary(self) -> dict:
        """Aggregate metrics of this rank (prefill latency, decode throughput, IR, transfers)."""
        recs = self.records
        res = list(self.results.values())
        decode_steps = [r for r in recs if r.decode_tokens > 0 and r.prefill_tokens == 0]
        dec_tokens = sum(r.decode_tokens for r in decode_steps)
        dec_time = sum(r.seconds for r in decode_steps)
        prefill_steps = [r for r in recs if r.prefill_tokens > 0]
        irs = [r.ep["mean_ir"] for r in recs if r.ep]
        eps = [r.ep for r in recs if r.ep]
        rank = self.ctx.rank if self.ctx is not None else 0
        return {
            "steps": len(recs),
            "requests": len(res),
            "ttft_s_mean": float(np.mean([r.ttft_s for r in res])) if res else None,
            "prefill_step_s_mean": (float(np.mean([r.seconds for r in prefill_steps]))
                                    if prefill_steps else None),
            "prefill_tokens_per_s": (sum(r.prefill_tokens for r in prefill_steps)
                                     / max(sum(r.seconds for r in prefill_steps), 1e-12)
                                     if prefill_steps else None),
            "decode_tokens_per_s": dec_tokens / dec_time if dec_time > 0 else None,
            "mean_ir": float(np.mean(irs)) if irs else None,
            # replicas that arrived in time on THIS rank (bytes_prefetched_group: all ranks)
            "bytes_prefetched": float(sum(ep["bytes_prefetched_per_rank"][rank] for ep in eps)),
            "bytes_prefetched_group": float(sum(ep["bytes_prefetched"] for ep in eps)),
            "exposed_transfer_s": float(sum(ep["exposed_transfer_s"] for ep in eps)),
            "fallback_pairs": int(sum(sum(ep["fallback_pairs"]) for ep in eps)),
            # group-wide (identical on every rank): replicas planned, arrived in time, late
            "replicas_planned": int(sum(sum(ep["replicas_planned"]) for ep in eps)),
            "replicas_arrived": int(sum(sum(ep["replicas_arrived"]) for ep in eps)),
            "replicas_late": int(sum(sum(ep["replicas_late"]) for ep in eps)),
            # planner wall time per step (max over ranks, summed over layers)
            "plan_s_per_step": [float(ep["plan_seconds"]) for ep in eps],
            "plan_s_total": float(sum(ep["plan_seconds"] for ep in eps)),
            "rejected": [{"rid": rid, "reason": why} for rid, why in self.rejected.items()],
            # static/paged decode: KV pool bytes (and blocks), replica bytes reserved from the
            # same budget, requests of max_seq_len tokens that fit; peak requests running
            "memory": self.memory,
            "peak_running": self.peak_running,
        }


def greedy_generate(model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Single-process greedy decoding of one prompt (the reference the engine must match)."""
    cache = model.new_cache()
    device = next(model.parameters()).device
    out: list[int] = []
    ids = torch.tensor(list(prompt), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(ids, caches=[cache], last_only=True).logits[0]  # [V]
            tok = int(torch.argmax(logits).item())
            out.append(tok)
            ids = torch.tensor([tok], dtype=torch.int64, device=device)
    return out


# -- building models without a checkpoint -------------------------------------------------------

def _seed_of(seed: int, name: str, expert: int = -1) -> int:
    return (zlib.crc32(f"{seed}:{name}:{expert}".encode()) & 0x7FFFFFFF) or 1


_EXPERT_PARAMS = ("w_gate_up", "w_down", "b_gate_up", "b_down")


def random_model(cfg, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", expert_ids: Sequence[int] | None = None,
                 std: float = 0.02):
    """A `MoETransformer` with random weights, identical on every rank for shared weights
    (ranks on one device type: the generators are the device's, so a CPU and a CUDA draw differ).

    Every expert's weights come from a generator seeded by (seed, name, expert id), so a rank
    that builds only `expert_ids` gets exactly the rows the full model has. Norm weights are 1.
    """
    from probe.runtime.model import MoETransformer

    device = torch.device(device)
    with torch.device("meta"):
        model = MoETransformer(cfg, expert_ids)
    model = model.to_empty(device=device).to(dtype)
    ids = list(range(cfg.num_experts)) if expert_ids is None else list(expert_ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1] and leaf == "weight":
                p.fill_(1.0)
                continue
            if leaf in _EXPERT_PARAMS:
                for i, e in enumerate(ids):
                    g = torch.Generator(device=device).manual_seed(_seed_of(seed, name, e))
                    tmp = torch.empty(p.shape[1:], dtype=torch.float32, device=device)
                    p[i].copy_(tmp.normal_(0.0, std, generator=g))
                continue
            g = torch.Generator(device=device).manual_seed(_seed_of(seed, name))
            tmp = torch.empty(p.shape, dtype=torch.float32, device=device)
            p.copy_(tmp.normal_(0.0, std, generator=g))
    model.eval()
    model.requires_grad_(False)
    return model


def slice_experts(model, expert_ids: Sequence[int]):
    """A copy of `model` whose MoE blocks hold only `expert_ids` (rows taken from `model`)."""
    from probe.runtime.model import MoETransformer

    full_ids = model.moe_blocks[0].expert_ids
    rows = torch.tensor([full_ids.index(int(e)) for e in expert_ids], dtype=torch.int64)
    with torch.device("meta"):
        part = MoETransformer(model.cfg, list(expert_ids))
    state = {}
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in _EXPERT_PARAMS:
            state[name] = t.index_select(0, rows.to(t.device)).clone()
        else:
            state[name] = t
    part.load_state_dict(state, strict=True, assign=True)
    part.eval()
    part.requires_grad_(False)
    return part
