"""Expert weight formats: MXFP4 and block-scaled FP8 round trips, byte counts, bad input."""

from __future__ import annotations

import pytest
import torch

from probe.runtime.quant import (
    FORMATS,
    PackedWeight,
    dequantize_fp8_block,
    dequantize_mxfp4,
    quantize_fp8_block,
    quantize_mxfp4,
    weight_bytes,
)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _nearest_e2m1_error(x: torch.Tensor) -> torch.Tensor:
    """Per element: the distance from |x| to the nearest e2m1 magnitude (x already scaled)."""
    return (x.abs()[..., None] - E2M1).abs().amin(dim=-1)


def test_mxfp4_grid_values_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (6, 64), generator=gen)
    signs = torch.randint(0, 2, (6, 64), generator=gen) * 2 - 1
    exps = torch.randint(-6, 6, (6, 2), generator=gen)
    # each block of 32 shares a power-of-two scale; make the block's max 6 so the scale is exact
    codes[:, 0] = 7
    codes[:, 32] = 7
    w = E2M1[codes] * signs * torch.ldexp(torch.ones(6, 64), exps.repeat_interleave(32, dim=1))
    blocks, scales = quantize_mxfp4(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (6, 2, 16)
    assert scales.shape == (6, 2)
    assert torch.equal(dequantize_mxfp4(blocks, scales), w)


def test_mxfp4_rounds_to_the_nearest_code_of_its_block_scale():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=gen) * torch.logspace(-3, 2, 16)[:, None]
    blocks, scales = quantize_mxfp4(w)
    back = dequantize_mxfp4(blocks, scales)
    scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127)
    scale = scale.repeat_interleave(32, dim=-1)
    # the scaled block max fits the grid, and every value is within the nearest-code distance
    assert (w.abs() / scale <= 6.0).all()
    err = (back - w).abs() / scale
    assert torch.allclose(err, _nearest_e2m1_error(w / scale), atol=1e-6)
    # the scale is the smallest that fits: half of it would overflow 6 in every block
    block_max = (w.abs() / scale).reshape(16, 4, 32).amax(-1)
    assert (block_max > 3.0).all()


def test_fp8_block_round_trip_within_e4m3_precision():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 300, 200, generator=gen)  # not a multiple of 128: partial tiles
    w[0, :128, :128] *= 1e-4  # one tile far smaller than the rest keeps its own scale
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.shape == (3, 3, 2)
    back = dequantize_fp8_block(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normal values
    big = w.abs() > 1e-2 * w.abs().amax()
    rel = ((back - w).abs() / w.abs())[big & (w.abs() > 0)]
    assert rel.max() <= 2.0 ** -4
    tile, tile_back = w[0, :128, :128], back[0, :128, :128]
    keep = tile.abs() > 1e-2 * tile.abs().amax()
    assert ((tile_back - tile).abs() / tile.abs())[keep].max() <= 2.0 ** -4


def test_weight_bytes_match_the_stored_tensors():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 192, 256, generator=gen)
    for fmt in FORMATS:
        packed = PackedWeight.pack(w, fmt)
        assert packed.nbytes == 4 * weight_bytes(fmt, 192, 256)
        assert packed.expert_bytes() == weight_bytes(fmt, 192, 256)
    assert weight_bytes("mxfp4", 2880, 2880) == 2880 * 2880 * 17 // 32
    assert weight_bytes("fp8_block", 2048, 7168) == 2048 * 7168 + 4 * 16 * 56


def test_packed_rows_keep_the_format_and_select_experts():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 64, 64, generator=gen)
    for fmt in ("mxfp4", "fp8_block", "bf16"):
        packed = PackedWeight.pack(w, fmt)
        sub = packed.rows([3, 1])
        assert sub.fmt == fmt and sub.shape == (2, 64, 64)
        assert sub.nbytes == 2 * packed.expert_bytes()
        assert torch.equal(sub.dense(), packed.dense()[[3, 1]])
        assert packed.rows([]).nbytes == 0


