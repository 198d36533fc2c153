"""Summary statistics of a RoutingTrace: imbalance under a placement, load histogram, churn.

>>> from probe.traces.synthetic import generate
>>> s = stats(generate("uniform", num_steps=4, tokens_per_step=512, num_layers=2,
...                    num_experts=16, top_k=2, num_ranks=4))
>>> s["ir"].shape, bool(s["ir_overall"]["max"] < 1.3)
((4, 2), True)
"""

from __future__ import annotations

import numpy as np

from probe.placement import imbalance_ratio, rank_load, sharded_home
from probe.traces.trace import PREFILL, RoutingTrace

__all__ = ["HIST_EDGES", "hot_expert_churn", "ir_summary", "stats"]

# Expert-load histogram bins, in multiples of the mean expert load of the (step, layer).
HIST_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, np.inf)


def ir_summary(values: np.ndarray) -> dict[str, float]:
    """mean, median, p10, p90, max of a float array (any shape); NaN-free input."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {k: float("nan") for k in ("mean", "median", "p10", "p90", "max")}
    return {"mean": float(v.mean()), "median": float(np.median(v)),
            "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "max": float(v.max())}


def hot_expert_churn(counts: np.ndarray, top: int = 8) -> np.ndarray:
    """Jaccard overlap of the `top` hottest experts between consecutive steps.

    counts: [N, L, E] tokens per step, layer, expert. Returns float64 [N-1, L]: 1.0 means the
    same hot set as the step before, 0.0 a disjoint one.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [N, L, E], got shape {counts.shape}")
    num_steps, _, num_experts = counts.shape
    top = min(top, num_experts)
    if num_steps < 2:
        return np.zeros((0, counts.shape[1]))
    hot_idx = np.argpartition(-counts, top - 1, axis=-1)[..., :top]  # [N, L, top]
    hot = np.zeros(counts.shape, dtype=bool)
    np.put_along_axis(hot, hot_idx, True, axis=-1)
    inter = (hot[1:] & hot[:-1]).sum(axis=-1)
    return inter / (2 * top - inter)


def stats(trace: RoutingTrace, home: np.ndarray | None = None, *, top: int = 8) -> dict:
    """Imbalance and churn of a trace when every expert runs on its home rank.

    home: bool [G, E] static placement (one holder per expert); default
        sharded_home(E, trace.num_ranks).
    top: size of the hot-expert set used for churn.

    Returns a dict: sizes (num_steps, num_layers, num_experts, num_ranks, top_k, num_tokens),
    "ep" (G of the placement), "ir" float64 [N, L], "ir_per_layer" (one summary dict per layer),
    "ir_overall" and, per phase present, "ir_prefill"/"ir_decode" summaries;
    "frac_ir_in_1.4_2.3" and "frac_ir_above_2.6"; "load_hist" {"edges", "counts"} of per-expert
    load / mean expert load over all (step, layer, expert); "churn" float64 [N-1, L] Jaccard
    overlap of top-`top` hot experts between consecutive steps and "churn_per_layer" means;
    "churn_min" {"step", "jaccard"}: the step whose hot sets changed most (mean over layers);
    "ir_by_tag": IR summary per step tag when there are 2 to 8 distinct tags.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    if home is None:
        home = sharded_home(trace.num_experts, trace.num_ranks)
    home = np.asarray(home, dtype=bool)
    if home.ndim != 2 or home.shape[1] != trace.num_experts:
        raise ValueError(f"home must be bool [G, E={trace.num_experts}], got {home.shape}")
    if not np.all(home.sum(axis=0) == 1):
        raise ValueError("home must place every expert on exactly one rank")
    counts = trace.expert_counts()  # [N, L, E]
    ir = imbalance_ratio(rank_load(counts, home))  # [N, L]
    per_expert_mean = counts.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(per_expert_mean > 0, counts / np.where(per_expert_mean > 0,
                                                              per_expert_mean, 1), 0.0)
    hist, _ = np.histogram(rel, bins=np.array(HIST_EDGES))
    churn = hot_expert_churn(counts, top)
    out = {
        "num_steps": trace.num_steps,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "num_ranks": trace.num_ranks,
        "top_k": trace.top_k,
        "num_tokens": trace.num_tokens,
        "ep": int(home.shape[0]),
        "ir": ir,
        "ir_per_layer": [ir_summary(ir[:, layer]) for layer in range(trace.num_layers)],
        "ir_overall": ir_summary(ir),
        "frac_ir_in_1.4_2.3": float(np.mean((ir >= 1.4) & (ir <= 2.3))) if ir.size else 0.0,
        "frac_ir_above_2.6": float(np.mean(ir > 2.6)) if ir.size else 0.0,
        "load_hist": {"edges": list(HIST_EDGES), "counts": hist.astype(np.int64)},
        "churn": churn,
        "churn_per_layer": churn.mean(axis=0) if churn.size else np.zeros(trace.num_layers),
        "top": top,
    }
    tags = sorted(set(trace.step_tags) - {""})
    if 1 < len(tags) <= 8:  # e.g. before / after a semantic shift
        tag_arr = np.array(trace.step_tags, dtype=object)
        out["ir_by_tag"] = {t: ir_summary(ir[tag_arr == t]) for t in tags}
    if churn.size:
        step_churn = churn.mean(axis=1)  # [N-1]
        worst = int(np.argmin(step_churn))
        out["churn_min"] = {"step": worst + 1, "jaccard": float(step_churn[worst])}
    for name, code in (("prefill", PREFILL), ("decode", 1 - PREFILL)):
        mask = trace.phase == code
        if mask.any():
            out[f"ir_{name}"] = ir_summary(ir[mask])
    return out
