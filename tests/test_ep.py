"""Expert-parallel runtime on CPU with gloo: logits and tokens equal the single-process model.

One spawn per world size runs every scenario in the ranks and saves what they computed; the
test process recomputes the references with the full single-process model and compares.

The test model is fp64, and EP logits must match within EP_TOL = 1e-10. An expert GEMM sees
a different number of rows under EP than in the single-process model, and BLAS picks its kernel
by row count, so the two differ by a few ULPs (fp32: up to ~1e-6 on some CPUs, which made an
fp32 bound machine-dependent); in fp64 those ULPs are ~1e-15, far below the bound, while any
logic error (a lost token, a wrong gate weight, a wrong expert) moves logits by ~1e-2. Two
deliberately broken runs check that the same comparison catches such errors.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from probe.placement import sharded_home
from probe.planner import CostModel, Plan
from probe.predictor import router_prior
from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.dist import DistContext, RankFailure, Watchdog
from probe.runtime.engine import Engine, Request, greedy_generate, random_model, slice_experts
from probe.runtime.ep import split_counts
from probe.runtime.pipeline import EPRunner, PipelineOptions
from probe.runtime.transfer import IssueGate, SlotPool, SplitPhaseTransfer

SEED = 7
NUM_EXPERTS = 8
SLOTS = 2
DTYPE = torch.float64
EP_TOL = 1e-10  # max abs logit difference, EP vs the single-process model (fp64)


def tiny_config() -> MoEConfig:
    return MoEConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, num_experts=NUM_EXPERTS, top_k=2,
                     moe_intermediate_size=16, rope=RopeConfig(theta=10000.0),
                     moe_layers=(0, 1, 2), norm_topk_prob=True, qk_norm="head")


def full_model():
    return random_model(tiny_config(), seed=SEED, std=0.15, dtype=DTYPE)


def batch_of(rank: int, step: int) -> tuple[torch.Tensor, list[int]]:
    """This rank's tokens: a few sequences, skewed (repeats) so that balancing has work."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    lens = [5 + rank, 3, 7]
    ids = torch.randint(0, 64, (sum(lens),), generator=g)
    ids[: lens[0]] = 3 + step  # a repeated token: extreme skew on a few experts
    return ids, lens


def random_plan(rng: np.random.Generator, num_ranks: int, load_scale: int = 6) -> Plan:
    """A feasible-looking random plan (replicas within slots, sources = home, any counts)."""
    home = sharded_home(NUM_EXPERTS, num_ranks)
    owner = np.argmax(home, axis=0)
    replicas = np.zeros((num_ranks, NUM_EXPERTS), dtype=bool)
    for g in range(num_ranks):
        cand = np.flatnonzero(~home[g])
        pick = rng.choice(cand, size=min(SLOTS, cand.size), replace=False)
        replicas[g, pick] = rng.random(pick.size) < 0.8
    sources = np.where(replicas, owner[None, :], -1)
    holds = home | replicas
    assignment = rng.integers(0, load_scale, size=(num_ranks, NUM_EXPERTS, num_ranks))
    assignment = assignment * holds.T[None, :, :]
    return Plan(replicas, sources, assignment)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, timeout_s: float = 30.0) -> DistContext:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    tgroup = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, dist.group.WORLD, tgroup, torch.device("cpu"),
                       Watchdog(timeout_s * 2, rank))


def _rank_model(rank: int, world: int):
    ids = np.flatnonzero(sharded_home(NUM_EXPERTS, world)[rank]).tolist()
    return slice_experts(full_model(), ids)


def _forward(runner: EPRunner, model, rank: int, step: int):
    ids, lens = batch_of(rank, step)
    runner.begin_step()
    with torch.inference_mode():
        logits = model(ids, seq_lens=lens).logits
    return logits, runner.end_step()


def _cost(world: int) -> CostModel:
    # Token-count balancing (no fixed per-expert cost) so that greedy acts on tiny batches.
    return CostModel.uniform(world, alpha=0.0, beta=1e-6, token_time=0.0, transfer_time=1e-6)


