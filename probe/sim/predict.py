"""Prediction-error models: what load PROBE plans from when no real predictor output is given.

PROBE plans layer l before its router runs, from a prediction of load[S, E]. The simulator takes
either real predictions (an int array [N, L, S, E], e.g. from probe.predictor) or one of these
declared error models, each a pure function of the true load, the step's history and a seed:

  * "perfect": the true load (PROBE then equals the oracle exactly).
  * "previous": the same layer's load one step earlier, rescaled per source rank to this step's
    token count (a history baseline; the first step uses the static plan's input, the truth).
  * "topk:ACC" (default "topk:0.9"): each token-expert pair is predicted right with probability
    ACC (binomial thinning of the true counts per (s, e)); the pairs missed on source s are
    re-drawn (multinomial) from the previous step's expert distribution of that layer (uniform
    at the first step). ACC matches the paper's top-k accuracy (87-94% distilled, 70-80%
    frozen router). The count per source rank is preserved.
  * "noise:SIGMA": true count times exp(SIGMA * N(0, 1)) per (s, e), rounded (zeros stay zero:
    an optimistic model, kept for sensitivity studies).

`make_predictor(spec, seed)` returns a callable predict(true, previous, step, layer) -> int64
[S, E]; `true` and `previous` are int [S, E] (previous None at the first step).

>>> import numpy as np
>>> p = make_predictor("perfect")
>>> p(np.array([[3, 1]]), None, 0, 0).tolist()
[[3, 1]]
>>> q = make_predictor("topk:0.9", seed=1)
>>> int(q(np.array([[30, 10]]), np.array([[1, 1]]), 0, 0).sum())
40
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["Predictor", "describe_predictor", "make_predictor", "replay_predictor"]

Predictor = Callable[[np.ndarray, "np.ndarray | None", int, int], np.ndarray]


def _rng(seed: int, step: int, layer: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, layer])


def _perfect(true, previous, step, layer):
    return np.asarray(true, dtype=np.int64)


def _previous(true, previous, step, layer):
    true = np.asarray(true, dtype=np.int64)
    if previous is None:
        return true.copy()
    prev = np.asarray(previous, dtype=np.float64)
    want = true.sum(axis=1, keepdims=True).astype(np.float64)  # [S, 1]
    have = prev.sum(axis=1, keepdims=True)
    scaled = np.where(have > 0, prev * want / np.where(have > 0, have, 1.0), 0.0)
    return _round_rows(scaled, true.sum(axis=1))


def _round_rows(x: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round float [S, E] to int64 rows summing to `totals` [S] (largest remainder)."""
    base = np.floor(x).astype(np.int64)
    short = totals - base.sum(axis=1)
    frac = x - base
    order = np.argsort(-frac, axis=1, kind="stable")
    out = base.copy()
    for s in np.flatnonzero(short > 0):
        out[s, order[s, : short[s]]] += 1
    return out


def _topk(accuracy: float, seed: int):
    def predict(true, previous, step, layer):
        true = np.asarray(true, dtype=np.int64)
        rng = _rng(seed, step, layer)
        kept = rng.binomial(true, accuracy)  # [S, E]
        missed = true.sum(axis=1) - kept.sum(axis=1)  # [S]
        if previous is None or np.asarray(previous).sum() == 0:
            dist = np.full(true.shape[1], 1.0 / true.shape[1])
        else:
            col = np.asarray(previous, dtype=np.float64).sum(axis=0)
            dist = col / col.sum()
        extra = np.stack([rng.multinomial(m, dist) for m in missed])  # [S, E]
        return kept + extra
    return predict


def _noise(sigma: float, seed: int):
    def predict(true, previous, step, layer):
        true = np.asarray(true, dtype=np.int64)
        rng = _rng(seed, step, layer)
        return np.rint(true * np.exp(sigma * rng.standard_normal(true.shape))).astype(np.int64)
    return predict


def replay_predictor(loads: np.ndarray, shape: tuple[int, ...]) -> Predictor:
    """A predictor that replays given predicted loads int [N, L, S, E] (e.g. a real
    predictor's output); ValueError unless their shape is `shape`."""
    if loads.shape != tuple(shape):
        raise ValueError(f"predicted loads must have shape {tuple(shape)} [N, L, S, E], got "
                         f"{loads.shape}")
    given = loads.astype(np.int64)

    def predict(true, previous, step, layer):
        return given[step, layer]

    return predict


def make_predictor(spec: str = "topk:0.9", seed: int = 0) -> Predictor:
    """The prediction-error model named by `spec` (module docstring lists them)."""
    if not isinstance(spec, str):
        raise TypeError(f"predictor must be a string spec, got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    if name == "perfect" and not arg:
        return _perfect
    if name == "previous" and not arg:
        return _previous
    if name in ("topk", "noise"):
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"predictor {spec!r}: expected a number after '{name}:'") from None
        if name == "topk":
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"predictor {spec!r}: accuracy must be in [0, 1]")
            return _topk(value, seed)
        if not value >= 0.0:
            raise ValueError(f"predictor {spec!r}: sigma must be >= 0")
        return _noise(value, seed)
    raise ValueError(f"unknown predictor {spec!r}; use perfect, previous, topk:ACC or "
                     "noise:SIGMA (or pass predicted loads [N, L, S, E])")


def describe_predictor(spec) -> str:
    """One line naming the prediction source, for reports."""
    if isinstance(spec, np.ndarray):
        return f"given predictions {tuple(spec.shape)}"
    return {"perfect": "perfect (truth)", "previous": "previous step's load"}.get(
        spec, f"error model {spec}")
