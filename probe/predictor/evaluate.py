"""Per-layer evaluation of predictors on recorded samples: fidelity, load error, plan quality.

Shape legend: N sampled tokens, L MoE layers, D width, E experts, K top-k, S source ranks,
n steps.

Every function takes plain arrays (or a PredictorSet) and returns plain dicts / arrays, so the
CLI and the report script only format them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from probe.predictor.baselines import history_prediction, plan_quality, round_to_totals
from probe.predictor.metrics import (
    expert_load_error,
    full_recall_2k,
    rank_load_error,
    recall_2k,
    top_half_hit_rate,
    topk_accuracy,
)
from probe.predictor.model import PredictorSet

__all__ = [
    "fidelity",
    "history_loads",
    "plan_study",
    "predicted_ids",
    "step_loads",
    "true_ids",
]


@torch.no_grad()
def predicted_ids(pset: PredictorSet, hidden: np.ndarray, layer: int, k: int, *,
                  prior: bool = False, batch: int = 16384) -> np.ndarray:
    """Predicted top-k ids int64 [N, k] of `layer` from hidden [N, L, D] (uses layer-1's input).

    prior=True uses the frozen router alone (the untrained predictor).
    """
    pred = pset[layer]
    device = pred.router_weight.device
    out = []
    for start in range(0, hidden.shape[0], batch):
        h = torch.as_tensor(hidden[start:start + batch, layer - 1]).to(device)
        logits = pred.prior_logits(h) if prior else pred(h)  # [b, E]
        if k == pred.top_k and pred.select is not None:
            out.append(pred.select(logits).cpu())
        else:
            out.append(torch.topk(logits, k, dim=-1).indices.cpu())
    if not out:
        return np.zeros((0, k), np.int64)
    return torch.cat(out).numpy().astype(np.int64)


def true_ids(logits: np.ndarray, layer: int, k: int,
             select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """True top-k ids int64 [N, k] of `layer`, best first, from recorded logits [N, L, E]."""
    z = torch.as_tensor(np.asarray(logits[:, layer], dtype=np.float32))
    ids = select(z) if select is not None else torch.topk(z, k, dim=-1).indices
    return ids.numpy().astype(np.int64)


def step_loads(ids: np.ndarray, step: np.ndarray, src_rank: np.ndarray,
               step_ids: Sequence[int], num_ranks: int, num_experts: int) -> np.ndarray:
    """Tokens per (step, source rank, expert): int64 [n, S, E] for the steps in step_ids."""
    ids = np.asarray(ids)
    pos = {int(s): i for i, s in enumerate(step_ids)}
    row = np.array([pos.get(int(s), -1) for s in step], dtype=np.int64)
    keep = row >= 0
    flat = ((row[keep, None] * num_ranks + np.asarray(src_rank)[keep, None]) * num_experts
            + ids[keep])
    size = len(step_ids) * num_ranks * num_experts
    return np.bincount(flat.ravel(), minlength=size).reshape(len(step_ids), num_ranks,
                                                             num_experts)


def fidelity(pset: PredictorSet, hidden: np.ndarray, logits: np.ndarray, *,
             step: np.ndarray | None = None, src_rank: np.ndarray | None = None,
             num_ranks: int = 8, home: np.ndarray | None = None, prior: bool = False,
             layers: Sequence[int] | None = None) -> list[dict]:
    """Per-layer fidelity rows: topk_acc, half_hit, recall_2k, full_recall_2k and, when step
    and src_rank are given, the mean over steps of expert/rank load error.

    hidden: [N, L, D]; logits: [N, L, E]; step, src_rank: int [N]; home: bool [G, E].
    """
    k = pset.top_k
    rows = []
    for layer in (pset.layers if layers is None else layers):
        sel = pset[layer].select
        truth = true_ids(logits, layer, k, sel)
        pred2k = predicted_ids(pset, hidden, layer, min(2 * k, pset.num_experts), prior=prior)
        pred = (pred2k[:, :k] if sel is None
                else predicted_ids(pset, hidden, layer, k, prior=prior))
        row = {"layer": layer, "tokens": int(truth.shape[0]),
               "topk_acc": topk_accuracy(pred, truth),
               "half_hit": top_half_hit_rate(pred, truth),
               "recall_2k": recall_2k(pred2k, truth),
               "full_recall_2k": full_recall_2k(pred2k, truth)}
        if step is not None and src_rank is not None:
            steps = np.unique(step)
            e = pset.num_experts
            lt = step_loads(truth, step, src_rank, steps, num_ranks, e)
            lp = step_loads(pred, step, src_rank, steps, num_ranks, e)
            row["expert_load_err"] = float(np.mean([expert_load_error(p, t)
                                                    for p, t in zip(lp, lt, strict=True)]))
            if home is not None:
                row["rank_load_err"] = float(np.mean([rank_load_error(p, t, home)
                                                      for p, t in zip(lp, lt, strict=True)]))
        rows.append(row)
    return rows


def plan_study(truth: np.ndarray, predictions: dict[str, np.ndarray], *, home: np.ndarray,
               slots, window, cost, tokens_per_rank: int | None = None,
               top_k: int | None = None, method: str = "greedy") -> dict[str, dict]:
    """IR and objective of plans made from each prediction, scored on the truth, step by step.

    truth: int [n, S, E] true loads of n steps (one layer); predictions: name -> int [n, S, E].
    tokens_per_rank, top_k: if given, every step's loads (truth and predictions alike) are
    rescaled to S * tokens_per_rank * K pairs, the batch the cost model should see, keeping the
    shares per (s, e) (a sampled recording is far smaller than a real batch).
    Returns name -> {"ir": mean IR of its plan, "ir_truth": mean IR of the plan from the
    truth, "ir_static": mean static IR, "ir_ratio": mean of IR / IR_truth, "within_5pct":
    fraction of steps with IR <= 1.05 * IR_truth, "objective_ratio": mean objective ratio}.
    """
    truth = np.asarray(truth)
    if truth.ndim != 3:
        raise ValueError(f"truth must be [n, S, E], got shape {truth.shape}")
    out: dict[str, dict] = {}
    num_steps, num_ranks, num_experts = truth.shape

    def rescale(loads: np.ndarray) -> np.ndarray:
        if tokens_per_rank is None:
            return loads
        if top_k is None:
            raise ValueError("tokens_per_rank needs top_k")
        flat = loads.reshape(num_steps, num_ranks * num_experts)
        total = np.full(num_steps, num_ranks * int(tokens_per_rank) * int(top_k))
        return round_to_totals(flat, total).reshape(loads.shape)

    scaled_truth = rescale(truth)
    for name, pred in predictions.items():
        pred = np.asarray(pred)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {name!r} has shape {pred.shape}, truth {truth.shape}")
        scaled = rescale(pred)
        stats = [plan_quality(p, t, home=home, slots=slots, window=window, cost=cost,
                              method=method) for p, t in zip(scaled, scaled_truth, strict=True)]
        ir = np.array([q.ir_pred for q in stats])
        ir_truth = np.array([q.ir_truth for q in stats])
        obj = np.array([q.objective_pred for q in stats])
        obj_truth = np.array([q.objective_truth for q in stats])
        out[name] = {"ir": float(ir.mean()), "ir_truth": float(ir_truth.mean()),
                     "ir_static": float(np.mean([q.ir_static for q in stats])),
                     "ir_ratio": float(np.mean(ir / ir_truth)),
                     "within_5pct": float(np.mean(ir <= 1.05 * ir_truth + 1e-12)),
                     "objective_ratio": float(np.mean(obj / obj_truth)),
                     "ir_per_step": ir.tolist(), "ir_truth_per_step": ir_truth.tolist()}
    return out


def history_loads(loads: np.ndarray, windows: Sequence[int] = (1, 8)) -> dict[str, np.ndarray]:
    """History baselines {"last_step": ..., "avg_m": ...} of loads int [n, S, E] (one layer)."""
    return {("last_step" if m == 1 else f"avg_{m}"): history_prediction(loads, m)
            for m in windows}
