"""A fair replay of routing loads: EPLB, EPLB + LP, PROBE and an oracle at EQUAL extra slots.

Shape legend: N steps, L MoE layers of the trace, S source ranks (= G), E experts, K top-k,
b resident redundant slots per rank, p per-step replica slots per rank, k = b + p.

`simulate_fair(load, costs, slots=k, ...)` replays int [N, L, S, E] loads (the first `prior`
steps are history only) and scores every policy with the same calibrated costs
(probe.sim.costs: measured expert-time table, all-to-all with a latency term, attention per
layer type). Every policy has k extra expert slots per rank:

    static          sharded EP (experts e with e // (E / G) == g on rank g), locality first.
    eplb_stw        DeepSeek's rebalance_experts layout of R = E + k G physical experts
                    (global policy: one node), planned from the mean load of the last `window`
                    steps; the first layout from the `prior` steps before the measured ones;
                    re-planned every `interval` measured steps. Tokens split evenly over an
                    expert's physical copies (DeepSeek / SGLang static dispatch, no locality).
                    A re-plan moves weights stop-the-world: the largest per-rank received bytes
                    over the link, exposed once, at the re-plan step.
    eplb_async      the same, the re-plan's weights moved in the background (vLLM's asynchronous
                    rearrangement): the old layout serves until the copy is done, the copy using
                    the step's non-communication time (attention + expert compute) as its
                    hiding window; only what does not fit before the next re-plan is exposed.
    eplb_lp         eplb_async's layout plus a per-batch LP on the TRUE load (LPLB-style): HiGHS
                    minimises the largest rank time (calibrated alpha + beta n over the copies
                    each rank holds, fixed table time of single-copy experts) over the split of
                    every multi-copy expert's tokens; largest-remainder rounding; when the
                    rounded LP split scores worse than the even split under the measured table
                    the even split is kept. Its measured wall time is charged in series.
    probe_paper     the paper's PROBE: the greedy planner with the paper's rules (GreedyRules.paper)
                    on the sharded home, on the PREDICTED load, k replica slots per step, hiding
                    window = attention + static expert compute; the plan's split is applied to
                    the true load (probe.sim.policies.apply_plan). Predictor and planner time
                    charged (two modes, below); transfer beyond the real window exposed.
    probe_on_eplb_bBpP  EPLB's layout with b = k - p resident redundant slots (async re-plan as
                    eplb_async) plus p per-step replicas planned by the greedy (paper's rules)
                    from the prediction; dispatch-time token assignment on the TRUE load over
                    the copies present by water-filling (measured wall time charged in series).
                    Its replicas are planned against the window their transfer is charged
                    against (hiding_window: attention + static expert compute on the sharded
                    home, on the load planned on), in this family and the three below.
                    b = 0 .. k: at b = k, p = 0 the greedy places no replica and only moves
                    tokens between EPLB-k's copies (in this family and the three below; with
                    their own split, the plan and step-ahead ones replace EPLB's even split
                    by the greedy's, locality first, at no extra memory).
    probe_on_eplb_fit_bBpP  the same, the greedy and the water-filling on alpha, beta refitted
                    per step and layer to the measured expert table around the operating point
                    (FairCosts.fitted_cost of the heaviest predicted expert load) instead of
                    the datasheet line alpha + beta n.
    probe_on_eplb_wf  b = k, p = 0: eplb_async's layout, the dispatch-time water-filling on the
                    TRUE load (alpha, beta fitted at the true heaviest expert); no predictor or
                    planner; the assignment charged as for probe_on_eplb.
    probe_on_eplb_auto_moe  probe_on_eplb_fit with the b/p split chosen per layer from the
                    history steps before the measured ones by MoE time alone (history_split),
                    fixed for the run (the earlier rule, kept for comparison).
    probe_on_eplb_auto_replan  per layer the candidate (auto_candidates: the
                    probe_on_eplb_fit split b 0 p k, probe_paper (b 0 on the sharded home),
                    eplb_async = b k p 0 with the even split and nothing run,
                    probe_on_eplb_wf, static) with the lowest side-mode layer time incl.
                    every overhead it pays (side_layer_time: MoE, exposed predictor + GPU
                    planner, assignment, exposed transfer, stall). First pick: the `window`
                    history steps before the measured ones (history_times, their predictions
                    from the error model with another seed); re-picked at each re-plan from
                    the measured steps of the window before it (causal; at least the
                    max(1, window // 4) latest scored steps). A layer leaves the faster of
                    eplb_async and static on the window (IDLE_FALLBACKS, the fallbacks that
                    run nothing) only for a candidate at least STEP_MARGIN (1%) faster there
                    (the switching hysteresis below applied to the baselines too), and at a
                    re-pick a layer one of them serves moves to the other only if that one
                    is at least STEP_MARGIN faster (two baselines whose times differ by less
                    are not told apart by a few scored steps). Only b = 0 and b = k:
                    DeepSeek's own EPLB-b layouts of 0 < b < k hold other copies than
                    EPLB-k's (with nested layouts, `nested`, every EPLB-b of b < k is a
                    subset of EPLB-k, and auto_plus also picks the splits b = 1 .. k - 1,
                    p = k - b: nested_copies). Equal memory: a rank holds, per layer, the
                    layout of the candidate serving it and no other; a layer switched to a
                    candidate whose layout holds copies the serving one's does not (the
                    sharded home of static and the paper's PROBE, EPLB-0, a nested EPLB-b,
                    EPLB-k) fetches them behind that layer's window, what exceeds it charged
                    as exposed transfer and the bytes counted as moved (switch_charges); every
                    pick, per-step switch and swap counts that exposure against the candidate
                    it would switch to (switch_exposure: spread over the max(1, window // 4)
                    steps a pick is taken to serve; a one-step swap of the shift response or
                    the guard pays the fetch there and back within the steps it serves).
                    Charged on top of the served candidate (all auto policies, see "The auto
                    policies' own work" below).
    probe_on_eplb_auto  the PROBE-on-EPLB of the targets: probe_on_eplb_auto_replan's picks at
                    the start and at each re-plan; before every other measured step a layer
                    switches to the candidate with the lowest mean time over the last
                    max(1, window // 4) measured steps if that is at least STEP_MARGIN (1%)
                    below its current candidate's there (reacts to a shift within a few
                    steps instead of at the next re-plan); a layer on a candidate that runs
                    something returns to the faster idle fallback as soon as that is no
                    slower there (step_switch: the hysteresis guards the baseline, not a
                    pick whose gain, its exposure included, is gone).
    probe_on_eplb_plan_bBpP  probe_on_eplb_fit's plan (same replicas), the true tokens split
                    by the plan's own per-(source, expert) fractions (apply_plan; computed with
                    the plan on the side stream, locality first as the greedy splits): no
                    assignment in series; predictor + planner exposure as probe_on_eplb.
    probe_on_eplb_ahead_bBpP  EPLB-b + p per-step replicas planned ONE STEP AHEAD: the greedy
                    (paper's rules, fitted line) on the previous step's true load of the layer,
                    known once that step's dispatch of the layer ran; the plan's own split
                    applied to the true load. No predictor; the model's L layers are planned
                    one after another during the rest of the previous step, so only
                    max(0, L x planner - that step's non-communication time) / L per layer is
                    exposed (ahead_exposure); no assignment in series; transfer charged as
                    for probe_on_eplb.
    probe_on_eplb_auto_plus  probe_on_eplb_auto's picker (first pick on history, re-picks at
                    re-plans, per-step switches with STEP_MARGIN) over a larger candidate set:
                    auto_candidates(k, plus=True) adds probe_on_eplb_plan and
                    probe_on_eplb_ahead splits b 0 p k and b k p 0 (EPLB-k's layout, which
                    the fallbacks hold, with the greedy's token split). With the
                    predicted-load guard (guard=True; experiments.fair.run's default), a layer
                    served by a candidate without per-step slots (a fallback, or a split
                    b = k, p = 0: its layout does not follow the traffic) is watched at every
                    step where the guard's work fitted the dispatch of the step before: before
                    the layer's dispatch the candidate is scored on the step's prediction (as
                    auto_pred scores it), and where that time is at least GUARD_GROWTH (25%)
                    above its predicted time at the latest step the guard let it serve (for
                    a candidate newly picked, its time on the prediction of the latest scored
                    step, which that scoring had: one scoring more per re-picked layer, in the
                    background, not charged apart), the layer takes for this step the
                    adaptive candidate the shift response would pick (the fastest with
                    per-step slots on the latest scored steps) if that one's time there is
                    below the served one's predicted time; the picks go on as if the served
                    one had served. Charged at every watched
                    layer and step: the predictor and one scoring (one water-filling kernel
                    time, the run's median) on the side stream, max(0, pred + scoring -
                    dispatch) (the layer's background prediction is then not charged again;
                    where the served split makes the prediction itself, a plan split b = k,
                    its predictor is charged twice: conservative);
                    where it swapped, the candidate pays its own predictor and planner as
                    whenever it serves, plus the scoring; host mode: both in series. A step
                    where the guard swapped counts as a change of the traffic for the
                    event-triggered rescoring (below), whose "worth it" test then reads the
                    swapped candidates' measured times.
    probe_on_eplb_auto_pred  probe_on_eplb_auto_plus's pick, overridden per step and layer on
                    the step's PREDICTED load (never the true one): every auto_plus candidate
                    is scored as side_layer_time scores the truth, its split applied to the
                    prediction, and the best replaces auto_plus's pick when it is at least
                    STEP_MARGIN (1%) faster there. Charged every step, even while an EPLB
                    fallback serves, instead of the candidate's own predictor + planner: the
                    predictor, one host round trip, the host plans of the fit split (shared
                    by the plan split b 0), the other plan splits and the paper's PROBE
                    (scoring_work) and one water-filling kernel time (the run's median) per
                    candidate scored, on the side stream beyond the dispatch; in the
                    background (ahead_exposure) the step-ahead plans and
                    auto_plus's scoring of every candidate on the true load; the largest
                    re-plan stall of all candidates (it keeps every candidate layout current).
    oracle          perfect knowledge, zero cost: per layer the best (lowest MoE time) of every
                    policy's plan and of the greedy planned on the TRUE load over each layout
                    (sharded + k per-step slots, EPLB-b + p per-step slots, b = 0 .. k) with
                    the water-filling split or the greedy's own. Never worse than any policy
                    on MoE time by construction; it is a heuristic, not a proven optimum.

Overheads of PROBE per layer, two modes (both reported):
    host   predictor + planner on the host in series: pred + planner_kernel x host_factor.
    side   predictor + planner on a side stream during the dispatch all-to-all:
           max(0, pred + planner - dispatch), planner = FairCosts.side_planner_seconds():
           by default the faster real way to plan one layer (the host path plus a host
           round trip, or the H200-measured GPU kernel's one-layer latency); the
           dispatch-time assignment (in series) charged FairCosts.assign_side_seconds(): by
           default the faster of the host kernel's wall time plus a round trip and the GPU
           kernel's measured one-layer latency (assign_time "gpu": the per-layer time of a
           multi-layer launch, optimistic; "host": the host wall time alone).
The auto policies' own work (auto_replan, auto, auto_plus; auto_pred as above), charged on top
of the candidate that serves: (a) their pick needs every candidate's time on every measured
step, so after each step every candidate is planned (the fit split and the paper's PROBE on the
prediction, the step-ahead split on the step's load: host plans, side mode at the side-stream
planner time) and scored on the true load (one water-filling kernel time each, the run's
median), for the model's L layers in the background: max(0, L x that work - the step's
non-communication time) / L per layer (ahead_exposure; a served step-ahead split's own plan is
one of them, so its own exposure is replaced); (b) the predictor: where the served candidate
consumes the prediction (a fit or plan split, the paper's PROBE) it pays it as that candidate
does (on the side stream beyond the dispatch; host mode: in series); where it does not (a
fallback, a step-ahead split), the layer's prediction is needed only for the scoring's plans,
so it is made in the background as part of the scoring (layer l's prediction needs only layer
l-1's router input of that step) and charged there, its measured seconds added to (a)'s work in
ahead_exposure, nothing on the side stream or in series; (c) memory: the layouts of every
candidate (EPLB-k and the double-buffered p = k per-step slots) and the largest re-plan stall
of all candidates at every step. With `score_every` = k > 1 (default 1: the above;
experiments.fair.run's default is "auto") they score only steps 0, k, 2k, ..., one scoring
spread over the k steps from its step and done k steps later (scored_steps): picks change only
then and are made from the scored steps alone (between scorings each layer keeps its pick;
auto_replan re-picks at re-plans from the scorings done), each step is charged ahead_exposure
of 1/k of the scoring, the background predictions of the scored step included (plus, where a
step-ahead split serves, its own plan, made every step, beyond the scoring's 1/k share of it),
and auto_pred's base pick is auto_plus's, its background holding 1/k of auto_plus's scoring;
(c) unchanged. score_every="auto": per candidate pool the smallest k at which that charge is
zero at every measured step even if every layer's prediction is made in the background (the
largest predictor time of the run added to the scoring's work), from the run's water-filling
median and step windows (fitting_score_every). Event-triggered rescoring (rescore=True;
experiments.fair.run's default, simulate_fair's is False; with k > 1, auto and auto_plus only):
after each step's dispatch the runtime has, for free, the step's routing counts and the
measured MoE time of the layers it served; when the step's traffic changed since the latest
scored step before it (the mean per-layer total-variation distance of the expert loads,
traffic_distance, or the served candidates' summed MoE time beyond the largest change
between two history-window steps at most k apart, rescore_thresholds, the time at least
STEP_MARGIN) and the change is worth a scoring (what a re-pick is taken to win back per step,
for all model layers: the served layers' MoE time growth since the scored step, but no more
than the growth of their compute excess, the largest rank's compute over the mean rank's,
since the all-to-all and the mean rank's compute are the traffic's own; times the steps until
the first every-k scoring that would see the change is done; it must exceed the extra
exposure of the whole scoring at the next step: its whole work instead of 1/k against the
window the step leaves), the next step is scored at once: its scoring (predictions of its
non-predicting layers included) spread over the m steps from it that maximise that saving
minus the exposure (trigger_length: 1 where the whole scoring fits one step's window or a
step later costs more than its exposure; more where spreading hides it), 1/m of it charged in
each of their backgrounds (background_exposure with share 1/m), the running every-k scoring
dropped (the part already done was charged), the every-k schedule restarted when it is done,
and the picks made from the scorings from it on. Shift response: from the step a triggered
scoring starts until its pick, each layer an idle fallback serves (its layout planned on the
traffic before the change) takes the adaptive candidate (per-step slots, p >= 1, planned every
step: fit, plan, step-ahead, the paper's PROBE) fastest on the scored steps the latest pick
used (before any, on the history window) if that candidate's time there is at least
STEP_MARGIN below the fallback's at the changed step (measured: it served that step; an
adaptive candidate follows the traffic, the fallback's layout does not, so the one's time
before the change stands for its time after it), and the triggered scoring's pick then keeps
or leaves it like any other (step_switch); nothing more runs for it, the candidate's own
predictor and planner are charged as whenever it serves. The thresholds come from the history
window alone and each decision from the step just run and the scored step, so it uses no later
step. The picker scores every candidate with the background exposure the charge gives it
(pick_exposure: a step-ahead split's own plan beyond the scoring's share and a fallback's
background predictions share the step's spare time with the scoring), so pick and charge
agree where the split's plan and the scoring do not fit together (assuming the candidate
serves every layer); that exposure enters a candidate's score as its mean over every step
from the first scored step the pick uses to the step before the pick (their windows and
scored steps' predictions are known by then), not at the scored steps alone, at the share
the pick will serve under: the every-k scoring's 1/k (a triggered scoring's larger share is
paid once, at its own steps, by whichever candidate serves; scoring it into a pick charged a
fallback's background predictions as if they recurred). The first pick, from the history
window, adds the exposure of the first measured step (its window L x attention, share 1/k),
the step-ahead split's plan included, in place of that plan alone against the window.
Layer time = attention + MoE (dispatch + max compute + combine) + exposed overheads; step
time = model layers x mean layer time + the step's stop-the-world stall. Dense layers,
embedding and LM head are not modelled.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from probe.placement import sharded_home
from probe.planner.check import check_plan, transfer_times
from probe.planner.deepseek_eplb import eplb_copies
from probe.planner.eplb import even_split
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.greedy_rules import GreedyRules
from probe.planner.highs_base import highs_lp, new_highs
from probe.planner.solve import solve
from probe.planner.static import static_assignment
from probe.planner.window import default_window
from probe.sim.costs import FairCosts
from probe.sim.policies import apply_plan
from probe.sim.predict import make_predictor, replay_predictor
from probe.sim.rounding import split_by_fractions

__all__ = ["FALLBACKS", "IDLE_FALLBACKS", "FairResult", "auto_candidates",
           "background_exposure", "eplb_copies", "fitting_score_every", "history_split",
           "history_times", "lp_split", "nested_copies", "pick_by_time", "pick_exposure",
           "policy_names", "rescore_thresholds", "rule_split", "scored_steps",
           "side_layer_time", "simulate_fair", "split_by_fractions", "step_switch",
           "switch_charges", "switch_fetch", "traffic_distance", "trigger_length",
           "waterfill_split"]


def paper_options() -> dict:
    """Keyword options that make solve(..., "greedy") run the paper's Algorithm 1 rules."""
    return {"rules": GreedyRules.paper()}


