"""The predictor study behind results/predictor/report.md: one function, arrays in, dict out.

Steps (shape legend: N samples, L MoE layers, S ranks, E experts, n steps):
1. split the sampled tokens by whole steps (train / held-out, `samples.split_steps`);
2. fidelity of the frozen prior (untrained predictors) on the held-out steps;
3. offline distillation on the training steps, then fidelity of the distilled predictors on the
   held-out steps;
4. plan quality on the held-out steps, layer by layer: greedy plans made from the distilled
   prediction, the frozen prior and the history baselines (last step, moving average), all
   scored on the true load of the step, against the plan made from the truth;
5. online (prequential) distillation over the whole recording in time order, starting from the
   frozen prior: every step is first predicted, then learnt from, so the accuracy per step is
   always measured on traffic the predictor has not trained on, across the domain shifts; the
   history baselines' load error is tracked on the same steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from probe.placement import sharded_home
from probe.predictor.distill import OnlineDistiller, train_offline
from probe.predictor.evaluate import (
    fidelity,
    plan_study,
    predicted_ids,
    step_loads,
    true_ids,
)
from probe.predictor.metrics import expert_load_error, topk_accuracy
from probe.predictor.model import PredictorSet
from probe.predictor.samples import Samples, split_steps

__all__ = ["run_study"]


def run_study(make_predictors: Callable[[], PredictorSet], samples: Samples, *,
              num_ranks: int, trace=None, cost=None, epochs: int = 4, lr: float = 2e-3,
              batch_size: int = 512, held_out: float = 0.25, block: int = 8, seed: int = 0,
              tokens_per_rank: int = 512, slots: int = 3, window: float | None = None,
              plan_layers: list[int] | None = None, max_plan_steps: int = 64,
              min_step_samples: int = 32, online_updates: int = 1,
              online_lr: float = 1e-3, online_plans: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run the whole study (see the module docstring); returns a JSON-serialisable dict.

    make_predictors: builds fresh, untrained predictors (called twice: offline and online).
    trace: the full RoutingTrace of the recording (history baselines then use every token of
    earlier steps; without it they use the sampled tokens). cost: a probe.planner CostModel for
    num_ranks ranks (None: skip the plan study). window: seconds of transfer each rank hides
    (None: `slots` transfers). Plan study rescales each step to tokens_per_rank tokens per rank.
    """
    torch.manual_seed(seed)
    full = None if trace is None else trace.load_counts()  # int32 [n_all, L, S, E]
    tags = None if trace is None else list(trace.step_tags)
    out: dict = {"config": {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                            "held_out": held_out, "block": block, "seed": seed,
                            "num_ranks": num_ranks, "tokens_per_rank": tokens_per_rank,
                            "slots": slots, "online_updates": online_updates,
                            "online_lr": online_lr, "num_samples": int(samples.step.size),
                            "num_steps_sampled": int(np.unique(samples.step).size)}}
    train_mask, test_mask = split_steps(samples.step, held_out=held_out, block=block, seed=seed)
    train, test = samples.subset(train_mask), samples.subset(test_mask)
    out["config"].update(train_samples=int(train_mask.sum()), test_samples=int(test_mask.sum()))
    num_experts = samples.num_experts
    home = sharded_home(num_experts, num_ranks)

    pset = make_predictors()
    out["config"]["hidden"] = pset.hidden
    out["config"]["top_k"] = pset.top_k
    args = dict(step=test.step, src_rank=test.src_rank, num_ranks=num_ranks, home=home)
    log("fidelity of the frozen prior on held-out steps ...")
    out["prior"] = fidelity(pset, test.hidden, test.logits, prior=True, **args)

    log(f"offline distillation on {train.step.size} tokens, {epochs} epochs ...")
    t0 = time.perf_counter()
    hist = train_offline(pset, torch.from_numpy(train.hidden), torch.from_numpy(train.logits),
                         epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         progress=lambda e, n, losses: log(
                             f"  epoch {e + 1}/{n}: mean loss "
                             f"{np.mean(list(losses.values())):.4f}"))
    out["train_seconds"] = time.perf_counter() - t0
    out["train_loss"] = [{str(k): v for k, v in h.items()} for h in hist]
    out["distilled"] = fidelity(pset, test.hidden, test.logits, **args)

    if cost is not None:
        out["plans"] = _plan_part(pset, test, full, cost=cost, home=home, num_ranks=num_ranks,
                                  tokens_per_rank=tokens_per_rank, slots=slots, window=window,
                                  layers=plan_layers, max_steps=max_plan_steps,
                                  min_step_samples=min_step_samples, log=log)
    log("online (prequential) distillation over the recording in time order ...")
    plan_kw = None
    if cost is not None and online_plans:
        plan_kw = {"home": home, "slots": slots, "cost": cost, "top_k": pset.top_k,
                   "tokens_per_rank": tokens_per_rank,
                   "window": slots * float(cost.transfer_time.max()) if window is None
                   else window}
    out["online"] = _online_part(make_predictors(), samples, full, tags, num_ranks=num_ranks,
                                 updates=online_updates, lr=online_lr, plan_kw=plan_kw)
    return {"predictors": pset, "results": out}


