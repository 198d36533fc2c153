"""probe.predictor.stream (teacher-forced pairs, pair files, streaming distillation), the top-k
margin loss, and the decode-request replay of experiments/predictor/distill_more.py."""

from __future__ import annotations

import importlib
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.predictor.distill import OnlineDistiller, distill_loss, topk_margin_loss
from probe.predictor.model import PredictorSet
from probe.predictor.stream import PairFile, PairWriter, router_pairs, train_streaming
from probe.runtime.checkpoint import load_model
from probe.runtime.record import Recorder, record_step, token_ranks

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 272


@pytest.fixture(scope="module")
def tiny(tiny_qwen3_moe):
    """A tiny byte-vocabulary Qwen3-MoE checkpoint (3 MoE layers) loaded in probe.runtime."""
    path, _ = tiny_qwen3_moe(vocab_size=VOCAB, num_layers=3, top_k=2, max_positions=256)
    return path, load_model(path)


def test_router_pairs_match_recorder_and_kv_cache_decode(tiny):
    _, model = tiny
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 256, n) for n in (9, 5, 12)]
    hid, lgt = router_pairs(model, windows, min_pos=3)
    assert hid.dtype == np.float16 and lgt.dtype == np.float16
    assert hid.shape == (6 + 2 + 9, 3, 32) and lgt.shape == (17, 3, 8)

    # Same pass through the Recorder (every token sampled): identical rows at positions >= 3.
    rec = Recorder(model.cfg, num_ranks=1, sample_rate=1.0, keep_gates=False)
    ids = torch.from_numpy(np.concatenate(windows))
    record_step(model, rec, ids, seq_lens=[9, 5, 12], src_rank=token_ranks([9, 5, 12], [0] * 3))
    keep = np.concatenate([np.arange(n) >= 3 for n in (9, 5, 12)])
    np.testing.assert_array_equal(np.concatenate(rec._hidden)[keep], hid)
    np.testing.assert_array_equal(np.concatenate(rec._logits)[keep], lgt)

    # Decode of window 0 one token at a time through a KV cache gives the same pairs.
    cache = model.new_cache()
    with torch.no_grad():
        for pos, tok in enumerate(windows[0]):
            out = model(torch.tensor([int(tok)]), caches=[cache], return_routing=True)
            if pos >= 3:
                dec_h = torch.stack([r.hidden[0] for r in out.routing]).numpy()
                dec_z = torch.stack([r.logits[0] for r in out.routing]).numpy()
                np.testing.assert_allclose(hid[pos - 3].astype(np.float32), dec_h, atol=5e-3)
                np.testing.assert_allclose(lgt[pos - 3].astype(np.float32), dec_z, atol=5e-3)


def test_router_pairs_rejects_bad_input(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="windows"):
        router_pairs(model, [])
    with pytest.raises(ValueError, match="min_pos"):
        router_pairs(model, [np.arange(4)], min_pos=-1)


def test_pair_writer_round_trip_and_capacity(tmp_path):
    w = PairWriter(tmp_path / "p", 5, num_layers=2, dim=3, num_experts=4, meta={"x": 1})
    h = np.arange(4 * 2 * 3, dtype=np.float16).reshape(4, 2, 3)
    z = np.arange(4 * 2 * 4, dtype=np.float16).reshape(4, 2, 4)
    assert w.add(h, z) == 4
    assert w.add(h, z) == 1  # cut at capacity
    assert w.full
    w.close()
    pf = PairFile(tmp_path / "p")
    assert len(pf) == 5 and pf.meta["x"] == 1 and pf.meta["count"] == 5
    np.testing.assert_array_equal(pf.hidden[:4], h)
    np.testing.assert_array_equal(pf.logits[4], z[0])
    with pytest.raises(FileNotFoundError):
        PairFile(tmp_path / "missing")


