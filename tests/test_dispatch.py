"""Fixed-capacity dispatch (probe.runtime.dispatch): equal to the exact path, no host sync.

The gloo runs reuse test_ep's tiny fp64 model, plans and helpers: logits of the fixed mode must
match the single-process model within test_ep's EP_TOL under static, random (replicas waited
for), late-replica and greedy (PROBE, history) plans; an overflow raises `CapacityOverflow` on
every rank, naming the layer and the capacity needed; and the sync guard counts no host sync
inside any MoE layer of a fixed-mode step, where the exact mode counts several.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import same_plan
from test_engine import _config_file, _subprocess_env
from test_ep import (DTYPE, EP_TOL, NUM_EXPERTS, SLOTS, _cost, _free_port, _init, _max_diff,
                     _rank_model, _reference_logits, batch_of, full_model, random_plan)

from probe.placement import sharded_home
from probe.runtime.__main__ import main as runtime_main
from probe.runtime.balancer import Balancer
from probe.runtime.dispatch import (CapacityOverflow, DispatchOptions, capacity_for,
                                    device_destinations, fixed_experts)
from probe.runtime.dist import DistContext
from probe.runtime.engine import Engine, Request, greedy_generate
from probe.runtime.ep import EPMoELayer, LayerExperts
from probe.runtime.pipeline import EPRunner, PipelineOptions, _expert_fn, _expert_params
from probe.runtime.syncguard import no_host_sync

# C = ceil(3 * T_max * K / G): room for the skew of test_ep's batches (a repeated token)
FIXED = DispatchOptions("fixed", capacity_factor=3.0)


# -- pure pieces ---------------------------------------------------------------------------------
def test_dispatch_options_validation():
    with pytest.raises(ValueError, match="dispatch mode"):
        DispatchOptions("padded")
    with pytest.raises(ValueError, match="capacity_factor"):
        DispatchOptions("fixed", capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity must be"):
        DispatchOptions("fixed", capacity=0)
    assert capacity_for(DispatchOptions("fixed", 1.5), 10, 4, 8) == 8  # ceil(1.5 * 40 / 8)
    assert capacity_for(DispatchOptions("fixed", 100.0), 3, 2, 2) == 6  # at most T * K
    assert capacity_for(DispatchOptions("fixed", 2.0), 0, 2, 2) == 1
    with pytest.raises(TypeError, match="DispatchOptions"):
        EPRunner(_rank_model(0, 1), DistContext(0, 1, None, None, torch.device("cpu")),
                 PipelineOptions(dispatch="fixed"))


def test_device_destinations_equal_the_host_split():
    """The device split is the host split (`EPMoELayer.destinations`, the documented
    contract of split_counts), destinations and fallback count, on random inputs."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_ranks, num_pairs = int(rng.integers(1, 5)), int(rng.integers(0, 40))
        home = sharded_home(NUM_EXPERTS, num_ranks)
        ctx = DistContext(0, num_ranks, None, None, torch.device("cpu"))
        ids = np.flatnonzero(home[0])
        layer = EPMoELayer(ctx, 0, NUM_EXPERTS, LayerExperts(
            ids, {"w": torch.zeros(len(ids), 1)}), lambda p, x: x)
        flat = torch.as_tensor(rng.integers(0, NUM_EXPERTS, num_pairs))
        quota = rng.integers(-1, 5, (NUM_EXPERTS, num_ranks)) if rng.random() < 0.8 else None
        usable = home | (rng.random((num_ranks, NUM_EXPERTS)) < 0.5)
        want, want_fb = layer.destinations(flat, quota, usable)
        got, got_fb = device_destinations(
            flat, None if quota is None else torch.as_tensor(quota), torch.as_tensor(usable),
            torch.as_tensor(layer.owner), NUM_EXPERTS)
        assert torch.equal(got, want)
        assert int(got_fb) == want_fb


def _local_layer(grouped: bool, dtype: torch.dtype = DTYPE):
    """One process holding every expert of test_ep's model, MoE layer 1."""
    block = full_model().moe_blocks[1].to(dtype)
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    experts = LayerExperts(np.arange(NUM_EXPERTS), _expert_params(block))
    return block, EPMoELayer(ctx, 1, NUM_EXPERTS, experts, _expert_fn(block),
                             combine=block.combine, activate=block.activate, grouped=grouped)


