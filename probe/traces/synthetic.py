"""Seeded synthetic routing traces that look like real MoE traffic.

Shape legend: N steps, T tokens, L MoE layers, E experts, K top-k, G source ranks,
D domains, C latent clusters per layer, M slots of a sampling table.

The generative model
--------------------
A fixed random "model" (seeded by the knob `model_seed`, so every workload of one configuration
shares it) defines, per MoE layer l:
  * per domain d a Zipf-like expert popularity: expert at popularity rank i gets weight
    (i+1)^-alpha_l on a random permutation of the experts, mixed with a layer-wide popularity
    that all domains share (`shared`); alpha_l varies per layer around `alpha`;
  * C latent clusters, each preferring `cluster_size` random experts;
  * a successor map succ_l: cluster -> cluster.
A token carries a domain d and a latent cluster c. At layer l its routing distribution is
(1 - w) * pop[d, l] + w * uniform(cluster c's experts), w = `cluster_weight`, with pop
sharpened by `temperature`; its top-K experts are K draws without replacement
(Plackett-Luce, i.e. the Gumbel-top-k distribution). Between layers the cluster is
kept along the successor map with probability `rho`, else redrawn from the domain's cluster
prior: a token's layer-(l+1) experts depend on its layer-l experts, so a predictor has
something to learn.

Workloads (`WORKLOADS` holds their defaults):
  * decode: continuous batching. Every rank holds tokens_per_step / G running requests; each
    emits one token per step. A request has a domain and a persistent preferred cluster
    (`stick`); requests finish after a geometric number of steps (mean `mean_len`) and new ones
    join with a domain drawn from an arrival mix that drifts (Ornstein-Uhlenbeck in log space,
    `drift`), so the hot experts move from step to step. A token takes another domain with
    probability `mix` (token-level domain mixture).
  * shift: decode whose arrivals are `shift_from` (code) before `shift_step` (default 200, or
    num_steps // 2 when shorter) and `shift_to`
    (chinese) from then on; at the shift the whole batch is replaced (abrupt semantic shift).
  * repeat: decode over one duplicated prompt: every request has the same domain and preference,
    strong stickiness: extreme skew.
  * prefill: chunked prefill. Each rank works through a stream of long prompts
    (lognormal lengths, mean `prompt_len` tokens) in chunks of tokens_per_step / G tokens; the
    contiguous tokens of one prompt share its domain and a narrow topic (Dirichlet over clusters,
    `topic_conc`), which produces imbalance spikes.
  * uniform: every token picks K distinct experts uniformly at random (balanced; for tests).

Sampling: each (layer, domain, cluster) distribution is quantised to a table of M = 4096 slots
(every expert keeps at least one slot) and sampled by table look-up; repeats within a token's
top-K are redrawn (rejection), with an exact fallback on the renormalised distribution. That is
exact Plackett-Luce sampling of the quantised distribution and ~20x faster than Gumbel noise
over all E experts: the default decode trace (300 steps x 8192 tokens x 8 layers) takes a few
seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from probe.traces.trace import DECODE, PREFILL, RoutingTrace

__all__ = ["DOMAINS", "WORKLOADS", "generate"]

DOMAINS = ("code", "chinese", "math", "english", "chat", "science", "legal", "multilingual")

_TABLE_SLOTS = 4096  # M
_CHUNK_TOKENS = 1 << 18  # tokens sampled per batch (bounds temporary memory)
_MAX_REDRAWS = 12

# Knobs shared by every workload, with their defaults (calibrated: docs/traces.md).
_COMMON = {
    "model_seed": 2,          # seed of the fixed "model" (popularities, clusters, successors)
    "alpha": 2.4,             # mean Zipf exponent of domain popularity
    "alpha_spread": 0.2,      # per-layer exponent ~ U(alpha - spread, alpha + spread)
    "shared": 0.55,           # weight of the layer-wide popularity all domains share
    "num_clusters": 32,       # C latent clusters per layer
    "cluster_size": 2,        # experts each cluster prefers
    "cluster_weight": 0.4,    # share of a token's routing mass on its cluster's experts
    "temperature": 1.0,       # routing temperature (< 1 sharpens every distribution)
    "rho": 0.75,              # P(cluster follows the successor map to the next layer)
    "mix": 0.1,               # P(token takes a domain from the arrival mix, not its request's)
    "gates": False,           # also store gate weights (renormalised top-K probabilities)
}
_DECODE = {
    **_COMMON,
    "domains": {"chat": 0.4, "code": 0.2, "english": 0.15, "math": 0.1, "chinese": 0.15},
    "stick": 0.6,      # P(token's layer-0 cluster is its request's preferred cluster)
    "mean_len": 80,    # mean request length in decode steps (geometric)
    "drift": 0.4,      # per-step sigma of the log arrival-mix (OU process)
    "drift_revert": 0.05,
}

WORKLOADS: dict[str, dict[str, Any]] = {
    "decode": {"phase": DECODE, "num_steps": 300, "tokens_per_step": 8192, **_DECODE},
    "shift": {"phase": DECODE, "num_steps": 400, "tokens_per_step": 8192, **_DECODE,
              "shift_step": None, "shift_from": "code", "shift_to": "chinese",
              "shift_weight": 0.8},
    "repeat": {"phase": DECODE, "num_steps": 100, "tokens_per_step": 8192, **_DECODE,
               "domains": {"code": 1.0}, "stick": 0.95, "rho": 0.9, "mix": 0.0,
               "temperature": 0.7},
    "prefill": {"phase": PREFILL, "num_steps": 32, "tokens_per_step": 8 * 8192, **_COMMON,
                "domains": {"chat": 0.3, "code": 0.25, "english": 0.2, "chinese": 0.15,
                            "math": 0.1},
                "prompt_len": 65536, "topic_conc": 0.03, "mix": 0.0},
    "uniform": {"phase": DECODE, "num_steps": 50, "tokens_per_step": 8192, "gates": False},
}
_STRUCTURAL = ("phase", "num_steps", "tokens_per_step")


def generate(
    workload: str,
    *,
    num_steps: int | None = None,
    tokens_per_step: int | None = None,
    num_layers: int = 8,
    num_experts: int = 128,
    top_k: int = 4,
    num_ranks: int = 8,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **knobs: Any,
) -> RoutingTrace:
    """A seeded synthetic RoutingTrace (model and workloads: module docstring).

    workload: one of WORKLOADS ("decode", "prefill", "shift", "repeat", "uniform").
    num_steps, tokens_per_step: default from WORKLOADS[workload]; tokens are split over the
        num_ranks source ranks as evenly as possible (rank g holds a contiguous block).
    seed: drives the traffic; the routing "model" comes from the knob `model_seed`.
    progress: optional callback progress(done_tokens, total_tokens) for progress bars.
    knobs: workload parameters (WORKLOADS[workload] lists them); unknown names raise ValueError.

    Same arguments give equal traces.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    defaults = WORKLOADS[workload]
    unknown = sorted(set(knobs) - (set(defaults) - set(_STRUCTURAL)))
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown} for workload {workload!r}; known: "
                         f"{sorted(set(defaults) - set(_STRUCTURAL))}")
    params = {k: v for k, v in defaults.items() if k not in _STRUCTURAL}
    params.update(knobs)
    num_steps = defaults["num_steps"] if num_steps is None else num_steps
    tokens_per_step = defaults["tokens_per_step"] if tokens_per_step is None else tokens_per_step
    for name, value, low in (("num_steps", num_steps, 1), ("tokens_per_step", tokens_per_step, 1),
                             ("num_layers", num_layers, 1), ("num_experts", num_experts, 1),
                             ("top_k", top_k, 1), ("num_ranks", num_ranks, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) exceeds num_experts ({num_experts})")
    if num_ranks > tokens_per_step:
        raise ValueError(f"tokens_per_step ({tokens_per_step}) < num_ranks ({num_ranks})")
    _check_knobs(params)
    meta_params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    if "domains" in params:
        params["domains"] = _domain_weights(params["domains"])

    rng = np.random.default_rng(seed)
    total = num_steps * tokens_per_step
    # Source rank of each token slot of a step: contiguous, near-equal blocks.
    slot_rank = (np.arange(tokens_per_step) * num_ranks // tokens_per_step).astype(np.int16)
    if workload == "uniform":
        world = _uniform_world(num_layers, num_experts)
        domain = np.zeros(total, dtype=np.int64)
        cluster0 = np.zeros(total, dtype=np.int64)
        tags = [""] * num_steps
    else:
        world = _build_world(num_layers, num_experts, params)
        if workload == "prefill":
            domain, cluster0, tags = _prefill_tokens(rng, world, params, num_steps,
                                                     tokens_per_step)
        else:
            domain, cluster0, tags = _decode_tokens(rng, world, params, workload, num_steps,
                                                    tokens_per_step)
    experts, gates = _sample_routes(rng, world, domain, cluster0, top_k,
                                    bool(params.get("gates", False)), progress)
    meta = {
        "generator": "probe.traces.synthetic",
        "workload": workload,
        "seed": int(seed),
        "num_steps": int(num_steps),
        "tokens_per_step": int(tokens_per_step),
        "num_layers": int(num_layers),
        "params": meta_params,
    }
    return RoutingTrace(
        num_experts=num_experts,
        num_ranks=num_ranks,
        top_k=top_k,
        step_offsets=np.arange(num_steps + 1, dtype=np.int64) * tokens_per_step,
        src_rank=np.tile(slot_rank, num_steps),
        experts=experts,
        gates=gates,
        phase=np.full(num_steps, defaults["phase"], dtype=np.uint8),
        step_tags=tags,
        meta=meta,
    )


_PROBABILITIES = ("shared", "cluster_weight", "rho", "mix", "stick", "shift_weight",
                  "drift_revert")
_NON_NEGATIVE = ("alpha", "alpha_spread", "drift")
_POSITIVE = ("temperature", "topic_conc", "num_clusters", "cluster_size", "mean_len",
             "prompt_len")


def _check_knobs(params: dict) -> None:
    """Range checks of numeric knobs; ValueError naming the knob."""
    for name, value in params.items():
        if name in ("domains", "shift_from", "shift_to", "shift_step", "model_seed", "gates"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"knob {name} must be a number, got {value!r}")
        if name in _PROBABILITIES and not 0 <= value <= 1:
            raise ValueError(f"knob {name} must lie in [0, 1], got {value}")
        if name in _NON_NEGATIVE and value < 0:
            raise ValueError(f"knob {name} must be >= 0, got {value}")
        if name in _POSITIVE and value <= 0:
            raise ValueError(f"knob {name} must be > 0, got {value}")


# --------------------------------------------------------------------------------- the "model"
@dataclass(frozen=True)
class _World:
    """Fixed routing preferences. Type index = domain * C + cluster."""

    num_experts: int
    num_clusters: int
    tables: np.ndarray         # int16 [L, D*C, M] quantised inverse-CDF tables
    probs: np.ndarray          # float32 [L, D*C, E] the quantised distributions (slots / M)
    succ: np.ndarray           # int64 [L, C] successor cluster at the next layer
    cluster_tables: np.ndarray  # int64 [D, M] domain prior over clusters, as tables
    rho: float


def _domain_weights(spec: Any) -> np.ndarray:
    """float64 [D] arrival weights from {domain name: weight}."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"domains must be a non-empty dict of domain -> weight, got {spec!r}")
    w = np.zeros(len(DOMAINS))
    for name, weight in spec.items():
        if name not in DOMAINS:
            raise ValueError(f"unknown domain {name!r}; known: {list(DOMAINS)}")
        if weight < 0:
            raise ValueError(f"domain weight for {name!r} must be >= 0, got {weight}")
        w[DOMAINS.index(name)] = weight
    if w.sum() <= 0:
        raise ValueError("domains weights must not all be zero")
    return w / w.sum()


def _quantise(probs: np.ndarray, slots: int) -> np.ndarray:
    """Slot counts int64 [..., E] summing to `slots`, every entry >= 1 (largest remainder)."""
    num = probs.shape[-1]
    raw = probs / probs.sum(axis=-1, keepdims=True) * (slots - num)
    counts = np.floor(raw).astype(np.int64)
    short = (slots - num) - counts.sum(axis=-1, keepdims=True)  # [..., 1]
    order = np.argsort(-(raw - counts), axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num)[(None,) * (probs.ndim - 1)], axis=-1)
    return counts + (rank < short) + 1


def _tables(counts: np.ndarray) -> np.ndarray:
    """Inverse-CDF tables [..., M] from slot counts [..., E] that each sum to M."""
    lead, num = counts.shape[:-1], counts.shape[-1]
    flat = counts.reshape(-1, num)
    ids = np.tile(np.arange(num), flat.shape[0])
    return np.repeat(ids, flat.ravel()).reshape(*lead, -1)


def _build_world(num_layers: int, num_experts: int, params: dict) -> _World:
    rng = np.random.default_rng(int(params["model_seed"]))
    num_domains, num_clusters = len(DOMAINS), int(params["num_clusters"])
    cluster_size = min(int(params["cluster_size"]), num_experts)
    alpha = rng.uniform(params["alpha"] - params["alpha_spread"],
                        params["alpha"] + params["alpha_spread"], size=num_layers)  # [L]
    rank_of = np.argsort(rng.random((num_layers, num_domains + 1, num_experts)), axis=-1)
    log_zipf = -alpha[:, None, None] * np.log1p(rank_of)  # [L, D+1, E]
    log_pop = (1 - params["shared"]) * log_zipf[:, :num_domains] + \
        params["shared"] * log_zipf[:, num_domains:]  # [L, D, E]
    pref = np.zeros((num_layers, num_clusters, num_experts))
    chosen = np.argsort(rng.random((num_layers, num_clusters, num_experts)), axis=-1)
    np.put_along_axis(pref, chosen[..., :cluster_size], 1.0, axis=-1)  # [L, C, E]
    if params["temperature"] <= 0:
        raise ValueError(f"temperature must be > 0, got {params['temperature']}")
    if not 0 <= params["cluster_weight"] <= 1:
        raise ValueError(f"cluster_weight must lie in [0, 1], got {params['cluster_weight']}")
    logits = log_pop / params["temperature"]
    pop = np.exp(logits - logits.max(axis=-1, keepdims=True))
    pop /= pop.sum(axis=-1, keepdims=True)  # [L, D, E]
    weight = params["cluster_weight"]
    probs = (1 - weight) * pop[:, :, None, :] + weight * (pref / cluster_size)[:, None, :, :]
    counts = _quantise(probs.reshape(num_layers, num_domains * num_clusters, num_experts),
                       _TABLE_SLOTS)
    succ = np.stack([rng.permutation(num_clusters) for _ in range(num_layers)])  # [L, C]
    cluster_prior = rng.dirichlet(np.full(num_clusters, 0.5), size=num_domains)  # [D, C]
    return _World(
        num_experts=num_experts,
        num_clusters=num_clusters,
        tables=_tables(counts).astype(np.int16),
        probs=(counts / _TABLE_SLOTS).astype(np.float32),
        succ=succ,
        cluster_tables=_tables(_quantise(cluster_prior, _TABLE_SLOTS)),
        rho=float(params["rho"]),
    )


def _uniform_world(num_layers: int, num_experts: int) -> _World:
    counts = _quantise(np.ones((num_layers, 1, num_experts)), max(_TABLE_SLOTS, num_experts))
    return _World(num_experts=num_experts, num_clusters=1,
                  tables=_tables(counts).astype(np.int16),
                  probs=(counts / counts.sum(axis=-1, keepdims=True)).astype(np.float32),
                  succ=np.zeros((num_layers, 1), dtype=np.int64),
                  cluster_tables=np.zeros((len(DOMAINS), _TABLE_SLOTS), dtype=np.int64),
                  rho=1.0)


def _draw(rng: np.random.Generator, tables: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One sample per entry of rows from tables[rows] (inverse-CDF table look-up)."""
    return tables[rows, rng.integers(0, tables.shape[-1], size=rows.shape)]


# --------------------------------------------------------------------------------- workloads
def _decode_tokens(rng: np.random.Generator, world: _World, params: dict, workload: str,
                   num_steps: int, tokens_per_step: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Continuous batching: per token its domain and layer-0 cluster, int64 [N*T_step] each."""
    base = params["domains"]
    shift_step = None
    if workload == "shift":
        shift_step = params["shift_step"]
        if shift_step is None:  # default: step 200, or half way through shorter traces
            shift_step = min(200, num_steps // 2)
        shift_step = int(shift_step)
        if not 0 <= shift_step <= num_steps:
            raise ValueError(f"shift_step must lie in [0, num_steps={num_steps}], "
                             f"got {shift_step}")
        before, after = (_shifted_mix(base, params[k], params["shift_weight"])
                         for k in ("shift_from", "shift_to"))
        base = before
    repeat = workload == "repeat"
    stick, mix, mean_len = params["stick"], params["mix"], params["mean_len"]
    if mean_len < 1:
        raise ValueError(f"mean_len must be >= 1 step, got {mean_len}")
    log_base = np.log(np.maximum(base, 1e-12))
    ou = np.zeros_like(base)
    slots = tokens_per_step

    def arrivals(n: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dom = rng.choice(len(DOMAINS), size=n, p=weights)
        return dom, _draw(rng, world.cluster_tables, dom)

    if repeat:  # one prompt duplicated: one domain, one preferred cluster for everyone
        dom0 = int(np.argmax(base))
        pref0 = int(_draw(rng, world.cluster_tables, np.array([dom0]))[0])
    weights = base
    dom, pref = arrivals(slots, weights)
    if repeat:
        dom[:], pref[:] = dom0, pref0
    remaining = rng.geometric(1.0 / mean_len, size=slots)  # steady state: memoryless
    domain = np.empty((num_steps, slots), dtype=np.int64)
    cluster0 = np.empty((num_steps, slots), dtype=np.int64)
    tags = []
    for n in range(num_steps):
        if shift_step is not None and n == shift_step:
            log_base, ou = np.log(np.maximum(after, 1e-12)), np.zeros_like(after)
            remaining[:] = 0  # the whole batch is replaced by the new dataset
        # Arrival mix drifts: OU process around the base mix in log space.
        ou = (1 - params["drift_revert"]) * ou + params["drift"] * rng.standard_normal(ou.shape)
        weights = np.exp(log_base + ou) * (log_base > -20)
        weights /= weights.sum()
        done = np.flatnonzero(remaining <= 0)
        if done.size:
            d_new, p_new = arrivals(done.size, weights)
            if repeat:
                d_new[:], p_new[:] = dom0, pref0
            dom[done], pref[done] = d_new, p_new
            remaining[done] = rng.geometric(1.0 / mean_len, size=done.size)
        remaining -= 1
        # Token-level choices: preferred cluster or a fresh draw; own domain or the mix.
        tok_dom = dom.copy()
        if mix > 0:
            other = np.flatnonzero(rng.random(slots) < mix)
            tok_dom[other] = rng.choice(len(DOMAINS), size=other.size, p=weights)
        fresh = _draw(rng, world.cluster_tables, tok_dom)
        domain[n] = tok_dom
        cluster0[n] = np.where(rng.random(slots) < stick, pref, fresh)
        if shift_step is not None:
            tags.append(params["shift_from"] if n < shift_step else params["shift_to"])
        else:
            tags.append(DOMAINS[int(np.argmax(np.bincount(dom, minlength=len(DOMAINS))))])
    return domain.ravel(), cluster0.ravel(), tags


def _shifted_mix(base: np.ndarray, name: str, weight: float) -> np.ndarray:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {list(DOMAINS)}")
    out = (1 - weight) * base
    out[DOMAINS.index(name)] += weight
    return out / out.sum()


def _prefill_tokens(rng: np.random.Generator, world: _World, params: dict, num_steps: int,
                    tokens_per_step: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Chunked prefill of long prompts: per token its domain and layer-0 cluster.

    One queue of prompts (lognormal lengths, mean `prompt_len`) is cut into consecutive steps of
    tokens_per_step tokens, each split into one contiguous chunk per rank: a long prompt fills
    several ranks' chunks and several steps. A prompt has one domain and a narrow topic
    (Dirichlet(`topic_conc`) over the clusters) that its tokens draw their layer-0 cluster from.
    """
    weights, mix = params["domains"], params["mix"]
    prompt_len = params["prompt_len"]
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1 token, got {prompt_len}")
    need = num_steps * tokens_per_step
    domain = np.empty(need, dtype=np.int64)
    cluster0 = np.empty(need, dtype=np.int64)
    sigma = 0.8  # lognormal shape of prompt lengths
    pos = 0
    while pos < need:  # one long prompt after another
        length = max(1, int(rng.lognormal(np.log(prompt_len) - sigma**2 / 2, sigma)))
        length = min(length, need - pos)
        topic = rng.dirichlet(np.full(world.num_clusters, params["topic_conc"]))
        domain[pos:pos + length] = rng.choice(len(DOMAINS), p=weights)
        cluster0[pos:pos + length] = rng.choice(world.num_clusters, size=length, p=topic)
        pos += length
    if mix > 0:
        other = np.flatnonzero(rng.random(need) < mix)
        domain[other] = rng.choice(len(DOMAINS), size=other.size, p=weights)
        cluster0[other] = _draw(rng, world.cluster_tables, domain[other])
    tags = []
    for n in range(num_steps):
        present = np.bincount(domain[n * tokens_per_step:(n + 1) * tokens_per_step],
                              minlength=len(DOMAINS))
        tags.append(",".join(DOMAINS[d] for d in np.flatnonzero(present > tokens_per_step // 8)))
    return domain, cluster0, tags


# --------------------------------------------------------------------------------- sampling
def _sample_routes(rng: np.random.Generator, world: _World, domain: np.ndarray,
                   cluster0: np.ndarray, top_k: int, with_gates: bool,
                   progress: Callable[[int, int], None] | None,
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Top-K experts (int16 [T, L, K]) and optional gates (float32 [T, L, K]) per token."""
    num_tokens, num_layers = len(domain), world.tables.shape[0]
    experts = np.empty((num_tokens, num_layers, top_k), dtype=np.int16)
    gates = np.empty((num_tokens, num_layers, top_k), dtype=np.float32) if with_gates else None
    num_clusters = world.num_clusters
    for lo in range(0, num_tokens, _CHUNK_TOKENS):
        hi = min(lo + _CHUNK_TOKENS, num_tokens)
        dom, clu = domain[lo:hi], cluster0[lo:hi]
        for layer in range(num_layers):
            if layer:  # follow the successor map with probability rho, else redraw
                keep = rng.random(hi - lo) < world.rho
                clu = np.where(keep, world.succ[layer - 1][clu],
                               _draw(rng, world.cluster_tables, dom) if num_clusters > 1 else 0)
            types = dom * num_clusters + clu if num_clusters > 1 else np.zeros_like(dom)
            chosen = _top_k_distinct(rng, world.tables[layer], world.probs[layer], types, top_k)
            experts[lo:hi, layer] = chosen
            if gates is not None:
                p = world.probs[layer][types[:, None], chosen]  # [T_c, K]
                gates[lo:hi, layer] = p / p.sum(axis=1, keepdims=True)
        if progress is not None:
            progress(hi, num_tokens)
    return experts, gates


def _top_k_distinct(rng: np.random.Generator, table: np.ndarray, probs: np.ndarray,
                    types: np.ndarray, top_k: int) -> np.ndarray:
    """K distinct draws per token, without replacement, from table[types]: int16 [T, K].

    table: int16 [types, M]; probs: float32 [types, E], the distribution the table encodes.
    Repeats are redrawn; tokens still short after _MAX_REDRAWS rounds draw exactly from the
    renormalised distribution over the experts they have not chosen yet.
    """
    num = len(types)
    chosen = np.empty((num, top_k), dtype=np.int16)
    for k in range(top_k):
        cand = _draw(rng, table, types)
        if k:
            todo = np.flatnonzero((cand[:, None] == chosen[:, :k]).any(axis=1))
            for _ in range(_MAX_REDRAWS):
                if not todo.size:
                    break
                again = _draw(rng, table, types[todo])
                ok = ~(again[:, None] == chosen[todo, :k]).any(axis=1)
                cand[todo[ok]] = again[ok]
                todo = todo[~ok]
            if todo.size:
                w = probs[types[todo]].astype(np.float64)  # [R, E]
                np.put_along_axis(w, chosen[todo, :k].astype(np.int64), 0.0, axis=1)
                cum = np.cumsum(w, axis=1)
                u = rng.random(todo.size) * cum[:, -1]
                cand[todo] = np.minimum((cum <= u[:, None]).sum(axis=1), probs.shape[1] - 1)
        chosen[:, k] = cand
    return chosen
