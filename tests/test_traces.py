"""RoutingTrace: construction, validation, load_counts, select/concat, file round trip and
rejection of every kind of broken file."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from probe.traces import DECODE, PREFILL, RoutingTrace, generate
from probe.traces.trace import FORMAT_NAME


def small_trace(seed=0, gates=True, num_steps=5, num_experts=12, num_ranks=3, top_k=3,
                num_layers=4):
    """Random trace with ragged steps (one empty) and distinct ids per token."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, size=num_steps)
    sizes[1] = 0
    total = int(sizes.sum())
    keys = rng.random((total, num_layers, num_experts))
    experts = np.argsort(keys, axis=-1)[..., :top_k].astype(np.int16)
    g = rng.random((total, num_layers, top_k)).astype(np.float32)
    return RoutingTrace(
        num_experts=num_experts, num_ranks=num_ranks, top_k=top_k,
        step_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        src_rank=rng.integers(0, num_ranks, total).astype(np.int16),
        experts=experts,
        gates=g / g.sum(-1, keepdims=True) if gates else None,
        phase=(np.arange(num_steps) % 2).astype(np.uint8),
        step_tags=[f"s{i}" for i in range(num_steps)],
        meta={"model": "toy", "params": {"a": 1}},
    )


def slow_load_counts(tr):
    out = np.zeros((tr.num_steps, tr.num_layers, tr.num_ranks, tr.num_experts), dtype=np.int64)
    for n in range(tr.num_steps):
        for t in range(tr.step_offsets[n], tr.step_offsets[n + 1]):
            for layer in range(tr.num_layers):
                for e in tr.experts[t, layer]:
                    out[n, layer, tr.src_rank[t], e] += 1
    return out


def test_sizes_and_step_views():
    tr = small_trace()
    assert tr.num_steps == 5 and tr.num_layers == 4 and tr.top_k == 3
    assert tr.num_tokens == int(tr.step_offsets[-1])
    assert tr.tokens_in_step(1) == 0
    src, ex, g = tr.step(2)
    lo, hi = tr.step_offsets[2], tr.step_offsets[3]
    assert np.array_equal(ex, tr.experts[lo:hi]) and np.array_equal(src, tr.src_rank[lo:hi])
    assert g.shape == ex.shape
    assert tr.tokens_in_step(-1) == tr.tokens_in_step(4)
    with pytest.raises(IndexError, match="out of range"):
        tr.step(5)


def test_load_counts_matches_slow_loop():
    tr = small_trace(seed=3)
    fast = tr.load_counts()
    assert fast.dtype == np.int32
    assert fast.shape == (5, 4, 3, 12)
    np.testing.assert_array_equal(fast, slow_load_counts(tr))
    np.testing.assert_array_equal(tr.expert_counts(), fast.sum(axis=2))
    # Every token adds K per layer.
    np.testing.assert_array_equal(fast.sum(axis=(2, 3)),
                                  tr.tokens_per_step[:, None] * tr.top_k * np.ones((1, 4)))
    # Subsets of steps, in the order asked.
    np.testing.assert_array_equal(tr.load_counts([4, 0]), fast[[4, 0]])
    np.testing.assert_array_equal(tr.load_counts(slice(1, 3)), fast[1:3])


def test_load_counts_chunked(monkeypatch):
    import probe.traces.trace as trace_mod

    tr = small_trace(seed=4, num_steps=9)
    whole = tr.load_counts()
    monkeypatch.setattr(trace_mod, "_CHUNK_ENTRIES", 7)  # forces one step per chunk
    np.testing.assert_array_equal(tr.load_counts(), whole)


def test_select_and_concat_round_trip():
    tr = small_trace(seed=5)
    parts = [tr.select([0, 1]), tr.select(slice(2, 5))]
    assert parts[1].num_steps == 3 and parts[1].step_tags == ["s2", "s3", "s4"]
    assert RoutingTrace.concat(parts) == tr
    rev = tr.select([4, 3])
    np.testing.assert_array_equal(rev.load_counts(), tr.load_counts([4, 3]))
    with pytest.raises(ValueError, match="gates"):
        RoutingTrace.concat([tr, small_trace(seed=5, gates=False)])
    with pytest.raises(ValueError, match="num_experts"):
        RoutingTrace.concat([tr, small_trace(seed=5, num_experts=13)])


def test_equality_detects_differences():
    a, b = small_trace(seed=6), small_trace(seed=6)
    assert a == b and a.equals(b)
    b.experts[0, 0, 0] = (b.experts[0, 0, 0] + 1) % 12
    assert a != b
    c = small_trace(seed=6)
    c.meta = {"model": "other", "params": {"a": 1}}
    assert not a.equals(c)
    assert not a.equals(small_trace(seed=6, gates=False))


