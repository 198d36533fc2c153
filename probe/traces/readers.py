"""Readers for routing data that vLLM / SGLang users already have.

Shape legend: N steps, T tokens, L MoE layers, K top-k, E experts, S source ranks.

* Per-request routed experts (vLLM / SGLang can return, per request, the expert ids every
  token visited): a list of int arrays [T_i, L, K], one per request.
  `from_routed_experts` turns them into a RoutingTrace; `read_routed_experts_npy/npz` read
  such arrays from files first.
* vLLM EPLB load history: JSON `{"load_history": [{"logical_expert_load": [[...E]...L]}, ...]}`,
  counts per layer and expert, without token detail. `read_vllm_eplb_load_history` returns
  counts int64 [N, L, E]; `load_from_counts` spreads them over source ranks into the
  [N, L, S, E] shape of RoutingTrace.load_counts(); `trace_from_counts` builds a trace whose
  per-layer loads equal the counts exactly (tokens are synthesised: no inter-layer detail).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probe.traces.trace import DECODE, PREFILL, RoutingTrace

__all__ = [
    "from_routed_experts",
    "load_from_counts",
    "read_routed_experts_npy",
    "read_routed_experts_npz",
    "read_vllm_eplb_load_history",
    "trace_from_counts",
]


def _check_request_arrays(arrays: Sequence[Any], num_experts: int) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        arrays = [arrays]
    if not isinstance(arrays, (list, tuple)) or not arrays:
        raise ValueError("arrays must be a non-empty list of int arrays [tokens, layers, top_k]")
    out, shape = [], None
    for i, arr in enumerate(arrays):
        arr = np.asarray(arr)
        if arr.ndim != 3:
            raise ValueError(f"arrays[{i}] must be [tokens, layers, top_k], got ndim {arr.ndim} "
                             f"(shape {arr.shape})")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"arrays[{i}] must hold integer expert ids, got dtype {arr.dtype}")
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise ValueError(f"arrays[{i}] has [layers, top_k] = {list(arr.shape[1:])}, "
                             f"arrays[0] has {list(shape)}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_experts):
            raise ValueError(f"arrays[{i}] holds expert ids in [{int(arr.min())}, "
                             f"{int(arr.max())}], outside [0, num_experts={num_experts})")
        out.append(arr.astype(np.int16, copy=False))
    return out


def from_routed_experts(
    arrays: Sequence[Any],
    *,
    num_experts: int,
    num_ranks: int,
    rank_of_request: Sequence[int] | None = None,
    tokens_per_step: int | None = None,
    prompt_lens: Sequence[int] | None = None,
    step_tag: str = "",
    meta: dict | None = None,
) -> RoutingTrace:
    """A RoutingTrace from per-request routed experts.

    arrays: one int array [T_i, L, K] per request (expert ids of every token of the request,
        prompt then generated tokens, as vLLM / SGLang return them).
    num_experts: E; ids must lie in [0, E). num_ranks: S source ranks.
    rank_of_request: source rank of each request (default: round robin, request i on rank
        i % S). All tokens of a request live on its rank (data-parallel attention).
    Steps (pick one; default one step):
      * neither tokens_per_step nor prompt_lens: all tokens of all requests form one step
        (one call = one batch), phase PREFILL;
      * tokens_per_step: the requests' tokens, in request order, are cut into steps of that
        many tokens (chunked prefill), phase PREFILL;
      * prompt_lens: replays a static batch: one PREFILL step with every request's first
        prompt_lens[i] tokens, then DECODE steps where step j holds token prompt_lens[i] + j
        of every request still generating.
    Within a step, tokens are ordered by source rank, then request, then position.
    """
    arrays = _check_request_arrays(arrays, num_experts)
    num_req = len(arrays)
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if rank_of_request is None:
        ranks = np.arange(num_req) % num_ranks
    else:
        ranks = np.asarray(rank_of_request, dtype=np.int64)
        if ranks.shape != (num_req,):
            raise ValueError(f"rank_of_request must have one rank per request ({num_req}), "
                             f"got shape {ranks.shape}")
        if num_req and (ranks.min() < 0 or ranks.max() >= num_ranks):
            raise ValueError(f"rank_of_request values must lie in [0, num_ranks={num_ranks})")
    if tokens_per_step is not None and prompt_lens is not None:
        raise ValueError("give tokens_per_step or prompt_lens, not both")
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    all_tokens = np.concatenate(arrays)  # [T, L, K], request order
    token_req = np.repeat(np.arange(num_req), lengths)
    token_pos = np.arange(len(all_tokens)) - np.repeat(starts, lengths)

    if prompt_lens is not None:
        plen = np.asarray(prompt_lens, dtype=np.int64)
        if plen.shape != (num_req,) or np.any(plen < 0) or np.any(plen > lengths):
            raise ValueError("prompt_lens must give, per request, 0 <= prompt length <= tokens")
        prompt = token_pos < plen[token_req]
        step_of = np.where(prompt, 0, token_pos - plen[token_req] + 1)
        num_steps = int(step_of.max()) + 1 if len(step_of) else 1
        phase = np.full(num_steps, DECODE, dtype=np.uint8)
        phase[0] = PREFILL
    elif tokens_per_step is not None:
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        step_of = np.arange(len(all_tokens)) // tokens_per_step
        num_steps = max(-(-len(all_tokens) // tokens_per_step), 1)
        phase = np.full(num_steps, PREFILL, dtype=np.uint8)
    else:
        step_of = np.zeros(len(all_tokens), dtype=np.int64)
        num_steps = 1
        phase = np.full(1, PREFILL, dtype=np.uint8)
    src = ranks[token_req]
    order = np.lexsort((token_pos, token_req, src, step_of))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(step_of, minlength=num_steps))])
    return RoutingTrace.from_arrays(
        num_experts=num_experts, num_ranks=num_ranks, step_offsets=offsets,
        src_rank=src[order], experts=all_tokens[order], phase=phase,
        step_tags=[step_tag] * num_steps,
        meta={"source": "routed_experts", "num_requests": num_req, **(meta or {})},
    )


def read_routed_experts_npy(path: str | os.PathLike) -> list[np.ndarray]:
    """Per-request arrays from a .npy file: one int array [T, L, K] (one request)."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as .npy ({exc})") from None
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected an array [tokens, layers, top_k], got ndim "
                         f"{arr.ndim} (shape {arr.shape})")
    return [arr]


