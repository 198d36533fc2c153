"""The static decode step and the paged engine with experts kept packed (MXFP4 / FP8).

Random shipped-format checkpoints (GPT-OSS MXFP4 experts, DeepSeek-V3 FP8 projections) loaded
with keep_format=True: the static step runs the experts as the grouped GEMM over the packed
weights (`GroupedExperts.moe`; on CPU its dequantising twin), and its tokens equal the default
engine's on the same packed model. The paged engine prices a replica slot by the packed bytes.
"""

from __future__ import annotations

import pytest
import torch

from probe.runtime.checkpoint import load_model
from probe.runtime.decode import DecodeRunner, StaticKVCache, _check_packed_graphs, \
    decode_forward, static_experts
from probe.runtime.dist import DistContext
from probe.runtime.engine import Engine, Request
from probe.runtime.paged import expert_bytes, kv_block_bytes, plan_memory
from probe.runtime.pipeline import EPRunner, PipelineOptions
from probe.runtime.random_checkpoint import RandomCheckpointSpec, write_random_checkpoint
from probe.specs import weight_bytes

VOCAB = 64
ARCHS = {"mxfp4": "gpt_oss", "fp8_block": "deepseek_v3"}
SPECS = {  # DeepSeek-V3: F 128, whole FP8 tiles for stacked gate/up; a dense first layer
    "mxfp4": RandomCheckpointSpec(num_layers=2, num_experts=8, top_k=2, hidden_size=64,
                                  expert_width=32, num_heads=4, num_kv_heads=2,
                                  vocab_size=VOCAB),
    "fp8_block": RandomCheckpointSpec(num_layers=3, num_experts=8, top_k=2, hidden_size=64,
                                      expert_width=128, num_heads=4, num_kv_heads=4,
                                      vocab_size=VOCAB),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def packed_model(request, tmp_path_factory):
    fmt = request.param
    path = write_random_checkpoint(ARCHS[fmt], tmp_path_factory.mktemp(fmt), SPECS[fmt],
                                   weights="shipped", std=0.1)
    model = load_model(path, keep_format=True)
    assert model.expert_format == fmt
    return fmt, model, path


def _reqs() -> list[Request]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(5):
        n = int(torch.randint(2, 12, (1,), generator=g))
        out.append(Request(f"q{i}", torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                           max_new_tokens=3 + i, arrival_step=i // 2))
    return out


def test_static_step_runs_packed_experts_like_eager(packed_model):
    fmt, model, _ = packed_model
    block = model.moe_blocks[-1]
    g = torch.Generator().manual_seed(0)
    for n_tok in (1, 3, 9):
        h = torch.randn(n_tok, 64, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n_tok)])
        want = torch.stack([torch.stack([block.expert_forward(h[t:t + 1], int(e))[0]
                                         for e in ids[t]]) for t in range(n_tok)])
        torch.testing.assert_close(static_experts(block, h, ids), want, rtol=1e-5, atol=1e-6)
    # one decode step against the eager forward with old-style caches
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cache = StaticKVCache(model.cfg, 4, 32, dtype=torch.float32, device="cpu")
    slots = [cache.sequence(cache.allocate()) for _ in prompts]
    old = [model.new_cache() for _ in prompts]
    with torch.inference_mode():
        for p, s, c in zip(prompts, slots, old, strict=True):
            model(torch.tensor(p), caches=[s])
            model(torch.tensor(p), caches=[c])
        ids = torch.tensor([9, 10])
        want = model(ids, seq_lens=[1, 1], caches=old, last_only=True).logits
        got = decode_forward(model, cache, ids, torch.tensor([s.slot for s in slots]),
                             torch.tensor([s.length for s in slots]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_engine_static_and_paged_decode_equal_default_with_packed_experts(packed_model):
    fmt, model, _ = packed_model
    default = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4).serve(_reqs())
    static = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4,
                    static_decode=True, max_seq_len=24)
    static_out = static.serve(_reqs())
    paged = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4, paged_kv=True,
                   block_size=4, max_seq_len=24)
    paged_out = paged.serve(_reqs())
    for req in _reqs():
        assert static_out[req.rid].tokens == default[req.rid].tokens, (fmt, req.rid)
        assert paged_out[req.rid].tokens == default[req.rid].tokens, (fmt, req.rid)
    assert any(r.decode_tokens >= 3 for r in static.records)  # padded buckets were used
    assert static.kv.free_slots == 4


def test_memory_plan_prices_packed_replica_slots(packed_model):
    """A replica slot of packed experts costs the packed bytes (+ biases in the model dtype),
    the same count as the EP runner's slot pool holds, in the paged engine's budget too."""
    fmt, model, _ = packed_model
    cfg = model.cfg
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    bias = (2 * f + d) * 4 if cfg.expert_bias else 0
    w = expert_bytes(cfg, torch.float32, fmt)
    assert w == weight_bytes(fmt, 2 * f, d) + weight_bytes(fmt, d, f) + bias
    assert w < expert_bytes(cfg, torch.float32) / 3  # fp32: 4 bytes a weight; packed <= ~1
    runner = EPRunner(model, DistContext(0, 1, None, None, torch.device("cpu")),
                      PipelineOptions(balance=False, num_slots=3))
    try:
        assert runner.pool.slot_bytes == runner.replica_bytes == w
        assert runner.pool.bytes == 3 * 2 * w  # R slots x 2 buffers
    finally:
        runner.close()
    plan = plan_memory(cfg, torch.float32, block_size=4, tokens_per_request=16, kv_blocks=5,
                       replica_slots=3, weight_format=fmt)
    assert plan.expert_bytes == w and plan.replica_bytes == 3 * w * 2
    assert plan.weight_format == fmt
    blk = kv_block_bytes(cfg, 4, torch.float32)
    budget = 3 * w * 2 + 10 * blk + blk // 2
    engine = Engine(model, paged_kv=True, block_size=4, memory_budget_bytes=budget,
                    replica_slots=3, max_seq_len=16)
    mem = engine.summary()["memory"]
    assert mem["replica_bytes"] == 3 * w * 2 and mem["kv_blocks"] == 10
    assert mem["expert_bytes"] == w and mem["weight_format"] == fmt
    with pytest.raises(ValueError, match="unknown weight format"):
        expert_bytes(cfg, torch.float32, "int4")


def test_graphs_over_packed_experts_need_the_kernel(packed_model):
    """CUDA graphs need the packed experts' no-sync path (the bf16 Triton kernel): an fp32
    packed model is refused with the reason; without graphs it decodes (above)."""
    fmt, model, _ = packed_model
    with pytest.raises(ValueError, match=f"CUDA graphs over packed \\({fmt}\\) experts need "
                                         "the packed grouped GEMM: a bfloat16 model"):
        _check_packed_graphs(model)
    cache = StaticKVCache(model.cfg, 2, 16, dtype=torch.float32, device="cpu")
    assert DecodeRunner(model, cache, use_graphs=False).model is model
