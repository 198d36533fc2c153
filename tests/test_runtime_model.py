"""probe.runtime model + checkpoint loader against transformers' own implementations.

Tiny random checkpoints are built with transformers' config and model classes and saved with
`save_pretrained` (offline); our logits and router choices must match theirs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from probe.runtime.checkpoint import CheckpointReader, load_config, load_model
from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.families import config_from_hf
from probe.runtime.model import MoEBlock, rope_frequencies

transformers = pytest.importorskip("transformers")

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)

# family -> (config class, model class, router module class name, config overrides).
# Each exercises its family's options: dense layers, sliding windows, yarn, clip_qkv, renorm.
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter",
                  dict(num_experts=6, moe_intermediate_size=8, intermediate_size=24, head_dim=16,
                       mlp_only_layers=[1], norm_topk_prob=True, use_sliding_window=True,
                       sliding_window=5)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", "GptOssTopKRouter",
                dict(num_local_experts=6, intermediate_size=8, head_dim=8, sliding_window=4,
                     rope_parameters=dict(rope_type="yarn", factor=8.0, beta_fast=32.0,
                                          beta_slow=1.0, truncate=False, rope_theta=150000.0,
                                          original_max_position_embeddings=16))),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "MixtralTopKRouter",
                dict(num_local_experts=6, intermediate_size=8, sliding_window=5)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "OlmoeTopKRouter",
              dict(num_experts=6, intermediate_size=8, clip_qkv=0.8, norm_topk_prob=False,
                   pad_token_id=0, eos_token_id=1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3TopkRouter",
                    dict(num_key_value_heads=4, n_routed_experts=6, n_shared_experts=1,
                         intermediate_size=24, moe_intermediate_size=8, n_group=3, topk_group=2,
                         first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=12,
                         qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
                         rope_parameters=dict(rope_type="yarn", factor=4.0, mscale=1.0,
                                              mscale_all_dim=1.0, rope_theta=10000.0,
                                              original_max_position_embeddings=16))),
}


def build_reference(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with weights large enough to make routing matter."""
    cfg_name, model_name, _, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, transformers model re-loaded from it)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_reference(family).save_pretrained(path)
        model_cls = getattr(transformers, FAMILIES[family][1])
        out[family] = (path, model_cls.from_pretrained(path).eval())
    return out


