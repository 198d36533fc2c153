"""Expert parallelism with experts kept packed (MXFP4 / block-scaled FP8), on CPU with gloo.

Each rank loads its shard of a random shipped-format checkpoint (`write_random_checkpoint(...,
weights="shipped")`: GPT-OSS with MXFP4 experts, DeepSeek-V3 with FP8 projections) with
`keep_format=True`, so its home experts, its replica slots and every replica transfer hold the
packed tensors (blocks + scales). The experts run through the dequantising twin of the packed
grouped GEMM (CPU). The model is then cast to fp64 (the packed tensors stay as they are; they
are expanded to fp64 per call), so that EP logits must equal the single-process packed model's
and the dequantised dense model's within EP_TOL = 1e-10, as in tests/test_ep.py: the packed
values expand exactly, and only BLAS's row-count-dependent summation differs (~1e-15).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ep import _free_port, _init

from probe.placement import sharded_home
from probe.planner import CostModel, Plan
from probe.runtime.checkpoint import load_model
from probe.runtime.pipeline import EPRunner, PipelineOptions, cost_model_for
from probe.runtime.quant import PackedWeight, join_packed, split_packed
from probe.runtime.random_checkpoint import RandomCheckpointSpec, write_random_checkpoint
from probe.runtime.transfer import SlotPool, SplitPhaseTransfer
from probe.specs import weight_bytes

NUM_EXPERTS = 8
SLOTS = 2
VOCAB = 64
EP_TOL = 1e-10
FORMATS = {"mxfp4": "gpt_oss", "fp8_block": "deepseek_v3"}
# GPT-OSS: 3 MoE layers, D 64, F 32 (MXFP4 blocks of 32 along D and F). DeepSeek-V3: a dense
# first layer, then 2 MoE layers; F 128 so that gate and up stack in whole 128-row FP8 tiles.
SPECS = {
    "mxfp4": RandomCheckpointSpec(num_layers=3, num_experts=NUM_EXPERTS, top_k=2,
                                  hidden_size=64, expert_width=32, num_heads=4,
                                  num_kv_heads=2, vocab_size=VOCAB),
    "fp8_block": RandomCheckpointSpec(num_layers=3, num_experts=NUM_EXPERTS, top_k=2,
                                      hidden_size=64, expert_width=128, num_heads=4,
                                      num_kv_heads=4, vocab_size=VOCAB),
}


def _checkpoint(fmt: str, root) -> str:
    path = os.path.join(str(root), fmt)
    if not os.path.exists(path):
        write_random_checkpoint(FORMATS[fmt], path, SPECS[fmt], weights="shipped", std=0.1)
    return path


def _load(path: str, *, packed: bool = True, expert_ids=None):
    return load_model(path, keep_format=packed, expert_ids=expert_ids).to(torch.float64)


def replica_bytes(fmt: str) -> int:
    """One expert as stored: gate/up [2F, D] and down [D, F] in `fmt`, plus its fp64 biases
    (GPT-OSS has expert biases, DeepSeek-V3 none)."""
    s = SPECS[fmt]
    d, f = s.hidden_size, s.expert_width
    bias = (2 * f + d) * 8 if fmt == "mxfp4" else 0
    return weight_bytes(fmt, 2 * f, d) + weight_bytes(fmt, d, f) + bias


def batch_of(rank: int, step: int) -> tuple[torch.Tensor, list[int]]:
    """This rank's tokens: a few sequences, skewed (a repeated token) so balancing has work."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    lens = [5 + rank, 3, 7]
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=g)
    ids[: lens[0]] = 3 + step
    return ids, lens


def random_plan(rng: np.random.Generator, num_ranks: int) -> Plan:
    """Replicas within the slots (each from its home), any counts where a copy is."""
    home = sharded_home(NUM_EXPERTS, num_ranks)
    owner = np.argmax(home, axis=0)
    replicas = np.zeros((num_ranks, NUM_EXPERTS), dtype=bool)
    for g in range(num_ranks):
        pick = rng.choice(np.flatnonzero(~home[g]), size=SLOTS, replace=False)
        replicas[g, pick] = True
    sources = np.where(replicas, owner[None, :], -1)
    assignment = rng.integers(1, 6, size=(num_ranks, NUM_EXPERTS, num_ranks))
    return Plan(replicas, sources, assignment * (home | replicas).T[None, :, :])


def _forward(runner: EPRunner, model, rank: int, step: int):
    ids, lens = batch_of(rank, step)
    runner.begin_step()
    with torch.inference_mode():
        logits = model(ids, seq_lens=lens).logits
    return logits, runner.end_step()


