"""Static expert placement and the imbalance ratio, shared by traces, planner and simulator.

>>> home = sharded_home(num_experts=4, num_ranks=2)
>>> home.astype(int)
array([[1, 1, 0, 0],
       [0, 0, 1, 1]])
>>> float(imbalance_ratio(np.array([3, 1])))
1.5
"""

from __future__ import annotations

import numpy as np

__all__ = ["imbalance_ratio", "rank_load", "sharded_home"]


def sharded_home(num_experts: int, num_ranks: int) -> np.ndarray:
    """Static EP sharding: expert e lives on rank e * G // E, so rank g holds the contiguous
    experts [ceil(g*E/G), ceil((g+1)*E/G)). Returns bool [G, E].

    E need not divide by G: E % G ranks, spread over the range, hold one expert more.

    >>> sharded_home(5, 2).astype(int).tolist()
    [[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]]
    """
    if num_ranks <= 0 or num_experts <= 0:
        raise ValueError(f"need num_experts > 0 and num_ranks > 0, got {num_experts}, {num_ranks}")
    if num_experts < num_ranks:
        raise ValueError(f"num_experts ({num_experts}) < num_ranks ({num_ranks}): some rank "
                         "would hold no expert")
    owner = np.arange(num_experts) * num_ranks // num_experts  # [E]
    home = np.zeros((num_ranks, num_experts), dtype=bool)
    home[owner, np.arange(num_experts)] = True
    return home


def rank_load(expert_load: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Tokens per rank when every expert runs on its single home rank.

    expert_load: [..., E] token counts; home: bool [G, E] with one holder per expert.
    Returns [..., G].
    """
    owner = np.argmax(home, axis=0)  # [E]
    num_ranks = home.shape[0]
    flat = np.asarray(expert_load).reshape(-1, home.shape[1])
    out = np.zeros((flat.shape[0], num_ranks), dtype=np.float64)
    for g in range(num_ranks):
        out[:, g] = flat[:, owner == g].sum(axis=1)
    return out.reshape(*np.shape(expert_load)[:-1], num_ranks)


def imbalance_ratio(per_rank: np.ndarray) -> np.ndarray:
    """IR = max_g / mean_g over the last axis (eq. 1); 1.0 where everything is zero."""
    per_rank = np.asarray(per_rank, dtype=np.float64)
    mean = per_rank.mean(axis=-1)
    peak = per_rank.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, peak / np.where(mean > 0, mean, 1.0), 1.0)
