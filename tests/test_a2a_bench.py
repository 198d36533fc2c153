"""experiments/comm/a2a_bench.py end to end on 2 CPU ranks (gloo): what a multi-GPU run uses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a2a_bench_gloo_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "experiments.comm.a2a_bench", "--device", "cpu", "--tokens", "8,16",
           "--models", "gpt-oss-120b", "--p2p-mb", "1", "--iters", "2", "--repeats", "1",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "a2a.json").read_text())
    assert res["meta"]["world"] == 2 and res["meta"]["comm"] == "gloo"
    a2a = [r for r in res["rows"] if r["kind"] == "all_to_all"]
    p2p = [r for r in res["rows"] if r["kind"] == "p2p"]
    assert [r["T"] for r in a2a] == [8, 16] and len(p2p) == 1
    for r in a2a:
        # T K / G rows of D float32 values go to the one other rank
        assert r["bytes_out_per_rank"] == r["T"] * r["K"] // 2 * r["D"] * 4
        assert r["measured_us"] > 0 and r["cost_model_us"] > 0
    assert p2p[0]["MB"] == 1 and p2p[0]["GBps"] > 0
