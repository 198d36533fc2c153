"""Dispatch-time assignment on the GPU: `probe.planner.assign`'s water-filling in numba.cuda.

The same candidates, the same arithmetic in the same order as the host kernel `assign._best`
(DeepSeek's even split, then the water-filling descents from each start, rounded by largest
remainder and routed locality-first; the lowest eq. 8 wins, the first on ties), so the
assignment is identical to `assign_tokens(load, copies, cost, passes=passes, home=home)`,
integer for integer. One block runs one layer and several layers go in one launch:

- the block's threads first derive, in parallel, what the host prepares in numpy (totals,
  holders, the multi-holder experts heaviest first, the single-holder levels `fixed`); the
  per-rank sums of `fixed` repeat numpy's pairwise summation (`_np_sum`), so they are the
  same floats as `assign._fixed_levels`;
- thread k then runs candidate k (one start's descent, rounding, routing and eq. 8) and the
  last candidate thread scores the even split; every thread works in its own slice of a
  scratch buffer, with the host kernel's sequential loops, so no sum is reordered;
- thread 0 keeps the best, and the threads write the dense [S, E, G] assignment expert by
  expert (each expert's routing is independent of the others').

`DeviceAssigner` is the host side: built once per cost model and shape (it checks shapes and
dtypes on the first call of each shape, allocates the output and scratch buffers once, and
reuses them), it takes device arrays or torch CUDA tensors (through
`__cuda_array_interface__`, no copy) and launches on the caller's torch stream via
`numba.cuda.external_stream`, so a call can be captured in a CUDA graph. It does not look at
the values on the device (that would synchronise): an expert with tokens and no copy sets the
layer's `status` to 1 (the host kernel raises ValueError there) and its tokens are dropped.
Under the simulator (NUMBA_ENABLE_CUDASIM=1) it takes numpy arrays.

Use (on a GPU, or with NUMBA_ENABLE_CUDASIM=1 set before Numba is first imported):

    assigner = DeviceAssigner(cost, num_experts=E, num_layers=L)   # once
    out, objective, status = assigner(load, copies)   # [L, S, E] and [L, G, E], every step

experiments/planner/gpu_assign.py checks it against the host kernel and times it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config

from probe.planner.assign import remote_cost
from probe.planner.cost import CostModel
from probe.planner.numba_cuda import cuda

__all__ = ["THREADS", "DeviceAssigner"]

# Threads per block (one block per layer): >= the candidates (5 with a home), a warp.
THREADS = 32
# numpy's pairwise summation: blocks of up to 128 values, 8 partial sums each.
_PW_BLOCK = 128


# --- numpy's float64 sum, in numpy's order -----------------------------------------------------

@cuda.jit(device=True)
def _np_block(a, lo, n):  # pragma: no cover - device code
    """numpy's pairwise_sum of a[lo:lo + n] for n <= 128: sequential below 8, else 8
    running sums combined as a tree, then the rest."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


def _np_level(lower):
    """numpy's pairwise_sum one recursion level up from `lower` (halves of n / 2 rounded
    down to a multiple of 8); device functions cannot recurse, so the levels are stacked."""

    @cuda.jit(device=True)
    def level(a, lo, n):  # pragma: no cover - device code
        if n <= _PW_BLOCK:
            return _np_block(a, lo, n)
        half = n // 2
        half -= half % 8
        return lower(a, lo, half) + lower(a, lo + half, n - half)

    return level


# Six levels: exact for up to 128 * 2**6 = 8192 values (DeviceAssigner checks E).
_np_sum = _np_block
for _ in range(6):
    _np_sum = _np_level(_np_sum)
MAX_EXPERTS = _PW_BLOCK * 2 ** 6


# --- the host kernel's pieces as device functions (same loops, same order) ---------------------

@cuda.jit(device=True)
def _level_of(x, local, alpha, beta, hop):  # pragma: no cover - device code
    return alpha + beta * x + hop * max(x - local, 0.0)


@cuda.jit(device=True)
def _tokens_at(w, a, b, local, beta, hop):  # pragma: no cover - device code
    if w <= a:
        return 0.0
    if w <= b:
        return (w - a) / beta
    return local + (w - b) / (beta + hop)


