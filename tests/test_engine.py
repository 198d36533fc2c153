"""Inference engine (single process), CLI commands, torchrun entry on CPU, watchdog."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from probe.runtime.cli import register
from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.dist import WATCHDOG_EXIT_CODE
from probe.runtime.engine import Engine, Request, greedy_generate, random_model


def _cfg() -> MoEConfig:
    return MoEConfig(model_type="qwen3_moe", vocab_size=80, hidden_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8, top_k=2,
                     moe_intermediate_size=16, rope=RopeConfig(theta=10000.0),
                     moe_layers=(0, 1), norm_topk_prob=True)


@pytest.fixture(scope="module")
def model():
    return random_model(_cfg(), seed=3, std=0.15)


def _reqs(**kw) -> list[Request]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(5):
        n = int(torch.randint(2, 14, (1,), generator=g))
        out.append(Request(f"q{i}", torch.randint(0, 80, (n,), generator=g).tolist(),
                           max_new_tokens=3 + i, arrival_step=i, **kw))
    return out


def test_continuous_batching_equals_greedy(model):
    engine = Engine(model, max_batch_tokens=9, prefill_chunk=4)
    results = engine.serve(_reqs())
    for req in _reqs():
        assert results[req.rid].tokens == greedy_generate(model, req.prompt, req.max_new_tokens)
    # requests overlapped: some step ran decode and prefill together
    assert any(r.decode_tokens and r.prefill_tokens for r in engine.records)
    s = engine.summary()
    assert s["requests"] == 5 and s["decode_tokens_per_s"] > 0 and s["ttft_s_mean"] >= 0


def test_sampling_is_seeded_and_batch_independent(model):
    reqs = _reqs(temperature=1.5, top_k=20, seed=5)
    alone = Engine(model).serve([reqs[2]])[reqs[2].rid].tokens
    batched = Engine(model, max_batch_tokens=7, prefill_chunk=3).serve(_reqs(
        temperature=1.5, top_k=20, seed=5))[reqs[2].rid].tokens
    assert alone == batched
    greedy = greedy_generate(model, reqs[2].prompt, reqs[2].max_new_tokens)
    other = [Engine(model).serve([Request("x", reqs[2].prompt, max_new_tokens=8,
                                          temperature=1.5, seed=s)])["x"].tokens
             for s in range(4)]
    assert any(o[:len(greedy)] != greedy for o in other)


def test_request_validation(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        Request("a", [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request("a", [1], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 80\)"):
        Engine(model).submit([Request("a", [80])])


def _config_file(tmp_path) -> str:
    d = {"model_type": "qwen3_moe", "vocab_size": 80, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
         "moe_intermediate_size": 16, "intermediate_size": 32, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-6, "norm_topk_prob": True, "decoder_sparse_step": 1,
         "mlp_only_layers": [], "max_position_embeddings": 256, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_cli_generate_and_serve(tmp_path):
    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app)
    runner = CliRunner()
    cfg = _config_file(tmp_path)
    res = runner.invoke(app, ["generate", "--random-config", cfg, "--ids", "1,2,3",
                              "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "ids: [" in res.output
    res = runner.invoke(app, ["generate", "--random-config", cfg])
    assert res.exit_code != 0 and "--prompt or --ids" in res.output
    out = tmp_path / "serve.json"
    res = runner.invoke(app, ["serve", "--nproc", "1", "--random-config", cfg, "--device", "cpu",
                              "--requests", "2", "--prompt-len", "8", "--max-new-tokens", "3",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert summary["ranks"][0]["generated_tokens"] == 6


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "-m", "probe.runtime", "--random-config", _config_file(tmp_path), "--device", "cpu",
           "--requests", "2", "--prompt-len", "10", "--max-new-tokens", "4",
           "--method", "greedy_ref", "--timeout", "30", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2
    assert [r["generated_tokens"] for r in summary["ranks"]] == [8, 8]


def test_watchdog_ends_a_hung_rank():
    code = ("import time; from probe.runtime.dist import Watchdog\n"
            "w = Watchdog(0.3, rank=5)\n"
            "with w.guard('combine (MoE layer 2)'):\n    time.sleep(20)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == WATCHDOG_EXIT_CODE
    assert "rank 5: collective 'combine (MoE layer 2)' did not finish within 0.3 s" in proc.stderr
