"""More training pairs for the predictors: teacher-forced passes over plain text, on disk.

Shape legend: N tokens, L MoE layers, D model width, E experts, B sequences.

A causal model's hidden states over a text do not depend on how the text is fed: a prefill
pass over a window gives, at position p, the router inputs and logits that decode would give
when it feeds the byte at p after the bytes before it (same model, same dtype, up to float
rounding). So pairs (h_{l-1}, logits_l) for predictor training can be made in large batches
from any text, with no generation, and in the recorder's own layout (`Recorder.save_samples`:
hidden [N, L, D] router inputs, logits [N, L, E], both fp16).

- `router_pairs(model, windows, min_pos)`: one batched pass over B windows (flat, no
  padding); keeps the tokens at positions >= min_pos.
- `PairWriter` / `PairFile`: fp16 memmaps on disk (hidden.npy, logits.npy, meta.json), so the
  pairs never have to sit in RAM at once.
- `train_streaming(pset, pairs, ...)`: AdamW minibatches over a PairFile, read in chunks (each
  chunk shuffled in RAM, chunks visited in a seeded random order), cosine-decayed learning rate;
  the loss is `distill.distill_loss` plus optionally `distill.topk_margin_loss`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from probe.predictor.distill import OnlineDistiller
from probe.predictor.model import PredictorSet

__all__ = ["PairFile", "PairWriter", "router_pairs", "train_streaming"]

_FP16_MAX = float(np.finfo(np.float16).max)


@torch.no_grad()
def router_pairs(model, windows: Sequence[np.ndarray], *, min_pos: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Router inputs and logits of every MoE layer for the tokens of B text windows.

    model: a probe.runtime MoETransformer (stateless pass, positions from 0 in every window).
    windows: B int64 token arrays (each [t_b], t_b >= 1).
    min_pos: keep only tokens at positions >= min_pos of their window.
    Returns (hidden fp16 [n, L, D], logits fp16 [n, L, E]), n = sum(max(0, t_b - min_pos)),
    tokens in window order.
    """
    if not windows:
        raise ValueError("windows is empty")
    if not isinstance(min_pos, int) or min_pos < 0:
        raise ValueError(f"min_pos must be an int >= 0, got {min_pos!r}")
    lens = [int(np.asarray(w).shape[0]) for w in windows]
    if min(lens) < 1:
        raise ValueError("every window needs at least one token")
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.concatenate([np.asarray(w, np.int64) for w in windows]))
    out = model(ids.to(device), seq_lens=lens, return_routing=True)
    keep = np.concatenate([np.arange(t) >= min_pos for t in lens])  # [T]
    rows = torch.from_numpy(np.flatnonzero(keep)).to(device)
    hidden = torch.stack([r.hidden[rows] for r in out.routing], dim=1)  # [n, L, D]
    logits = torch.stack([r.logits[rows] for r in out.routing], dim=1)  # [n, L, E]

    def fp16(x: torch.Tensor) -> np.ndarray:
        return x.float().clamp(-_FP16_MAX, _FP16_MAX).to("cpu", torch.float16).numpy()

    return fp16(hidden), fp16(logits)


class PairWriter:
    """Appends (hidden [n, L, D], logits [n, L, E]) fp16 rows to memmaps under `folder`.

    capacity: N, the most rows the files hold (they are created at that size; `close` records
    how many were written).
    """

    def __init__(self, folder: str | Path, capacity: int, num_layers: int, dim: int,
                 num_experts: int, meta: dict | None = None) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.meta = dict(meta or {})
        self.hidden = np.lib.format.open_memmap(self.folder / "hidden.npy", mode="w+",
                                                dtype=np.float16,
                                                shape=(capacity, num_layers, dim))
        self.logits = np.lib.format.open_memmap(self.folder / "logits.npy", mode="w+",
                                                dtype=np.float16,
                                                shape=(capacity, num_layers, num_experts))
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def add(self, hidden: np.ndarray, logits: np.ndarray) -> int:
        """Append rows (cut at capacity); returns how many were written."""
        if hidden.shape[0] != logits.shape[0]:
            raise ValueError(f"hidden has {hidden.shape[0]} rows, logits {logits.shape[0]}")
        n = min(hidden.shape[0], self.capacity - self.count)
        self.hidden[self.count:self.count + n] = hidden[:n]
        self.logits[self.count:self.count + n] = logits[:n]
        self.count += n
        return n

    def close(self) -> None:
        self.hidden.flush()
        self.logits.flush()
        (self.folder / "meta.json").write_text(
            json.dumps({**self.meta, "count": self.count}, indent=1) + "\n")