@cuda.jit(device=True)
def _waterfill(fixed, order, num_order, holds, total, load, hop, alpha, beta, passes, x,
               level, srt):  # pragma: no cover - device code
    """assign._waterfill on x [E, G], which holds the start on entry and the split on exit."""
    num_ranks = holds.shape[0]
    for g in range(num_ranks):
        level[g] = fixed[g]
    for i in range(num_order):
        e = order[i]
        for g in range(num_ranks):
            if holds[g, e] and x[e, g] > 0:
                level[g] += _level_of(x[e, g], load[g, e], alpha, beta, hop[g])
    for _ in range(passes):
        moved = 0.0
        for i in range(num_order):
            e = order[i]
            m = 0
            for g in range(num_ranks):
                if holds[g, e]:
                    if x[e, g] > 0:
                        level[g] -= _level_of(x[e, g], load[g, e], alpha, beta, hop[g])
                    for which in range(2):
                        value = level[g] + alpha
                        if which == 1:
                            value = level[g] + alpha + beta * load[g, e]
                        j = m
                        while j > 0 and srt[j - 1] > value:
                            srt[j] = srt[j - 1]
                            j -= 1
                        srt[j] = value
                        m += 1
            lo = srt[m - 1]
            for k in range(m):
                taken = 0.0
                for g in range(num_ranks):
                    if holds[g, e]:
                        a = level[g] + alpha
                        taken += _tokens_at(srt[k], a, a + beta * load[g, e], load[g, e],
                                            beta, hop[g])
                if taken >= total[e]:
                    lo = srt[k - 1] if k > 0 else srt[0]
                    break
            c_sum = 0.0
            s_sum = 0.0
            for g in range(num_ranks):
                if holds[g, e]:
                    a = level[g] + alpha
                    b = a + beta * load[g, e]
                    if lo >= b:
                        c_sum += load[g, e] - b / (beta + hop[g])
                        s_sum += 1.0 / (beta + hop[g])
                    elif lo >= a:
                        c_sum -= a / beta
                        s_sum += 1.0 / beta
            w = (total[e] - c_sum) / s_sum
            for g in range(num_ranks):
                if holds[g, e]:
                    a = level[g] + alpha
                    share = _tokens_at(w, a, a + beta * load[g, e], load[g, e], beta, hop[g])
                    moved = max(moved, abs(share - x[e, g]) * beta)
                    x[e, g] = share
                    if share > 0:
                        level[g] += _level_of(share, load[g, e], alpha, beta, hop[g])
        if moved < 1e-9:
            break


@cuda.jit(device=True)
def _quotas(x, load, holds, total, quota, rem, cand):  # pragma: no cover - device code
    """assign._quotas into quota int64 [E, G] (zeroed here)."""
    num_experts, num_ranks = quota.shape
    for e in range(num_experts):
        for g in range(num_ranks):
            quota[e, g] = 0
        tot = total[e]
        if tot == 0:
            continue
        m = 0
        base = 0
        for g in range(num_ranks):
            if holds[g, e] and x[e, g] > 0:
                f = math.floor(x[e, g] + 1e-9)
                quota[e, g] = min(f, tot)
                rem[g] = x[e, g] - f
                base += quota[e, g]
                j = m
                while j > 0 and rem[cand[j - 1]] < rem[g]:
                    cand[j] = cand[j - 1]
                    j -= 1
                cand[j] = g
                m += 1
        if m == 0:
            for g in range(num_ranks):
                if holds[g, e]:
                    quota[e, g] = tot
                    break
            continue
        short = tot - base
        k = 0
        while short > 0:
            quota[e, cand[k % m]] += 1
            short -= 1
            k += 1
        k = m - 1
        while short < 0:
            g = cand[k]
            if quota[e, g] > 0:
                quota[e, g] -= 1
                short += 1
            k = k - 1 if k > 0 else m - 1


@cuda.jit(device=True)
def _route_expert(e, quota, load, token_time, left, hold, flow, out,
                  write):  # pragma: no cover - device code
    """assign._route for expert e: adds to flow [S, G] (when not `write`) or writes
    out [S, E, G] (when `write`). Returns False when tokens found no holder (invalid input)."""
    num_sources = load.shape[0]
    num_ranks = quota.shape[1]
    m = 0
    for g in range(num_ranks):
        left[g] = quota[e, g]
        if left[g] > 0:
            hold[m] = g
            m += 1
    for s in range(num_sources):
        k = min(load[s, e], left[s])
        if k > 0:
            left[s] -= k
            if write:
                out[s, e, s] += k
            else:
                flow[s, s] += k
    for s in range(num_sources):
        rest = load[s, e] - min(load[s, e], quota[e, s])
        while rest > 0:
            best = -1
            for i in range(m):
                g = hold[i]
                if left[g] > 0 and (best < 0 or token_time[s, g] < token_time[s, best]):
                    best = g
            if best < 0:
                return False
            k = min(rest, left[best])
            left[best] -= k
            rest -= k
            if write:
                out[s, e, best] += k
            else:
                flow[s, best] += k
    return True


