"""`MoEConfig`: the one frozen description of an MoE decoder that `probe.runtime.model` builds.

Built from a Hugging Face `config.json` dict by `probe.runtime.families.config_from_hf(d)`, where
the per-family readers live (this module imports nothing from them). Names follow the glossary:
D hidden, E experts, K top-k, F expert intermediate width, L MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MoEConfig", "RopeConfig"]

ROUTER_SCORINGS = ("softmax_topk", "topk_softmax", "sigmoid_group")
ATTENTIONS = ("gqa", "mla")
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
        router_scoring: "softmax_topk" (softmax over E, then top-k; Qwen3-MoE, Mixtral, OLMoE),
            "topk_softmax" (top-k over logits, softmax over the K picked; GPT-OSS) or
            "sigmoid_group" (sigmoid scores plus a correction bias pick the top `topk_group` of
            `n_group` expert groups, then top-k inside them; DeepSeek-V3).
        norm_topk_prob: renormalise the K picked weights to sum to 1 (not for topk_softmax).
        router_bias: the router linear layer has a bias [E].
        n_group, topk_group: expert groups and groups kept per token (sigmoid_group).
        routed_scaling_factor: multiplies the K weights (sigmoid_group).
        score_correction_bias: a bias [E] added to the scores for the choice only
            (sigmoid_group; DeepSeek's e_score_correction_bias).
        num_shared_experts: always-active experts, fused into one MLP of width
            num_shared_experts * F whose output adds to the routed experts' output.
        expert_act: "silu_glu" (silu(gate) * up) or "clamped_swiglu" (GPT-OSS).
        expert_bias: experts carry biases on gate/up and down projections.
        swiglu_alpha, swiglu_limit: GPT-OSS clamped SwiGLU constants.
        attention_bias: q/k/v/o projections carry biases.
        attention: "gqa" (grouped-query attention) or "mla" (DeepSeek multi-head latent
            attention; then head_dim is the rotary part of a query/key head).
        q_lora_rank, kv_lora_rank, qk_nope_head_dim, v_head_dim: MLA low-rank widths.
        rope_interleave: rotary pairs are interleaved (x0, x1), (x2, x3), ... (MLA).
        attention_scale: softmax scale; None means 1/sqrt(query-key head width).
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
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False
    num_shared_experts: int = 0
    expert_act: str = "silu_glu"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = False
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    attention_scale: float | None = None
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
        if self.router_scoring == "sigmoid_group" and (
                self.n_group <= 0 or self.num_experts % self.n_group
                or not 0 < self.topk_group <= self.n_group
                or self.top_k > self.topk_group * (self.num_experts // self.n_group)):
            raise ValueError(f"config: n_group ({self.n_group}) must divide num_experts "
                             f"({self.num_experts}) and topk_group ({self.topk_group}) groups must "
                             f"hold at least top-k ({self.top_k}) experts")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"config: attention must be one of {ATTENTIONS}")
        if self.attention == "mla" and (self.kv_lora_rank <= 0 or self.v_head_dim <= 0
                                        or self.qk_nope_head_dim < 0):
            raise ValueError("config: MLA needs kv_lora_rank > 0, v_head_dim > 0 and "
                             "qk_nope_head_dim >= 0")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"config: qk_norm must be one of {QK_NORMS}")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("config: sliding_layers given without a sliding_window")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config: sliding_window must be > 0, got {self.sliding_window}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"config: rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    @property
    def num_moe_layers(self) -> int:
        """L, the number of MoE layers."""
        return len(self.moe_layers)

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head (MLA: the non-rotary part plus the rotary part)."""
        return self.qk_nope_head_dim + self.head_dim if self.attention == "mla" else self.head_dim

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
