"""Largest-remainder rounding of token splits, shared by the simulator's policies.

Shape legend: S source ranks, E experts (or rows), G ranks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_by_fractions"]


def split_by_fractions(load: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """int64 [S, E, G]: every (s, e)'s tokens split over ranks by frac float [E, G] (rows sum
    to 1), largest remainder per (s, e), never onto a rank with a zero fraction.

    A Numba kernel (`_split_kernel`); `_split_by_fractions_numpy` is its numpy twin, same
    integers (the same float products, floors and stable order of the remainders)."""
    load = np.ascontiguousarray(load, dtype=np.int64)
    frac = np.ascontiguousarray(frac, dtype=np.float64)
    if load.ndim != 2 or frac.ndim != 2 or frac.shape[0] != load.shape[1]:
        raise ValueError(f"load must be int [S, E] and frac float [E, G], got {load.shape} "
                         f"and {frac.shape}")
    out = np.empty((load.shape[0], load.shape[1], frac.shape[1]), np.int64)
    _split_jit()(load, frac, out)
    return out


def _split_kernel(load, frac, out):  # pragma: no cover (run compiled)
    """Fill out int64 [S, E, G] as _split_by_fractions_numpy does: per (s, e) the floors of
    n x frac (+ 1e-9), then one token more to the first `short` positive-fraction ranks in
    the order of decreasing remainder (ties: lower rank first, a stable sort)."""
    num_sources, num_experts = load.shape
    num_ranks = frac.shape[1]
    held = np.empty(num_ranks, np.int64)
    rest = np.empty(num_ranks)
    order = np.empty(num_ranks, np.int64)
    for e in range(num_experts):
        m = 0
        for g in range(num_ranks):
            if frac[e, g] > 0:
                held[m] = g
                m += 1
        for s in range(num_sources):
            n = load[s, e]
            total = 0
            for g in range(num_ranks):
                target = n * frac[e, g]
                base = np.floor(target + 1e-9)
                out[s, e, g] = np.int64(base)
                total += out[s, e, g]
            short = n - total
            if short <= 0 or m == 0:
                continue
            for j in range(m):  # insertion sort of -remainder, stable
                g = held[j]
                key = -(n * frac[e, g] - np.float64(out[s, e, g]))
                i = j
                while i > 0 and rest[i - 1] > key:
                    rest[i] = rest[i - 1]
                    order[i] = order[i - 1]
                    i -= 1
                rest[i] = key
                order[i] = g
            for j in range(min(short, m)):
                out[s, e, order[j]] += 1


def _split_by_fractions_numpy(load: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """The numpy twin of split_by_fractions (the reference its kernel is tested against)."""
    load = np.asarray(load, dtype=np.int64)
    target = load[:, :, None] * frac[None, :, :]  # [S, E, G]
    base = np.floor(target + 1e-9).astype(np.int64)
    short = load - base.sum(axis=2)  # [S, E]
    rest = np.where(frac[None] > 0, target - base, -1.0)
    order = np.argsort(-rest, axis=2, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(frac.shape[1])[None, None, :], axis=2)
    base += (position < short[:, :, None]) & (frac[None] > 0)
    return base


_KERNEL = {}


def _split_jit():
    if "split" not in _KERNEL:
        import numba

        _KERNEL["split"] = numba.njit(cache=True)(_split_kernel)
    return _KERNEL["split"]
