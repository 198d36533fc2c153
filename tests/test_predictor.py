"""Lookahead predictor, distillation and persistence (tiny CPU tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probe.predictor.distill import OnlineDistiller, distill_loss, train_offline
from probe.predictor.model import LookaheadPredictor, PredictorSet, load_from_ids


def _router(num_experts=8, dim=16, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_experts, dim, generator=gen)
    b = torch.randn(num_experts, generator=gen) if bias else None
    return weight, b


@pytest.mark.parametrize("bias", [True, False])
def test_zero_initialised_predictor_equals_cloned_router(bias):
    weight, b = _router(bias=bias)
    pred = LookaheadPredictor(weight, b, hidden=32, top_k=2)
    h = torch.randn(64, 16)
    expected = F.linear(h, weight, b)
    assert torch.equal(pred(h), expected)
    assert torch.equal(pred.predict_topk(h), torch.topk(expected, 2, dim=-1).indices)
    # The clone is frozen and independent of the source tensor.
    weight.add_(1.0)
    assert torch.equal(pred(h), expected)
    assert all(p.requires_grad for p in pred.trainable_parameters())
    assert not pred.router_weight.requires_grad


def test_predict_load_counts_tokens_per_rank_and_expert():
    weight, b = _router()
    pred = LookaheadPredictor(weight, b, hidden=8, top_k=2)
    h = torch.randn(10, 16)
    src = torch.tensor([0, 1, 2] * 3 + [2])
    load = pred.predict_load(h, src, num_ranks=3)
    assert load.shape == (3, 8) and load.dtype == torch.int64
    ids = pred.predict_topk(h)
    for s in range(3):
        expect = torch.bincount(ids[src == s].reshape(-1), minlength=8)
        assert torch.equal(load[s], expect)
    assert int(load.sum()) == 20
    assert torch.equal(load_from_ids(ids, src, 3, 8), load)


def test_bad_arguments_are_named():
    weight, b = _router()
    with pytest.raises(ValueError, match="router_bias"):
        LookaheadPredictor(weight, torch.zeros(3), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        LookaheadPredictor(weight, b, top_k=9)
    pred = LookaheadPredictor(weight, b, top_k=2)
    with pytest.raises(ValueError, match="src_rank"):
        pred.predict_load(torch.randn(4, 16), torch.zeros(3, dtype=torch.long), 2)


def _teacher_data(num_tokens=512, dim=16, num_experts=8, seed=1):
    """h_prev and the next layer's logits from a fixed nonlinear map (learnable, not linear)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, dim, generator=gen)
    a = torch.randn(dim, dim, generator=gen) / dim ** 0.5
    w_next = torch.randn(num_experts, dim, generator=gen)
    h_next = h + torch.tanh(h @ a) * 2.0
    return h, h_next @ w_next.T, w_next


@pytest.mark.slow
def test_distillation_lowers_loss_on_fixed_dataset():
    h, logits, w_next = _teacher_data()
    pred = LookaheadPredictor(w_next, None, hidden=64, top_k=2)
    distiller = OnlineDistiller(pred, lr=3e-3)
    with torch.no_grad():
        before = float(distill_loss(pred(h), logits))
    torch.manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, h.shape[0], (128,))
        distiller.update(h[idx], logits[idx])
    with torch.no_grad():
        after = float(distill_loss(pred(h), logits))
    assert after < 0.8 * before
    assert distiller.num_updates[None] == 150
    # The frozen prior did not move.
    assert torch.equal(pred.router_weight, w_next)


def test_predictor_set_offline_training_and_layer_zero_absent():
    h, logits1, w1 = _teacher_data(num_tokens=256)
    w0, _ = _router(seed=3)
    w0 = w0[:, :16]
    hidden = torch.stack([h, h], dim=1)  # [N, L=2, D]
    logits = torch.stack([h @ w0.T, logits1], dim=1)  # [N, 2, E]
    pset = PredictorSet.from_routers([w0, w1], [None, None], top_k=2, hidden=32)
    assert pset.layers == [1]
    with pytest.raises(KeyError, match="layer 0"):
        pset[0]
    hist = train_offline(pset, hidden, logits, epochs=3, batch_size=64, lr=3e-3)
    assert hist[-1][1] < hist[0][1]


