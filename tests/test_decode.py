"""The static KV cache and no-sync decode step (probe.runtime.decode) and the sync guard."""

from __future__ import annotations

import json

import pytest
import torch

from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.decode import (
    DecodeRunner,
    StaticKVCache,
    decode_forward,
    default_buckets,
    static_experts,
)
from probe.runtime.engine import Engine, Request, greedy_generate, random_model
from probe.runtime.syncguard import HostSyncError, no_host_sync

_BASE = dict(vocab_size=80, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, num_experts=8, top_k=2, moe_intermediate_size=16,
             rope=RopeConfig(theta=10000.0), moe_layers=(0, 1), norm_topk_prob=True)

# Families whose attention or experts take a different branch of the static step.
CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", qk_norm="head"),
    "gpt_oss": dict(model_type="gpt_oss", router_scoring="topk_softmax", router_bias=True,
                    attention_sinks=True, attention_bias=True, expert_bias=True,
                    expert_act="clamped_swiglu", sliding_layers=(0,), sliding_window=3,
                    norm_topk_prob=False),
    "deepseek_v3": dict(model_type="deepseek_v3", attention="mla", kv_lora_rank=8,
                        qk_nope_head_dim=8, v_head_dim=8, router_scoring="sigmoid_group",
                        score_correction_bias=True, n_group=2, topk_group=1,
                        num_shared_experts=1, moe_layers=(1,), dense_intermediate_size=24),
}


def _cfg(family: str = "qwen3_moe") -> MoEConfig:
    return MoEConfig(**{**_BASE, **CONFIGS[family]})


@pytest.fixture(scope="module")
def model64():
    return random_model(_cfg(), seed=3, std=0.15, dtype=torch.float64)


def _prefilled(model, prompts, max_len=32):
    """(static cache with each prompt prefilled in its slot, the slot views, old-style caches
    holding the same prompts)."""
    cache = StaticKVCache(model.cfg, 8, max_len, dtype=next(model.parameters()).dtype,
                          device="cpu")
    slots = [cache.sequence(cache.allocate()) for _ in prompts]
    old = [model.new_cache() for _ in prompts]
    with torch.inference_mode():
        for p, s, c in zip(prompts, slots, old, strict=True):
            model(torch.tensor(p), caches=[s])
            model(torch.tensor(p), caches=[c])
    return cache, slots, old


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("n_rows", [1, 3, 5])  # 1 row: weight gather; 3, 5 rows: capacity GEMM
def test_static_step_matches_eager_and_never_syncs(family, n_rows):
    model = random_model(_cfg(family), seed=5, std=0.15, dtype=torch.float64)
    g = torch.Generator().manual_seed(n_rows)
    prompts = [torch.randint(0, 80, (int(torch.randint(1, 9, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n_rows)]
    cache, slots, old = _prefilled(model, prompts)
    ids = torch.randint(0, 80, (n_rows,), generator=g)
    with torch.inference_mode():
        want = model(ids, seq_lens=[1] * n_rows, caches=old, last_only=True).logits
        with no_host_sync(count_only=True) as guard:
            got = decode_forward(model, cache, ids, torch.tensor([s.slot for s in slots]),
                                 torch.tensor([s.length for s in slots]))
    assert guard.calls == []  # no host sync in any attention or MoE layer
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sync_guard_catches_the_eager_path(model64):
    """The guard is not vacuous: the old forward syncs (input check, expert counts)."""
    _, _, old = _prefilled(model64, [[1, 2, 3]])
    with torch.inference_mode(), no_host_sync(count_only=True) as guard:
        model64(torch.tensor([4]), caches=old)
    assert "Tensor.__int__" in guard.calls and "Tensor.tolist" in guard.calls
    with torch.inference_mode(), pytest.raises(HostSyncError, match="Tensor.__int__"), \
            no_host_sync():
        model64(torch.tensor([4]), caches=old)


def test_sync_guard_catches_each_entry_point_and_restores():
    t = torch.tensor([1.0, 0.0])
    cases = {"Tensor.item": lambda: t[0].item(), "Tensor.tolist": lambda: t.tolist(),
             "Tensor.cpu": lambda: t.cpu(), "Tensor.numpy": lambda: t.numpy(),
             "Tensor.__bool__": lambda: bool(t[0]), "Tensor.__float__": lambda: float(t[0]),
             "Tensor.__index__": lambda: list(range(3))[t[0].long()],
             "Tensor.nonzero": lambda: t.nonzero(),
             "torch.nonzero": lambda: torch.nonzero(t),
             "Tensor.__getitem__ with a boolean mask": lambda: t[t > 0],
             "torch.repeat_interleave(tensor repeats)":
                 lambda: torch.repeat_interleave(t, torch.tensor([1, 2]))}
    for name, fn in cases.items():
        with pytest.raises(HostSyncError, match=name.replace("(", r"\(").replace(")", r"\)")), \
                no_host_sync(cuda=False):
            fn()
    with no_host_sync(cuda=False, count_only=True) as guard:
        _ = t[0] + t[1], t[torch.tensor([1, 0])], t.repeat_interleave(2)
    assert guard.calls == []
    assert bool(t[0]) and t.tolist() == [1.0, 0.0] and t[t > 0].tolist() == [1.0]


def test_static_experts_formulations_agree(model64):
    block = model64.moe_blocks[0]
    g = torch.Generator().manual_seed(0)
    for n_tok in (1, 2, 3, 9):  # 3*T*K <= E = 8 (gather) for T = 1 only
        h = torch.randn(n_tok, 32, generator=g, dtype=torch.float64)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n_tok)])
        want = torch.stack([torch.stack([block.expert_forward(h[t:t + 1], int(e))[0]
                                         for e in ids[t]]) for t in range(n_tok)])
        torch.testing.assert_close(static_experts(block, h, ids), want)


