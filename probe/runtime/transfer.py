"""Replica slot pool and split-phase expert-weight transfer (the paper's section 4.4).

Each rank owns a fixed pool of R replica slots per buffer, and two buffers: the replicas of MoE
layer l live in buffer l % 2, so the slots of layer l+1 are filled while layer l's are in use.

A `SplitPhaseTransfer` copies the replicas a `Plan` asks for into the receiving ranks' slots,
point-to-point from the holder named in `plan.sources`, on a separate process group (and, on
GPUs, from a separate CUDA stream). Every expert's weights are cut into pieces along their first
dimension; the pieces go out in phases:

    start()   during layer l's expert compute:  phase-1 pieces posted
    pause()   before layer l's combine:         nothing more posted (the combine runs alone)
    resume()  after the combine:                phase-2 pieces posted; they finish during
                                                layer l+1's attention
    poll()    before layer l+1's MoE:           which replicas arrived (non-blocking)
    drain()   after layer l+1's MoE:            wait for stragglers so buffers can be reused

A replica counts as arrived only if every piece of it has completed when `poll()` runs (work
objects' `is_completed()`: a host-side query of a CUDA event under NCCL, no device
synchronisation). Replicas that did not arrive are simply not used: their tokens go to the home
rank (see `probe.runtime.ep`). `hold_back` lets tests make chosen replicas late on purpose: their
phase-2 pieces are withheld until `drain()`, so they are genuinely incomplete at `poll()`.

Matching of point-to-point messages: every rank walks the plan's replicas in the same order
(row-major over [G, E], then pieces in order), so a sender and its receiver post the same
sequence between them; gloo additionally gets a distinct tag per piece.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SlotPool", "SplitPhaseTransfer", "TransferStats"]


class SlotPool:
    """A rank's fixed replica storage: for each weight name a tensor [B, R, *shape].

    Args:
        shapes: weight name -> shape of ONE expert's tensor (e.g. {"gate_up": (2F, D), ...}).
        num_slots: R, replica slots per buffer.
        dtype, device: storage.
        num_buffers: B, 2 for double buffering (layer l uses buffer l % B).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], num_slots: int, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 num_buffers: int = 2) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if num_buffers < 1:
            raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
        if not shapes:
            raise ValueError("shapes must name at least one weight tensor")
        self.num_slots = int(num_slots)
        self.num_buffers = int(num_buffers)
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.storage = {name: torch.zeros((num_buffers, max(num_slots, 1), *shape), dtype=dtype,
                                          device=device)
                        for name, shape in self.shapes.items()}
        # slot_expert[b][r] = global expert id held in slot r of buffer b, or -1.
        self.slot_expert = np.full((num_buffers, max(num_slots, 1)), -1, dtype=np.int64)
        self.slot_layer = np.full(num_buffers, -1, dtype=np.int64)

    def buffer_of(self, layer: int) -> int:
        return layer % self.num_buffers

    def assign(self, layer: int, experts: Iterable[int]) -> dict[int, int]:
        """Give slots of layer `layer`'s buffer to `experts` (in order). Returns expert -> slot."""
        experts = [int(e) for e in experts]
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} replicas for layer {layer} exceed the pool's "
                             f"{self.num_slots} slots")
        b = self.buffer_of(layer)
        self.slot_expert[b] = -1
        self.slot_expert[b, :len(experts)] = experts
        self.slot_layer[b] = layer
        return {e: r for r, e in enumerate(experts)}

    def params(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        """Views of slot `slot` of layer `layer`'s buffer: name -> [*shape]."""
        b = self.buffer_of(layer)
        return {name: t[b, slot] for name, t in self.storage.items()}

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values())


@dataclass
class TransferStats:
    """Bytes and replicas this rank sent and received for one layer."""

    bytes_sent: int = 0
    bytes_received: int = 0
    replicas_received: int = 0
    replicas_arrived: int = 0
    held_back: list[tuple[int, int]] = field(default_factory=list)


def _pieces(tensor: torch.Tensor, num_pieces: int) -> list[torch.Tensor]:
    """Contiguous views of `tensor` cut along dim 0 (at most num_pieces, none empty)."""
    if tensor.dim() == 0:
        return [tensor.reshape(1)]
    return [p for p in torch.tensor_split(tensor, min(num_pieces, max(tensor.shape[0], 1)))
            if p.numel() > 0]


