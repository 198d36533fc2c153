"""Readers for the routing records that serving and training engines write.

Shape legend: N steps, T tokens, L MoE layers, K top-k, E logical experts, R physical expert
slots, S source ranks.

Every reader returns a RoutingTrace. Files that hold only counts (no per-token ids) become a
trace whose per-(step, layer, rank) loads equal the counts exactly, with tokens synthesised
by `trace_from_rank_counts` (inter-layer correlation is not preserved: the counts carry
none). The exact layout each reader accepts is documented in docs/traces.md ("Engine
readers"); where the engine's own layout could not be checked against a running engine,
that section says so. torch is imported only to read `.pt` files.

    read_sglang_dump(path)              SGLang expert-distribution recorder dump (.pt):
                                        stat mode (logical_count), per-pass mode
                                        (records of physical counts), per-token mode
                                        (records of top-k ids)
    read_routed_experts(path)           vLLM routed experts [T, L, K]: .npy, .npz, .pt,
                                        .safetensors
    read_vllm_eplb(path)                vLLM EPLB load: the JSON load history, or a tensor
                                        window [W, L, R] (.pt / .npy)
    read_megatron_routing(path)         Megatron-Core routing record (.pt): per MoE layer,
                                        top-k ids [T, K] or a routing map bool [T, E]
    read_trtllm_expert_stats(directory) TensorRT-LLM expert statistics: meta_info.json and
                                        rank<r>.safetensors of "<iter>_<layer>" counts [E]
    read_engine_trace(path, fmt)        one of the above by name (ENGINE_FORMATS)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from probe.traces.readers import (
    from_routed_experts,
    read_routed_experts_npy,
    read_routed_experts_npz,
    read_vllm_eplb_load_history,
    trace_from_counts,
)
from probe.traces.trace import DECODE, RoutingTrace

__all__ = [
    "ENGINE_FORMATS",
    "read_engine_trace",
    "read_megatron_routing",
    "read_routed_experts",
    "read_sglang_dump",
    "read_trtllm_expert_stats",
    "read_vllm_eplb",
    "read_vllm_routed_experts",
    "trace_from_rank_counts",
]

# Names of the formats `read_engine_trace` (and `probe trace convert --from`) knows.
ENGINE_FORMATS = ("probe", "sglang-dump", "routed-experts", "vllm-eplb", "megatron",
                  "trtllm-stats")


# ----------------------------------------------------------------------------- helpers
def _torch_load(path: Path) -> Any:
    """The object of a torch.save file, loaded with weights_only=True (no pickle code)."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading a .pt file needs torch, which is not installed"
                         ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(f"{path}: cannot read as a torch.save file ({type(exc).__name__}: "
                         f"{exc})") from None


