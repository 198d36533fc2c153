"""The paged KV cache (probe.runtime.paged): logits equal to the static cache's, no host sync,
admission by free blocks, and the memory split between replica slots and KV blocks."""

from __future__ import annotations

import pytest
import torch

from probe.runtime.decode import DecodeRunner, StaticKVCache, decode_forward
from probe.runtime.engine import Engine, Request, greedy_generate, random_model
from probe.runtime.paged import (
    PagedDecodeRunner,
    PagedKVCache,
    expert_bytes,
    kv_block_bytes,
    plan_memory,
)
from probe.runtime.syncguard import no_host_sync
from tests.test_decode import CONFIGS, _cfg


def _both(model, prompts, *, block_size=4, num_blocks=40, max_len=40):
    """The prompts prefilled in a static cache and in a paged one (blocks handed out in a
    scrambled order, so tables are not contiguous)."""
    dtype = next(model.parameters()).dtype
    static = StaticKVCache(model.cfg, 8, max_len, dtype=dtype, device="cpu")
    paged = PagedKVCache(model.cfg, num_blocks, block_size, max_len, dtype=dtype, device="cpu")
    paged._free = list(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
                       .tolist())
    slots = [static.sequence(static.allocate()) for _ in prompts]
    seqs = [paged.sequence(len(p) + 12) for p in prompts]
    with torch.inference_mode():
        for p, s, q in zip(prompts, slots, seqs, strict=True):
            model(torch.tensor(p), caches=[s])
            model(torch.tensor(p), caches=[q])
    return static, slots, paged, seqs


@pytest.mark.parametrize("family", list(CONFIGS))  # sinks + sliding window; MLA
def test_paged_step_equals_static_step_in_fp64_and_never_syncs(family):
    model = random_model(_cfg(family), seed=5, std=0.15, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 80, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    static, slots, paged, seqs = _both(model, prompts)
    runner = DecodeRunner(model, static, use_graphs=False)
    paged_runner = PagedDecodeRunner(model, paged, use_graphs=False, max_batch=8)
    with torch.inference_mode():
        for _ in range(10):  # positions cross block boundaries and the 16-position bucket
            toks = torch.randint(0, 80, (4,), generator=g).tolist()
            want = runner(toks, [s.slot for s in slots], [s.length for s in slots]).clone()
            got = paged_runner(toks, [q.blocks for q in seqs], [q.length for q in seqs])
            for s, q in zip(slots, seqs, strict=True):
                s.length += 1
                q.length += 1
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # zero host syncs in the paged step itself (table built on the host, then a copy)
        nb = paged.max_blocks
        tables = torch.tensor([paged.table(q.blocks, nb) for q in seqs])
        with no_host_sync(count_only=True) as guard:
            decode_forward(model, paged, torch.tensor(toks), tables,
                           torch.tensor([q.length for q in seqs]))
    assert guard.calls == []


def test_paged_sequence_keeps_prefill_equal_to_default_cache():
    model = random_model(_cfg("gpt_oss"), seed=5, std=0.15, dtype=torch.float64)
    paged = PagedKVCache(model.cfg, 6, 2, 12, dtype=torch.float64, device="cpu")
    seq, old = paged.sequence(9), model.new_cache()
    assert len(seq.blocks) == 5 and paged.free_blocks == 1
    with torch.inference_mode():
        for chunk in ([1, 2, 3], [4, 5, 6, 7], [8]):  # chunked prefill across blocks
            got = model(torch.tensor(chunk), caches=[seq], last_only=True).logits
            want = model(torch.tensor(chunk), caches=[old], last_only=True).logits
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="9 positions reserved"):
            model(torch.tensor([1, 2]), caches=[seq])


def test_paged_cache_blocks_and_errors():
    model = random_model(_cfg(), seed=3, std=0.15)
    paged = PagedKVCache(model.cfg, 5, 4, 16, dtype=torch.float32, device="cpu")
    a = paged.sequence(9)  # 3 blocks
    assert paged.fits(8) and not paged.fits(9)
    with pytest.raises(RuntimeError, match="3 blocks needed, 2 free"):
        paged.sequence(10)
    with pytest.raises(ValueError, match="max_len"):
        paged.sequence(17)
    a.release()
    assert paged.free_blocks == 5
    with pytest.raises(ValueError, match="already released"):
        a.release()
    with pytest.raises(ValueError, match="not an allocated block"):
        paged.release([0])
    assert paged.table([3, 1], 4) == [3, 1, 5, 5]
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(model.cfg, 5, 0, 16, dtype=torch.float32, device="cpu")
    runner = PagedDecodeRunner(model, paged, use_graphs=False, max_batch=2)
    b = paged.sequence(4)
    with pytest.raises(ValueError, match="past the row's 1 blocks"):
        runner([1], [b.blocks], [4])