def _worker(rank: int, world: int, port: int, root: str, out_dir: str,
            formats: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    ctx = _init(rank, world, port)
    out: dict = {}
    opened: list[EPRunner] = []  # closed at the end: their last transfers may still run
    for fmt in formats:
        _scenarios(fmt, rank, world, ctx, root, out, opened)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    for runner in opened:
        runner.close()
    dist.barrier()
    ctx.watchdog.stop()
    dist.destroy_process_group()


def _scenarios(fmt: str, rank: int, world: int, ctx, root: str, out: dict,
               opened: list) -> None:
    """Every scenario of one format on this rank; results go into `out` under fmt_*."""
    ids = np.flatnonzero(sharded_home(NUM_EXPERTS, world)[rank]).tolist()
    model = _load(_checkpoint(fmt, root), expert_ids=ids)
    out[f"{fmt}_home_packed"] = all(b.packed[0].fmt == fmt for b in model.moe_blocks)

    # 1. balancing off
    runner = EPRunner(model, ctx, PipelineOptions(balance=False, num_slots=SLOTS))
    opened.append(runner)
    out[f"{fmt}_static0"] = _forward(runner, model, rank, 0)[0]

    # 2. balancing on, random plans whose replicas the runner waits for (so all are used);
    #    every transfer's bytes are recorded
    rng = np.random.default_rng(11)  # the same plans on every rank
    plans = {(layer, step): random_plan(rng, world) for layer in range(3) for step in range(2)}
    runner = EPRunner(model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans.get((layer, step)),
        wait_for_replicas=True))
    opened.append(runner)
    transfers = []
    prefetch = runner.executor.prefetch
    runner.executor.prefetch = lambda lp: transfers.append(prefetch(lp)) or transfers[-1]
    stats = []
    for step in range(2):
        logits, st = _forward(runner, model, rank, step)
        out[f"{fmt}_random{step}"] = logits
        stats.append(st.as_dict())
    out[f"{fmt}_random_stats"] = stats
    out[f"{fmt}_transfers"] = [(t.stats.replicas_received, t.stats.bytes_received,
                                t.stats.bytes_sent) for t in transfers]
    out[f"{fmt}_replica_bytes"] = runner.replica_bytes
    out[f"{fmt}_pool"] = {name: (t.dtype, tuple(t.shape))
                          for name, t in runner.pool.storage.items()}
    out[f"{fmt}_cost_transfer"] = float(runner.cost.transfer_time[0, 1])

    # 2a. the same plans, each replica read with its down projection's scales doubled: the
    #     comparison must catch it (the experts really read the packed slots)
    runner = EPRunner(model, ctx, PipelineOptions(
        num_slots=SLOTS, plan_override=lambda layer, step: plans.get((layer, step)),
        wait_for_replicas=True))
    opened.append(runner)
    real_params = SplitPhaseTransfer.params

    def doubled(self, e):
        params = dict(real_params(self, e))
        if fmt == "mxfp4":  # a biased power-of-two exponent: + 1 doubles the block
            params["w_down.scales"] = params["w_down.scales"] + 1
        else:
            params["w_down.scale_inv"] = params["w_down.scale_inv"] * 2
        return params

    SplitPhaseTransfer.params = doubled
    try:
        out[f"{fmt}_broken0"] = _forward(runner, model, rank, 0)[0]
    finally:
        SplitPhaseTransfer.params = real_params

    # 3. PROBE's greedy plans on the previous step's load
    runner = EPRunner(model, ctx, PipelineOptions(
        num_slots=SLOTS, method="greedy_ref", default_window_s=1.0),
        cost=CostModel.uniform(world, alpha=0.0, beta=1e-6, token_time=0.0,
                               transfer_time=1e-6))
    opened.append(runner)
    for step in range(2):
        logits, st = _forward(runner, model, rank, step)
        out[f"{fmt}_probe{step}"] = logits
        out[f"{fmt}_probe_stats{step}"] = st.as_dict()

    # 4. DeepSeek EPLB: resident redundant copies, moved packed at its re-plans
    runner = EPRunner(model, ctx, PipelineOptions(policy="eplb", resident_slots=1,
                                                  replan_interval=1, num_slots=SLOTS))
    opened.append(runner)
    for step in range(2):
        out[f"{fmt}_eplb{step}"] = _forward(runner, model, rank, step)[0]
    out[f"{fmt}_eplb_storage"] = {n: t.dtype for n, t in runner.resident.storage.items()}

    # 5. a replica in its slot is the home expert's packed bytes, exactly
    plan = plans[(1, 0)]
    experts = runner.layers[1].experts
    pool = SlotPool(experts.shapes(), SLOTS,
                    dtype={n: t.dtype for n, t in experts.params.items()})
    tr = SplitPhaseTransfer(1, plan.replicas, plan.sources, rank, experts.get, pool,
                            ctx.transfer_group, num_pieces=3)
    tr.start()
    tr.resume()
    tr.join()
    out[f"{fmt}_slot_copies"] = {e: {n: t.clone() for n, t in tr.params(e).items()}
                                 for e in tr.slot_of}


