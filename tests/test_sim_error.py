"""The runtime's step log, its reader (probe.sim.measured), the replay (probe.sim.replay) and the
simulated-vs-measured table (experiments/runtime/sim_error.py)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from probe.placement import imbalance_ratio, sharded_home
from probe.planner.deepseek_eplb import eplb_copies
from probe.planner.static import static_assignment
from probe.runtime.engine import StepRecord
from probe.runtime.pipeline import PHASES as RUNTIME_PHASES
from probe.runtime.pipeline import StepStats
from probe.runtime.steplog import FORMAT, write_step_log
from probe.sim.measured import PHASES, STEP_LOG_FORMAT, read_runs
from probe.sim.replay import (ReplayConfig, planning_windows, replay_policy,
                              runtime_cost_model)
from tests.test_sim_links import bench_json

ROOT = Path(__file__).resolve().parents[1]
G, E, K, L, N = 2, 8, 2, 2, 6
CONFIG = {"model_type": "qwen3_moe", "num_layers": L, "num_experts": E, "top_k": K,
          "hidden_size": 32, "moe_intermediate_size": 16, "moe_layers": list(range(L))}


def routing(seed=0, steps=N) -> np.ndarray:
    """int [N, L, S, E]: each source rank's pairs, skewed to expert 0 (rank 0), K per token."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((steps, L, G, E), dtype=np.int64)
    p = np.array([8, 1, 1, 1, 1, 2, 1, 1], dtype=float)
    for n in range(steps):
        for layer in range(L):
            for s in range(G):
                tokens = int(rng.integers(3, 12))
                for _ in range(tokens):  # K distinct experts per token
                    counts[n, layer, s, rng.choice(E, K, replace=False, p=p / p.sum())] += 1
    return counts


