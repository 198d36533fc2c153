"""Per-family knowledge: how a Hugging Face config maps to `MoEConfig`, and how checkpoint tensors
map to the parameters of `probe.runtime.model.MoETransformer`.

Supported `model_type`s (see `SUPPORTED`):
    qwen3_moe  softmax -> top-k (optional renorm), per-head q/k RMSNorm, dense layers through
               `mlp_only_layers` / `decoder_sparse_step`, optional sliding window on all layers.
    gpt_oss    top-k over logits -> softmax over K, router bias, experts with biases and a clamped
               SwiGLU (gate/up interleaved in the checkpoint), attention sinks and biases, sliding
               window on the layers typed "sliding_attention", yarn rope. MXFP4 expert weights
               (`*_blocks` / `*_scales`, as released) are dequantized on load.
    mixtral    softmax -> top-k -> renorm, optional sliding window.
    olmoe      softmax -> top-k (optional renorm), RMSNorm over all q / all k heads, clip_qkv.
    deepseek_v3  sigmoid scores + correction bias, group-limited top-k, routed scaling, shared
               experts, first_k_dense_replace dense layers, multi-head latent attention (MLA)
               with interleaved rope and yarn mscale; multi-token-prediction layers past
               num_hidden_layers are ignored.

A checkpoint plan is a list of `Recipe`s: each names the checkpoint tensors (with their expected
shapes, from the config) that build one model parameter. `probe.runtime.checkpoint` checks the
plan against the checkpoint (missing, unexpected, wrong shape) before reading any data.
Per-expert checkpoints (`...experts.{e}.gate_proj.weight`, the Hub layout) and stacked ones
(`...experts.gate_up_proj [E, 2F, D]`, transformers' in-memory layout) are both read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.quant import FP8_BLOCK, dequantize_mxfp4

__all__ = ["SUPPORTED", "Recipe", "Source", "checkpoint_plan", "config_from_hf",
           "dequantize_mxfp4"]

SUPPORTED = ("qwen3_moe", "gpt_oss", "mixtral", "olmoe", "deepseek_v3")

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Config readers


def _field(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING,
           *, alias: str | None = None) -> Any:
    """d[key] (or d[alias]) checked against `kind`; a clear ValueError when missing or mistyped."""
    if key in d and d[key] is not None:
        value = d[key]
    elif alias is not None and alias in d and d[alias] is not None:
        key, value = alias, d[alias]
    elif default is not _MISSING:
        return default
    else:
        names = key if alias is None else f"{key} (or {alias})"
        raise ValueError(f"config.json ({d.get('model_type')}): missing field {names}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config.json ({d.get('model_type')}): field {key} must be "
                         f"{getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _rope(d: dict[str, Any], default_theta: float) -> RopeConfig:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json: per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    max_pos = int(d.get("max_position_embeddings", 4096))
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, "linear", factor=float(params["factor"]))
    if kind != "yarn":
        raise ValueError(f"config.json: rope type {kind!r} is not supported "
                         "(supported: default, linear, yarn)")
    original = int(params.get("original_max_position_embeddings",
                              d.get("original_max_position_embeddings", max_pos)))
    factor = params.get("factor") or max_pos / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:
        def get_mscale(scale: float, m: float) -> float:
            import math
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return RopeConfig(
        theta, "yarn", factor=float(factor), original_max_position=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=None if attention_factor is None else float(attention_factor))


def _common(d: dict[str, Any], default_theta: float) -> dict[str, Any]:
    hidden = _field(d, "hidden_size", int)
    heads = _field(d, "num_attention_heads", int)
    head_dim = _field(d, "head_dim", int, None)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"config.json: hidden_size ({hidden}) is not a multiple of "
                             f"num_attention_heads ({heads}) and head_dim is not given")
        head_dim = hidden // heads
    return dict(
        model_type=d["model_type"],
        vocab_size=_field(d, "vocab_size", int),
        hidden_size=hidden,
        num_layers=_field(d, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=_field(d, "num_key_value_heads", int, heads),
        head_dim=head_dim,
        top_k=_field(d, "num_experts_per_tok", int),
        rope=_rope(d, default_theta),
        rms_norm_eps=_field(d, "rms_norm_eps", float, 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        extra={"architectures": d.get("architectures")},
    )


def _check_act(d: dict[str, Any]) -> None:
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only silu)")


def _qwen3_moe(d: dict[str, Any]) -> MoEConfig:
    _check_act(d)
    c = _common(d, 10_000.0)
    num_layers = c["num_layers"]
    num_experts = _field(d, "num_experts", int, alias="num_local_experts")
    step = _field(d, "decoder_sparse_step", int, 1)
    mlp_only = set(_field(d, "mlp_only_layers", list, []))
    moe_layers = tuple(i for i in range(num_layers)
                       if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    return MoEConfig(
        **c, num_experts=num_experts,
        moe_intermediate_size=_field(d, "moe_intermediate_size", int),
        dense_intermediate_size=_field(d, "intermediate_size", int, None),
        moe_layers=moe_layers, router_scoring="softmax_topk",
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        attention_bias=bool(d.get("attention_bias", False)), qk_norm="head",
        sliding_window=window, sliding_layers=tuple(range(num_layers)) if window else ())


def _gpt_oss(d: dict[str, Any]) -> MoEConfig:
    c = _common(d, 150_000.0)
    num_layers = c["num_layers"]
    layer_types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ValueError(f"config.json: layer_types has {len(layer_types)} entries for "
                         f"{num_layers} layers")
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"config.json: unsupported layer_types {sorted(unknown)}")
    window = _field(d, "sliding_window", int, None)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    return MoEConfig(
        **c, num_experts=_field(d, "num_local_experts", int, alias="num_experts"),
        moe_intermediate_size=_field(d, "intermediate_size", int),
        moe_layers=tuple(range(num_layers)), router_scoring="topk_softmax", router_bias=True,
        expert_act="clamped_swiglu", expert_bias=True,
        swiglu_alpha=_field(d, "swiglu_alpha", float, 1.702),
        swiglu_limit=_field(d, "swiglu_limit", float, 7.0),
        attention_bias=bool(d.get("attention_bias", True)), attention_sinks=True,
        sliding_window=window if sliding else None, sliding_layers=sliding if window else ())


def _mixtral(d: dict[str, Any]) -> MoEConfig:
    _check_act(d)
    c = _common(d, 1_000_000.0)
    window = _field(d, "sliding_window", int, None)
    return MoEConfig(
        **c, num_experts=_field(d, "num_local_experts", int, alias="num_experts"),
        moe_intermediate_size=_field(d, "intermediate_size", int),
        moe_layers=tuple(range(c["num_layers"])), router_scoring="softmax_topk",
        norm_topk_prob=True, sliding_window=window,
        sliding_layers=tuple(range(c["num_layers"])) if window else ())


def _olmoe(d: dict[str, Any]) -> MoEConfig:
    _check_act(d)
    c = _common(d, 10_000.0)
    clip = d.get("clip_qkv")
    return MoEConfig(
        **c, num_experts=_field(d, "num_experts", int, alias="num_local_experts"),
        moe_intermediate_size=_field(d, "intermediate_size", int),
        moe_layers=tuple(range(c["num_layers"])), router_scoring="softmax_topk",
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        attention_bias=bool(d.get("attention_bias", False)), qk_norm="full",
        clip_qkv=None if clip is None else float(clip))


def _deepseek_v3(d: dict[str, Any]) -> MoEConfig:
    _check_act(d)
    rope_dim = _field(d, "qk_rope_head_dim", int)
    c = _common({**d, "head_dim": rope_dim}, 10_000.0)
    heads = c["num_heads"]
    if c["num_kv_heads"] != heads:
        raise ValueError(f"config.json: MLA needs num_key_value_heads == num_attention_heads "
                         f"({heads}), got {c['num_kv_heads']}")
    nope = _field(d, "qk_nope_head_dim", int)
    scale = (nope + rope_dim) ** -0.5
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get(
            "mscale_all_dim"):
        import math

        factor = float(params["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= mscale * mscale
    first_dense = _field(d, "first_k_dense_replace", int, 0)
    n_group = _field(d, "n_group", int, 1)
    return MoEConfig(
        **c, num_experts=_field(d, "n_routed_experts", int, alias="num_local_experts"),
        moe_intermediate_size=_field(d, "moe_intermediate_size", int),
        dense_intermediate_size=_field(d, "intermediate_size", int, None),
        moe_layers=tuple(range(first_dense, c["num_layers"])), router_scoring="sigmoid_group",
        norm_topk_prob=bool(d.get("norm_topk_prob", True)), n_group=n_group,
        topk_group=_field(d, "topk_group", int, n_group),
        routed_scaling_factor=_field(d, "routed_scaling_factor", float, 1.0),
        score_correction_bias=True,
        num_shared_experts=_field(d, "n_shared_experts", int, 0),
        attention="mla", q_lora_rank=_field(d, "q_lora_rank", int, None),
        kv_lora_rank=_field(d, "kv_lora_rank", int), qk_nope_head_dim=nope,
        v_head_dim=_field(d, "v_head_dim", int),
        rope_interleave=bool(d.get("rope_interleave", True)), attention_scale=scale,
        attention_bias=bool(d.get("attention_bias", False)))


_READERS: dict[str, Callable[[dict[str, Any]], MoEConfig]] = {
    "qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss, "mixtral": _mixtral, "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}


def config_from_hf(config: dict[str, Any]) -> MoEConfig:
    """MoEConfig from a Hugging Face config dict; ValueError for unsupported or broken configs."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in _READERS:
        raise ValueError(f"unsupported architecture: model_type {model_type!r} "
                         f"(architectures {config.get('architectures')}); "
                         f"supported: {', '.join(SUPPORTED)}")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        if model_type == "gpt_oss" and method == "mxfp4":
            return _READERS[model_type](config)  # experts are dequantized on load
        if model_type == "deepseek_v3" and method == "fp8":
            block = config["quantization_config"].get("weight_block_size", [128, 128])
            if list(block) != [FP8_BLOCK, FP8_BLOCK]:
                raise ValueError(f"fp8 checkpoints need weight_block_size [{FP8_BLOCK}, "
                                 f"{FP8_BLOCK}], got {block}")
            return _READERS[model_type](config)  # fp8 weights are dequantized on load
        raise ValueError(f"quantized checkpoints ({method}) are not supported for "
                         f"{model_type}; dequantize to bf16/fp32 safetensors first")
    return _READERS[model_type](config)