def read_routed_experts_npz(path: str | os.PathLike) -> list[np.ndarray]:
    """Per-request arrays from a .npz file: one int array [T_i, L, K] per entry.

    Entries are taken in natural order of their names ("req_2" before "req_10").
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            names = sorted(data.files, key=_natural_key)
            arrays = [data[name] for name in names]
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from None
    if not arrays:
        raise ValueError(f"{path}: holds no arrays")
    for name, arr in zip(names, arrays, strict=True):
        if arr.ndim != 3:
            raise ValueError(f"{path}: entry {name!r} must be [tokens, layers, top_k], got "
                             f"ndim {arr.ndim} (shape {arr.shape})")
    return arrays


def _natural_key(name: str) -> list:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_vllm_eplb_load_history(path: str | os.PathLike) -> np.ndarray:
    """Expert load counts int64 [N, L, E] from a vLLM EPLB load-history JSON file.

    The file holds {"load_history": [record, ...]} (a bare list of records is accepted too);
    each record holds "logical_expert_load": [L][E] non-negative token counts.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read as JSON ({exc})") from None
    records = data.get("load_history") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty 'load_history' list")
    loads = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "logical_expert_load" not in rec:
            raise ValueError(f"{path}: load_history[{i}] has no 'logical_expert_load'")
        try:
            arr = np.asarray(rec["logical_expert_load"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: load_history[{i}].logical_expert_load is not a "
                             "rectangular [layers][experts] list of numbers") from None
        if arr.ndim != 2:
            raise ValueError(f"{path}: load_history[{i}].logical_expert_load must be "
                             f"[layers][experts], got ndim {arr.ndim}")
        if loads and arr.shape != loads[0].shape:
            raise ValueError(f"{path}: load_history[{i}] has shape {list(arr.shape)}, "
                             f"load_history[0] has {list(loads[0].shape)}")
        if np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise ValueError(f"{path}: load_history[{i}].logical_expert_load must hold "
                             "non-negative integer counts")
        loads.append(arr)
    return np.stack(loads).astype(np.int64)


def load_from_counts(counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Spread expert counts [N, L, E] over S source ranks: int32 [N, L, S, E].

    Rank s gets floor(c / S), plus one for the first c % S ranks; sums over S equal counts.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [N, L, E], got shape {counts.shape}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be non-negative")
    counts = counts.astype(np.int64)
    ranks = np.arange(num_ranks)[None, None, :, None]
    base = (counts // num_ranks)[:, :, None, :]
    extra = (ranks < (counts % num_ranks)[:, :, None, :]).astype(np.int64)
    return (base + extra).astype(np.int32)


def trace_from_counts(counts: np.ndarray, *, num_ranks: int, top_k: int,
                      meta: dict | None = None) -> RoutingTrace:
    """A RoutingTrace whose expert_counts() equal counts [N, L, E] exactly.

    Each (step, layer) must hold the same multiple of top_k in total over experts for all
    layers of the step (T_n * K), and no expert more than T_n (a token picks an expert at
    most once). Tokens are synthesised: token t takes entries t, t + T, ... of the expert ids
    sorted and repeated by count, which are distinct; tokens are spread round robin over
    ranks. Inter-layer correlation is not preserved (the counts carry none).
    """
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [N, L, E], got shape {counts.shape}")
    if counts.size and (counts.min() < 0 or not np.issubdtype(counts.dtype, np.integer)):
        raise ValueError("counts must hold non-negative integers")
    num_steps, num_layers, num_experts = counts.shape
    totals = counts.sum(axis=2)  # [N, L]
    experts, offsets = [], [0]
    for n in range(num_steps):
        if np.any(totals[n] != totals[n, 0]) or totals[n, 0] % top_k:
            raise ValueError(f"counts of step {n} sum to {totals[n].tolist()} per layer; a trace "
                             f"needs the same multiple of top_k={top_k} in every layer")
        num_tok = int(totals[n, 0]) // top_k
        if counts[n].size and counts[n].max() > num_tok:
            raise ValueError(f"step {n}: an expert has more load than the step has tokens "
                             f"({int(counts[n].max())} > {num_tok})")
        step = np.empty((num_tok, num_layers, top_k), dtype=np.int16)
        for layer in range(num_layers):
            ids = np.repeat(np.arange(num_experts), counts[n, layer])  # [T*K], sorted
            step[:, layer] = ids.reshape(top_k, num_tok).T
        experts.append(step)
        offsets.append(offsets[-1] + num_tok)
    experts_arr = (np.concatenate(experts) if experts
                   else np.zeros((0, num_layers, top_k), np.int16))
    src = np.concatenate([np.arange(int(totals[n, 0]) // top_k) % num_ranks
                          for n in range(num_steps)]) if num_steps else np.zeros(0)
    return RoutingTrace.from_arrays(
        num_experts=num_experts, num_ranks=num_ranks, step_offsets=np.array(offsets),
        src_rank=src.astype(np.int64), experts=experts_arr,
        meta={"source": "counts", **(meta or {})},
    )