def _reqs() -> list[Request]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(7):
        n = int(torch.randint(2, 14, (1,), generator=g))
        out.append(Request(f"q{i}", torch.randint(0, 80, (n,), generator=g).tolist(),
                           max_new_tokens=3 + i, arrival_step=i // 2))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_engine_paged_equals_default_and_waits_for_blocks(dtype):
    model = random_model(_cfg("gpt_oss"), seed=3, std=0.15, dtype=dtype)
    # 7 blocks of 4 positions: at most two of these requests (up to 22 tokens) fit at once
    paged = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4, paged_kv=True,
                   block_size=4, kv_blocks=7, max_seq_len=24)
    results = paged.serve(_reqs())
    default = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4).serve(_reqs())
    assert sorted(results) == sorted(default) == [r.rid for r in _reqs()]  # none dropped
    for req in _reqs():
        assert results[req.rid].tokens == default[req.rid].tokens
        assert results[req.rid].tokens == greedy_generate(model, req.prompt, req.max_new_tokens)
    assert paged.kv.free_blocks == 7  # every block came back
    assert 1 <= paged.peak_running < 4  # the blocks, not max_running, limited the batch
    mem = paged.summary()["memory"]
    assert mem["kv"] == "paged" and mem["kv_blocks"] == 7 and mem["requests_that_fit"] == 1
    # with room for all, more run at once and the tokens stay the same
    roomy = Engine(model, max_batch_tokens=9, prefill_chunk=4, max_running=4, paged_kv=True,
                   block_size=4, max_seq_len=24)
    assert roomy.serve(_reqs()).keys() == results.keys()
    assert roomy.peak_running == 4
    assert all(roomy.results[r].tokens == results[r].tokens for r in results)


def test_engine_paged_admission_and_budget():
    model = random_model(_cfg(), seed=3, std=0.15)
    engine = Engine(model, paged_kv=True, block_size=4, kv_blocks=3, max_seq_len=16)
    assert "need 4 KV blocks, the pool holds 3" in engine.check(
        Request("r", [1] * 10, max_new_tokens=4))
    assert engine.check(Request("r", [1] * 8, max_new_tokens=4)) is None
    # a request that does not fit now waits until the running one ends
    engine.submit([Request("a", [1] * 6, max_new_tokens=4), Request("b", [2] * 6,
                                                                    max_new_tokens=4)])
    engine.step()
    assert [lv.req.rid for lv in engine.live] == ["a"] and engine.pending[0].rid == "b"
    engine.serve()
    assert set(engine.results) == {"a", "b"}
    # the budget pays for the replica slots first
    w, blk = expert_bytes(model.cfg, torch.float32), kv_block_bytes(model.cfg, 4, torch.float32)
    budget = 3 * w * 2 + 10 * blk + blk // 2
    e2 = Engine(model, paged_kv=True, block_size=4, memory_budget_bytes=budget,
                replica_slots=3, max_seq_len=16)
    mem = e2.summary()["memory"]
    assert mem["replica_bytes"] == 3 * w * 2 and mem["kv_blocks"] == 10
    assert mem["kv_pool_bytes"] == 10 * blk and mem["requests_that_fit"] == 2
    assert mem["max_concurrent_requests"] == 2
    with pytest.raises(ValueError, match="need paged_kv"):
        Engine(model, replica_slots=2)
    with pytest.raises(ValueError, match="not both"):
        Engine(model, paged_kv=True, kv_blocks=3, memory_budget_bytes=budget)
    with pytest.raises(ValueError, match="does not hold the replica slots"):
        Engine(model, paged_kv=True, memory_budget_bytes=3 * w * 2, replica_slots=3,
               max_seq_len=16)


def test_memory_plan_counts_from_the_shape():
    cfg = _cfg()  # D 32, F 16, 2 layers, 2 kv heads of 8
    assert expert_bytes(cfg, torch.bfloat16) == (2 * 16 * 32 + 32 * 16) * 2
    assert kv_block_bytes(cfg, 16, torch.bfloat16) == 2 * 16 * 2 * (8 + 8) * 2
    plan = plan_memory(cfg, torch.bfloat16, block_size=16, tokens_per_request=40,
                       kv_blocks=30)
    assert plan.requests_that_fit == 10 and plan.replica_bytes == 0
    with pytest.raises(ValueError, match="exactly one"):
        plan_memory(cfg, torch.bfloat16, block_size=16, tokens_per_request=40)


def test_paged_kv_experiment_runs_quick_on_cpu(tmp_path):
    import json

    from experiments.runtime.paged_kv import main

    assert main(["--device", "cpu", "--quick", "--steps", "2", "--repeats", "1",
                 "--budget-mib", "24", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "paged_kv.json").read_text())
    check = record["check"]
    assert check["tokens_equal"] and check["engine"]["equal"] and check["sync"] == "no host sync"
    assert check["engine"]["peak_running"] < 8  # the pool, not max_running, limited the batch
    assert [(r["batch"], r["layout"]) for r in record["rows"]] == [
        (4, "static"), (4, "paged"), (8, "static"), (8, "paged")]
    assert all(r["tok_s"] > 0 for r in record["rows"])
    static, paged = record["rows"][0], record["rows"][1]
    assert paged["cache_bytes"] < static["cache_bytes"]  # 37 positions reserved, not 128
    small, bigger = record["budget"]
    # one expert of the small shape: 3 * F * D bf16 values; replicas come out of the budget
    assert small["expert_bytes"] == 3 * 64 * 256 * 2
    assert small["slots3_replica_bytes"] == 3 * 2 * small["expert_bytes"]
    assert small["resident2_replica_bytes"] == 2 * 8 * small["expert_bytes"]
    assert small["slots3_max_batch"] >= small["resident2_max_batch"] > 0
    assert record["engine_memory"]["replica_bytes"] > 0
    assert (tmp_path / "paged_kv.md").is_file() and (tmp_path / "manifest.json").is_file()