def test_runner_pads_to_buckets_and_matches_unpadded(model64):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    cache, slots, old = _prefilled(model64, prompts)
    runner = DecodeRunner(model64, cache, use_graphs=False)
    assert runner.buckets == [1, 2, 4, 8] and runner.bucket(3) == 4
    assert [runner.kv_bucket(p) for p in (0, 15, 16, 31)] == [16, 16, 32, 32]  # max_len 32
    with torch.inference_mode():  # 14 steps: kv length 16, then 32 (the cache's max_len)
        for step in range(14):
            toks = [11 + step, 12 + step, 13 + step]
            want = model64(torch.tensor(toks), seq_lens=[1, 1, 1], caches=old[:3],
                           last_only=True).logits
            got = runner(toks, [s.slot for s in slots[:3]], [s.length for s in slots[:3]])
            for s in slots[:3]:
                s.length += 1
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert default_buckets(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="largest bucket"):
        runner.bucket(9)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        DecodeRunner(model64, cache, use_graphs=True)


def test_graph_warm_up_never_writes_live_slots(model64):
    """Before a capture the runner runs the step eagerly; it must read scratch rows, not the
    rows the bucket's buffers held last (their slot may belong to another request now)."""
    cache, slots, _ = _prefilled(model64, [[1, 2, 3], [4, 5]])
    runner = DecodeRunner(model64, cache, use_graphs=False)
    with torch.inference_mode():
        runner([6, 7], [s.slot for s in slots], [s.length for s in slots])
        cache.release(slots[0].slot)  # the request in slot 0 ends ...
        fresh = cache.sequence(cache.allocate())  # ... and a new one takes the slot
        assert fresh.slot == slots[0].slot
        model64(torch.tensor([9, 9, 9, 9, 9]), caches=[fresh])
        before = [t[:cache.scratch].clone() for t in cache.keys + cache.values]
        runner._warm_up(2, 16)  # what _capture runs before a new kv-length bucket's graph
    for old, new in zip(before, cache.keys + cache.values, strict=True):
        assert torch.equal(old, new[:cache.scratch])


def test_static_cache_slots_and_limits(model64):
    cache = StaticKVCache(model64.cfg, 2, 4, dtype=torch.float64, device="cpu")
    a, b = cache.allocate(), cache.allocate()
    with pytest.raises(RuntimeError, match="all 2 slots"):
        cache.allocate()
    cache.release(a)
    with pytest.raises(ValueError, match="not an allocated slot"):
        cache.release(a)
    with torch.inference_mode(), pytest.raises(ValueError, match="max_len 4"):
        model64(torch.tensor([1, 2, 3, 4, 5]), caches=[cache.sequence(b)])
    with pytest.raises(ValueError, match="num_slots"):
        StaticKVCache(model64.cfg, 0, 4, dtype=torch.float64, device="cpu")


