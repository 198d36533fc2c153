"""Lookahead predictor of the next MoE layer's routing (PROBE eq. 7).

Shape legend: T tokens, D model width, E routed experts, K experts per token (top-k),
H residual width, S source ranks, L MoE layers.

For MoE layer L the predictor sees h_{L-1}, the router input of layer L-1 (the hidden state
that is on hand while layer L-1 dispatches its tokens), and guesses layer L's router logits:

    logits_hat_L = (W_L h_{L-1} + b_L) + W2 silu(W1 h_{L-1})

(W_L, b_L) is a frozen clone of layer L's router; W2 starts at zero, so an untrained predictor
is exactly "apply layer L's router to layer L-1's hidden state" (the frozen prior).

Layer 0 has no previous MoE layer, so `PredictorSet` holds predictors for layers 1..L-1 only.
Layer 0's load is left to the caller: the runtime can run layer 0's own router on the token
embeddings as soon as they exist, or plan layer 0 from the previous step's load (the history
baseline in `probe.predictor.baselines`); the evaluation reports layer 0 with the history
baseline only.

Routing semantics: Qwen3-MoE takes softmax then top-k, GPT-OSS top-k then softmax. Both give the
same ids (top-k of the logits); only gate weights differ, which the planner never needs. Families
whose selection is not a plain top-k of the logits (DeepSeek-V3's group-limited routing with a
correction bias) pass their own `select(logits) -> ids` callable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FORMAT_VERSION", "LookaheadPredictor", "PredictorSet", "load_from_ids",
           "router_prior"]

FORMAT_VERSION = 1

Select = Callable[[torch.Tensor], torch.Tensor]


def load_from_ids(ids: torch.Tensor, src_rank: torch.Tensor, num_ranks: int,
                  num_experts: int) -> torch.Tensor:
    """Tokens per (source rank, expert) from routed ids, without a host synchronisation.

    ids: int64 [T, K] expert ids; src_rank: int [T] rank each token comes from.
    Returns int64 [S, E]. Uses index_add_ (not bincount) so it can be captured in a CUDA graph.
    """
    # ids + E * src in one kernel
    flat = torch.add(ids.to(torch.int64), src_rank.to(torch.int64)[:, None],
                     alpha=num_experts).reshape(-1)
    load = torch.zeros(num_ranks * num_experts, dtype=torch.int64, device=ids.device)
    load.index_add_(0, flat, torch.ones_like(flat))  # [S*E]
    return load.view(num_ranks, num_experts)


class LookaheadPredictor(nn.Module):
    """Predicts one MoE layer's router logits from the previous layer's router input.

    Args:
        router_weight: [E, D] weight of the router of the layer predicted (cloned, frozen).
        router_bias: [E] router bias, or None.
        hidden: width H of the SiLU residual MLP.
        top_k: K, experts per token.
        select: optional `select(logits [T, E]) -> ids [T, K]`; default is plain top-k.
        dtype: dtype of the clone and the residual (float32 by default, for training).
    """

    def __init__(self, router_weight: torch.Tensor, router_bias: torch.Tensor | None = None, *,
                 hidden: int = 256, top_k: int, select: Select | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(router_weight, torch.Tensor) or router_weight.ndim != 2:
            raise ValueError("router_weight must be a 2-D [E, D] tensor")
        num_experts, dim = router_weight.shape
        if router_bias is not None and (not isinstance(router_bias, torch.Tensor)
                                        or router_bias.shape != (num_experts,)):
            raise ValueError(f"router_bias must be a [E] = [{num_experts}] tensor or None")
        if not isinstance(hidden, int) or hidden <= 0:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not isinstance(top_k, int) or not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, {num_experts}], got {top_k!r}")
        self.num_experts, self.dim, self.hidden, self.top_k = num_experts, dim, hidden, top_k
        self.select = select
        device = router_weight.device
        # Frozen clone of the router: buffers, so optimizers never see them but state_dict does.
        self.register_buffer("router_weight", router_weight.detach().to(dtype).clone())
        bias = (torch.zeros(num_experts, dtype=dtype, device=device) if router_bias is None
                else router_bias.detach().to(dtype).clone())
        self.register_buffer("router_bias", bias)
        self.has_bias = router_bias is not None
        self.w1 = nn.Linear(dim, hidden, bias=True, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, num_experts, bias=True, device=device, dtype=dtype)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def prior_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The frozen router alone applied to h [T, D]: [T, E]."""
        h = h.to(self.router_weight.dtype)
        if self.has_bias:
            return F.linear(h, self.router_weight, self.router_bias)
        return F.linear(h, self.router_weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted logits [T, E] of the next layer from h [T, D] (router input of L-1)."""
        h = h.to(self.router_weight.dtype)
        return self.prior_logits(h) + self.w2(F.silu(self.w1(h)))  # [T, E]

    def _select(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        if self.select is not None and k == self.top_k:
            return self.select(logits)
        return torch.topk(logits, k, dim=-1).indices

    @torch.no_grad()
    def predict_topk(self, h: torch.Tensor, k: int | None = None, *,
                     fused: bool = False) -> torch.Tensor:
        """Predicted expert ids int64 [T, k] (k = top_k by default), best first.

        fused=True computes the logits with `fused_logits` (needs `fuse()` first).
        """
        logits = self.fused_logits(h) if fused else self(h)
        return self._select(logits, self.top_k if k is None else k)

    @torch.no_grad()
    def predict_load(self, h: torch.Tensor, src_rank: torch.Tensor, num_ranks: int, *,
                     fused: bool = False) -> torch.Tensor:
        """Predicted tokens per (source rank, expert), int64 [S, E].

        h: [T, D]; src_rank: int [T] in [0, num_ranks); fused: as in `predict_topk`.
        """
        if src_rank.shape != (h.shape[0],):
            raise ValueError(f"src_rank must be [T] = [{h.shape[0]}], got {tuple(src_rank.shape)}")
        return load_from_ids(self.predict_topk(h, fused=fused), src_rank, num_ranks,
                             self.num_experts)

    @torch.no_grad()
    def fuse(self) -> None:
        """Precompute the two-GEMM inference form used by `fused_logits`.

        Call again after any training step: the fused copy does not follow the parameters.
        """
        weight = torch.cat([self.router_weight, self.w1.weight])  # [E+H, D]
        bias = torch.cat([self.router_bias + self.w2.bias, self.w1.bias])  # [E+H]
        self._fused = (weight.t().contiguous(), bias, self.w2.weight.t().contiguous())

    @torch.no_grad()
    def fused_logits(self, h: torch.Tensor) -> torch.Tensor:
        """`forward` in two GEMMs (router and W1 in one, W2 accumulated onto the prior).

        Equal to `forward` up to float rounding. Needs `fuse()` first. Timed against `forward`
        on the H200 by experiments/predictor/predictor_cost.py (results/predictor/report.md).
        """
        fused = getattr(self, "_fused", None)
        if fused is None:
            raise RuntimeError("call fuse() before fused_logits()")
        weight_t, bias, w2_t = fused
        y = torch.addmm(bias, h.to(weight_t.dtype), weight_t)  # [T, E+H]
        prior, act = y[:, :self.num_experts], y[:, self.num_experts:]  # [T, E], [T, H]
        return torch.addmm(prior, F.silu(act), w2_t)  # [T, E]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.w1.parameters(), *self.w2.parameters()]

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token: router D*E, residual D*H + H*E."""
        return 2 * (self.dim * self.num_experts + self.dim * self.hidden
                    + self.hidden * self.num_experts)


class PredictorSet(nn.Module):
    """One `LookaheadPredictor` per MoE layer 1..L-1 (layer 0 has none; see module doc).

    Args:
        predictors: mapping layer index -> predictor of that layer.
        num_layers: L, MoE layers of the model.
    """

    def __init__(self, predictors: dict[int, LookaheadPredictor], num_layers: int) -> None:
        super().__init__()
        if not predictors:
            raise ValueError("predictors is empty")
        if any(not 1 <= layer < num_layers for layer in predictors):
            raise ValueError(f"predictor layers must lie in [1, {num_layers}), got "
                             f"{sorted(predictors)}")
        self.num_layers = num_layers
        self.layers = sorted(predictors)
        self.predictors = nn.ModuleDict({str(layer): predictors[layer] for layer in self.layers})
        first = predictors[self.layers[0]]
        self.top_k, self.num_experts, self.hidden = first.top_k, first.num_experts, first.hidden

    def __getitem__(self, layer: int) -> LookaheadPredictor:
        try:
            return self.predictors[str(layer)]
        except KeyError:
            raise KeyError(f"no predictor for layer {layer} (have {self.layers}; layer 0 has "
                           "none)") from None

    def forward(self, layer: int, h_prev: torch.Tensor) -> torch.Tensor:
        """Predicted logits [T, E] of `layer` from h_prev [T, D] (router input of layer-1)."""
        return self[layer](h_prev)

    @classmethod
    def from_routers(cls, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor | None] | None = None, *, top_k: int,
                     hidden: int = 256, layers: Iterable[int] | None = None,
                     select: Select | None = None,
                     dtype: torch.dtype = torch.float32) -> PredictorSet:
        """Predictors for `layers` (default 1..L-1) from the routers' weights [E, D] per layer."""
        num_layers = len(weights)
        if num_layers < 2:
            raise ValueError("need at least 2 MoE layers (layer 0 has no predictor)")
        if biases is None:
            biases = [None] * num_layers
        if len(biases) != num_layers:
            raise ValueError(f"biases has {len(biases)} entries, weights {num_layers}")
        layers = range(1, num_layers) if layers is None else list(layers)
        preds = {int(layer): LookaheadPredictor(weights[layer], biases[layer], hidden=hidden,
                                                top_k=top_k, select=select, dtype=dtype)
                 for layer in layers}
        return cls(preds, num_layers)

    @classmethod
    def from_model(cls, model, *, hidden: int = 256, layers: Iterable[int] | None = None,
                   dtype: torch.dtype = torch.float32) -> PredictorSet:
        """Predictors from a loaded MoE model (probe.runtime's model or a transformers model).

        Reads every MoE layer's router weight [E, D], bias [E] and top-k rule.
        """
        weights, biases, top_k, select = routers_of(model)
        return cls.from_routers(weights, biases, top_k=top_k, hidden=hidden, layers=layers,
                                select=select, dtype=dtype)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write weights (frozen clones included) to safetensors with a JSON header."""
        from safetensors.torch import save_file

        meta = {"format": "probe.predictor", "version": FORMAT_VERSION,
                "num_layers": self.num_layers, "layers": self.layers, "top_k": self.top_k,
                "hidden": self.hidden,
                "has_bias": {str(la): bool(self[la].has_bias) for la in self.layers}}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"probe": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, *, select: Select | None = None,
             device: str | torch.device = "cpu") -> PredictorSet:
        """Read a file written by `save` (no model needed: router clones are in the file)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"predictor file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("probe")
        if header is None:
            raise ValueError(f"{path}: not a probe predictor file (no 'probe' metadata)")
        meta = json.loads(header)
        if meta.get("format") != "probe.predictor":
            raise ValueError(f"{path}: metadata field 'format' is {meta.get('format')!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported version {meta.get('version')!r}")
        state = load_file(str(path), device=str(device))
        preds = {}
        for layer in meta["layers"]:
            key = f"predictors.{layer}."
            try:
                weight = state[key + "router_weight"]
                bias = state[key + "router_bias"] if meta["has_bias"][str(layer)] else None
                hidden = state[key + "w1.weight"].shape[0]
            except KeyError as err:
                raise ValueError(f"{path}: missing tensor {err.args[0]}") from None
            preds[layer] = LookaheadPredictor(weight, bias, hidden=hidden, top_k=meta["top_k"],
                                              select=select, dtype=weight.dtype)
        out = cls(preds, meta["num_layers"])
        out.load_state_dict(state, strict=True)
        return out