@pytest.mark.parametrize("call, match", [
    (lambda: weight_bytes("int3", 4, 4), "unknown weight format"),
    (lambda: weight_bytes("mxfp4", 4, 40), "divisible by 32"),
    (lambda: quantize_mxfp4(torch.full((2, 32), float("nan"))), "NaN"),
    (lambda: quantize_fp8_block(torch.tensor([float("inf")] * 4).reshape(2, 2)), "NaN or inf"),
    (lambda: dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8),
                              torch.zeros(2, 4, dtype=torch.uint8)), "do not fit"),
    (lambda: dequantize_fp8_block(torch.zeros(4, 4), torch.ones(1, 1)), "float8_e4m3fn"),
    (lambda: dequantize_fp8_block(torch.zeros(4, 4).to(torch.float8_e4m3fn), torch.ones(2, 1)),
     "does not fit"),
    (lambda: PackedWeight.pack(torch.zeros(4, 4), "bf16"), r"\[E, N, K\]"),
    (lambda: PackedWeight.pack(torch.ones(2, 4, 32), "mxfp4").rows([2]), "indices"),
])
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_model_spec_counts_the_bytes_of_its_weight_format(tmp_path):
    import dataclasses

    from probe.specs import load_spec, model_preset, save_spec

    base = model_preset("gpt-oss-120b")
    assert base.weight_format is None and base.expert_bytes == 3 * 2880 * 2880 * 2
    mx = dataclasses.replace(base, weight_format="mxfp4")
    assert mx.expert_bytes == 3 * weight_bytes("mxfp4", 2880, 2880)
    assert mx.expert_bytes / base.expert_bytes == pytest.approx(17 / 64)
    path = tmp_path / "m.json"
    save_spec(mx, path)
    assert load_spec(path) == mx
    with pytest.raises(ValueError, match="unknown weight format"):
        dataclasses.replace(base, weight_format="fp4")


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_shipped_format_checkpoint_loads_like_its_dequantized_twin(arch, tmp_path):
    """A random checkpoint in the family's release format (MXFP4 experts / FP8 projections)
    gives the same logits as a dense checkpoint written from its tensors dequantized here."""
    import json

    from safetensors.torch import load_file, save_file

    from probe.runtime.checkpoint import load_model
    from probe.runtime.random_checkpoint import RandomCheckpointSpec, write_random_checkpoint

    spec = RandomCheckpointSpec(num_layers=2, num_experts=4, top_k=2, hidden_size=128,
                                expert_width=64, num_heads=4, num_kv_heads=2)
    packed = write_random_checkpoint(arch, tmp_path / "packed", spec, weights="shipped")
    stored = load_file(packed / "model.safetensors")
    config = json.loads((packed / "config.json").read_text())
    dense = {}
    if arch == "gpt_oss":
        assert config["quantization_config"]["quant_method"] == "mxfp4"
        for name, t in stored.items():
            if name.endswith("_blocks"):
                base = name.removesuffix("_blocks")
                w = dequantize_mxfp4(t, stored[base + "_scales"])  # [E, rows, cols]
                dense[base] = w.transpose(1, 2).contiguous()  # the dense release layout
            elif not name.endswith("_scales"):
                dense[name] = t
        assert any(t.dtype == torch.uint8 for t in stored.values())
    else:
        assert config["quantization_config"]["weight_block_size"] == [128, 128]
        for name, t in stored.items():
            if t.dtype == torch.float8_e4m3fn:
                dense[name] = dequantize_fp8_block(t, stored[name + "_scale_inv"])
            elif not name.endswith("_scale_inv"):
                dense[name] = t
        assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) >= 10
    (tmp_path / "dense").mkdir()
    save_file(dense, tmp_path / "dense" / "model.safetensors")
    del config["quantization_config"]
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    got = load_model(packed)(ids).logits
    want = load_model(tmp_path / "dense")(ids).logits
    assert torch.equal(got, want)


