"""Fidelity metrics of a routing prediction, per layer. Pure functions over numpy arrays.

Shape legend: T tokens, K experts per token, E experts, S source ranks, G ranks.

Definitions (for one layer; ids in each row are distinct; true ids are given best first, the
order `torch.topk` returns):

- top-k accuracy: mean over tokens of |pred top-K  ∩  true top-K| / K.
- top-half-k hit rate: fraction of tokens whose true top-ceil(K/2) experts (the heaviest half
  of the gate weight) all lie in the predicted top-K. For K = 1 it equals top-1 accuracy.
- 2k recall: mean over tokens of |pred top-2K  ∩  true top-K| / K (mean coverage of the true
  set by a doubled prediction). `full_recall_2k` is the stricter fraction of tokens whose whole
  true top-K lies in the predicted top-2K.
- expert load error: sum |n_hat - n| / sum n over the [S, E] token counts (0 is exact; both
  sides count T*K pairs, so it lies in [0, 2]).
- rank load error: the same on per-destination-rank loads [G] under a static placement.

>>> import numpy as np
>>> pred = np.array([[0, 1], [2, 3]]); true = np.array([[1, 0], [2, 0]])
>>> float(topk_accuracy(pred, true)), float(top_half_hit_rate(pred, true))
(0.75, 1.0)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "expert_load_error",
    "full_recall_2k",
    "load_from_ids",
    "rank_load_error",
    "recall_2k",
    "relative_l1",
    "top_half_hit_rate",
    "topk_accuracy",
]


def _ids(name: str, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [T, K] array of expert ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer expert ids, got dtype {ids.dtype}")
    return ids


def _coverage(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[T, Kt] bool: true[t, j] appears in pred[t, :]."""
    if pred.shape[0] != true.shape[0]:
        raise ValueError(f"pred has {pred.shape[0]} tokens, true {true.shape[0]}")
    return (true[:, :, None] == pred[:, None, :]).any(axis=2)


def topk_accuracy(pred_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean over tokens of |pred ∩ true| / K. pred_ids, true_ids: int [T, K]."""
    pred, true = _ids("pred_ids", pred_ids), _ids("true_ids", true_ids)
    if pred.shape != true.shape:
        raise ValueError(f"pred_ids {pred.shape} and true_ids {true.shape} differ")
    if true.shape[0] == 0:
        return float("nan")
    return float(_coverage(pred, true).mean())


def top_half_hit_rate(pred_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Fraction of tokens whose true top-ceil(K/2) lie in the predicted top-K.

    pred_ids: int [T, K]; true_ids: int [T, K], best first.
    """
    pred, true = _ids("pred_ids", pred_ids), _ids("true_ids", true_ids)
    half = math.ceil(true.shape[1] / 2)
    if true.shape[0] == 0:
        return float("nan")
    return float(_coverage(pred, true[:, :half]).all(axis=1).mean())


def recall_2k(pred_ids_2k: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean over tokens of |pred top-2K ∩ true top-K| / K. pred: int [T, 2K]; true: [T, K]."""
    pred, true = _ids("pred_ids_2k", pred_ids_2k), _ids("true_ids", true_ids)
    if pred.shape[1] < true.shape[1]:
        raise ValueError(f"pred_ids_2k has {pred.shape[1]} columns, fewer than K = "
                         f"{true.shape[1]}")
    if true.shape[0] == 0:
        return float("nan")
    return float(_coverage(pred, true).mean())


def full_recall_2k(pred_ids_2k: np.ndarray, true_ids: np.ndarray) -> float:
    """Fraction of tokens whose whole true top-K lies in the predicted top-2K."""
    pred, true = _ids("pred_ids_2k", pred_ids_2k), _ids("true_ids", true_ids)
    if true.shape[0] == 0:
        return float("nan")
    return float(_coverage(pred, true).all(axis=1).mean())


def load_from_ids(ids: np.ndarray, src_rank: np.ndarray, num_ranks: int,
                  num_experts: int) -> np.ndarray:
    """Tokens per (source rank, expert): int64 [S, E] from ids int [T, K] and src_rank int [T]."""
    ids = _ids("ids", ids)
    src = np.asarray(src_rank)
    if src.shape != (ids.shape[0],):
        raise ValueError(f"src_rank must be [T] = [{ids.shape[0]}], got shape {src.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"ids must lie in [0, {num_experts})")
    if src.size and (src.min() < 0 or src.max() >= num_ranks):
        raise ValueError(f"src_rank must lie in [0, {num_ranks})")
    flat = (src.astype(np.int64)[:, None] * num_experts + ids).ravel()
    return np.bincount(flat, minlength=num_ranks * num_experts).reshape(num_ranks, num_experts)


def relative_l1(pred: np.ndarray, true: np.ndarray) -> float:
    """sum |pred - true| / sum |true| over all entries (0 when both are zero)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"pred shape {pred.shape} != true shape {true.shape}")
    denom = np.abs(true).sum()
    num = np.abs(pred - true).sum()
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)


def expert_load_error(pred_load: np.ndarray, true_load: np.ndarray) -> float:
    """Relative L1 between predicted and true token counts [S, E] (or any matching shape)."""
    return relative_l1(pred_load, true_load)


def rank_load_error(pred_load: np.ndarray, true_load: np.ndarray, home: np.ndarray) -> float:
    """Relative L1 between per-rank loads [G] under the static placement home bool [G, E].

    pred_load, true_load: [S, E] (or [E]); each expert counts on its (first) home rank.
    """
    from probe.placement import rank_load

    pred = np.asarray(pred_load).reshape(-1, np.shape(home)[1]).sum(axis=0)
    true = np.asarray(true_load).reshape(-1, np.shape(home)[1]).sum(axis=0)
    return relative_l1(rank_load(pred, home), rank_load(true, home))
