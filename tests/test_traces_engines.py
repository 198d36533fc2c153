"""Engine readers (probe.traces.engines): files written to the layouts of docs/traces.md."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from probe.traces.engines import (
    read_engine_trace,
    read_megatron_routing,
    read_routed_experts,
    read_sglang_dump,
    read_trtllm_expert_stats,
    read_vllm_eplb,
    read_vllm_routed_experts,
    trace_from_rank_counts,
)

torch = pytest.importorskip("torch")

E, L, K, S = 8, 3, 2, 2


def topk_ids(num_tokens, seed=0, num_experts=E):
    """int64 [T, L, K] distinct expert ids per (token, layer)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((num_tokens, L, num_experts)), axis=-1)[..., :K]


def rank_load(seed=0, steps=3):
    """int64 [N, L, S, E] loads of real tokens (consistent totals)."""
    load = np.zeros((steps, L, S, E), np.int64)
    for n in range(steps):
        for s in range(S):
            ids = topk_ids(5 + n + s, seed=seed + 10 * n + s)
            for layer in range(L):
                load[n, layer, s] = np.bincount(ids[:, layer].ravel(), minlength=E)
    return load


def test_trace_from_rank_counts_reproduces_the_counts():
    load = rank_load()
    trace = trace_from_rank_counts(load, top_k=K)
    assert np.array_equal(trace.load_counts(), load)
    assert trace.num_ranks == S and trace.top_k == K


def test_trace_from_rank_counts_rejects_inconsistent_totals():
    load = rank_load()
    load[1, 2, 0, 0] += 1
    with pytest.raises(ValueError, match="step 1, rank 0: counts sum to"):
        trace_from_rank_counts(load, top_k=K)
    with pytest.raises(ValueError, match=r"load must be \[N, L, S, E\]"):
        trace_from_rank_counts(load[0], top_k=K)


# ----------------------------------------------------------------------------- SGLang
def test_sglang_stat_dump(tmp_path):
    counts = rank_load().sum(axis=2)  # [N, L, E]
    buffer = np.concatenate([counts, np.zeros((2, L, E), np.int64)])  # unfilled buffer rows
    path = tmp_path / "stat.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(buffer)}, path)
    trace = read_sglang_dump(path, top_k=K)
    assert np.array_equal(trace.expert_counts(), counts)
    assert trace.meta["mode"] == "stat"
    trace4 = read_sglang_dump(path, top_k=K, num_ranks=4)
    assert trace4.num_ranks == 4 and np.array_equal(trace4.expert_counts(), counts)
    with pytest.raises(ValueError, match="pass top_k"):
        read_sglang_dump(path)


def test_sglang_per_pass_dump_maps_physical_slots(tmp_path):
    load = rank_load()  # [N, L, S, E] logical
    # Physical layout: R = E + 2 slots, slots E and E+1 copy experts 0 and 3; split their
    # counts between the two copies.
    phy2log = np.tile(np.r_[np.arange(E), 0, 3], (L, 1))
    records = []
    for n in range(load.shape[0]):
        for s in range(S):
            phys = np.zeros((L, E + 2), np.int64)
            phys[:, :E] = load[n, :, s]
            phys[:, E] = phys[:, 0] // 2
            phys[:, 0] -= phys[:, E]
            records.append({"forward_pass_id": 100 + n, "rank": s,
                            "global_physical_count": torch.tensor(phys)})
    path = tmp_path / "per_pass.pt"
    torch.save({"records": records[::-1],
                "last_physical_to_logical_map": torch.tensor(phy2log)}, path)
    trace = read_sglang_dump(path, top_k=K)
    assert np.array_equal(trace.load_counts(), load)
    assert trace.meta["mode"] == "per_pass"


def test_sglang_per_token_dump_keeps_tokens(tmp_path):
    phy2log = np.tile(np.r_[np.arange(E), 5], (L, 1))
    records, expect = [], []
    for n in range(2):
        for s in range(S):
            ids = topk_ids(4, seed=n * 7 + s)  # [T, L, K] logical
            phys = ids.copy()
            phys[phys == 5] = E  # route expert 5 through its second slot
            phys = np.concatenate([phys, np.full((2, L, K), -1)])  # two padding tokens
            records.append({"forward_pass_id": n, "rank": s,
                            "topk_ids_of_layer": torch.tensor(np.transpose(phys, (1, 0, 2)))})
            expect.append(ids)
    path = tmp_path / "per_token.pt"
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(phy2log)},
               path)
    trace = read_sglang_dump(path)
    assert trace.num_steps == 2 and trace.num_tokens == 16 and trace.num_experts == E
    assert np.array_equal(trace.experts, np.concatenate(expect))
    assert trace.src_rank.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "expected a dict"),
    ({"foo": 1}, "expected 'logical_count'"),
    ({"logical_count": torch.zeros(3)}, "must be a 2 or 3-D array"),
    ({"logical_count": torch.zeros((1, 2, 3), dtype=torch.int64)}, "no non-zero step"),
    ({"logical_count": -torch.ones((1, 2, 3), dtype=torch.int64)}, "negative counts"),
    ({"records": [{"rank": 0}]}, r"records\[0\] needs 'forward_pass_id'"),
    ({"records": [{"rank": 0, "forward_pass_id": 0, "x": 1}]}, "has none of"),
    ({"records": [{"rank": 0, "forward_pass_id": 0, "physical_count": torch.ones((2, 4))}],
      "last_physical_to_logical_map": torch.zeros((3, 4), dtype=torch.int64)},
     "physical_count must be a 2-D array of integers"),
    ({"records": [{"rank": 0, "forward_pass_id": 0,
                   "physical_count": torch.ones((2, 4), dtype=torch.int64)}],
      "last_physical_to_logical_map": torch.zeros((3, 4), dtype=torch.int64)},
     r"need \[L, R\] = \[2, 4\]"),
])
def test_sglang_malformed_dumps(tmp_path, obj, match):
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match):
        read_sglang_dump(path, top_k=1)