def _open(opened: list, *args, **kwargs) -> EPRunner:
    runner = EPRunner(*args, **kwargs)
    opened.append(runner)
    return runner


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    out: dict = {}
    opened: list[EPRunner] = []  # closed at the end: their last transfers may still run
    model = _rank_model(rank, world)
    prior = router_prior(model)  # the frozen router prior, read before a runner wraps the model

    # 1. static (balancing off)
    runner = _open(opened, model, ctx, PipelineOptions(balance=False, num_slots=SLOTS))
    out["static"] = _forward(runner, model, rank, 0)[0]

    # 2. random feasible plans, replicas delivered by split-phase transfer; the runner waits
    #    for them, so they are used whatever the machine's load
    step_waits = True
    rng = np.random.default_rng(123)  # same on every rank -> same plans
    plans = {(layer, step): random_plan(rng, world) for layer in range(3) for step in range(2)}
    runner = _open(opened, model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans[(layer, step)],
        wait_for_replicas=step_waits))
    stats = []
    for step in range(2):
        logits, st = _forward(runner, model, rank, step)
        out[f"random{step}"] = logits
        stats.append(st)
    out["random_stats"] = [s.as_dict() for s in stats]

    # 3. the same plans, but every replica late: all its tokens fall back home
    runner = _open(opened, model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans[(layer, step)],
        hold_back=lambda layer, step: [tuple(x) for x in np.argwhere(
            plans[(layer, step)].replicas)]))
    logits, st = _forward(runner, model, rank, 0)
    out["late0"] = logits
    out["late_stats"] = st.as_dict()

    # 3a. the same, checked for waiting: the held-back pieces are posted only when the step
    #     ends, so a forward that waited for a late replica anywhere (at dispatch or at the end
    #     of a layer) could not return; it returns with those pieces still unposted
    runner = _open(opened, model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans[(layer, step)],
        hold_back=lambda layer, step: [tuple(x) for x in np.argwhere(
            plans[(layer, step)].replicas)]))
    ids, lens = batch_of(rank, 1)
    runner.begin_step()
    with torch.inference_mode():
        out["late_nowait1"] = model(ids, seq_lens=lens).logits
    held = runner.executor._held
    out["late_unposted"] = sum(t.num_posted < len(t._pieces) for t in held)
    out["late_nowait_stats"] = runner.end_step().as_dict()
    runner.close()  # every held piece goes out now and completes
    out["late_all_posted_after_close"] = all(t.num_posted == len(t._pieces) for t in held)

    # 3b. some replicas late (the first of each plan held back), the others waited for:
    #     bytes prefetched count only the replicas that arrived
    runner = _open(opened, model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans[(layer, step)],
        wait_for_replicas=True,
        hold_back=lambda layer, step: [tuple(x) for x in np.argwhere(
            plans[(layer, step)].replicas)[:1]]))
    logits, st = _forward(runner, model, rank, 0)
    out["partial_late0"] = logits
    out["partial_late_stats"] = st.as_dict()
    out["replica_bytes"] = runner.replica_bytes

    # 3c. deliberate logic errors, to show that the comparison catches them: (a) the combine
    #     uses the wrong gate weights (k order reversed); (b) tokens run on replicas are lost
    #     (their expert output is zero)
    runner = _open(opened, model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans[(layer, step)],
        wait_for_replicas=True))
    for layer in runner.layers:
        layer.combine = lambda y, w, _c=layer.combine: _c(y, w.flip(-1))
    out["broken_gate0"] = _forward(runner, model, rank, 0)[0]
    runner = _open(opened, model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans[(layer, step)],
        wait_for_replicas=True))
    real_params = SplitPhaseTransfer.params
    SplitPhaseTransfer.params = lambda self, e: {
        k: torch.zeros_like(v) for k, v in real_params(self, e).items()}
    try:
        out["dropped_replica0"] = _forward(runner, model, rank, 0)[0]
    finally:
        SplitPhaseTransfer.params = real_params

    # 4. PROBE plans: greedy on the previous step's load (history predictor) and on the
    #    frozen-router prior
    for pred in ("history", "router") if world == 2 else ("history",):
        predictor = prior if pred == "router" else pred
        runner = _open(opened, model, ctx, PipelineOptions(num_slots=SLOTS, predictor=predictor,
                                                      method="greedy_ref",
                                                      default_window_s=1.0), cost=_cost(world))
        for step in range(3):
            logits, st = _forward(runner, model, rank, step)
            out[f"probe_{pred}{step}"] = logits
            out[f"probe_{pred}_stats{step}"] = st.as_dict()

    # 5. replica weights equal home weights after a transfer
    plan = plans[(1, 0)]
    blocks = runner.blocks
    pool = SlotPool(runner.layers[1].experts.shapes(), SLOTS, dtype=DTYPE)
    tr = SplitPhaseTransfer(1, plan.replicas, plan.sources, rank, runner.layers[1].experts.get,
                            pool, ctx.transfer_group, num_pieces=3)
    tr.start()
    tr.pause()
    tr.resume()
    tr.join()
    ref = full_model().moe_blocks[1]
    diffs = []
    for e, _slot in tr.slot_of.items():
        got = tr.params(e)
        diffs.append(max(float((got["w_gate_up"] - ref.w_gate_up[e]).abs().max()),
                         float((got["w_down"] - ref.w_down[e]).abs().max())))
    out["replica_weight_diffs"] = diffs
    out["replicas_here"] = len(tr.slot_of)
    del blocks

    # 6. continuous batching: staggered arrivals, chunked prefill, balancing on
    runner = _open(opened, model, ctx, PipelineOptions(num_slots=SLOTS, method="greedy_ref",
                                                  default_window_s=1.0), cost=_cost(world))
    engine = Engine(model, runner, ctx, max_batch_tokens=12, prefill_chunk=5)
    reqs = _requests(rank)
    results = engine.serve(reqs)
    out["generated"] = {rid: r.tokens for rid, r in results.items()}
    out["engine_summary"] = engine.summary()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    for runner in opened:
        runner.close()
    dist.barrier()
    ctx.watchdog.stop()
    dist.destroy_process_group()


