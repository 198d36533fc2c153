"""Write a small random-weight MoE checkpoint of a named architecture, in the Hugging Face layout.

>>> path = write_random_checkpoint("qwen3_moe", "/tmp/tiny-moe")  # doctest: +SKIP
>>> model = probe.runtime.checkpoint.load_model(path)  # doctest: +SKIP

The directory gets a `config.json` as published on the Hub for that family (model_type,
architectures, the family's own field names) and one `model.safetensors` whose tensor names and
shapes are exactly the ones `probe.runtime.families.checkpoint_plan` reads: experts stored one
by one (`...experts.{e}.gate_proj.weight`; Mixtral's `block_sparse_moe.experts.{e}.w1`), GPT-OSS
experts stacked with gate/up interleaved, as in its dequantized release. transformers reads the
same files. Weights are normal(0, std) from a generator seeded by (seed, tensor name), norm
weights are 1, so the same arguments always give the same bytes.

The default vocabulary is the small model's byte vocabulary (`probe.runtime.smallmodel`,
272 ids), so `probe generate --prompt TEXT` can encode text for it. The weights are random: the
model's text is noise, but routing, expert parallelism and balancing run as on a real model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probe.runtime import smallmodel
from probe.runtime.config import MoEConfig
from probe.runtime.families import FP8_SCALE_SUFFIX, checkpoint_plan, config_from_hf
from probe.runtime.quant import FP8_BLOCK, MXFP4_BLOCK, quantize_fp8_block, quantize_mxfp4

__all__ = ["ARCHITECTURES", "RandomCheckpointSpec", "random_hf_config",
           "write_random_checkpoint"]

# model_type -> the transformers class name written to config.json's "architectures".
ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class RandomCheckpointSpec:
    """Sizes of a random checkpoint (glossary: D hidden, E experts, K top-k, F expert width).

    Attributes:
        num_layers: decoder layers. DeepSeek-V3 makes the first one dense when there are two or
            more (its `first_k_dense_replace`); every other family is MoE on every layer.
        num_experts: E routed experts per MoE layer.
        top_k: K experts per token.
        hidden_size: D; a multiple of 2 * num_heads (rotary embedding needs even head widths).
        expert_width: F, the intermediate width of one expert.
        num_heads, num_kv_heads: attention heads (DeepSeek's MLA uses num_heads for both).
        vocab_size: V; the default is the byte vocabulary of `probe.runtime.smallmodel`.
    """

    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 64
    expert_width: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = smallmodel.VOCAB_SIZE

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "expert_width",
                     "num_heads", "num_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.hidden_size % (2 * self.num_heads):
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of 2 * "
                             f"num_heads ({2 * self.num_heads}): head widths must be even")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")


def _special_ids(vocab_size: int) -> dict[str, int | None]:
    """The byte tokenizer's BOS/EOS/PAD when the vocabulary holds them, else none (a token id
    past the vocabulary would break transformers' embedding)."""
    if vocab_size > smallmodel.PAD_ID:
        return {"bos_token_id": smallmodel.BOS_ID, "eos_token_id": smallmodel.EOS_ID,
                "pad_token_id": smallmodel.PAD_ID}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def random_hf_config(arch: str, spec: RandomCheckpointSpec | None = None) -> dict[str, Any]:
    """The config.json dict of a random `arch` checkpoint of sizes `spec` (Hub field names)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    s = spec or RandomCheckpointSpec()
    d, heads = s.hidden_size, s.num_heads
    common: dict[str, Any] = {
        "model_type": arch, "architectures": [ARCHITECTURES[arch]],
        "vocab_size": s.vocab_size, "hidden_size": d, "num_hidden_layers": s.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": s.num_kv_heads,
        "num_experts_per_tok": s.top_k, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
        **_special_ids(s.vocab_size),
    }
    if arch == "qwen3_moe":
        return {**common, "head_dim": d // heads, "num_experts": s.num_experts,
                "moe_intermediate_size": s.expert_width, "intermediate_size": 4 * d,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                "rope_theta": 1_000_000.0, "use_sliding_window": False, "sliding_window": None,
                "attention_bias": False}
    if arch == "mixtral":
        return {**common, "num_local_experts": s.num_experts,
                "intermediate_size": s.expert_width, "rope_theta": 1_000_000.0,
                "sliding_window": None}
    if arch == "olmoe":
        return {**common, "num_experts": s.num_experts, "intermediate_size": s.expert_width,
                "norm_topk_prob": False, "clip_qkv": None, "rope_theta": 10_000.0,
                "attention_bias": False}
    if arch == "gpt_oss":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                       for i in range(s.num_layers)]
        return {**common, "head_dim": d // heads, "num_local_experts": s.num_experts,
                "intermediate_size": s.expert_width, "sliding_window": 128,
                "layer_types": layer_types, "attention_bias": True, "swiglu_limit": 7.0,
                "rms_norm_eps": 1e-5, "rope_theta": 150_000.0, "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "truncate": False,
                                 "original_max_position_embeddings": 4096}}
    # deepseek_v3: MLA attention (one kv head per query head), sigmoid group routing, a shared
    # expert, and a dense first layer.
    num_experts = s.num_experts
    n_group = 2 if num_experts % 2 == 0 and num_experts // 2 >= max(2, s.top_k) else 1
    return {**common, "num_key_value_heads": heads, "n_routed_experts": num_experts,
            "n_shared_experts": 1, "moe_intermediate_size": s.expert_width,
            "intermediate_size": 4 * d, "first_k_dense_replace": 1 if s.num_layers > 1 else 0,
            "n_group": n_group, "topk_group": 1, "routed_scaling_factor": 2.5,
            "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "q_lora_rank": d // 2, "kv_lora_rank": d // 2, "qk_rope_head_dim": d // heads,
            "qk_nope_head_dim": d // heads, "v_head_dim": d // heads, "rope_interleave": True,
            "rope_theta": 10_000.0, "rope_scaling": None, "attention_bias": False,
            "num_nextn_predict_layers": 0}


def _layout_hint(cfg: MoEConfig, shipped: bool) -> set[str]:
    """Tensor names that make `checkpoint_plan` pick the family's Hub layout."""
    if cfg.model_type == "mixtral":
        return {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in cfg.moe_layers}
    if cfg.model_type == "gpt_oss" and shipped:  # MXFP4 experts, as released
        return {f"model.layers.{i}.mlp.experts.gate_up_proj_blocks" for i in cfg.moe_layers}
    return set()  # per-expert tensors (GPT-OSS: its stacked, interleaved dequantized layout)


# The formats the families ship in (`weights="shipped"`): quantization_config and which tensors.
_SHIPPED = {
    "gpt_oss": {"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]},
    "deepseek_v3": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
}


def _shipped_tensors(arch: str, name: str, shape: tuple[int, ...], seed: int,
                     std: float) -> dict[str, torch.Tensor] | None:
    """The stored tensors of source `name` in the family's shipped format, or None when that
    tensor ships in plain floats. MXFP4: `*_blocks` from a dense [..., rows, cols] draw
    (its `*_scales` come with it); FP8: every projection matrix with its `_scale_inv`."""
    if arch == "gpt_oss" and name.endswith("_blocks"):
        dense = _random_tensor(name, (*shape[:-2], shape[-2] * MXFP4_BLOCK), seed, std)
        blocks, scales = quantize_mxfp4(dense)
        return {name: blocks, name.removesuffix("_blocks") + "_scales": scales}
    if arch == "gpt_oss" and name.endswith("_scales"):
        return {}  # written with its blocks
    if arch == "deepseek_v3" and len(shape) == 2 and name.endswith(
            ("_proj.weight", "_proj_with_mqa.weight")):
        weight, scale_inv = quantize_fp8_block(_random_tensor(name, shape, seed, std))
        return {name: weight, name + FP8_SCALE_SUFFIX: scale_inv}
    return None


def _seed_of(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    if name.endswith(("norm.weight", "layernorm.weight")):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_seed_of(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=g)


def write_random_checkpoint(arch: str, out: str | Path,
                            spec: RandomCheckpointSpec | None = None, *, seed: int = 0,
                            dtype: str = "fp32", std: float = 0.02,
                            weights: str = "dense", overwrite: bool = False) -> Path:
    """Write config.json and model.safetensors of a random `arch` model to directory `out`.

    Args:
        arch: a family of `probe.runtime.families.SUPPORTED` ("qwen3_moe", "gpt_oss",
            "mixtral", "olmoe", "deepseek_v3").
        out: directory to create (or an empty one); with `overwrite`, existing checkpoint files
            in it are replaced.
        spec: sizes; default `RandomCheckpointSpec()` (2 layers, 8 experts, top-2, D = 64).
        seed: seeds every tensor (with its name).
        dtype: "fp32" or "bf16", the stored dtype.
        std: standard deviation of the random weights (norm weights are 1).
        weights: "dense" (every tensor in `dtype`) or "shipped": the format the family is
            released in, with its quantization_config: GPT-OSS's experts in MXFP4
            (`*_blocks`, `*_scales`), DeepSeek-V3's projection matrices in block-scaled FP8
            (`weight_scale_inv` per 128 x 128 tile); other families have no such format.
    Returns:
        The checkpoint directory.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
    if not (isinstance(std, (int, float)) and std > 0):
        raise ValueError(f"std must be > 0, got {std!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out directory {out} is not empty; choose a new one, or "
                              "overwrite its checkpoint files (--force)")
    if weights not in ("dense", "shipped"):
        raise ValueError(f"weights must be 'dense' or 'shipped'; got {weights!r}")
    shipped = weights == "shipped"
    if shipped and arch not in _SHIPPED:
        raise ValueError(f"weights='shipped': {arch} has no quantized release format; "
                         f"families with one: {', '.join(_SHIPPED)}")
    config = random_hf_config(arch, spec)
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    if shipped:
        config["quantization_config"] = dict(_SHIPPED[arch])
    cfg = config_from_hf(config)
    tensors = {}
    for recipe in checkpoint_plan(cfg, _layout_hint(cfg, shipped)):
        for source in recipe.sources:
            packed = _shipped_tensors(arch, source.name, source.shape, seed, std) if shipped \
                else None
            if packed is not None:
                tensors.update({k: v.contiguous() for k, v in packed.items()})
                continue
            tensor = _random_tensor(source.name, source.shape, seed, std)
            tensors[source.name] = tensor.to(_DTYPES[dtype]).contiguous()
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors.index.json",):
        (out / stale).unlink(missing_ok=True)
    save_file(tensors, out / _WEIGHTS, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
