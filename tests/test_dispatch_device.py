"""Planning on the device (probe.runtime.device_plan, `plan_on="device"`).

The CPU path runs the same code as the CUDA path on CPU tensors (the planner's and the
split's CPU kernels on zero-copy views), so these gloo runs exercise it: its plans equal the
host planner's on the same gathered loads and windows; its split equals `assign_tokens`; and
the logits with it equal the single-process model's at 2 and 4 ranks under greedy (history and
router-prior predictors), random (replicas waited for) and late-replica plans, in both dispatch
paths, with no host sync inside any MoE layer of a fixed-capacity step; with method "lite" the
device path plans with the lite planner (its CPU kernel here, `CudaLite` on a GPU). The
dispatch splits with the plan's own split (the default; its quota equals the host plan's row)
or with the water-filling on the true counts (`device_split="waterfill"`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import same_plan
from test_dispatch import FIXED, _forward_counted
from test_ep import (DTYPE, EP_TOL, NUM_EXPERTS, SLOTS, _cost, _free_port, _init, _max_diff,
                     _rank_model, _reference_logits, full_model, random_plan)

from probe.placement import sharded_home
from probe.planner.assign import assign_tokens
from probe.planner.problem import BalanceProblem
from probe.runtime.balancer import Balancer, solve_plan
from probe.runtime.device_plan import (DEVICE_PLANNERS, DISPATCH_MOVES, DeviceLite,
                                       DeviceSplit, device_planner, host_view, plan_quota,
                                       plan_rows, rows_to_plan)
from probe.runtime.dispatch import DispatchOptions
from probe.runtime.pipeline import EPRunner, PipelineOptions


# -- pure pieces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["greedy", "lite"])
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_device_planner_on_cpu_tensors_plans_what_the_host_planner_plans(num_ranks, method):
    num_experts, slots = 16, 2
    home = sharded_home(num_experts, num_ranks)
    cost = _cost(num_ranks)
    planner = device_planner(method, home, slots, cost, torch.device("cpu"))
    assert type(planner) is DEVICE_PLANNERS[method]
    graphed = device_planner(method, home, slots, cost, torch.device("cpu"), graph=True)
    graphed.capture()  # nothing to capture on the CPU: the CPU twin plans
    rng = np.random.default_rng(num_ranks)
    replicas_seen = 0
    for _ in range(20):
        load = rng.integers(0, 30, (num_ranks, num_experts)) * (
            1 + 40 * (np.arange(num_experts) == rng.integers(num_experts)))  # [S, E], one hot
        window = rng.uniform(0.0, 2e-4, num_ranks)  # [G]
        rows = planner.plan(torch.as_tensor(load), torch.as_tensor(window))
        assert rows.shape == (planner.num_rows, 3) and rows.dtype == torch.int64
        assert torch.equal(graphed.plan(torch.as_tensor(load), torch.as_tensor(window)), rows)
        replicas, sources = rows_to_plan(rows.numpy(), num_ranks, num_experts)
        want = solve_plan(BalanceProblem.from_load(load, cost, slots, window, home), method)
        assert np.array_equal(replicas, want.replicas)
        assert np.array_equal(sources, want.sources)
        assert (rows.numpy()[int(replicas.sum()):] == -1).all()  # padding rows
        replicas_seen += int(replicas.sum())
    assert replicas_seen > 0


@pytest.mark.parametrize("method", ["greedy", "lite"])
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_device_planner_split_is_the_host_plans_assignment_row(num_ranks, method):
    """With split_rank, each plan also gives that rank's row of the plan's token split: the
    host planner's Plan.assignment[rank], one layer at a time and in the L-layer call."""
    num_experts, slots = 16, 2
    home = sharded_home(num_experts, num_ranks)
    cost = _cost(num_ranks)
    rng = np.random.default_rng(30 + num_ranks)
    loads = [rng.integers(0, 30, (num_ranks, num_experts)) * (
        1 + 40 * (np.arange(num_experts) == rng.integers(num_experts))) for _ in range(6)]
    windows = [rng.uniform(0.0, 2e-4, num_ranks) for _ in loads]
    wants = [solve_plan(BalanceProblem.from_load(x, cost, slots, w, home), method)
             for x, w in zip(loads, windows, strict=True)]
    assert sum(int(p.replicas.sum()) for p in wants) > 0
    for rank in range(num_ranks):
        planner = device_planner(method, home, slots, cost, torch.device("cpu"),
                                 split_rank=rank)
        plain = device_planner(method, home, slots, cost, torch.device("cpu"))
        assert plain.plan_split(torch.as_tensor(loads[0]), torch.as_tensor(windows[0]))[1] is None
        for load, window, want in zip(loads, windows, wants, strict=True):
            rows, quota = planner.plan_split(torch.as_tensor(load), torch.as_tensor(window))
            assert torch.equal(rows, plain.plan(torch.as_tensor(load), torch.as_tensor(window)))
            assert quota.dtype == torch.int64 and quota.shape == (num_experts, num_ranks)
            assert np.array_equal(quota.numpy(), want.assignment[rank])
        rows, quotas = planner.plan_layers_split(torch.as_tensor(np.stack(loads)),
                                                 torch.as_tensor(np.stack(windows)))
        assert rows.shape == (len(loads), planner.num_rows, 3)
        assert np.array_equal(quotas.numpy(), np.stack([w.assignment[rank] for w in wants]))