def test_fp8_weight_without_its_scale_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from probe.runtime.checkpoint import CheckpointError, load_model
    from probe.runtime.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint("deepseek_v3", tmp_path / "ck", weights="shipped")
    stored = load_file(path / "model.safetensors")
    victim = next(n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn)
    del stored[victim + "_scale_inv"]
    save_file(stored, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{victim} has no {victim}_scale_inv"):
        load_model(path)
    with pytest.raises(ValueError, match="no quantized release format"):
        write_random_checkpoint("qwen3_moe", tmp_path / "q", weights="shipped")


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8_block"])
def test_grouped_experts_take_packed_weights(fmt):
    """Experts kept in a storage format compute what the same experts dequantized compute."""
    from probe.runtime.experts import GroupedExperts, loop_experts

    g = torch.Generator().manual_seed(5)
    e, d, f = 6, 64, 32
    gate_up = PackedWeight.pack(torch.randn(e, 2 * f, d, generator=g) * 0.1, fmt)
    down = PackedWeight.pack(torch.randn(e, d, f, generator=g) * 0.1, fmt)

    def activate(h):
        return torch.nn.functional.silu(h[:, :f]) * h[:, f:]

    x = torch.randn(40, d, generator=g)
    slot = torch.randint(0, e - 1, (40,), generator=g)  # the last expert gets no rows
    packed = GroupedExperts(gate_up, down, activate, grouped=True)
    assert not packed.uses_grouped_mm()
    got = packed(x, slot)
    want = loop_experts(x, slot, gate_up.dense(), down.dense(), activate)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both be tensors or both PackedWeight"):
        GroupedExperts(gate_up, down.dense(), activate)


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_keep_format_holds_experts_packed_with_the_same_logits(arch, tmp_path):
    """load_model(keep_format=True) keeps MXFP4 / FP8 experts in their format (their bytes),
    and its logits equal the dequantized model's."""
    from probe.runtime.checkpoint import load_model
    from probe.runtime.random_checkpoint import RandomCheckpointSpec, write_random_checkpoint

    spec = RandomCheckpointSpec(num_layers=2, num_experts=4, top_k=2, hidden_size=128,
                                expert_width=128, num_heads=4, num_kv_heads=2)
    path = write_random_checkpoint(arch, tmp_path / "ck", spec, weights="shipped")
    dense = load_model(path)
    packed = load_model(path, keep_format=True)
    fmt = "mxfp4" if arch == "gpt_oss" else "fp8_block"
    blocks = list(packed.moe_blocks)
    assert blocks and all(b.packed is not None for b in blocks)
    for block, ref in zip(blocks, dense.moe_blocks, strict=True):
        gate_up, down = block.packed
        assert gate_up.fmt == down.fmt == fmt
        assert block.w_gate_up.is_meta and block.w_down.is_meta
        assert gate_up.nbytes == 4 * weight_bytes(fmt, 2 * 128, 128)
        assert torch.equal(gate_up.dense(), ref.w_gate_up) and torch.equal(down.dense(), ref.w_down)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    got, want = packed(ids).logits, dense(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the static decode step runs them too (tests/test_packed_decode.py compares its tokens)
    from probe.runtime.decode import DecodeRunner, StaticKVCache

    cache = StaticKVCache(packed.cfg, 2, 32, dtype=torch.float32, device="cpu")
    assert DecodeRunner(packed, cache, use_graphs=False).model is packed


def test_mxfp4_preset_prices_transfers_by_its_bytes():
    from probe.planner.cost import CostModel
    from probe.specs import hardware_preset, model_preset

    bf16, mx = model_preset("gpt-oss-120b"), model_preset("gpt-oss-120b-mxfp4")
    assert mx.expert_bytes == 3 * weight_bytes("mxfp4", 2880, 2880)
    hw = hardware_preset("h200x8")
    slow, fast = CostModel.from_specs(bf16, hw), CostModel.from_specs(mx, hw)
    ratio = fast.transfer_time[0, 1] / slow.transfer_time[0, 1]
    assert ratio == pytest.approx(mx.expert_bytes / bf16.expert_bytes, rel=1e-6)
