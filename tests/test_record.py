"""probe.runtime.record: routing traces and router samples from real forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.runtime.checkpoint import load_model
from probe.runtime.record import Recorder, load_samples, record_step, token_ranks
from probe.traces import DECODE, PREFILL, RoutingTrace

transformers = pytest.importorskip("transformers")

VOCAB = 53


@pytest.fixture(scope="module")
def qwen(tiny_qwen3_moe):
    """(our model, transformers' model) of one tiny Qwen3-MoE checkpoint with a dense layer."""
    path, ref = tiny_qwen3_moe(vocab_size=VOCAB, num_layers=4, top_k=3, max_positions=64,
                               mlp_only_layers=(1,))
    return load_model(path), ref


def their_topk(ref, input_ids):
    """transformers' chosen experts per MoE layer: [T, L, K] from hooks on its routers."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
             for m in ref.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    with torch.no_grad():
        ref(input_ids)
    for h in hooks:
        h.remove()
    return torch.stack(seen, dim=1).numpy()


def test_token_ranks():
    assert token_ranks([2, 0, 3], [4, 1, 7]).tolist() == [4, 4, 7, 7, 7]
    assert token_ranks([2, 0, 3], [4, 1, 7]).dtype == np.int16
    with pytest.raises(ValueError, match="equal length"):
        token_ranks([1, 2], [0])


def test_trace_holds_transformers_router_choices(qwen, tmp_path):
    model, ref = qwen
    rec = Recorder(model.cfg, num_ranks=4, sample_rate=0.5, seed=1, meta={"run": "t"})
    gen = torch.Generator().manual_seed(2)
    prefill = torch.randint(0, VOCAB, (3, 6), generator=gen)
    caches = [model.new_cache() for _ in range(3)]
    record_step(model, rec, prefill, src_rank=token_ranks([6, 6, 6], [0, 3, 1]), caches=caches,
                phase="prefill", tag="code")
    steps = [prefill]
    for i in range(3):
        nxt = torch.randint(0, VOCAB, (3, 1), generator=gen)
        record_step(model, rec, nxt.reshape(-1), seq_lens=[1, 1, 1], caches=caches,
                    src_rank=token_ranks([1, 1, 1], [0, 3, 1]), phase="decode", tag=f"d{i}")
        steps.append(nxt)
    full = torch.cat(steps, dim=1)  # [3, 9]
    trace = rec.trace()
    assert (trace.num_steps, trace.num_layers, trace.top_k, trace.num_tokens) == (4, 3, 3, 27)
    assert trace.phase.tolist() == [PREFILL, DECODE, DECODE, DECODE]
    assert trace.step_tags == ["code", "d0", "d1", "d2"]
    assert trace.meta["moe_layers"] == [0, 2, 3] and trace.meta["run"] == "t"
    assert trace.src_rank[:6].tolist() == [0] * 6 and trace.src_rank[18:21].tolist() == [0, 3, 1]

    # Token t of sequence b in the trace must carry transformers' choice for that position.
    theirs = their_topk(ref, full).reshape(3, 9, 3, 3)  # [B, pos, L, K]
    experts = trace.experts
    for b in range(3):
        assert np.array_equal(experts[6 * b:6 * b + 6], theirs[b, :6])
        for i in range(3):
            assert np.array_equal(experts[18 + 3 * i + b], theirs[b, 6 + i])
    gates = trace.gates
    assert gates.shape == (27, 3, 3) and np.all(gates > 0)

    trace.save(tmp_path / "t.safetensors")
    assert RoutingTrace.load(tmp_path / "t.safetensors").equals(trace)


def test_samples_hold_router_inputs_and_logits(qwen, tmp_path):
    model, _ = qwen
    rec = Recorder(model.cfg, num_ranks=2, sample_rate=0.4, seed=3)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    out = record_step(model, rec, ids, src_rank=token_ranks([10, 10], [1, 0]), phase="prefill")
    rec.save_samples(tmp_path / "s.safetensors")
    s = load_samples(tmp_path / "s.safetensors")
    n = rec.num_samples
    assert 0 < n < 20 and s.hidden.shape == (n, 3, 32) and s.logits.shape == (n, 3, 8)
    assert s.hidden.dtype == np.float16 and s.logits.dtype == np.float16
    assert s.step.tolist() == [0] * n
    for j, t in enumerate(s.token.tolist()):
        for layer, r in enumerate(out.routing):
            np.testing.assert_allclose(s.hidden[j, layer], r.hidden[t].numpy(), rtol=2e-3,
                                       atol=2e-3)
            np.testing.assert_allclose(s.logits[j, layer], r.logits[t].numpy(), rtol=2e-3,
                                       atol=2e-3)
        assert s.src_rank[j] == (1 if t < 10 else 0)
    assert s.meta["sample_rate"] == 0.4 and s.meta["moe_layers"] == [0, 2, 3]
    # The stored router logits are the router applied to the stored hidden state.
    block = model.moe_blocks[1]
    with torch.no_grad():
        again = block.router(torch.from_numpy(s.hidden[:, 1].astype(np.float32)))
    assert np.allclose(again.numpy(), s.logits[:, 1], atol=0.05)


def test_sampling_rate_and_cap(qwen, tmp_path):
    model, _ = qwen
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        routing = model(ids, return_routing=True).routing
    src = np.zeros(32, np.int64)
    none = Recorder(model.cfg, num_ranks=1)
    capped = Recorder(model.cfg, num_ranks=1, sample_rate=1.0, max_samples=40, keep_gates=False)
    for _ in range(3):
        none.add(routing, src)
        capped.add(routing, src)
    assert none.num_samples == 0 and capped.num_samples == 40
    assert capped.trace().gates is None and capped.num_tokens == 96
    none.save_samples(tmp_path / "empty.safetensors")
    assert load_samples(tmp_path / "empty.safetensors").hidden.shape == (0, 3, 32)


def test_recorder_errors(qwen, tmp_path):
    model, _ = qwen
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids, return_routing=True)
    rec = Recorder(model.cfg, num_ranks=2)
    with pytest.raises(ValueError, match=r"src_rank values must lie in \[0, 2\)"):
        rec.add(out.routing, [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        rec.add(out.routing, [0, 1])
    with pytest.raises(ValueError, match="return_routing=True"):
        rec.add(model(ids).routing, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="phase must be"):
        rec.add(out.routing, [0, 0, 0, 0], phase="warmup")
    with pytest.raises(ValueError, match="sample_rate"):
        Recorder(model.cfg, num_ranks=2, sample_rate=1.5)
    with pytest.raises(FileNotFoundError, match="samples file not found"):
        load_samples(tmp_path / "missing.safetensors")
    assert rec.num_steps == 0
