"""RoutingTrace: which experts every token visited, step by step and MoE layer by layer.

Shape legend (see probe/specs.py): N steps, T tokens (T_total over all steps), L MoE layers,
K experts per token, E experts per layer, S source ranks (G, the ranks tokens were split over).

A step is one forward pass of a batch. Its tokens are rows `step_offsets[i]:step_offsets[i+1]`
of the per-token arrays, and the same tokens pass every MoE layer of the step, so the per-token
arrays carry a layer axis: `experts[t, l, k]` is the k-th expert chosen for token t at layer l.

File format (docs/traces.md): one safetensors file, flat arrays named like the fields, header
metadata `format="probe-routing-trace"`, `version="1"`, `num_experts`, `num_ranks`, `top_k`,
`step_tags` (JSON list of str) and `meta` (JSON object).

>>> import numpy as np
>>> tr = RoutingTrace(num_experts=4, num_ranks=2, top_k=1,
...                   step_offsets=np.array([0, 2, 3]), src_rank=np.array([0, 1, 1], np.int16),
...                   experts=np.array([[[0]], [[3]], [[3]]], np.int16), gates=None,
...                   phase=np.array([PREFILL, DECODE], np.uint8), step_tags=["a", "b"], meta={})
>>> (tr.num_steps, tr.num_layers, tr.num_tokens, tr.tokens_in_step(0))
(2, 1, 3, 2)
>>> tr.load_counts()[0, 0]   # step 0, layer 0: [S, E]
array([[1, 0, 0, 0],
       [0, 0, 0, 1]], dtype=int32)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DECODE", "FORMAT_NAME", "FORMAT_VERSION", "PREFILL", "RoutingTrace"]

PREFILL = 0
DECODE = 1
FORMAT_NAME = "probe-routing-trace"
FORMAT_VERSION = "1"

# Arrays stored in a trace file and their exact dtypes. `gates` is optional.
_ARRAY_DTYPES: dict[str, np.dtype] = {
    "step_offsets": np.dtype(np.int64),
    "src_rank": np.dtype(np.int16),
    "experts": np.dtype(np.int16),
    "gates": np.dtype(np.float32),
    "phase": np.dtype(np.uint8),
}
_REQUIRED_ARRAYS = ("step_offsets", "src_rank", "experts", "phase")
_HEADER_KEYS = ("format", "version", "num_experts", "num_ranks", "top_k", "step_tags", "meta")
# int16 holds expert ids and ranks; larger configurations need a new format version.
_MAX_ID = int(np.iinfo(np.int16).max) + 1
# Tokens x layers x K entries per bincount chunk in load_counts (bounds temporary memory).
_CHUNK_ENTRIES = 1 << 23


@dataclass(eq=False)
class RoutingTrace:
    """Per-token routing of a sequence of steps (see the module docstring for the legend).

    Attributes:
        num_experts: E, experts per MoE layer; ids lie in [0, E).
        num_ranks: S (= G), source ranks the tokens were split over; ranks lie in [0, S).
        top_k: K, experts per token per layer.
        step_offsets: int64 [N+1], token range of step i is step_offsets[i]:step_offsets[i+1];
            starts at 0, non-decreasing, ends at T_total.
        src_rank: int16 [T_total], the rank each token lives on (attention data parallel).
        experts: int16 [T_total, L, K], expert ids per token per MoE layer.
        gates: float32 [T_total, L, K] router weights of the chosen experts, or None.
        phase: uint8 [N], PREFILL (0) or DECODE (1) per step.
        step_tags: N strings, e.g. the dataset or domain of the step ("" if none).
        meta: JSON-serialisable dict (model name, generator and its parameters, ...).

    Arrays must already have the dtypes above (TypeError otherwise); `from_arrays` converts.
    """

    num_experts: int
    num_ranks: int
    top_k: int
    step_offsets: np.ndarray
    src_rank: np.ndarray
    experts: np.ndarray
    gates: np.ndarray | None
    phase: np.ndarray
    step_tags: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_arrays(
        cls,
        *,
        num_experts: int,
        num_ranks: int,
        step_offsets: Any,
        src_rank: Any,
        experts: Any,
        gates: Any = None,
        phase: Any = None,
        step_tags: Sequence[str] | None = None,
        meta: dict | None = None,
    ) -> RoutingTrace:
        """Build a trace from array-likes of any integer/float dtype, converting them.

        `phase` defaults to all DECODE, `step_tags` to "" per step; top_k is read from
        experts.shape[2]. Values are range-checked before the narrowing casts.
        """
        step_offsets = np.asarray(step_offsets)
        experts = np.asarray(experts)
        src_rank = np.asarray(src_rank)
        if experts.ndim != 3:
            raise ValueError(f"experts must be [T, L, K], got shape {experts.shape}")
        for name, arr in (("step_offsets", step_offsets), ("src_rank", src_rank),
                          ("experts", experts)):
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        _check_range("experts", experts, num_experts)
        _check_range("src_rank", src_rank, num_ranks)
        num_steps = max(len(step_offsets) - 1, 0)
        if phase is None:
            phase = np.full(num_steps, DECODE, dtype=np.uint8)
        phase = np.asarray(phase)
        if phase.size and (phase.min() < 0 or phase.max() > DECODE):
            raise ValueError("phase values must be PREFILL (0) or DECODE (1)")
        return cls(
            num_experts=int(num_experts),
            num_ranks=int(num_ranks),
            top_k=int(experts.shape[2]),
            step_offsets=step_offsets.astype(np.int64),
            src_rank=src_rank.astype(np.int16),
            experts=experts.astype(np.int16),
            gates=None if gates is None else np.asarray(gates, dtype=np.float32),
            phase=phase.astype(np.uint8),
            step_tags=[""] * num_steps if step_tags is None else list(step_tags),
            meta={} if meta is None else dict(meta),
        )

    # ----------------------------------------------------------------------------- sizes
    @property
    def num_steps(self) -> int:
        """N, steps in the trace."""
        return len(self.step_offsets) - 1

    @property
    def num_layers(self) -> int:
        """L, MoE layers per step."""
        return int(self.experts.shape[1])

    @property
    def num_tokens(self) -> int:
        """T_total, tokens over all steps."""
        return int(self.experts.shape[0])

    @property
    def tokens_per_step(self) -> np.ndarray:
        """int64 [N], tokens of each step."""
        return np.diff(self.step_offsets)

    def tokens_in_step(self, i: int) -> int:
        """Tokens of step i."""
        i = self._step_index(i)
        return int(self.step_offsets[i + 1] - self.step_offsets[i])

    def step(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Views of step i: src_rank int16 [T_i], experts int16 [T_i, L, K], gates or None."""
        i = self._step_index(i)
        lo, hi = int(self.step_offsets[i]), int(self.step_offsets[i + 1])
        gates = None if self.gates is None else self.gates[lo:hi]
        return self.src_rank[lo:hi], self.experts[lo:hi], gates

    def _step_index(self, i: int) -> int:
        n = self.num_steps
        if not -n <= int(i) < n:
            raise IndexError(f"step {i} out of range for a trace of {n} steps")
        return int(i) % n

    def _steps_array(self, steps: Iterable[int] | slice | None) -> np.ndarray:
        if steps is None:
            return np.arange(self.num_steps)
        if isinstance(steps, slice):
            return np.arange(self.num_steps)[steps]
        idx = np.asarray(list(steps) if not isinstance(steps, np.ndarray) else steps)
        if idx.size == 0:
            return idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise TypeError("steps must be a 1-D sequence of step indices, a slice or None")
        if idx.min() < -self.num_steps or idx.max() >= self.num_steps:
            raise IndexError(f"steps out of range for a trace of {self.num_steps} steps")
        return idx.astype(np.int64) % max(self.num_steps, 1)

    # ----------------------------------------------------------------------------- aggregates
    def load_counts(self, steps: Iterable[int] | slice | None = None) -> np.ndarray:
        """Tokens per (step, layer, source rank, expert): int32 [N', L, S, E].

        steps: indices (or a slice) of the steps to count, in the order wanted; None = all.
        A token choosing expert e at layer l counts once for (its step, l, its rank, e).
        """
        return self._count(self._steps_array(steps), by_rank=True)

    def expert_counts(self, steps: Iterable[int] | slice | None = None) -> np.ndarray:
        """Tokens per (step, layer, expert), summed over source ranks: int32 [N', L, E]."""
        return self._count(self._steps_array(steps), by_rank=False)

    def _count(self, steps: np.ndarray, by_rank: bool) -> np.ndarray:
        num_layers, num_experts = self.num_layers, self.num_experts
        num_src = self.num_ranks if by_rank else 1
        cell = num_src * num_experts  # bins per (step, layer)
        out = np.zeros((len(steps), num_layers, num_src, num_experts), dtype=np.int32)
        layer_base = (np.arange(num_layers, dtype=np.int64) * cell)[None, :, None]  # [1, L, 1]
        per_token = max(num_layers * self.top_k, 1)
        start = 0
        while start < len(steps):
            # A chunk of steps whose tokens hold about _CHUNK_ENTRIES routing entries.
            stop, budget = start, 0
            while stop < len(steps) and (stop == start or budget < _CHUNK_ENTRIES):
                budget += self.tokens_in_step(int(steps[stop])) * per_token
                stop += 1
            chunk = steps[start:stop]
            lo, hi = self.step_offsets[chunk], self.step_offsets[chunk + 1]
            lengths = hi - lo
            if np.all(np.diff(chunk) == 1):  # consecutive steps: slices, no gather
                tok = slice(int(lo[0]), int(hi[-1]))
                num_tok = tok.stop - tok.start
            else:
                tok = _ranges(lo, hi)  # [T_c] token rows
                num_tok = tok.size
            if num_tok:
                local_step = np.repeat(np.arange(len(chunk), dtype=np.int64), lengths)  # [T_c]
                base = local_step * (num_layers * cell)
                if by_rank:
                    base = base + self.src_rank[tok].astype(np.int64) * num_experts
                idx = base[:, None, None] + layer_base + self.experts[tok]  # [T_c, L, K]
                counts = np.bincount(idx.ravel(), minlength=len(chunk) * num_layers * cell)
                out[start:stop] = counts.reshape(len(chunk), num_layers, num_src, num_experts)
            start = stop
        return out if by_rank else out[:, :, 0, :]

    # ----------------------------------------------------------------------------- sub-traces
    def select(self, steps: Iterable[int] | slice) -> RoutingTrace:
        """A new trace holding the given steps (indices or a slice), in that order."""
        idx = self._steps_array(steps)
        lo, hi = self.step_offsets[idx], self.step_offsets[idx + 1]
        tok = _ranges(lo, hi)
        offsets = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
        return RoutingTrace(
            num_experts=self.num_experts,
            num_ranks=self.num_ranks,
            top_k=self.top_k,
            step_offsets=offsets,
            src_rank=self.src_rank[tok],
            experts=self.experts[tok],
            gates=None if self.gates is None else self.gates[tok],
            phase=self.phase[idx],
            step_tags=[self.step_tags[int(i)] for i in idx],
            meta=dict(self.meta),
        )

    @staticmethod
    def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """Steps of several traces one after another; meta is the first trace's.

        All traces must share E, S, K and L, and either all or none carry gates.
        """
        traces = list(traces)
        if not traces:
            raise ValueError("traces must hold at least one RoutingTrace")
        first = traces[0]
        for j, tr in enumerate(traces):
            if not isinstance(tr, RoutingTrace):
                raise TypeError(f"traces[{j}] is {type(tr).__name__}, not RoutingTrace")
            for attr in ("num_experts", "num_ranks", "top_k", "num_layers"):
                if getattr(tr, attr) != getattr(first, attr):
                    raise ValueError(f"traces[{j}].{attr} = {getattr(tr, attr)} differs from "
                                     f"traces[0].{attr} = {getattr(first, attr)}")
            if (tr.gates is None) != (first.gates is None):
                raise ValueError(f"traces[{j}] and traces[0] disagree on having gates")
        sizes = np.concatenate([[0]] + [np.diff(tr.step_offsets) for tr in traces])
        return RoutingTrace(
            num_experts=first.num_experts,
            num_ranks=first.num_ranks,
            top_k=first.top_k,
            step_offsets=np.cumsum(sizes).astype(np.int64),
            src_rank=np.concatenate([tr.src_rank for tr in traces]),
            experts=np.concatenate([tr.experts for tr in traces]),
            gates=None if first.gates is None else np.concatenate([tr.gates for tr in traces]),
            phase=np.concatenate([tr.phase for tr in traces]),
            step_tags=[tag for tr in traces for tag in tr.step_tags],
            meta=dict(first.meta),
        )

    # ----------------------------------------------------------------------------- equality
    def equals(self, other: object) -> bool:
        """True when both traces hold the same sizes, arrays, tags and meta."""
        if not isinstance(other, RoutingTrace):
            return False
        if (self.num_experts, self.num_ranks, self.top_k) != (
                other.num_experts, other.num_ranks, other.top_k):
            return False
        if (self.gates is None) != (other.gates is None):
            return False
        arrays = ["step_offsets", "src_rank", "experts", "phase"]
        if self.gates is not None:
            arrays.append("gates")
        return (all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays)
                and list(self.step_tags) == list(other.step_tags)
                and _canonical_json(self.meta) == _canonical_json(other.meta))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return self.equals(other)

    def __repr__(self) -> str:
        return (f"RoutingTrace(steps={self.num_steps}, tokens={self.num_tokens}, "
                f"layers={self.num_layers}, experts={self.num_experts}, top_k={self.top_k}, "
                f"ranks={self.num_ranks}, gates={self.gates is not None})")

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write the trace to one safetensors file (format in docs/traces.md)."""
        from safetensors.numpy import save_file

        tensors = {name: np.ascontiguousarray(getattr(self, name)) for name in _REQUIRED_ARRAYS}
        if self.gates is not None:
            tensors["gates"] = np.ascontiguousarray(self.gates)
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_experts": str(self.num_experts),
            "num_ranks": str(self.num_ranks),
            "top_k": str(self.top_k),
            "step_tags": json.dumps(list(self.step_tags)),
            "meta": _canonical_json(self.meta),
        }
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike, steps: slice | None = None) -> RoutingTrace:
        """Read and validate a trace file; ValueError naming the file and the problem.

        steps: optional contiguous range of steps, e.g. slice(100, 200): only those steps'
            token rows are read from disk (the file is memory-mapped), so long traces can be
            streamed window by window. Ids are range-checked on the rows read.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such trace file")
        if steps is not None and not isinstance(steps, slice):
            raise TypeError(f"steps must be a slice or None, got {type(steps).__name__}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                keys = set(f.keys())
                if header.get("format") != FORMAT_NAME:
                    raise _FileProblem(f"not a probe routing trace (header 'format' is "
                                       f"{header.get('format')!r}, expected {FORMAT_NAME!r})")
                if header.get("version") != FORMAT_VERSION:
                    raise _FileProblem(f"unsupported trace format version "
                                       f"{header.get('version')!r} (this reader knows "
                                       f"version {FORMAT_VERSION!r})")
                missing_hdr = [k for k in _HEADER_KEYS if k not in header]
                if missing_hdr:
                    raise _FileProblem(f"header metadata is missing {missing_hdr}")
                missing = [k for k in _REQUIRED_ARRAYS if k not in keys]
                if missing:
                    raise _FileProblem(f"missing field(s) {missing}")
                extra = sorted(keys - set(_ARRAY_DTYPES))
                if extra:
                    raise _FileProblem(f"unexpected field(s) {extra}")
                if steps is None:
                    arrays = {k: f.get_tensor(k) for k in keys}
                    step_range = None
                else:
                    arrays, step_range = _read_steps(f, keys, steps)
        except _FileProblem as exc:
            raise ValueError(f"{path}: {exc}") from None
        except Exception as exc:  # safetensors raises its own error types for broken files
            raise ValueError(f"{path}: corrupt or truncated safetensors file "
                             f"({type(exc).__name__}: {exc})") from exc
        try:
            for name, arr in arrays.items():
                if arr.dtype != _ARRAY_DTYPES[name]:
                    raise _FileProblem(f"field '{name}' has dtype {arr.dtype}, "
                                       f"expected {_ARRAY_DTYPES[name]}")
            ints = {k: _header_int(header, k) for k in ("num_experts", "num_ranks", "top_k")}
            step_tags = _header_json(header, "step_tags", list)
            if step_range is not None:
                start, stop, num_steps = step_range
                if len(step_tags) != num_steps:
                    raise _FileProblem(f"field 'step_tags' must be a list of {num_steps} "
                                       f"strings (one per step), got {len(step_tags)}")
                step_tags = step_tags[start:stop]
                arrays["phase"] = arrays["phase"][start:stop]
            meta = _header_json(header, "meta", dict)
            return cls(step_offsets=arrays["step_offsets"], src_rank=arrays["src_rank"],
                       experts=arrays["experts"], gates=arrays.get("gates"),
                       phase=arrays["phase"], step_tags=step_tags, meta=meta, **ints)
        except (_FileProblem, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def _read_steps(f: Any, keys: set, steps: slice) -> tuple[dict, tuple[int, int, int]]:
    """Read the token rows of a contiguous step range from an open safetensors file."""
    offsets = f.get_tensor("step_offsets")
    if offsets.dtype != _ARRAY_DTYPES["step_offsets"] or offsets.ndim != 1 or len(offsets) < 1:
        raise _FileProblem(f"field 'step_offsets' must be int64 [N+1], got {offsets.dtype} "
                           f"{offsets.shape}")
    num_tokens = f.get_slice("experts").get_shape()[0]
    if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
        raise _FileProblem("field 'step_offsets' must start at 0, be non-decreasing and end at "
                           f"the token count {num_tokens}")
    start, stop, stride = steps.indices(len(offsets) - 1)
    if stride != 1:
        raise _FileProblem(f"steps must be a contiguous slice (step 1), got {steps}")
    stop = max(stop, start)
    lo, hi = int(offsets[start]), int(offsets[stop])
    arrays = {"step_offsets": offsets[start:stop + 1] - lo, "phase": f.get_tensor("phase")}
    for name in ("src_rank", "experts", "gates"):
        if name in keys:
            arrays[name] = f.get_slice(name)[lo:hi]
    if len(arrays["phase"]) != len(offsets) - 1:
        raise _FileProblem(f"field 'phase' has shape {arrays['phase'].shape}, expected "
                           f"({len(offsets) - 1},) (one per step, matching 'step_offsets')")
    return arrays, (start, stop, len(offsets) - 1)


class _FileProblem(Exception):
    """A problem found in a trace file (re-raised as ValueError naming the file)."""


def _header_int(header: dict, key: str) -> int:
    try:
        return int(header[key])
    except ValueError:
        raise _FileProblem(f"header '{key}' is {header[key]!r}, not an integer") from None


def _header_json(header: dict, key: str, kind: type) -> Any:
    try:
        value = json.loads(header[key])
    except json.JSONDecodeError as exc:
        raise _FileProblem(f"header '{key}' is not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise _FileProblem(f"header '{key}' must be a JSON {kind.__name__}")
    return value


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], hi[i]) over i, vectorised: int64 [sum(hi - lo)]."""
    lengths = (hi - lo).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo.astype(np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                       lengths)
    return starts + np.arange(total, dtype=np.int64)


def _check_range(name: str, arr: np.ndarray, bound: int) -> None:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= bound):
        raise ValueError(f"{name} ids must lie in [0, {bound}), found values in "
                         f"[{int(arr.min())}, {int(arr.max())}]")


def _validate(tr: RoutingTrace) -> None:
    """Check sizes, dtypes, shapes and ranges; errors name the field."""
    for name in ("num_experts", "num_ranks", "top_k"):
        value = getattr(tr, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 < int(value) <= _MAX_ID:
            raise ValueError(f"{name} must lie in [1, {_MAX_ID}], got {value}")
        setattr(tr, name, int(value))
    if tr.top_k > tr.num_experts:
        raise ValueError(f"top_k ({tr.top_k}) exceeds num_experts ({tr.num_experts})")
    for name, dtype in _ARRAY_DTYPES.items():
        arr = getattr(tr, name)
        if arr is None and name == "gates":
            continue
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"field '{name}' must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != dtype:
            raise TypeError(f"field '{name}' has dtype {arr.dtype}, expected {dtype} "
                            "(RoutingTrace.from_arrays converts)")
    offsets, experts = tr.step_offsets, tr.experts
    if offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError(f"field 'step_offsets' must be 1-D [N+1], got shape {offsets.shape}")
    if experts.ndim != 3 or experts.shape[2] != tr.top_k:
        raise ValueError(f"field 'experts' must have shape [T, L, top_k={tr.top_k}], "
                         f"got {experts.shape}")
    num_tokens, num_steps = experts.shape[0], len(offsets) - 1
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        raise ValueError(f"field 'step_offsets' must start at 0 and end at the token count "
                         f"{num_tokens}, got {int(offsets[0])} .. {int(offsets[-1])}")
    if num_steps and np.any(np.diff(offsets) < 0):
        raise ValueError("field 'step_offsets' must be non-decreasing")
    if tr.src_rank.shape != (num_tokens,):
        raise ValueError(f"field 'src_rank' has shape {tr.src_rank.shape}, expected "
                         f"({num_tokens},) (one rank per token, matching 'experts')")
    if tr.gates is not None and tr.gates.shape != experts.shape:
        raise ValueError(f"field 'gates' has shape {tr.gates.shape}, expected {experts.shape} "
                         "(matching 'experts')")
    if tr.phase.shape != (num_steps,):
        raise ValueError(f"field 'phase' has shape {tr.phase.shape}, expected ({num_steps},) "
                         "(one per step, matching 'step_offsets')")
    if num_steps and int(tr.phase.max()) > DECODE:
        raise ValueError(f"field 'phase' holds {int(tr.phase.max())}; values must be "
                         "PREFILL (0) or DECODE (1)")
    if not isinstance(tr.step_tags, list) or len(tr.step_tags) != num_steps:
        raise ValueError(f"field 'step_tags' must be a list of {num_steps} strings (one per "
                         f"step), got {type(tr.step_tags).__name__} of length "
                         f"{len(tr.step_tags) if hasattr(tr.step_tags, '__len__') else '?'}")
    if not all(isinstance(t, str) for t in tr.step_tags):
        raise TypeError("field 'step_tags' must hold strings only")
    if not isinstance(tr.meta, dict):
        raise TypeError(f"field 'meta' must be a dict, got {type(tr.meta).__name__}")
    try:
        json.dumps(tr.meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"field 'meta' must be JSON-serialisable ({exc})") from None
    if num_tokens:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= tr.num_experts:
            raise ValueError(f"field 'experts' holds ids in [{lo}, {hi}]; expert ids must lie "
                             f"in [0, num_experts={tr.num_experts})")
        lo, hi = int(tr.src_rank.min()), int(tr.src_rank.max())
        if lo < 0 or hi >= tr.num_ranks:
            raise ValueError(f"field 'src_rank' holds ranks in [{lo}, {hi}]; ranks must lie "
                             f"in [0, num_ranks={tr.num_ranks})")
        if tr.gates is not None and not np.all(np.isfinite(tr.gates)):
            raise ValueError("field 'gates' holds non-finite values")