def test_constructor_validation_names_the_field():
    tr = small_trace()
    fields = dict(num_experts=tr.num_experts, num_ranks=tr.num_ranks, top_k=tr.top_k,
                  step_offsets=tr.step_offsets, src_rank=tr.src_rank, experts=tr.experts,
                  gates=tr.gates, phase=tr.phase, step_tags=tr.step_tags, meta=tr.meta)
    cases = [
        ({"experts": tr.experts.astype(np.int32)}, TypeError, "'experts' has dtype int32"),
        ({"num_experts": 5}, ValueError, "'experts' holds ids"),
        ({"src_rank": tr.src_rank[:-1]}, ValueError, "'src_rank' has shape"),
        ({"num_ranks": 1}, ValueError, "'src_rank' holds ranks"),
        ({"phase": tr.phase[:-1]}, ValueError, "'phase' has shape"),
        ({"phase": np.full(5, 7, np.uint8)}, ValueError, "'phase' holds 7"),
        ({"step_tags": ["x"]}, ValueError, "'step_tags'"),
        ({"gates": tr.gates[:, :2]}, ValueError, "'gates' has shape"),
        ({"step_offsets": tr.step_offsets[::-1].copy()}, ValueError, "'step_offsets'"),
        ({"top_k": 2}, ValueError, "'experts' must have shape"),
        ({"meta": {"x": object()}}, TypeError, "'meta' must be JSON"),
    ]
    for change, exc, text in cases:
        with pytest.raises(exc, match=text):
            RoutingTrace(**{**fields, **change})
    bad_offsets = tr.step_offsets.copy()
    bad_offsets[2], bad_offsets[3] = bad_offsets[3] + 1, bad_offsets[2]
    with pytest.raises(ValueError, match="non-decreasing"):
        RoutingTrace(**{**fields, "step_offsets": bad_offsets})


def test_from_arrays_converts_and_checks():
    tr = RoutingTrace.from_arrays(num_experts=4, num_ranks=2, step_offsets=[0, 2],
                                  src_rank=[0, 1], experts=[[[0, 1]], [[2, 3]]])
    assert tr.experts.dtype == np.int16 and tr.phase.tolist() == [DECODE]
    assert tr.step_tags == [""]
    with pytest.raises(ValueError, match="experts ids must lie in"):
        RoutingTrace.from_arrays(num_experts=3, num_ranks=2, step_offsets=[0, 1], src_rank=[0],
                                 experts=[[[3]]])
    with pytest.raises(ValueError, match=r"experts must be \[T, L, K\]"):
        RoutingTrace.from_arrays(num_experts=3, num_ranks=2, step_offsets=[0, 1], src_rank=[0],
                                 experts=[[3]])


def test_save_load_round_trip(tmp_path):
    for gates in (True, False):
        tr = small_trace(seed=7, gates=gates)
        path = tmp_path / f"t{gates}.safetensors"
        tr.save(path)
        back = RoutingTrace.load(path)
        assert back == tr
        assert back.phase.tolist() == [PREFILL, DECODE, PREFILL, DECODE, PREFILL]
        assert back.meta == {"model": "toy", "params": {"a": 1}}


def test_round_trip_generated(tmp_path):
    tr = generate("decode", num_steps=3, tokens_per_step=256, num_layers=3, gates=True)
    tr.save(tmp_path / "g.trace")
    assert RoutingTrace.load(tmp_path / "g.trace") == tr


# ------------------------------------------------------------------------ broken files
def write_raw(path, tr, *, drop=(), extra=None, replace=None, header=None):
    """Write a trace file by hand so that tests can break one thing at a time."""
    tensors = {"step_offsets": tr.step_offsets, "src_rank": tr.src_rank,
               "experts": tr.experts, "phase": tr.phase}
    if tr.gates is not None:
        tensors["gates"] = tr.gates
    tensors.update(replace or {})
    tensors.update(extra or {})
    for name in drop:
        del tensors[name]
    meta = {"format": FORMAT_NAME, "version": "1", "num_experts": str(tr.num_experts),
            "num_ranks": str(tr.num_ranks), "top_k": str(tr.top_k),
            "step_tags": json.dumps(tr.step_tags), "meta": json.dumps(tr.meta)}
    meta.update(header or {})
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={k: v for k, v in meta.items() if v is not None})


def test_control_raw_writer_produces_a_loadable_file(tmp_path):
    tr = small_trace()
    write_raw(tmp_path / "ok", tr)
    assert RoutingTrace.load(tmp_path / "ok") == tr