def _requests(rank: int) -> list[Request]:
    g = torch.Generator().manual_seed(50 + rank)
    reqs = []
    for i in range(3 if rank == 0 else 1 + rank % 2):
        n = int(torch.randint(3, 11, (1,), generator=g))
        prompt = torch.randint(0, 64, (n,), generator=g).tolist()
        reqs.append(Request(f"r{rank}-{i}", prompt, max_new_tokens=4 + i,
                            arrival_step=2 * i + rank))
    return reqs


def _run(world: int, tmp_path) -> list[dict]:
    port = _free_port()
    mp.spawn(_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _reference_logits(model, rank: int, step: int) -> torch.Tensor:
    ids, lens = batch_of(rank, step)
    with torch.inference_mode():
        return model(ids, seq_lens=lens).logits


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.dtype == want.dtype == DTYPE
    return float((got - want).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process(world, tmp_path):
    outs = _run(world, tmp_path)
    model = full_model()
    worst = {}
    for rank, out in enumerate(outs):
        checks = {"static": 0, "random0": 0, "random1": 1, "late0": 0, "partial_late0": 0,
                  "late_nowait1": 1}
        preds = ("history", "router") if world == 2 else ("history",)
        checks.update({f"probe_{p}{s}": s for p in preds for s in range(3)})
        for key, step in checks.items():
            ref = _reference_logits(model, rank, step)
            diff = _max_diff(out[key], ref)
            worst[key] = max(worst.get(key, 0.0), diff)
            print(f"world {world} rank {rank} {key}: max abs diff {diff:.2e}, "
                  f"max |logit| {float(ref.abs().max()):.2f}")
            assert diff <= EP_TOL, f"rank {rank} {key}: max abs diff {diff}"
        assert max(out["replica_weight_diffs"], default=0.0) == 0.0
    # The same comparison fails on the deliberately broken runs (on some rank).
    ref0 = [_reference_logits(model, rank, 0) for rank in range(world)]
    for key in ("broken_gate0", "dropped_replica0"):
        diff = max(_max_diff(out[key], ref0[rank]) for rank, out in enumerate(outs))
        print(f"world {world} {key} (deliberate error): max abs diff {diff:.2e}")
        assert diff > 1e3 * EP_TOL, f"{key}: a logic error went unnoticed (diff {diff})"
    # Bytes prefetched count the replicas that arrived (not the planned or late ones), once
    # per rank; the group total is their sum, the same on every rank.
    part = outs[0]["partial_late_stats"]
    planned, arrived = sum(part["replicas_planned"]), sum(part["replicas_arrived"])
    assert 0 < arrived < planned and sum(part["replicas_late"]) == planned - arrived
    assert part["bytes_prefetched"] == arrived * outs[0]["replica_bytes"] > 0
    assert sum(part["bytes_prefetched_per_rank"]) == part["bytes_prefetched"]
    assert all(o["partial_late_stats"]["bytes_prefetched_per_rank"]
               == part["bytes_prefetched_per_rank"] for o in outs)
    assert sum(outs[0]["late_stats"]["replicas_arrived"]) == 0
    assert outs[0]["late_stats"]["bytes_prefetched"] == 0
    # Replicas were really moved and used, and late ones really fell back.
    random_stats = outs[0]["random_stats"]
    assert sum(sum(s["replicas_arrived"]) for s in random_stats) > 0
    late = outs[0]["late_stats"]
    assert sum(late["replicas_arrived"]) == 0 and sum(late["fallback_pairs"]) > 0
    # A forced late replica is skipped without waiting: the forward returned while its pieces
    # were not even posted (on some rank), and it is counted late, not used.
    assert sum(o["late_unposted"] for o in outs) > 0
    nowait = outs[0]["late_nowait_stats"]
    assert sum(nowait["replicas_late"]) == sum(nowait["replicas_planned"]) > 0
    assert sum(nowait["replicas_used"]) == 0 and nowait["exposed_transfer_s"] == 0.0
    assert all(o["late_all_posted_after_close"] for o in outs)
    # Arrived replicas were used (pairs ran on them), and never more than arrived.
    for s in random_stats:
        assert all(u <= a for u, a in zip(s["replicas_used"], s["replicas_arrived"],
                                          strict=True))
    assert sum(sum(s["replicas_used"]) for s in random_stats) > 0
    assert sum(o["replicas_here"] for o in outs) > 0
    probe_planned = sum(sum(outs[0][f"probe_history_stats{s}"]["replicas_planned"])
                        for s in range(3))
    assert probe_planned > 0, "greedy planned no replica on a skewed load"
    # Continuous batching equals single-process greedy decoding, request by request.
    for rank, out in enumerate(outs):
        for req in _requests(rank):
            want = greedy_generate(model, req.prompt, req.max_new_tokens)
            assert out["generated"][req.rid] == want, req.rid


def _pause_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 0 receives two replicas from rank 1; rank 0's gate is paused before the start."""
    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    model = _rank_model(rank, world)
    runner = EPRunner(model, ctx, PipelineOptions(balance=False))
    layer = runner.layers[1]
    home = sharded_home(NUM_EXPERTS, world)
    replicas = np.zeros((world, NUM_EXPERTS), dtype=bool)
    replicas[0, np.flatnonzero(home[1])[:2]] = True
    sources = np.where(replicas, 1, -1)
    pool = SlotPool(layer.experts.shapes(), SLOTS, dtype=DTYPE)
    gate = IssueGate()
    tr = SplitPhaseTransfer(1, replicas, sources, rank, layer.experts.get, pool,
                            ctx.transfer_group, num_pieces=4, gate=gate, max_in_flight=1)
    out = {"total": len(tr._pieces)}
    if rank == 0:
        tr.pause()
    tr.start()
    time.sleep(0.5)
    out["posted_while_paused"] = tr.num_posted
    out["arrived_while_paused"] = int(tr.arrived().sum())
    dist.barrier()  # rank 0 reads its count before resuming
    if rank == 0:
        out["gate_posts_while_paused"] = gate.posts
        tr.resume()  # phase 2 allowed too
    else:
        tr.resume()
    tr.join()
    out["posted_after"] = tr.num_posted
    out["arrived_after"] = int(tr.arrived().sum())
    if rank == 0:
        ref = full_model().moe_blocks[1]
        out["diff"] = max(float((tr.params(e)["w_down"] - ref.w_down[e]).abs().max())
                          for e in tr.slot_of)
    torch.save(out, os.path.join(out_dir, f"pause{rank}.pt"))
    dist.barrier()
    runner.close()
    ctx.watchdog.stop()
    dist.destroy_process_group()


@pytest.mark.slow
def test_pause_stops_issuing(tmp_path):
    """While rank 0's gate is paused it posts no piece (phase 1 allowed, its peer waiting);
    its peer posts at most max_in_flight = 1 piece, which cannot complete; after resume every
    piece goes out and the replicas equal the home weights."""
    port = _free_port()
    mp.spawn(_pause_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"pause{r}.pt", weights_only=False) for r in range(2))
    assert r0["total"] > 2 and r0["total"] == r1["total"]
    assert r0["posted_while_paused"] == 0 and r0["gate_posts_while_paused"] == 0
    assert r0["arrived_while_paused"] == 0
    assert r1["posted_while_paused"] == 1  # its first send, stuck until rank 0 resumes
    assert r0["posted_after"] == r0["total"] and r1["posted_after"] == r1["total"]
    assert r0["arrived_after"] == 2 and r0["diff"] == 0.0


def test_split_counts_contract():
    owner = np.array([0, 1])
    usable = np.array([[True, False], [True, True]])  # [G, E]
    quota = np.array([[2, 2], [0, 5]])  # [E, G]
    # expert 0: planned 2+2 with 4 actual -> exact; expert 1: only rank 1, 3 actual
    assert split_counts(quota, usable, owner, np.array([4, 3])).tolist() == [[2, 2], [0, 3]]
    # fewer actual than planned: proportional cut, lowest rank first
    assert split_counts(quota, usable, owner, np.array([3, 0])).tolist() == [[1, 2], [0, 0]]
    # replica of expert 0 on rank 1 unusable -> all home
    usable2 = np.array([[True, False], [False, True]])
    assert split_counts(quota, usable2, owner, np.array([4, 3])).tolist() == [[4, 0], [0, 3]]
    # no quota at all -> home
    assert split_counts(np.zeros((2, 2), int), usable, owner,
                        np.array([1, 2])).tolist() == [[1, 0], [0, 2]]


def _dead_worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    ctx = _init(rank, world, port, timeout_s=3.0)
    model = _rank_model(rank, world)
    runner = EPRunner(model, ctx, PipelineOptions(balance=False))
    if rank == 1:
        if mode == "exit":
            os._exit(0)
        time.sleep(60)
        return
    t0 = time.perf_counter()
    try:
        _forward(runner, model, rank, 0)
        msg = "no error"
    except RankFailure as exc:
        msg = str(exc)
    with open(os.path.join(out_dir, "err.txt"), "w") as f:
        f.write(f"{time.perf_counter() - t0:.2f}\n{msg}")
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_rank_gives_clear_error(mode, tmp_path):
    port = _free_port()
    ctxs = mp.start_processes(_dead_worker, args=(2, port, str(tmp_path), mode), nprocs=2,
                              join=False, start_method="spawn")
    deadline = time.time() + 40
    while not (tmp_path / "err.txt").exists() and time.time() < deadline:
        time.sleep(0.2)
    for p in ctxs.processes:
        if p.is_alive():
            p.kill()
        p.join(5)
    text = (tmp_path / "err.txt").read_text()
    seconds, msg = text.split("\n", 1)
    assert "rank 0" in msg and "peer rank probably died" in msg, msg
    assert float(seconds) < 15.0


def test_slot_pool_and_transfer_validation():
    pool = SlotPool({"w": (4, 3)}, 2, dtype=torch.float32)
    assert pool.assign(3, [5, 1]) == {5: 0, 1: 1}
    assert pool.buffer_of(3) == 1 and pool.slot_expert[1].tolist() == [5, 1]
    with pytest.raises(ValueError, match="3 replicas for layer 0 exceed the pool's 2 slots"):
        pool.assign(0, [1, 2, 3])
    replicas = np.array([[False, True], [False, False]])
    with pytest.raises(ValueError, match="replica of expert 1 on rank 0 has invalid source 0"):
        SplitPhaseTransfer(0, replicas, np.array([[-1, 0], [-1, -1]]), 0, None, pool, None)
    with pytest.raises(ValueError, match="phase1_fraction"):
        SplitPhaseTransfer(0, replicas, np.array([[-1, 1], [-1, -1]]), 0, None, pool, None,
                           phase1_fraction=1.5)


def test_runner_takes_history_or_a_load_predictor():
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"predictor must be 'history' or a LoadPredictor .*"
                                         r"router_prior\(model\)\), got 'router'"):
        EPRunner(full_model(), ctx, PipelineOptions(predictor="router"))
    model = full_model()
    prior = router_prior(model)
    runner = EPRunner(model, ctx, PipelineOptions(predictor=prior))
    assert runner.predictors is prior


