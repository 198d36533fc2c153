"""Replica slot pool and split-phase expert-weight transfer (the paper's section 4.4).

Each rank owns a fixed pool of R replica slots per buffer, and two buffers: the replicas of MoE
layer l live in buffer l % 2, so every slot is double-buffered: while layer l reads its slots
(buffer l % 2), layer l+1's transfer writes the other buffer. A transfer into a buffer starts
only after the previous transfer into the same buffer (layer l-2's, late pieces included) has
finished and, on GPUs, after the compute that read it (`ready_event`); that wait happens on the
transfer's own issuer thread, never on the main thread or the main stream.

A `SplitPhaseTransfer` copies the replicas a `Plan` asks for into the receiving ranks' slots,
point-to-point from the holder named in `plan.sources`, on a separate process group (and, on
GPUs, from a separate CUDA stream). Every expert's weights (its named tensors as stored: for
experts kept packed the MXFP4 blocks and scales, or the FP8 weights and scale_inv, so a replica
moves the format's bytes) are cut into pieces along their first dimension. A background issuer
thread posts the pieces in a fixed order, at most `max_in_flight` at a time (it waits for the
oldest before posting another), and only while issuing is allowed:

    start()   during layer l's expert compute:  phase-1 pieces may be posted
    pause()   before layer l's combine:         no new piece is posted until resume()
    resume()  after the combine:                phase-2 pieces may be posted too; they run
                                                during layer l+1's attention
    arrived() at layer l+1's dispatch:          which replicas are complete (non-blocking)
    release_held()                              held-back pieces may be posted (tests)

Pause and resume act on an `IssueGate` that every live transfer of a runner shares, so no
transfer (a late one of an earlier layer included) posts a piece while any combine runs. A
piece posted before the pause may still be in flight during the combine; `max_in_flight`
bounds how many (8 pieces by default: two weight tensors' worth at `num_pieces` = 4).

Arrival: a replica has arrived when every one of its pieces has completed. Under NCCL the issuer
records a CUDA event on the transfer stream after each replica's last piece, and `arrived()`
queries those events (`Event.query()`, a host-side check, no synchronisation). On gloo (CPU) a
receive has completed when the issuer thread's `work.wait()` on it has returned, i.e. gloo has
written the bytes into the slot; `arrived()` reads the issuer's per-replica count of completed
receives under a lock. Either way `arrived()` never blocks, and a replica that is not complete
is simply not used: its tokens go to the home rank (see `probe.runtime.ep`). `hold_back` lets
tests make chosen replicas late on purpose: their phase-2 pieces are posted only after
`release_held()` (the executor calls it when the step ends; the next transfer into the same
buffer calls it when it starts), so they are genuinely incomplete when the layer dispatches.

Matching of point-to-point messages: every rank orders its pieces by (phase, g, e, piece index)
over the plan's replicas, so a sender and its receiver post the same sequence between them and
the rank that posts the globally earliest unfinished piece always finds its peer there too (no
deadlock with bounded posting). Transfers of different layers, steps and runners may overlap
in time (nothing drains them), so on gloo every piece's tag also carries the transfer's
sequence number: every rank creates the same transfers in the same order (one per planned
layer, on every rank, whether or not it sends or receives), so a process-wide counter gives
both ends the same number and a late piece of an old transfer can never match a receive of a
new one.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["IssueGate", "SlotPool", "SplitPhaseTransfer", "TransferStats"]

_SEQUENCE = itertools.count()  # transfers created by this process, in order


class SlotPool:
    """A rank's fixed replica storage: for each weight name a tensor [B, R, *shape].

    Args:
        shapes: weight name -> shape of ONE expert's tensor (e.g. {"gate_up": (2F, D), ...}).
        num_slots: R, replica slots per buffer.
        dtype: storage dtype, one for every tensor or a mapping weight name -> dtype (experts
            kept packed: MXFP4 blocks and scales are uint8, FP8 weights float8_e4m3fn with
            fp32 scales; see `probe.runtime.quant.split_packed`).
        device: storage.
        num_buffers: B, 2 for double buffering (layer l uses buffer l % B).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], num_slots: int, *,
                 dtype: torch.dtype | Mapping[str, torch.dtype],
                 device: torch.device | str = "cpu", num_buffers: int = 2) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if num_buffers < 1:
            raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
        if not shapes:
            raise ValueError("shapes must name at least one weight tensor")
        self.num_slots = int(num_slots)
        self.num_buffers = int(num_buffers)
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.dtypes = _dtypes(dtype, self.shapes)
        self.storage = {name: torch.zeros((num_buffers, max(num_slots, 1), *shape),
                                          dtype=self.dtypes[name], device=device)
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

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot (one replica: every weight tensor of one expert, in its dtype)."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.storage.values())

    def check_fits(self, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """ValueError unless `tensors` (one expert's weights to send into a slot) have exactly
        the slots' names, shapes and dtypes (a mismatch would leave the two ends of a transfer
        disagreeing on the bytes)."""
        got = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
        want = {name: (shape, self.dtypes[name]) for name, shape in self.shapes.items()}
        if got != want:
            bad = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
            raise ValueError(
                f"replica of expert {expert}: its weights do not fit the slot pool: "
                + "; ".join(f"{n}: sent {_describe(got.get(n))}, slot holds "
                            f"{_describe(want.get(n))}" for n in bad))


def _describe(entry) -> str:
    return "nothing" if entry is None else f"{list(entry[0])} {entry[1]}"


def _dtypes(dtype, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.dtype]:
    """The dtype of every weight name: one dtype for all, or a mapping covering `shapes`."""
    if isinstance(dtype, torch.dtype):
        return dict.fromkeys(shapes, dtype)
    if not isinstance(dtype, Mapping):
        raise TypeError(f"dtype must be a torch.dtype or a mapping name -> dtype, got "
                        f"{type(dtype).__name__}")
    if set(dtype) != set(shapes) or not all(isinstance(d, torch.dtype) for d in dtype.values()):
        raise ValueError(f"dtype must give a torch.dtype for exactly the weight names "
                         f"{sorted(shapes)}, got {dict(dtype)}")
    return dict(dtype)


class IssueGate:
    """Whether transfers may post new pieces now: `pause()` closes it, `resume()` opens it.

    Shared by every transfer of a runner. After `pause()` returns no issuer posts a new piece
    (an issuer checks the gate under the same lock immediately before each post) until
    `resume()`. `posts` counts the pieces posted through this gate (tests read it).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self.posts = 0

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def notify(self) -> None:
        """Wake issuers waiting for something other than the gate (a phase or a release)."""
        with self._cond:
            self._cond.notify_all()


@dataclass
class TransferStats:
    """Bytes and replicas this rank sent and received for one layer."""

    bytes_sent: int = 0
    bytes_received: int = 0
    replicas_received: int = 0
    replicas_arrived: int = 0
    held_back: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Piece:
    """One point-to-point message: `kind` "send" or "recv" of `tensor` with `peer`."""

    phase: int  # 0: phase 1, 1: phase 2, 2: held back until release_held()
    kind: str
    tensor: torch.Tensor
    peer: int
    tag: int
    expert: int
    last_of_expert: bool  # the replica's last piece on this rank (receives only)


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
        replicas: bool [G, E], the plan's extra copies (or a deferred plan, below).
        sources: int64 [G, E], the rank each copy comes from (-1 where none).
        rank: this rank.
        home_params: function e -> {name: tensor [*shape]} of expert e's home weights on this
            rank (called only for experts this rank sends).
        pool: this rank's `SlotPool` (receives into layer `layer`'s buffer).
        group: the transfer process group.
        num_pieces: pieces per weight tensor (phase split granularity).
        phase1_fraction: share of each expert's pieces allowed from `start()`.
        stream: CUDA stream to post from (None on CPU).
        ready_event: CUDA event the stream waits on before writing slots (the previous reader
            of this buffer is done).
        hold_back: (g, e) replicas whose phase-2 pieces wait for `release_held()` (tests).
        gate: the runner's shared `IssueGate` (default: a gate of this transfer alone).
        after: the previous transfer into the same buffer; this one posts nothing before that
            one has finished (waited on by the issuer thread).
        max_in_flight: pieces posted and not yet complete, at most.
        num_experts: E, needed only with a deferred plan.
    Construction starts the issuer thread; it posts nothing before `start()`.

    Deferred plan (the device planning path, `probe.runtime.device_plan`): `replicas` may be a
    function () -> (replicas bool [G, E], sources int [G, E]) with sources=None. The issuer
    thread calls it (it may block there, e.g. until the plan computed on the GPU is on the
    host) after the previous transfer into the buffer has ended, then takes this rank's slots
    and builds its pieces; until then `arrived()` is all False (nothing of the plan is in).
    """

    def __init__(self, layer: int, replicas, sources, rank: int,
                 home_params, pool: SlotPool, group: dist.ProcessGroup | None, *,
                 num_pieces: int = 4, phase1_fraction: float = 0.5,
                 stream: torch.cuda.Stream | None = None,
                 ready_event: torch.cuda.Event | None = None,
                 hold_back: Iterable[tuple[int, int]] = (),
                 gate: IssueGate | None = None,
                 after: SplitPhaseTransfer | None = None,
                 max_in_flight: int = 8, num_experts: int | None = None) -> None:
        deferred = callable(replicas)
        if deferred:
            if sources is not None or num_experts is None:
                raise ValueError("a deferred plan (replicas callable) takes sources=None and "
                                 "num_experts")
        else:
            replicas = np.asarray(replicas, dtype=bool)
            sources = np.asarray(sources)
            if replicas.shape != sources.shape or replicas.ndim != 2:
                raise ValueError(f"replicas [G, E] and sources [G, E] shapes differ: "
                                 f"{replicas.shape} vs {sources.shape}")
            num_experts = replicas.shape[1]
        if num_pieces < 1:
            raise ValueError(f"num_pieces must be >= 1, got {num_pieces}")
        if not 0.0 <= phase1_fraction <= 1.0:
            raise ValueError(f"phase1_fraction must be in [0, 1], got {phase1_fraction}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.layer = int(layer)
        self.rank = int(rank)
        self.group = group
        self.pool = pool
        self.stream = stream
        self.ready_event = ready_event
        self.num_experts = int(num_experts)
        self.stats = TransferStats()
        self.gate = gate if gate is not None else IssueGate()
        self.max_in_flight = int(max_in_flight)
        self._after = after
        self._hold = {(int(g), int(e)) for g, e in hold_back}
        self._use_nccl = group is not None and dist.get_backend(group) == "nccl"
        self.sequence = next(_SEQUENCE)  # the same on every rank (module doc: matching)
        self._home_params = home_params
        self._num_pieces, self._phase1_fraction = int(num_pieces), float(phase1_fraction)
        self._allowed_phase = -1  # highest phase that may be posted (-1: none yet)
        self._released = False
        self._events: dict[int, torch.cuda.Event] = {}  # NCCL: replica -> last piece's event
        self.num_posted = 0
        self._errors: list[BaseException] = []
        self._thread = None
        self._built = threading.Event()
        self._resolve = replicas if deferred else None
        self.slot_of: dict[int, int] = {}
        self._pieces: list[_Piece] = []
        self._expected: dict[int, int] = {}
        self._completed: dict[int, int] = {}
        # held-back pieces exist (either end); a deferred plan may hold some back: assume so
        self.holds_pieces = deferred and bool(self._hold)
        if not deferred:
            self._build(replicas, sources)
        if self._pieces or deferred:
            self._thread = threading.Thread(target=self._issue_loop, daemon=True,
                                            name=f"probe-transfer-l{self.layer}")
            self._thread.start()

    def _build(self, replicas: np.ndarray, sources: np.ndarray) -> None:
        """This rank's slots and pieces of the plan's replicas bool [G, E] from sources int
        [G, E] (at construction, or on the issuer thread once a deferred plan resolves)."""
        layer, rank, pool, num_pieces = self.layer, self.rank, self.pool, self._num_pieces
        my_experts = np.flatnonzero(replicas[rank]).tolist()
        slot_of = pool.assign(layer, my_experts)  # expert -> slot on this rank
        pieces: list[_Piece] = []
        for g, e in np.argwhere(replicas):
            g, e = int(g), int(e)
            h = int(sources[g, e])
            if h == g or h < 0:
                raise ValueError(f"replica of expert {e} on rank {g} has invalid source {h}")
            if rank not in (g, h):
                continue
            if rank == h:
                tensors = self._home_params(e)
                pool.check_fits(e, tensors)
            else:
                tensors = pool.params(layer, slot_of[e])
            names = sorted(tensors)
            views = [p for name in names for p in _pieces(tensors[name], num_pieces)]
            n1 = int(np.ceil(len(views) * self._phase1_fraction))
            kind = "send" if rank == h else "recv"
            for i, view in enumerate(views):
                tag = (self.sequence % 2048) * 2 ** 20 + ((g * self.num_experts + e) * 64
                                                           + i) % 2 ** 20
                phase = 0 if i < n1 else (2 if (g, e) in self._hold else 1)
                pieces.append(_Piece(phase, kind, view, g if rank == h else h, tag, e, False))
                nbytes = view.numel() * view.element_size()
                if kind == "send":
                    self.stats.bytes_sent += nbytes
                else:
                    self.stats.bytes_received += nbytes
            if rank == g:
                self.stats.replicas_received += 1
                if (g, e) in self._hold:
                    self.stats.held_back.append((g, e))
        # The global posting order (module doc): phase, then (g, e) row-major, then piece.
        pieces.sort(key=lambda p: p.phase)  # stable: keeps (g, e, piece) order inside a phase
        last = {}
        for i, p in enumerate(pieces):
            if p.kind == "recv":
                last[p.expert] = i
        pieces = [_Piece(p.phase, p.kind, p.tensor, p.peer, p.tag, p.expert,
                         last.get(p.expert) == i) for i, p in enumerate(pieces)]
        expected = {e: 0 for e in my_experts}
        for p in pieces:
            if p.kind == "recv":
                expected[p.expert] += 1
        with self.gate._cond:  # published together: arrived() reads them under this lock
            self.slot_of = slot_of
            self._pieces = pieces
            self._completed = {e: 0 for e in my_experts}  # completed receives per replica
            self._expected = expected
            self.holds_pieces = self.holds_pieces or any(p.phase == 2 for p in pieces)
        self._built.set()

    # -- the issuer thread --------------------------------------------------------------------
    def _may_post(self, piece: _Piece) -> bool:
        if self.gate.paused:
            return False
        if piece.phase == 2:
            return self._released and self._allowed_phase >= 1
        return piece.phase <= self._allowed_phase

    def _issue_loop(self) -> None:
        try:
            if self._after is not None:  # the previous transfer into this buffer must end:
                self._after.release_held()  # its late pieces go now, if they still wait
                if self._after._thread is not None:
                    self._after._thread.join()
            if self._resolve is not None:  # a device plan: wait for it here, off the main thread
                self._build(*self._resolve())
            if self.stream is not None:
                torch.cuda.set_device(self.stream.device)
            in_flight: list[tuple[_Piece, object]] = []
            cond = self.gate._cond
            for piece in self._pieces:
                while True:
                    if len(in_flight) >= self.max_in_flight:
                        self._finish(*in_flight.pop(0))
                        continue
                    with cond:  # the gate's lock: pause() cannot slip between check and post
                        if self._may_post(piece):
                            work = self._post(piece)
                            self.num_posted += 1
                            self.gate.posts += 1
                            break
                        if not in_flight:
                            cond.wait(timeout=0.05)
                            continue
                    self._finish(*in_flight.pop(0))  # not allowed yet: finish older pieces
                in_flight.append((piece, work))
            while in_flight:
                self._finish(*in_flight.pop(0))
        except BaseException as exc:  # surfaced by join()
            self._errors.append(exc)

    def _post(self, piece: _Piece):
        """Post one piece (called under the gate's lock, so posts of all transfers are
        serialised: NCCL calls on one communicator must not come from two threads at once)."""
        op = dist.isend if piece.kind == "send" else dist.irecv
        if self.stream is None:
            if piece.kind == "send":
                return dist.isend(piece.tensor, dst=piece.peer, group=self.group, tag=piece.tag)
            return dist.irecv(piece.tensor, src=piece.peer, group=self.group, tag=piece.tag)
        with torch.cuda.stream(self.stream):
            if self.ready_event is not None and self.num_posted == 0:
                self.stream.wait_event(self.ready_event)
            works = dist.batch_isend_irecv([dist.P2POp(op, piece.tensor, piece.peer,
                                                       self.group)])
            return works[0]

    def _finish(self, piece: _Piece, work) -> None:
        """Wait (on this issuer thread) until `piece` is complete, and count it."""
        if self.stream is None:
            work.wait()  # gloo: blocks this thread until the bytes are in (or sent)
        else:
            done = torch.cuda.Event()
            with torch.cuda.stream(self.stream):
                work.wait()  # orders the transfer stream after the piece
                done.record()
            if piece.kind == "recv" and piece.last_of_expert:
                self._events[piece.expert] = done  # published before the count below
            done.synchronize()  # blocks this thread only
        if piece.kind == "recv":
            with self.gate._cond:
                self._completed[piece.expert] += 1

    # -- what the main thread calls -----------------------------------------------------------
    def _allow(self, phase: int) -> None:
        with self.gate._cond:
            self._allowed_phase = max(self._allowed_phase, phase)
            self.gate._cond.notify_all()

    def start(self) -> None:
        """Allow phase 1 (call during the current layer's expert compute)."""
        self._allow(0)

    def pause(self) -> None:
        """Post no new piece until `resume()` (pauses the shared gate)."""
        self.gate.pause()

    def resume(self) -> None:
        """Reopen the gate and allow phase 2 (call after the combine)."""
        self._allow(1)
        self.gate.resume()

    def release_held(self) -> None:
        """Let the held-back pieces be posted (after the layer that they were late for)."""
        with self.gate._cond:
            self._released = True
            self.gate._cond.notify_all()

    def arrived(self) -> np.ndarray:
        """bool [E]: replicas on this rank whose every piece has completed (non-blocking; see
        the module doc for what completed means under NCCL and gloo)."""
        out = np.zeros(self.num_experts, dtype=bool)
        with self.gate._cond:
            for e, n in self._expected.items():
                out[e] = n > 0 and self._completed[e] == n
        if self._use_nccl:  # the issuer also checked the event; re-query, still non-blocking
            for e in np.flatnonzero(out):
                ev = self._events.get(int(e))
                out[e] = ev is not None and ev.query()
        self.stats.replicas_arrived = int(out.sum())
        return out


    def order_after(self, arrived: np.ndarray) -> None:
        """Order the current stream after the arrived replicas' pieces (GPU; the events have
        completed already, so this costs nothing; CPU: nothing to do)."""
        if self.stream is None:
            return
        stream = torch.cuda.current_stream(self.stream.device)
        for e in np.flatnonzero(arrived):
            ev = self._events.get(int(e))
            if ev is not None:
                stream.wait_event(ev)

    def wait_posted(self) -> np.ndarray:
        """Allow phases 1 and 2 and block until their pieces are in (the "wait" policy: the
        transfer time is exposed instead of falling back). Returns bool [E] of replicas that
        are complete; held-back replicas stay incomplete."""
        self._allow(1)
        while not self._built.wait(1e-3):  # a deferred plan resolves on the issuer thread
            if self._errors or not self._thread.is_alive():
                break
        need = {e: sum(1 for p in self._pieces if p.kind == "recv" and p.expert == e
                       and p.phase < 2) for e in self._expected}
        while True:
            with self.gate._cond:
                done = all(self._completed[e] >= n for e, n in need.items())
            if done or self._errors or (self._thread is not None
                                        and not self._thread.is_alive()):
                break
            time.sleep(1e-4)
        if self._errors:
            raise self._errors[0]
        return self.arrived()

    @property
    def done(self) -> bool:
        """Every piece posted and complete (non-blocking)."""
        return self._thread is None or not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Block until the issuer has posted and completed every piece (held ones included:
        they are released first). For shutdown and for the next transfer into this buffer."""
        self.release_held()
        self._allow(2)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._errors:
            raise self._errors[0]


    def params(self, expert: int) -> dict[str, torch.Tensor]:
        """Slot views holding replica `expert` on this rank."""
        return self.pool.params(self.layer, self.slot_of[int(expert)])