class PairFile:
    """Read side of a PairWriter folder: `hidden`, `logits` memmaps of the first `count` rows."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder}: no meta.json (not a closed PairWriter)")
        self.meta = json.loads(meta_path.read_text())
        count = int(self.meta["count"])
        self.hidden = np.load(self.folder / "hidden.npy", mmap_mode="r")[:count]
        self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")[:count]

    def __len__(self) -> int:
        return self.hidden.shape[0]


def train_streaming(pset: PredictorSet, hidden: np.ndarray, logits: np.ndarray, *,
                    num_tokens: int | None = None, epochs: float = 1.0,
                    batch_size: int = 1024, lr: float = 3e-3, lr_final: float | None = None,
                    weight_decay: float = 0.0, margin_weight: float = 0.0,
                    margin: float = 1.0, chunk: int = 65536, seed: int = 0,
                    callback: Callable[[int, float], None] | None = None,
                    callback_every: int = 0) -> dict:
    """Distil every layer's residual on the first `num_tokens` rows of (hidden, logits).

    hidden: [N, L, D], logits: [N, L, E] (numpy, typically fp16 memmaps from PairFile). Rows
    are read `chunk` at a time, so only one chunk is in RAM as float32. `epochs` may be
    fractional (the last pass stops early). Layer l trains on (hidden[:, l-1], logits[:, l]).
    callback(tokens_seen, mean_loss) runs every `callback_every` minibatches (0: never).
    Returns {"steps", "tokens_seen", "seconds", "loss": [mean loss per callback window]}.
    """
    if hidden.ndim != 3 or logits.ndim != 3 or hidden.shape[:2] != logits.shape[:2]:
        raise ValueError(f"hidden [N, L, D] and logits [N, L, E] disagree: {hidden.shape} vs "
                         f"{logits.shape}")
    total_rows = hidden.shape[0] if num_tokens is None else int(num_tokens)
    if not 0 < total_rows <= hidden.shape[0]:
        raise ValueError(f"num_tokens must lie in [1, {hidden.shape[0]}], got {num_tokens!r}")
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(chunk, int) or chunk < batch_size:
        raise ValueError(f"chunk must be an int >= batch_size, got {chunk!r}")
    distiller = OnlineDistiller(pset, lr, weight_decay=weight_decay,
                                margin_weight=margin_weight, margin=margin)
    lr_final = lr / 20 if lr_final is None else lr_final
    budget = int(round(epochs * total_rows))  # tokens to visit
    total_steps = max(1, -(-budget // batch_size))
    gen = np.random.default_rng(seed)
    starts = np.arange(0, total_rows, chunk)
    step, seen, window_loss, window_n = 0, 0, 0.0, 0
    losses: list[float] = []
    t0 = time.perf_counter()
    while seen < budget:
        for start in gen.permutation(starts):
            if seen >= budget:
                break
            stop = min(start + chunk, total_rows)
            h_chunk = torch.from_numpy(np.asarray(hidden[start:stop], np.float32))
            z_chunk = torch.from_numpy(np.asarray(logits[start:stop], np.float32))
            order = torch.from_numpy(gen.permutation(stop - start))
            for b in range(0, order.numel(), batch_size):
                if seen >= budget:
                    break
                idx = order[b:b + batch_size]
                frac = step / max(1, total_steps - 1)
                distiller.set_lr(lr_final + 0.5 * (lr - lr_final)
                                 * (1 + float(np.cos(np.pi * min(1.0, frac)))))
                out = distiller.update_all(h_chunk[idx], z_chunk[idx])
                window_loss += float(np.mean(list(out.values())))
                window_n += 1
                step += 1
                seen += idx.numel()
                if callback_every and step % callback_every == 0:
                    losses.append(window_loss / window_n)
                    window_loss, window_n = 0.0, 0
                    if callback is not None:
                        callback(seen, losses[-1])
    return {"steps": step, "tokens_seen": seen, "seconds": time.perf_counter() - t0,
            "loss": losses}