def policy_names(slots: int) -> list[str]:
    """Policies simulated at `slots` extra slots per rank (probe_on_eplb, probe_on_eplb_fit,
    probe_on_eplb_plan and probe_on_eplb_ahead for every b + p = k, p = 0 included: EPLB-k's
    layout with the planner's token split and no per-step replica), probe_on_eplb_wf
    (b = k, p = 0), probe_on_eplb_auto_moe, probe_on_eplb_auto_replan, probe_on_eplb_auto,
    probe_on_eplb_auto_plus, probe_on_eplb_auto_pred)."""
    families = [f"probe_on_eplb_{f}b{b}p{slots - b}" for f in ("", "fit_", "plan_", "ahead_")
                for b in range(slots + 1)]
    return ["static", "eplb_stw", "eplb_async", "eplb_lp", "probe_paper", *families,
            "probe_on_eplb_wf", "probe_on_eplb_auto_moe", "probe_on_eplb_auto_replan",
            "probe_on_eplb_auto", "probe_on_eplb_auto_plus", "probe_on_eplb_auto_pred",
            "oracle"]


# The auto policy's fallback candidates (besides every probe_on_eplb_fit split and the paper's
# PROBE, b = 0 on the sharded home): EPLB's async layout with its even split (no predictor,
# planner or assignment run: eplb_async exactly), the same layout water-filled on the true
# load (probe_on_eplb_wf) and static EP.
FALLBACKS = ("eplb_async", "probe_on_eplb_wf", "static")
# The fallbacks that run nothing (the baselines' own policies): the picker leaves the faster
# of them only for a candidate at least STEP_MARGIN faster, moves from one to the other only
# for as much, and a layer on any other candidate returns to the faster as soon as that
# candidate is no faster (step_switch).
IDLE_FALLBACKS = ("eplb_async", "static")
# probe_on_eplb_auto's hysteresis: between re-plans a layer switches candidate only for
# one at least 1% faster over the last steps (declared, checked on seed-1 traces only).
STEP_MARGIN = 0.01
# The predicted-load guard (simulate_fair's `guard`): a layer served by a candidate without
# per-step slots takes its adaptive candidate for a step whose prediction gives the served one
# a time at least GUARD_GROWTH above its predicted time at the latest step the guard let it
# serve (a shift; set before any run, not fitted to the study's results).
GUARD_GROWTH = 0.25


def auto_candidates(slots: int, plus: bool = False, nested: bool = False) -> list[str]:
    """The policies probe_on_eplb_auto(_replan) pick from per layer: the fit split b = 0
    (p = k per-step slots on EPLB-0, with `nested` EPLB-k's subset), the paper's PROBE (on
    the sharded home), then FALLBACKS; with `plus`
    (probe_on_eplb_auto_plus) also the probe_on_eplb_plan and probe_on_eplb_ahead splits
    b = 0 and b = k (p = 0: EPLB-k's layout, which the fallbacks hold, with the greedy's own
    token split on the prediction or the step before's load instead of EPLB's even split),
    before the fallbacks, and with `nested` (k >= 2) the fit, plan and step-ahead splits
    b = 1 .. k - 1, p = k - b too (fewest resident copies first; a fit split shares its
    plan with the plan split of its b, p: one more score each, no more plans).

    Without `nested` only b = 0 and b = k (the fallbacks' EPLB-k layout): DeepSeek's own
    layouts of b = 1 .. k - 1 hold other copies than EPLB-k's, and a rank holds one layout
    per layer (equal memory, module docstring), so every switch between them would fetch
    copies. With `nested` (simulate_fair's nested layouts) every EPLB-b, b < k, is EPLB-k
    with k - b redundant copies per rank dropped (nested_copies), a subset of what EPLB-k
    holds, and p = k - b per-step slots are no more than the k that b = 0 already
    double-buffers, so every split fits the same memory and a switch fetches at most the
    dropped copies back (switch_charges)."""
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
        raise ValueError(f"slots must be an int >= 1, got {slots!r}")
    extra = ([f"probe_on_eplb_{f}b0p{slots}" for f in ("plan_", "ahead_")] if plus else [])
    if plus and nested and slots > 1:
        extra += [f"probe_on_eplb_{f}b{b}p{slots - b}" for b in range(1, slots)
                  for f in ("fit_", "plan_", "ahead_")]
    if plus:  # EPLB-k's layout, the planner's token split, no per-step replica
        extra += [f"probe_on_eplb_{f}b{slots}p0" for f in ("plan_", "ahead_")]
    return ([f"probe_on_eplb_fit_b0p{slots}", "probe_paper"] + extra + list(FALLBACKS))


def nested_copies(copies: np.ndarray, weight: np.ndarray, drop: int) -> np.ndarray:
    """int64 [L, G, E]: the layout `copies` (int [L, G, E], e.g. EPLB-k's) with `drop`
    redundant copies removed from every rank, a subset of it (what a runtime holding EPLB-k
    can serve without fetching anything). Per layer it removes one copy at a time: from the
    rank that still has to drop and has the fewest copies it may drop (ties: the lower rank;
    so that no rank is left holding only single copies by the others' drops), the copy that
    leaves its expert the lowest load per copy, weight / (copies - 1), over the experts with
    more than one copy in the layer (weight float [L, E], e.g. the history window's mean
    load; ties: the lower expert id). A rank left short all the same keeps more than
    E / G + k - drop; the caller reads the slots actually held from the result."""
    copies = np.asarray(copies)
    weight = np.asarray(weight, dtype=np.float64)
    if copies.ndim != 3 or weight.shape != (copies.shape[0], copies.shape[2]):
        raise ValueError(f"copies must be int [L, G, E] and weight float [L, E], got "
                         f"{copies.shape} and {weight.shape}")
    if np.any(copies < 0) or np.any(copies.sum(axis=1) < 1):
        raise ValueError("copies must be >= 0 with every expert held at least once")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("weight must be finite and >= 0")
    if isinstance(drop, bool) or not isinstance(drop, (int, np.integer)) or drop < 0:
        raise ValueError(f"drop must be an int >= 0, got {drop!r}")
    out = copies.astype(np.int64)  # a copy
    for layer in range(out.shape[0]):
        total = out[layer].sum(axis=0)  # [E]
        need = np.full(out.shape[1], drop)
        while True:
            movable = (out[layer] > 0) & (total > 1)[None, :]  # [G, E]
            options = np.where(need > 0, movable.sum(axis=1), np.iinfo(np.int64).max)
            g = int(np.argmin(options))  # the rank with the fewest copies it may drop
            if need[g] == 0:
                break
            if options[g] == 0:  # short: it keeps more than asked
                need[g] = 0
                continue
            candidates = np.flatnonzero(movable[g])
            after = weight[layer, candidates] / (total[candidates] - 1)
            e = candidates[int(np.argmin(after))]  # argmin: the first of ties
            out[layer, g, e] -= 1
            total[e] -= 1
            need[g] -= 1
    return out


def switch_fetch(new: np.ndarray, old: np.ndarray, window: float, expert_bytes: float,
                 link_bandwidth: float) -> tuple[float, np.ndarray]:
    """(exposed seconds, copies fetched per rank int64 [G]) of a rank moving one layer from
    the layout `old` to `new` (int [G, E] copies each): it fetches the copies `new` holds
    beyond `old` (dropping is free) over the link, the rank fetching the most setting the
    time, behind `window` seconds. The one formula that switch_charges charges and the auto
    pickers weigh (switch_exposure)."""
    grow = np.maximum(np.asarray(new, np.int64) - np.asarray(old, np.int64), 0).sum(axis=1)
    seconds = float(grow.max()) * expert_bytes / link_bandwidth
    return max(0.0, seconds - float(window)), grow


def switch_charges(served, base, windows: np.ndarray, expert_bytes: float,
                   link_bandwidth: float, layer_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """What an auto policy pays to move a layer from one candidate's resident layout to
    another's: each rank holds, per layer, only the layout of the candidate serving it (the
    sharded home for static and the paper's PROBE, DeepSeek's EPLB-0 or a nested subset of
    EPLB-k for b < k, EPLB-k itself for the fallbacks), so at a step where the serving
    candidate's layout holds copies the previous one's did not, the rank fetches them (over
    the link, behind that layer's window: attention + the layer's compute, `windows` float
    [N, L] seconds), the rank fetching the most setting the time. Dropping copies is free; a
    candidate's own per-step replicas are its own transfer; both layouts are read at the
    step of the switch (the EPLB layouts as their re-plans left them then: those moves are
    the re-plans' own, charged as such). served: names [N][L]; base(name, n): int [L, G, E]
    the copies that candidate's layout holds at step n. Returns (exposed seconds float
    [N, L], bytes fetched float [N], all ranks, over all model layers)."""
    num_steps = len(served)
    exposed = np.zeros((num_steps, len(served[0]) if num_steps else 0))
    moved = np.zeros(num_steps)
    for n in range(1, num_steps):
        for layer, (now, before) in enumerate(zip(served[n], served[n - 1], strict=True)):
            if now == before:
                continue
            exposed[n, layer], grow = switch_fetch(base(now, n)[layer], base(before, n)[layer],
                                                   windows[n, layer], expert_bytes,
                                                   link_bandwidth)
            moved[n] += float(grow.sum()) * expert_bytes * layer_scale
    return exposed, moved


def scoring_work(candidates: list[str]) -> tuple[int, int, int]:
    """(plans, step-ahead plans, scores) that keeping every candidate's time current costs per
    layer and step: one plan per fit or plan split (a fit and a plan split of one b, p share
    it) and the paper's PROBE, one step-ahead plan per ahead split, and one score (a split of
    the true tokens over the candidate's copies and its MoE time) per candidate."""
    splits = {q.split("_")[-1] for q in candidates
              if q.startswith(("probe_on_eplb_fit_", "probe_on_eplb_plan_"))}
    plans = len(splits) + ("probe_paper" in candidates)
    ahead = sum(q.startswith("probe_on_eplb_ahead_") for q in candidates)
    return plans, ahead, len(candidates)


def ahead_exposure(planner_s: float, window_s: float, layers: int) -> float:
    """Exposed seconds PER LAYER of plans made one step ahead (probe_on_eplb_ahead): each of
    the model's `layers` MoE layers is planned (`planner_s` seconds each, one after another)
    on its previous-step counts during the rest of that step, so all of them share one step's
    `window_s` seconds of non-communication time: max(0, layers x planner_s - window_s),
    spread evenly over the layers."""
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
        raise ValueError(f"layers must be an int >= 1, got {layers!r}")
    return max(0.0, layers * float(planner_s) - float(window_s)) / layers


def scored_steps(n: int, score_every: int) -> np.ndarray:
    """int [M]: the measured steps whose scoring is done before step `n` when the auto
    policies score every `score_every` steps: steps 0, k, 2k, ... (k = score_every), the
    scoring of step s spread over the k steps from s on and done by step s + k."""
    return np.arange(0, n - score_every + 1, score_every)


def fitting_score_every(work_s: float, windows, layers: int) -> int:
    """The smallest scoring interval k >= 1 at which one scoring's background work
    (`work_s` seconds per layer, for each of the model's `layers` layers), spread over k
    steps with 1/k of it against each step's non-communication time (`windows`, seconds per
    step), is exposed at no step: ahead_exposure(work_s / k, w, layers) == 0 for every w."""
    windows = np.asarray(windows, dtype=np.float64)
    if windows.size == 0 or not np.all(windows > 0):
        raise ValueError(f"windows must be positive seconds, got {windows!r}")
    if not work_s >= 0:
        raise ValueError(f"work_s must be >= 0 seconds, got {work_s!r}")

    def fits(k: int) -> bool:
        return all(ahead_exposure(work_s / k, w, layers) == 0.0 for w in windows)

    k = max(1, math.ceil(layers * work_s / float(windows.min())))
    while not fits(k):  # rounding: the charge's own arithmetic decides
        k += 1
    while k > 1 and fits(k - 1):
        k -= 1
    return k


def traffic_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The mean over layers of the total-variation distance between two steps' expert-load
    distributions: a, b int [L, S, E] (or [L, E], already summed over source ranks); per
    layer 0.5 x sum over experts |a_e / sum(a) - b_e / sum(b)|, in [0, 1] (a layer with no
    tokens counts as uniform)."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"a and b must be loads of one shape [L, S, E] or [L, E], got "
                         f"{a.shape} and {b.shape}")
    if a.ndim == 3:
        a, b = a.sum(axis=1), b.sum(axis=1)

    def dist(x):
        total = x.sum(axis=1, keepdims=True)
        return np.where(total > 0, x / np.where(total > 0, total, 1.0), 1.0 / x.shape[1])

    return float(0.5 * np.abs(dist(a) - dist(b)).sum(axis=1).mean())