def test_topk_margin_loss_hand_values():
    true = torch.tensor([[5.0, 4.0, 0.0, -1.0]])  # true top-2 = {0, 1}
    pred = torch.tensor([[3.0, 1.5, 1.0, 0.0]])  # gaps to best other (1.0): 2.0, 0.5
    # margin 1: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5 -> mean 0.25
    assert topk_margin_loss(pred, true, 2, margin=1.0).item() == pytest.approx(0.25)
    assert topk_margin_loss(pred, true, 2, margin=0.5).item() == pytest.approx(0.0)
    # a true expert ranked below an other one: gap -1 -> relu(1 + 1) = 2 -> mean (0 + 2) / 2
    pred2 = torch.tensor([[3.0, 0.0, 1.0, -5.0]])
    assert topk_margin_loss(pred2, true, 2, margin=1.0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must"):
        topk_margin_loss(pred, true, 4)


def _teacher(num=4096, dim=16, experts=8, layers=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num, layers, dim, generator=gen)
    teacher = torch.randn(layers, dim, experts, generator=gen)
    logits = torch.empty(num, layers, experts)
    for layer in range(1, layers):  # layer l's logits: a nonlinear function of h_{l-1}
        logits[:, layer] = torch.tanh(hidden[:, layer - 1] * 2) @ teacher[layer] * 2
    routers = [torch.randn(experts, dim, generator=gen) * 0.1 for _ in range(layers)]
    return hidden.half().numpy(), logits.half().numpy(), routers


def _mean_loss(pset, hidden, logits):
    h, z = torch.from_numpy(hidden).float(), torch.from_numpy(logits).float()
    with torch.no_grad():
        return float(np.mean([distill_loss(pset(la, h[:, la - 1]), z[:, la]).item()
                              for la in pset.layers]))


@pytest.mark.slow
@pytest.mark.parametrize("margin_weight", [0.0, 0.5])
def test_train_streaming_lowers_loss_and_counts_tokens(margin_weight):
    hidden, logits, routers = _teacher()
    torch.manual_seed(0)
    pset = PredictorSet.from_routers(routers, top_k=2, hidden=32)
    before = _mean_loss(pset, hidden, logits)
    seen = []
    res = train_streaming(pset, hidden, logits, num_tokens=3000, epochs=2.5, batch_size=100,
                          chunk=700, lr=1e-2, margin_weight=margin_weight, seed=1,
                          callback=lambda n, loss: seen.append(n), callback_every=10)
    assert res["tokens_seen"] == 7500  # 2.5 passes over the first 3000 rows
    assert res["steps"] == len(res["loss"]) * 10 + res["steps"] % 10
    assert seen == [10 * 100 * (i + 1) for i in range(len(seen))]
    assert _mean_loss(pset, hidden, logits) < 0.7 * before


def test_train_streaming_validates_arguments():
    hidden, logits, routers = _teacher(num=64)
    pset = PredictorSet.from_routers(routers, top_k=2, hidden=8)
    with pytest.raises(ValueError, match="num_tokens"):
        train_streaming(pset, hidden, logits, num_tokens=65)
    with pytest.raises(ValueError, match="chunk"):
        train_streaming(pset, hidden, logits, batch_size=32, chunk=16)
    with pytest.raises(ValueError, match="epochs"):
        train_streaming(pset, hidden, logits, epochs=0)
    with pytest.raises(ValueError, match="margin_weight"):
        OnlineDistiller(pset, 1e-3, margin_weight=-1.0)


def _load_script(name):
    return importlib.import_module(name)


def test_replay_decode_reproduces_record_py_requests(tiny, tmp_path):
    """The replay (no model) draws the same requests as experiments/smallmodel/record.py."""
    _, model = tiny
    record = _load_script("experiments.smallmodel.record")
    distill_more = _load_script("experiments.predictor.distill_more")
    rng = np.random.default_rng(5)
    corpus = tmp_path / "heldout.jsonl"
    with corpus.open("w") as fh:
        for i, dom in enumerate([*record.CODE_DOMAINS, *record.AFTER_SHIFT_DOMAINS] * 2):
            text = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, 80 + 30 * i))
            fh.write(json.dumps({"id": f"{dom}/{i}", "domain": dom, "split": "heldout",
                                 "text": text}) + "\n")
    args = Namespace(ranks=2, per_rank=2, decode_steps=6, shift_step=3, seed=3,
                     decode_sample_rate=1.0, device="cpu", decode_input="teacher",
                     temperature=1.0, max_seconds=None)
    rng = np.random.default_rng(args.seed)  # one generator for the pool and the loop, as main()
    pool = record.DocPool(corpus, rng)
    rec, log = record.record_decode(model, pool, args, rng)
    reqs, log2, rows = distill_more.replay_decode(corpus, seed=3, ranks=2, per_rank=2,
                                                  steps=6, shift_step=3)
    assert log2 == log
    # The replayed (request, position) rows, fed through a prefill pass, give the recorded
    # decode samples of step 4.
    step = 4
    sel = np.flatnonzero(np.concatenate(rec._sample_step) == step)
    hidden = np.concatenate(rec._hidden)[sel]
    for row, (rid, pos) in enumerate(rows[step]):
        hid, _ = router_pairs(model, [reqs[rid]["tokens"][:pos + 1]])
        np.testing.assert_allclose(hid[pos].astype(np.float32),
                                   hidden[row].astype(np.float32), atol=5e-3)