def test_sglang_garbage_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read as a torch.save file"):
        read_sglang_dump(path, top_k=1)


# ----------------------------------------------------------------------------- vLLM
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_routed_experts_in_every_container(tmp_path, suffix):
    reqs = [topk_ids(6, seed=1).astype(np.int32), topk_ids(3, seed=2).astype(np.int32)]
    path = tmp_path / f"routed{suffix}"
    if suffix == ".npy":
        reqs = reqs[:1]
        np.save(path, reqs[0])
    elif suffix == ".npz":
        np.savez(path, req_0=reqs[0], req_1=reqs[1])
    elif suffix == ".pt":
        torch.save([torch.tensor(r) for r in reqs], path)
    else:
        save_file({"req_0": reqs[0], "req_1": reqs[1]}, str(path))
    got = read_routed_experts(path)
    assert len(got) == len(reqs)
    assert all(np.array_equal(a, b) for a, b in zip(got, reqs, strict=True))
    trace = read_vllm_routed_experts(path, num_experts=E, num_ranks=2)
    assert trace.num_tokens == sum(len(r) for r in reqs)


def test_routed_experts_rejects_wrong_shapes(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"req_0": np.zeros((3, 2), np.int32)}, str(path))
    with pytest.raises(ValueError, match="entry req_0 must be a 3-D array"):
        read_routed_experts(path)
    with pytest.raises(ValueError, match="must be .npy, .npz, .safetensors or .pt"):
        read_routed_experts(tmp_path / "x.csv")
    torch.save([torch.zeros((2, 2, 2))], tmp_path / "f.pt")
    with pytest.raises(ValueError, match="must be a 3-D array of integers"):
        read_routed_experts(tmp_path / "f.pt")


def test_vllm_eplb_window_json_pt_npy(tmp_path):
    counts = rank_load().sum(axis=2)  # [W, L, E]
    (tmp_path / "h.json").write_text(json.dumps(
        {"load_history": [{"logical_expert_load": c.tolist()} for c in counts]}))
    np.save(tmp_path / "w.npy", counts)
    phy2log = np.tile(np.r_[np.arange(E), 1], (L, 1))
    phys = np.concatenate([counts, np.zeros((len(counts), L, 1), np.int64)], axis=2)
    phys[..., E] = phys[..., 1] // 3
    phys[..., 1] -= phys[..., E]
    torch.save({"expert_load_window": torch.tensor(phys),
                "physical_to_logical_map": torch.tensor(phy2log)}, tmp_path / "w.pt")
    for name in ("h.json", "w.npy", "w.pt"):
        trace = read_vllm_eplb(tmp_path / name, top_k=K, num_ranks=2)
        assert np.array_equal(trace.expert_counts(), counts), name
        assert trace.num_ranks == 2