def rescore_thresholds(history: np.ndarray, history_moe: np.ndarray,
                       score_every: int) -> tuple[float, float]:
    """(distance, time): the event-triggered rescoring's thresholds, from the history window
    alone (the steps before the first measured one): the largest traffic_distance between
    two history steps at most `score_every` steps apart (a measured step is compared with a
    scored step at most that far back), and the largest relative increase of the MoE time
    `history_moe` (float [H], seconds per step, e.g. EPLB's) between two such steps, at least
    STEP_MARGIN. With fewer than two history steps: (inf, inf), nothing triggers."""
    history = np.asarray(history)
    history_moe = np.asarray(history_moe, dtype=np.float64)
    if history.ndim != 4 or history_moe.shape != history.shape[:1]:
        raise ValueError(f"history must be int [H, L, S, E] and history_moe float [H], got "
                         f"{history.shape} and {history_moe.shape}")
    if isinstance(score_every, bool) or not isinstance(score_every, (int, np.integer)) \
            or score_every < 1:
        raise ValueError(f"score_every must be an int >= 1, got {score_every!r}")
    if history.shape[0] < 2:
        return math.inf, math.inf
    summed = history.sum(axis=2)
    pairs = [(i, j) for j in range(history.shape[0]) for i in range(max(0, j - score_every), j)]
    distance = max(traffic_distance(summed[j], summed[i]) for i, j in pairs)
    grow = max(history_moe[j] / history_moe[i] - 1.0 for i, j in pairs if history_moe[i] > 0)
    return distance, max(STEP_MARGIN, grow)


def background_exposure(work_s: float, share: float, window_s: float, layers: int, *,
                        pred_s: float = 0.0, own_s: float = 0.0) -> float:
    """Exposed seconds per layer of an auto policy's background at one step: `share` (1/k
    while an every-k scoring runs, 1 for a triggered one) of one scoring (`work_s` seconds per
    layer, plus `pred_s` per layer of the scored step's predictions made in it), and `own_s`
    per layer of a served step-ahead split's own plans beyond the scoring's share of them,
    for the model's `layers` layers against the step's `window_s` seconds of
    non-communication time (ahead_exposure)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    return ahead_exposure(share * (work_s + pred_s) + own_s, window_s, layers)


def trigger_length(grown_s: float, steps: int, work_s: float, window_s: float,
                   score_every: int, layers: int) -> int:
    """The number of steps m over which a triggered rescoring is spread, or 0 for none.

    A traffic change seen after a step's dispatch is otherwise first seen by an every-k
    scoring (k = score_every) done `steps` steps after the next one; a scoring triggered at
    the next step and spread over m steps (1/m of its work, `work_s` seconds per layer, in
    each step's background) is done after m of them, so it saves steps - m steps of
    `grown_s` seconds (what a re-pick is taken to win back per step, all model layers),
    and costs at each of its m steps layers x (background_exposure at share 1/m - at 1/k)
    against `window_s` seconds of non-communication time. Whether to trigger is decided as
    for a whole scoring at the next step (m = 1: its saving must exceed its cost; `grown_s`
    is an upper bound, so a change must be worth even that); a triggered one is then spread
    over the m in 1 .. min(k, steps) - 1 that maximises saving minus cost (ties: the fewer
    steps): a scoring that does not fit one step's window is spread over more steps rather
    than exposed where the steps that costs are worth less than the exposure."""
    if not steps > 1 or not score_every > 1:
        return 0

    def net(m: int) -> float:
        cost = m * layers * (background_exposure(work_s, 1.0 / m, window_s, layers)
                             - background_exposure(work_s, 1.0 / score_every, window_s,
                                                   layers))
        return grown_s * (steps - m) - cost

    best, best_net = 1, net(1)
    if not best_net > 0.0:
        return 0
    for m in range(2, min(score_every, steps)):
        value = net(m)
        if value > best_net:
            best, best_net = m, value
    return best


def pick_exposure(candidate: str, work_s: float, share: float, window_s: float, layers: int,
                  *, planner_s: float, pred_s: float) -> float:
    """The background exposure per layer the auto policies' charge adds when `candidate`
    serves every layer at a step, over the scoring's own (background_exposure): the picker
    scores each candidate with it, so that pick and charge agree. A step-ahead split
    (probe_on_eplb_ahead_*) plans every step, (1 - share) x `planner_s` beyond the
    scoring's share of its plan, and a candidate that does not consume the prediction (the
    step-ahead split, a fallback) leaves the scored step's prediction (`pred_s` per layer)
    to the background; both share the step's spare time with the scoring, so where they and
    the scoring together do not fit the candidate is scored with that exposure. A fit or
    plan split and the paper's PROBE add nothing here (they pay the predictor beyond the
    dispatch themselves)."""
    ahead = candidate.startswith("probe_on_eplb_ahead_")
    predicts = candidate == "probe_paper" or candidate.startswith(
        ("probe_on_eplb_fit_", "probe_on_eplb_plan_"))
    base = background_exposure(work_s, share, window_s, layers)
    mine = background_exposure(work_s, share, window_s, layers,
                               pred_s=0.0 if predicts else pred_s,
                               own_s=(1.0 - share) * planner_s if ahead else 0.0)
    return mine - base


def side_layer_time(metrics: dict, stall: np.ndarray, model_layers: int,
                    attention: float) -> np.ndarray:
    """float64 [N, L]: side-mode layer time of one policy's metrics (attention + MoE + exposed
    transfer + assignment charged in side mode + side-stream exposure) plus its stop-the-world
    stall spread over the model's layers: the score the auto policies pick by."""
    return (attention + metrics["moe"] + metrics["transfer"] + metrics["solve_side"]
            + metrics["side"] + stall[:, None] / model_layers)


