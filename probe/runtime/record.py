"""Record real routing from `MoETransformer` forward passes.

A `Recorder` takes the per-layer routing a forward pass returns (`return_routing=True`) and
accumulates, step by step:
- a `probe.traces.RoutingTrace`: each token's source rank, its top-k expert ids [T, L, K] and
  gate weights, the step's phase and tag;
- a sample of tokens (each kept with probability `sample_rate`) with every MoE layer's router
  input hidden state [n, L, D] and router logits [n, L, E], saved as fp16 in a safetensors side
  file for predictor training (pairs h_{l-1} -> logits_l come from consecutive layers).

>>> rec = Recorder(model.cfg, num_ranks=8, sample_rate=0.05)            # doctest: +SKIP
>>> out = record_step(model, rec, ids, src_rank=token_ranks([5, 5], [0, 3]),
...                   phase="prefill", tag="code")                     # doctest: +SKIP
>>> rec.trace().save("trace.safetensors"); rec.save_samples("samples.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from probe.runtime.config import MoEConfig
from probe.runtime.model import KVCache, LayerRouting, ModelOutput, MoETransformer

__all__ = ["Recorder", "RouterSamples", "load_samples", "record_step", "token_ranks"]

SAMPLES_FORMAT = "probe-router-samples"
SAMPLES_VERSION = "1"
_PHASES = {"prefill": 0, "decode": 1, 0: 0, 1: 1}
_FP16_MAX = float(np.finfo(np.float16).max)


def token_ranks(seq_lens: Sequence[int], seq_ranks: Sequence[int]) -> np.ndarray:
    """Source rank of every token of a flattened batch.

    Args:
        seq_lens: new tokens of each of the B sequences, in batch order.
        seq_ranks: rank of each sequence (e.g. request id % G).
    Returns:
        int16 [T], T = sum(seq_lens).

    >>> token_ranks([2, 1, 3], [0, 5, 1]).tolist()
    [0, 0, 5, 1, 1, 1]
    """
    lens = np.asarray(seq_lens, dtype=np.int64)
    ranks = np.asarray(seq_ranks, dtype=np.int64)
    if lens.ndim != 1 or ranks.shape != lens.shape:
        raise ValueError(f"seq_lens and seq_ranks must be 1-D of equal length, got "
                         f"{lens.shape} and {ranks.shape}")
    if lens.size and lens.min() < 0:
        raise ValueError("seq_lens must be >= 0")
    if ranks.size and (ranks.min() < 0 or ranks.max() > np.iinfo(np.int16).max):
        raise ValueError("seq_ranks must lie in [0, 32767]")
    return np.repeat(ranks, lens).astype(np.int16)


class Recorder:
    """Accumulates routing steps into a RoutingTrace and a sampled hidden-state side file.

    Args:
        cfg: the model's config (E, K, MoE layers, D).
        num_ranks: S, the number of source ranks tokens are assigned to.
        sample_rate: probability that a token is kept in the side file (0 keeps none).
        max_samples: stop sampling once this many tokens are kept (None: no cap).
        keep_gates: store the top-k gate weights in the trace.
        seed: seeds the token sampler.
        meta: extra JSON-serialisable metadata for the trace and the side file.
    """

    def __init__(self, cfg: MoEConfig, *, num_ranks: int, sample_rate: float = 0.0,
                 max_samples: int | None = None, keep_gates: bool = True, seed: int = 0,
                 meta: dict[str, Any] | None = None) -> None:
        if not isinstance(cfg, MoEConfig):
            raise TypeError("cfg must be a MoEConfig")
        if not isinstance(num_ranks, int) or num_ranks <= 0:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in [0, 1], got {sample_rate!r}")
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples!r}")
        self.cfg = cfg
        self.num_ranks = num_ranks
        self.sample_rate = float(sample_rate)
        self.max_samples = max_samples
        self.keep_gates = keep_gates
        self.seed = seed
        self.meta = dict(meta or {})
        self._rng = np.random.default_rng(seed)
        self._experts: list[np.ndarray] = []  # int16 [T_step, L, K] per step
        self._gates: list[np.ndarray] = []  # float32 [T_step, L, K] per step
        self._src: list[np.ndarray] = []  # int16 [T_step]
        self._phase: list[int] = []
        self._tags: list[str] = []
        self._hidden: list[np.ndarray] = []  # fp16 [n_step, L, D]
        self._logits: list[np.ndarray] = []  # fp16 [n_step, L, E]
        self._sample_step: list[np.ndarray] = []  # int64 [n_step]
        self._sample_token: list[np.ndarray] = []  # int64 [n_step]
        self._sample_rank: list[np.ndarray] = []  # int16 [n_step]
        self._num_samples = 0
        self._num_clamped = 0

    @property
    def num_steps(self) -> int:
        return len(self._phase)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s) for s in self._src))

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def add(self, routing: Sequence[LayerRouting], src_rank: Any, *,
            phase: str | int = "decode", tag: str = "") -> None:
        """Append one step.

        Args:
            routing: one LayerRouting per MoE layer, in layer order (ModelOutput.routing).
            src_rank: [T] integer source rank of each token, in [0, num_ranks).
            phase: "prefill" / "decode" (or 0 / 1).
            tag: free-form label of the step (dataset, domain).
        """
        cfg = self.cfg
        if routing is None or len(routing) != cfg.num_moe_layers:
            got = None if routing is None else len(routing)
            raise ValueError(f"routing must hold {cfg.num_moe_layers} MoE layers, got {got} "
                             "(run the model with return_routing=True)")
        if [r.layer for r in routing] != list(cfg.moe_layers):
            raise ValueError("routing layers do not match cfg.moe_layers")
        if phase not in _PHASES:
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        n_tok = routing[0].topk_ids.shape[0]
        src = np.asarray(src_rank.cpu() if isinstance(src_rank, torch.Tensor) else src_rank)
        if src.shape != (n_tok,) or (src.size and not np.issubdtype(src.dtype, np.integer)):
            raise ValueError(f"src_rank must be an integer array of shape ({n_tok},), "
                             f"got {src.dtype} {src.shape}")
        if src.size and (src.min() < 0 or src.max() >= self.num_ranks):
            raise ValueError(f"src_rank values must lie in [0, {self.num_ranks})")

        ids = torch.stack([r.topk_ids for r in routing], dim=1)  # [T, L, K]
        self._experts.append(ids.to("cpu", torch.int16).numpy())
        if self.keep_gates:
            gates = torch.stack([r.topk_weights for r in routing], dim=1)  # [T, L, K]
            self._gates.append(gates.to("cpu", torch.float32).numpy())
        self._src.append(src.astype(np.int16))
        step = len(self._phase)
        self._phase.append(_PHASES[phase])
        self._tags.append(str(tag))

        if self.sample_rate > 0:
            keep = np.flatnonzero(self._rng.random(n_tok) < self.sample_rate)  # [n]
            if self.max_samples is not None:
                keep = keep[:max(self.max_samples - self._num_samples, 0)]
            if keep.size:
                rows = torch.from_numpy(keep).to(routing[0].hidden.device)
                hidden = torch.stack([r.hidden[rows] for r in routing], dim=1)  # [n, L, D]
                logits = torch.stack([r.logits[rows] for r in routing], dim=1)  # [n, L, E]
                self._hidden.append(self._to_fp16(hidden))
                self._logits.append(self._to_fp16(logits))
                self._sample_step.append(np.full(keep.size, step, dtype=np.int64))
                self._sample_token.append(keep.astype(np.int64))
                self._sample_rank.append(src[keep].astype(np.int16))
                self._num_samples += int(keep.size)

    def _to_fp16(self, x: torch.Tensor) -> np.ndarray:
        x = x.float()
        over = x.abs() > _FP16_MAX
        self._num_clamped += int(over.sum())
        return x.clamp(-_FP16_MAX, _FP16_MAX).to("cpu", torch.float16).numpy()

    def _meta(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"source": "probe.runtime.record", "model_type": cfg.model_type,
                "moe_layers": list(cfg.moe_layers), "num_layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size, **self.meta}

    def trace(self):
        """The steps recorded so far as a RoutingTrace (L = cfg.num_moe_layers)."""
        from probe.traces import RoutingTrace

        cfg = self.cfg
        lens = [len(s) for s in self._src]
        offsets = np.concatenate(([0], np.cumsum(lens, dtype=np.int64)))
        shape = (0, cfg.num_moe_layers, cfg.top_k)
        experts = np.concatenate(self._experts) if self._experts else np.zeros(shape, np.int16)
        gates = None
        if self.keep_gates:
            gates = np.concatenate(self._gates) if self._gates else np.zeros(shape, np.float32)
        return RoutingTrace.from_arrays(
            num_experts=cfg.num_experts, num_ranks=self.num_ranks, step_offsets=offsets,
            src_rank=np.concatenate(self._src) if self._src else np.zeros(0, np.int16),
            experts=experts, gates=gates, phase=np.asarray(self._phase, np.uint8),
            step_tags=self._tags, meta=self._meta())

    def save_samples(self, path: str | os.PathLike) -> None:
        """Write the sampled tokens to a safetensors file (see `load_samples`)."""
        cfg = self.cfg
        n_layers = cfg.num_moe_layers

        def cat(parts: list[np.ndarray], tail: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros((0, *tail), dtype)

        arrays = {
            "hidden": cat(self._hidden, (n_layers, cfg.hidden_size), np.float16),
            "logits": cat(self._logits, (n_layers, cfg.num_experts), np.float16),
            "step": cat(self._sample_step, (), np.int64),
            "token": cat(self._sample_token, (), np.int64),
            "src_rank": cat(self._sample_rank, (), np.int16),
        }
        meta = {**self._meta(), "sample_rate": self.sample_rate, "seed": self.seed,
                "num_steps": self.num_steps, "fp16_clamped": self._num_clamped}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.fspath(path),
                  metadata={"format": SAMPLES_FORMAT, "version": SAMPLES_VERSION,
                            "meta": json.dumps(meta, sort_keys=True)})


@dataclass
class RouterSamples:
    """Sampled tokens of a recording (n tokens, L MoE layers).

    Attributes:
        hidden: fp16 [n, L, D], router input of each MoE layer.
        logits: fp16 [n, L, E], router logits of each MoE layer.
        step: int64 [n], step of the trace the token came from.
        token: int64 [n], row of the token within its step.
        src_rank: int16 [n], source rank of the token.
        meta: recording metadata (model_type, moe_layers, sample_rate, ...).
    """

    hidden: np.ndarray
    logits: np.ndarray
    step: np.ndarray
    token: np.ndarray
    src_rank: np.ndarray
    meta: dict[str, Any]


def load_samples(path: str | os.PathLike) -> RouterSamples:
    """Read a side file written by `Recorder.save_samples`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file not found: {path}")
    with safe_open(os.fspath(path), framework="np") as f:
        header = f.metadata() or {}
    if header.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{path}: not a {SAMPLES_FORMAT} file (format={header.get('format')!r})")
    if header.get("version") != SAMPLES_VERSION:
        raise ValueError(f"{path}: unsupported version {header.get('version')!r}")
    arrays = load_file(os.fspath(path))
    missing = {"hidden", "logits", "step", "token", "src_rank"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}")
    n = arrays["step"].shape[0]
    for name in ("hidden", "logits", "token", "src_rank"):
        if arrays[name].shape[0] != n:
            raise ValueError(f"{path}: array {name} has {arrays[name].shape[0]} rows, "
                             f"expected {n}")
    return RouterSamples(arrays["hidden"], arrays["logits"], arrays["step"], arrays["token"],
                         arrays["src_rank"], json.loads(header.get("meta", "{}")))


@torch.no_grad()
def record_step(model: MoETransformer, recorder: Recorder, input_ids: torch.Tensor, *,
                src_rank: Any, seq_lens: Sequence[int] | None = None,
                caches: Sequence[KVCache] | None = None, phase: str | int = "decode",
                tag: str = "", last_only: bool = False) -> ModelOutput:
    """One forward pass of `model` (see MoETransformer.forward), recorded into `recorder`."""
    out = model(input_ids, seq_lens=seq_lens, caches=caches, return_routing=True,
                last_only=last_only)
    recorder.add(out.routing, src_rank, phase=phase, tag=tag)
    return out