@pytest.mark.parametrize(("grouped", "dtype", "tol"), [(False, DTYPE, EP_TOL),
                                                      (True, torch.float32, 1e-5)])
def test_fixed_layer_equals_exact_without_host_sync(grouped, dtype, tol):
    """fp64: every expert one masked pass; fp32 with grouped: the home experts as one
    `torch._grouped_mm` (it has no fp64 on the CPU), padding rows through expert 0."""
    block, layer = _local_layer(grouped, dtype)
    assert layer.grouped is None or layer.grouped.uses_grouped_mm(dtype) == grouped
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, block.cfg.hidden_size, generator=g, dtype=dtype)
    topk_ids, topk_weights = block.select(block.router(x))
    with torch.inference_mode():
        want, _ = layer.forward(x, topk_ids, topk_weights)
        with no_host_sync(count_only=True, cuda=False) as guard:
            got, stats = layer.forward(x, topk_ids, topk_weights, capacity=26)
    assert guard.calls == []
    assert float((got - want).abs().max()) <= tol
    assert int(stats.pairs_processed) == 26 and int(layer.fixed_state(x.device).needed) == 26


def test_fixed_overflow_is_counted_and_drops_only_overflowed_pairs():
    """Capacity 5 for 26 pairs: the device counter holds the 26 rows the call needed; the
    output differs from the exact one (overflowed pairs read zero), which is why the runner
    raises after the step."""
    block, layer = _local_layer(False)
    x = torch.randn(13, block.cfg.hidden_size, generator=torch.Generator().manual_seed(4),
                    dtype=DTYPE)
    topk_ids, topk_weights = block.select(block.router(x))
    want, _ = layer.forward(x, topk_ids, topk_weights)
    got, stats = layer.forward(x, topk_ids, topk_weights, capacity=5)
    assert int(layer.fixed_state(x.device).needed) == 26
    assert int(stats.pairs_processed) == 5
    assert float((got - want).abs().max()) > 1e3 * EP_TOL


def test_fixed_experts_masks_and_counts_unrunnable_rows():
    block, layer = _local_layer(False)
    x = torch.randn(6, block.cfg.hidden_size, generator=torch.Generator().manual_seed(5),
                    dtype=DTYPE)
    row_e = torch.tensor([0, -1, 3, 7, -1, 2])
    home_slot = torch.tensor([0, 1, 2, -1, -1, -1, -1, -1])  # experts 0-2 home
    params = {k: v[:3] for k, v in layer.experts.params.items()}
    y, unrunnable = fixed_experts(
        x, row_e, home_ids=np.arange(3), home_params=params, home_slot=home_slot,
        expert_fn=layer.expert_fn, replica_ids=[7],
        replica_params=lambda e: layer.experts.get(e))
    assert int(unrunnable) == 1  # the row of expert 3: neither home nor replica here
    for r, e in enumerate(row_e.tolist()):
        want = (torch.zeros_like(x[r]) if e in (-1, 3)
                else layer.expert_fn(layer.experts.get(e), x[r:r + 1])[0])
        assert float((y[r] - want).abs().max()) <= EP_TOL, r


