"""Inference engine (single process), CLI commands, torchrun entry on CPU, watchdog."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import weakref
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from typer.testing import CliRunner

from probe.runtime.__main__ import _print_table
from probe.runtime.__main__ import main as runtime_main
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


def test_admission_rejects_a_bad_request_alone(model):
    too_long = Request("long", [7] * 4090, max_new_tokens=8)  # 4098 > 4096 positions
    with pytest.raises(ValueError, match=r"request long: prompt \(4090 tokens\) \+ "
                                         r"max_new_tokens \(8\) = 4098 exceeds the model's 4096"):
        Engine(model).submit([too_long])
    good = _reqs()[:2]
    engine = Engine(model, max_batch_tokens=16, prefill_chunk=8)
    results = engine.serve([good[0], Request("oov", [1, 80, 2]), too_long, good[1]],
                           reject_invalid=True)
    assert sorted(results) == sorted(r.rid for r in good)
    for req in good:
        assert results[req.rid].tokens == greedy_generate(model, req.prompt, req.max_new_tokens)
    assert engine.rejected["oov"] == "prompt ids must lie in [0, 80) (got 80)"
    assert "exceeds the model's 4096 positions" in engine.rejected["long"]
    assert {r["rid"] for r in engine.summary()["rejected"]} == {"oov", "long"}


def _subprocess_env() -> dict:
    """The environment of a child python: this checkout first on PYTHONPATH (so that torchrun's
    ranks import this copy of probe), one OpenMP thread."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_subprocesses_import_this_checkout():
    proc = subprocess.run([sys.executable, "-c", "import probe; print(probe.__file__)"],
                          capture_output=True, text=True, timeout=60, env=_subprocess_env())
    root = Path(__file__).resolve().parents[1]
    assert Path(proc.stdout.strip()).resolve().is_relative_to(root), proc.stdout


def _config_file(tmp_path, max_positions: int = 256) -> str:
    d = {"model_type": "qwen3_moe", "vocab_size": 80, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
         "moe_intermediate_size": 16, "intermediate_size": 32, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-6, "norm_topk_prob": True, "decoder_sparse_step": 1,
         "mlp_only_layers": [], "max_position_embeddings": max_positions,
         "tie_word_embeddings": False}
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "probe.runtime", "--random-config", _config_file(tmp_path), "--device", "cpu",
           "--requests", "2", "--prompt-len", "10", "--max-new-tokens", "4",
           "--method", "greedy_ref", "--timeout", "30", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2
    assert [r["generated_tokens"] for r in summary["ranks"]] == [8, 8]


def _prompts_file(tmp_path) -> str:
    """Lines dealt round-robin: rank 0 gets lines 0, 2, 4; rank 1 gets lines 1, 3, 5."""
    lines = [{"ids": [5, 6, 7, 8]}, {"ids": []}, {"ids": [1, 80]}, {"ids": [9, 10, 11]},
             {"ids": list(range(30))}, {"ids": [12, 13]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in lines) + "\nnot json\n")
    return str(path)