def test_balancer_decides_a_named_layer_plan():
    """One process: the Balancer predicts, gathers and plans into named structures; the plan's
    quota is the assignment row of the rank, the report's fields come back stacked [G, ...]."""
    from probe.runtime.balancer import Balancer, LayerPlan, all_gather_fields

    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    got = all_gather_fields(ctx, {"a": np.arange(3.0), "w": np.array(2.5)}, "test")
    assert got["a"].shape == (1, 3) and got["w"].shape == (1,) and got["w"][0] == 2.5
    home = sharded_home(NUM_EXPERTS, 1)
    forced = Plan(np.zeros((1, NUM_EXPERTS), bool), np.full((1, NUM_EXPERTS), -1),
                  np.ones((1, NUM_EXPERTS, 1), dtype=np.int64))
    balancer = Balancer(ctx, num_experts=NUM_EXPERTS, top_k=2, home=home, cost=_cost(1),
                        num_slots=SLOTS, plan_override=lambda layer, step: forced)
    balancer.observe(1, torch.tensor([[0, 1], [0, 2]]))
    balancer.end_step()  # layer 1's true load becomes the history prediction
    assert balancer.predict(1, torch.zeros(2, 4)).tolist() == [2, 1, 1, 0, 0, 0, 0, 0]
    group, layer_plan = balancer.decide(0, 5, torch.zeros(2, 4), np.zeros(NUM_EXPERTS, bool),
                                        0.25, has_next=True)
    assert isinstance(layer_plan, LayerPlan) and layer_plan.plan is forced
    assert (layer_plan.layer, layer_plan.step, layer_plan.num_replicas) == (1, 5, 0)
    assert layer_plan.quota(0).shape == (NUM_EXPERTS, 1) and layer_plan.plan_s >= 0
    assert group.predicted_load.tolist() == [[2, 1, 1, 0, 0, 0, 0, 0]]
    assert group.window_s.tolist() == [0.25] and not group.arrived.any()
    assert balancer.decide(2, 5, torch.zeros(2, 4), np.zeros(NUM_EXPERTS, bool), 0.25,
                           has_next=False)[1] is None