def test_info_bound_skip_attention_features(tiny):
    """With layer attentions switched off, mlp_norm_L(x_L) is exactly layer L's router input;
    with them on, it is not (the feature leaves layer L's attention out)."""
    path, _ = tiny
    info_bound = _load_script("experiments.predictor.info_bound")
    model = load_model(path)
    windows = [np.arange(10) + 40, np.arange(7) + 90]
    h, s, z = info_bound.collect(model, windows, min_pos=2)
    assert h.shape == s.shape == (13, 3, 32) and z.shape == (13, 3, 8)
    assert not np.allclose(h[:, 1:], s[:, 1:], atol=1e-3)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            if layer.attn.o_proj.bias is not None:
                layer.attn.o_proj.bias.zero_()
    h, s, z = info_bound.collect(model, windows, min_pos=2)
    np.testing.assert_array_equal(h, s)


def test_write_report_summary_and_fixed_predictor_labels(tmp_path):
    from probe.predictor.report import write_report

    row = {"layer": 1, "tokens": 4, "topk_acc": 0.5, "half_hit": 0.75, "recall_2k": 0.875,
           "full_recall_2k": 0.5, "expert_load_err": 0.25}
    online = {"steps": [0, 1], "tags": ["a", "a"], "samples_per_step": [2, 2],
              "acc": {"1": [0.5, 0.7]}, "prior_acc": {"1": [0.4, 0.4]},
              "pred_load_err": {"1": [0.3, 0.2]}, "last_step_load_err": {"1": [np.nan, 0.5]},
              "same_step_share_load_err": {"1": [0.0, 0.0]},
              "plan_ratio": {"online": {"1": [np.nan, 1.02]}, "last_step": {"1": [np.nan, 1.1]},
                             "avg_8": {"1": [np.nan, 1.2]}},
              "name": "fixed", "note": "no update"}
    res = {"config": {"num_ranks": 2, "tokens_per_rank": 8}, "prior": [row],
           "distilled": [dict(row, topk_acc=0.95)], "online": online}
    text = write_report(res, tmp_path, summary="Predictors: made elsewhere.")
    assert "Predictors: made elsewhere." in text and "Samples:" not in text
    assert "## The fixed predictors across the recording" in text
    assert "(no update)" in text and "top-k acc (fixed)" in text
    assert "| 0-1 | a | 0.600 |" in text  # mean of the two steps' accuracy
    assert "plan IR ratio 1.020 vs last step 1.100" in text
    assert "- mean top-k accuracy: 0.950 vs target 0.90: met" in text