def router_prior(model) -> PredictorSet | None:
    """The frozen router prior of a probe.runtime model, to drive its expert-parallel runner.

    A `PredictorSet.from_model(model)` on the dtype and device of the model's expert weights
    (untrained, so layer l's prediction is layer l's router applied to h_{l-1}); None when the
    model has fewer than 2 MoE layers (nothing to predict from: the runner's history predictor
    applies). `probe.runtime` takes it as a `LoadPredictor`; build it before an `EPRunner`
    wraps the model's MoE blocks.
    """
    if model.cfg.num_moe_layers < 2:
        return None
    first_w = model.moe_blocks[0].w_gate_up
    return PredictorSet.from_model(model, dtype=first_w.dtype).to(first_w.device)


def routers_of(model) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int,
                               Select | None]:
    """(weights [E, D] per layer, biases [E] or None per layer, top_k, select) of a model.

    Understands probe.runtime's model (MoE layers exposing `router_weight`/`router_bias` or a
    `router` module, and `select`) and transformers' Qwen3-MoE / GPT-OSS / Mixtral / OLMoE models
    (`model.model.layers[i].mlp.gate` or `.router`). Raises TypeError naming what is missing.
    """
    moe = _moe_layers(model)
    if not moe:
        raise TypeError(
            f"cannot find MoE routers in a {type(model).__name__}: pass probe.runtime's model "
            "(probe.runtime.checkpoint.load_model) or a transformers MoE model, or build "
            "predictors with PredictorSet.from_routers(weights, biases, top_k=...)")
    weights, biases = [], []
    for block in moe:
        router = _router_module(block)
        weight = getattr(router, "weight", None)
        if weight is None:
            raise TypeError(f"router {type(router).__name__} has no weight")
        weights.append(weight.detach())
        bias = getattr(router, "bias", None)
        biases.append(None if bias is None else bias.detach())
    top_k = _top_k_of(model, moe[0])
    block_select = getattr(moe[0], "select", None)
    select = None
    if callable(block_select) and getattr(moe[0], "router_weight", None) is not None:
        # probe.runtime's select returns (ids, weights); the same rule holds on every layer.
        def select(logits: torch.Tensor) -> torch.Tensor:
            out = block_select(logits)
            return out[0] if isinstance(out, tuple) else out
    return weights, biases, top_k, select