# -- gloo runs ----------------------------------------------------------------------------------
def _forward_counted(runner: EPRunner, model, rank: int, step: int):
    """One step; the host syncs the guard intercepts inside each MoE layer (`run_layer`)."""
    ids, lens = batch_of(rank, step)
    per_layer: list[int] = []
    run_layer = runner.run_layer

    def counted(layer, h, guard):
        before = len(guard.calls)
        out = run_layer(layer, h)
        per_layer.append(len(guard.calls) - before)
        return out

    runner.begin_step(num_tokens=len(ids))
    with torch.inference_mode(), no_host_sync(count_only=True, cuda=False) as guard:
        runner.run_layer = lambda layer, h: counted(layer, h, guard)
        try:
            logits = model(ids, seq_lens=lens).logits
        finally:
            del runner.run_layer
    return logits, runner.end_step(), per_layer


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    out: dict = {}
    opened: list[EPRunner] = []
    model = _rank_model(rank, world)

    def runner_of(**kw) -> EPRunner:
        cost = kw.pop("cost", None)
        runner = EPRunner(model, ctx, PipelineOptions(num_slots=SLOTS, **kw), cost=cost)
        opened.append(runner)
        return runner

    rng = np.random.default_rng(123)  # the same plans as test_ep, on every rank
    plans = {(layer, step): random_plan(rng, world) for layer in range(3) for step in range(2)}
    hold_all = {key: [tuple(x) for x in np.argwhere(p.replicas)] for key, p in plans.items()}
    scenarios = {
        "static": dict(balance=False),
        "random": dict(plan_override=lambda layer, step: plans[(layer, step)],
                       wait_for_replicas=True),
        "late": dict(plan_override=lambda layer, step: plans[(layer, step)],
                     hold_back=lambda layer, step: hold_all[(layer, step)]),
        "greedy": dict(method="greedy_ref", default_window_s=1.0, wait_for_replicas=True,
                       cost=_cost(world)),
    }
    for mode in ("exact", "fixed"):
        for name, kw in scenarios.items():
            if mode == "exact" and name not in ("static", "greedy"):
                continue  # the exact path's own tests are test_ep's; here it counts syncs
            runner = runner_of(dispatch=DispatchOptions(mode, FIXED.capacity_factor),
                               record_steps=name in ("static", "greedy"), **kw)
            for step in range(2 if name in ("random", "late") else 3):
                logits, st, syncs = _forward_counted(runner, model, rank, step)
                out[f"{mode}_{name}{step}"] = logits
                out[f"{mode}_{name}_stats{step}"] = st.as_dict()
                out[f"{mode}_{name}_syncs{step}"] = syncs
            out[f"{mode}_{name}_no_sync_layers"] = runner.no_sync_layers
            runner.close()

    # overflow: one row per peer cannot hold the skewed batch: every rank raises, naming it
    runner = runner_of(balance=False, dispatch=DispatchOptions("fixed", capacity=1))
    ids, lens = batch_of(rank, 0)
    runner.begin_step(num_tokens=len(ids))
    with torch.inference_mode():
        model(ids, seq_lens=lens)
    try:
        runner.end_step()
        out["overflow"] = None
    except CapacityOverflow as exc:
        out["overflow"] = str(exc)
    runner.close()

    # plans made at the step's start equal the plans decide makes layer by layer (history)
    balancer = Balancer(ctx, num_experts=NUM_EXPERTS, top_k=2,
                        home=sharded_home(NUM_EXPERTS, world), cost=_cost(world),
                        num_slots=SLOTS, method="greedy_ref")
    skew = np.random.default_rng(10 + rank)
    balancer.history = {k: skew.integers(0, 4, NUM_EXPERTS) * (1 + 20 * (np.arange(
        NUM_EXPERTS) == k)) for k in range(3)}  # one hot expert per layer
    windows = np.array([1.0, 0.5 + rank, 2.0])  # [L], different on every rank
    ahead = balancer.plan_ahead(0, windows, 3)
    out["same_plans"], out["ahead_replicas"] = [], 0
    for k in range(2):
        _, layer_plan = balancer.decide(k, 0, torch.zeros(0, 32, dtype=DTYPE),
                                        np.zeros(NUM_EXPERTS, bool), windows[k + 1],
                                        has_next=True)
        out["same_plans"].append(same_plan(layer_plan.plan, ahead[k + 1].plan))
        out["ahead_replicas"] += ahead[k + 1].num_replicas

    # continuous batching through the engine (which passes each step's token count)
    runner = runner_of(method="greedy_ref", default_window_s=1.0, cost=_cost(world),
                       dispatch=FIXED)
    engine = Engine(model, runner, ctx, max_batch_tokens=12, prefill_chunk=5)
    results = engine.serve(_requests(rank))
    out["generated"] = {rid: r.tokens for rid, r in results.items()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    for runner in opened:
        runner.close()
    dist.barrier()
    ctx.watchdog.stop()
    dist.destroy_process_group()


def _requests(rank: int) -> list[Request]:
    g = torch.Generator().manual_seed(70 + rank)
    return [Request(f"r{rank}-{i}", torch.randint(0, 64, (4 + 2 * i,), generator=g).tolist(),
                    max_new_tokens=3 + i, arrival_step=i + rank) for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fixed_dispatch_matches_single_process_without_host_sync(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    model = full_model()
    for rank, out in enumerate(outs):
        for key in [k for k in out if k.startswith("fixed_") and k[-1].isdigit()
                    and "_stats" not in k and "_syncs" not in k]:
            diff = _max_diff(out[key], _reference_logits(model, rank, int(key[-1])))
            print(f"world {world} rank {rank} {key}: max abs diff {diff:.2e}")
            assert diff <= EP_TOL, f"rank {rank} {key}: max abs diff {diff}"
        # no host sync inside any MoE layer of a fixed step (3 MoE layers per step); the
        # exact path syncs in every layer
        for key in [k for k in out if k.startswith("fixed_") and "_syncs" in k]:
            assert out[key] == [0, 0, 0], (rank, key, out[key])
        assert all(n > 0 for n in out["exact_static_syncs0"]), out["exact_static_syncs0"]
        assert all(n > 0 for n in out["exact_greedy_syncs1"]), out["exact_greedy_syncs1"]
        print(f"world {world} rank {rank} syncs per MoE layer: exact static "
              f"{out['exact_static_syncs0']}, exact greedy {out['exact_greedy_syncs1']}, "
              f"fixed static {out['fixed_static_syncs0']}, "
              f"fixed greedy {out['fixed_greedy_syncs1']}")
        assert out["fixed_static_no_sync_layers"] and out["fixed_greedy_no_sync_layers"]
        assert out["same_plans"] == [True, True] and out["ahead_replicas"] > 0
        msg = out["overflow"]
        assert msg is not None and "MoE layer 0" in msg and "capacity is 1" in msg, msg
        for req in _requests(rank):
            want = greedy_generate(model, req.prompt, req.max_new_tokens)
            assert out["generated"][req.rid] == want, req.rid
    stats = outs[0]
    # the step log's routing counts: the fixed path reads them back once at the step's end
    # and records what the exact path records layer by layer
    for name in ("static", "greedy"):
        for step in range(3):
            got = stats[f"fixed_{name}_stats{step}"]["routing_counts"]
            want = stats[f"exact_{name}_stats{step}"]["routing_counts"]
            assert got is not None and got.shape == (3, world, NUM_EXPERTS)
            assert np.array_equal(got, want) and got.sum() > 0, (name, step)
    # replicas were moved and used under the random plans; late ones all fell back home;
    # greedy planned replicas on the skewed load
    assert sum(sum(stats[f"fixed_random_stats{s}"]["replicas_used"]) for s in range(2)) > 0
    late = stats["fixed_late_stats0"]
    assert sum(late["replicas_arrived"]) == 0 and sum(late["fallback_pairs"]) > 0
    assert sum(sum(stats[f"fixed_greedy_stats{s}"]["replicas_planned"]) for s in range(3)) > 0


# -- CLI ----------------------------------------------------------------------------------------
def _torchrun(tmp_path, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "probe.runtime", "--random-config", _config_file(tmp_path), "--device", "cpu",
           "--requests", "2", "--prompt-len", "10", "--max-new-tokens", "4",
           "--method", "greedy_ref", "--timeout", "30", "--quiet",
           "--out", str(tmp_path / f"{name}.json"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=_subprocess_env())


def test_cli_rejects_a_bad_capacity(capsys):
    with pytest.raises(SystemExit):
        runtime_main(["--random-config", "gpt-oss-like", "--dispatch", "fixed",
                      "--capacity-factor", "0"])
    assert "--capacity-factor / --capacity: capacity_factor must be" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_fixed_dispatch_tokens_and_overflow(tmp_path):
    """Two CPU ranks: --dispatch fixed generates the tokens --dispatch exact does; with one
    row per peer it stops with exit code 3 and names the layer and the capacity needed."""
    runs = {}
    for mode in ("exact", "fixed"):
        proc = _torchrun(tmp_path, mode, "--dispatch", mode, "--capacity-factor", "2")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert runs["fixed"]["ranks"][0]["dispatch"]["mode"] == "fixed"
    assert runs["fixed"]["ranks"][0]["dispatch"]["no_sync_layers"] is True
    for r in range(2):
        assert runs["fixed"]["ranks"][r]["tokens"] == runs["exact"]["ranks"][r]["tokens"]
    proc = _torchrun(tmp_path, "overflow", "--dispatch", "fixed", "--capacity", "1")
    assert proc.returncode != 0
    assert "fixed-capacity dispatch overflowed at MoE layer 0" in proc.stderr, proc.stderr[-2000:]
    assert "the capacity is 1 rows per peer" in proc.stderr