@cuda.jit(device=True)
def _even_expert(e, load, copies, hold, tokens, flow, out, write):  # pragma: no cover
    """assign._even for expert e: adds rank totals to tokens [E, G] and flow [S, G], or
    writes out [S, E, G] when `write`."""
    num_sources = load.shape[0]
    num_ranks = copies.shape[0]
    count = 0
    m = 0
    for g in range(num_ranks):
        if copies[g, e] > 0:
            count += copies[g, e]
            hold[m] = g
            m += 1
    if count == 0:
        return
    for s in range(num_sources):
        n = load[s, e]
        if n == 0:
            continue
        quota = n // count
        leftover = n % count
        k = 0
        for i in range(m):
            g = hold[i]
            got = 0
            for _ in range(copies[g, e]):
                got += quota + (1 if (k + s) % count < leftover else 0)
                k += 1
            if got > 0:
                if write:
                    out[s, e, g] = got
                else:
                    tokens[e, g] += got
                    flow[s, g] += got


@cuda.jit(device=True)
def _objective(tokens, flow, token_time, alpha, beta, comp):  # pragma: no cover
    """assign._objective (comp float [G] scratch)."""
    num_experts, num_ranks = tokens.shape
    for g in range(num_ranks):
        comp[g] = 0.0
    for e in range(num_experts):
        for g in range(num_ranks):
            if tokens[e, g] > 0:
                comp[g] += alpha + beta * tokens[e, g]
    worst = 0.0
    for g in range(num_ranks):
        t_in = 0.0
        t_out = 0.0
        for s in range(flow.shape[0]):
            if s != g:
                t_in += flow[s, g] * token_time[s, g]
                t_out += flow[g, s] * token_time[g, s]
        worst = max(worst, comp[g] + 2.0 * max(t_in, t_out))
    return worst


# --- the kernel: one block per layer -----------------------------------------------------------

