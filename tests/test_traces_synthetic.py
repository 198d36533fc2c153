"""Synthetic generators: seeding, structure (distinct top-k, gates, churn, shift, inter-layer
correlation) and the calibration the workloads are built to match (IR at ep=8, top-4 of 128)."""

import numpy as np
import pytest

from probe.placement import imbalance_ratio, rank_load, sharded_home
from probe.traces import DECODE, PREFILL, WORKLOADS, generate, stats
from probe.traces.stats import hot_expert_churn

SMALL = dict(num_steps=6, tokens_per_step=512, num_layers=3, num_experts=32, top_k=4,
             num_ranks=4)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_seeded_and_well_formed(workload):
    a = generate(workload, seed=1, **SMALL)
    b = generate(workload, seed=1, **SMALL)
    c = generate(workload, seed=2, **SMALL)
    assert a == b
    assert not np.array_equal(a.experts, c.experts)
    assert a.num_steps == 6 and a.num_tokens == 6 * 512 and a.experts.shape == (3072, 3, 4)
    # Top-k ids of a token in a layer are distinct.
    ex = np.sort(a.experts, axis=-1)
    assert not np.any(ex[..., 1:] == ex[..., :-1])
    # Tokens are split evenly over ranks, rank blocks contiguous.
    src = a.step(0)[0]
    assert np.array_equal(np.bincount(src, minlength=4), [128] * 4)
    assert np.all(np.diff(src) >= 0)
    assert a.meta["workload"] == workload and a.meta["seed"] == 1
    expected = PREFILL if workload == "prefill" else DECODE
    assert np.all(a.phase == expected)


def test_gates_are_renormalised_probabilities():
    tr = generate("decode", gates=True, **SMALL)
    assert tr.gates.shape == tr.experts.shape and tr.gates.dtype == np.float32
    np.testing.assert_allclose(tr.gates.sum(-1), 1.0, rtol=1e-5)
    assert np.all(tr.gates > 0)
    # Without gates by default; the expert choices do not depend on the flag's storage.
    assert generate("decode", **SMALL).gates is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="workload must be one of"):
        generate("nope")
    with pytest.raises(ValueError, match="unknown knob"):
        generate("decode", bogus=1, **SMALL)
    with pytest.raises(ValueError, match="top_k"):
        generate("decode", **{**SMALL, "top_k": 40})
    with pytest.raises(ValueError, match="unknown domain"):
        generate("decode", domains={"klingon": 1.0}, **SMALL)
    with pytest.raises(ValueError, match=r"knob rho must lie in \[0, 1\]"):
        generate("decode", rho=1.5, **SMALL)
    with pytest.raises(ValueError, match="knob temperature must be > 0"):
        generate("repeat", temperature=0, **SMALL)
    with pytest.raises(ValueError, match="knob mix must be a number"):
        generate("decode", mix="lots", **SMALL)
    with pytest.raises(ValueError, match="shift_step"):
        generate("shift", shift_step=99, **SMALL)


def test_model_seed_is_shared_between_traffic_seeds():
    # Same routing model, different traffic: the popularity of experts per layer agrees
    # much more than under a different model_seed.
    kw = dict(SMALL, num_steps=4, tokens_per_step=4096, num_experts=64)
    a = generate("decode", seed=1, **kw).expert_counts().sum(0).astype(float)
    b = generate("decode", seed=2, **kw).expert_counts().sum(0).astype(float)
    c = generate("decode", seed=1, model_seed=7, **kw).expert_counts().sum(0).astype(float)

    def corr(x, y):
        return np.mean([np.corrcoef(x[i], y[i])[0, 1] for i in range(len(x))])

    assert corr(a, b) > 0.9
    assert corr(a, c) < 0.5


def test_next_layer_is_predictable_from_this_layer():
    """P(layer-1 expert | layer-0 experts), learnt from half the tokens, predicts the other
    half's layer-1 top-4 better than layer-1 popularity alone; the gain comes from the
    cluster carried between layers (rho) and vanishes for uniform routing."""

    def gain(workload, **kw):
        num_experts = 128
        tr = generate(workload, num_steps=4, tokens_per_step=8192, num_layers=2, seed=3, **kw)
        ex = tr.experts.astype(np.int64)
        half = len(ex) // 2
        co = np.zeros((num_experts, num_experts))
        for a in range(4):
            for b in range(4):
                np.add.at(co, (ex[:half, 0, a], ex[:half, 1, b]), 1)
        seen = np.bincount(ex[:half, 0].ravel(), minlength=num_experts)
        cond = co / np.maximum(seen[:, None], 1)  # P(e1 | e0)
        test = ex[half:]
        pred = np.argsort(-cond[test[:, 0]].sum(axis=1), axis=1)[:, :4]
        hits_cond = (pred[:, :, None] == test[:, 1, None, :]).any(-1).mean()
        marg = np.bincount(ex[:half, 1].ravel(), minlength=num_experts)
        hits_marg = np.isin(test[:, 1], np.argsort(-marg)[:4]).mean()
        return hits_cond - hits_marg

    linked, unlinked = gain("decode"), gain("decode", rho=0.0)
    assert linked > 0.05
    assert linked > unlinked + 0.04
    assert abs(gain("uniform")) < 0.03