def test_save_load_round_trip(tmp_path):
    weights = [_router(seed=s)[0] for s in range(3)]
    biases = [_router(seed=s)[1] for s in range(3)]
    biases[2] = None
    pset = PredictorSet.from_routers(weights, biases, top_k=2, hidden=16)
    with torch.no_grad():
        for layer in pset.layers:
            pset[layer].w2.weight.normal_()
    path = tmp_path / "pred.safetensors"
    pset.save(path)
    back = PredictorSet.load(path)
    assert back.layers == [1, 2] and back.num_layers == 3
    assert not back[2].has_bias and back[1].has_bias
    h = torch.randn(5, 16)
    for layer in pset.layers:
        assert torch.equal(back(layer, h), pset(layer, h))
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        PredictorSet.load(tmp_path / "bad.safetensors")


def test_distiller_checkpoint_restores_weights_and_optimizer(tmp_path):
    h, logits, w_next = _teacher_data(num_tokens=128)
    pset = PredictorSet.from_routers([w_next, w_next], top_k=2, hidden=16)
    distiller = OnlineDistiller(pset, lr=1e-2)
    for _ in range(3):
        distiller.update(h, logits, layer=1)
    path = tmp_path / "ckpt.pt"
    distiller.save_checkpoint(path)
    ref_loss = distiller.update(h, logits, layer=1)
    ref_next = distiller.update(h, logits, layer=1)

    fresh = PredictorSet.from_routers([w_next, w_next], top_k=2, hidden=16)
    restored = OnlineDistiller(fresh, lr=1e-2)
    restored.load_checkpoint(path)
    assert restored.num_updates[1] == 3
    assert restored.update(h, logits, layer=1) == pytest.approx(ref_loss, rel=1e-6)
    assert restored.update(h, logits, layer=1) == pytest.approx(ref_next, rel=1e-6)


def test_from_model_reads_transformers_qwen3_moe():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    pset = PredictorSet.from_model(model, hidden=8)
    assert pset.layers == [1, 2] and pset.top_k == 2
    gate = model.model.layers[2].mlp.gate
    h = torch.randn(4, 32)
    assert torch.equal(pset(2, h), F.linear(h, gate.weight.float()))


def test_from_model_rejects_unknown_objects():
    with pytest.raises(TypeError, match="cannot find MoE routers"):
        PredictorSet.from_model(object())


def test_load_from_ids_numpy_matches_torch():
    from probe.predictor.metrics import load_from_ids as np_load

    ids = np.array([[0, 3], [1, 3], [3, 2]])
    src = np.array([1, 0, 1])
    out = np_load(ids, src, 2, 4)
    assert out.tolist() == [[0, 1, 0, 1], [1, 0, 1, 2]]
    assert torch.equal(load_from_ids(torch.from_numpy(ids), torch.from_numpy(src), 2, 4),
                       torch.from_numpy(out))


def test_fused_logits_match_forward_after_training_step():
    weight, b = _router()
    pred = LookaheadPredictor(weight, b, hidden=32, top_k=2)
    with torch.no_grad():
        pred.w2.weight.normal_()
        pred.w2.bias.normal_()
    with pytest.raises(RuntimeError, match="fuse"):
        pred.fused_logits(torch.randn(2, 16))
    pred.fuse()
    h = torch.randn(64, 16)
    torch.testing.assert_close(pred.fused_logits(h), pred(h), rtol=1e-5, atol=1e-5)
    OnlineDistiller(pred, lr=1e-2).update(h, torch.randn(64, 8))
    pred.fuse()  # refresh after the update
    torch.testing.assert_close(pred.fused_logits(h), pred(h), rtol=1e-5, atol=1e-5)


def test_fused_load_refuses_what_it_cannot_run():
    from probe.predictor.fused_load import fused_available, fused_predict_load

    pred = LookaheadPredictor(torch.randn(16, 8), hidden=32, top_k=2)
    pred.fuse()
    assert "CUDA" in fused_available(pred, "cpu") or "Triton" in fused_available(pred, "cpu")
    with pytest.raises(RuntimeError, match="fused_predict_load"):
        fused_predict_load(pred, torch.randn(4, 8), torch.zeros(4, dtype=torch.long), 2)
    odd = LookaheadPredictor(torch.randn(24, 8), hidden=32, top_k=2)
    why = fused_available(odd, "cuda")
    assert why is not None and ("E = 24" in why or "Triton" in why)
