"""Runtime balancing policies (probe.runtime.policies) on CPU with gloo, fp64.

Every policy's logits equal the single-process model's (static, eplb, eplb-lp, probe-on-eplb,
the last also with a late replica), at 2 and 4 ranks, with an EPLB re-plan that moves weights
between steps. One spawn per world size; the same fixtures and tolerance as tests/test_ep.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ep import (EP_TOL, _cost, _forward, _free_port, _init, _max_diff, _rank_model,
                     _reference_logits, full_model, random_plan)

from probe.planner import CostModel
from probe.runtime.pipeline import EPRunner, PipelineOptions
from probe.runtime.policies import (POLICIES, PolicySlots, dispatch_quota, eplb_copies,
                                    policy_slots)

STEPS = 3


def _policy_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    out: dict = {}
    opened: list[EPRunner] = []
    model = _rank_model(rank, world)

    def run(name: str, options: PipelineOptions, steps: int = STEPS) -> EPRunner:
        runner = EPRunner(model, ctx, options, cost=_cost(world))
        opened.append(runner)
        for step in range(steps):
            logits, st = _forward(runner, model, rank, step)
            out[f"{name}{step}"] = logits
            out[f"{name}_stats{step}"] = st.as_dict()
        return runner

    # static; EPLB (even split) and EPLB + LP, 1 resident slot, re-planned every step from
    # the last step's load (the weights move between steps)
    run("static", PipelineOptions(policy="static"), steps=1)
    for policy in ("eplb", "eplb-lp"):
        runner = run(policy, PipelineOptions(policy=policy, resident_slots=1, num_slots=0,
                                             replan_interval=1, replan_window=1))
        out[f"{policy}_layout"] = runner.resident.layout.copy()
        out[f"{policy}_replans"] = runner.resident.replans
    # PROBE-on-EPLB: 1 resident + 1 per-step slot, greedy on the history prediction, the
    # replicas waited for; a re-plan at step 2
    run("poe", PipelineOptions(policy="probe-on-eplb", resident_slots=1, num_slots=1,
                               method="greedy_ref", default_window_s=1.0,
                               wait_for_replicas=True, replan_interval=2, replan_window=2))
    # PROBE-on-EPLB with forced plans: the first replica of every plan is late (held back),
    # the others are waited for
    rng = np.random.default_rng(321)
    plans = {(layer, step): random_plan(rng, world) for layer in range(3) for step in range(2)}
    run("poe_late", PipelineOptions(
        policy="probe-on-eplb", resident_slots=1, num_slots=2,
        plan_override=lambda layer, step: plans[(layer, step)], wait_for_replicas=True,
        hold_back=lambda layer, step: [tuple(x) for x in
                                       np.argwhere(plans[(layer, step)].replicas)[:1]]),
        steps=2)
    # deliberate error: EPLB with its resident copies zeroed must NOT match
    runner = EPRunner(model, ctx, PipelineOptions(policy="eplb", resident_slots=1),
                      cost=_cost(world))
    opened.append(runner)
    for t in runner.resident.storage.values():
        t.zero_()
    out["broken_resident0"] = _forward(runner, model, rank, 0)[0]
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    for runner in opened:
        runner.close()
    dist.barrier()
    ctx.watchdog.stop()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_policies_match_single_process(world, tmp_path):
    port = _free_port()
    mp.spawn(_policy_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    model = full_model()
    checks = {"static0": 0, **{f"{p}{s}": s for p in ("eplb", "eplb-lp", "poe")
                               for s in range(STEPS)},
              "poe_late0": 0, "poe_late1": 1}
    for rank, out in enumerate(outs):
        for key, step in checks.items():
            ref = _reference_logits(model, rank, step)
            diff = _max_diff(out[key], ref)
            print(f"world {world} rank {rank} {key}: max abs diff {diff:.2e}")
            assert diff <= EP_TOL, f"rank {rank} {key}: max abs diff {diff}"
    diff = max(_max_diff(out["broken_resident0"], _reference_logits(model, rank, 0))
               for rank, out in enumerate(outs))
    assert diff > 1e3 * EP_TOL, f"zeroed resident copies went unnoticed (diff {diff})"
    first = outs[0]
    for policy in ("eplb", "eplb-lp"):
        stats = [first[f"{policy}_stats{s}"] for s in range(STEPS)]
        # b G resident copies per layer, used by pairs; the layout re-planned at steps 1, 2
        # from the observed load, its weights moved (timed) and identical on every rank
        assert all(s["replicas_resident"] == [world] * 3 for s in stats)
        assert sum(sum(s["replicas_used"]) for s in stats) > 0
        assert first[f"{policy}_replans"] == STEPS  # the first layout, then steps 1 and 2
        assert stats[0]["replan_seconds"] == 0.0
        assert sum(s["replan_bytes"] for s in stats) > 0
        assert all(s["replan_seconds"] > 0 for s in stats[1:] if s["replan_bytes"] > 0)
        assert all(np.array_equal(o[f"{policy}_layout"], first[f"{policy}_layout"])
                   for o in outs)
        assert all(sum(s["replicas_planned"]) == 0 for s in stats)
    # the dispatch split is timed where it solves something (LP, water-filling)
    assert all(x > 0 for x in first["eplb-lp_stats1"]["layer_split_s"])
    assert all(x > 0 for x in first["poe_stats1"]["layer_split_s"])
    poe = [first[f"poe_stats{s}"] for s in range(STEPS)]
    assert sum(sum(s["replicas_planned"]) for s in poe) > 0
    late = [first[f"poe_late_stats{s}"] for s in range(2)]
    assert sum(sum(s["replicas_late"]) for s in late) > 0
    assert sum(sum(s["replicas_arrived"]) for s in late) > 0


def test_policy_slots_share_the_extra_slots():
    assert policy_slots("probe-on-eplb", 4, 1) == PolicySlots("probe-on-eplb", 1, 3)
    assert policy_slots("probe-on-eplb", 1) == PolicySlots("probe-on-eplb", 0, 1)
    for k in range(5):
        for policy in POLICIES:
            s = policy_slots(policy, k)
            want = 0 if policy == "static" else k
            assert s.resident + s.per_step == want, (policy, k)
    assert policy_slots("probe-on-eplb", 0) == policy_slots("probe-on-eplb", 0, 0)
    with pytest.raises(ValueError, match="policy must be one of"):
        policy_slots("lplb", 2)
    with pytest.raises(ValueError, match="resident_slots must be an int in"):
        policy_slots("probe-on-eplb", 2, 3)
    with pytest.raises(ValueError, match="contradicts policy 'eplb'"):
        policy_slots("eplb", 2, 1)
    with pytest.raises(ValueError, match="extra_slots must be an int >= 0"):
        policy_slots("eplb", -1)


def test_dispatch_quota_conserves_true_counts_on_present_copies():
    rng = np.random.default_rng(0)
    num_ranks, num_experts = 4, 8
    cost = CostModel.uniform(num_ranks, alpha=1e-6, beta=1e-6, token_time=0.0,
                             transfer_time=1e-6)
    weight = rng.integers(0, 50, size=(1, num_experts)).astype(float)
    copies = eplb_copies(weight, 1, num_ranks)[0]  # [G, E]
    assert (copies.sum(axis=1) == num_experts // num_ranks + 1).all()
    counts = rng.integers(0, 30, size=(num_ranks, num_experts))
    counts[:, 3] = 0  # an expert without tokens
    for split in ("even", "lp", "waterfill"):
        for rank in range(num_ranks):
            quota, seconds = dispatch_quota(split, rank, counts, copies, cost,
                                            layout=copies > 0)
            assert seconds >= 0.0
            assert quota.shape == (num_experts, num_ranks)
            assert (quota >= 0).all() and (quota.sum(axis=1) == counts[rank]).all(), split
            assert (quota[copies.T == 0] == 0).all(), f"{split}: tokens on a rank with no copy"
    # on token counts alone (alpha = 0, no link cost) the LP and water-filling splits are
    # never less balanced than the even split: compare the busiest rank's pairs
    flat = CostModel.uniform(num_ranks, alpha=0.0, beta=1e-6, token_time=0.0,
                             transfer_time=1e-6)
    busiest = {split: max(sum(dispatch_quota(split, s, counts, copies, flat,
                                             layout=copies > 0)[0] for s in range(num_ranks)
                              ).sum(axis=0)) for split in ("even", "lp", "waterfill")}
    assert busiest["lp"] <= busiest["even"] and busiest["waterfill"] <= busiest["even"], busiest
    with pytest.raises(ValueError, match="split must be"):
        dispatch_quota("round_robin", 0, counts, copies, cost)


@pytest.mark.slow
def test_torchrun_policy_summary(tmp_path):
    """`python -m probe.runtime --policy probe-on-eplb` under torchrun (2 CPU ranks): the
    summary names the policy and its slots, and carries per-layer IR, resident copies,
    dispatch-split seconds and the EPLB re-plans' move time."""
    import json
    import subprocess
    import sys

    from test_engine import _config_file, _subprocess_env

    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "probe.runtime", "--random-config", _config_file(tmp_path), "--device", "cpu",
           "--requests", "2", "--prompt-len", "10", "--max-new-tokens", "4",
           "--method", "greedy_ref", "--timeout", "30", "--policy", "probe-on-eplb",
           "--extra-slots", "2", "--replan-interval", "2", "--replan-window", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert (summary["policy"], summary["extra_slots"], summary["resident_slots"],
            summary["per_step_slots"]) == ("probe-on-eplb", 2, 1, 1)
    assert summary["resident_bytes_per_rank"] > 0
    layers, totals = summary["metrics"]["layers"], summary["metrics"]["totals"]
    num_layers = summary["metrics"]["num_layers"]
    assert len(layers["ir_mean"]) == len(layers["split_s"]) == num_layers
    assert layers["replicas_resident"] == [2] * num_layers  # b = 1 per rank, 2 ranks
    assert totals["split_s"] > 0 and totals["replan_bytes"] > 0 and totals["replan_s"] > 0
    assert [r["generated_tokens"] for r in summary["ranks"]] == [8, 8]
    assert "dispatch split s" in proc.stdout