@pytest.mark.slow
def test_torchrun_bad_prompts_rejected_alone_and_planner_warm(tmp_path):
    """Bad prompts on both ranks are rejected with their reason, the others are served; the
    "greedy" planner (Numba) is warmed up at start-up, so no measured step pays its load."""
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "probe.runtime", "--random-config", _config_file(tmp_path, 32),
           "--device", "cpu", "--prompts", _prompts_file(tmp_path), "--max-new-tokens", "4",
           "--method", "greedy", "--timeout", "30", "--progress-every", "2", "--out", str(out),
           "--metrics-file", str(tmp_path / "metrics.prom")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    reasons = {r["rid"]: r["reason"] for r in summary["rejected"]}
    assert reasons == {
        "r1": "prompt is empty", "r2": "prompt ids must lie in [0, 80) (got 80)",
        "r4": "prompt (30 tokens) + max_new_tokens (4) = 34 exceeds the model's 32 positions "
              "(max_position_embeddings)",
        "r6": "line 7 is not valid JSON (Expecting value)"}
    assert sorted(summary["ranks"][0]["tokens"]) == ["r0"]
    assert sorted(summary["ranks"][1]["tokens"]) == ["r3", "r5"]
    assert "request r1 rejected: prompt is empty" in proc.stderr
    assert "probe.runtime: step 2:" in proc.stderr and "tok/s" in proc.stderr
    # Planner time per step (the first step that plans included) stays far below the ~1.5 s
    # of loading the Numba cache, which the start-up warm-up paid.
    ranks = summary["ranks"]
    assert all(r["planner_warmup_s"] > 0 for r in ranks)
    per_step = ranks[0]["plan_s_per_step"]
    assert summary["replicas_planned"] >= 0 and len(per_step) == ranks[0]["steps"]
    assert max(per_step) < 0.25, per_step
    assert summary["plan_s_total"] == pytest.approx(sum(per_step))
    assert summary["replicas_late"] == summary["replicas_planned"] - summary["replicas_arrived"]
    assert "replicas planned / in time / late" in proc.stdout
    # Balancing metrics per layer and step: in the summary, the progress lines, Prometheus.
    metrics = summary["metrics"]
    assert len(metrics["steps"]) == ranks[0]["steps"]
    totals = metrics["totals"]
    assert totals["replicas_planned"] == summary["replicas_planned"]
    assert totals["replicas_late"] == totals["replicas_planned"] - totals["replicas_arrived"]
    assert totals["replicas_used"] <= totals["replicas_arrived"]
    assert totals["plan_s"] == pytest.approx(summary["plan_s_total"])
    assert len(metrics["layers"]["replicas_used"]) == metrics["num_layers"] == 2
    assert summary["group_tokens_per_s"] > 0
    assert "planned/arrived/used" in proc.stderr and "predictor" in proc.stderr
    prom = (tmp_path / "metrics.prom").read_text()
    assert f"probe_steps_total {float(ranks[0]['steps'])}" in prom


def test_planner_warmed_up_before_the_first_step(model, monkeypatch):
    """EPRunner plans a synthetic problem of the real shapes at construction, before any
    measured step, with the same method as the steps."""
    import probe.runtime.pipeline as pipeline
    from probe.runtime.dist import DistContext

    calls = []
    real = pipeline.solve_plan

    def spy(problem, method="greedy"):
        calls.append((method, problem.load.shape, problem.load.dtype, problem.window.dtype))
        return real(problem, method)

    monkeypatch.setattr(pipeline, "solve_plan", spy)
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    runner = pipeline.EPRunner(model, ctx, pipeline.PipelineOptions(method="greedy"))
    try:
        assert calls == [("greedy", (1, 8), np.dtype(np.int64), np.dtype(np.float64))]
        assert runner.planner_warmup_s > 0
        Engine(model, runner, max_batch_tokens=8).serve(_reqs()[:1])
        assert len(calls) > 1 and all(c == calls[0] for c in calls)  # same shapes, dtypes
    finally:
        runner.close()
    static = pipeline.EPRunner(model, ctx, pipeline.PipelineOptions(balance=False))
    static.close()
    assert static.planner_warmup_s == 0.0  # nothing to plan without balancing