def _plan_part(pset, test: Samples, full, *, cost, home, num_ranks, tokens_per_rank, slots,
               window, layers, max_steps, min_step_samples, log) -> dict:
    k = pset.top_k
    steps, counts = np.unique(test.step, return_counts=True)
    steps = steps[counts >= min_step_samples]
    if steps.size > max_steps:  # evenly spaced, in time order
        steps = steps[np.linspace(0, steps.size - 1, max_steps).round().astype(int)]
    if window is None:
        window = slots * float(cost.transfer_time.max())
    layers = pset.layers if layers is None else layers
    result: dict = {"steps": steps.tolist(), "window_s": window, "slots": slots, "layers": {}}
    log(f"plan study on {steps.size} held-out steps x {len(layers)} layers ...")
    for layer in layers:
        sel = np.isin(test.step, steps)
        sub = test.subset(sel)
        truth_ids = true_ids(sub.logits, layer, k, pset[layer].select)
        truth = step_loads(truth_ids, sub.step, sub.src_rank, steps, num_ranks, pset.num_experts)
        preds = {
            "distilled": step_loads(predicted_ids(pset, sub.hidden, layer, k), sub.step,
                                    sub.src_rank, steps, num_ranks, pset.num_experts),
            "prior": step_loads(predicted_ids(pset, sub.hidden, layer, k, prior=True), sub.step,
                                sub.src_rank, steps, num_ranks, pset.num_experts),
        }
        preds.update(_history(full, test, layer, steps, truth, num_ranks, pset.num_experts, k))
        result["layers"][str(layer)] = plan_study(
            truth, preds, home=home, slots=slots, window=window, cost=cost,
            tokens_per_rank=tokens_per_rank, top_k=k)
    return result


def _history(full, samples: Samples, layer: int, steps: np.ndarray, truth: np.ndarray,
             num_ranks: int, num_experts: int, k: int) -> dict[str, np.ndarray]:
    """History predictions for `steps`: shares from the steps before each one (the full trace
    when given, else the sampled tokens), scaled to the truth's pairs per source rank."""
    out = {}
    if full is not None:
        # Reference, not a baseline: this very step's full-batch shares, scaled to the sampled
        # pairs. Its error is the sampling noise of the recording, the floor for any
        # distribution-level guess.
        same = np.stack([history_from_pair(np.stack([
            full[int(s), layer], truth[i]])) for i, s in enumerate(steps)])
        out["same_step_share"] = same
    for m in (1, 8):
        name = "last_step" if m == 1 else f"avg_{m}"
        pred = np.zeros_like(truth)
        for i, step in enumerate(steps):
            lo = max(0, int(step) - m)
            if full is not None:
                hist = (full[lo:int(step), layer].sum(axis=0) if step > 0
                        else np.ones((num_ranks, num_experts)))
            else:
                prev = np.arange(lo, int(step))
                rows = np.isin(samples.step, prev)
                ids = true_ids(samples.logits[rows], layer, k)
                hist = step_loads(ids, np.zeros(ids.shape[0], np.int64), samples.src_rank[rows],
                                  [0], num_ranks, num_experts)[0]
            seq = np.stack([hist, truth[i]])
            pred[i] = history_from_pair(seq)
        out[name] = pred
    return out


