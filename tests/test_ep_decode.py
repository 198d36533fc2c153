"""The expert-parallel decode step (probe.runtime.decode.EPDecodeRunner), eager on the CPU.

The step that `--cuda-graphs` captures at ep > 1 (with NCCL, on GPUs; not run here) runs here
eagerly with gloo: the engine's continuous batching through it generates the single-process
greedy tokens at 2 and 4 ranks and at one rank, a rank without decode rows takes part on
scratch rows, and an overflow of a decode layer raises `CapacityOverflow` after the step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_dispatch import _requests
from test_ep import SLOTS, _cost, _free_port, _init, _rank_model, full_model

from probe.runtime.decode import EPDecodeRunner, StaticKVCache
from probe.runtime.dispatch import CapacityOverflow, DispatchOptions
from probe.runtime.dist import DistContext
from probe.runtime.engine import Engine, Request, greedy_generate
from probe.runtime.pipeline import EPRunner, PipelineOptions

ROOMY = DispatchOptions("fixed", capacity_factor=4.0)


def _serve(model, ctx: DistContext, rank: int, world: int, requests=None,
           **kw) -> tuple[dict, list[int]]:
    # capacity factor G: C = T_max K, room for any skew (the prefill part of a step dispatches
    # only the prefill tokens, a few repeated ones: a smaller factor can overflow at 4 ranks)
    runner = EPRunner(model, ctx, PipelineOptions(num_slots=SLOTS, dispatch=ROOMY,
                                                  default_window_s=1.0, **kw),
                      cost=_cost(world))
    engine = Engine(model, runner, ctx, max_batch_tokens=12, prefill_chunk=5,
                    static_decode=True, max_seq_len=64)
    assert isinstance(engine.decoder, EPDecodeRunner)
    calls: list[int] = []  # this rank's decode rows in each decode step it took part in
    run = engine.decoder.run
    engine.decoder.run = lambda ids, *rest: calls.append(len(ids)) or run(ids, *rest)
    results = engine.serve(_requests(rank) if requests is None else requests)
    runner.close()
    return {rid: r.tokens for rid, r in results.items()}, calls


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    model = _rank_model(rank, world)
    out = {}
    out["static"], out["calls"] = _serve(model, ctx, rank, world, balance=False)
    out["probe"], _ = _serve(model, ctx, rank, world, plan_on="device")
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    ctx.watchdog.stop()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ep_decode_step_generates_the_single_process_tokens(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    model = full_model()
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    # every rank took part in every decode step; some without rows of its own (scratch only)
    assert len({len(out["calls"]) for out in outs}) == 1 and len(outs[0]["calls"]) > 0
    assert any(0 in out["calls"] for out in outs)
    for rank, out in enumerate(outs):
        for req in _requests(rank):
            want = greedy_generate(model, req.prompt, req.max_new_tokens)
            assert out["static"][req.rid] == want, (rank, req.rid)
            assert out["probe"][req.rid] == want, (rank, req.rid)


def test_ep_decode_step_at_one_rank():
    model = full_model()
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    requests = [Request(f"a{i}", torch.randint(0, 64, (3 + i,), generator=g).tolist(),
                        max_new_tokens=4) for i in range(3)]
    tokens, calls = _serve(model, ctx, 0, 1, requests)
    assert 3 in calls  # three rows padded to the bucket of 4
    for req in requests:
        assert tokens[req.rid] == greedy_generate(model, req.prompt, req.max_new_tokens)


def test_ep_decode_overflow_raises_after_the_step():
    model = full_model()
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    runner = EPRunner(model, ctx, PipelineOptions(
        balance=False, dispatch=DispatchOptions("fixed", capacity=1)))
    cache = StaticKVCache(model.cfg, 4, 16, dtype=torch.float64, device=torch.device("cpu"))
    decoder = EPDecodeRunner(model, cache, runner, use_graphs=False)
    slots = [cache.allocate(), cache.allocate()]
    with torch.inference_mode():
        decoder([3, 4], slots, [0, 0])  # 2 rows x K = 2 pairs to one rank > 1 row per peer
    with pytest.raises(CapacityOverflow, match="MoE layer 0 of the decode step"):
        decoder.check()
    with pytest.raises(ValueError, match="group's maxima"):
        decoder.run([3, 4], slots, [0, 0], 1, 0)
    runner.close()
    exact = EPRunner(model, ctx, PipelineOptions(balance=False))
    with pytest.raises(ValueError, match="fixed-capacity dispatch"):
        EPDecodeRunner(model, cache, exact, use_graphs=False)
    with pytest.raises(ValueError, match="fixed-capacity dispatch"):
        Engine(model, exact, ctx, static_decode=True)
    exact.close()


# -- the GPU experiment, run the CPU way ---------------------------------------------------------
def test_ep_graphs_experiment_runs_on_cpu(tmp_path):
    from experiments.runtime.ep_graphs import main

    assert main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "ep_graphs.json").read_text())
    assert record["ranks"] == 1 and record["ok"]
    assert record["check_float32"]["2"]["ep_vs_local"] <= 1e-4
    assert [t["rows"] for t in record["timing"]] == [1, 4]
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "ep_graphs.md").is_file()


@pytest.mark.slow
def test_ep_graphs_experiment_two_gloo_ranks(tmp_path):
    from test_engine import _subprocess_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "experiments.runtime.ep_graphs", "--device", "cpu", "--quick", "--out",
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=_subprocess_env(), cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ep_graphs.json").read_text())
    assert record["ranks"] == 2 and record["backend"] == "gloo" and record["ok"]


@pytest.mark.slow
def test_torchrun_cuda_graphs_flag_runs_the_ep_decode_step(tmp_path):
    """Two CPU ranks: `--dispatch fixed --cuda-graphs` decodes through the EP decode step (eager
    on the CPU) and generates the tokens of the default run."""
    from test_dispatch import _torchrun

    runs = {}
    for name, extra in (("default", ()), ("graphs", ("--dispatch", "fixed", "--cuda-graphs"))):
        proc = _torchrun(tmp_path, name, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["graphs"]["ranks"][0]["cuda_graphs"] is True
    assert runs["default"]["ranks"][0]["cuda_graphs"] is False
    for r in range(2):
        assert runs["graphs"]["ranks"][r]["tokens"] == runs["default"]["ranks"][r]["tokens"]
