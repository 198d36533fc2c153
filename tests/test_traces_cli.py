"""`probe trace gen|stats|convert` through typer's CliRunner on an app built here."""

import json

import numpy as np
import typer
from typer.testing import CliRunner

from probe.traces import RoutingTrace, generate
from probe.traces.cli import register

runner = CliRunner()


def make_app():
    app = typer.Typer()
    register(app)
    return app


def test_gen_then_stats(tmp_path):
    app = make_app()
    out = tmp_path / "d.trace"
    res = runner.invoke(app, ["trace", "gen", "decode", "--out", str(out), "--steps", "3",
                              "--tokens", "1024", "--layers", "2", "--seed", "5",
                              "--set", "mix=0.2"])
    assert res.exit_code == 0, res.output
    tr = RoutingTrace.load(out)
    assert tr == generate("decode", num_steps=3, tokens_per_step=1024, num_layers=2, seed=5,
                          mix=0.2)
    res = runner.invoke(app, ["trace", "stats", str(out)])
    assert res.exit_code == 0, res.output
    assert "Imbalance ratio" in res.output and "Hot-expert churn" in res.output
    res = runner.invoke(app, ["trace", "stats", str(out), "--json", "--ranks", "4"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["ep"] == 4 and len(data["ir_per_layer"]) == 2
    assert 1.0 <= data["ir_overall"]["mean"] <= data["ir_overall"]["max"]


def test_gen_rejects_bad_knob_and_stats_rejects_corrupt_file(tmp_path):
    app = make_app()
    res = runner.invoke(app, ["trace", "gen", "decode", "--out", str(tmp_path / "x"),
                              "--set", "bogus=1"])
    assert res.exit_code != 0 and "unknown knob" in res.output
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"\x00" * 50)
    res = runner.invoke(app, ["trace", "stats", str(bad)])
    assert res.exit_code == 1 and "corrupt or truncated" in res.output


def test_convert_routed_experts_and_vllm_eplb(tmp_path):
    app = make_app()
    rng = np.random.default_rng(0)
    reqs = {f"req_{i}": np.argsort(rng.random((n, 2, 16)), -1)[..., :4]
            for i, n in enumerate([5, 7, 3])}
    np.savez(tmp_path / "r.npz", **reqs)
    out = tmp_path / "r.trace"
    res = runner.invoke(app, ["trace", "convert", str(tmp_path / "r.npz"), str(out),
                              "--from", "routed-experts", "--experts", "16", "--ranks", "2",
                              "--tokens-per-step", "5"])
    assert res.exit_code == 0, res.output
    tr = RoutingTrace.load(out)
    assert tr.num_tokens == 15 and tr.num_steps == 3 and tr.num_experts == 16

    counts = tr.expert_counts()  # consistent counts: [N, L, E]
    (tmp_path / "h.json").write_text(json.dumps(
        {"load_history": [{"logical_expert_load": c.tolist()} for c in counts]}))
    out2 = tmp_path / "h.trace"
    res = runner.invoke(app, ["trace", "convert", str(tmp_path / "h.json"), str(out2),
                              "--from", "vllm-eplb", "--top-k", "4", "--ranks", "2"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(RoutingTrace.load(out2).expert_counts(), counts)

    (tmp_path / "odd.json").write_text(json.dumps(
        {"load_history": [{"logical_expert_load": [[1, 2, 0], [3, 0, 0]]}]}))
    res = runner.invoke(app, ["trace", "convert", str(tmp_path / "odd.json"),
                              str(tmp_path / "o.trace"), "--from", "vllm-eplb", "--top-k", "2"])
    assert res.exit_code == 1 and "multiple of top_k" in res.output


def test_stats_reports_the_shift(tmp_path):
    app = make_app()
    out = tmp_path / "s.trace"
    res = runner.invoke(app, ["trace", "gen", "shift", "--out", str(out), "--steps", "20",
                              "--tokens", "2048", "--layers", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["trace", "stats", str(out)])
    assert res.exit_code == 0, res.output
    assert "Largest change at step 10" in res.output
    assert "steps tagged 'code'" in res.output and "steps tagged 'chinese'" in res.output