def _reference(model, rank: int, step: int) -> torch.Tensor:
    ids, lens = batch_of(rank, step)
    with torch.inference_mode():
        return model(ids, seq_lens=lens).logits


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.dtype == want.dtype == torch.float64
    return float((got - want).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("world, formats", [(2, ("mxfp4", "fp8_block")), (4, ("mxfp4",))],
                         ids=["2ranks", "4ranks-mxfp4"])
def test_packed_ep_matches_single_process(world, formats, tmp_path):
    """Both formats at 2 ranks; MXFP4 alone at 4 (the same code path, half the time)."""
    root = tmp_path / "ckpt"
    for fmt in formats:
        _checkpoint(fmt, root)
    mp.spawn(_worker, args=(world, _free_port(), str(root), str(tmp_path), formats),
             nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for fmt in formats:
        packed, dense = _load(_checkpoint(fmt, root)), _load(_checkpoint(fmt, root),
                                                              packed=False)
        want_bytes = replica_bytes(fmt)
        for rank, out in enumerate(outs):
            assert out[f"{fmt}_home_packed"]
            for key, step in {"static0": 0, "random0": 0, "random1": 1, "probe0": 0,
                              "probe1": 1, "eplb0": 0, "eplb1": 1}.items():
                got = out[f"{fmt}_{key}"]
                ref = _reference(packed, rank, step)
                diff = _max_diff(got, ref)
                print(f"{fmt} world {world} rank {rank} {key}: max abs diff {diff:.2e} "
                      f"(packed), {_max_diff(got, _reference(dense, rank, step)):.2e} (dense), "
                      f"max |logit| {float(ref.abs().max()):.2f}")
                assert diff <= EP_TOL, (fmt, rank, key, diff)
                assert _max_diff(got, _reference(dense, rank, step)) <= EP_TOL
            # balancing on equals balancing off, step 0
            assert _max_diff(out[f"{fmt}_random0"], out[f"{fmt}_static0"]) <= EP_TOL
            # the slots hold the packed dtypes (no dense copy of any weight matrix)
            pool = out[f"{fmt}_pool"]
            assert {d for n, (d, _) in pool.items() if n.startswith("w_")} == (
                {torch.uint8} if fmt == "mxfp4" else {torch.float8_e4m3fn, torch.float32})
            assert out[f"{fmt}_eplb_storage"] == {n: d for n, (d, _) in pool.items()}
            # every transfer moved exactly the packed bytes per replica, both ends
            assert out[f"{fmt}_replica_bytes"] == want_bytes
            for received, bytes_in, _ in out[f"{fmt}_transfers"]:
                assert bytes_in == received * want_bytes
            # replica slots hold the home expert's stored tensors bit for bit
            ref_block = packed.moe_blocks[1]
            home = {**split_packed("w_gate_up", ref_block.packed[0]),
                    **split_packed("w_down", ref_block.packed[1])}
            for e, slot in out[f"{fmt}_slot_copies"].items():
                for name, t in home.items():
                    assert torch.equal(slot[name].view(torch.uint8), t[e].view(torch.uint8))
        broken = max(_max_diff(o[f"{fmt}_broken0"], _reference(packed, r, 0))
                     for r, o in enumerate(outs))
        assert broken > 1e3 * EP_TOL, f"{fmt}: wrong replica scales went unnoticed ({broken})"
        sent = sum(b for o in outs for _, _, b in o[f"{fmt}_transfers"])
        received = sum(b for o in outs for _, b, _ in o[f"{fmt}_transfers"])
        replicas = sum(r for o in outs for r, _, _ in o[f"{fmt}_transfers"])
        assert replicas > 0 and sent == received == replicas * want_bytes
        stats = outs[0][f"{fmt}_random_stats"]
        assert sum(sum(s["replicas_used"]) for s in stats) > 0
        arrived = sum(sum(s["replicas_arrived"]) for s in stats)
        assert sum(s["bytes_prefetched"] for s in stats) == arrived * want_bytes
        assert sum(sum(outs[0][f"{fmt}_probe_stats{s}"]["replicas_planned"])
                   for s in range(2)) > 0, "greedy planned no replica on a skewed load"
        # the cost model prices a replica by its packed bytes (less than the fp64 weights')
        cfg = packed.cfg
        priced = cost_model_for(cfg, world, torch.float64, weight_format=fmt).transfer_time
        plain = cost_model_for(cfg, world, torch.float64).transfer_time
        assert outs[0][f"{fmt}_cost_transfer"] == priced[0, 1] < plain[0, 1]
        print(f"{fmt}: {want_bytes} bytes per replica, {replicas} replicas moved "
              f"({received} bytes)")


def _tiny_packed_model(tmp_path, fmt: str = "mxfp4"):
    return _load(_checkpoint(fmt, tmp_path))


def test_packed_weight_with_a_wrong_scale_shape_is_refused():
    w = PackedWeight.pack(torch.randn(2, 64, 64), "mxfp4")
    blocks, scales = w.data
    with pytest.raises(ValueError, match=r"PackedWeight\(mxfp4\) of shape \(2, 64, 64\) needs "
                                         r"blocks \[2, 64, 2, 16\].*scales \[2, 64, 2\]"):
        PackedWeight("mxfp4", w.shape, (blocks, scales[:, :, :1]))
    f8 = PackedWeight.pack(torch.randn(1, 130, 64), "fp8_block")
    with pytest.raises(ValueError, match=r"scale_inv \[1, 2, 1\] torch.float32"):
        PackedWeight("fp8_block", f8.shape, (f8.data[0], f8.data[1][:, :1]))
    with pytest.raises(ValueError, match=r"weight \[1, 130, 64\] torch.float8_e4m3fn"):
        PackedWeight("fp8_block", f8.shape, (f8.data[0].view(torch.uint8), f8.data[1]))
    # one expert's parts (a replica slot) with a wrong scale shape, named by weight
    parts = split_packed("w_gate_up", w)
    assert sorted(parts) == ["w_gate_up.blocks", "w_gate_up.scales"]
    one = {n: t[0] for n, t in parts.items()}
    assert torch.equal(join_packed(one, stacked=False)["w_gate_up"].dense(), w.dense()[:1])
    one["w_gate_up.scales"] = one["w_gate_up.scales"][:, :1]
    with pytest.raises(ValueError, match="join_packed: w_gate_up: PackedWeight"):
        join_packed(one, stacked=False)
    with pytest.raises(ValueError, match=r"w_down has parts \['blocks', 'scale_inv'\], which "
                                         r"name no packed format"):
        join_packed({"w_down.blocks": blocks, "w_down.scale_inv": scales})


def test_replica_send_that_does_not_fit_the_slots_is_refused():
    """A sender whose packed tensors differ from the slots' layout fails before any message,
    naming the tensor (the two ends would otherwise disagree on the bytes)."""
    w = PackedWeight.pack(torch.randn(2, 64, 64), "mxfp4")
    params = split_packed("w_gate_up", w)
    pool = SlotPool({n: tuple(t.shape[1:]) for n, t in params.items()}, 1,
                    dtype={n: t.dtype for n, t in params.items()})
    assert pool.slot_bytes == weight_bytes("mxfp4", 64, 64)
    replicas = np.array([[False, False], [True, False]])  # expert 0 from rank 0 to rank 1
    sources = np.array([[-1, -1], [0, -1]])
    bad = {"w_gate_up.blocks": params["w_gate_up.blocks"][0],
           "w_gate_up.scales": params["w_gate_up.scales"][0, :, :1]}
    with pytest.raises(ValueError, match=r"replica of expert 0: .*w_gate_up.scales: sent "
                                         r"\[64, 1\] torch.uint8, slot holds \[64, 2\]"):
        SplitPhaseTransfer(0, replicas, sources, 0, lambda e: bad, pool, None)
    as_float = {n: t[0].float() for n, t in params.items()}
    with pytest.raises(ValueError, match="torch.float32, slot holds .* torch.uint8"):
        SplitPhaseTransfer(0, replicas, sources, 0, lambda e: as_float, pool, None)
    with pytest.raises(ValueError, match="dtype must give a torch.dtype for exactly"):
        SlotPool({"a": (2,), "b": (3,)}, 1, dtype={"a": torch.uint8})


def test_runner_refuses_experts_it_cannot_move(tmp_path):
    """Layers in different formats (one slot layout serves every layer) or a packed pair of
    two formats are refused with the reason; a packed model otherwise wraps and runs."""
    from probe.runtime.dist import DistContext

    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    model = _tiny_packed_model(tmp_path)
    blocks = list(model.moe_blocks)
    runner = EPRunner(model, ctx, PipelineOptions(balance=False))
    assert runner.weight_format == "mxfp4" and runner.replica_bytes == replica_bytes("mxfp4")
    runner.close()
    gate_up, down = blocks[1].packed
    blocks[1].packed = (gate_up, PackedWeight.pack(down.dense(), "fp8_block"))
    with pytest.raises(ValueError, match="MoE layer 1: w_gate_up is mxfp4 and w_down fp8_block; "
                                         "packed experts need one format"):
        EPRunner(model, ctx, PipelineOptions(balance=False))
    blocks[1].packed = (PackedWeight.pack(gate_up.dense(), "fp8_block"),
                        PackedWeight.pack(down.dense(), "fp8_block"))
    with pytest.raises(ValueError, match=r"one format in every MoE layer .*\['mxfp4', "
                                         r"'fp8_block', 'mxfp4'\]"):
        EPRunner(model, ctx, PipelineOptions(balance=False))
    blocks[1].packed = (gate_up.dense(), down.dense())
    with pytest.raises(TypeError, match="MoE layer 1: packed experts must be a pair of "
                                        "PackedWeight"):
        EPRunner(model, ctx, PipelineOptions(balance=False))


def test_runtime_cli_keeps_the_format(tmp_path):
    """`python -m probe.runtime --model DIR --keep-format` serves with the experts packed (the
    EP runner on one rank, and the static decode step with --cuda-graphs on the CPU) and
    generates the dequantised model's tokens."""
    import json

    from probe.runtime.__main__ import main as runtime_main

    path = _checkpoint("mxfp4", tmp_path)
    tokens = {}
    for flags in ([], ["--keep-format"], ["--keep-format", "--cuda-graphs"]):
        out = tmp_path / f"{len(flags)}.json"
        assert runtime_main(["--model", path, "--device", "cpu", "--requests", "2",
                             "--prompt-len", "6", "--max-new-tokens", "4", "--max-seq-len",
                             "16", "--quiet", "--out", str(out), *flags]) == 0
        summary = json.loads(out.read_text())
        assert summary["expert_format"] == ("mxfp4" if flags else None)
        tokens[len(flags)] = summary["ranks"][0]["tokens"]
    assert tokens[1] == tokens[0] == tokens[2]
    assert sum(len(t) for t in tokens[1].values()) == 8
    with pytest.raises(SystemExit):
        runtime_main(["--random-config", "gpt-oss-like", "--keep-format"])


_SLOT_KERNEL = r"""
import json, sys, torch
from probe.runtime.quant import PackedWeight, join_packed, split_packed
from probe.runtime.quant_gemm import KernelConfig, grouped_matmul, grouped_matmul_ref
from probe.runtime.transfer import SlotPool
out = []
g = torch.Generator().manual_seed(0)
for fmt in ("mxfp4", "fp8_block"):
    home = split_packed("w", PackedWeight.pack(torch.randn(3, 48, 128, generator=g) * 0.1, fmt))
    pool = SlotPool({n: tuple(t.shape[1:]) for n, t in home.items()}, 2,
                    dtype={n: t.dtype for n, t in home.items()})
    for name, t in pool.params(1, 1).items():  # what a transfer writes into slot 1, buffer 1
        t.copy_(home[name][2])
    slot = join_packed(pool.params(1, 1), stacked=False)["w"]  # views of the slot, E = 1
    x = torch.randn(7, 128, generator=g).to(torch.bfloat16)
    offsets = torch.tensor([0, 7], dtype=torch.int32)
    got = grouped_matmul(x, slot, offsets, config=KernelConfig(block_m=16, block_n=16))
    ref = join_packed(home)["w"].rows([2])
    want = grouped_matmul(x, ref, offsets, config=KernelConfig(block_m=16, block_n=16))
    twin = grouped_matmul_ref(x, ref, offsets)
    err = float((got.float() - twin).norm() / twin.norm())
    out.append([fmt, bool(torch.equal(got, want)), err, slot.nbytes])
json.dump(out, sys.stdout)
"""


def test_triton_kernel_runs_a_replica_slot_in_place():
    """The packed grouped GEMM (under Triton's interpreter) runs a replica slot's views as a
    one-expert PackedWeight: the same output as the home expert's rows, bit for bit."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _SLOT_KERNEL], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r[0] for r in results] == ["mxfp4", "fp8_block"]
    for fmt, same, err, nbytes in results:
        assert same, fmt
        assert err < 1e-2, (fmt, err)  # bf16 tiles against the fp32 twin
        assert nbytes == weight_bytes(fmt, 48, 128)