class SplitPhaseTransfer:
    """Copies one layer's planned replicas into the slot pools of the receiving ranks.

    Args:
        layer: MoE layer index l (selects the pool buffer and the gloo tags).
        replicas: bool [G, E], the plan's extra copies.
        sources: int64 [G, E], the rank each copy comes from (-1 where none).
        rank: this rank.
        home_params: function e -> {name: tensor [*shape]} of expert e's home weights on this
            rank (called only for experts this rank sends).
        pool: this rank's `SlotPool` (receives into layer `layer`'s buffer).
        group: the transfer process group.
        num_pieces: pieces per weight tensor (phase split granularity).
        phase1_fraction: share of each expert's pieces posted by `start()`.
        stream: CUDA stream to post from (None on CPU).
        ready_event: CUDA event the stream waits on before writing slots (the previous user of
            this buffer is done).
        hold_back: (g, e) replicas whose phase-2 pieces are withheld until `drain()` (tests).
    """

    def __init__(self, layer: int, replicas: np.ndarray, sources: np.ndarray, rank: int,
                 home_params, pool: SlotPool, group: dist.ProcessGroup | None, *,
                 num_pieces: int = 4, phase1_fraction: float = 0.5,
                 stream: torch.cuda.Stream | None = None,
                 ready_event: torch.cuda.Event | None = None,
                 hold_back: Iterable[tuple[int, int]] = ()) -> None:
        replicas = np.asarray(replicas, dtype=bool)
        sources = np.asarray(sources)
        if replicas.shape != sources.shape or replicas.ndim != 2:
            raise ValueError(f"replicas [G, E] and sources [G, E] shapes differ: "
                             f"{replicas.shape} vs {sources.shape}")
        if num_pieces < 1:
            raise ValueError(f"num_pieces must be >= 1, got {num_pieces}")
        if not 0.0 <= phase1_fraction <= 1.0:
            raise ValueError(f"phase1_fraction must be in [0, 1], got {phase1_fraction}")
        self.layer = int(layer)
        self.rank = int(rank)
        self.group = group
        self.pool = pool
        self.stream = stream
        self.ready_event = ready_event
        self.num_experts = replicas.shape[1]
        self.stats = TransferStats()
        self._hold = {(int(g), int(e)) for g, e in hold_back}
        self._use_batch = group is not None and dist.get_backend(group) == "nccl"
        my_experts = np.flatnonzero(replicas[rank]).tolist()
        self.slot_of = pool.assign(layer, my_experts)  # expert -> slot on this rank
        self._works: dict[int, list] = {e: [] for e in my_experts}  # receive works per expert
        self._send_works: list = []
        # ops[phase] = list of (kind, tensor, peer, tag, expert)
        self._ops: list[list[tuple[str, torch.Tensor, int, int, int]]] = [[], [], []]
        for g, e in np.argwhere(replicas):
            g, e = int(g), int(e)
            h = int(sources[g, e])
            if h == g or h < 0:
                raise ValueError(f"replica of expert {e} on rank {g} has invalid source {h}")
            if rank not in (g, h):
                continue
            tensors = home_params(e) if rank == h else pool.params(layer, self.slot_of[e])
            names = sorted(tensors)
            pieces = [p for name in names for p in _pieces(tensors[name], num_pieces)]
            n1 = int(np.ceil(len(pieces) * phase1_fraction))
            for i, piece in enumerate(pieces):
                tag = (((self.layer * self.num_experts + e) * 64 + g) * 1024 + i) % (2 ** 31)
                phase = 0 if i < n1 else (2 if (g, e) in self._hold else 1)
                kind = "send" if rank == h else "recv"
                peer = g if rank == h else h
                self._ops[phase].append((kind, piece, peer, tag, e))
                nbytes = piece.numel() * piece.element_size()
                if kind == "send":
                    self.stats.bytes_sent += nbytes
                else:
                    self.stats.bytes_received += nbytes
            if rank == g:
                self.stats.replicas_received += 1
                if (g, e) in self._hold:
                    self.stats.held_back.append((g, e))
        self._posted = [False, False, False]
        self.paused = False
        self._expected = {e: 0 for e in my_experts}
        for phase in self._ops:
            for kind, _t, _p, _tag, e in phase:
                if kind == "recv":
                    self._expected[e] += 1
        # gloo's Work.is_completed() stays False until wait() is called, so on gloo a waiter
        # thread per posted phase waits on the receives and counts completed pieces.
        self._completed = {e: 0 for e in my_experts}
        self._lock = threading.Lock()
        self._waiters: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    # -- phases -------------------------------------------------------------------------------
    def _post(self, phase: int) -> None:
        if self._posted[phase]:
            return
        self._posted[phase] = True
        ops = self._ops[phase]
        if not ops:
            return
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                if self.ready_event is not None:
                    self.stream.wait_event(self.ready_event)
                self._issue(ops)
        else:
            self._issue(ops)

    def _issue(self, ops) -> None:
        if self._use_batch:
            p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, self.group)
                   for kind, t, peer, _tag, _e in ops]
            works = dist.batch_isend_irecv(p2p)
            for (kind, _t, _p, _tag, e), work in zip(ops, works, strict=True):
                (self._send_works if kind == "send" else self._works[e]).append(work)
            return
        recvs = []
        for kind, t, peer, tag, e in ops:
            if kind == "send":
                self._send_works.append(dist.isend(t, dst=peer, group=self.group, tag=tag))
            else:
                work = dist.irecv(t, src=peer, group=self.group, tag=tag)
                self._works[e].append(work)
                recvs.append((e, work))
        if recvs:
            thread = threading.Thread(target=self._wait_all, args=(recvs,), daemon=True,
                                      name=f"probe-transfer-l{self.layer}")
            thread.start()
            self._waiters.append(thread)

    def _wait_all(self, recvs) -> None:
        try:
            for e, work in recvs:
                work.wait()
                with self._lock:
                    self._completed[e] += 1
        except BaseException as exc:  # surfaced by drain()
            self._errors.append(exc)

    def start(self) -> None:
        """Post phase 1 (call during the current layer's expert compute)."""
        self._post(0)

    def pause(self) -> None:
        """Post nothing more until `resume()` (call before the combine all-to-all)."""
        self.paused = True

    def resume(self) -> None:
        """Post phase 2 (call after the combine)."""
        self.paused = False
        self._post(0)
        self._post(1)

    def poll(self) -> np.ndarray:
        """bool [E]: replicas on this rank whose every piece has completed (non-blocking).

        A replica counts only if all its pieces were posted (phases 1 and 2) and completed:
        under NCCL `is_completed()` queries the work's CUDA event; on gloo the waiter threads'
        counts are read.
        """
        arrived = np.zeros(self.num_experts, dtype=bool)
        for e, works in self._works.items():
            if len(works) != self._expected[e]:
                continue  # some piece not even posted yet
            if self._use_batch:
                arrived[e] = all(w.is_completed() for w in works)
            else:
                with self._lock:
                    arrived[e] = self._completed[e] == self._expected[e]
        self.stats.replicas_arrived = int(arrived.sum())
        return arrived

    def wait_posted(self) -> np.ndarray:
        """Post phases 1 and 2 and block until their pieces are in (the "wait" policy: the
        transfer time is exposed instead of falling back). Returns bool [E] of replicas that
        are complete; held-back replicas stay incomplete."""
        self._post(0)
        self._post(1)
        if self._use_batch:
            arrived = np.zeros(self.num_experts, dtype=bool)
            for e, works in self._works.items():
                if len(works) == self._expected[e]:
                    for w in works:
                        w.wait()
                    arrived[e] = True
            self.stats.replicas_arrived = int(arrived.sum())
            return arrived
        for thread in self._waiters:
            thread.join()
        return self.poll()

    def wait_arrived(self, arrived: np.ndarray) -> None:
        """Order this device's compute after the arrived replicas' receives (no host block
        under NCCL: `work.wait()` makes the current stream wait)."""
        if not self._use_batch:
            return  # gloo: the waiter thread already waited on every arrived piece
        for e in np.flatnonzero(arrived):
            for w in self._works.get(int(e), ()):
                w.wait()

    def drain(self) -> None:
        """Post anything withheld and wait for every piece (sent and received)."""
        for phase in range(3):
            self._post(phase)
        for thread in self._waiters:
            thread.join()
        self._waiters = []
        if self._errors:
            raise self._errors[0]
        if self._use_batch:
            for works in self._works.values():
                for w in works:
                    w.wait()
        for w in self._send_works:
            w.wait()
        self._send_works = []

    def params(self, expert: int) -> dict[str, torch.Tensor]:
        """Slot views holding replica `expert` on this rank."""
        return self.pool.params(self.layer, self.slot_of[int(expert)])
