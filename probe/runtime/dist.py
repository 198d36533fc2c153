"""Process-group helpers for the expert-parallel runtime: setup, a transfer group, a watchdog.

Nothing here runs at import. `init_distributed` is the one place that reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and only when called.
Every other function takes its `ProcessGroup` as an argument.

Failure handling: a rank that dies or hangs must not leave its peers waiting forever.
1. `init_process_group(timeout=...)`: gloo raises when a collective exceeds the timeout, and
   raises at once when a peer's connection closes; NCCL aborts the communicator after it.
2. `Watchdog`: a daemon thread that every guarded collective registers with. If one does not
   finish within `timeout_s`, the watchdog prints which rank, which collective and how long, and
   ends the process with exit code `WATCHDOG_EXIT_CODE` (torchrun then stops the other ranks).
   This is the backstop for backends whose collectives can block in C code beyond their timeout.
3. `guarded(...)` turns any exception raised inside a collective into a `RankFailure` whose
   message names the rank, the collective and the likely cause.

Shutdown (`shutdown`): every rank waits for the others (a barrier), then the transfer group and
the main group are destroyed in that order, the context drops its references to them and
garbage is collected, all while the interpreter is fully alive. The backends' C++ objects
(gloo's worker threads and the work objects they hold) are released there, not during
interpreter finalization, where tearing them down can abort the process ("terminate called
without an active exception") after its work is done.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "WATCHDOG_EXIT_CODE",
    "DistContext",
    "RankFailure",
    "Watchdog",
    "guarded",
    "init_distributed",
    "new_transfer_group",
    "shutdown",
]

WATCHDOG_EXIT_CODE = 75


class RankFailure(RuntimeError):
    """A collective failed or timed out, most likely because a peer rank died or hangs."""


class Watchdog:
    """Ends the process with a clear message if a guarded region outlives `timeout_s`.

    >>> wd = Watchdog(timeout_s=5.0, rank=0)
    >>> with wd.guard("noop"):
    ...     pass
    >>> wd.stop()
    """

    def __init__(self, timeout_s: float, rank: int, *, poll_s: float = 0.05,
                 exit_code: int = WATCHDOG_EXIT_CODE) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.rank = int(rank)
        self.exit_code = exit_code
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._active: dict[int, tuple[str, float]] = {}
        self._next_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        with self._lock:
            token = self._next_id
            self._next_id += 1
            self._active[token] = (name, time.monotonic() + self.timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._active.pop(token, None)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            now = time.monotonic()
            with self._lock:
                late = [(name, dl) for name, dl in self._active.values() if now > dl]
            if late:
                name = late[0][0]
                sys.stderr.write(
                    f"probe.runtime: rank {self.rank}: collective '{name}' did not finish within "
                    f"{self.timeout_s:.1f} s; a peer rank probably died or hangs. Aborting this "
                    "rank.\n")
                sys.stderr.flush()
                os._exit(self.exit_code)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


@contextlib.contextmanager
def guarded(name: str, rank: int, watchdog: Watchdog | None = None) -> Iterator[None]:
    """Run a collective under the watchdog; re-raise its failure as a `RankFailure`."""
    ctx = watchdog.guard(name) if watchdog is not None else contextlib.nullcontext()
    try:
        with ctx:
            yield
    except RankFailure:
        raise
    except (RuntimeError, dist.DistBackendError) as exc:
        raise RankFailure(
            f"rank {rank}: collective '{name}' failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a peer rank probably died or "
            "timed out") from exc


@dataclass
class DistContext:
    """What the runtime needs to know about its process groups.

    Attributes:
        rank, world_size: this process in the expert-parallel group (G = world_size).
        group: the main group (dispatch/combine all-to-all, all-gathers).
        transfer_group: a second group over the same ranks for replica weight transfer, so that
            point-to-point weight traffic never queues behind (or ahead of) the all-to-alls.
        device: where this rank's tensors live.
        watchdog: guards collectives (None: rely on the backend timeout alone).
    """

    rank: int
    world_size: int
    group: dist.ProcessGroup | None
    transfer_group: dist.ProcessGroup | None
    device: torch.device
    watchdog: Watchdog | None = None

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group) if self.group is not None else "none"


def new_transfer_group(world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """A new group over all ranks, used only for expert-weight transfers (collective call)."""
    return dist.new_group(ranks=list(range(world_size)),
                          timeout=datetime.timedelta(seconds=timeout_s))


def init_distributed(*, backend: str | None = None, timeout_s: float = 120.0,
                     watchdog_s: float | None = None) -> DistContext:
    """Join the torchrun job: NCCL with one GPU per rank if CUDA is present, else gloo on CPU.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and torchrun's rendezvous variables) from the
    environment. `timeout_s` bounds every collective; `watchdog_s` (default 1.5 x timeout_s)
    arms the watchdog.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    transfer_group = new_transfer_group(world_size, timeout_s)
    # Initialise both communicators now, with every rank present: NCCL's first point-to-point
    # batch on a group must otherwise be collective, and transfers involve only some ranks.
    probe = torch.zeros(1, device=device)
    dist.all_reduce(probe)
    dist.all_reduce(probe, group=transfer_group)
    watchdog = Watchdog(watchdog_s or 1.5 * timeout_s, rank)
    return DistContext(rank=rank, world_size=world_size, group=dist.group.WORLD,
                       transfer_group=transfer_group, device=device, watchdog=watchdog)


def shutdown(ctx: DistContext, *, barrier: bool = True) -> None:
    """Leave the process groups cleanly (safe to call twice; see the module doc).

    With `barrier` (a collective: every rank must call it) the ranks first wait for each other,
    under the watchdog, so that none tears its connections down while a peer still works.
    Then the watchdog stops, the transfer group and the main group are destroyed (in that
    order), `ctx` forgets both, and a garbage collection frees their C++ objects now.
    Objects that still hold a group elsewhere (an `EPRunner`: call its `close()` first) would
    keep it alive until interpreter exit.
    """
    if barrier and ctx.group is not None and dist.is_initialized() and ctx.world_size > 1:
        with guarded("shutdown barrier", ctx.rank, ctx.watchdog):
            dist.barrier(group=ctx.group)
    if ctx.watchdog is not None:
        ctx.watchdog.stop()
        ctx.watchdog = None
    if dist.is_initialized():
        if ctx.transfer_group is not None:
            dist.destroy_process_group(ctx.transfer_group)
        dist.destroy_process_group()
    ctx.group = None
    ctx.transfer_group = None
    gc.collect()