def test_plan_quota_and_split_rank_are_checked():
    load = torch.tensor([[[3, 0, 5], [1, 2, 0]]])  # [L=1, S=2, E=3]
    owner = torch.tensor([0, 1, 1])
    blk_expert = torch.tensor([[2, -1]])  # expert 2 moved; the second block is padding
    blk_assign = torch.zeros((1, 2, 2, 2), dtype=torch.int64)
    blk_assign[0, 0] = torch.tensor([[2, 3], [0, 0]])  # rank 0's 5 pairs: 2 on 0, 3 on 1
    quota = plan_quota(load, owner, blk_expert, blk_assign, 0)[0]
    assert quota.tolist() == [[3, 0], [0, 0], [2, 3]]
    assert plan_quota(load, owner, blk_expert, blk_assign, 1)[0].tolist() == [[1, 0], [0, 2],
                                                                              [0, 0]]
    home = sharded_home(8, 2)
    with pytest.raises(ValueError, match="split_rank must be a rank"):
        device_planner("greedy", home, 1, _cost(2), torch.device("cpu"), split_rank=2)
    both = home.copy()
    both[:, 3] = True
    with pytest.raises(ValueError, match="one home per expert; expert 3 has 2"):
        device_planner("lite", both, 1, _cost(2), torch.device("cpu"), split_rank=0)


def test_device_split_on_cpu_tensors_is_assign_tokens():
    num_ranks, num_experts = 4, 8
    home = sharded_home(num_experts, num_ranks).astype(np.int64)
    rng = np.random.default_rng(5)
    for _ in range(10):
        counts = rng.integers(0, 20, (num_ranks, num_experts))
        copies = home + (rng.random((num_ranks, num_experts)) < 0.3) * (1 - home)
        want = assign_tokens(counts, copies, _cost(num_ranks), moves=DISPATCH_MOVES)
        for rank in range(num_ranks):
            split = DeviceSplit(_cost(num_ranks), num_experts, rank, torch.device("cpu"))
            got = split.quota(torch.as_tensor(counts), torch.as_tensor(copies))
            assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want[rank])


def test_rows_and_views():
    replicas = np.array([[False, True, False], [True, False, True]])
    sources = np.where(replicas, np.array([[0, 0, 0], [0, 0, 0]]) + [[1], [0]], -1)
    rows = plan_rows(replicas, sources, 4)
    assert rows.tolist() == [[0, 1, 1], [1, 0, 0], [1, 2, 0], [-1, -1, -1]]
    back = rows_to_plan(rows, 2, 3)
    assert np.array_equal(back[0], replicas) and np.array_equal(back[1], sources)
    with pytest.raises(ValueError, match="more than the 2 rows"):
        plan_rows(replicas, sources, 2)
    t = torch.arange(6)
    view = host_view(t)
    view[0] = 7  # a view, not a copy
    assert int(t[0]) == 7
    with pytest.raises(ValueError, match="host_view takes CPU tensors"):
        host_view(torch.zeros(2, device="meta"))