def test_vllm_eplb_malformed(tmp_path):
    torch.save({"window": torch.zeros(1)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="expected 'expert_load_window'"):
        read_vllm_eplb(tmp_path / "a.pt", top_k=1)
    torch.save({"expert_load_window": torch.ones((2, 3, 5), dtype=torch.int64)},
               tmp_path / "b.pt")
    with pytest.raises(ValueError, match="5 physical slots but num_experts = 4"):
        read_vllm_eplb(tmp_path / "b.pt", top_k=1, num_experts=4)
    with pytest.raises(ValueError, match="must be .json, .pt or .npy"):
        read_vllm_eplb(tmp_path / "c.txt", top_k=1)


# ----------------------------------------------------------------------------- Megatron
def test_megatron_ids_and_routing_map(tmp_path):
    ids = topk_ids(10, seed=3)  # [T, L, K]
    by_layer = {f"decoder.layers.{2 * j + 1}.mlp.router": torch.tensor(ids[:, j])
                for j in range(L)}
    torch.save(by_layer, tmp_path / "ids.pt")
    trace = read_megatron_routing(tmp_path / "ids.pt", num_experts=E, tokens_per_step=4,
                                  num_ranks=2)
    assert trace.num_steps == 3 and trace.tokens_per_step.tolist() == [4, 4, 2]
    assert np.array_equal(trace.experts, ids)
    maps = []
    for j in range(L):
        m = np.zeros((10, E), bool)
        np.put_along_axis(m, ids[:, j], True, axis=1)
        maps.append(torch.tensor(m))
    torch.save(maps, tmp_path / "maps.pt")
    trace = read_megatron_routing(tmp_path / "maps.pt")
    assert trace.num_experts == E
    assert np.array_equal(np.sort(trace.experts, axis=2), np.sort(ids, axis=2))


def test_megatron_malformed(tmp_path):
    m = np.zeros((3, E), bool)
    m[0, :2] = m[1, :2] = m[2, :3] = True
    torch.save([torch.tensor(m)], tmp_path / "a.pt")
    with pytest.raises(ValueError, match="different numbers of experts"):
        read_megatron_routing(tmp_path / "a.pt")
    torch.save([torch.zeros((3, 2), dtype=torch.int64), torch.zeros((4, 2), dtype=torch.int64)],
               tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"layer \[1\] has \[T, K\] = \[4, 2\]"):
        read_megatron_routing(tmp_path / "b.pt")
    torch.save([], tmp_path / "c.pt")
    with pytest.raises(ValueError, match="holds no MoE layer"):
        read_megatron_routing(tmp_path / "c.pt")


# ----------------------------------------------------------------------------- TensorRT-LLM
def write_trtllm(directory, load, top_k=K):
    directory.mkdir()
    (directory / "meta_info.json").write_text(json.dumps(
        {"num_experts": load.shape[3], "num_experts_per_token": top_k}))
    for r in range(load.shape[2]):
        save_file({f"{10 + n}_{3 + layer}": load[n, layer, r].astype(np.int32)
                   for n in range(load.shape[0]) for layer in range(load.shape[1])},
                  str(directory / f"rank{r}.safetensors"))


def test_trtllm_expert_statistics(tmp_path):
    load = rank_load(seed=5, steps=4)
    write_trtllm(tmp_path / "stats", load)
    trace = read_trtllm_expert_stats(tmp_path / "stats")
    assert np.array_equal(trace.load_counts(), load)
    assert trace.meta["iterations"] == [10, 11, 12, 13] and trace.meta["layers"] == [3, 4, 5]
    assert read_engine_trace(tmp_path / "stats", "trtllm-stats") == trace


def test_trtllm_malformed(tmp_path):
    load = rank_load(seed=5, steps=2)
    write_trtllm(tmp_path / "a", load)
    (tmp_path / "a" / "rank1.safetensors").unlink()
    save_file({"x": np.zeros(E, np.int32)}, str(tmp_path / "a" / "rank2.safetensors"))
    with pytest.raises(ValueError, match=r"rank files \[0, 2\] do not cover"):
        read_trtllm_expert_stats(tmp_path / "a")
    (tmp_path / "a" / "rank2.safetensors").unlink()
    save_file({"x": np.zeros(E, np.int32)}, str(tmp_path / "a" / "rank1.safetensors"))
    with pytest.raises(ValueError, match="is not named '<iteration>_<layer>'"):
        read_trtllm_expert_stats(tmp_path / "a")
    save_file({"1_1": np.zeros(E + 1, np.int32)}, str(tmp_path / "a" / "rank1.safetensors"))
    with pytest.raises(ValueError, match=f"must hold {E} non-negative integer counts"):
        read_trtllm_expert_stats(tmp_path / "a")
    with pytest.raises(ValueError, match="are a directory"):
        read_trtllm_expert_stats(tmp_path / "a" / "meta_info.json")


def test_dispatch_rejects_unknown_format_and_options(tmp_path):
    with pytest.raises(ValueError, match="fmt must be one of"):
        read_engine_trace(tmp_path, "csv")
    with pytest.raises(ValueError, match="format 'probe' takes no top_k"):
        read_engine_trace(tmp_path / "x.trace", "probe", top_k=2)
    with pytest.raises(ValueError, match="format 'trtllm-stats' takes no num_ranks"):
        read_engine_trace(tmp_path, "trtllm-stats", num_ranks=2)


def test_trace_convert_reads_engine_formats(tmp_path):
    import typer
    from typer.testing import CliRunner

    from probe.traces.cli import register
    from probe.traces.trace import RoutingTrace

    app = typer.Typer()
    register(app)
    load = rank_load(seed=2)
    write_trtllm(tmp_path / "stats", load)
    out = tmp_path / "t.trace"
    res = CliRunner().invoke(app, ["trace", "convert", str(tmp_path / "stats"), str(out),
                                   "--from", "trtllm-stats"])
    assert res.exit_code == 0, res.output
    assert np.array_equal(RoutingTrace.load(out).load_counts(), load)
    torch.save({"logical_count": torch.tensor(load.sum(axis=2))}, tmp_path / "d.pt")
    res = CliRunner().invoke(app, ["trace", "convert", str(tmp_path / "d.pt"), str(out),
                                   "--from", "sglang-dump"])
    assert res.exit_code == 1 and "pass top_k" in res.output
