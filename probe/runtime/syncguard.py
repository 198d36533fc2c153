"""A guard that makes host synchronisation raise, for tests of the no-sync decode path.

    with no_host_sync():
        logits = decode_forward(model, cache, ids, slots, positions)

On CUDA it sets `torch.cuda.set_sync_debug_mode("error")` for the block, so every operation that
waits for the device (a device-to-host copy, `.item()`, `nonzero`, a boolean-mask index, an
explicit synchronize) raises inside torch.

On the CPU nothing ever waits for a device, so the guard patches the Python entry points through
which a tensor's VALUES reach the host or decide a shape. It catches, from Python code:
- `Tensor.item`, `Tensor.tolist`, `Tensor.cpu`, `Tensor.numpy`;
- `bool(t)`, `int(t)`, `float(t)`, `operator.index(t)` (so `if t:`, `range(t)`, `x[: t]`);
- data-dependent shapes: `Tensor.nonzero`/`torch.nonzero`, `torch.argwhere`, `Tensor.unique`/
  `torch.unique`, `torch.unique_consecutive`, `masked_select`, `repeat_interleave` with tensor
  repeats, and indexing (`t[mask]`, `t[mask] = v`) with a boolean mask.
It does NOT see calls made from C++ inside one torch operator, nor `Tensor.to("cpu")`; on the
CPU it is a check of the Python code path, which is where the runtime's syncs were.

`count_only=True` counts the calls (in `guard.calls`, a list of names) instead of raising.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["HostSyncError", "SyncGuard", "no_host_sync"]


class HostSyncError(RuntimeError):
    """A host synchronisation inside `no_host_sync`."""


_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                   "__index__", "nonzero", "unique", "unique_consecutive", "masked_select",
                   "argwhere")
_TORCH_FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "masked_select", "argwhere")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in items)


class SyncGuard:
    """The state of one `no_host_sync` block: `calls` lists the names of the syncs seen."""

    def __init__(self, count_only: bool) -> None:
        self.count_only = count_only
        self.calls: list[str] = []

    def hit(self, name: str) -> None:
        self.calls.append(name)
        if not self.count_only:
            raise HostSyncError(f"host synchronisation inside no_host_sync: {name}")


@contextlib.contextmanager
def no_host_sync(*, count_only: bool = False, cuda: bool | None = None) -> Iterator[SyncGuard]:
    """Make host syncs raise `HostSyncError` (CPU patches; see the module docstring) and, when
    `cuda` (default: CUDA is available), torch's CUDA sync debug mode "error"."""
    guard = SyncGuard(count_only)
    saved: list[tuple[object, str, object, bool]] = []  # owner, name, original, own attribute

    def patch(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            guard.hit(label)
            return original(*args, **kwargs)

        saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, wrapper)

    def patch_repeat_interleave(owner, label: str) -> None:
        original = owner.repeat_interleave

        def wrapper(*args, **kwargs):
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
            if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
                guard.hit(label)
            return original(*args, **kwargs)

        saved.append((owner, "repeat_interleave", original,
                      "repeat_interleave" in vars(owner)))
        owner.repeat_interleave = wrapper

    def patch_index(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(self, index, *rest):
            if _bool_index(index):
                guard.hit(f"Tensor.{name} with a boolean mask")
            return original(self, index, *rest)

        saved.append((torch.Tensor, name, original, name in vars(torch.Tensor)))
        setattr(torch.Tensor, name, wrapper)

    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    previous_mode = torch.cuda.get_sync_debug_mode() if use_cuda else None
    try:
        for name in _TENSOR_METHODS:
            patch(torch.Tensor, name, f"Tensor.{name}")
        for name in _TORCH_FUNCTIONS:
            patch(torch, name, f"torch.{name}")
        patch_repeat_interleave(torch.Tensor, "Tensor.repeat_interleave(tensor repeats)")
        patch_repeat_interleave(torch, "torch.repeat_interleave(tensor repeats)")
        patch_index("__getitem__")
        patch_index("__setitem__")
        if use_cuda:
            torch.cuda.set_sync_debug_mode("error")
        yield guard
    finally:
        if use_cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
