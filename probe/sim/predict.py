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

`confusion_predictor(pairs, num_experts, seed)` replays a REAL predictor's measured errors
where only a sample of its outputs exists (e.g. the small model's router samples): per layer,
the empirical confusion C[i, j] (true expert i predicted as j) from sampled (predicted ids,
true ids) pairs, and every (source, expert) count of the true load drawn through it.

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

__all__ = ["Predictor", "confusion_matrix", "confusion_predictor", "describe_predictor",
           "make_predictor", "replay_predictor"]

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


def confusion_matrix(pred_ids: np.ndarray, true_ids: np.ndarray, num_experts: int,
                     smoothing: float = 8.0) -> np.ndarray:
    """float64 [E, E], rows summing to 1: how often true expert i comes out as j.

    pred_ids, true_ids: int [T, K] of the same sampled tokens. A true id that is predicted
    counts (i, i); the true ids missed are paired, in id order, with the predicted ids that are
    wrong (i, j). Each row is smoothed towards the layer-wide row (hit rate on the diagonal,
    the wrong predictions' distribution elsewhere) with weight `smoothing` pairs, so experts
    seen rarely in the sample get the layer's average behaviour.

    >>> c = confusion_matrix(np.array([[0, 1], [0, 2]]), np.array([[0, 1], [0, 1]]), 3, 0.0)
    >>> c.round(2).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
    """
    pred_ids, true_ids = np.asarray(pred_ids), np.asarray(true_ids)
    if pred_ids.shape != true_ids.shape or pred_ids.ndim != 2:
        raise ValueError(f"pred_ids and true_ids must be int [T, K] of one shape, got "
                         f"{pred_ids.shape} and {true_ids.shape}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    counts = np.zeros((num_experts, num_experts))
    for p, t in zip(pred_ids, true_ids, strict=True):
        ps, ts = set(p.tolist()), set(t.tolist())
        for i in ts & ps:
            counts[i, i] += 1
        for i, j in zip(sorted(ts - ps), sorted(ps - ts), strict=False):
            counts[i, j] += 1
    hits = np.trace(counts)
    total = counts.sum()
    hit_rate = hits / total if total else 1.0
    wrong = counts.sum(axis=0) - np.diag(counts)  # [E] wrong predictions per expert j
    spread = wrong / wrong.sum() if wrong.sum() else np.full(num_experts, 1.0 / num_experts)
    prior = (1 - hit_rate) * np.tile(spread, (num_experts, 1))
    prior[np.arange(num_experts), np.arange(num_experts)] += hit_rate
    prior /= prior.sum(axis=1, keepdims=True)
    rows = counts.sum(axis=1, keepdims=True)
    out = (counts + smoothing * prior) / np.maximum(rows + smoothing, 1e-12)
    empty = rows[:, 0] + smoothing == 0
    out[empty] = prior[empty]
    return out


def confusion_predictor(confusions: dict[int, np.ndarray], seed: int = 0,
                        fallback: Predictor | None = None) -> Predictor:
    """predict(true, previous, step, layer): every count true[s, i] drawn (multinomial) over
    confusions[layer][i] (float [E, E]); layers without a matrix use `fallback` (default:
    "previous"). Preserves the count per source rank."""
    fallback = _previous if fallback is None else fallback

    def predict(true, previous, step, layer):
        if layer not in confusions:
            return fallback(true, previous, step, layer)
        c = confusions[layer]
        true = np.asarray(true, dtype=np.int64)
        rng = _rng(seed, step, layer)
        out = np.zeros_like(true)
        for s, i in zip(*np.nonzero(true), strict=True):
            out[s] += rng.multinomial(true[s, i], c[i])
        return out

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