def test_plan_on_is_validated():
    from probe.runtime.dist import DistContext

    model = full_model()
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="plan_on must be one of"):
        EPRunner(model, ctx, PipelineOptions(plan_on="gpu"))
    with pytest.raises(ValueError, match="plan_on='device' plans the 'probe' policy"):
        EPRunner(model, ctx, PipelineOptions(plan_on="device", policy="eplb",
                                             resident_slots=1))
    with pytest.raises(ValueError, match="plan_on='device' plans with method"):
        EPRunner(model, ctx, PipelineOptions(plan_on="device", method="cpsat"))
    with pytest.raises(ValueError, match="device_split must be one of"):
        EPRunner(model, ctx, PipelineOptions(plan_on="device", device_split="lp"))


def test_device_lite_rejects_a_negative_count_by_name():
    home = sharded_home(8, 2)
    planner = DeviceLite(home, 1, _cost(2), torch.device("cpu"))
    load = torch.ones(2, 8, dtype=torch.int64)
    load[1, 3] = -1
    with pytest.raises(ValueError, match="negative token count"):
        planner.plan(load, torch.full((2,), 1e-4, dtype=torch.float64))


# -- gloo runs ----------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from probe.predictor import router_prior

    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    out: dict = {}
    model = _rank_model(rank, world)
    prior = router_prior(model)  # before a runner wraps the MoE blocks
    rng = np.random.default_rng(123)  # the same plans on every rank
    plans = {(layer, step): random_plan(rng, world) for layer in range(3) for step in range(2)}
    hold_all = {key: [tuple(x) for x in np.argwhere(p.replicas)] for key, p in plans.items()}
    greedy = dict(default_window_s=1.0, wait_for_replicas=True)
    scenarios = {
        "history": dict(greedy),
        "prior": dict(greedy, predictor=prior),
        "random": dict(plan_override=lambda layer, step: plans.get((layer, step)),
                       wait_for_replicas=True),
        "late": dict(plan_override=lambda layer, step: plans.get((layer, step)),
                     hold_back=lambda layer, step: hold_all.get((layer, step), [])),
        "lite": dict(greedy, method="lite"),  # the lite planner's device path
        # the water-filling on the true counts at dispatch (the default is the plan's own
        # split), planned and forced plans
        "wf": dict(greedy, device_split="waterfill"),
        "randomwf": dict(plan_override=lambda layer, step: plans.get((layer, step)),
                         wait_for_replicas=True, device_split="waterfill"),
    }
    for mode in ("exact", "fixed"):
        for name, kw in scenarios.items():
            if mode == "exact" and name in ("random", "late", "lite", "randomwf"):
                continue  # one pass of the exact path per predictor is enough here
            runner = EPRunner(model, ctx, PipelineOptions(
                num_slots=SLOTS, plan_on="device", record_steps=True,
                dispatch=DispatchOptions(mode, FIXED.capacity_factor), **kw), cost=_cost(world))
            for step in range(2 if name in ("random", "late", "randomwf") else 3):
                logits, st, syncs = _forward_counted(runner, model, rank, step)
                out[f"{mode}_{name}{step}"] = logits
                out[f"{mode}_{name}_stats{step}"] = st.as_dict()
                out[f"{mode}_{name}_syncs{step}"] = syncs
            out[f"{mode}_{name}_no_sync_layers"] = runner.no_sync_layers
            if name == "history":
                # the next step's plans were launched at the last MoE layer, from this step's
                # counts: the plans (rows and quotas) begin_step would make with the history
                early = runner._next_ahead_dev
                again = runner.balancer.plan_ahead_device(runner.step, runner._windows_dev)
                out[f"{mode}_early_same"] = sorted(early) == sorted(again) == [1, 2] and all(
                    all(np.array_equal(a, b) for a, b in zip(
                        early[k].resolve(), again[k].resolve(), strict=True))
                    and torch.equal(early[k].quota, again[k].quota) for k in early)
            runner.close()

    # the device path's plans equal the host planner's on the same loads and windows, for
    # either planner method
    windows = np.array([1.0, 0.5 + rank, 2.0]) * 1e-5  # [L], different on every rank
    all_windows = torch.as_tensor(np.stack([np.array([1.0, 0.5 + g, 2.0]) * 1e-5
                                            for g in range(world)]).T.copy())  # [L, G]
    out["same_plans"], out["device_replicas"], out["same_quota"] = [], {}, []
    for method in ("greedy", "lite"):
        balancer = Balancer(ctx, num_experts=NUM_EXPERTS, top_k=2,
                            home=sharded_home(NUM_EXPERTS, world), cost=_cost(world),
                            num_slots=SLOTS, method=method)
        balancer.enable_device_plans(torch.device("cpu"))  # the plan's split: the default
        skew = np.random.default_rng(10 + rank)
        balancer.history = {k: skew.integers(0, 4, NUM_EXPERTS) * (1 + 20 * (np.arange(
            NUM_EXPERTS) == k)) for k in range(3)}  # one hot expert per layer
        balancer.history_dev = {k: torch.as_tensor(v) for k, v in balancer.history.items()}
        out["device_replicas"][method] = 0
        for k in range(2):
            _, layer_plan = balancer.decide(k, 0, torch.zeros(0, 32, dtype=DTYPE),
                                            np.zeros(NUM_EXPERTS, bool), windows[k + 1],
                                            has_next=True)
            pending = balancer.plan_device(k + 1, 0, torch.zeros(0, 32, dtype=DTYPE),
                                           all_windows[k + 1])
            replicas, sources = pending.resolve()
            out["same_plans"].append(same_plan(layer_plan.plan, type(layer_plan.plan)(
                replicas, sources, layer_plan.plan.assignment)))
            # the split's quota is the host plan's row of this rank
            out["same_quota"].append(np.array_equal(pending.quota.numpy(),
                                                    layer_plan.quota(rank)))
            out["device_replicas"][method] += pending.num_replicas
        # the step's plans in one launch (history predictor) equal the layer-by-layer ones
        ahead = balancer.plan_ahead_device(0, all_windows)
        out.setdefault("ahead_layers", []).append(sorted(ahead))
        for layer, pending in ahead.items():
            one = balancer.plan_device(layer, 0, torch.zeros(0, 32, dtype=DTYPE),
                                       all_windows[layer])
            out.setdefault("ahead_same", []).append(all(
                np.array_equal(a, b) for a, b in zip(pending.resolve(), one.resolve(),
                                                      strict=True)))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    ctx.watchdog.stop()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_device_plans_match_single_process_without_host_sync(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    model = full_model()
    for rank, out in enumerate(outs):
        logit_keys = [k for k in out if k[-1].isdigit() and "_stats" not in k
                      and "_syncs" not in k]
        assert len(logit_keys) == 3 + 3 + 2 + 2 + 3 + 3 + 3 + 3 + 3 + 2
        for key in logit_keys:
            diff = _max_diff(out[key], _reference_logits(model, rank, int(key[-1])))
            assert diff <= EP_TOL, f"rank {rank} {key}: max abs diff {diff}"
        # no host sync inside any MoE layer of a fixed step (3 MoE layers), either predictor
        for key in [k for k in out if k.startswith("fixed_") and "_syncs" in k]:
            assert out[key] == [0, 0, 0], (rank, key, out[key])
        print(f"world {world} rank {rank} syncs per MoE layer, device plans: exact history "
              f"{out['exact_history_syncs1']}, fixed history {out['fixed_history_syncs1']}, "
              f"fixed prior {out['fixed_prior_syncs1']}")
        assert all(out[f"fixed_{n}_no_sync_layers"]
                   for n in ("history", "prior", "random", "lite", "wf", "randomwf"))
        assert not out["exact_history_no_sync_layers"]
        assert out["same_plans"] == [True] * 4, out["same_plans"]
        assert out["same_quota"] == [True] * 4, out["same_quota"]
        assert min(out["device_replicas"].values()) > 0, out["device_replicas"]
        assert out["ahead_layers"] == [[1, 2], [1, 2]] and out["ahead_same"] == [True] * 4
        assert out["exact_early_same"] and out["fixed_early_same"]
    stats = outs[0]
    for mode in ("exact", "fixed"):
        for name in ("history", "prior"):
            planned = sum(sum(stats[f"{mode}_{name}_stats{s}"]["replicas_planned"])
                          for s in range(3))
            used = sum(sum(stats[f"{mode}_{name}_stats{s}"]["replicas_used"]) for s in range(3))
            assert planned > 0 and used > 0, (mode, name, planned, used)
            # every replica waited for: nothing falls back
            assert sum(sum(stats[f"{mode}_{name}_stats{s}"]["fallback_pairs"])
                       for s in range(3)) == 0
        # the step log records the true counts, read back once at the step's end
        got = stats[f"{mode}_history_stats0"]["routing_counts"]
        assert got is not None and got.shape == (3, world, NUM_EXPERTS) and got.sum() > 0
    assert sum(sum(stats[f"fixed_random_stats{s}"]["replicas_used"]) for s in range(2)) > 0
    # the lite planner's device path plans replicas that are used, and nothing falls back
    lite = [stats[f"fixed_lite_stats{s}"] for s in range(3)]
    assert sum(sum(st["replicas_planned"]) for st in lite) > 0
    assert sum(sum(st["replicas_used"]) for st in lite) > 0
    assert sum(sum(st["fallback_pairs"]) for st in lite) == 0
    # the water-filling split: the planned replicas run pairs, and with every replica waited
    # for nothing falls back (the exact and the fixed dispatch alike)
    for key, steps in (("exact_wf", 3), ("fixed_wf", 3), ("fixed_randomwf", 2)):
        got = [stats[f"{key}_stats{s}"] for s in range(steps)]
        assert sum(sum(st["replicas_used"]) for st in got) > 0, key
        assert sum(sum(st["fallback_pairs"]) for st in got) == 0, key
    late = stats["fixed_late_stats0"]
    assert sum(late["replicas_arrived"]) == 0 and sum(late["replicas_planned"]) > 0


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_rejects_plan_on_device_for_host_policies(capsys):
    from probe.runtime.__main__ import main as runtime_main

    with pytest.raises(SystemExit):
        runtime_main(["--random-config", "gpt-oss-like", "--plan-on", "device",
                      "--policy", "eplb"])
    assert "--plan-on device plans --policy probe's replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runtime_main(["--random-config", "gpt-oss-like", "--plan-on", "device",
                      "--method", "cpsat"])
    assert "--plan-on device plans with --method greedy" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_plan_on_device_generates_the_same_tokens(tmp_path):
    """Two CPU ranks: --dispatch fixed --plan-on device with the router-prior predictor
    generates the tokens of --dispatch exact with the host planner, with no host sync per MoE
    layer (the run's dispatch record says so)."""
    import json

    from test_dispatch import _torchrun

    runs = {}
    for name, extra in (("host", ("--dispatch", "exact")),
                        ("device", ("--dispatch", "fixed", "--plan-on", "device",
                                    "--predictor", "router"))):
        proc = _torchrun(tmp_path, name, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    record = runs["device"]["ranks"][0]["dispatch"]
    assert record["plan_on"] == "device" and record["no_sync_layers"] is True, record
    assert runs["host"]["ranks"][0]["dispatch"]["plan_on"] == "host"
    for r in range(2):
        assert runs["device"]["ranks"][r]["tokens"] == runs["host"]["ranks"][r]["tokens"]