@pytest.mark.parametrize("case, text", [
    ("truncated", "corrupt or truncated"),
    ("garbage", "corrupt or truncated"),
    ("empty", "corrupt or truncated"),
    ("wrong_dtype", "field 'experts' has dtype int32, expected int16"),
    ("id_out_of_range", "field 'experts' holds ids in \\[0, 99\\]"),
    ("rank_out_of_range", "field 'src_rank' holds ranks"),
    ("mismatched_lengths", "field 'src_rank' has shape"),
    ("gates_mismatch", "field 'gates' has shape"),
    ("offsets_past_end", "field 'step_offsets' must start at 0 and end at the token count"),
    ("wrong_version", "unsupported trace format version '2'"),
    ("not_a_trace", "not a probe routing trace"),
    ("missing_field", "missing field\\(s\\) \\['phase'\\]"),
    ("extra_field", "unexpected field\\(s\\) \\['logits'\\]"),
    ("missing_header", "header metadata is missing \\['top_k'\\]"),
    ("bad_meta_json", "header 'meta' is not valid JSON"),
    ("bad_int_header", "header 'num_experts' is 'many', not an integer"),
    ("tags_not_list", "header 'step_tags' must be a JSON list"),
])
def test_broken_files_are_rejected_with_the_problem_named(tmp_path, case, text):
    tr = small_trace(seed=8)
    path = tmp_path / f"{case}.trace"
    if case in ("truncated", "garbage", "empty"):
        tr.save(path)
        data = path.read_bytes()
        if case == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif case == "garbage":
            path.write_bytes(np.random.default_rng(0).bytes(len(data)))
        else:
            path.write_bytes(b"")
    elif case == "wrong_dtype":
        write_raw(path, tr, replace={"experts": tr.experts.astype(np.int32)})
    elif case == "id_out_of_range":
        ex = tr.experts.copy()
        ex[3, 1, 0] = 99
        write_raw(path, tr, replace={"experts": ex})
    elif case == "rank_out_of_range":
        src = tr.src_rank.copy()
        src[0] = 3
        write_raw(path, tr, replace={"src_rank": src})
    elif case == "mismatched_lengths":
        write_raw(path, tr, replace={"src_rank": tr.src_rank[:-2]})
    elif case == "gates_mismatch":
        write_raw(path, tr, replace={"gates": tr.gates[:-1]})
    elif case == "offsets_past_end":
        off = tr.step_offsets.copy()
        off[-1] += 5
        write_raw(path, tr, replace={"step_offsets": off})
    elif case == "wrong_version":
        write_raw(path, tr, header={"version": "2"})
    elif case == "not_a_trace":
        write_raw(path, tr, header={"format": "something-else"})
    elif case == "missing_field":
        write_raw(path, tr, drop=("phase",))
    elif case == "extra_field":
        write_raw(path, tr, extra={"logits": np.zeros(3, np.float32)})
    elif case == "missing_header":
        write_raw(path, tr, header={"top_k": None})
    elif case == "bad_meta_json":
        write_raw(path, tr, header={"meta": "{not json"})
    elif case == "bad_int_header":
        write_raw(path, tr, header={"num_experts": "many"})
    elif case == "tags_not_list":
        write_raw(path, tr, header={"step_tags": '{"a": 1}'})
    with pytest.raises(ValueError, match=text) as info:
        RoutingTrace.load(path)
    assert str(path) in str(info.value)  # the message names the file


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such trace file"):
        RoutingTrace.load(tmp_path / "nope.trace")


def test_partial_load_reads_a_step_window(tmp_path):
    tr = small_trace(seed=9, num_steps=7)
    tr.save(tmp_path / "w.trace")
    for window in (slice(2, 5), slice(0, 7), slice(5, None), slice(3, 3), slice(-2, None)):
        part = RoutingTrace.load(tmp_path / "w.trace", steps=window)
        assert part == tr.select(window), window
    with pytest.raises(ValueError, match="contiguous slice"):
        RoutingTrace.load(tmp_path / "w.trace", steps=slice(0, 6, 2))
    with pytest.raises(TypeError, match="slice or None"):
        RoutingTrace.load(tmp_path / "w.trace", steps=[1, 2])
    # A window still checks the ids it reads.
    ex = tr.experts.copy()
    ex[tr.step_offsets[3], 0, 0] = 50
    write_raw(tmp_path / "bad.trace", tr, replace={"experts": ex})
    assert RoutingTrace.load(tmp_path / "bad.trace", steps=slice(0, 2)).num_steps == 2
    with pytest.raises(ValueError, match="field 'experts' holds ids"):
        RoutingTrace.load(tmp_path / "bad.trace", steps=slice(3, 4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_steps=st.integers(1, 6), num_ranks=st.integers(1, 4),
       top_k=st.integers(1, 3), num_layers=st.integers(1, 3))
def test_property_counts_select_concat(seed, num_steps, num_ranks, top_k, num_layers):
    tr = small_trace(seed=seed, num_steps=max(num_steps, 2), num_ranks=num_ranks, top_k=top_k,
                     num_layers=num_layers, gates=bool(seed % 2))
    counts = tr.load_counts()
    np.testing.assert_array_equal(counts, slow_load_counts(tr))
    rng = np.random.default_rng(seed)
    order = rng.permutation(tr.num_steps)
    shuffled = tr.select(order)
    np.testing.assert_array_equal(shuffled.load_counts(), counts[order])
    cut = int(rng.integers(0, tr.num_steps + 1))
    assert RoutingTrace.concat([tr.select(slice(0, cut)), tr.select(slice(cut, None))]) == tr