def router_choices(ref, input_ids):
    """transformers' (router logits, top-k ids) per MoE layer, captured from its router module."""
    router_cls = FAMILIES[ref.config.model_type][2]
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append((out[0], out[2])))
             for m in ref.modules() if type(m).__name__ == router_cls]
    try:
        with torch.no_grad():
            logits = ref(input_ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_router_choices_match_transformers(checkpoints, family):
    path, ref = checkpoints[family]
    model = load_model(path)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_routing = router_choices(ref, input_ids)
    with torch.no_grad():
        out = model(input_ids, return_routing=True)
    assert out.logits.shape == (2, 11, VOCAB)
    assert (out.logits - ref_logits).abs().max().item() <= 1e-5
    assert len(out.routing) == len(ref_routing) == model.cfg.num_moe_layers
    for ours, (their_logits, their_ids) in zip(out.routing, ref_routing, strict=True):
        their_ids = their_ids.reshape(-1, model.cfg.top_k)
        # DeepSeek's reference takes an unsorted top-k: compare the chosen sets.
        assert torch.equal(ours.topk_ids.sort(-1).values, their_ids.sort(-1).values)
        assert (ours.logits - their_logits.reshape(ours.logits.shape)).abs().max() <= 1e-5


def test_family_options_are_read(checkpoints):
    qwen = load_config(checkpoints["qwen3_moe"][0])
    assert qwen.moe_layers == (0, 2) and qwen.dense_intermediate_size == 24
    assert qwen.sliding_window == 5 and qwen.norm_topk_prob and qwen.qk_norm == "head"
    oss = load_config(checkpoints["gpt_oss"][0])
    assert oss.sliding_layers == (0, 2) and oss.rope.kind == "yarn" and oss.attention_sinks
    assert oss.router_scoring == "topk_softmax" and oss.expert_bias and oss.router_bias
    olmoe = load_config(checkpoints["olmoe"][0])
    assert olmoe.clip_qkv == 0.8 and olmoe.qk_norm == "full"
    ds = load_config(checkpoints["deepseek_v3"][0])
    assert ds.attention == "mla" and ds.moe_layers == (1, 2) and ds.num_shared_experts == 1
    assert ds.router_scoring == "sigmoid_group" and (ds.n_group, ds.topk_group) == (3, 2)
    assert ds.attention_scale == pytest.approx(12 ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qwen.top_k = 3


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_kv_cache_and_ragged_batches_match_full_pass(checkpoints, family):
    model = load_model(checkpoints[family][0])
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits  # [2, 12, V]
        caches = [model.new_cache(), model.new_cache()]
        chunks = [model(ids[:, a:b], caches=caches).logits for a, b in ((0, 7), (7, 8), (8, 12))]
        assert caches[0].length == 12
        assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5
        # Sequences of different lengths and different cache depths in one flat batch.
        c0, c1 = model.new_cache(), model.new_cache()
        model(ids[0, :9], caches=[c0])
        model(ids[1, :3], caches=[c1])
        flat = torch.cat([ids[0, 9:], ids[1, 3:]])
        mixed = model(flat, seq_lens=[3, 9], caches=[c0, c1]).logits  # [12, V]
        assert (mixed[:3] - full[0, 9:]).abs().max() <= 1e-5
        assert (mixed[3:] - full[1, 3:]).abs().max() <= 1e-5
        last = model(ids, last_only=True).logits  # [2, V]
        assert (last - full[:, -1]).abs().max() <= 1e-5


def test_bf16_load_runs_close_to_fp32(checkpoints):
    path, _ = checkpoints["qwen3_moe"]
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_model(path)(ids).logits
        low = load_model(path, dtype=torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_sharded_checkpoint_loads_identically(checkpoints, tmp_path):
    path, ref = checkpoints["mixtral"]
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sharded, single = load_model(tmp_path)(ids).logits, load_model(path)(ids).logits
    assert torch.equal(sharded, single)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_slice_loads_only_listed_experts(checkpoints, family):
    path, _ = checkpoints[family]
    full = load_model(path)
    part = load_model(path, expert_ids=[4, 1, 2])
    block_full, block_part = full.moe_blocks[1], part.moe_blocks[1]
    assert block_part.expert_ids == (4, 1, 2)
    assert block_part.w_gate_up.shape[0] == 3 and block_part.w_down.shape[0] == 3
    for slot, e in enumerate((4, 1, 2)):
        assert torch.equal(block_part.w_gate_up[slot], block_full.w_gate_up[e])
        assert torch.equal(block_part.w_down[slot], block_full.w_down[e])
    x = torch.randn(5, full.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([2, 4, 4, 1, 2])
    with torch.no_grad():
        grouped = block_part.grouped_forward(x, rows)
        for r in range(5):
            one = block_full.expert_forward(x[r:r + 1], int(rows[r]))
            assert (grouped[r] - one[0]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="expert 0 is not held"):
            block_part.expert_forward(x, 0)
    # Routers are never sliced: every rank routes over all E experts.
    assert torch.equal(block_part.router_weight, block_full.router_weight)


def test_moe_block_pieces_reproduce_forward(checkpoints):
    model = load_model(checkpoints["olmoe"][0])
    block = model.moe_blocks[0]
    h = torch.randn(7, model.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, routing = block(h)
        logits = block.router(h)  # [T, E]
        ids, weights = block.select(logits)  # [T, K]
        y = torch.stack([torch.stack([block.expert_forward(h[t:t + 1], int(e))[0]
                                      for e in ids[t]]) for t in range(7)])  # [T, K, D]
        again = MoEBlock.combine(y, weights)
    assert ids.dtype == torch.int64 and ids.shape == (7, 2)
    assert torch.equal(ids, routing.topk_ids)
    assert (again - out).abs().max() <= 1e-5


def test_select_semantics_per_scoring():
    """softmax -> top-k (with and without renorm) vs top-k -> softmax, on hand-made logits."""
    base = dict(model_type="x", vocab_size=8, hidden_size=4, num_layers=1, num_heads=1,
                num_kv_heads=1, head_dim=4, num_experts=4, top_k=2, moe_intermediate_size=2,
                rope=RopeConfig(10_000.0), moe_layers=(0,))
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    with torch.device("meta"):
        plain = MoEBlock(MoEConfig(**base), 0)
        renorm = MoEBlock(MoEConfig(**base, norm_topk_prob=True), 0)
        oss = MoEBlock(MoEConfig(**base, router_scoring="topk_softmax"), 0)
    ids, w = plain.select(logits)
    assert ids.tolist() == [[0, 2]]
    assert torch.allclose(w[0], probs[[0, 2]])
    _, w = renorm.select(logits)
    assert torch.allclose(w[0], probs[[0, 2]] / probs[[0, 2]].sum())
    _, w = oss.select(logits)
    assert torch.allclose(w[0], torch.softmax(torch.tensor([2.0, 1.0]), -1))


def test_hub_style_configs_are_read():
    """Configs as published on the Hub: rope_theta / rope_scaling at top level, num_experts."""
    qwen = config_from_hf(dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, rope_theta=1000000.0,
        rope_scaling=None, use_sliding_window=False, sliding_window=None, rms_norm_eps=1e-6))
    assert qwen.rope.theta == 1e6 and qwen.num_moe_layers == 48 and qwen.head_dim == 128
    oss = config_from_hf(dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
        num_experts_per_tok=4, intermediate_size=2880, sliding_window=128, rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=4096, truncate=False),
        quantization_config={"quant_method": "mxfp4"}))
    assert oss.rope == RopeConfig(150000.0, "yarn", factor=32.0, original_max_position=4096,
                                  truncate=False)
    assert oss.sliding_layers == tuple(range(0, 24, 2))
    sparse = config_from_hf(dict(
        model_type="qwen3_moe", vocab_size=8, hidden_size=8, num_hidden_layers=4,
        num_attention_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
        intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert sparse.moe_layers == (1,) and sparse.dense_intermediate_size == 16


def test_yarn_frequencies_match_transformers():
    cfg = transformers.GptOssConfig(**COMMON, num_local_experts=4, head_dim=16)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours, scale = rope_frequencies(config_from_hf(cfg.to_dict()).rope, 16)
    assert torch.allclose(ours, theirs) and scale == pytest.approx(their_scale)


def test_stacked_expert_layout_loads(checkpoints, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2F, D]) reads like the Hub's."""
    path, _ = checkpoints["qwen3_moe"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    tensors = load_file(path / "model.safetensors")
    cfg = load_config(path)
    for i in cfg.moe_layers:
        p = f"model.layers.{i}.mlp.experts"
        gate = [tensors.pop(f"{p}.{e}.gate_proj.weight") for e in range(cfg.num_experts)]
        up = [tensors.pop(f"{p}.{e}.up_proj.weight") for e in range(cfg.num_experts)]
        down = [tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(cfg.num_experts)]
        tensors[f"{p}.gate_up_proj"] = torch.cat((torch.stack(gate), torch.stack(up)), dim=1)
        tensors[f"{p}.down_proj"] = torch.stack(down)
    save_file(tensors, tmp_path / "model.safetensors")
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(ids).logits, load_model(path)(ids).logits)
        part = load_model(tmp_path, expert_ids=[5, 0])
    assert torch.equal(part.moe_blocks[0].w_down, load_model(path).moe_blocks[0].w_down[[5, 0]])


# ------------------------------------------------------------------------------------ errors


def _copy_checkpoint(src, dst):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
    (path / "config.json").write_text(json.dumps(cfg))


def test_error_missing_files_name_the_path(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        load_model(tmp_path)
    shutil.copy(checkpoints["olmoe"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no weights in {tmp_path}"):
        load_model(tmp_path)


def test_error_unsupported_architecture(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["olmoe"][0], tmp_path)
    _edit_config(path, model_type="llama")
    with pytest.raises(ValueError, match="unsupported architecture: model_type 'llama'"):
        load_model(path)
    _edit_config(path, model_type="olmoe", quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(ValueError, match=r"quantized checkpoints \(mxfp4\)"):
        load_model(path)


def test_error_config_fields(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["mixtral"][0], tmp_path)
    _edit_config(path, hidden_size=None)
    with pytest.raises(ValueError, match="missing field hidden_size"):
        load_model(path)
    _edit_config(path, hidden_size=32, num_experts_per_tok=9)
    with pytest.raises(ValueError, match=r"top-k \(9\) exceeds the number of experts \(6\)"):
        load_model(path)
    _edit_config(path, num_experts_per_tok="2")
    with pytest.raises(ValueError, match="num_experts_per_tok must be int"):
        load_model(path)


def test_error_missing_and_unexpected_tensors(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["qwen3_moe"][0], tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 2 tensor\(s\).*"
                       r"model.layers.2.mlp.experts.3.up_proj.weight, model.norm.weight"):
        load_model(path)
    # Loading a slice that avoids the missing expert still needs the shared tensors.
    tensors["model.norm.weight"] = torch.ones(32)
    tensors["model.layers.0.mlp.shared_expert.weight"] = torch.ones(2, 2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="does not use: model.layers.0.mlp.shared_expert.weight"):
        load_model(path, expert_ids=[0, 1])


def test_error_config_does_not_match_tensors(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["gpt_oss"][0], tmp_path)
    _edit_config(path, intermediate_size=12)
    with pytest.raises(ValueError, match=r"config.json does not match the tensors.*"
                       r"gate_up_proj has shape \[6, 32, 16\], config implies \[6, 32, 24\]"):
        load_model(path)


def test_error_bad_arguments(checkpoints):
    path, _ = checkpoints["olmoe"]
    with pytest.raises(ValueError, match=r"expert_ids out of range \[0, 6\): \[6\]"):
        load_model(path, expert_ids=[0, 6])
    with pytest.raises(ValueError, match="expert_ids has duplicates"):
        load_model(path, expert_ids=[1, 1])
    with pytest.raises(TypeError, match="dtype must be one of"):
        load_model(path, dtype=torch.int8)
    model = load_model(path)
    with pytest.raises(ValueError, match="seq_lens must be positive and sum to 4"):
        model(torch.zeros(4, dtype=torch.long), seq_lens=[1, 2])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 61\)"):
        model(torch.full((1, 3), VOCAB))
    with pytest.raises(ValueError, match="got 1 caches for 2 sequences"):
        model(torch.zeros(2, 3, dtype=torch.long), caches=[model.new_cache()])


def test_deepseek_keeps_router_fp32_and_ignores_mtp_layers(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["deepseek_v3"][0], tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.ones(2, 2)  # a multi-token-prediction layer
    save_file(tensors, path / "model.safetensors")
    model = load_model(path, dtype=torch.bfloat16)
    block = model.moe_blocks[0]
    assert block.router_weight.dtype == torch.float32 and block.w_gate_up.dtype == torch.bfloat16
    assert block.router_correction_bias.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()


def test_gpt_oss_mxfp4_experts_dequantize_like_transformers(tmp_path):
    """Released gpt-oss checkpoints store experts in MXFP4; ours must equal transformers'
    dequantization, and the model must match transformers on the dequantized weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = build_reference("gpt_oss", intermediate_size=32)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    ref.save_pretrained(plain)
    tensors = load_file(plain / "model.safetensors")
    gen = torch.Generator().manual_seed(8)
    e, d, f = 6, 32, 32
    packed_tensors = {}
    for i in range(COMMON["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        for proj, rows, cols in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen,
                                   dtype=torch.int32).to(torch.uint8)
            scales = torch.randint(122, 129, (e, rows, cols // 32), generator=gen,
                                   dtype=torch.int32).to(torch.uint8)
            tensors[f"{p}.{proj}"] = convert_moe_packed_tensors(blocks, scales,
                                                                dtype=torch.float32)
            packed_tensors[f"{p}.{proj}_blocks"] = blocks
            packed_tensors[f"{p}.{proj}_scales"] = scales
    save_file(tensors, plain / "model.safetensors")
    packed.mkdir()
    quantized = {k: v for k, v in tensors.items()
                 if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**quantized, **packed_tensors}, packed / "model.safetensors")
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (packed / "config.json").write_text(json.dumps(cfg))

    ids = torch.randint(0, VOCAB, (1, 7), generator=gen)
    theirs = transformers.GptOssForCausalLM.from_pretrained(plain).eval()
    with torch.no_grad():
        ref_logits = theirs(ids).logits
        ours = load_model(packed)
        assert (ours(ids).logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(ours.moe_blocks[2].w_down, load_model(plain).moe_blocks[2].w_down)
    part = load_model(packed, expert_ids=[5, 2])
    assert torch.equal(part.moe_blocks[0].w_gate_up, ours.moe_blocks[0].w_gate_up[[5, 2]])


def test_verify_checkpoint_and_cli(checkpoints, tmp_path):
    import typer
    from typer.testing import CliRunner

    from probe.runtime.checkpoint import verify_checkpoint
    from probe.runtime.checkpoint_cli import register

    path, _ = checkpoints["deepseek_v3"]
    assert verify_checkpoint(path).model_type == "deepseek_v3"
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["checkpoint", "info", str(path), "--run"])
    assert result.exit_code == 0, result.output
    assert "6 / 2" in result.output and "finite=True" in result.output
    broken = _copy_checkpoint(checkpoints["olmoe"][0], tmp_path)
    _edit_config(broken, intermediate_size=12)
    result = CliRunner().invoke(app, ["checkpoint", "info", str(broken)])
    assert result.exit_code == 1 and "does not match the tensors" in result.output


def test_reader_reads_row_subsets(checkpoints):
    reader = CheckpointReader(checkpoints["gpt_oss"][0])
    name = "model.layers.0.mlp.experts.down_proj"
    full = reader.read(name)
    assert torch.equal(reader.read(name, [3, 4, 0, 5]), full[[3, 4, 0, 5]])