# ---------------------------------------------------------------------------------------------
# Checkpoint plans


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor: its name, full shape, and (for stacked experts) the dim-0 rows
    to read."""

    name: str
    shape: tuple[int, ...]
    rows: tuple[int, ...] | None = None


def _first(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0]


@dataclass(frozen=True)
class Recipe:
    """Model parameter `target` = build([tensor of each source, rows already selected])."""

    target: str
    sources: tuple[Source, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor] = _first


def _copy(target: str, name: str, shape: tuple[int, ...]) -> Recipe:
    return Recipe(target, (Source(name, shape),))


def _stack_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    half = len(parts) // 2
    gate = torch.stack(parts[:half])  # [E_local, F, D]
    up = torch.stack(parts[half:])  # [E_local, F, D]
    return torch.cat((gate, up), dim=1)  # [E_local, 2F, D]


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(parts)  # [E_local, ...]


def _deinterleave_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    w = parts[0].transpose(1, 2)  # [E_local, 2F, D], rows alternate gate, up
    return torch.cat((w[:, 0::2], w[:, 1::2]), dim=1).contiguous()  # [E_local, 2F, D]


def _deinterleave_bias(parts: list[torch.Tensor]) -> torch.Tensor:
    b = parts[0]  # [E_local, 2F], alternating gate, up
    return torch.cat((b[:, 0::2], b[:, 1::2]), dim=1).contiguous()  # [E_local, 2F]


def _mxfp4_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    w = dequantize_mxfp4(parts[0], parts[1])  # [E_local, 2F, D], rows alternate gate, up
    return torch.cat((w[:, 0::2], w[:, 1::2]), dim=1).contiguous()  # [E_local, 2F, D]


def _mxfp4_down(parts: list[torch.Tensor]) -> torch.Tensor:
    return dequantize_mxfp4(parts[0], parts[1])  # [E_local, D, F]


def _transpose_experts(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].transpose(1, 2).contiguous()  # [E_local, D, F]


def _latent_attention(cfg: MoEConfig, i: int) -> list[Recipe]:
    d, h, qk = cfg.hidden_size, cfg.num_heads, cfg.qk_head_dim
    c, rot = cfg.kv_lora_rank, cfg.head_dim
    src, dst = f"model.layers.{i}.self_attn", f"layers.{i}.attn"
    weights = {"kv_a_proj": ("kv_a_proj_with_mqa", (c + rot, d)),
               "kv_a_norm": ("kv_a_layernorm", (c,)),
               "kv_b_proj": ("kv_b_proj", (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), c)),
               "o_proj": ("o_proj", (d, h * cfg.v_head_dim))}
    if cfg.q_lora_rank is None:
        weights["q_proj"] = ("q_proj", (h * qk, d))
    else:
        q = cfg.q_lora_rank
        weights |= {"q_a_proj": ("q_a_proj", (q, d)), "q_a_norm": ("q_a_layernorm", (q,)),
                    "q_b_proj": ("q_b_proj", (h * qk, q))}
    out = [_copy(f"{dst}.{ours}.weight", f"{src}.{theirs}.weight", shape)
           for ours, (theirs, shape) in weights.items()]
    if cfg.attention_bias:
        for ours in ("q_a_proj", "kv_a_proj", "o_proj"):
            if ours in weights:
                theirs, shape = weights[ours]
                out.append(_copy(f"{dst}.{ours}.bias", f"{src}.{theirs}.bias", shape[:1]))
    return out


def _attention(cfg: MoEConfig, i: int) -> list[Recipe]:
    if cfg.attention == "mla":
        return _latent_attention(cfg, i)
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    src, dst = f"model.layers.{i}.self_attn", f"layers.{i}.attn"
    shapes = {"q_proj": (q_out, d), "k_proj": (kv_out, d), "v_proj": (kv_out, d),
              "o_proj": (d, q_out)}
    out = []
    for proj, shape in shapes.items():
        out.append(_copy(f"{dst}.{proj}.weight", f"{src}.{proj}.weight", shape))
        if cfg.attention_bias:
            out.append(_copy(f"{dst}.{proj}.bias", f"{src}.{proj}.bias", shape[:1]))
    if cfg.qk_norm == "head":
        out.append(_copy(f"{dst}.q_norm.weight", f"{src}.q_norm.weight", (hd,)))
        out.append(_copy(f"{dst}.k_norm.weight", f"{src}.k_norm.weight", (hd,)))
    elif cfg.qk_norm == "full":
        out.append(_copy(f"{dst}.q_norm.weight", f"{src}.q_norm.weight", (q_out,)))
        out.append(_copy(f"{dst}.k_norm.weight", f"{src}.k_norm.weight", (kv_out,)))
    if cfg.attention_sinks:
        out.append(_copy(f"{dst}.sinks", f"{src}.sinks", (cfg.num_heads,)))
    return out


def _glu_experts(cfg: MoEConfig, i: int, ids: tuple[int, ...], prefix: str,
                 names: tuple[str, str, str], stacked: bool) -> list[Recipe]:
    """Experts of a silu-GLU family. names = (gate, up, down) per-expert leaf names."""
    d, f, e_all = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    dst = f"layers.{i}.moe"
    if stacked:
        return [
            Recipe(f"{dst}.w_gate_up", (Source(f"{prefix}.gate_up_proj", (e_all, 2 * f, d), ids),)),
            Recipe(f"{dst}.w_down", (Source(f"{prefix}.down_proj", (e_all, d, f), ids),)),
        ]
    gate, up, down = names
    gate_up_sources = tuple(Source(f"{prefix}.{e}.{gate}.weight", (f, d)) for e in ids) + tuple(
        Source(f"{prefix}.{e}.{up}.weight", (f, d)) for e in ids)
    down_sources = tuple(Source(f"{prefix}.{e}.{down}.weight", (d, f)) for e in ids)
    return [Recipe(f"{dst}.w_gate_up", gate_up_sources, _stack_gate_up),
            Recipe(f"{dst}.w_down", down_sources, _stack)]


def _gpt_oss_experts(cfg: MoEConfig, i: int, ids: tuple[int, ...],
                     names: set[str]) -> list[Recipe]:
    d, f, e_all = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    src, dst = f"model.layers.{i}.mlp", f"layers.{i}.moe"
    exp = f"{src}.experts"
    if f"{exp}.gate_up_proj_blocks" in names:  # MXFP4 (the released gpt-oss checkpoints)
        weights = [
            Recipe(f"{dst}.w_gate_up",
                   (Source(f"{exp}.gate_up_proj_blocks", (e_all, 2 * f, d // 32, 16), ids),
                    Source(f"{exp}.gate_up_proj_scales", (e_all, 2 * f, d // 32), ids)),
                   _mxfp4_gate_up),
            Recipe(f"{dst}.w_down",
                   (Source(f"{exp}.down_proj_blocks", (e_all, d, f // 32, 16), ids),
                    Source(f"{exp}.down_proj_scales", (e_all, d, f // 32), ids)),
                   _mxfp4_down),
        ]
    else:
        weights = [
            Recipe(f"{dst}.w_gate_up", (Source(f"{exp}.gate_up_proj", (e_all, d, 2 * f), ids),),
                   _deinterleave_gate_up),
            Recipe(f"{dst}.w_down", (Source(f"{exp}.down_proj", (e_all, f, d), ids),),
                   _transpose_experts),
        ]
    return [
        _copy(f"{dst}.router_weight", f"{src}.router.weight", (e_all, d)),
        _copy(f"{dst}.router_bias", f"{src}.router.bias", (e_all,)),
        *weights,
        Recipe(f"{dst}.b_gate_up",
               (Source(f"{exp}.gate_up_proj_bias", (e_all, 2 * f), ids),), _deinterleave_bias),
        Recipe(f"{dst}.b_down", (Source(f"{exp}.down_proj_bias", (e_all, d), ids),)),
    ]


def _dense_mlp(cfg: MoEConfig, i: int, src: str | None = None, dst: str | None = None,
               f: int | None = None) -> list[Recipe]:
    d, f = cfg.hidden_size, f or cfg.dense_intermediate_size
    src, dst = src or f"model.layers.{i}.mlp", dst or f"layers.{i}.mlp"
    return [_copy(f"{dst}.gate_proj.weight", f"{src}.gate_proj.weight", (f, d)),
            _copy(f"{dst}.up_proj.weight", f"{src}.up_proj.weight", (f, d)),
            _copy(f"{dst}.down_proj.weight", f"{src}.down_proj.weight", (d, f))]


def _moe_prefix(cfg: MoEConfig, i: int, names: set[str]) -> tuple[str, bool]:
    """(module prefix of layer i's MoE block, stacked?) as found in the checkpoint."""
    candidates = ["model.layers.{i}.mlp"]
    if cfg.model_type == "mixtral":
        candidates.insert(0, "model.layers.{i}.block_sparse_moe")
    for cand in candidates:
        prefix = cand.format(i=i)
        if f"{prefix}.experts.gate_up_proj" in names:
            return prefix, True
        if f"{prefix}.gate.weight" in names:
            return prefix, False
    return candidates[-1].format(i=i), False


def checkpoint_plan(cfg: MoEConfig, names: set[str],
                    expert_ids: Sequence[int] | None = None) -> list[Recipe]:
    """Recipes for every model parameter, reading only `expert_ids` (default: all experts).

    names: tensor names present in the checkpoint (used to pick its expert layout).
    """
    ids = tuple(range(cfg.num_experts)) if expert_ids is None else tuple(expert_ids)
    d = cfg.hidden_size
    plan = [_copy("embed.weight", "model.embed_tokens.weight", (cfg.vocab_size, d)),
            _copy("norm.weight", "model.norm.weight", (d,))]
    if not cfg.tie_word_embeddings:
        plan.append(_copy("lm_head.weight", "lm_head.weight", (cfg.vocab_size, d)))
    for i in range(cfg.num_layers):
        plan.append(_copy(f"layers.{i}.attn_norm.weight",
                          f"model.layers.{i}.input_layernorm.weight", (d,)))
        plan.append(_copy(f"layers.{i}.mlp_norm.weight",
                          f"model.layers.{i}.post_attention_layernorm.weight", (d,)))
        plan += _attention(cfg, i)
        if i not in cfg.moe_layers:
            plan += _dense_mlp(cfg, i)
        elif cfg.model_type == "gpt_oss":
            plan += _gpt_oss_experts(cfg, i, ids, names)
        else:
            prefix, stacked = _moe_prefix(cfg, i, names)
            plan.append(_copy(f"layers.{i}.moe.router_weight", f"{prefix}.gate.weight",
                              (cfg.num_experts, d)))
            leaves = ("w1", "w3", "w2") if prefix.endswith("block_sparse_moe") else (
                "gate_proj", "up_proj", "down_proj")
            plan += _glu_experts(cfg, i, ids, f"{prefix}.experts", leaves, stacked)
            if cfg.score_correction_bias:
                plan.append(_copy(f"layers.{i}.moe.router_correction_bias",
                                  f"{prefix}.gate.e_score_correction_bias", (cfg.num_experts,)))
            if cfg.num_shared_experts:
                plan += _dense_mlp(cfg, i, f"{prefix}.shared_experts", f"layers.{i}.moe.shared",
                                   cfg.moe_intermediate_size * cfg.num_shared_experts)
    return plan


FP8_SCALE_SUFFIX = "_scale_inv"  # DeepSeek's FP8 release: W.weight has W.weight_scale_inv


def ignorable(cfg: MoEConfig, name: str) -> bool:
    """Checkpoint tensors that carry nothing the model needs (block-scaled FP8 scales are
    read with their weight, not on their own)."""
    if name.endswith(("rotary_emb.inv_freq", FP8_SCALE_SUFFIX)) or (
            cfg.tie_word_embeddings and name == "lm_head.weight"):
        return True
    # DeepSeek's multi-token-prediction layers sit after the last decoder layer.
    parts = name.split(".")
    return (cfg.model_type == "deepseek_v3" and len(parts) > 2 and parts[:2] == ["model", "layers"]
            and parts[2].isdigit() and int(parts[2]) >= cfg.num_layers)


def fp32_params(cfg: MoEConfig, target: str) -> bool:
    """Parameters kept in fp32 whatever the load dtype (DeepSeek's router, like the reference)."""
    return cfg.router_scoring == "sigmoid_group" and target.endswith(
        (".router_weight", ".router_correction_bias"))