def history_from_pair(seq: np.ndarray) -> np.ndarray:
    """Shares of seq[0] scaled to seq[1]'s pairs per source rank (via history_prediction)."""
    from probe.predictor.baselines import history_prediction

    return history_prediction(seq, window=1)[1]


def _online_part(pset: PredictorSet, samples: Samples, full, all_tags, *, num_ranks: int,
                 updates: int, lr: float, plan_kw: dict | None = None) -> dict:
    """Prequential accuracy per step: predict the step, then distil on it.

    With plan_kw (home, slots, window, cost, tokens_per_rank, top_k), every step and layer also
    gets the IR ratio (vs the plan from the truth) of greedy plans from the online prediction
    and from the last-step and 8-step-average history.
    """
    distiller = OnlineDistiller(pset, lr)
    k = pset.top_k
    order = np.argsort(samples.step, kind="stable")
    steps, starts = np.unique(samples.step[order], return_index=True)
    bounds = np.append(starts, order.size)
    tags = None if all_tags is None else [all_tags[int(s)] for s in steps]
    acc = {layer: [] for layer in pset.layers}
    prior_acc = {layer: [] for layer in pset.layers}
    hist_err = {layer: [] for layer in pset.layers}
    floor_err = {layer: [] for layer in pset.layers}
    pred_err = {layer: [] for layer in pset.layers}
    prev_load: dict[int, np.ndarray | None] = {layer: None for layer in pset.layers}
    past: dict[int, list[np.ndarray]] = {layer: [] for layer in pset.layers}
    plan_ratio: dict[str, dict[int, list[float]]] = {
        name: {layer: [] for layer in pset.layers} for name in ("online", "last_step", "avg_8")}
    for i, _step in enumerate(steps):
        rows = order[bounds[i]:bounds[i + 1]]
        h = samples.hidden[rows]
        z = samples.logits[rows]
        src = samples.src_rank[rows]
        zero = np.zeros(rows.size, np.int64)
        for layer in pset.layers:
            truth = true_ids(z, layer, k, pset[layer].select)
            pred = predicted_ids(pset, h, layer, k)
            prior = predicted_ids(pset, h, layer, k, prior=True)
            acc[layer].append(topk_accuracy(pred, truth))
            prior_acc[layer].append(topk_accuracy(prior, truth))
            lt = step_loads(truth, zero, src, [0], num_ranks, pset.num_experts)[0]
            lp = step_loads(pred, zero, src, [0], num_ranks, pset.num_experts)[0]
            pred_err[layer].append(expert_load_error(lp, lt))
            if prev_load[layer] is not None:
                guess = history_from_pair(np.stack([prev_load[layer], lt]))
                hist_err[layer].append(expert_load_error(guess, lt))
            else:
                hist_err[layer].append(float("nan"))
            whole = full[int(_step), layer] if full is not None else lt
            floor_err[layer].append(
                expert_load_error(history_from_pair(np.stack([whole, lt])), lt))
            if plan_kw is not None:
                if past[layer]:
                    last = history_from_pair(np.stack([past[layer][-1], lt]))
                    avg = history_from_pair(np.stack([np.sum(past[layer][-8:], axis=0), lt]))
                    res = plan_study(lt[None], {"online": lp[None], "last_step": last[None],
                                                "avg_8": avg[None]}, **plan_kw)
                    for name in plan_ratio:
                        plan_ratio[name][layer].append(res[name]["ir_ratio"])
                else:
                    for name in plan_ratio:
                        plan_ratio[name][layer].append(float("nan"))
            past[layer].append(whole)
            prev_load[layer] = whole
        ht = torch.from_numpy(h).float()
        zt = torch.from_numpy(z).float()
        for _ in range(updates):
            distiller.update_all(ht, zt)
    return {"steps": steps.tolist(), "tags": tags,
            "samples_per_step": np.diff(bounds).tolist(),
            "acc": {str(la): v for la, v in acc.items()},
            "prior_acc": {str(la): v for la, v in prior_acc.items()},
            "pred_load_err": {str(la): v for la, v in pred_err.items()},
            "last_step_load_err": {str(la): v for la, v in hist_err.items()},
            "same_step_share_load_err": {str(la): v for la, v in floor_err.items()},
            "plan_ratio": None if plan_kw is None else {
                name: {str(la): v for la, v in by.items()} for name, by in plan_ratio.items()}}
