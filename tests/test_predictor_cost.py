"""The predictor cost benchmark runs on CPU and its analytic numbers add up."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench():
    from experiments.predictor import predictor_cost

    return predictor_cost


def test_analytic_flops_and_dispatch(bench):
    a = bench.analytic(dim=4, num_experts=3, hidden=2, tokens=5, top_k=1, elem_bytes=2)
    assert a["flops"] == 2 * 5 * (4 * 3 + 4 * 2 + 2 * 3)
    from probe.specs import hardware_preset, model_preset

    spec = model_preset("gpt-oss-120b")
    # 512 tokens x 4 experts x 7/8 leave the rank; 2880 x 2 bytes each over 450 GB/s.
    expect = 512 * 4 * 7 / 8 * 2880 * 2 / 450e9 * 1e6
    assert bench.dispatch_us(spec, hardware_preset("h200x8"), 512, 8) == pytest.approx(expect)


def test_cpu_run_writes_rows(bench, tmp_path):
    rows = bench.main(["--device", "cpu", "--models", "gpt-oss-120b", "--tokens", "16",
                       "--hidden", "8", "--quick", "--buffers", "1", "--out", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["eager_us"] > 0
    saved = json.loads((tmp_path / "predictor_cost_cpu.json").read_text())
    assert saved[0]["T"] == 16 and saved[0]["H"] == 8
    assert "| gpt-oss-120b |" in bench.markdown(saved)
