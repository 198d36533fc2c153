"""The default hiding window: how long each rank can overlap replica transfers.

The paper's section 4.4: a layer-(L+1) transfer starts during layer L's expert GEMM and finishes
during layer L+1's attention, so rank g can hide about its own expert-compute time plus the
attention time. Without a measurement, the expert-compute part is the static plan's compute
time of rank g under the cost model (no communication: the combine pauses the transfer), and the
attention part is a caller-given number of seconds (0 by default: conservative).

>>> import numpy as np
>>> from probe.placement import sharded_home
>>> from probe.planner.cost import CostModel
>>> cost = CostModel.uniform(2, alpha=1.0, beta=0.5, token_time=0.0, transfer_time=1.0)
>>> default_window(np.array([[4, 0], [4, 2]]), sharded_home(2, 2), cost).tolist()
[5.0, 2.0]
"""

from __future__ import annotations

import numpy as np

from probe.planner.cost import CostModel

__all__ = ["default_window"]


def default_window(load: np.ndarray, home: np.ndarray, cost: CostModel, *,
                   attention_time: float | np.ndarray = 0.0) -> np.ndarray:
    """float64 [G]: seconds of expert compute of each rank under static EP, plus attention.

    load: int [S, E] tokens per source rank and expert. home: bool [G, E] static placement
    (an expert with several holders is counted, evenly split, on each). attention_time: seconds
    of non-communication work per layer besides the expert GEMMs (a number or float [G]).
    """
    load = np.asarray(load)
    home = np.asarray(home, dtype=bool)
    if load.ndim != 2 or home.ndim != 2 or load.shape[1] != home.shape[1]:
        raise ValueError(f"load [S, E] and home [G, E] disagree: {load.shape} vs {home.shape}")
    attention = np.asarray(attention_time, dtype=np.float64)
    if attention.ndim != 0 and attention.shape != (home.shape[0],):
        raise ValueError(f"attention_time must be a number or a [G] array with G = "
                         f"{home.shape[0]}, got shape {attention.shape}")
    if not np.all(np.isfinite(attention)) or np.any(attention < 0):
        raise ValueError(f"attention_time must be finite and >= 0, got {attention_time!r}")
    per_expert = load.sum(axis=0) / np.maximum(home.sum(axis=0), 1)  # [E], per holder
    tokens = home * per_expert[None, :]  # [G, E]
    return cost.compute_time(tokens) + attention
