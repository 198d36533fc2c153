"""probe.sim.links: link figures fitted to a2a_bench's output, and `probe calibrate-links`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from probe.sim.costs import FairCosts
from probe.sim.links import LinkCalibration, fit_links, load_links, read_a2a
from probe.specs import load_spec, resolve_hardware

ROOT = Path(__file__).resolve().parents[1]
A2A_LAT, A2A_BW = 12e-6, 380e9
P2P_LAT, P2P_BW = 8e-6, 410e9


def bench_json(world=2, tokens=(128, 512, 1024, 8192), mbs=(4, 16, 64, 256)) -> dict:
    """a2a.json as experiments/comm/a2a_bench.py writes it (its keys and arithmetic), with
    times from known latency + bytes / bandwidth lines."""
    rows = []
    for model, hidden, top_k in (("gpt-oss-120b", 2880, 4), ("qwen3-235b-a22b", 4096, 8)):
        for t in tokens:
            per_peer = t * top_k // world
            leaving = per_peer * (world - 1) * hidden * 2
            us = 1e6 * (A2A_LAT + leaving / A2A_BW)
            rows.append({"kind": "all_to_all", "model": model, "G": world, "T": t, "K": top_k,
                         "D": hidden, "bytes_out_per_rank": leaving, "measured_us": us,
                         "GBps_out": leaving / us / 1e3, "cost_model_us": 1.0})
    for mb in mbs:
        us = 1e6 * (P2P_LAT + mb * 2**20 / P2P_BW)
        rows.append({"kind": "p2p", "G": world, "MB": mb, "measured_us": us,
                     "GBps": mb * 2**20 / us / 1e3, "preset_GBps": 450.0})
    meta = {"device": "NVIDIA H200", "world": world, "torch": "2.11", "comm": "NCCL 2.27",
            "args": {"iters": 50}, "out": "out"}
    return {"meta": meta, "rows": rows}


def write(tmp_path, data, name="a2a.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=1))
    return path


def test_fit_recovers_latency_and_bandwidth(tmp_path):
    links = fit_links(write(tmp_path, bench_json()))
    assert links.num_ranks == 2 and links.device == "NVIDIA H200" and links.a2a_points == 8
    assert math.isclose(links.a2a_latency_s, A2A_LAT, rel_tol=1e-6)
    assert math.isclose(links.a2a_bandwidth, A2A_BW, rel_tol=1e-9)
    assert math.isclose(links.p2p_latency_s, P2P_LAT, rel_tol=1e-6)
    assert math.isclose(links.p2p_bandwidth, P2P_BW, rel_tol=1e-9)
    assert links.a2a_max_rel_residual < 1e-9 and links.p2p_points == 4


def test_negative_intercept_refits_through_origin():
    data = bench_json()
    for r in data["rows"]:  # a line with a negative intercept: t = bytes / bw - 1 us (> 0)
        if r["kind"] == "all_to_all":
            r["measured_us"] = 1e6 * (r["bytes_out_per_rank"] / A2A_BW) - 1.0
    links = fit_links(data)
    assert links.a2a_latency_s == 0.0
    x = np.array([r["bytes_out_per_rank"] for r in data["rows"] if r["kind"] == "all_to_all"])
    t = np.array([r["measured_us"] for r in data["rows"] if r["kind"] == "all_to_all"]) * 1e-6
    assert math.isclose(links.a2a_bandwidth, 1 / (x @ t / (x @ x)), rel_tol=1e-12)


def test_overrides_price_the_simulators_all_to_all(tmp_path):
    links = fit_links(write(tmp_path, bench_json()))
    costs = FairCosts.for_model("gpt-oss-120b", 2, **links.fair_overrides())
    assignment = np.zeros((2, 128, 2), dtype=np.int64)  # [S, E, G]
    assignment[0, 0, 1] = 1000  # rank 0 sends 1000 pairs to rank 1
    dispatch, combine = costs.a2a_seconds(assignment)
    expected = A2A_LAT + 1000 * 2880 * 2 / A2A_BW
    assert math.isclose(dispatch, expected, rel_tol=1e-6) and dispatch == combine
    assert math.isclose(costs.expert_transfer_s, costs.expert_bytes / P2P_BW, rel_tol=1e-9)


def test_hardware_preset_and_round_trip(tmp_path):
    links = fit_links(write(tmp_path, bench_json()))
    spec = links.hardware("h200x8")
    assert spec.num_ranks == 2 and spec.intra_node_bw == links.p2p_bandwidth
    assert spec.peak_flops == resolve_hardware("h200x8").peak_flops
    assert "links measured" in spec.source and "NVIDIA H200" in spec.source
    assert load_links(links.save(tmp_path / "links.json")) == links


def test_calibrate_links_cli(tmp_path):
    from probe.sim.cli import register

    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app)
    src = write(tmp_path, bench_json())
    res = CliRunner().invoke(app, ["calibrate-links", str(src), "--out", str(tmp_path / "cal")])
    assert res.exit_code == 0, res.output
    spec = load_spec(tmp_path / "cal" / "hardware.json")
    assert spec.intra_node_bw == pytest.approx(P2P_BW)
    assert resolve_hardware(str(tmp_path / "cal" / "hardware.json")) == spec
    assert load_links(tmp_path / "cal" / "links.json").a2a_bandwidth == pytest.approx(A2A_BW)
    bad = dict(bench_json(), rows=bench_json()["rows"][:1])
    res = CliRunner().invoke(app, ["calibrate-links", str(write(tmp_path, bad, "bad.json")),
                                   "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "two distinct sizes" in res.output


def _mutated(change) -> dict:
    data = bench_json()
    change(data)
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["rows"][0].pop("measured_us"), "rows[0] (all_to_all) lacks field 'measured_us'"),
    (lambda d: d["rows"][2].update(measured_us=float("nan")), "rows[2].measured_us must be finite"),
    (lambda d: d["rows"][1].update(bytes_out_per_rank=-4), "bytes_out_per_rank must be > 0"),
    (lambda d: d["rows"][3].update(G=4), "rows[3].G is 4 but meta.world is 2"),
    (lambda d: d["rows"][9].update(MB="16"), "rows[9].MB must be a number"),
    (lambda d: d["meta"].update(world=1), "meta.world must be an int >= 2"),
    (lambda d: d["rows"].append({"kind": "bcast"}), "kind must be 'all_to_all' or 'p2p'"),
    (lambda d: d.pop("rows"), "expected an object with 'meta'"),
])
def test_malformed_a2a_is_named(change, message):
    with pytest.raises(ValueError, match=None) as err:
        read_a2a(_mutated(change))
    assert message in str(err.value)


def test_unfittable_rows():
    same = _mutated(lambda d: [r.update(bytes_out_per_rank=1000) for r in d["rows"]
                               if r["kind"] == "all_to_all"])
    with pytest.raises(ValueError, match="at least two distinct sizes"):
        fit_links(same)

    def falling(d):
        for r in d["rows"]:
            if r["kind"] == "all_to_all":
                r["measured_us"] = 1e9 / r["bytes_out_per_rank"]
    with pytest.raises(ValueError, match="does not grow with bytes"):
        fit_links(_mutated(falling))
    with pytest.raises(FileNotFoundError, match="a2a_bench.py"):
        fit_links("/nonexistent/a2a.json")


def test_load_links_errors(tmp_path):
    links = fit_links(bench_json())
    payload = links.to_json()
    payload.pop("p2p_bandwidth")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['p2p_bandwidth'\]"):
        load_links(write(tmp_path, payload, "l.json"))
    payload = dict(links.to_json(), a2a_bandwidth=float("nan"))
    with pytest.raises(ValueError, match="a2a_bandwidth must be finite"):
        load_links(write(tmp_path, payload, "l.json"))
    with pytest.raises(ValueError, match="'kind' must be 'probe-links'"):
        load_links(write(tmp_path, bench_json(), "l.json"))
    assert isinstance(links, LinkCalibration)


@pytest.mark.slow
def test_fit_on_the_bench_run_with_gloo(tmp_path):
    """The real bench's file (2 CPU ranks, gloo) fits: sizes 64x apart grow the time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "experiments.comm.a2a_bench", "--device", "cpu", "--tokens", "16,1024",
           "--models", "gpt-oss-120b", "--p2p-mb", "1,64", "--iters", "3", "--repeats", "1",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    links = fit_links(tmp_path / "a2a.json")
    assert links.num_ranks == 2 and links.comm == "gloo" and links.a2a_points == 2
    assert links.a2a_bandwidth > 0 and links.a2a_latency_s >= 0 and links.p2p_bandwidth > 0