def _reqs(**kw) -> list[Request]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(6):
        n = int(torch.randint(2, 14, (1,), generator=g))
        out.append(Request(f"q{i}", torch.randint(0, 80, (n,), generator=g).tolist(),
                           max_new_tokens=3 + i, arrival_step=i // 2, **kw))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_engine_static_decode_equals_default_path(dtype):
    model = random_model(_cfg(), seed=3, std=0.15, dtype=dtype)
    static = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4,
                    static_decode=True, max_seq_len=24)
    results = static.serve(_reqs())
    default = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4).serve(_reqs())
    for req in _reqs():
        assert results[req.rid].tokens == default[req.rid].tokens
        assert results[req.rid].tokens == greedy_generate(model, req.prompt, req.max_new_tokens)
    assert any(r.decode_tokens and r.prefill_tokens for r in static.records)
    assert any(r.decode_tokens >= 3 for r in static.records)  # padded buckets were used
    assert static.kv.free_slots == 4  # every slot came back


def test_engine_static_decode_options():
    model = random_model(_cfg(), seed=3, std=0.15)
    engine = Engine(model, static_decode=True, max_seq_len=8, max_running=2)
    assert "max_seq_len" in engine.check(Request("r", [1] * 5, max_new_tokens=4))
    sampled = [Request("s", [1, 2, 3], max_new_tokens=5, temperature=0.8, top_k=5, seed=4)]
    a = engine.serve(sampled)["s"].tokens
    assert a == Engine(model).serve(sampled)["s"].tokens
    with pytest.raises(ValueError, match="runner=None"):
        Engine(model, runner=object(), static_decode=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        Engine(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model, static_decode=True, max_seq_len=0)


def test_decode_graphs_experiment_runs_quick_on_cpu(tmp_path):
    from experiments.runtime.decode_graphs import main

    assert main(["--device", "cpu", "--quick", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "decode_graphs.json").read_text())
    (tiny,) = record["results"]
    assert tiny["check"]["tokens_equal"] and tiny["check"]["hf_generate_tokens_equal"]
    assert tiny["check"]["engine_tokens_equal"]
    assert tiny["check"]["engine_fp32"] == {"static_fraction_equal": 1.0,
                                            "paged_fraction_equal": 1.0, "equal": True}
    assert 0.0 <= tiny["engine_in_timing_dtype"]["paged_fraction_equal"] <= 1.0
    assert tiny["sync"] == {"eager_step": "no host sync"}
    assert [row["batch"] for row in tiny["rows"]] == [1, 4]
    assert all(row["static_tok_s"] > 0 and row["hf_generate_tok_s"] > 0 for row in tiny["rows"])
    assert (tmp_path / "decode_graphs.md").is_file() and (tmp_path / "manifest.json").is_file()


def test_cli_static_decode_on_cpu_equals_default(tmp_path):
    """`--cuda-graphs` on the CPU runs the static step eagerly, without the EPRunner; the
    tokens equal the default path's."""
    from probe.runtime.__main__ import main as runtime_main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "model_type": "qwen3_moe", "vocab_size": 80, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
        "max_position_embeddings": 64, "tie_word_embeddings": False}))
    tokens = {}
    for flag in ("--cuda-graphs", "--no-cuda-graphs"):
        out = tmp_path / f"{flag}.json"
        assert runtime_main(["--random-config", str(cfg), "--device", "cpu", "--requests", "3",
                             "--prompt-len", "6", "--max-new-tokens", "4", "--max-seq-len", "16",
                             "--quiet", "--out", str(out)]
                            + [flag]) == 0
        summary = json.loads(out.read_text())
        tokens[flag] = summary["ranks"][0]["tokens"]
        assert summary["ranks"][0]["cuda_graphs"] == (flag == "--cuda-graphs")
    assert tokens["--cuda-graphs"] == tokens["--no-cuda-graphs"]
    assert sum(len(t) for t in tokens["--cuda-graphs"].values()) == 12
