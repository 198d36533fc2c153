"""`MoEConfig`: the one frozen description of an MoE decoder that `probe.runtime.model` builds.

Built from a Hugging Face `config.json` dict with `MoEConfig.from_hf(d)`; the per-family readers
live in `probe.runtime.families`. Names follow the glossary: D hidden, E experts, K top-k,
F expert intermediate width, L MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MoEConfig", "RopeConfig"]

ROUTER_SCORINGS = ("softmax_topk", "topk_softmax")
EXPERT_ACTS = ("silu_glu", "clamped_swiglu")
QK_NORMS = ("none", "head", "full")
ROPE_KINDS = ("default", "linear", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters.

    Attributes:
        theta: base wavelength.
        kind: "default", "linear" (positions divided by `factor`) or "yarn".
        factor: context extension factor (linear, yarn).
        original_max_position: pre-extension context length (yarn).
        beta_fast, beta_slow: yarn ramp bounds, in rotations.
        truncate: yarn rounds the ramp bounds to whole dimensions when True.
        attention_factor: yarn cos/sin scale; None derives it from `factor`.
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope type {self.kind!r} is not supported; supported: {ROPE_KINDS}")
        if not self.theta > 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta!r}")
        if self.kind == "yarn" and self.original_max_position is None:
            raise ValueError("yarn rope needs original_max_position_embeddings")


@dataclass(frozen=True)
class MoEConfig:
    """Architecture of a decoder-only MoE transformer (all families share this one shape).

    Attributes:
        model_type: Hugging Face `model_type` it was read from ("qwen3_moe", "gpt_oss", ...).
        vocab_size: V.
        hidden_size: D.
        num_layers: decoder layers, dense and MoE.
        num_heads, num_kv_heads, head_dim: attention shape (grouped-query when kv < heads).
        num_experts: E routed experts per MoE layer.
        top_k: K experts per token.
        moe_intermediate_size: F, the intermediate width of one expert.
        dense_intermediate_size: intermediate width of the dense MLP layers (None if none).
        moe_layers: indices of the decoder layers whose MLP is an MoE block (the others are dense).
        router_scoring: "softmax_topk" (softmax over E, then top-k; Qwen3-MoE, Mixtral, OLMoE) or
            "topk_softmax" (top-k over logits, softmax over the K picked; GPT-OSS).
        norm_topk_prob: renormalise the K picked probabilities to sum to 1 (softmax_topk only).
        router_bias: the router linear layer has a bias [E].
        expert_act: "silu_glu" (silu(gate) * up) or "clamped_swiglu" (GPT-OSS).
        expert_bias: experts carry biases on gate/up and down projections.
        swiglu_alpha, swiglu_limit: GPT-OSS clamped SwiGLU constants.
        attention_bias: q/k/v/o projections carry biases.
        qk_norm: "none", "head" (RMSNorm over head_dim, Qwen3) or "full" (RMSNorm over all
            heads of q and of k, before the head split, OLMoE).
        clip_qkv: clamp q, k, v to [-clip, clip] after projection (OLMoE), or None.
        attention_sinks: one learned sink logit per head joins the softmax (GPT-OSS).
        sliding_window: window length W (a query sees keys at positions > pos - W), or None.
        sliding_layers: decoder layers that use the sliding window.
        rope: rotary embedding parameters.
        rms_norm_eps: epsilon of every RMSNorm.
        tie_word_embeddings: the LM head shares the embedding matrix.
        max_position_embeddings: advertised context length (informational).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    rope: RopeConfig
    dense_intermediate_size: int | None = None
    moe_layers: tuple[int, ...] = ()
    router_scoring: str = "softmax_topk"
    norm_topk_prob: bool = False
    router_bias: bool = False
    expert_act: str = "silu_glu"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = False
    qk_norm: str = "none"
    clip_qkv: float | None = None
    attention_sinks: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "top_k", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"config: top-k ({self.top_k}) exceeds the number of experts ({self.num_experts})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim ({self.head_dim}) must be even (rotary embedding)")
        if not self.moe_layers:
            raise ValueError("config: the model has no MoE layer")
        for name in ("moe_layers", "sliding_layers"):
            layers = getattr(self, name)
            if list(layers) != sorted(set(layers)) or not all(
                    0 <= i < self.num_layers for i in layers):
                raise ValueError(f"config: {name} must be sorted distinct layer indices in "
                                 f"[0, {self.num_layers}), got {layers!r}")
        if len(self.moe_layers) < self.num_layers and not self.dense_intermediate_size:
            raise ValueError("config: dense layers present but no intermediate_size for them")
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"config: router_scoring must be one of {ROUTER_SCORINGS}")
        if self.expert_act not in EXPERT_ACTS:
            raise ValueError(f"config: expert_act must be one of {EXPERT_ACTS}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"config: qk_norm must be one of {QK_NORMS}")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("config: sliding_layers given without a sliding_window")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config: sliding_window must be > 0, got {self.sliding_window}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"config: rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> MoEConfig:
        """Read a Hugging Face `config.json` dict (see `probe.runtime.families.SUPPORTED`)."""
        from probe.runtime.families import config_from_hf

        return config_from_hf(config)

    @property
    def num_moe_layers(self) -> int:
        """L, the number of MoE layers."""
        return len(self.moe_layers)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def moe_index(self, layer: int) -> int:
        """Position of decoder layer `layer` among the MoE layers (0..L-1)."""
        try:
            return self.moe_layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} is not an MoE layer") from None
