"""experiments/runtime/moe_layer.py end to end on the CPU with tiny shapes (what the H200 runs)."""

from __future__ import annotations

import json

import pytest

from experiments.runtime.moe_layer import (
    GRAPHS_OFF_CPU,
    GROUPED_VARIANTS,
    TUNE_OFF,
    TUNE_OFF_CPU,
    TUNED,
    main,
)


@pytest.mark.parametrize("tune", [False, True])
def test_moe_layer_bench_cpu_quick(tmp_path, tune):
    main(["--device", "cpu", "--quick", "--out", str(tmp_path)] + (["--tune"] if tune else []))
    result = json.loads((tmp_path / "moe_layer.json").read_text())
    rows = result["rows"]
    assert {r["family"] for r in rows} == {"gpt_oss", "qwen3_moe"}
    for r in rows:
        assert set(r["seconds"]) >= {"grouped", "loop"}
        # every GroupedExperts variant ran (the Triton permutation falls back to torch ops on
        # the CPU without the interpreter) and the fastest is named
        assert set(r["seconds"]) >= set(GROUPED_VARIANTS)
        assert r["best"]["seconds"] == min(r["seconds"][p] for p in GROUPED_VARIANTS)
        assert all(s > 0 for s in r["seconds"].values())
        assert r["roofline_s"] > 0 and 0 < r["active_experts"] <= r["E"]
        assert r["twin_rel_err"] < 2e-2
        assert r["hf"] == "ok" and "hf eager" in r["seconds"]
        assert all(e < 2e-2 for e in r["rel_err_vs_grouped"].values())
        # graph replay is CUDA only: every variant says so, none is timed
        assert r["graph_seconds"] == {} and r["graph_best"] is None and r["parts_graph"] == {}
        assert all(r["graph_skipped"][p] == GRAPHS_OFF_CPU for p in (*GROUPED_VARIANTS, "loop"))
        # work per layer: the CPU range check's two reads, nothing else read back, except
        # in the loop (the group sizes, once per GEMM)
        ops = r["ops_per_layer"]
        assert all(ops[p]["host_reads"] == 2 and ops[p]["device_ops"] > 0
                   for p in GROUPED_VARIANTS), ops
        assert ops["loop"]["host_reads"] == 4
        assert set(r["ops_per_layer"]) == {*GROUPED_VARIANTS, "loop"}
    md = (tmp_path / "moe_layer.md").read_text()
    assert "| shape | T |" in md and "Replayed as CUDA graphs" in md
    assert f"Steps replayed as CUDA graphs: {GRAPHS_OFF_CPU}" in md
    summary = result["meta"]["summary"]
    assert len(summary) == 2 and all("best eager" in line and GRAPHS_OFF_CPU in line
                                     for line in summary)
    assert summary[0] in md
    # --tune on the CPU: nothing tuned, and every output says why (the Triton GEMM is CUDA
    # only); without --tune: says that it was not asked for
    why = TUNE_OFF_CPU if tune else TUNE_OFF
    assert all(r["tuning"] == {"skipped": why} and TUNED not in r["seconds"] for r in rows)
    assert why in md and all(why in line for line in summary)
    assert result["meta"]["tune"] is tune and result["meta"]["tune_seconds"] == 0.0
    assert (result["meta"]["tune_candidates"] is not None) is tune
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {o["path"] for o in manifest["outputs"]} >= {"moe_layer.json", "moe_layer.md"}