def records(counts: np.ndarray, seed=1) -> list:
    """Engine step records whose `ep` is `StepStats.as_dict()`, as the runtime makes them with
    record_steps on (static pairs per rank, random phase times)."""
    rng = np.random.default_rng(seed)
    home = sharded_home(E, G)
    out = []
    for n, step in enumerate(counts):
        pairs = np.stack([static_assignment(c, home).sum(axis=(0, 1)) for c in step])  # [L, G]
        zl = np.zeros(L)
        stats = StepStats(layer_ir=imbalance_ratio(pairs), pairs_per_rank=pairs,
                          replicas_planned=np.zeros(L, np.int64),
                          replicas_arrived=np.zeros(L, np.int64),
                          fallback_pairs=np.zeros(L, np.int64),
                          bytes_prefetched_per_rank=np.zeros(G), bytes_prefetched=0.0,
                          exposed_transfer_s=0.0, planned_exposed_s=0.0, plan_seconds=0.0,
                          replicas_used=np.zeros(L, np.int64), layer_exposed_s=zl,
                          layer_plan_s=zl, layer_predict_s=zl, layer_split_s=zl,
                          replicas_resident=np.zeros(L, np.int64),
                          routing_counts=step.copy(),
                          layer_phase_s=rng.uniform(1e-4, 1e-3, (L, G, len(PHASES))))
        tokens = int(step[0, 0].sum() // K)
        out.append(StepRecord(n, tokens, tokens if n == 0 else 0, 0 if n == 0 else tokens,
                              float(rng.uniform(5e-3, 1e-2)), 3, stats.as_dict()))
    return out


def summary(policy: str, log_name: str, **extra) -> dict:
    """The fields of `python -m probe.runtime --out` that the reader and the replay use."""
    slots = {"static": (0, 0), "eplb": (2, 0), "eplb-lp": (2, 0), "probe": (0, 2),
             "probe-on-eplb": (1, 1)}[policy]
    out = {"world_size": G, "device": "cpu", "dtype": "torch.float32", "policy": policy,
           "extra_slots": 2, "resident_slots": slots[0], "per_step_slots": slots[1],
           "config": dict(CONFIG), "metrics": {}, "ranks": [],
           "args": {"replan_interval": 3, "replan_window": 2, "hardware": "h200x8",
                    "method": "greedy", "predictor": "history"},
           "step_log": log_name, "step_offset": 0}
    out.update(extra)
    return out


def write_run(folder: Path, policy: str, counts=None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_step_log(folder / f"{policy}.steps.npz", records(routing() if counts is None
                                                          else counts))
    path = folder / f"{policy}.json"
    path.write_text(json.dumps(summary(policy, f"{policy}.steps.npz", **extra), indent=2))
    return path


def test_formats_agree_between_writer_and_reader():
    assert tuple(RUNTIME_PHASES) == PHASES and FORMAT == STEP_LOG_FORMAT


def test_step_log_round_trip_folder_and_tarball(tmp_path):
    counts = routing()
    write_run(tmp_path / "rt", "static", counts)
    (tmp_path / "notes.json").write_text("{}")  # not a summary: skipped
    with tarfile.open(tmp_path / "rt_policies.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "rt", arcname="rt")
    (run,) = read_runs(tmp_path / "rt")
    (packed,) = read_runs(tmp_path)  # the script's folder: reads rt_policies.tar.gz
    assert packed.name.endswith("rt_policies.tar.gz:rt/static.json")
    for r in (run, packed):
        assert r.policy == "static" and r.log.shape == (N, L, G, E)
        np.testing.assert_array_equal(r.log.counts, counts)
        assert r.log.phase_s.shape == (N, L, G, 5) and r.log.step_s.shape == (N,)
    np.testing.assert_array_equal(run.log.layer_ir, packed.log.layer_ir)


def _rewrite_log(path: Path, **changes) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def test_malformed_step_logs_are_named(tmp_path):
    def fresh(name, **extra):
        folder = tmp_path / name
        write_run(folder, "static", **extra)
        return folder, folder / "static.steps.npz"

    folder, log = fresh("nan")
    phase = np.load(log)["phase_s"].copy()
    phase[2, 1, 0, 3] = np.nan
    _rewrite_log(log, phase_s=phase)
    with pytest.raises(ValueError, match=r"phase_s holds a non-finite value at index "
                                         r"\[2, 1, 0, 3\]"):
        read_runs(folder)
    folder, _ = fresh("ranks", world_size=4)
    with pytest.raises(ValueError, match="counts has 2 source ranks, the run 4"):
        read_runs(folder)
    folder, log = fresh("topk")
    counts = np.load(log)["counts"].copy()
    counts[1, 0, 1, 3] += 1
    _rewrite_log(log, counts=counts)
    with pytest.raises(ValueError, match="source rank 1's pairs at step 1, layer 0 .* not a "
                                         "multiple of top_k = 2"):
        read_runs(folder)
    folder, log = fresh("missing")
    _rewrite_log(log, layer_ir=None)
    with pytest.raises(ValueError, match="lacks array 'layer_ir'"):
        read_runs(folder)
    folder, log = fresh("shape")
    _rewrite_log(log, step_s=np.ones(N + 1))
    with pytest.raises(ValueError, match=r"step_s must have shape \(6,\)"):
        read_runs(folder)
    folder, log = fresh("format")
    _rewrite_log(log, format=np.array("something-else"))
    with pytest.raises(ValueError, match="'format' must be 'probe-step-log'"):
        read_runs(folder)


def test_malformed_summaries_are_named(tmp_path):
    path = write_run(tmp_path / "a", "static")
    data = json.loads(path.read_text())
    data.pop("step_log")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rerun the runtime with --step-log"):
        read_runs(tmp_path / "a")
    path = write_run(tmp_path / "b", "static")
    data = json.loads(path.read_text())
    del data["config"]["top_k"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config.top_k must be a positive int"):
        read_runs(tmp_path / "b")
    path = write_run(tmp_path / "c", "static", world_size=1)
    with pytest.raises(ValueError, match="world_size must be an int >= 2"):
        read_runs(tmp_path / "c")
    path = write_run(tmp_path / "d", "static")
    (tmp_path / "d" / "static.steps.npz").unlink()
    with pytest.raises(FileNotFoundError, match="step log 'static.steps.npz' is neither"):
        read_runs(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no runtime summary found"):
        read_runs(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="measured results not found"):
        read_runs(tmp_path / "nowhere")


def _cost():
    return runtime_cost_model(CONFIG, bytes_per_value=4, hardware="h200x8", num_ranks=G)


def test_replay_static_is_the_runtimes_static_placement():
    counts = routing()
    placed = replay_policy(counts, ReplayConfig("static"), _cost())
    home = sharded_home(E, G)
    for n in range(N):
        for layer in range(L):
            p = placed[n][layer]
            np.testing.assert_array_equal(p.assignment, static_assignment(counts[n, layer], home))
            assert p.replicas == 0 and p.solve_s == 0.0


@pytest.mark.parametrize("offset", [0, 1])
def test_replay_eplb_replans_on_the_runners_schedule(offset):
    counts = routing()
    cfg = ReplayConfig("eplb", resident_slots=2, replan_interval=3, replan_window=2,
                       step_offset=offset)
    placed = replay_policy(counts, cfg, _cost())
    want = eplb_copies(np.ones((L, E)), 2, G)  # the runtime's first layout: uniform weights
    replans = 0
    for n in range(N):
        if n > 0 and (n + offset) % 3 == 0:  # the runner's step is a multiple of the interval
            weight = counts[max(0, n - 2):n].sum(axis=2).mean(axis=0).astype(float)
            new = eplb_copies(weight, 2, G)
            replans += not np.array_equal(new, want)  # the skewed load moves copies
            want = new
        for layer in range(L):
            np.testing.assert_array_equal(placed[n][layer].copies, want[layer])
            # every source rank's pairs land only on copies, conserved
            a = placed[n][layer].assignment
            np.testing.assert_array_equal(a.sum(axis=2), counts[n, layer])
            assert not np.any(a.sum(axis=0).T[want[layer] == 0])
    assert replans >= 1


def test_replay_probe_plans_from_history_from_layer_one():
    counts = routing() * 200  # enough pairs that a replica pays for its transfer
    cfg = ReplayConfig("probe", per_step_slots=2)
    # gpt-oss-sized experts: with the tiny model's, moving a token costs more than computing it
    wide = dict(CONFIG, hidden_size=2880, moe_intermediate_size=2880)
    cost = runtime_cost_model(wide, bytes_per_value=2, hardware="h200x8", num_ranks=G)
    placed = replay_policy(counts, cfg, cost)
    home = sharded_home(E, G)
    for n in range(N):
        np.testing.assert_array_equal(placed[n][0].assignment,
                                      static_assignment(counts[n, 0], home))
        assert not placed[n][0].planned
    assert all(placed[n][1].planned for n in range(N))
    assert any(placed[n][1].replicas > 0 for n in range(1, N))  # skewed history: replicas
    for n in range(N):
        np.testing.assert_array_equal(placed[n][1].assignment.sum(axis=2), counts[n, 1])


def test_planning_windows_are_the_previous_steps_dispatch_experts_attention():
    phase = np.random.default_rng(0).uniform(size=(3, 2, G, 5))
    w = planning_windows(phase, 1e-3)
    assert w.shape == (3, 2, G)
    np.testing.assert_allclose(w[0], 1e-3)
    np.testing.assert_allclose(w[:, 0], 1e-3)
    # the runtime's window: layer 0 from its dispatch to its combine, then layer 1's attention
    np.testing.assert_allclose(w[2, 1], phase[1, 0, :, 2] + phase[1, 0, :, 3]
                               + phase[1, 1, :, 0])
    with pytest.raises(ValueError, match="policy must be one of"):
        ReplayConfig("probe-unbounded")
    with pytest.raises(ValueError, match="replan_interval must be an int >= 1"):
        ReplayConfig("eplb", replan_interval=0)


def _measured_folder(tmp_path, policies=("static", "eplb", "probe", "probe-on-eplb")):
    counts = routing()
    for policy in policies:
        write_run(tmp_path / "rt", policy, counts)
    (tmp_path / "a2a.json").write_text(json.dumps(bench_json()))
    return tmp_path


def test_sim_error_table_on_synthetic_runs(tmp_path):
    from experiments.runtime import sim_error

    measured = _measured_folder(tmp_path / "m")
    result = sim_error.main(["--measured", str(measured), "--out", str(tmp_path / "out"),
                             "--skip-steps", "1"])
    assert [r["policy"] for r in result["rows"]] == ["static", "eplb", "probe", "probe-on-eplb"]
    assert result["links"]["a2a_bandwidth"] == pytest.approx(380e9)
    run = read_runs(measured)[0]
    ph = run.log.phase_s[1:]
    moe = (ph[..., 2] + ph[..., 3] + ph[..., 4]).max(axis=2).mean()
    for row in result["rows"]:
        assert row["steps"] == N - 1 and not row["cost_model_shape_matches"]
        for variant in ("measured_links", "datasheet"):
            v = row[variant]
            assert v["moe"]["measured"] == pytest.approx(moe)
            assert v["moe"]["sim"] > 0
            assert v["moe"]["err_pct"] == pytest.approx(100 * (v["moe"]["sim"] / moe - 1))
            assert v["step"]["measured"] == pytest.approx(run.log.step_s[1:].mean())
    static = result["rows"][0]["measured_links"]
    # the fake runs measured static pairs per rank: the static replay's IR is exactly that
    assert static["ir"]["sim"] == pytest.approx(static["ir"]["measured"], abs=1e-4)
    # measured links are slower than the datasheet's: more simulated all-to-all time
    assert static["comm"]["sim"] > result["rows"][0]["datasheet"]["comm"]["sim"]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["sim_error.json", "sim_error.manifest.json", "sim_error.md"]
    md = (tmp_path / "out" / "sim_error.md").read_text()
    assert "| probe-on-eplb | 5 |" in md and "380.0 GB/s" in md
    manifest = json.loads((tmp_path / "out" / "sim_error.manifest.json").read_text())
    assert manifest["command"].startswith("python -m experiments.runtime.sim_error")


def test_sim_error_skips_eplb_lp_without_highspy(tmp_path, monkeypatch):
    from experiments.runtime import sim_error

    measured = _measured_folder(tmp_path / "m", policies=("static", "eplb-lp"))
    monkeypatch.setitem(sys.modules, "highspy", None)
    result = sim_error.main(["--measured", str(measured), "--out", str(tmp_path / "out")])
    lp = result["rows"][1]
    assert lp["policy"] == "eplb-lp" and "highspy" in lp["skipped"]
    assert "| eplb-lp | skipped:" in (tmp_path / "out" / "sim_error.md").read_text()


def test_sim_error_rejects_links_of_another_rank_count(tmp_path):
    from experiments.runtime import sim_error

    measured = _measured_folder(tmp_path / "m", policies=("static",))
    (measured / "a2a.json").write_text(json.dumps(bench_json(world=4)))
    with pytest.raises(ValueError, match="links were measured at 4 ranks"):
        sim_error.main(["--measured", str(measured), "--out", str(tmp_path / "out")])


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_runtime_step_logs_replayed_end_to_end(tmp_path):
    """What device_multigpu.sh does, on 2 CPU ranks (gloo) and a tiny model: link bench,
    runtime runs with --step-log packed in rt_policies.tar.gz, then the error table. The static
    and EPLB replays place tokens as the runtime did: the same IR at every step and layer."""
    rt = tmp_path / "rt"
    rt.mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "qwen3_moe", "vocab_size": 80, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "intermediate_size": 32,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 256,
        "tie_word_embeddings": False}))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    bench = subprocess.run(run + ["-m", "experiments.comm.a2a_bench", "--device", "cpu",
                                  "--tokens", "16,1024", "--models", "gpt-oss-120b",
                                  "--p2p-mb", "1,16", "--iters", "2", "--repeats", "1",
                                  "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, env=_env())
    assert bench.returncode == 0, bench.stderr[-3000:]
    for policy in ("static", "eplb", "probe-on-eplb"):
        proc = subprocess.run(run + [
            "-m", "probe.runtime", "--random-config", str(config), "--device", "cpu",
            "--requests", "3", "--prompt-len", "12", "--max-new-tokens", "4",
            "--policy", policy, "--extra-slots", "2", "--replan-interval", "3",
            "--replan-window", "2", "--warmup-steps", "1", "--timeout", "60", "--quiet",
            "--out", str(rt / f"{policy}.json"), "--step-log", str(rt / f"{policy}.steps.npz")],
            capture_output=True, text=True, timeout=600, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(tmp_path / "rt_policies.tar.gz", "w:gz") as tar:
        tar.add(rt, arcname="rt")
    for p in rt.iterdir():
        p.unlink()
    rt.rmdir()
    with tarfile.open(tmp_path / "rt_policies.tar.gz") as tar:
        summary = json.loads(tar.extractfile("rt/eplb.json").read())
    assert summary["step_log"] == "eplb.steps.npz" and summary["step_offset"] > 0
    assert summary["args"]["policy"] == "eplb"
    from experiments.runtime import sim_error

    result = sim_error.main(["--measured", str(tmp_path), "--out", str(tmp_path / "out")])
    assert [r["policy"] for r in result["rows"]] == ["static", "eplb", "probe-on-eplb"]
    assert result["links"]["comm"] == "gloo"
    runs = {r.policy: r for r in read_runs(tmp_path)}
    cost = runtime_cost_model(runs["eplb"].summary["config"], bytes_per_value=4,
                              hardware="h200x8", num_ranks=2)
    for policy in ("static", "eplb"):
        r = runs[policy]
        s = r.summary
        cfg = ReplayConfig(policy, resident_slots=s["resident_slots"],
                           replan_interval=3, replan_window=2, step_offset=s["step_offset"])
        placed = replay_policy(r.log.counts, cfg, cost)
        ir = np.array([[imbalance_ratio(p.assignment.sum(axis=(0, 1))[None])[0] for p in row]
                       for row in placed])
        np.testing.assert_allclose(ir, r.log.layer_ir, atol=1e-4)  # the log rounds to 4 places
        pairs = np.array([[p.assignment.sum(axis=(0, 1)) for p in row] for row in placed])
        np.testing.assert_array_equal(pairs, r.log.pairs_per_rank)
    assert (tmp_path / "out" / "sim_error.md").read_text().count("| eplb |") == 1


def test_sim_error_reads_a_links_file_of_calibrate_links(tmp_path):
    from experiments.runtime import sim_error
    from probe.sim.links import fit_links

    measured = _measured_folder(tmp_path / "m", policies=("static",))
    (measured / "a2a.json").unlink()
    table = sim_error.main(["--measured", str(measured), "--out", str(tmp_path / "a")])
    assert table["links"] is None and "measured_links" not in table["rows"][0]
    links = fit_links(bench_json()).save(tmp_path / "links.json")
    table = sim_error.main(["--measured", str(measured), "--links", str(links),
                            "--out", str(tmp_path / "b")])
    assert table["links"]["a2a_latency_s"] == pytest.approx(12e-6)
    row = table["rows"][0]
    assert row["measured_links"]["comm"]["sim"] > row["datasheet"]["comm"]["sim"]
