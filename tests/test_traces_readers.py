"""Readers: per-request routed experts (arrays, .npy, .npz) and vLLM EPLB load history."""

import json

import numpy as np
import pytest

from probe.traces import (
    DECODE,
    PREFILL,
    RoutingTrace,
    from_routed_experts,
    load_from_counts,
    read_routed_experts_npy,
    read_routed_experts_npz,
    read_vllm_eplb_load_history,
    trace_from_counts,
)

E, L, K = 16, 3, 2


def requests(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((n, L, E)), axis=-1)[..., :K].astype(np.int32)
            for n in lengths]


def test_one_step_round_robin_ranks():
    reqs = requests([5, 3, 4, 2])
    tr = from_routed_experts(reqs, num_experts=E, num_ranks=2)
    assert tr.num_steps == 1 and tr.num_tokens == 14 and tr.phase.tolist() == [PREFILL]
    # Requests 0 and 2 on rank 0, 1 and 3 on rank 1; tokens ordered by rank.
    assert np.bincount(tr.src_rank).tolist() == [9, 5]
    assert np.array_equal(tr.experts[:5], reqs[0]) and np.array_equal(tr.experts[5:9], reqs[2])
    # Loads agree with a direct count of the inputs.
    direct = np.zeros((L, 2, E), dtype=np.int64)
    for i, r in enumerate(reqs):
        for layer in range(L):
            np.add.at(direct[layer, i % 2], r[:, layer].ravel(), 1)
    np.testing.assert_array_equal(tr.load_counts()[0], direct)


def test_given_rank_map_and_tokens_per_step():
    reqs = requests([5, 3, 4])
    tr = from_routed_experts(reqs, num_experts=E, num_ranks=4, rank_of_request=[3, 3, 0],
                             tokens_per_step=5)
    assert tr.tokens_per_step.tolist() == [5, 5, 2]
    assert set(tr.src_rank.tolist()) == {0, 3}
    assert tr.expert_counts().sum() == 12 * L * K


def test_prompt_lens_replay_prefill_then_decode():
    reqs = requests([6, 4])
    tr = from_routed_experts(reqs, num_experts=E, num_ranks=2, prompt_lens=[3, 2])
    # Step 0: 3 + 2 prompt tokens; then one token per request still generating.
    assert tr.tokens_per_step.tolist() == [5, 2, 2, 1]
    assert tr.phase.tolist() == [PREFILL, DECODE, DECODE, DECODE]
    _, ex, _ = tr.step(3)
    assert np.array_equal(ex[0], reqs[0][5])  # last token of the longer request


def test_routed_experts_bad_inputs():
    with pytest.raises(ValueError, match=r"arrays\[1\] must be \[tokens, layers, top_k\]"):
        from_routed_experts([requests([2])[0], np.zeros((3, 2), int)], num_experts=E,
                            num_ranks=2)
    bad = requests([3])
    bad[0][1, 0, 0] = E
    with pytest.raises(ValueError, match=r"outside \[0, num_experts=16\)"):
        from_routed_experts(bad, num_experts=E, num_ranks=2)
    with pytest.raises(TypeError, match="integer expert ids"):
        from_routed_experts([np.zeros((2, L, K))], num_experts=E, num_ranks=2)
    with pytest.raises(ValueError, match="layers, top_k"):
        from_routed_experts([np.zeros((2, L, K), int), np.zeros((2, L, K + 1), int)],
                            num_experts=E, num_ranks=2)
    with pytest.raises(ValueError, match="rank_of_request"):
        from_routed_experts(requests([2, 2]), num_experts=E, num_ranks=2, rank_of_request=[0])
    with pytest.raises(ValueError, match="prompt_lens"):
        from_routed_experts(requests([2]), num_experts=E, num_ranks=2, prompt_lens=[5])


def test_npy_and_npz_files(tmp_path):
    reqs = requests([4, 2, 3])
    np.save(tmp_path / "one.npy", reqs[0])
    assert np.array_equal(read_routed_experts_npy(tmp_path / "one.npy")[0], reqs[0])
    # Natural order of names: req_2 before req_10.
    np.savez(tmp_path / "many.npz", req_10=reqs[2], req_2=reqs[1], req_0=reqs[0])
    got = read_routed_experts_npz(tmp_path / "many.npz")
    assert [len(a) for a in got] == [4, 2, 3]
    np.save(tmp_path / "flat.npy", np.zeros((4, 2), int))
    with pytest.raises(ValueError, match="got ndim 2"):
        read_routed_experts_npy(tmp_path / "flat.npy")
    np.savez(tmp_path / "flat.npz", a=np.zeros(3, int))
    with pytest.raises(ValueError, match="entry 'a' must be"):
        read_routed_experts_npz(tmp_path / "flat.npz")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="cannot read as .npy"):
        read_routed_experts_npy(tmp_path / "junk.npy")


def eplb_file(path, counts):
    path.write_text(json.dumps({"load_history": [
        {"step": i, "logical_expert_load": c.tolist()} for i, c in enumerate(counts)]}))


def test_vllm_eplb_load_history(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, size=(4, L, E))
    eplb_file(tmp_path / "h.json", counts)
    got = read_vllm_eplb_load_history(tmp_path / "h.json")
    assert got.dtype == np.int64 and np.array_equal(got, counts)
    spread = load_from_counts(got, 3)
    assert spread.shape == (4, L, 3, E) and spread.dtype == np.int32
    np.testing.assert_array_equal(spread.sum(axis=2), counts)
    assert spread.max(axis=2).astype(int).tolist() == (-(-counts // 3)).tolist()


@pytest.mark.parametrize("content, text", [
    ("{", "cannot read as JSON"),
    ('{"other": []}', "non-empty 'load_history'"),
    ('{"load_history": [{"x": 1}]}', "has no 'logical_expert_load'"),
    ('{"load_history": [{"logical_expert_load": [1, 2]}]}', "got ndim 1"),
    ('{"load_history": [{"logical_expert_load": [[1, -2]]}]}', "non-negative integer"),
    ('{"load_history": [{"logical_expert_load": [[1, 2], [3]]}]}', "rectangular"),
    ('{"load_history": [{"logical_expert_load": [[1, 2]]}, {"logical_expert_load": [[1]]}]}',
     r"load_history\[1\] has shape"),
])
def test_vllm_eplb_bad_inputs(tmp_path, content, text):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=text):
        read_vllm_eplb_load_history(path)


def test_trace_from_counts_reproduces_counts():
    # Build consistent counts from a real set of choices: 2 steps of 30 and 10 tokens.
    reqs = requests([30], seed=3) + requests([10], seed=4)
    counts = np.stack([np.stack([np.bincount(r[:, layer].ravel(), minlength=E)
                                 for layer in range(L)]) for r in reqs])
    tr = trace_from_counts(counts, num_ranks=4, top_k=K)
    assert isinstance(tr, RoutingTrace) and tr.tokens_per_step.tolist() == [30, 10]
    np.testing.assert_array_equal(tr.expert_counts(), counts)
    ex = np.sort(tr.experts, axis=-1)
    assert not np.any(ex[..., 1:] == ex[..., :-1])  # distinct ids per token
    bad = counts.copy()
    bad[0, 1, 0] += 1
    with pytest.raises(ValueError, match="same multiple of top_k"):
        trace_from_counts(bad, num_ranks=4, top_k=K)
    heavy = np.zeros((1, 1, E), int)
    heavy[0, 0, :2] = [4, 0]
    with pytest.raises(ValueError, match="more load than the step has tokens"):
        trace_from_counts(heavy, num_ranks=2, top_k=2)