def pick_by_time(times: dict[str, np.ndarray], candidates: list[str], *,
                 prefer: str | tuple[str, ...] | None = None,
                 margin: float = 0.0, current: list[str] | None = None) -> list[str]:
    """Per layer the candidate with the lowest mean time (float64 [H, L] each) over the rows
    given; ties go to the earlier candidate. With `prefer` (one of the candidates, or a tuple
    of them: per layer the one of these with the lowest mean time, ties to the earlier), a
    layer takes another candidate only if its mean time is at least `margin` (a fraction)
    below prefer's. With `current` (the candidate serving each layer), a layer served by one
    of the preferred keeps it as its preferred one unless another preferred is at least
    `margin` faster (the hysteresis between the preferred themselves: two fallbacks whose
    times differ by less are not told apart by a few noisy rows)."""
    preferred = (prefer,) if isinstance(prefer, str) else tuple(prefer or ())
    if prefer is not None and not preferred:
        raise ValueError("prefer must name at least one candidate")
    for name in preferred:
        if name not in candidates:
            raise ValueError(f"prefer {name!r} is not among the candidates {candidates}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    num_layers = next(iter(times.values())).shape[1]

    def lowest(names, layer):
        best, best_t = names[0], math.inf
        for name in names:
            t = float(times[name][:, layer].mean())
            if t < best_t - 1e-15:
                best, best_t = name, t
        return best, best_t

    if current is not None and len(current) != num_layers:
        raise ValueError(f"current names {len(current)} layers, the times {num_layers}")
    out = []
    for layer in range(num_layers):
        best, best_t = lowest(candidates, layer)
        if preferred:
            home, home_t = lowest(preferred, layer)
            now = current[layer] if current is not None else None
            if now in preferred and now != home:
                now_t = float(times[now][:, layer].mean())
                if not home_t < (1.0 - margin) * now_t:
                    home, home_t = now, now_t
            if best in preferred or not best_t < (1.0 - margin) * home_t:
                best = home
        out.append(best)
    return out


def step_switch(times: dict[str, np.ndarray], current: list[str], candidates: list[str], *,
                margin: float = 0.0) -> list[str]:
    """Per layer the candidate to serve from now on, given the one serving (`current`) and
    the mean times over the rows given (float64 [H, L] each): the pick (pick_by_time,
    preferring the faster of IDLE_FALLBACKS, at least `margin` gained to leave it) if it is
    at least `margin` faster than the current one; otherwise a layer served by a candidate
    that runs something (not in IDLE_FALLBACKS) returns to the faster idle fallback as soon
    as that is no slower (the candidate's net gain over it, its own exposure included, is
    gone: the hysteresis guards the fallback, not a pick that stopped paying); otherwise the
    layer keeps its candidate."""
    fallbacks = tuple(q for q in IDLE_FALLBACKS if q in candidates)
    picks = pick_by_time(times, candidates, prefer=fallbacks or None, margin=margin)
    out = []
    for layer, (now, best) in enumerate(zip(current, picks, strict=True)):
        t_now, t_best = times[now][:, layer].mean(), times[best][:, layer].mean()
        if t_best < (1.0 - margin) * t_now:
            out.append(best)
            continue
        if fallbacks and now not in fallbacks:
            home = min(fallbacks, key=lambda q, layer=layer: times[q][:, layer].mean())
            if times[home][:, layer].mean() <= t_now:
                out.append(home)
                continue
        out.append(now)
    return out


def hiding_window(costs: FairCosts, load: np.ndarray, home: np.ndarray,
                  attention: float) -> np.ndarray:
    """float [G]: the seconds each rank hides replica transfers behind, as the simulation
    charges a plan's transfer (`real_window`): attention plus the rank's expert compute under
    static EP on `load` (the measured table). PROBE-on-EPLB plans against this window on its
    prediction (or the step-ahead load), so a plan never counts on hiding time that its charge
    does not grant; the paper's PROBE keeps the paper's window (`default_window`).

    load: int [S, E]; home: bool [G, E] the sharded home."""
    static = static_assignment(load, home).sum(axis=0).T
    return attention + costs.compute_per_rank(static, home.astype(np.int64))


def rule_split(slots: int) -> tuple[int, int]:
    """(b, p): the b/p split fixed before a run: p = max(1, k // 2) per-step slots."""
    p = max(1, slots // 2)
    return slots - p, p


def history_split(history: np.ndarray, layouts: dict, costs: FairCosts, slots: int,
                  attention: float) -> list[tuple[int, int]]:
    """(b, p) per layer chosen from history: for each split, the fitted-table greedy planned on
    each history step's load (taken as its own prediction) over the EPLB-b layout, water-filled
    and scored with the measured table; the split with the lowest mean MoE time per layer.

    history: int [H, L, S, E] loads before the measured steps; layouts: b -> copies
    int [L, G, E]."""
    out = []
    home = sharded_home(history.shape[3], history.shape[2])
    for layer in range(history.shape[1]):
        loads = history[:, layer].astype(np.int64)
        windows = [hiding_window(costs, load, home, attention) for load in loads]
        best, best_t = rule_split(slots), math.inf
        for b in range(slots):
            p = slots - b
            copies = layouts[b][layer]
            base = copies > 0
            total = 0.0
            for load, win in zip(loads, windows, strict=True):
                cost = costs.fitted_cost(load.sum(axis=0).max())
                result = solve(BalanceProblem(load, base, p, win, cost), "greedy", check=False,
                               **paper_options())
                holds = copies + _plan(result).replicas
                total += costs.moe_seconds(waterfill_split(load, holds, costs, cost=cost),
                                           holds)["moe"]
            if total < best_t - 1e-12:
                best, best_t = (b, p), total
        out.append(best)
    return out


def history_times(history: np.ndarray, previous: np.ndarray | None, layouts: dict,
                  costs: FairCosts, slots: int, attention: float, predict,
                  names: list[str] | None = None, wf_time: float | None = None) -> dict:
    """Side-mode layer times of every auto candidate on the history steps, for the choice of
    probe_on_eplb_auto_replan before the first measured step: {candidate: float64 [H, L]}.

    history: int [H, L, S, E] loads; previous: int [L, S, E] the step before them (None: the
    first history step predicts itself); layouts: b -> copies int [L, G, E] (the EPLB layouts
    that will serve the first measured steps); predict(true, previous, h, layer) -> int [S, E]
    a predictor for the history steps. Every candidate is costed as in simulate_fair: MoE
    time on the measured table, plus (fit splits) the side-stream exposure of predictor +
    planner (FairCosts.side_planner_seconds) beyond the dispatch and the exposed replica
    transfer, plus (fit splits and probe_on_eplb_wf) the dispatch-time assignment charged in
    side mode (FairCosts.assign_side_seconds of the water-filling kernel's median wall time
    here); probe_on_eplb_plan splits: the fit plan with its own split (no assignment),
    probe_on_eplb_ahead splits: planned on the step before's load, the model's layers'
    planner time beyond L x attention, per layer (ahead_exposure), no predictor, no
    assignment. names: the candidates (default auto_candidates(slots, plus=True)); the fit,
    plan and step-ahead splits of every b among them are planned. wf_time: the
    water-filling's seconds per call the assignment charge is made of (None: its measured
    median here; simulate_fair passes its fixed `solve_time`, so the first pick does not
    depend on this host's timing where the run's charges do not)."""
    num_steps, num_layers, num_ranks, num_experts = history.shape
    home = sharded_home(num_experts, num_ranks)
    home_int = home.astype(np.int64)
    names = auto_candidates(slots, plus=True) if names is None else list(names)
    fit_bs = sorted({_split_of(q, slots)[0] for q in names if q.startswith(
        ("probe_on_eplb_fit_", "probe_on_eplb_plan_", "probe_on_eplb_ahead_"))})
    # every split of those b is planned (the plan and ahead splits need the fit's plan); the
    # splits that are not candidates are dropped at the end
    out = {name: np.zeros((num_steps, num_layers)) for name in [
        *names, *(f"probe_on_eplb_{f}b{b}p{slots - b}" for f in ("fit_", "plan_", "ahead_")
                  for b in fit_bs)]}
    ahead_side = ahead_exposure(costs.side_planner_seconds(),
                                costs.model.num_layers * attention, costs.model.num_layers)
    planner_side = costs.side_planner_seconds()
    planner = costs.planner_cost
    wf_seconds: list[float] = []
    wf_cells = []  # (name, h, layer) charged the host water-filling time when assign is host
    for h in range(num_steps):
        for layer in range(num_layers):
            true = history[h, layer].astype(np.int64)
            prev = history[h - 1, layer] if h > 0 else (
                previous[layer] if previous is not None else true)
            pred = np.asarray(predict(true, prev, h, layer), np.int64)
            tpr = float(true.sum(axis=1).mean() / costs.model.top_k)
            pred_s = costs.predictor_s(tpr)
            static_assign = static_assignment(true, home)
            out["static"][h, layer] = costs.moe_seconds(static_assign, home_int)["moe"]
            static_compute = costs.compute_per_rank(static_assign.sum(axis=0).T, home_int)
            real_window = attention + static_compute
            copies = layouts[slots][layer]
            out["eplb_async"][h, layer] = costs.moe_seconds(even_split(true, copies),
                                                            copies)["moe"]
            true_cost = costs.fitted_cost(true.sum(axis=0).max())
            assign = waterfill_split(true, copies, costs, wf_seconds, cost=true_cost)
            out["probe_on_eplb_wf"][h, layer] = costs.moe_seconds(assign, copies)["moe"]
            wf_cells.append(("probe_on_eplb_wf", h, layer))
            planned = BalanceProblem(pred, home, slots, default_window(pred, home, planner)
                                     + attention, planner)
            plan = apply_plan(_plan(solve(planned, "greedy", check=False, **paper_options())),
                              true, home)
            scored = costs.moe_seconds(plan.assignment, home_int + plan.replicas)
            recv, send = transfer_times(planned.with_load(true), plan)
            out["probe_paper"][h, layer] = (
                scored["moe"] + float(np.maximum(np.maximum(recv, send) - real_window,
                                                 0.0).max())
                + max(0.0, pred_s + planner_side - scored["dispatch"]))
            fit_cost = costs.fitted_cost(pred.sum(axis=0).max())
            pred_window = hiding_window(costs, pred, home, attention)
            prev64 = np.asarray(prev, np.int64)
            ahead_cost = costs.fitted_cost(prev64.sum(axis=0).max())
            prev_window = hiding_window(costs, prev64, home, attention)
            for b in fit_bs:
                name = f"probe_on_eplb_fit_b{b}p{slots - b}"
                copies = layouts[b][layer]
                base = copies > 0
                win = pred_window
                result = solve(BalanceProblem(pred, base, slots - b, win, fit_cost), "greedy",
                               check=False, **paper_options())
                plan0 = _plan(result)
                holds = copies + plan0.replicas
                assign = waterfill_split(true, holds, costs, wf_seconds, cost=fit_cost)
                scored = costs.moe_seconds(assign, holds)
                plan = Plan(plan0.replicas, plan0.sources, assign)
                recv, send = transfer_times(BalanceProblem(true, base, slots - b, win,
                                                           fit_cost), plan)
                transfer = float(np.maximum(np.maximum(recv, send) - real_window, 0.0).max())
                side = max(0.0, pred_s + planner_side - scored["dispatch"])
                out[name][h, layer] = scored["moe"] + transfer + side
                wf_cells.append((name, h, layer))
                # probe_on_eplb_plan: the same plan, its own split (no assignment in series)
                plan = apply_plan(plan0, true, base)
                scored = costs.moe_seconds(plan.assignment, holds)
                recv, send = transfer_times(BalanceProblem(true, base, slots - b, win,
                                                           fit_cost), plan)
                transfer = float(np.maximum(np.maximum(recv, send) - real_window, 0.0).max())
                out[f"probe_on_eplb_plan_b{b}p{slots - b}"][h, layer] = (
                    scored["moe"] + transfer + max(0.0, pred_s + planner_side
                                                   - scored["dispatch"]))
                # probe_on_eplb_ahead: planned a step ahead on the step before's load
                win = prev_window
                plan0 = _plan(solve(BalanceProblem(prev64, base, slots - b, win, ahead_cost),
                                    "greedy", check=False, **paper_options()))
                plan = apply_plan(plan0, true, base)
                holds = copies + plan0.replicas
                scored = costs.moe_seconds(plan.assignment, holds)
                recv, send = transfer_times(BalanceProblem(true, base, slots - b, win,
                                                           ahead_cost), plan)
                transfer = float(np.maximum(np.maximum(recv, send) - real_window, 0.0).max())
                out[f"probe_on_eplb_ahead_b{b}p{slots - b}"][h, layer] = (
                    scored["moe"] + transfer + ahead_side)
    assign_s = (costs.assign_gpu_seconds(slots) if costs.assign_time == "gpu"
                else costs.assign_side_seconds(slots, float(np.median(wf_seconds))
                                               if wf_time is None else wf_time))
    for name, h, layer in wf_cells:
        out[name][h, layer] += assign_s
    return {name: out[name] + attention for name in names}


def _fixed_and_multi(load, holds, costs: FairCosts):
    """Per-rank table time of single-holder experts, and the multi-holder experts."""
    total = load.sum(axis=0).astype(np.float64)  # [E]
    num_holders = (holds > 0).sum(axis=0)  # [E]
    single = num_holders == 1
    tokens = np.where(single[None, :] & (holds > 0), total[None, :], 0.0)  # [G, E]
    fixed = costs.compute_per_rank(tokens, holds)
    return fixed, np.flatnonzero(~single & (total > 0)), total


def _frac_from(holds: np.ndarray, x: dict) -> np.ndarray:
    """Fractions float [E, G]: single-holder experts whole on their holder, `x` rows elsewhere."""
    present = (holds > 0).T.astype(np.float64)  # [E, G]
    frac = present / np.maximum(present.sum(axis=1, keepdims=True), 1.0)
    for e, row in x.items():
        s = row.sum()
        if s > 0:
            frac[e] = row / s
    return frac


def _waterfill_kernel(fixed, order, holds, total, alpha, beta, passes):  # pragma: no cover
    """x float [E, G]: water-filling of each expert in `order` over its holders, repeated
    `passes` times (each pass takes every expert out and fills it again: coordinate descent
    on the largest rank level; stops early once a pass moves no level by more than 1 ns).
    Numba-compiled by `_waterfill_jit`; no allocation inside the loops."""
    num_ranks = holds.shape[0]
    level = fixed.copy()
    x = np.zeros((holds.shape[1], num_ranks))
    srt = np.empty(num_ranks)
    for _ in range(passes):
        moved = 0.0
        for e in order:
            m = 0
            for g in range(num_ranks):
                if holds[g, e] > 0:
                    if x[e, g] > 0:  # take e out of its ranks
                        level[g] -= alpha + x[e, g] * beta
                    value = level[g] + alpha  # insertion sort into srt[:m + 1]
                    j = m
                    while j > 0 and srt[j - 1] > value:
                        srt[j] = srt[j - 1]
                        j -= 1
                    srt[j] = value
                    m += 1
            w = srt[m - 1]
            cum = 0.0
            for j in range(m):
                cum += srt[j]
                cand = (total[e] * beta + cum) / (j + 1)
                if j == m - 1 or cand <= srt[j + 1]:
                    w = cand
                    break
            for g in range(num_ranks):
                if holds[g, e] > 0:
                    share = max(w - level[g] - alpha, 0.0) / beta
                    moved = max(moved, abs(share - x[e, g]) * beta)
                    x[e, g] = share
                    if share > 0:
                        level[g] += alpha + share * beta
        if moved < 1e-9:
            break
    return x


_KERNEL = {}


def _waterfill_jit():
    if "wf" not in _KERNEL:
        import numba

        _KERNEL["wf"] = numba.njit(cache=False)(_waterfill_kernel)
    return _KERNEL["wf"]


def waterfill_split(load: np.ndarray, holds: np.ndarray, costs: FairCosts,
                    timing: list | None = None, passes: int = 4, cost=None) -> np.ndarray:
    """int64 [S, E, G]: tokens over the copies present, multi-copy experts by water-filling.

    holds: int [G, E] copies per rank. Heaviest multi-copy expert first, its tokens raise the
    lowest rank levels among its holders (level = rank time in the planner's linear model:
    table time of fixed experts + alpha + beta per token) to a common level; `passes` rounds
    of taking each expert out and filling it again bring it close to the LP (a Numba kernel).
    timing: a list to which the kernel's seconds are appended (the numpy bookkeeping around
    it is not timed, as for lp_split). cost: the CostModel whose alpha, beta set the levels
    (default: costs.planner_cost).
    """
    cost = costs.planner_cost if cost is None else cost
    fixed, multi, total = _fixed_and_multi(load, holds, costs)
    order = multi[np.argsort(-total[multi], kind="stable")].astype(np.int64)
    kernel = _waterfill_jit()
    holds64 = np.ascontiguousarray(holds, np.int64)
    t0 = time.perf_counter()
    x = kernel(fixed, order, holds64, total, float(cost.alpha), float(cost.beta), passes)
    if timing is not None:
        timing.append(time.perf_counter() - t0)
    rows = {int(e): x[e] for e in order}
    return split_by_fractions(load, _frac_from(holds, rows))


def lp_split(load: np.ndarray, holds: np.ndarray, costs: FairCosts,
             timing: list | None = None) -> np.ndarray:
    """int64 [S, E, G]: the LP split (HiGHS): min z s.t. fixed(g) + sum over multi-copy e held
    on g of (alpha + beta x[e, g]) <= z, sum_g x[e, g] = tokens of e, x >= 0; then rounded.

    timing: a list to which the seconds of HiGHS's run() (the solve, not the model build in
    numpy) are appended.
    """

    cost = costs.planner_cost
    fixed, multi, total = _fixed_and_multi(load, holds, costs)
    if multi.size == 0:
        if timing is not None:
            timing.append(0.0)
        return split_by_fractions(load, _frac_from(holds, {}))
    pair_g, pair_e = np.nonzero(holds[:, multi] > 0)  # pairs (rank, index into multi)
    num_pairs, num_ranks = pair_g.size, holds.shape[0]
    # Columns: x[pair] (cost 0), then z (cost 1). Rows: one conservation row per multi-copy
    # expert (= its tokens), one rank-time row per rank (beta x - z <= -fixed - alpha copies).
    cols = np.arange(num_pairs)
    copies_on = np.bincount(pair_g, minlength=num_ranks)
    coef_row = np.concatenate([pair_e, multi.size + pair_g, multi.size + np.arange(num_ranks)])
    coef_col = np.concatenate([cols, cols, np.full(num_ranks, num_pairs)])
    coef_val = np.concatenate([np.ones(num_pairs), np.full(num_pairs, cost.beta),
                               -np.ones(num_ranks)])
    lp = highs_lp(np.concatenate([np.zeros(num_pairs), [1.0]]), np.zeros(num_pairs + 1),
                  np.full(num_pairs + 1, np.inf),
                  np.concatenate([total[multi], np.full(num_ranks, -np.inf)]),
                  np.concatenate([total[multi], -(fixed + cost.alpha * copies_on)]),
                  coef_row, coef_col, coef_val)
    h = new_highs()  # silent: HiGHS's banner and log stay off
    h.passModel(lp)
    t0 = time.perf_counter()
    h.run()
    if timing is not None:
        timing.append(time.perf_counter() - t0)
    sol = np.maximum(np.asarray(h.getSolution().col_value)[:num_pairs], 0.0)
    x = {}
    for j in range(num_pairs):
        x.setdefault(int(multi[pair_e[j]]), np.zeros(num_ranks))[pair_g[j]] = sol[j]
    return split_by_fractions(load, _frac_from(holds, x))


@dataclass
class FairResult:
    """Per-policy metrics of one `simulate_fair` run.

    metrics[policy][name]: float64 [N, L] per measured step and layer (seconds unless noted):
        moe, compute, comm, imbalance (ratio), transfer (exposed per-step replica transfer),
        pred (predictor seconds in series in host mode; an auto policy's background
        predictions are in plan_host and side), plan_host (planner seconds on the host), side
        (exposed predictor + planner on a side stream), solve (measured dispatch-solve
        seconds, LP or water-filling, in series), replicas (count), dispatch (the dispatch
        all-to-all).
    stall[policy]: float64 [N] stop-the-world seconds at each step; moved[policy]: float64 [N]
    bytes moved (all model layers) by re-plans, per-step replicas or an auto policy's layout
    switches (switch_charges). oracle_picks[n][layer]:
    the oracle's winner at each measured step and layer: a policy's name, or
    "true_<layout>_<split>" for a greedy planned on the true load (layout "home": sharded +
    k per-step slots, "bBpP": EPLB-b + p; split "wf": water-filled, "greedy": the greedy's own).
    """

    policies: list[str]
    metrics: dict[str, dict[str, np.ndarray]]
    stall: dict[str, np.ndarray]
    moved: dict[str, np.ndarray]
    attention: float
    tokens_per_step: np.ndarray
    layer_scale: float
    memory: dict[str, float]
    meta: dict = field(default_factory=dict)
    oracle_picks: list = field(default_factory=list)

    def layer_time(self, policy: str, mode: str = "host") -> np.ndarray:
        """float64 [N, L]: attention + MoE + exposed overheads (mode 'host' or 'side')."""
        m = self.metrics[policy]
        if mode == "host":
            return self.attention + m["moe"] + m["transfer"] + m["solve"] + m["pred"] \
                + m["plan_host"]
        return self.attention + m["moe"] + m["transfer"] + m["solve_side"] + m["side"]

    def step_time(self, policy: str, mode: str = "host") -> np.ndarray:
        """float64 [N]: model layers x mean layer time + stop-the-world stall."""
        num_model_layers = self.meta["model_layers"]
        return self.layer_time(policy, mode).mean(axis=1) * num_model_layers + self.stall[policy]

    def throughput(self, policy: str, mode: str = "host") -> float:
        """Tokens per second over the measured steps (total tokens / total time)."""
        return float(self.tokens_per_step.sum() / self.step_time(policy, mode).sum())

    def summary(self, policy: str, mode: str = "host") -> dict:
        m = self.metrics[policy]
        num_model_layers = self.meta["model_layers"]
        solve = m["solve"] if mode == "host" else m["solve_side"]
        solve_free = self.step_time(policy, mode) - num_model_layers * solve.mean(axis=1)
        return {
            "throughput_tok_s": self.throughput(policy, mode),
            "throughput_solve_free_tok_s": float(self.tokens_per_step.sum() / solve_free.sum()),
            "step_ms": 1e3 * float(self.step_time(policy, mode).mean()),
            "moe_us": 1e6 * float(m["moe"].mean()),
            "ir": float(m["imbalance"].mean()),
            "predictor_us": 1e6 * float(m["pred"].mean()) if mode == "host" else None,
            "planner_us": 1e6 * float(m["plan_host"].mean()) if mode == "host" else None,
            "side_exposed_us": 1e6 * float(m["side"].mean()),
            "solve_us": 1e6 * float(solve.mean()),
            "transfer_us": 1e6 * float(m["transfer"].mean()),
            "stall_ms_per_step": 1e3 * float(self.stall[policy].mean()),
            "bytes_moved_per_step": float(self.moved[policy].mean()),
            "memory_gb_per_rank": self.memory[policy] / 1e9,
        }


_METRICS = ("moe", "compute", "compute_mean", "comm", "imbalance", "transfer", "pred",
            "plan_host", "side", "solve", "solve_side", "replicas", "dispatch")


def simulate_fair(load: np.ndarray, costs: FairCosts, *, slots: int, prior: int, window: int,
                  interval: int, predictor="topk:0.9", seed: int = 0, check: bool = True,
                  solve_time: dict | None = None, phase: str = "decode",
                  score_every: int | str = 1, rescore: bool = False,
                  nested: bool = False, respond: bool = True,
                  guard: bool = False) -> FairResult:
    """Replay `load` int [N_all, L, S, E] (first `prior` steps: history only) at `slots` extra
    slots per rank under every policy of `policy_names(slots)` (module docstring).

    window, interval: EPLB's history window and re-plan interval in steps (the first layout
    is planned from the `window` steps before the first measured step, so window <= prior).
    predictor: an error-model spec (probe.sim.predict), predicted loads int [N, L, S, E] of
    the measured steps, or a callable predict(true, previous, step, layer) -> int [S, E] (step
    counted from the first measured step; e.g. probe.sim.predict.confusion_predictor).
    check: check_plan every policy's plan on the true load (RuntimeError
    on a violation), with the hiding window the plan was made for (transfer beyond the real
    window is charged as exposed time, not refused). solve_time: {"lp": s, "waterfill": s}
    to charge fixed dispatch-solve times instead of the measured wall time (None: measured;
    the water-filling's also in the history times of the first pick, history_times).
    phase: "decode" (tokens per rank are requests) or "prefill" (tokens per rank are one
    chunk) for the attention time. score_every: the auto policies (auto_replan, auto,
    auto_plus; auto_pred's base pick) re-score their candidates every `score_every` measured
    steps, one scoring's background work spread over them (module docstring); "auto": per
    candidate pool the smallest interval at which it is exposed at no step, even with every
    layer's prediction made in it (fitting_score_every); meta["auto_scoring"] gives the
    interval used. The default here stays 1 (the API's earlier behaviour, which the tests
    pin); experiments.fair.run defaults to "auto". nested: every EPLB-b layout of b < k
    is EPLB-k's with k - b redundant copies per rank dropped (nested_copies, from the same
    window's weights) instead of DeepSeek's own layout for b slots, so that it is a subset
    of EPLB-k and probe_on_eplb_auto_plus may pick the b = 1 .. k - 1, p = k - b splits too
    (auto_candidates) at EPLB-k's memory (at b = 0 a rank that cannot drop every redundant
    copy without leaving an expert unheld keeps the rest); a layer switched to a layout
    holding more fetches the difference, charged as exposed transfer (switch_charges, with
    or without `nested`). Default off here (the tests pin the
    earlier behaviour); experiments.fair.run turns it on. respond: with `rescore`, the shift
    response (module docstring) from each triggered scoring's first step until its pick
    (False: the fallbacks serve on until then). guard: the predicted-load guard of
    probe_on_eplb_auto_plus (module docstring; default off here, experiments.fair.run turns it
    on). meta["oracle_single"]: the oracle held to one candidate for the whole run
    (oracle_single).
    """
    load = np.asarray(load)
    if load.ndim != 4:
        raise ValueError(f"load must be int [N, L, S, E], got shape {load.shape}")
    num_all, num_layers, num_ranks, num_experts = load.shape
    if num_ranks != costs.num_ranks:
        raise ValueError(f"load has {num_ranks} ranks, costs are for {costs.num_ranks}")
    for name, value, low in (("slots", slots, 1), ("prior", prior, 1), ("window", window, 1),
                             ("interval", interval, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if score_every != "auto" and (isinstance(score_every, bool) or not isinstance(
            score_every, (int, np.integer)) or score_every < 1):
        raise ValueError(f"score_every must be an int >= 1 or 'auto', got {score_every!r}")
    for name, flag in (("rescore", rescore), ("nested", nested), ("respond", respond),
                       ("guard", guard)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if window > prior:
        raise ValueError(f"window ({window}) must be <= prior ({prior})")
    if prior >= num_all:
        raise ValueError(f"prior ({prior}) leaves no measured step of {num_all}")
    num_steps = num_all - prior
    if isinstance(predictor, np.ndarray):
        predict = replay_predictor(predictor, (num_steps, *load.shape[1:]))
    elif callable(predictor):
        predict = predictor
    else:
        predict = make_predictor(predictor, seed=seed)
    model = costs.model
    planner_cost = costs.planner_cost
    layer_scale = model.num_layers / num_layers
    home = sharded_home(num_experts, num_ranks)  # [G, E]
    home_int = home.astype(np.int64)
    options = paper_options()
    policies = policy_names(slots)
    combos = [(b, slots - b) for b in range(slots + 1)]  # b = k: p = 0, the split alone
    combo_of = {f"probe_on_eplb_b{b}p{p}": b for b, p in combos}
    for family in ("fit", "plan", "ahead"):
        combo_of.update({f"probe_on_eplb_{family}_b{b}p{p}": b for b, p in combos})
    metrics = {p: {m: np.zeros((num_steps, num_layers)) for m in _METRICS} for p in policies}
    stall = {p: np.zeros(num_steps) for p in policies}
    moved = {p: np.zeros(num_steps) for p in policies}
    tokens_per_rank = load[prior:, 0].sum(axis=2).mean(axis=1) / model.top_k  # [N]
    batch = float(tokens_per_rank.mean())
    attention = costs.attention_seconds(batch, phase)
    expert_bytes = costs.expert_bytes
    fixed_solve = solve_time or {}
    planner_side = costs.side_planner_seconds()
    # side mode's assignment charge: the GPU kernel's batched time with assign_time "gpu"
    # (None: FairCosts.assign_side_seconds of the host time, per step, then of its median)
    assign_side = costs.assign_gpu_seconds(slots) if costs.assign_time == "gpu" else None

    def weight_at(step: int) -> np.ndarray:  # mean load of the window before `step`
        return load[step - window:step].sum(axis=2).mean(axis=0).astype(np.float64)  # [L, E]

    # Layouts: resident b -> (active copies [L, G, E], pending (copies, ready step) or None).
    residents = sorted({slots, *(b for b, _ in combos)})
    stw = eplb_copies(weight_at(prior), slots, num_ranks)

    def layout(weight: np.ndarray, b: int, full: np.ndarray) -> np.ndarray:
        if b == slots:
            return full
        return (nested_copies(full, weight, slots - b) if nested
                else eplb_copies(weight, b, num_ranks))

    active = {b: layout(weight_at(prior), b, stw) for b in residents}
    per_rank = num_experts // num_ranks

    def held(copies: np.ndarray) -> int:  # the most redundant slots of any rank and layer
        return int(copies.sum(axis=2).max()) - per_rank

    most_held = {b: held(active[b]) for b in residents}
    pending: dict[int, tuple[np.ndarray, int] | None] = dict.fromkeys(residents)
    auto_split = history_split(load[prior - window:prior], active, costs, slots, attention)
    # probe_on_eplb_auto_replan: per layer the candidate with the lowest side-mode layer time on
    # history window, re-picked at each re-plan from the measured steps since the window began
    # (only steps before the re-plan). First pick: history steps through a predictor of their
    # own (an error model with another seed; a replayed prediction array has none for the
    # history, so the previous step's load stands for it).
    candidates_of = {"probe_on_eplb_auto": auto_candidates(slots),
                     "probe_on_eplb_auto_plus": auto_candidates(slots, plus=True,
                                                                nested=nested)}
    if isinstance(predictor, str):
        history_predict = make_predictor(predictor, seed=seed + 7919)
    elif callable(predictor):
        history_predict = predictor
    else:
        history_predict = make_predictor("previous", seed=seed)
    first = history_times(load[prior - window:prior],
                          load[prior - window - 1] if prior > window else None, active, costs,
                          slots, attention, history_predict,
                          names=candidates_of["probe_on_eplb_auto_plus"],
                          wf_time=fixed_solve.get("waterfill"))
    # the step-ahead splits' own plan in `first`: against the first step's window alone
    first_ahead_side = ahead_exposure(planner_side, model.num_layers * attention,
                                      model.num_layers)
    pick = functools.partial(pick_by_time, prefer=IDLE_FALLBACKS,
                             margin=STEP_MARGIN)  # EPLB or static unless 1% is gained
    # (first step, names per layer) of each auto policy's picks at the start and at re-plans
    # (run_schedule below, the first pick from `first`); probe_on_eplb_auto(_plus) re-pick
    # before every measured step from the last `pick_window` measured steps (a quarter of
    # EPLB's window, at least one)
    replan_epochs: dict = {}
    step_epochs: dict = {}
    pick_window = max(1, window // 4)

    step_hide = 0.0  # seconds of non-communication time of the last step (async copy window)
    pred_picks = [[""] * num_layers for _ in range(num_steps)]  # auto_pred's candidates
    pred_scores = [[{}] * num_layers for _ in range(num_steps)]  # its scores on the prediction
    ahead_windows = np.zeros(num_steps)  # the step-ahead planners' window at each step
    layer_windows = np.zeros((num_steps, num_layers))  # a layer's copy window (all ranks)
    pred_cost = np.zeros((num_steps, num_layers))  # the predictor's seconds per step, layer
    plan_host = costs.planner_kernel_s * costs.planner_host_factor  # one plan, host mode
    oracle_labels = [[""] * num_layers for _ in range(num_steps)]  # the oracle's winners
    oracle_tally: dict[str, np.ndarray] = {}  # every oracle candidate's MoE seconds [N, L]

    layouts_at: list[dict[int, np.ndarray]] = []  # per measured step: b -> copies [L, G, E]
    home_layers = np.broadcast_to(home_int, (num_layers, *home_int.shape))

    def base_of(name: str, n: int) -> np.ndarray:  # a candidate's resident layout at step n
        if name in ("static", "probe_paper"):
            return home_layers
        return layouts_at[n][_split_of(name, slots)[0]]

    def moved_per_rank(old: np.ndarray, new: np.ndarray) -> np.ndarray:  # bytes [G]
        return (np.maximum(new - old, 0).sum(axis=(0, 2)) * layer_scale * expert_bytes)

    for n in range(num_steps):
        step = prior + n
        if n > 0 and n % interval == 0:
            new = eplb_copies(weight_at(step), slots, num_ranks)
            by_rank = moved_per_rank(stw, new)
            stall["eplb_stw"][n] = by_rank.max() / costs.link_bandwidth
            moved["eplb_stw"][n] = by_rank.sum()
            stw = new
            for b in residents:
                new_b = layout(weight_at(step), b, new)
                most_held[b] = max(most_held[b], held(new_b))
                seconds = moved_per_rank(active[b], new_b).max() / costs.link_bandwidth
                delay = math.ceil(seconds / step_hide) if step_hide > 0 else 0
                pending[b] = (new_b, n + min(delay, interval))
                users = ["eplb_async", "eplb_lp", "probe_on_eplb_wf"] if b == slots else []
                users += [q for q, qb in combo_of.items() if qb == b]
                for user in users:
                    moved[user][n] = moved_per_rank(active[b], new_b).sum()
                    if delay > interval:  # could not finish before the next re-plan
                        stall[user][n] = seconds - interval * step_hide
        for b in residents:
            if pending[b] is not None and n >= pending[b][1]:
                active[b], pending[b] = pending[b][0], None
        layouts_at.append(dict(active))  # each EPLB-b layout serving at step n
        hide = 0.0
        for layer in range(num_layers):
            true = load[step, layer].astype(np.int64)  # [S, E]
            previous = load[step - 1, layer]
            pred = np.asarray(predict(true, previous, n, layer), np.int64)
            tpr = float(true.sum(axis=1).mean() / model.top_k)
            pred_s = costs.predictor_s(tpr)
            pred_cost[n, layer] = pred_s
            static_assign = static_assignment(true, home)
            static_compute = costs.compute_per_rank(static_assign.sum(axis=0).T, home_int)
            real_window = attention + static_compute  # [G]
            layer_windows[n, layer] = float(real_window.min())
            candidates = []  # (label, MoE seconds) for the oracle

            def record(policy, assignment, copies, *, transfer=0.0, probe=False, solve_s=0.0,
                       solve_side=None, replicas=0, n=n, layer=layer, pred_s=pred_s,
                       plan_host=plan_host, candidates=candidates):
                scored = costs.moe_seconds(assignment, copies)
                m = metrics[policy]
                m["moe"][n, layer] = scored["moe"]
                m["compute"][n, layer] = scored["compute"]
                m["compute_mean"][n, layer] = scored["compute_mean"]
                m["comm"][n, layer] = scored["dispatch"] + scored["combine"]
                m["dispatch"][n, layer] = scored["dispatch"]
                m["imbalance"][n, layer] = scored["imbalance"]
                m["transfer"][n, layer] = transfer
                m["solve"][n, layer] = solve_s
                m["solve_side"][n, layer] = solve_s if solve_side is None else solve_side
                m["replicas"][n, layer] = replicas
                if probe:
                    m["pred"][n, layer] = pred_s
                    m["plan_host"][n, layer] = plan_host
                    m["side"][n, layer] = max(0.0, pred_s + planner_side - scored["dispatch"])
                candidates.append((policy, scored["moe"]))
                return scored

            def checked(policy, problem, plan):
                if check:
                    bad = check_plan(problem, plan)
                    if bad:
                        raise RuntimeError(f"{policy}: plan infeasible on the true load: "
                                           f"{bad[:3]}")

            def exposed_transfer(problem, plan, real_window=real_window):
                recv, send = transfer_times(problem, plan)
                return float(np.maximum(np.maximum(recv, send) - real_window, 0.0).max())

            # probe_on_eplb_auto_pred: every auto_plus candidate scored on the PREDICTION (its
            # split applied to the predicted load, its transfer against the window the
            # prediction implies, its own overheads) as side_layer_time scores the truth;
            # no stall term: auto_pred pays every candidate layout's re-plan stall anyway
            pred_window = hiding_window(costs, pred, home, attention)  # what PROBE-on-EPLB
            # plans against too
            on_pred: dict[str, float] = {}

            def score_pred(policy, assignment, copies, *, problem=None, plan=None,
                           solve_side=0.0, side=None, pred_s=pred_s,
                           pred_window=pred_window, on_pred=on_pred):
                scored = costs.moe_seconds(assignment, copies)
                transfer = (0.0 if plan is None
                            else exposed_transfer(problem, plan, real_window=pred_window))
                own = (max(0.0, pred_s + planner_side - scored["dispatch"]) if side is None
                       else side)
                on_pred[policy] = scored["moe"] + transfer + solve_side + own

            # static
            checked("static", BalanceProblem(true, home, 0, 0.0, planner_cost),
                    Plan(np.zeros_like(home), np.full(home.shape, -1), static_assign))
            s = record("static", static_assign, home_int)
            hide += (attention + s["compute"]) / num_layers
            score_pred("static", static_assignment(pred, home), home_int, side=0.0)
            # eplb (stop-the-world and async layouts), even split over physical copies
            for policy, copies in (("eplb_stw", stw[layer]), ("eplb_async", active[slots][layer])):
                assign = even_split(true, copies)
                checked(policy, BalanceProblem(true, copies > 0, 0, 0.0, planner_cost),
                        Plan(np.zeros_like(home), np.full(home.shape, -1), assign))
                record(policy, assign, copies)
            score_pred("eplb_async", even_split(pred, active[slots][layer]),
                       active[slots][layer], side=0.0)
            # eplb_lp: LP on the true load over the async layout; even split if the LP rounds worse
            copies = active[slots][layer]
            lp_timing: list[float] = []
            assign = lp_split(true, copies, costs, lp_timing)
            lp_s = lp_timing[0]
            even = even_split(true, copies)
            if costs.moe_seconds(even, copies)["moe"] < costs.moe_seconds(assign, copies)["moe"]:
                assign = even
            checked("eplb_lp", BalanceProblem(true, copies > 0, 0, 0.0, planner_cost),
                    Plan(np.zeros_like(home), np.full(home.shape, -1), assign))
            record("eplb_lp", assign, copies, solve_s=fixed_solve.get("lp", lp_s))
            # probe_on_eplb_wf (b = k, p = 0): eplb_async's layout water-filled on the true load
            # (the table fit at the true heaviest expert: the assignment sees the true load);
            # no predictor or planner; the assignment charged as for probe_on_eplb
            wf_timing: list[float] = []
            true_cost = costs.fitted_cost(true.sum(axis=0).max())
            assign = waterfill_split(true, copies, costs, wf_timing, cost=true_cost)
            wf_s = fixed_solve.get("waterfill", wf_timing[0])
            checked("probe_on_eplb_wf", BalanceProblem(true, copies > 0, 0, 0.0, planner_cost),
                    Plan(np.zeros_like(home), np.full(home.shape, -1), assign))
            assign_charge = (assign_side if assign_side is not None
                             else costs.assign_side_seconds(slots, wf_s))
            record("probe_on_eplb_wf", assign, copies, solve_s=wf_s, solve_side=assign_charge)
            score_pred("probe_on_eplb_wf", waterfill_split(
                pred, copies, costs, cost=costs.fitted_cost(pred.sum(axis=0).max())), copies,
                solve_side=assign_charge, side=0.0)
            # probe_paper: greedy (paper's rules) on the prediction over the sharded home
            win = default_window(pred, home, planner_cost) + attention
            planned = BalanceProblem(pred, home, slots, win, planner_cost)
            result = solve(planned, "greedy", check=False, **options)
            plan = apply_plan(_plan(result), true, home)
            truth = planned.with_load(true)  # the window it was planned for; beyond the
            checked("probe_paper", truth, plan)  # real window is charged as exposed
            record("probe_paper", plan.assignment, home_int + plan.replicas,
                   transfer=exposed_transfer(truth, plan), probe=True,
                   replicas=plan.num_replicas)
            plan = apply_plan(_plan(result), pred, home)
            score_pred("probe_paper", plan.assignment, home_int + plan.replicas,
                       problem=planned, plan=plan)
            # probe_on_eplb: EPLB-b layout + p per-step replicas, water-filling on the truth
            for b, p in combos:
                policy = f"probe_on_eplb_b{b}p{p}"
                copies = active[b][layer]
                base = copies > 0
                win = pred_window
                result = solve(BalanceProblem(pred, base, p, win, planner_cost), "greedy",
                               check=False, **options)
                replicas = _plan(result).replicas
                holds = copies + replicas
                wf_timing: list[float] = []
                assign = waterfill_split(true, holds, costs, wf_timing)
                wf_s = wf_timing[0]
                plan = Plan(replicas, _plan(result).sources, assign)
                truth = BalanceProblem(true, base, p, win, planner_cost)
                checked(policy, truth, plan)
                wf_s = fixed_solve.get("waterfill", wf_s)
                record(policy, assign, holds, transfer=exposed_transfer(truth, plan),
                       probe=True, solve_s=wf_s,
                       solve_side=(assign_side if assign_side is not None
                                   else costs.assign_side_seconds(slots, wf_s)),
                       replicas=plan.num_replicas)
            # probe_on_eplb_fit: the same on alpha, beta fitted to the table around the prediction
            fit_cost = costs.fitted_cost(pred.sum(axis=0).max())
            for b, p in combos:
                policy = f"probe_on_eplb_fit_b{b}p{p}"
                copies = active[b][layer]
                base = copies > 0
                win = pred_window
                result = solve(BalanceProblem(pred, base, p, win, fit_cost), "greedy",
                               check=False, **options)
                replicas = _plan(result).replicas
                holds = copies + replicas
                wf_timing = []
                assign = waterfill_split(true, holds, costs, wf_timing, cost=fit_cost)
                plan = Plan(replicas, _plan(result).sources, assign)
                truth = BalanceProblem(true, base, p, win, fit_cost)
                checked(policy, truth, plan)
                wf_s = fixed_solve.get("waterfill", wf_timing[0])
                record(policy, assign, holds, transfer=exposed_transfer(truth, plan),
                       probe=True, solve_s=wf_s,
                       solve_side=(assign_side if assign_side is not None
                                   else costs.assign_side_seconds(slots, wf_s)),
                       replicas=plan.num_replicas)
                planned = BalanceProblem(pred, base, p, win, fit_cost)
                assign = waterfill_split(pred, holds, costs, cost=fit_cost)
                score_pred(policy, assign, holds, problem=planned,
                           plan=Plan(replicas, _plan(result).sources, assign),
                           solve_side=(assign_side if assign_side is not None
                                       else costs.assign_side_seconds(slots, wf_s)))
                # probe_on_eplb_plan: the same plan, the true tokens split by the plan's own
                # fractions (computed with the plan on the side stream): no assignment in series
                policy = f"probe_on_eplb_plan_b{b}p{p}"
                plan = apply_plan(_plan(result), true, base)
                checked(policy, truth, plan)
                record(policy, plan.assignment, holds, transfer=exposed_transfer(truth, plan),
                       probe=True, replicas=plan.num_replicas)
                plan = apply_plan(_plan(result), pred, base)
                score_pred(policy, plan.assignment, holds, problem=planned, plan=plan)
            # probe_on_eplb_ahead: planned one step ahead on the step before's true load (known
            # when that step's dispatch of this layer ran; no predictor), the plan's own split;
            # the planner's time beyond the rest of that step (its non-communication time) is
            # exposed
            prev64 = np.asarray(previous, np.int64)
            ahead_cost = costs.fitted_cost(prev64.sum(axis=0).max())
            ahead_window = step_hide if n > 0 else model.num_layers * attention
            prev_window = hiding_window(costs, prev64, home, attention)
            for b, p in combos:
                policy = f"probe_on_eplb_ahead_b{b}p{p}"
                copies = active[b][layer]
                base = copies > 0
                win = prev_window
                result = solve(BalanceProblem(prev64, base, p, win, ahead_cost), "greedy",
                               check=False, **options)
                holds = copies + _plan(result).replicas
                plan = apply_plan(_plan(result), true, base)
                truth = BalanceProblem(true, base, p, win, ahead_cost)
                checked(policy, truth, plan)
                record(policy, plan.assignment, holds, transfer=exposed_transfer(truth, plan),
                       replicas=plan.num_replicas)
                m = metrics[policy]
                m["plan_host"][n, layer] = ahead_exposure(plan_host, ahead_window,
                                                          model.num_layers)
                m["side"][n, layer] = ahead_exposure(planner_side, ahead_window,
                                                     model.num_layers)
                plan = apply_plan(_plan(result), pred, base)
                score_pred(policy, plan.assignment, holds,
                           problem=BalanceProblem(pred, base, p, win, ahead_cost), plan=plan,
                           side=m["side"][n, layer])
            pred_scores[n][layer] = on_pred  # auto_pred's scores, its pick after the loop
            ahead_windows[n] = ahead_window
            # oracle: the best of every policy's plan and of true-load plans, free
            options_true = [(home, home_int, slots)] + [
                (active[b][layer] > 0, active[b][layer], p) for b, p in combos]
            for (base, copies, p), tag in zip(options_true, ["home"] + [
                    f"b{b}p{p}" for b, p in combos], strict=True):
                result = solve(BalanceProblem(true, base, p, np.full(num_ranks, np.inf),
                                              planner_cost), "greedy", check=False)
                holds = copies + _plan(result).replicas
                candidates.append((f"true_{tag}_wf", costs.moe_seconds(
                    waterfill_split(true, holds, costs), holds)["moe"]))
                candidates.append((f"true_{tag}_greedy", costs.moe_seconds(
                    _plan(result).assignment, holds)["moe"]))
            label, best = min(candidates, key=lambda c: c[1])
            oracle_labels[n][layer] = label
            for name, seconds in candidates:
                oracle_tally.setdefault(name, np.full((num_steps, num_layers), np.nan))[
                    n, layer] = seconds
            m = metrics["oracle"]
            m["moe"][n, layer] = best
            m["imbalance"][n, layer] = np.nan
        step_hide = hide * model.num_layers  # the async copy's window over one step
        for policy in combo_of:  # per-step replica bytes (all model layers)
            moved[policy][n] += metrics[policy]["replicas"][n].mean() * model.num_layers \
                * expert_bytes
        moved["probe_paper"][n] += metrics["probe_paper"]["replicas"][n].mean() \
            * model.num_layers * expert_bytes

    # The auto policies' picks, made here from the rows each pick could see at its step (the
    # candidates' metrics as the loop left them, before the medians below replace the
    # measured solve times): probe_on_eplb_auto(_replan) and auto_plus re-score their
    # candidates every `score_every` steps (per pool; "auto": the smallest interval at which
    # one scoring's background work fits the steps it is spread over, fitting_score_every),
    # the scoring of step s done by step s + score_every (scored_steps).
    wf_median = float(np.median(metrics["probe_on_eplb_wf"]["solve"]))
    scoring_s = {}  # pool -> (side, host) seconds of one scoring per layer
    every = {}
    for target, names in candidates_of.items():
        plans, ahead, scores = scoring_work(names)
        scoring_s[target] = ((plans + ahead) * planner_side + scores * wf_median,
                             (plans + ahead) * plan_host + scores * wf_median)
        # "auto": the interval fits even if every layer's prediction is made in the
        # background (no layer served by a candidate that consumes it), the worst case
        every[target] = (fitting_score_every(max(scoring_s[target]) + float(pred_cost.max()),
                                             ahead_windows, model.num_layers)
                         if score_every == "auto" else int(score_every))
    # Each auto policy's scorings, one after another (the next starts the step the previous
    # one is done): every-k ones (1/k of the work per step, k steps) and, with `rescore`,
    # triggered ones (the whole work at one step) that replace the one running when the
    # step before changed the traffic (module docstring). Picks change only when a scoring
    # is done, from the scored steps done (from the latest triggered one on).
    pred_mean = pred_cost.mean(axis=1)  # [N] the step's predictions per layer
    history_moe = (first["eplb_async"] - attention).sum(axis=1)  # [H] EPLB's MoE seconds
    summed = load.sum(axis=2)  # [N_all, L, E] the routing counts the runtime has per step
    schedule = {}

    def switch_exposure(old: str, new: str, n: int, layer: int) -> float:
        # seconds exposed moving a layer from candidate old's layout to new's before step n
        # (as switch_charges charges it), on the layouts of step n and the window of the
        # step before (known when the picker decides)
        if old == new or n == 0:
            return 0.0
        return switch_fetch(base_of(new, n)[layer], base_of(old, n)[layer],
                            layer_windows[n - 1, layer], expert_bytes, costs.link_bandwidth)[0]

    def run_schedule(target: str, triggers: bool, guards: bool) -> dict:
        key = _pool_key(target)
        names = candidates_of[key]
        k = every[key]
        work_side = scoring_s[key][0]
        share = np.zeros(num_steps)  # the scoring's share of its work at each step
        scored_of = np.zeros(num_steps, dtype=np.int64)  # the step that scoring scores
        threshold = (rescore_thresholds(load[prior - window:prior], history_moe, k)
                     if triggers else (math.inf, math.inf))

        def exposure(q: str, steps) -> float:  # a candidate's background, as it will pay
            # the every-k scoring's share (1/k: what each step pays while no traffic change
            # triggers a scoring; a triggered one's larger share is paid once, at its own
            # steps, and would not recur while the pick serves) against the windows of the
            # steps given, with the predictions of the step each one's scoring scored
            return float(np.mean([pick_exposure(
                q, work_side, 1.0 / k, ahead_windows[r], model.num_layers,
                planner_s=planner_side, pred_s=pred_mean[scored_of[r]]) for r in steps]))

        def shadow_of(q: str, seen: list[int], n: int) -> np.ndarray:  # [rows, L]
            # side-mode times of the rows seen (the scored rows); the background exposure
            # is the mean over EVERY step from the first row to the one before step n
            # (their windows are known by then), not at the rows alone
            rows = np.asarray(seen, dtype=np.int64)
            m = metrics[q]
            t = side_layer_time({x: v[rows] for x, v in m.items()}, stall[q][rows],
                                model.num_layers, attention)
            if q.startswith("probe_on_eplb_ahead_"):  # its own plan is in exposure
                t = t - m["side"][rows]
            return t + exposure(q, range(int(rows.min()), n))

        def shadow(seen: list[int], n: int) -> dict:  # every candidate's shadow_of
            return {q: shadow_of(q, seen, n) for q in names}

        def first_time(q: str) -> np.ndarray:  # [H, L] a candidate's history score
            # (history_times), its background exposure that of the first measured step
            # (its window, L x attention, the only one known then; the every-k scoring's
            # share): a step-ahead split's own plan there is replaced
            t = first[q]
            if q.startswith("probe_on_eplb_ahead_"):
                t = t - first_ahead_side
            return t + exposure(q, [0])

        def first_pick() -> list[str]:  # before the first measured step, from the history
            return pick({q: first_time(q) for q in names}, candidates=names)

        def with_switch(times: dict, current: list[str], n: int, horizon: int,
                        back: bool = False) -> dict:
            # the times [rows, L] with, per layer, the exposure of fetching what a
            # candidate's layout holds beyond the serving one's (switch_exposure), spread
            # over the `horizon` steps the switch is expected to serve (and with `back`,
            # the fetch of returning to the serving one after them)
            pen = {q: np.array([switch_exposure(cur, q, n, layer)
                                + (switch_exposure(q, cur, n, layer) if back else 0.0)
                                for layer, cur in enumerate(current)]) / horizon
                   for q in times}
            return {q: t + pen[q][None, :] for q, t in times.items()}

        # the candidates that follow a change of the traffic by themselves: per-step slots
        # (p >= 1), planned every step on the prediction or the step before's load
        adaptive = [q for q in names if q not in FALLBACKS and _split_of(q, slots)[1] >= 1]

        def responders(n: int, ready: list[int], current: list[str],
                       horizon: int) -> tuple[list[str], np.ndarray]:
            # per layer the adaptive candidate fastest on the scored steps done (the
            # latest pick's rows), or before any on the history window (as first_pick),
            # and its mean time there [L], the fetches of switching to it from the serving
            # candidate and back spread over the `horizon` steps it is to serve
            times = with_switch({q: shadow_of(q, ready[-pick_window:], n) if ready
                                 else first_time(q) for q in adaptive},
                                current, n, horizon, back=True)
            picks = pick_by_time(times, adaptive)
            return picks, np.array([times[q][:, layer].mean()
                                    for layer, q in enumerate(picks)])

        def excess(n: int, serving: list[str]) -> float:  # seconds, summed over layers
            return sum(metrics[q]["compute"][n, layer] - metrics[q]["compute_mean"][n, layer]
                       for layer, q in enumerate(serving))

        def window_pick(n: int, ready: list[int], current: list[str]) -> list[str] | None:
            rows = [r for r in ready if r >= n - window]
            if len(rows) < pick_window:  # never fewer rows than a per-step switch reads
                rows = ready[-pick_window:]
            return (pick(with_switch(shadow(rows, n), current, n, pick_window),
                         candidates=names, current=current) if rows else None)

        epochs = [(0, first_pick())]
        served: list[list[str]] = []  # the names serving each step
        watched = np.zeros((num_steps, num_layers), dtype=bool)  # the guard ran there
        fired = np.zeros((num_steps, num_layers), dtype=bool)  # and swapped the candidate
        calm: list[tuple[str, float]] = [("", 0.0)] * num_layers  # (served, predicted s)
        done: list[int] = []  # the scored steps whose scoring is done, in order
        fresh = 0  # picks use the scored steps from the latest triggered one on
        triggered: list[int] = []
        lengths: list[int] = []  # the steps each triggered scoring is spread over
        start, length, fire, last_done = 0, k, 0, 0
        starts = [0]  # the step of every scoring begun, in order
        for n in range(num_steps):
            finished = n == start + length
            if finished:
                done.append(start)
                if start in triggered:
                    fresh = start
                start, length = n, k
                starts.append(n)
            if fire:  # the step before changed the traffic: score this step now, over
                start, length = n, fire  # `fire` steps (the running scoring is dropped)
                triggered.append(n)
                lengths.append(fire)
                if starts[-1] != n:
                    starts.append(n)
            fire = 0
            share[n], scored_of[n] = 1.0 / length, start
            current = epochs[-1][1]
            ready = [r for r in done if r >= fresh]
            if respond and start == n and n in triggered and adaptive:
                # the shift response: a triggered scoring starts here, its pick is m steps
                # away, and the change may have left the idle fallbacks' layouts stale: a
                # layer one serves takes its adaptive candidate until then if that was
                # faster before the change than the fallback was at the changed step (the
                # candidate follows the traffic, the fallback's layout does not)
                resp, before = responders(n, ready, current, length)
                now = {q: shadow_of(q, [n - 1], n)[0] for q in set(current)
                       if q in IDLE_FALLBACKS}
                current = [resp[layer] if q in now
                           and before[layer] < (1.0 - STEP_MARGIN) * now[q][layer] else q
                           for layer, q in enumerate(current)]
            if n > 0 and target.endswith("_replan"):
                if n % interval == 0:  # at each re-plan, from the scorings done by then
                    epochs.append((n, window_pick(n, ready, current) or current))
            elif n > 0:
                new = current
                if finished:
                    replanned = (n // interval) * interval
                    if replanned > 0 and replanned > last_done:
                        new = window_pick(n, ready, current) or current
                    elif ready:
                        new = step_switch(with_switch(shadow(ready[-pick_window:], n),
                                                      current, n, pick_window),
                                          current, names, margin=STEP_MARGIN)
                epochs.append((n, new))
            if finished:
                last_done = n
            serving = epochs[-1][1]
            if guards and adaptive:
                # the predicted-load guard: before the layer's dispatch, the time of the
                # candidate serving it (one without per-step slots) on the step's prediction
                # against its time on the prediction of the latest step the guard let it
                # serve (`calm`); at GUARD_GROWTH above, the layer takes its adaptive
                # candidate for this step (the responder, as the shift response picks it) if
                # that one's time on the scored steps is below the served one's predicted
                # time; the picks go on as if the served one had served
                # it runs where it was free at the step before (its predictor and scoring
                # within the dispatch of the layer then served: measured, known by now)
                watched[n] = [q not in adaptive and n > 0 and pred_cost[n - 1, layer]
                              + wf_median <= metrics[served[n - 1][layer]]["dispatch"][
                                  n - 1, layer] for layer, q in enumerate(serving)]
                if watched[n].any():
                    resp, before = responders(n, ready, serving, 1)
                    swap = list(serving)
                    for layer, q in enumerate(serving):
                        if not watched[n, layer]:
                            continue
                        now_pred = pred_scores[n][layer][q]
                        ref_q, ref_t = calm[layer]
                        if ref_q != q and ready:
                            # newly picked: its time on the prediction of the latest scored
                            # step, which the scoring had (the traffic the pick was made on)
                            ref_q, ref_t = q, pred_scores[ready[-1]][layer][q]
                        if (ref_q == q and now_pred > (1.0 + GUARD_GROWTH) * ref_t
                                and before[layer] < attention + now_pred):
                            swap[layer] = resp[layer]
                            fired[n, layer] = True
                            calm[layer] = (ref_q, ref_t)
                        else:
                            calm[layer] = (q, now_pred)
                    serving = swap
            served.append(serving)
            # after the step's dispatch, from what the runtime has (its routing counts, the
            # served layers' measured MoE time): did the traffic change since the latest
            # scored step before it (an every-k scoring that starts at this step takes k
            # steps, so a change here is answered by a triggered one at the next; a triggered
            # one that starts here scores this step's traffic anyway)?
            ref = starts[-1] if starts[-1] < n else (starts[-2] if len(starts) > 1 else None)
            if triggers and k > 1 and ref is not None and not (start == n
                                                                 and n in triggered):
                now_t = sum(metrics[q]["moe"][n, layer] for layer, q in enumerate(served[n]))
                then_t = sum(metrics[q]["moe"][ref, layer]
                             for layer, q in enumerate(served[ref]))
                changed = (traffic_distance(summed[prior + n], summed[prior + ref])
                           > threshold[0] or now_t > (1.0 + threshold[1]) * then_t
                           or fired[n].any())  # the guard saw a change too
                # worth it: the first scoring that would see this step's traffic without a
                # trigger is done at `later`, a triggered one over m steps at n + 1 + m; the
                # served layers' growth since the scored step (seconds per step, all model
                # layers) over the steps between must exceed the triggered scoring's extra
                # exposure (1/m of its work instead of 1/k at each of its m steps, against
                # the window step n leaves); trigger_length takes the best m
                later = n + k if start == n else start + length + k
                if changed and later > n + 2 and n + 1 < num_steps:
                    # what a re-pick is taken to win back: the served layers' MoE time
                    # growth, but no more than their compute excess's growth (largest rank
                    # over the mean rank: the all-to-all and the mean rank's compute are
                    # the traffic's own, no re-pick removes them)
                    # (where the guard swapped a layer, the candidate it served)
                    grown = min(now_t - then_t, excess(n, served[n])
                                - excess(ref, served[ref])) * layer_scale
                    fire = trigger_length(grown, later - n - 1, work_side,
                                          ahead_windows[n + 1], k, model.num_layers)
        if fired.any():  # the steps served, one epoch a step where the guard swapped
            epochs = [(n, names) for n, names in enumerate(served)
                      if n == 0 or names != served[n - 1]]
        return {"epochs": epochs, "share": share, "scored_of": scored_of,
                "triggered": triggered, "lengths": lengths, "threshold": threshold,
                "watched": watched, "fired": fired}

    for target in ("probe_on_eplb_auto_replan", "probe_on_eplb_auto",
                   "probe_on_eplb_auto_plus"):
        schedule[target] = run_schedule(
            target, rescore and not target.endswith("_replan"),
            guard and target == "probe_on_eplb_auto_plus")
        if target.endswith("_replan"):
            replan_epochs["probe_on_eplb_auto"] = schedule[target]["epochs"]
        else:
            step_epochs[target] = schedule[target]["epochs"]
    # probe_on_eplb_auto_pred: auto_plus's pick for each step, replaced by the candidate best
    # on the prediction when that is at least STEP_MARGIN faster there
    for n, names in _per_step(step_epochs["probe_on_eplb_auto_plus"], num_steps):
        for layer, current in enumerate(names):
            on_pred = pred_scores[n][layer]
            best = min(candidates_of["probe_on_eplb_auto_plus"], key=on_pred.__getitem__)
            pred_picks[n][layer] = (best if on_pred[best] < (1.0 - STEP_MARGIN)
                                    * on_pred[current] else current)

    # Charge each dispatch solver its median measured time over the run (the shared host's
    # contention makes single timings noisy); fixed times from `solve_time` stay as given.
    for policy in policies:
        if policy == "eplb_lp" or (policy.startswith("probe_on_eplb") and not policy.startswith(
                ("probe_on_eplb_auto", "probe_on_eplb_plan", "probe_on_eplb_ahead"))):
            key = "lp" if policy == "eplb_lp" else "waterfill"
            if key not in fixed_solve:
                m = metrics[policy]["solve"]
                m[:] = float(np.median(m))
                if policy == "eplb_lp":
                    metrics[policy]["solve_side"][:] = m
                elif assign_side is None:
                    metrics[policy]["solve_side"][:] = costs.assign_side_seconds(
                        slots, float(m.flat[0]))
    # probe_on_eplb_auto_moe: per layer the fit policy of its history split, for the whole run
    for layer, (b, p) in enumerate(auto_split):
        for name in _METRICS:
            metrics["probe_on_eplb_auto_moe"][name][:, layer] = \
                metrics[f"probe_on_eplb_fit_b{b}p{p}"][name][:, layer]
    chosen = [f"probe_on_eplb_fit_b{b}p{p}" for b, p in auto_split]
    stall["probe_on_eplb_auto_moe"] = np.max([stall[q] for q in chosen], axis=0)
    moved["probe_on_eplb_auto_moe"] = np.mean([moved[q] for q in chosen], axis=0)
    # probe_on_eplb_auto(_replan): per epoch (between re-picks) and layer its chosen candidate
    auto_epochs = replan_epochs["probe_on_eplb_auto"]
    picked = (("probe_on_eplb_auto_replan", auto_epochs),
              ("probe_on_eplb_auto", step_epochs["probe_on_eplb_auto"]),
              ("probe_on_eplb_auto_plus", step_epochs["probe_on_eplb_auto_plus"]))
    for target, epochs in picked:
        bounds = [start for start, _ in epochs] + [num_steps]
        pool = candidates_of[_pool_key(target)]
        for (start, names), stop in zip(epochs, bounds[1:], strict=True):
            rows = slice(start, stop)
            for layer, q in enumerate(names):
                for name in _METRICS:
                    metrics[target][name][rows, layer] = metrics[q][name][rows, layer]
            # it may serve any candidate at any step: each re-plan's stall is charged as the
            # largest of all candidates' (conservative: a rank holds only the serving layout)
            stall[target][rows] = np.max([stall[q][rows] for q in pool], axis=0)
            moved[target][rows] = np.mean([moved[q][rows] for q in names], axis=0)
    # The auto policies' own work, charged beside the served candidate's (probe_on_eplb_auto
    # and auto_replan over candidates_of["probe_on_eplb_auto"], auto_plus over its own):
    # (a) scoring: to pick, every candidate's side-mode time of every measured step is kept
    #     (shadow_times), so after each step every candidate is planned (the fit split and
    #     the paper's PROBE on the prediction, the step-ahead split on the step's true load)
    #     and scored on the true load (one water-filling kernel time each, the run's median,
    #     as auto_pred's scores), for all L layers in the background: against the step's
    #     non-communication time like the step-ahead plans (ahead_exposure of the whole
    #     work; a served step-ahead candidate's own plan is one of these plans, so its own
    #     exposure is replaced, not added);
    # (b) the predictor: a served fit, plan or paper candidate consumes the prediction and
    #     pays it itself (on the side stream beyond the dispatch; host mode: in series). A
    #     layer served by a candidate that does not (a fallback, a step-ahead split) needs
    #     its prediction only for the scoring's plans (the fit split and the paper's PROBE
    #     of a scored step), so it is made as part of the scoring, in the background: layer
    #     l's prediction needs only layer l-1's router input of the step, which exists by
    #     then. Each scored step's predictions of such layers are spread over the k steps
    #     of its scoring like the rest of it (1/k in each step's ahead_exposure); nothing is
    #     charged on the side stream or in series for them.
    scoring = {}
    for target, epochs in picked:
        key = _pool_key(target)
        plans, ahead, scores = scoring_work(candidates_of[key])
        work_side, work_host = scoring_s[key]
        k = every[key]
        share, scored_of = schedule[target]["share"], schedule[target]["scored_of"]
        served = _served(epochs, num_steps, num_layers)
        ahead_cells = np.array([[q.startswith("probe_on_eplb_ahead_") for q in row]
                                for row in served])
        # the running scoring's share of its work in each step's background (1/k, or 1 for a
        # triggered one); a served step-ahead split plans every step, of which the scoring
        # shares that share
        own = ahead_cells.mean(axis=1) * (1.0 - share)  # [N]
        predicts = np.array([[q == "probe_paper" or q.startswith(
            ("probe_on_eplb_fit_", "probe_on_eplb_plan_")) for q in row] for row in served])
        # (b) the background predictions of the running scoring's step, per layer, at the
        # scoring's share
        # (the layers the guard watched predict in the foreground, (c) below)
        watched = schedule[target]["watched"]
        bg_pred = np.where(predicts | watched, 0.0, pred_cost).mean(axis=1)[scored_of]  # [N]
        bg_side, bg_host = (np.array([
            background_exposure(work, x, w, model.num_layers, pred_s=p, own_s=f * plan)
            for w, x, p, f in zip(ahead_windows, share, bg_pred, own, strict=True)])[:, None]
            for work, plan in ((work_side, planner_side), (work_host, plan_host)))
        m = metrics[target]
        m["side"][:] = np.where(ahead_cells, 0.0, m["side"]) + bg_side
        m["plan_host"][:] = np.where(ahead_cells, 0.0, m["plan_host"]) + bg_host
        m["pred"][:] = np.where(predicts, pred_cost, 0.0)  # in series (host mode)
        # (c) the predicted-load guard (auto_plus with `guard`): where it ran, the predictor
        # and one scoring of the fallback on the prediction (one water-filling kernel time,
        # the run's median) on the side stream during the dispatch; where it swapped, the
        # served candidate pays its own predictor and planner, and the scoring comes first
        fired = schedule[target]["fired"]
        kept = watched & ~fired  # the guard ran and the served candidate stayed
        m["side"][:] += np.where(kept, np.maximum(0.0, pred_cost + wf_median - m["dispatch"]),
                                 np.where(fired, wf_median, 0.0))
        m["plan_host"][:] += np.where(watched, wf_median, 0.0)  # host mode: in series
        m["pred"][:] += np.where(kept, pred_cost, 0.0)
        scoring[target] = {"plans": plans, "ahead_plans": ahead, "scores": scores,
                           "work_side_s": work_side, "work_host_s": work_host,
                           "background_predictor_s": float((bg_pred * share).mean()),
                           "score_every": k,
                           "triggered_steps": [int(x) for x in schedule[target]["triggered"]],
                           "triggered_lengths": [int(x) for x in schedule[target]["lengths"]],
                           "trigger_distance": float(schedule[target]["threshold"][0]),
                           "trigger_time": float(schedule[target]["threshold"][1]),
                           "guard_watched": int(watched.sum()),
                           "guard_fired": int(fired.sum())}
    # probe_on_eplb_auto_pred: per step and layer the candidate picked on the prediction,
    # plus the pick's own work in place of the candidate's predictor + planner: every step,
    # even while an EPLB fallback serves, the predictor, then on the host (one round trip:
    # the prediction there, the pick and its plan back) the plans on the prediction (the k
    # fit splits, whose plans the plan splits share, and the paper's PROBE, each at the host
    # planner's time) and the scoring of every candidate on the prediction (one water-filling
    # kernel time each, the run's median: the scorer spreads the predicted tokens over the
    # copies once, the water-filling does so in several passes), all on the side stream
    # during the dispatch; and the k step-ahead plans made during the step before
    # (ahead_exposure of k plans).
    target = "probe_on_eplb_auto_pred"
    for n, names in enumerate(pred_picks):
        for layer, q in enumerate(names):
            for name in _METRICS:
                metrics[target][name][n, layer] = metrics[q][name][n, layer]
        # it may serve any candidate at any step: each re-plan's stall is charged as the
        # largest of all candidates' (conservative: a rank holds only the serving layout)
        stall[target][n] = max(stall[q][n] for q in candidates_of["probe_on_eplb_auto_plus"])
        moved[target][n] = np.mean([moved[q][n] for q in names])
    # a layer switched to a candidate whose layout holds copies the previous one's did not
    # (the sharded home, EPLB-0, a nested EPLB-b, EPLB-k) fetches them: the ranks hold one
    # layout per layer, never the union of the candidates'
    servings = {t: _served(e, num_steps, num_layers) for t, e in picked}
    servings[target] = pred_picks
    for name, served in servings.items():
        exposed, fetched = switch_charges(served, base_of, layer_windows, expert_bytes,
                                          costs.link_bandwidth, layer_scale)
        metrics[name]["transfer"] += exposed
        moved[name] += fetched
    plans, ahead, scores = scoring_work(candidates_of["probe_on_eplb_auto_plus"])
    score_s = scores * wf_median
    # auto_plus's scoring, spread (or triggered) as there
    true_s = score_s * schedule["probe_on_eplb_auto_plus"]["share"]  # [N]
    # in the background: the step-ahead plans and auto_plus's scoring of every candidate on
    # the true load (the plans on the prediction are the pick's own, made on the side stream)
    ahead_side = np.array([ahead_exposure(ahead * planner_side + x, w, model.num_layers)
                           for w, x in zip(ahead_windows, true_s, strict=True)])
    ahead_host = np.array([ahead_exposure(ahead * plan_host + x, w, model.num_layers)
                           for w, x in zip(ahead_windows, true_s, strict=True)])
    m = metrics[target]
    m["pred"][:] = pred_cost
    m["plan_host"][:] = plans * plan_host + score_s + ahead_host[:, None]
    pick_side = costs.host_round_trip_s + plans * plan_host + score_s
    m["side"][:] = (np.maximum(0.0, pred_cost + pick_side - m["dispatch"])
                    + ahead_side[:, None])
    scoring[target] = {"plans": plans, "ahead_plans": ahead, "scores": 2 * scores,
                       "pick_side_s": pick_side,
                       "score_every": every["probe_on_eplb_auto_plus"]}
    layers_w = model.num_layers * expert_bytes
    memory = {"static": 0.0, "eplb_stw": slots * layers_w, "eplb_async": slots * layers_w,
              "eplb_lp": slots * layers_w, "probe_paper": 2.0 * slots * expert_bytes,
              "oracle": slots * layers_w}
    for b, p in combos:  # b, or with nested layouts the most any rank holds (a rank short
        resident = most_held[b] if nested else b  # of redundant copies to drop keeps more)
        for family in ("", "fit_", "plan_", "ahead_"):
            memory[f"probe_on_eplb_{family}b{b}p{p}"] = (resident * layers_w
                                                         + 2.0 * p * expert_bytes)
    memory["probe_on_eplb_wf"] = memory["eplb_async"]
    memory["probe_on_eplb_auto_moe"] = (np.mean([b for b, _ in auto_split]) * layers_w
                                        + 2.0 * max(p for _, p in auto_split) * expert_bytes)
    # auto: the largest layout it may serve (EPLB-k of the fallbacks; one layout per layer is
    # resident, switches fetch: switch_charges) and the per-step slots of its candidates,
    # double-buffered
    pred_epochs = list(enumerate(pred_picks))
    for target in ("probe_on_eplb_auto_replan", "probe_on_eplb_auto", "probe_on_eplb_auto_plus",
                   "probe_on_eplb_auto_pred"):
        pool = candidates_of[_pool_key(target)]
        memory[target] = (max(_split_of(q, slots)[0] for q in pool) * layers_w
                          + 2.0 * max(_split_of(q, slots)[1] for q in pool) * expert_bytes)
    meta = {"model": model.name, "model_layers": model.num_layers, "trace_layers": num_layers,
            "slots": slots, "prior": prior, "window": window, "interval": interval,
            "nested": nested, "nested_held": {int(b): most_held[b] for b in residents},
            "predictor": predictor if isinstance(predictor, str) else
            ("callable" if callable(predictor) else "given"),
            "batch_per_rank": batch, "seed": seed, "phase": phase,
            "auto_split": [list(x) for x in auto_split],
            "auto_replan_choices": [{"from_step": start, "layers": [_label(q) for q in names]}
                             for start, names in auto_epochs],
            "auto_choices": [{"from_step": start, "layers": [_label(q) for q in names]}
                             for start, names in step_epochs["probe_on_eplb_auto"]],
            "auto_plus_choices": [{"from_step": start, "layers": [_label(q) for q in names]}
                                  for start, names in step_epochs["probe_on_eplb_auto_plus"]],
            "auto_pred_choices": [{"from_step": start, "layers": [_label(q) for q in names]}
                                  for start, names in pred_epochs],
            "auto_pred_overrides": int(sum(
                q != plus for (_, names), (_, plus_names) in zip(
                    pred_epochs, _per_step(step_epochs["probe_on_eplb_auto_plus"],
                                           num_steps), strict=True)
                for q, plus in zip(names, plus_names, strict=True))),
            "oracle_wins": dict(collections.Counter(x for row in oracle_labels for x in row)),
            "oracle_single": oracle_single(oracle_tally),
            "planner_side_s": planner_side, "assign_side_s": assign_side,
            "planner_host_s": plan_host, "auto_scoring": scoring}
    return FairResult(policies=policies, metrics=metrics, stall=stall, moved=moved,
                      attention=attention, tokens_per_step=load[prior:, 0].sum(axis=(1, 2))
                      / model.top_k, layer_scale=layer_scale, memory=memory, meta=meta,
                      oracle_picks=oracle_labels)


def oracle_single(tally: dict) -> dict:
    """The oracle restricted to ONE of its candidates for the whole run: {"label", "moe_s"}
    of the candidate (a policy's plan or a true-load plan, every step and layer of it free)
    with the lowest mean MoE seconds over the run, among those scored at every step and
    layer; what perfect knowledge at zero cost gains without the per-step choice between
    candidates that the oracle also makes. tally: label -> float [N, L] MoE seconds (NaN
    where the label was not scored)."""
    complete = {q: t for q, t in tally.items() if t.size and not np.isnan(t).any()}
    if not complete:
        raise ValueError("no oracle candidate was scored at every step and layer")
    label = min(complete, key=lambda q: (float(complete[q].mean()), q))
    return {"label": label, "moe_s": float(complete[label].mean())}


def _per_step(epochs: list, num_steps: int) -> list:
    """(step, names) for every step from epochs [(first step, names), ...]."""
    starts = [start for start, _ in epochs] + [num_steps]
    return [(n, names) for (start, names), stop in zip(epochs, starts[1:], strict=True)
            for n in range(start, stop)]


def _pool_key(target: str) -> str:
    """The candidate pool (simulate_fair's candidates_of key) an auto policy picks from:
    auto_plus's for probe_on_eplb_auto_plus and auto_pred (its base pick is auto_plus's),
    probe_on_eplb_auto's for it and auto_replan."""
    return ("probe_on_eplb_auto_plus"
            if target in ("probe_on_eplb_auto_plus", "probe_on_eplb_auto_pred")
            else "probe_on_eplb_auto")


def _served(epochs: list, num_steps: int, num_layers: int) -> np.ndarray:
    """object [N, L]: the candidate serving each measured step and layer, from epochs."""
    out = np.empty((num_steps, num_layers), dtype=object)
    for n, names in _per_step(epochs, num_steps):
        out[n] = names
    return out


def _split_of(name: str, slots: int) -> tuple[int, int]:
    """(resident, per-step) slots that an auto candidate uses."""
    if name == "static":
        return 0, 0
    if name in ("eplb_async", "probe_on_eplb_wf"):
        return slots, 0
    if name == "probe_paper":
        return 0, slots
    b, p = name.rpartition("_b")[2].split("p")
    return int(b), int(p)


def _label(name: str) -> str:
    """Short label of an auto candidate for reports: b1p1 (fit), plan_b1p1, ahead_b1p1, eplb
    (even split), wf, static, paper."""
    return {"eplb_async": "eplb", "probe_on_eplb_wf": "wf", "static": "static",
            "probe_paper": "paper"}.get(
        name, name.removeprefix("probe_on_eplb_").removeprefix("fit_"))


def _plan(result) -> Plan:
    if result.plan is None:
        raise RuntimeError(f"planner {result.method!r} returned no plan ({result.status}: "
                           f"{result.message})")
    return result.plan