def test_decode_hot_experts_drift_and_shift_is_abrupt():
    tr = generate("shift", num_steps=40, tokens_per_step=4096, num_layers=2, shift_step=20,
                  seed=0)
    assert tr.step_tags[:20] == ["code"] * 20 and tr.step_tags[20:] == ["chinese"] * 20
    counts = tr.expert_counts()
    churn = hot_expert_churn(counts, top=8)  # [N-1, L]
    calm = np.delete(churn, 19, axis=0)
    assert calm.mean() < 0.999  # hot sets move a little from step to step ...
    assert churn[19].mean() < calm.mean() - 0.1  # ... and jump at the shift
    before = counts[:20].sum(0).astype(float)
    after = counts[20:].sum(0).astype(float)
    hot_b = np.argsort(-before, axis=1)[:, :8]
    hot_a = np.argsort(-after, axis=1)[:, :8]
    overlap = np.mean([len(set(hot_b[i]) & set(hot_a[i])) / 8 for i in range(2)])
    assert overlap < 0.8


@pytest.mark.slow
def test_calibration_ir_at_ep8_top4_of_128():
    """The calibration targets (docs/traces.md) on a reduced but representative config (full E,
    K, G, L and tokens per step; fewer steps). Defaults are in WORKLOADS."""
    home = sharded_home(128, 8)

    def ir(workload, steps, **kw):
        tr = generate(workload, num_steps=steps, seed=11, **kw)
        return imbalance_ratio(rank_load(tr.load_counts().sum(axis=2), home))  # [N, L]

    decode = ir("decode", 12)
    assert 1.7 <= decode.mean() <= 2.15
    assert np.mean((decode >= 1.4) & (decode <= 2.3)) >= 0.65  # 0.71-0.85 over seeds 0-4
    assert decode.max() < 2.6
    prefill = ir("prefill", 8)
    assert prefill.max() > 2.6  # chunked prefill spikes
    repeat = ir("repeat", 6)
    assert repeat.mean() > decode.mean() + 0.3  # duplicated prompts: more skew
    uniform = ir("uniform", 4)
    assert uniform.max() < 1.12
    # stats() agrees with the hand computation.
    s = stats(generate("decode", num_steps=12, seed=11))
    np.testing.assert_allclose(s["ir"], decode)
    assert s["ir_overall"]["mean"] == pytest.approx(decode.mean())


def test_sampler_matches_plackett_luce_inclusion_probabilities():
    """_top_k_distinct (table look-up + redraws + exact fallback) against the closed form
    P(e in top-2) = p_e + sum_{j != e} p_j p_e / (1 - p_j), on a very skewed distribution
    that exercises the redraws."""
    from probe.traces.synthetic import _quantise, _tables, _top_k_distinct

    p = np.array([0.6, 0.25, 0.1, 0.04, 0.01])
    counts = _quantise(p[None, :], 4096)  # [1, E]
    q = counts[0] / 4096
    table = _tables(counts).astype(np.int16)
    rng = np.random.default_rng(0)
    n = 200_000
    got = _top_k_distinct(rng, table, q[None, :].astype(np.float32),
                          np.zeros(n, dtype=np.int64), 2)
    assert np.all(got[:, 0] != got[:, 1])
    empirical = np.bincount(got.ravel(), minlength=5) / n
    exact = np.array([q[e] + sum(q[j] * q[e] / (1 - q[j]) for j in range(5) if j != e)
                      for e in range(5)])
    np.testing.assert_allclose(empirical, exact, atol=4e-3)
    # First draw follows p itself.
    np.testing.assert_allclose(np.bincount(got[:, 0], minlength=5) / n, q, atol=4e-3)


def test_top_k_close_to_num_experts_uses_the_fallback():
    tr = generate("repeat", num_steps=2, tokens_per_step=256, num_layers=2, num_experts=8,
                  top_k=7, num_ranks=2)
    ex = np.sort(tr.experts, axis=-1)
    assert not np.any(ex[..., 1:] == ex[..., :-1])