@cuda.jit
def _assign_kernel(load_all, copies_all, home_all, use_home, token_time, hop, alpha, beta,
                   passes, total_all, holds_all, nhold_all, order_all, norder_all, fixed_all,
                   terms_all, x_all, quota_all, flow_all, level_all, srt_all, rem_all,
                   cand_all, left_all, hold_all, comp_all, obj_all, out_all, objective_all,
                   status_all):  # pragma: no cover - device code
    layer = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    load = load_all[layer]
    copies = copies_all[layer]
    total = total_all[layer]
    holds = holds_all[layer]
    nhold = nhold_all[layer]
    order = order_all[layer]
    fixed = fixed_all[layer]
    num_sources, num_experts = load.shape
    num_ranks = copies.shape[0]
    num_cand = 6 if use_home else 4  # starts (5 or 3) + the even split

    # 1. Totals, holders (parallel over experts), the layer's error flag.
    if tid == 0:
        status_all[layer] = 0
    for e in range(tid, num_experts, nthreads):
        tot = 0
        for s in range(num_sources):
            tot += load[s, e]
        total[e] = tot
        n = 0
        for g in range(num_ranks):
            holds[g, e] = copies[g, e] > 0
            if holds[g, e]:
                n += 1
        nhold[e] = n
    cuda.syncthreads()
    # 2. Multi-holder experts heaviest first (stable: a rank count per expert), their number.
    for e in range(tid, num_experts, nthreads):
        if nhold[e] > 1 and total[e] > 0:
            pos = 0
            for f in range(num_experts):
                if nhold[f] > 1 and total[f] > 0 and (
                        total[f] > total[e] or (total[f] == total[e] and f < e)):
                    pos += 1
            order[pos] = e
        if total[e] > 0 and nhold[e] == 0:
            status_all[layer] = 1
    if tid == 0:
        count = 0
        for e in range(num_experts):
            if nhold[e] > 1 and total[e] > 0:
                count += 1
        norder_all[layer] = count
    # 3. fixed[g]: the single-holder experts' levels, summed as numpy sums them.
    for g in range(tid, num_ranks, nthreads):
        terms = terms_all[layer, g]
        n = 0
        for e in range(num_experts):
            if nhold[e] == 1 and total[e] > 0:
                tokens = float(total[e])
                value = 0.0
                if holds[g, e]:
                    value = (alpha + beta * tokens) + hop[g] * (tokens - load[g, e])
                terms[n] = value
                n += 1
        fixed[g] = _np_sum(terms, 0, n)
    cuda.syncthreads()
    num_order = norder_all[layer]

    # 4. Candidate k on thread k: starts 0 (empty), 1-2 (even over the copies), 3-4 (home
    # only, when given); the last candidate is DeepSeek's even split.
    if tid < num_cand:
        x = x_all[layer, tid]
        quota = quota_all[layer, tid]
        flow = flow_all[layer, tid]
        for e in range(num_experts):
            for g in range(num_ranks):
                x[e, g] = 0.0
                quota[e, g] = 0
        for s in range(num_sources):
            for g in range(num_ranks):
                flow[s, g] = 0.0
        if tid == num_cand - 1:
            for e in range(num_experts):
                _even_expert(e, load, copies, hold_all[layer, tid], quota, flow, out_all[layer],
                             False)
        else:
            rounds = passes if tid % 2 == 0 else 0
            if tid > 0:
                home = home_all[layer]
                for i in range(num_order):
                    e = order[i]
                    count = 0
                    for g in range(num_ranks):
                        if tid >= 3 and holds[g, e] and home[g, e]:
                            count += 1
                    at_home = count > 0
                    if not at_home:
                        count = nhold[e]
                    for g in range(num_ranks):
                        share = 0.0
                        if holds[g, e] and (not at_home or home[g, e]):
                            share = 1.0
                        x[e, g] = float(total[e]) * share / float(count)
            _waterfill(fixed, order, num_order, holds, total, load, hop, alpha, beta, rounds,
                       x, level_all[layer, tid], srt_all[layer, tid])
            _quotas(x, load, holds, total, quota, rem_all[layer, tid], cand_all[layer, tid])
            for e in range(num_experts):
                if not _route_expert(e, quota, load, token_time, left_all[layer, tid],
                                     hold_all[layer, tid], flow, out_all[layer], False):
                    status_all[layer] = 1
        obj_all[layer, tid] = _objective(quota, flow, token_time, alpha, beta,
                                         comp_all[layer, tid])
    # 5. The best candidate (the even split first, then the starts in order; strict <).
    out = out_all[layer]
    for i in range(tid, num_sources * num_experts * num_ranks, nthreads):
        out[i // (num_experts * num_ranks), (i // num_ranks) % num_experts, i % num_ranks] = 0
    cuda.syncthreads()
    best = num_cand - 1
    best_obj = obj_all[layer, num_cand - 1]
    for k in range(num_cand - 1):
        if obj_all[layer, k] < best_obj:
            best_obj = obj_all[layer, k]
            best = k
    if tid == 0:
        objective_all[layer] = best_obj
    quota = quota_all[layer, best]
    for e in range(tid, num_experts, nthreads):
        if best == num_cand - 1:
            _even_expert(e, load, copies, hold_all[layer, tid], quota, flow_all[layer, tid],
                         out, True)
        else:
            _route_expert(e, quota, load, token_time, left_all[layer, tid],
                          hold_all[layer, tid], flow_all[layer, tid], out, True)


# --- host side ---------------------------------------------------------------------------------

def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


class DeviceAssigner:
    """`assign_tokens` for L layers at once on the GPU (module docstring).

    cost: the CostModel (alpha, beta, token_time of eq. 8), fixed for the assigner's life.
    num_experts, num_layers: the shape of every call (load [L, S, E], copies [L, G, E]).
    passes: water-filling rounds (>= 1), as in `assign_tokens`.
    with_home: calls pass `home` [L, G, E] (the base layout) and the home-only starts are
        tried too, as `assign_tokens(..., home=...)`.
    """

    def __init__(self, cost: CostModel, num_experts: int, num_layers: int, *, passes: int = 8,
                 with_home: bool = False) -> None:
        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        for name, value, low in (("num_experts", num_experts, 1), ("num_layers", num_layers, 1),
                                 ("passes", passes, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"num_experts must be <= {MAX_EXPERTS}, got {num_experts}")
        if not cost.beta > 0:
            raise ValueError(f"cost.beta must be > 0 to split tokens, got {cost.beta!r}")
        if not isinstance(with_home, bool):
            raise TypeError(f"with_home must be a bool, got {with_home!r}")
        self.cost = cost
        self.num_ranks = cost.num_ranks
        self.num_experts = int(num_experts)
        self.num_layers = int(num_layers)
        self.passes = int(passes)
        self.with_home = with_home
        self._num_cand = 6 if with_home else 4  # the starts and the even split
        self._checked: set = set()
        self._buffers: dict = {}

    def _check(self, name: str, value, shape: tuple, kinds: str) -> None:
        """Shape and dtype of one input, checked on the first call with its shape and dtype."""
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name} must be a CUDA array (torch CUDA tensor or numba device "
                            f"array), got {type(value).__name__}")
        key = (name, tuple(value.shape), str(value.dtype))
        if key in self._checked:
            return
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        kind = np.dtype(str(value.dtype).replace("torch.", "")).kind
        if kind not in kinds:
            raise TypeError(f"{name} must have an integer{' or bool' if 'b' in kinds else ''} "
                            f"dtype, got {value.dtype}")
        self._checked.add(key)

    @staticmethod
    def _device(value):
        """A kernel argument: CUDA arrays by __cuda_array_interface__ (no copy); numpy arrays
        only under the simulator."""
        if config.ENABLE_CUDASIM:
            if isinstance(value, np.ndarray) or hasattr(value, "copy_to_host"):
                return value
        elif hasattr(value, "__cuda_array_interface__"):
            # sync=False: no wait on the producer's stream (the launch is on that stream
            # already, and a synchronisation would break a CUDA graph capture).
            return cuda.from_cuda_array_interface(value.__cuda_array_interface__, owner=value,
                                                  sync=False)
        raise TypeError(f"expected a CUDA array (torch CUDA tensor or numba device array), got "
                        f"{type(value).__name__}")

    def _alloc(self, torch_device):
        """(outputs, scratch, constants) for outputs as torch tensors on `torch_device` or
        (None) numba device arrays; allocated on the first call of each kind, then reused."""
        key = str(torch_device)
        if key in self._buffers:
            return self._buffers[key]
        L, E, G = self.num_layers, self.num_experts, self.num_ranks
        S, C, T = G, self._num_cand, THREADS
        if torch_device is not None:
            import torch

            def new(shape, dtype):
                return torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name),
                                   device=torch_device)
        else:
            def new(shape, dtype):
                return cuda.to_device(np.zeros(shape, dtype))
        f64, i64 = np.float64, np.int64
        outs = (new((L, S, E, G), i64), new(L, f64), new(L, np.int32))
        # In the kernel's argument order: total, holds, nhold, order, norder, fixed, terms,
        # then per candidate x, quota, flow, level, srt, rem, cand, per thread left, hold,
        # per candidate comp, obj.
        scratch = (new((L, E), i64), new((L, G, E), np.bool_), new((L, E), i64),
                   new((L, E), i64), new(L, i64), new((L, G), f64), new((L, G, E), f64),
                   new((L, C, E, G), f64), new((L, C, E, G), i64), new((L, T, S, G), f64),
                   new((L, C, G), f64), new((L, C, 2 * G), f64), new((L, C, G), f64),
                   new((L, C, G), i64), new((L, T, G), i64), new((L, T, G), i64),
                   new((L, C, G), f64), new((L, C), f64))
        consts = (cuda.to_device(np.ascontiguousarray(self.cost.token_time, f64)),
                  cuda.to_device(np.ascontiguousarray(remote_cost(self.cost), f64)))
        self._buffers[key] = (outs, [self._device(v) for v in (*scratch, *outs)], consts)
        return self._buffers[key]

    def __call__(self, load, copies, home=None):
        """(assignment int64 [L, S, E, G], objective float64 [L] (eq. 8 of each layer's
        assignment), status int32 [L] (0 ok, 1 an expert had tokens but no copy)): torch
        tensors when `load` is a torch tensor, else device arrays. load int [L, S, E],
        copies int [L, G, E], home int or bool [L, G, E] (only with with_home). The outputs
        are the assigner's own buffers, overwritten by the next call."""
        L, E, G = self.num_layers, self.num_experts, self.num_ranks
        self._check("load", load, (L, G, E), "iu")
        self._check("copies", copies, (L, G, E), "iu")
        if self.with_home:
            if home is None:
                raise ValueError("home is required: the assigner was built with_home=True")
            self._check("home", home, (L, G, E), "iub")
        elif home is not None:
            raise ValueError("home given but the assigner was built with_home=False")
        torch_device = load.device if _is_torch(load) else None
        outs, views, consts = self._alloc(torch_device)
        inputs = [self._device(v) for v in (load, copies, copies if home is None else home)]
        if torch_device is not None:
            import torch

            stream = cuda.external_stream(torch.cuda.current_stream(torch_device).cuda_stream)
        else:
            stream = 0
        _assign_kernel[L, THREADS, stream](
            *inputs, self.with_home, *consts, float(self.cost.alpha), float(self.cost.beta),
            self.passes, *views)
        return outs
