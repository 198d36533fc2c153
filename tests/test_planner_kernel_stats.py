"""experiments.planner.kernel_stats: the work counts of the GPU greedy's kernel on the decode
layers (run sequentially, no GPU) and, where NVVM and ptxas are installed, ptxas's numbers."""

from __future__ import annotations

import json
import shutil

import pytest

from experiments.planner import kernel_stats


@pytest.mark.slow
def test_kernel_stats_quick_counts_the_work_of_each_move(tmp_path):
    assert kernel_stats.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernel_stats.json").read_text())
    assert [row["shape"] for row in report["work"]] == ["ep=8, E=128", "ep=64, E=256"]
    for row in report["work"]:
        assert row["moves"] >= 1 and len(row["per_move"]) == row["moves"]
        for move in row["per_move"]:  # a move applies a candidate that built its pool
            assert move["tried"] >= move["unpruned"] >= 1
            assert len(move["evals"]) == move["unpruned"] and min(move["evals"]) >= 2
            # the block's rounds (SLOTS slots): at least one per search, never more than the
            # evaluations one after another, and the move's dependent steps fewer
            assert len(move["rounds"]) == move["unpruned"] and min(move["rounds"]) >= 1
            assert all(r <= n for r, n in zip(move["rounds"], move["evals"], strict=True))
            assert move["chain_after"] < move["chain_before"]
        assert row["rounds_per_unpruned"] < row["evals_per_unpruned"] / 2
    assert all(row["skipped"] == "--quick" for row in report["ptxas"])
    assert (tmp_path / "kernel_stats.md").exists()
    assert (tmp_path / "kernel_stats.manifest.json").exists()


@pytest.mark.slow
def test_ptxas_numbers_of_the_shared_kernel(tmp_path):
    if shutil.which("ptxas") is None:
        pytest.skip("ptxas is not on PATH")
    stats = kernel_stats.ptx_stats(8, 128, "shared", tmp_path)
    if "skipped" in stats:
        pytest.skip(stats["skipped"])
    assert 0 < stats["registers"] <= 255 and stats["stack_bytes"] >= 0
    assert stats["shared_bytes"] >= 32 * 1024  # the working arrays are in shared memory
    assert stats["cubin_bytes"] > 0 and stats["ptx_instructions"] > 1000


@pytest.mark.slow
def test_kernel_trace_quick_counts_lines_between_barriers(tmp_path):
    """experiments.planner.kernel_trace --quick (the CUDA simulator, one ep=8 decode layer, 32
    threads): the layer's moves, and per move a critical path no longer than the warps' lines
    together, which are no more than all the threads' lines, and at least the barriers of a
    move's pruning, pool and search."""
    from experiments.planner import kernel_trace

    assert kernel_trace.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernel_trace.json").read_text())
    (row,) = report["rows"]
    assert row["shape"] == "ep=8, E=128" and row["threads"] == 32 and row["moves"] >= 4
    assert 0 < row["critical_per_move"] <= row["warp_lines_per_move"]
    assert row["warp_lines_per_move"] <= row["thread_lines_per_move"]
    assert row["barriers_per_move"] >= 6 and row["critical_start"] > 0
    assert sum(row["critical_per_move_by_barrier"].values()) == pytest.approx(
        row["critical_per_move"])
    assert (tmp_path / "kernel_trace.md").exists()
    assert (tmp_path / "kernel_trace.manifest.json").exists()