def _array(path: Path, what: str, value: Any, ndim: int | tuple[int, ...],
           kind: str = "iu") -> np.ndarray:
    """`value` (tensor, array or nested list) as a numpy array of `ndim` dims and dtype kind
    in `kind`; ValueError naming the file and `what` otherwise."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except ValueError:
        raise ValueError(f"{path}: {what} is not a rectangular array") from None
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in dims or arr.dtype.kind not in kind:
        raise ValueError(f"{path}: {what} must be a {' or '.join(map(str, dims))}-D array of "
                         f"{'integers' if kind == 'iu' else 'booleans or integers'}, got "
                         f"shape {list(arr.shape)} and dtype {arr.dtype}")
    return arr


def _check_counts(path: Path, what: str, counts: np.ndarray) -> np.ndarray:
    if counts.size and counts.min() < 0:
        raise ValueError(f"{path}: {what} holds negative counts")
    return counts.astype(np.int64)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _logical(path: Path, physical: np.ndarray, phy2log: np.ndarray | None,
             num_experts: int | None) -> tuple[np.ndarray, int]:
    """Counts [..., L, R] over physical slots summed onto logical experts [..., L, E] with
    phy2log int [L, R] (None: slot r is expert r). Returns (counts, E)."""
    num_layers, num_slots = physical.shape[-2:]
    if phy2log is None:
        num_experts = num_slots if num_experts is None else num_experts
        if num_experts != num_slots:
            raise ValueError(f"{path}: counts have {num_slots} physical slots but "
                             f"num_experts = {num_experts} and no physical_to_logical_map")
        return physical, num_experts
    if phy2log.shape != (num_layers, num_slots):
        raise ValueError(f"{path}: physical_to_logical_map has shape {list(phy2log.shape)}, "
                         f"the counts need [L, R] = [{num_layers}, {num_slots}]")
    if phy2log.size and phy2log.min() < 0:
        raise ValueError(f"{path}: physical_to_logical_map holds negative expert ids")
    if num_experts is None:
        num_experts = int(phy2log.max()) + 1
    elif phy2log.max() >= num_experts:
        raise ValueError(f"{path}: physical_to_logical_map names expert {int(phy2log.max())}"
                         f", outside [0, num_experts={num_experts})")
    out = np.zeros((*physical.shape[:-1], num_experts), np.int64)
    for layer in range(num_layers):
        np.add.at(out[..., layer, :].T, phy2log[layer], physical[..., layer, :].T)
    return out, num_experts


def trace_from_rank_counts(load: np.ndarray, *, top_k: int,
                           meta: dict | None = None) -> RoutingTrace:
    """A RoutingTrace whose load_counts() equal `load` int [N, L, S, E] exactly.

    For each (step, rank), every layer's counts must sum to the same multiple of top_k
    (T_{n,s} * K) and no expert may exceed T_{n,s} (a token picks an expert once). Token t
    of the (step, rank) takes entries t, t + T, ... of the expert ids sorted and repeated by
    count, which are distinct. Steps are DECODE; tokens ordered by rank within a step.

    >>> load = np.array([[[[1, 1, 0], [0, 1, 1]]]])   # [N=1, L=1, S=2, E=3]
    >>> tr = trace_from_rank_counts(load, top_k=2)
    >>> bool((tr.load_counts() == load).all()), tr.num_tokens
    (True, 2)
    """
    load = np.asarray(load)
    if load.ndim != 4:
        raise ValueError(f"load must be [N, L, S, E], got shape {load.shape}")
    if load.size and (not np.issubdtype(load.dtype, np.integer) or load.min() < 0):
        raise ValueError("load must hold non-negative integer counts")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    num_steps, num_layers, num_ranks, num_experts = load.shape
    totals = load.sum(axis=3)  # [N, L, S]
    chunks, src, offsets = [], [], [0]
    for n in range(num_steps):
        step_tokens = 0
        for s in range(num_ranks):
            if np.any(totals[n, :, s] != totals[n, 0, s]) or totals[n, 0, s] % top_k:
                raise ValueError(
                    f"step {n}, rank {s}: counts sum to {totals[n, :, s].tolist()} per layer; "
                    f"a trace needs the same multiple of top_k={top_k} in every layer")
            num_tok = int(totals[n, 0, s]) // top_k
            if num_tok == 0:
                continue
            if load[n, :, s].max() > num_tok:
                raise ValueError(f"step {n}, rank {s}: an expert has more load than there are "
                                 f"tokens ({int(load[n, :, s].max())} > {num_tok})")
            block = np.empty((num_tok, num_layers, top_k), np.int16)
            for layer in range(num_layers):
                ids = np.repeat(np.arange(num_experts), load[n, layer, s])  # [T * K], sorted
                block[:, layer] = ids.reshape(top_k, num_tok).T
            chunks.append(block)
            src.append(np.full(num_tok, s, np.int16))
            step_tokens += num_tok
        offsets.append(offsets[-1] + step_tokens)
    experts = (np.concatenate(chunks) if chunks
               else np.zeros((0, num_layers, top_k), np.int16))
    return RoutingTrace.from_arrays(
        num_experts=num_experts, num_ranks=num_ranks, step_offsets=np.array(offsets),
        src_rank=np.concatenate(src) if src else np.zeros(0, np.int16), experts=experts,
        phase=np.full(num_steps, DECODE, np.uint8),
        meta={"source": "counts", **(meta or {})})


def _top_k_of(path: Path, top_k: int | None) -> int:
    if top_k is None:
        raise ValueError(f"{path}: this file holds counts only; pass top_k (experts per "
                         "token) to turn them into a trace")
    return top_k


# ----------------------------------------------------------------------------- SGLang
def read_sglang_dump(path: str | os.PathLike, *, top_k: int | None = None,
                     num_experts: int | None = None, num_ranks: int | None = None,
                     ) -> RoutingTrace:
    """A trace from one SGLang expert-distribution recorder dump (a torch.save dict).

    The mode is recognised from the keys (docs/traces.md has the exact layouts):
      * stat: {"logical_count": int [N, L, E] or [L, E], "rank"?: int}. Counts only, no
        source ranks: each step's tokens sit on one source rank (S = 1), or round robin
        over num_ranks ranks (`trace_from_counts`); all-zero steps (an unfilled buffer)
        are dropped. top_k is required.
      * per_pass: {"records": [{"forward_pass_id": int, "rank": int,
        "global_physical_count" (or "physical_count"): int [L, R]}, ...],
        "last_physical_to_logical_map"?: int [L, R]}: one step per forward_pass_id, one
        source rank per record rank; top_k is required.
      * per_token: {"records": [{"forward_pass_id", "rank", "topk_ids_of_layer": int
        [L, T, K] physical slot ids, -1 for padding}, ...], "last_physical_to_logical_map"?}:
        the real per-token routing; a token with any id < 0 is dropped.
    Physical slots are mapped to logical experts with last_physical_to_logical_map (absent:
    slot r is expert r). num_experts: E (default: from the map or the counts).
    """
    path = Path(path)
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict (an SGLang recorder dump), got "
                         f"{type(data).__name__}")
    meta = {"converted_from": str(path), "format": "sglang-dump"}
    if "logical_count" in data:
        counts = _check_counts(path, "logical_count",
                               _array(path, "logical_count", data["logical_count"], (2, 3)))
        if counts.ndim == 2:
            counts = counts[None]
        if num_experts is not None and counts.shape[2] != num_experts:
            raise ValueError(f"{path}: logical_count has {counts.shape[2]} experts, expected "
                             f"{num_experts}")
        counts = counts[counts.sum(axis=(1, 2)) > 0]
        if not len(counts):
            raise ValueError(f"{path}: logical_count holds no non-zero step")
        return trace_from_counts(counts, num_ranks=1 if num_ranks is None else num_ranks,
                                 top_k=_top_k_of(path, top_k), meta={**meta, "mode": "stat"})
    records = data.get("records")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected 'logical_count' (stat mode) or a non-empty "
                         "'records' list (per_pass / per_token mode)")
    phy2log = data.get("last_physical_to_logical_map")
    if phy2log is not None:
        phy2log = _array(path, "last_physical_to_logical_map", phy2log, 2).astype(np.int64)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "forward_pass_id" not in rec or "rank" not in rec:
            raise ValueError(f"{path}: records[{i}] needs 'forward_pass_id' and 'rank'")
    passes = sorted({int(rec["forward_pass_id"]) for rec in records})
    step_of = {p: n for n, p in enumerate(passes)}
    rank_ids = [int(rec["rank"]) for rec in records]
    if min(rank_ids) < 0:
        raise ValueError(f"{path}: a record has a negative rank")
    ranks = max(max(rank_ids) + 1, num_ranks or 0)
    if "topk_ids_of_layer" in records[0]:
        return _sglang_per_token(path, records, step_of, ranks, phy2log, num_experts, meta)
    key = next((k for k in ("global_physical_count", "physical_count") if k in records[0]),
               None)
    if key is None:
        raise ValueError(f"{path}: records[0] has none of 'topk_ids_of_layer', "
                         "'global_physical_count', 'physical_count'")
    physical = [_array(path, f"records[{i}].{key}", rec.get(key), 2)
                for i, rec in enumerate(records)]
    shape = physical[0].shape
    for i, arr in enumerate(physical):
        if arr.shape != shape:
            raise ValueError(f"{path}: records[{i}].{key} has shape {list(arr.shape)}, "
                             f"records[0] has {list(shape)}")
    counts, num_experts = _logical(path, _check_counts(path, key, np.stack(physical)),
                                   phy2log, num_experts)  # [records, L, E]
    load = np.zeros((len(passes), shape[0], ranks, num_experts), np.int64)
    for rec, c in zip(records, counts, strict=True):
        load[step_of[int(rec["forward_pass_id"])], :, int(rec["rank"])] += c
    return trace_from_rank_counts(load, top_k=_top_k_of(path, top_k),
                                  meta={**meta, "mode": "per_pass"})


def _sglang_per_token(path, records, step_of, ranks, phy2log, num_experts, meta):
    ids = [_array(path, f"records[{i}].topk_ids_of_layer", rec.get("topk_ids_of_layer"), 3)
           for i, rec in enumerate(records)]
    num_layers, top_k = ids[0].shape[0], ids[0].shape[2]
    for i, arr in enumerate(ids):
        if (arr.shape[0], arr.shape[2]) != (num_layers, top_k):
            raise ValueError(f"{path}: records[{i}].topk_ids_of_layer is [L, T, K] = "
                             f"{list(arr.shape)}, records[0] has L = {num_layers}, "
                             f"K = {top_k}")
    if phy2log is not None:
        if phy2log.shape[0] != num_layers:
            raise ValueError(f"{path}: last_physical_to_logical_map has {phy2log.shape[0]} "
                             f"layers, the records {num_layers}")
        top = max(int(a.max()) for a in ids if a.size) if any(a.size for a in ids) else -1
        if top >= phy2log.shape[1]:
            raise ValueError(f"{path}: topk_ids_of_layer names physical slot {top}, the map "
                             f"has {phy2log.shape[1]}")
    order = sorted(range(len(records)),
                   key=lambda i: (step_of[int(records[i]["forward_pass_id"])],
                                  int(records[i]["rank"])))
    experts, src, sizes = [], [], np.zeros(len(step_of), np.int64)
    for i in order:
        tokens = np.transpose(ids[i], (1, 0, 2)).astype(np.int64)  # [T, L, K]
        tokens = tokens[np.all(tokens >= 0, axis=(1, 2))]
        if phy2log is not None:
            tokens = phy2log[np.arange(num_layers)[None, :, None], tokens]
        experts.append(tokens)
        src.append(np.full(len(tokens), int(records[i]["rank"])))
        sizes[step_of[int(records[i]["forward_pass_id"])]] += len(tokens)
    experts_arr = np.concatenate(experts)
    if num_experts is None:
        num_experts = int(phy2log.max()) + 1 if phy2log is not None else \
            int(experts_arr.max(initial=-1)) + 1
    return RoutingTrace.from_arrays(
        num_experts=max(num_experts, 1), num_ranks=ranks,
        step_offsets=np.concatenate([[0], np.cumsum(sizes)]), src_rank=np.concatenate(src),
        experts=experts_arr, phase=np.full(len(sizes), DECODE, np.uint8),
        meta={**meta, "mode": "per_token"})


# ----------------------------------------------------------------------------- vLLM
def read_routed_experts(path: str | os.PathLike) -> list[np.ndarray]:
    """Per-request routed experts, int arrays [T_i, L, K], from .npy (one array), .npz or
    .safetensors (one array per entry, names in natural order) or .pt (a tensor [T, L, K], a
    list of them, or a dict of them, names in natural order)."""
    path = Path(path)
    suffix = path.suffix
    if suffix == ".npy":
        return read_routed_experts_npy(path)
    if suffix == ".npz":
        return read_routed_experts_npz(path)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read as safetensors ({exc})") from None
        names = sorted(data, key=_natural_key)
        arrays = [data[name] for name in names]
    elif suffix in (".pt", ".pth"):
        data = _torch_load(path)
        if isinstance(data, dict):
            names = sorted(data, key=lambda k: _natural_key(str(k)))
            arrays = [data[name] for name in names]
        else:
            arrays = list(data) if isinstance(data, (list, tuple)) else [data]
            names = [f"[{i}]" for i in range(len(arrays))]
    else:
        raise ValueError(f"{path}: routed experts must be .npy, .npz, .safetensors or .pt, "
                         f"got {suffix!r}")
    if not arrays:
        raise ValueError(f"{path}: holds no arrays")
    return [_array(path, f"entry {name}", arr, 3) for name, arr in zip(names, arrays,
                                                                      strict=True)]


def read_vllm_eplb(path: str | os.PathLike, *, top_k: int | None = None,
                   num_ranks: int = 1, num_experts: int | None = None) -> RoutingTrace:
    """A trace from vLLM EPLB expert load, counts only (top_k required).

    .json: the load history {"load_history": [{"logical_expert_load": [L][E]}, ...]}
    (`read_vllm_eplb_load_history`). .pt: a dict {"expert_load_window": int [W, L, R]
    physical-slot loads, "physical_to_logical_map"?: int [L, R]} or a bare tensor [W, L, E]
    of logical loads; .npy: logical loads [W, L, E]. Each window entry is one step; its
    synthesised tokens go round robin over num_ranks source ranks (EPLB loads carry no
    source; `trace_from_counts`).
    All-zero entries (an unfilled window) are dropped.
    """
    path = Path(path)
    if path.suffix == ".json":
        counts = read_vllm_eplb_load_history(path)
    elif path.suffix in (".pt", ".pth", ".npy"):
        if path.suffix == ".npy":
            try:
                data = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise ValueError(f"{path}: cannot read as .npy ({exc})") from None
        else:
            data = _torch_load(path)
        phy2log = None
        if isinstance(data, dict):
            if "expert_load_window" not in data:
                raise ValueError(f"{path}: expected 'expert_load_window' [W, L, R], found "
                                 f"keys {sorted(map(str, data))}")
            if data.get("physical_to_logical_map") is not None:
                phy2log = _array(path, "physical_to_logical_map",
                                 data["physical_to_logical_map"], 2).astype(np.int64)
            data = data["expert_load_window"]
        window = _check_counts(path, "expert_load_window",
                               _array(path, "expert_load_window", data, 3))
        counts, _ = _logical(path, window, phy2log, num_experts)
    else:
        raise ValueError(f"{path}: a vLLM EPLB load must be .json, .pt or .npy, got "
                         f"{path.suffix!r}")
    if num_experts is not None and counts.shape[2] != num_experts:
        raise ValueError(f"{path}: holds {counts.shape[2]} experts, expected {num_experts}")
    counts = counts[counts.sum(axis=(1, 2)) > 0]
    if not len(counts):
        raise ValueError(f"{path}: holds no non-zero load")
    return trace_from_counts(counts, num_ranks=num_ranks, top_k=_top_k_of(path, top_k),
                             meta={"converted_from": str(path), "format": "vllm-eplb"})


def read_vllm_routed_experts(path: str | os.PathLike, *, num_experts: int | None = None,
                             num_ranks: int = 1, tokens_per_step: int | None = None,
                             ) -> RoutingTrace:
    """`read_routed_experts` then `from_routed_experts` (E default: largest id + 1)."""
    path = Path(path)
    arrays = read_routed_experts(path)
    if num_experts is None:
        num_experts = max((int(a.max()) for a in arrays if a.size), default=0) + 1
    return from_routed_experts(arrays, num_experts=num_experts, num_ranks=num_ranks,
                               tokens_per_step=tokens_per_step,
                               meta={"converted_from": str(path), "format": "routed-experts"})


# ----------------------------------------------------------------------------- Megatron
def read_megatron_routing(path: str | os.PathLike, *, num_experts: int | None = None,
                          num_ranks: int = 1, tokens_per_step: int | None = None,
                          ) -> RoutingTrace:
    """A trace from a Megatron-Core routing record (torch.save, .pt).

    Accepted: a dict {layer number: per-layer routing}, a list of per-layer routing in layer
    order, or one tensor [L, T, K] of top-k ids. Per-layer routing is top-k expert ids int
    [T, K] or a routing map bool [T, E] (the router's routing_map: True where the token goes;
    every token must choose the same number K of experts, which then come in increasing id).
    Dict keys are ordered by their number ("decoder.layers.3.mlp.router" sorts after
    "...layers.2..."). All layers must hold the same T tokens in the same order. Tokens of
    one record form one step, or steps of tokens_per_step (chunks) spread round robin over
    num_ranks ranks.
    """
    path = Path(path)
    data = _torch_load(path)
    if isinstance(data, dict):
        names = sorted(data, key=lambda k: _natural_key(str(k)))
        layers = [(str(n), data[n]) for n in names]
    elif isinstance(data, (list, tuple)):
        layers = [(f"[{i}]", v) for i, v in enumerate(data)]
    else:
        stacked = _array(path, "the routing tensor", data, 3)
        layers = [(f"[{i}]", stacked[i]) for i in range(stacked.shape[0])]
    if not layers:
        raise ValueError(f"{path}: holds no MoE layer")
    ids = []
    for name, value in layers:
        arr = _array(path, f"layer {name}", value, 2, kind="iub")
        if arr.dtype.kind == "b":
            per_token = arr.sum(axis=1)
            if arr.shape[0] and np.any(per_token != per_token[0]):
                raise ValueError(f"{path}: layer {name}: the routing map gives tokens different "
                                 f"numbers of experts ({int(per_token.min())}.."
                                 f"{int(per_token.max())})")
            if num_experts is not None and arr.shape[1] != num_experts:
                raise ValueError(f"{path}: layer {name}: routing map has {arr.shape[1]} "
                                 f"experts, expected {num_experts}")
            num_experts = arr.shape[1] if num_experts is None else num_experts
            k = int(per_token[0]) if arr.shape[0] else 0
            arr = np.nonzero(arr)[1].reshape(arr.shape[0], k)
        ids.append(arr.astype(np.int64))
    shape = ids[0].shape
    for (name, _), arr in zip(layers, ids, strict=True):
        if arr.shape != shape:
            raise ValueError(f"{path}: layer {name} has [T, K] = {list(arr.shape)}, the first "
                             f"layer {list(shape)}")
    tokens = np.stack(ids, axis=1)  # [T, L, K]
    if num_experts is None:
        num_experts = int(tokens.max(initial=-1)) + 1
    if tokens.size and tokens.min() < 0:
        raise ValueError(f"{path}: holds negative expert ids")
    num_tok = len(tokens)
    size = num_tok if tokens_per_step is None else tokens_per_step
    if size < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    num_steps = max(-(-num_tok // size), 1)
    offsets = np.minimum(np.arange(num_steps + 1) * size, num_tok)
    return RoutingTrace.from_arrays(
        num_experts=max(num_experts, 1), num_ranks=num_ranks, step_offsets=offsets,
        src_rank=np.arange(num_tok) % num_ranks, experts=tokens,
        meta={"converted_from": str(path), "format": "megatron"})


# ----------------------------------------------------------------------------- TensorRT-LLM
def read_trtllm_expert_stats(directory: str | os.PathLike, *, top_k: int | None = None,
                             ) -> RoutingTrace:
    """A trace from TensorRT-LLM expert statistics (counts only).

    directory holds meta_info.json {"num_experts": E, "num_experts_per_token": K} and one
    rank<r>.safetensors per rank r, whose tensors are named "<iteration>_<layer>" and hold
    int [E] token counts of that rank's tokens at that iteration and MoE layer. Every rank
    file must hold the same names. Steps are the iterations in increasing order, layers the
    layer numbers in increasing order; top_k overrides num_experts_per_token.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: TensorRT-LLM expert statistics are a directory")
    meta_path = directory / "meta_info.json"
    try:
        info = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: cannot read ({exc})") from None
    if not isinstance(info, dict) or "num_experts" not in info:
        raise ValueError(f"{meta_path}: expected an object with 'num_experts'")
    num_experts = int(info["num_experts"])
    if top_k is None:
        if "num_experts_per_token" not in info:
            raise ValueError(f"{meta_path}: no 'num_experts_per_token'; pass top_k")
        top_k = int(info["num_experts_per_token"])
    files = {}
    for f in directory.glob("rank*.safetensors"):
        match = re.fullmatch(r"rank(\d+)\.safetensors", f.name)
        if match:
            files[int(match.group(1))] = f
    if not files:
        raise ValueError(f"{directory}: no rank<r>.safetensors file")
    num_ranks = max(files) + 1
    if sorted(files) != list(range(num_ranks)):
        raise ValueError(f"{directory}: rank files {sorted(files)} do not cover ranks "
                         f"0..{num_ranks - 1}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    tables, keys = [], None
    for r in range(num_ranks):
        try:
            data = load_file(str(files[r]))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{files[r]}: cannot read as safetensors ({exc})") from None
        parsed = {}
        for name, arr in data.items():
            match = re.fullmatch(r"(\d+)_(\d+)", name)
            if not match:
                raise ValueError(f"{files[r]}: tensor {name!r} is not named "
                                 "'<iteration>_<layer>'")
            if arr.shape != (num_experts,) or arr.dtype.kind not in "iu" or \
                    (arr.size and arr.min() < 0):
                raise ValueError(f"{files[r]}: tensor {name!r} must hold {num_experts} "
                                 f"non-negative integer counts, got shape {list(arr.shape)} "
                                 f"and dtype {arr.dtype}")
            parsed[int(match.group(1)), int(match.group(2))] = arr.astype(np.int64)
        if keys is None:
            keys = set(parsed)
        elif set(parsed) != keys:
            raise ValueError(f"{files[r]}: holds other (iteration, layer) entries than "
                             f"{files[0].name}")
        tables.append(parsed)
    if not keys:
        raise ValueError(f"{directory}: the rank files hold no counts")
    iterations = sorted({it for it, _ in keys})
    layer_ids = sorted({layer for _, layer in keys})
    load = np.zeros((len(iterations), len(layer_ids), num_ranks, num_experts), np.int64)
    for n, it in enumerate(iterations):
        for j, layer in enumerate(layer_ids):
            for r in range(num_ranks):
                if (it, layer) not in tables[r]:
                    raise ValueError(f"{directory}: iteration {it} has no layer {layer}")
                load[n, j, r] = tables[r][it, layer]
    trace = trace_from_rank_counts(load, top_k=top_k,
                                   meta={"converted_from": str(directory),
                                         "format": "trtllm-stats", "iterations": iterations,
                                         "layers": layer_ids})
    return trace


# ----------------------------------------------------------------------------- dispatch
def read_engine_trace(path: str | os.PathLike, fmt: str = "probe", **options) -> RoutingTrace:
    """Read `path` as format `fmt` (one of ENGINE_FORMATS); options go to the reader:
    top_k, num_experts, num_ranks, tokens_per_step where the reader takes them."""
    if fmt not in ENGINE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(ENGINE_FORMATS)}, got {fmt!r}")
    if fmt == "probe":
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(f"format 'probe' takes no {', '.join(given)} (a probe trace "
                             "carries them)")
        return RoutingTrace.load(path)
    readers = {"sglang-dump": read_sglang_dump, "routed-experts": read_vllm_routed_experts,
               "vllm-eplb": read_vllm_eplb, "megatron": read_megatron_routing,
               "trtllm-stats": read_trtllm_expert_stats}
    reader = readers[fmt]
    import inspect

    accepted = set(inspect.signature(reader).parameters)
    unused = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unused:
        raise ValueError(f"format {fmt!r} takes no {', '.join(unused)}")
    return reader(path, **{k: v for k, v in options.items() if v is not None})
