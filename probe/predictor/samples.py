"""Recorded router samples for predictor training and evaluation, and train/held-out splits.

Shape legend: N sampled tokens, L MoE layers, D model width, E experts.

The side file comes from `probe.runtime.record.Recorder.save_samples`: per sampled token, every
MoE layer's router input hidden[N, L, D] and router logits[N, L, E] (fp16), with the step it came
from, its row within the step and its source rank. Layer l's predictor trains on
(hidden[:, l-1], logits[:, l]).

Splits never mix tokens of one step across the two sides: whole steps are held out. A step is one
forward pass, so the tokens of a request in that pass stay together; with `mode="blocks"` the
held-out steps come in contiguous blocks spread over the whole recording (every domain and the
shift between them appear on both sides, but a held-out block is never next to a training step
inside it), with `mode="tail"` the last steps are held out (pure extrapolation in time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Samples", "load_samples", "split_steps"]


@dataclass
class Samples:
    """Sampled tokens (see the module docstring). Arrays are numpy.

    Attributes:
        hidden: float16/float32 [N, L, D]; logits: float16/float32 [N, L, E];
        step: int64 [N]; src_rank: int [N]; token: int64 [N] (row within its step);
        meta: recording metadata.
    """

    hidden: np.ndarray
    logits: np.ndarray
    step: np.ndarray
    src_rank: np.ndarray
    token: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.hidden.shape[0]
        if self.hidden.ndim != 3 or self.logits.ndim != 3:
            raise ValueError(f"hidden must be [N, L, D] and logits [N, L, E], got "
                             f"{self.hidden.shape} and {self.logits.shape}")
        if self.logits.shape[:2] != self.hidden.shape[:2]:
            raise ValueError(f"hidden {self.hidden.shape} and logits {self.logits.shape} "
                             "disagree on N or L")
        for name in ("step", "src_rank", "token"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} must be [N] = [{n}], got shape {arr.shape}")

    @property
    def num_layers(self) -> int:
        return self.hidden.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[2]

    def subset(self, rows: np.ndarray) -> Samples:
        """The samples at `rows` (int indices or bool mask [N])."""
        return Samples(self.hidden[rows], self.logits[rows], self.step[rows],
                       self.src_rank[rows], self.token[rows], dict(self.meta))


def load_samples(path: str | Path) -> Samples:
    """Read a Recorder side file (safetensors, format "probe-router-samples")."""
    try:
        from probe.runtime.record import load_samples as _load
    except ImportError as err:  # pragma: no cover - the runtime ships with probe
        raise ImportError("reading samples needs probe.runtime.record") from err
    raw = _load(path)
    return Samples(raw.hidden, raw.logits, raw.step.astype(np.int64),
                   raw.src_rank.astype(np.int64), raw.token.astype(np.int64), dict(raw.meta))


def split_steps(steps: np.ndarray, *, held_out: float = 0.25, mode: str = "blocks",
                block: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks (train, test) [N] over samples, holding out whole steps.

    steps: int [N] step of each sample. held_out: fraction of distinct steps held out.
    mode "blocks": the distinct steps, in order, cut into blocks of `block` steps; a seeded
    random `held_out` fraction of the blocks is held out. mode "tail": the last steps.
    """
    steps = np.asarray(steps)
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out!r}")
    if mode not in ("blocks", "tail"):
        raise ValueError(f"mode must be 'blocks' or 'tail', got {mode!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    uniq = np.unique(steps)
    if uniq.size < 2:
        raise ValueError("need samples from at least 2 steps to split by step")
    if mode == "tail":
        cut = uniq[int(round(uniq.size * (1 - held_out)))] if uniq.size > 1 else uniq[-1]
        test = steps >= cut
    else:
        block_of = np.searchsorted(uniq, steps) // block
        num_blocks = int(block_of.max()) + 1
        num_test = min(num_blocks - 1, max(1, int(round(num_blocks * held_out))))
        chosen = np.random.default_rng(seed).choice(num_blocks, size=num_test, replace=False)
        test = np.isin(block_of, chosen)
    return ~test, test