def _moe_layers(model) -> list:
    for attr in ("moe_blocks", "moe_layers"):
        found = getattr(model, attr, None)
        if found is not None:
            return list(found() if callable(found) else found)
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return []
    out = []
    for layer in layers:
        for name in ("moe", "mlp", "block_sparse_moe"):
            block = getattr(layer, name, None)
            if block is not None and _router_module(block, strict=False) is not None:
                out.append(block)
                break
    return out


def _router_module(block, strict: bool = True):
    if getattr(block, "router_weight", None) is not None:
        return _Plain(block.router_weight, getattr(block, "router_bias", None))
    for name in ("router", "gate"):
        mod = getattr(block, name, None)
        weight = getattr(mod, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return mod
    if strict:
        raise TypeError(f"{type(block).__name__} has no router (router_weight, router or gate)")
    return None


class _Plain:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def _top_k_of(model, block) -> int:
    for obj in (block, getattr(block, "cfg", None), getattr(block, "router", None),
                getattr(block, "gate", None),
                getattr(model, "config", None), getattr(getattr(model, "model", None), "config",
                                                        None)):
        if obj is None:
            continue
        for name in ("top_k", "num_experts_per_tok", "experts_per_token"):
            value = getattr(obj, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise TypeError("cannot find the model's top-k (top_k / num_experts_per_tok)")