def test_runtime_progress_table_and_device_errors(tmp_path, capsys):
    cfg = _config_file(tmp_path)
    args = ["--random-config", cfg, "--device", "cpu", "--requests", "2", "--prompt-len", "6",
            "--max-new-tokens", "3", "--out", str(tmp_path / "one.json")]
    assert runtime_main([*args, "--progress-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "probe.runtime: step 2: " in err and "tok/s (rank 0)" in err
    summary = json.loads((tmp_path / "one.json").read_text())
    metrics = summary["metrics"]  # per layer and step (one process: static, no replicas)
    assert len(metrics["steps"]) == summary["ranks"][0]["steps"]
    assert metrics["num_layers"] == 2 and len(metrics["layers"]["ir_mean"]) == 2
    assert metrics["totals"]["tokens_per_s"] > 0 and metrics["totals"]["replicas_planned"] == 0
    assert runtime_main([*args, "--quiet", "--metrics-file", str(tmp_path / "m.prom")]) == 0
    assert "probe.runtime: step" not in capsys.readouterr().err
    prom = (tmp_path / "m.prom").read_text()
    assert "# TYPE probe_tokens_total counter" in prom
    assert 'probe_layer_imbalance_ratio{layer="1"}' in prom
    if not torch.cuda.is_available():
        assert runtime_main(["--random-config", cfg, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--device cuda: this torch build" in err[0], err
        assert "no CUDA support" in err[0] or "no GPU is visible" in err[0]
        app = typer.Typer()
        app.command("noop")(lambda: None)
        register(app)
        for cmd in (["serve", "--nproc", "2", "--random-config", cfg, "--device", "cuda"],
                    ["generate", "--random-config", cfg, "--ids", "1", "--device", "cuda"]):
            res = CliRunner().invoke(app, cmd)
            assert res.exit_code == 2 and "has no CUDA support" in res.output, res.output


def test_runtime_table_fits_80_columns():
    rank = {"rank": 0, "requests": 64, "ttft_s_mean": 0.123456, "prefill_tokens_per_s": 123456.7,
            "decode_tokens_per_s": 98765.4, "bytes_prefetched": 1.234e9, "mean_ir": 1.2345,
            "exposed_transfer_s": 0.0123}
    out = {"model": "/a/long/path/to/some/checkpoint/directory/that/keeps/going/Qwen3-30B-A3B",
           "world_size": 8, "device": "cuda:0", "dtype": "torch.bfloat16",
           "ranks": [{**rank, "rank": g} for g in range(8)], "replicas_planned": 12345,
           "replicas_arrived": 12000, "replicas_late": 345, "bytes_prefetched_total": 9.87e9,
           "plan_s_total": 1.5, "planner_warmup_s": 1.4,
           "rejected": [{"rid": "r3", "reason": "prompt is empty"}]}
    buf = StringIO()
    from rich.console import Console

    _print_table(out, Console(file=buf, width=80, force_terminal=False))
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    for word in ("TTFT s", "prefill tok/s", "decode tok/s", "MB in", "123456.7",
                 "replicas planned / in time / late", "12345 / 12000 / 345", "9870.00",
                 "planner warm-up s", "rejected r3: prompt is empty"):
        assert word in text, word


def test_watchdog_ends_a_hung_rank():
    code = ("import time; from probe.runtime.dist import Watchdog\n"
            "w = Watchdog(0.3, rank=5)\n"
            "with w.guard('combine (MoE layer 2)'):\n    time.sleep(20)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == WATCHDOG_EXIT_CODE
    assert "rank 5: collective 'combine (MoE layer 2)' did not finish within 0.3 s" in proc.stderr


def _shutdown_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from probe.placement import sharded_home
    from probe.runtime.dist import init_distributed, shutdown
    from probe.runtime.pipeline import EPRunner, PipelineOptions

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed(backend="gloo", timeout_s=30.0)
    ids = [int(e) for e in sharded_home(8, world)[rank].nonzero()[0]]
    model = random_model(_cfg(), seed=3, std=0.15, expert_ids=ids)
    runner = EPRunner(model, ctx, PipelineOptions(method="greedy_ref", num_slots=2))
    engine = Engine(model, runner, ctx, max_batch_tokens=8, prefill_chunk=4)
    engine.serve(_reqs()[rank::world])
    transfer_group = weakref.ref(ctx.transfer_group)
    alive = weakref.ref(runner)
    del engine
    runner.close()
    del runner
    shutdown(ctx)
    shutdown(ctx)  # a second call does nothing
    result = {"transfer_group_freed": transfer_group() is None,
              "forgotten": ctx.group is None and ctx.transfer_group is None,
              "initialized": dist.is_initialized(), "runner_freed": alive() is None,
              "threads": [t.name for t in threading.enumerate()],
              "unwrapped": all(type(layer.moe).__name__ == "MoEBlock"
                               for layer in model.layers if layer.is_moe)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_shutdown_frees_process_groups_before_exit(tmp_path):
    """`EPRunner.close` + `shutdown` free the runner and the transfer group, destroy both
    groups and leave only the main thread on every rank: none of it is torn down at
    interpreter exit (where it could abort a rank that had finished its work). The default
    group's Python object may still be referenced inside torch; it was shut down by
    `destroy_process_group`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shutdown_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["transfer_group_freed"] and result["forgotten"], result
        assert not result["initialized"], result
        assert result["runner_freed"] and result["unwrapped"], result
        assert result["threads"] == ["MainThread"], result
