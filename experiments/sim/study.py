"""The paper-style evaluation in simulation: writes CSV, JSON, Markdown tables and plots.

    python -m experiments.sim.study --out results/sim            # everything
    python -m experiments.sim.study --out results/sim --only decode,shift

Experiments (ep = 8 on h200x8 with the measured H200 calibration unless said otherwise):
  prefill     prefill latency vs total input tokens, chunks of 8K and 16K tokens per rank,
              static vs PROBE vs oracle (synthetic "prefill" workload);
  decode      decode throughput at per-rank batch 512/768/1024/1536 on the decode, shift and
              repeat workloads, static vs EPLB vs PROBE vs oracle;
  shift       the semantic-shift run (code -> chinese at step 200 of 400), throughput over steps;
  predictor   PROBE under other prediction-error models (decode b=768, shift workload);
  scale       ep = 8 .. 128 (gpt-oss-120b, calibrated) and 8 .. 256 (deepseek-v3, datasheet),
              h200x8-nN presets: gain, planner time, exposed transfer with an unbounded window;
  smallmodel  any data/recorded/smallmodel/*.trace.safetensors (real small-model traces);
  plots       figures from the JSON written by prefill, decode and scale;
  headline    the paper's targets against our numbers (from the JSON above);
  ablation    PROBE/EPLB in decode with half the attention time, a slower effective NVLink,
              both, and no attention (why decode falls short of the paper's 1.26x).
Traces keep few layers (the trace's layers stand for all the model's layers: step time = mean
layer time x model layers) and few steps, so that everything runs in minutes on 2 CPU cores.
Each experiment NAME writes NAME.md, NAME.json (and its CSV/PNG files) and NAME.manifest.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from experiments.manifest import Manifest
from probe.planner.greedy_rules import GreedyRules
from probe.sim.attention import AttentionModel
from probe.sim.calibration import calibrated_attention, calibrated_hardware, has_calibration
from probe.sim.engine import simulate
from probe.sim.report import plot_result, write_csv
from probe.specs import hardware_preset, model_preset
from probe.traces import generate

PAPER_MODELS = ("gpt-oss-120b", "qwen3-235b-a22b")
SEED = 0
RECORDED = Path("data/recorded/smallmodel")  # the small model's recorded traces


def _setup(model_name: str, hw_name: str = "h200x8"):
    model = model_preset(model_name)
    if hw_name.startswith("h200") and has_calibration(model_name):
        return model, calibrated_hardware(hw_name, model_name), calibrated_attention(model_name)
    hw = hardware_preset(hw_name)
    return model, hw, AttentionModel.roofline(model, hw)


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_prefill(out: Path, layers: int, log) -> dict:
    rows, data = [], {}
    for name in PAPER_MODELS:
        model, hw, att = _setup(name)
        for chunk in (8192, 16384):
            steps = 8 if chunk == 8192 else 4
            trace = generate("prefill", num_steps=steps, tokens_per_step=8 * chunk,
                             num_layers=layers, num_experts=model.num_experts, top_k=model.top_k,
                             num_ranks=8, seed=SEED)
            t0 = time.perf_counter()
            res = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                           policies=("static", "probe", "oracle"))
            log(f"prefill {name} chunk {chunk}: {time.perf_counter() - t0:.1f} s")
            write_csv(res, out / f"prefill_{name}_c{chunk}.csv")
            for total in (8 * chunk * k for k in (1, 2, 4) if 8 * chunk * k <= 8 * 8192 * 8):
                lat = {p: res.prefill_latency(p, total) for p in res.policies}
                ir = {p: float(res.metrics[p]["imbalance"][: total // (8 * chunk)].mean())
                      for p in res.policies}
                rows.append([name, f"{chunk // 1024}K", f"{total // 1024}K",
                             f"{lat['static'] * 1e3:.1f}", f"{lat['probe'] * 1e3:.1f}",
                             f"{lat['oracle'] * 1e3:.1f}",
                             f"{lat['static'] / lat['probe']:.3f}",
                             f"{ir['static']:.2f}", f"{ir['probe']:.2f}"])
                data[f"{name}/c{chunk}/{total}"] = {"latency_s": lat, "ir": ir}
    table = _md_table(["model", "chunk/rank", "total tokens", "static ms", "PROBE ms",
                       "oracle ms", "speed-up vs static", "IR static", "IR PROBE"], rows)
    return {"table": table, "data": data}


def run_decode(out: Path, layers: int, steps: int, log) -> dict:
    rows, data = [], {}
    warm = steps // 3
    for name in PAPER_MODELS:
        model, hw, att = _setup(name)
        for workload in ("decode", "shift", "repeat"):
            for batch in (512, 768, 1024, 1536):
                knobs = {"shift_step": steps // 2} if workload == "shift" else {}
                trace = generate(workload, num_steps=steps, tokens_per_step=8 * batch,
                                 num_layers=layers, num_experts=model.num_experts,
                                 top_k=model.top_k, num_ranks=8, seed=SEED, **knobs)
                t0 = time.perf_counter()
                res = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                               policies=("static", "eplb", "probe", "oracle"),
                               eplb_interval=warm, eplb_window=warm)
                log(f"decode {name} {workload} b={batch}: {time.perf_counter() - t0:.1f} s")
                s = {p: res.summary(p) for p in res.policies}
                after = {p: res.summary(p, slice(warm, None)) for p in res.policies}
                thr = {p: s[p]["throughput_tok_s"] for p in s}
                thr_after = {p: after[p]["throughput_tok_s"] for p in s}
                rows.append([name, workload, batch,
                             f"{thr['static'] / 1e3:.1f}", f"{thr['eplb'] / 1e3:.1f}",
                             f"{thr['probe'] / 1e3:.1f}", f"{thr['oracle'] / 1e3:.1f}",
                             f"{thr['probe'] / thr['eplb']:.3f}",
                             f"{thr_after['probe'] / thr_after['eplb']:.3f}",
                             f"{thr['probe'] / thr['static']:.3f}",
                             f"{s['static']['ir_mean']:.2f}", f"{s['eplb']['ir_mean']:.2f}",
                             f"{s['probe']['ir_mean']:.2f}",
                             f"{s['probe']['attention_us']:.0f}", f"{s['static']['moe_us']:.0f}",
                             f"{s['probe']['moe_us']:.0f}"])
                data[f"{name}/{workload}/{batch}"] = {"all": s, "after_warmup": after}
    table = _md_table(["model", "workload", "batch/rank", "static k tok/s", "EPLB k tok/s",
                       "PROBE k tok/s", "oracle k tok/s", "PROBE/EPLB",
                       f"PROBE/EPLB steps>={warm}", "PROBE/static", "IR static", "IR EPLB",
                       "IR PROBE", "attn us", "MoE us static", "MoE us PROBE"], rows)
    return {"table": table, "data": data, "eplb_interval": warm}


def run_shift(out: Path, layers: int, log) -> dict:
    rows, data = [], {}
    for name in PAPER_MODELS:
        model, hw, att = _setup(name)
        trace = generate("shift", num_steps=400, tokens_per_step=8 * 768, num_layers=layers,
                         num_experts=model.num_experts, top_k=model.top_k, num_ranks=8,
                         seed=SEED, shift_step=200)
        t0 = time.perf_counter()
        res = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                       policies=("static", "eplb", "probe", "oracle"), eplb_interval=100,
                       eplb_window=100)
        log(f"shift {name}: {time.perf_counter() - t0:.1f} s")
        write_csv(res, out / f"shift_{name}.csv")
        plot_result(res, out, prefix=f"shift_{name}")
        for label, sel in (("0-99", slice(0, 100)), ("100-199", slice(100, 200)),
                           ("200-299", slice(200, 300)), ("300-399", slice(300, 400))):
            s = {p: res.summary(p, sel) for p in res.policies}
            rows.append([name, label] + [f"{s[p]['throughput_tok_s'] / 1e3:.1f}"
                                         for p in res.policies]
                        + [f"{s['probe']['throughput_tok_s'] / s['eplb']['throughput_tok_s']:.3f}",
                           f"{s['eplb']['ir_mean']:.2f}", f"{s['probe']['ir_mean']:.2f}"])
            data[f"{name}/{label}"] = s
    table = _md_table(["model", "steps", *[f"{p} k tok/s" for p in
                                           ("static", "eplb", "probe", "oracle")],
                       "PROBE/EPLB", "IR EPLB", "IR PROBE"], rows)
    return {"table": table, "data": data}


def run_predictor(out: Path, layers: int, log) -> dict:
    rows, data = [], {}
    name = "gpt-oss-120b"
    model, hw, att = _setup(name)
    trace = generate("shift", num_steps=120, tokens_per_step=8 * 768, num_layers=layers,
                     num_experts=model.num_experts, top_k=model.top_k, num_ranks=8, seed=SEED,
                     shift_step=60)
    base = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                    policies=("static", "oracle"))
    for spec in ("perfect", "topk:0.94", "topk:0.9", "topk:0.87", "topk:0.75", "previous",
                 "noise:0.3"):
        t0 = time.perf_counter()
        res = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                       policies=("probe",), predictor=spec, seed=1)
        log(f"predictor {spec}: {time.perf_counter() - t0:.1f} s")
        s = res.summary("probe")
        rows.append([spec, f"{s['throughput_tok_s'] / 1e3:.1f}",
                     f"{s['throughput_tok_s'] / base.summary('static')['throughput_tok_s']:.3f}",
                     f"{s['ir_mean']:.3f}", f"{s['ir_p95']:.3f}", f"{s['moe_us']:.0f}"])
        data[spec] = s
    so, st = base.summary("oracle"), base.summary("static")
    rows.append(["(static)", f"{st['throughput_tok_s'] / 1e3:.1f}", "1.000",
                 f"{st['ir_mean']:.3f}", f"{st['ir_p95']:.3f}", f"{st['moe_us']:.0f}"])
    rows.append(["(oracle)", f"{so['throughput_tok_s'] / 1e3:.1f}",
                 f"{so['throughput_tok_s'] / st['throughput_tok_s']:.3f}",
                 f"{so['ir_mean']:.3f}", f"{so['ir_p95']:.3f}", f"{so['moe_us']:.0f}"])
    table = _md_table(["predictor", "PROBE k tok/s", "vs static", "IR mean", "IR p95",
                       "MoE us"], rows)
    return {"table": table, "data": data}


def _kernel_ms(load: np.ndarray, model, hw, k_max: int, repeats: int = 5) -> float:
    """Median ms of the greedy kernel alone (probe.planner.greedy.greedy_arrays: compact
    output, no dense [S, E, G] Plan) on one layer's load, window = static compute + attention."""
    from probe.planner import BalanceProblem, CostModel, GreedyRules
    from probe.planner.greedy import _kernel_args, greedy_arrays

    cost = CostModel.from_specs(model, hw)
    problem = BalanceProblem.from_load(load, cost, slots=3, attention_time=1e-3)
    args = _kernel_args(problem, GreedyRules(k_max=k_max))
    greedy_arrays(*args)  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        greedy_arrays(*args)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def run_scale(out: Path, log, quick: bool) -> dict:
    rows, data = [], {}
    configs = [("gpt-oss-120b", (8, 16, 32, 64, 128)), ("deepseek-v3", (8, 16, 32, 64, 128, 256))]
    if quick:
        configs = [("gpt-oss-120b", (8, 16))]
    for name, eps in configs:
        for ep in eps:
            nodes = ep // 8
            hw_name = "h200x8" if nodes == 1 else f"h200x8-n{nodes}"
            model, hw, att = _setup(name, hw_name)
            steps = 4 if ep <= 64 else 2
            trace = generate("decode", num_steps=steps, tokens_per_step=ep * 512, num_layers=2,
                             num_experts=model.num_experts, top_k=model.top_k, num_ranks=ep,
                             seed=SEED)
            t0 = time.perf_counter()
            res = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                           policies=("static", "probe", "probe-unbounded", "oracle"))
            unlimited = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                                 policies=("probe",),
                                 planner_options={"rules": GreedyRules(k_max=0)})
            log(f"scale {name} ep={ep}: {time.perf_counter() - t0:.1f} s")
            s = {p: res.summary(p) for p in res.policies}
            s["probe k_max=inf"] = unlimited.summary("probe")
            thr_inf = s["probe k_max=inf"]["throughput_tok_s"]
            first = trace.load_counts([0])[0, 0]
            kernel = {k: _kernel_ms(first, model, hw.with_ranks(ep) if hw.num_ranks != ep
                                    else hw, k) for k in (16, 0)}
            s["kernel_ms"] = {"k_max=16": kernel[16], "k_max=inf": kernel[0]}
            thr = {p: s[p]["throughput_tok_s"] for p in res.policies}
            rows.append([name, ep, hw_name, f"{s['static']['ir_mean']:.2f}",
                         f"{s['probe']['ir_mean']:.2f}", f"{s['probe-unbounded']['ir_mean']:.2f}",
                         f"{thr['probe'] / thr['static']:.3f}",
                         f"{thr['probe-unbounded'] / thr['static']:.3f}",
                         f"{s['probe k_max=inf']['ir_mean']:.2f}",
                         f"{thr_inf / thr['static']:.3f}",
                         f"{s['probe']['replicas'] / ep:.2f}",
                         f"{s['probe-unbounded']['exposed_us']:.0f}",
                         f"{kernel[16]:.2f}", f"{kernel[0]:.2f}",
                         f"{s['probe']['planner_ms']:.1f}",
                         f"{s['static']['moe_us']:.0f}", f"{s['probe']['attention_us']:.0f}"])
            data[f"{name}/{ep}"] = s
    table = _md_table(["model", "ep", "hardware", "IR static", "IR PROBE", "IR unbounded",
                       "PROBE/static", "unbounded/static", "IR k_max=inf",
                       "k_max=inf/static", "replicas/rank/layer", "unbounded exposed us",
                       "kernel ms k_max=16", "kernel ms k_max=inf", "solve() ms/layer",
                       "MoE us static", "attn us"],
                      rows)
    return {"table": table, "data": data}


def run_smallmodel(out: Path, log) -> dict:
    """Real routing recorded from the small Qwen3-MoE model (data/recorded/smallmodel), costed as if
    its experts had GPT-OSS-120B's shape (the small model's own experts are too small to say
    anything about an H200), with GPT-OSS's measured H200 numbers, at the trace's ep."""
    from probe.specs import ModelSpec
    from probe.traces.trace import RoutingTrace

    files = sorted(RECORDED.glob("*.trace.safetensors"))
    rows, data = [], {}
    base = model_preset("gpt-oss-120b")
    hw = calibrated_hardware("h200x8", "gpt-oss-120b")
    att = calibrated_attention("gpt-oss-120b")
    for path in files:
        trace = RoutingTrace.load(path)
        model = ModelSpec(f"smallmodel-routing@{base.name}-shape", num_layers=base.num_layers,
                          num_experts=trace.num_experts, top_k=trace.top_k, hidden=base.hidden,
                          expert_ffn=base.expert_ffn)
        every = max(1, trace.num_steps // 4)
        t0 = time.perf_counter()
        res = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                       policies=("static", "eplb", "probe", "oracle"), eplb_interval=every,
                       eplb_window=every)
        s = {p: res.summary(p) for p in res.policies}
        for spec in ("topk:0.69", "previous"):
            other = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                             policies=("probe",), predictor=spec, seed=1)
            s[f"probe {spec}"] = other.summary("probe")
            if path.name.startswith("decode"):
                plot_result(res, out, prefix=f"smallmodel_{path.name.split('.')[0]}")
        log(f"smallmodel {path.name}: {time.perf_counter() - t0:.1f} s")
        st = s["static"]["step_time_ms"]
        rows.append([path.name, trace.num_steps, int(trace.tokens_per_step[0] // trace.num_ranks),
                     trace.num_ranks, *[f"{s[p]['ir_mean']:.2f}" for p in
                                        ("static", "eplb", "probe", "oracle")],
                     f"{st / s['probe']['step_time_ms']:.3f}",
                     f"{s['eplb']['step_time_ms'] / s['probe']['step_time_ms']:.3f}",
                     f"{st / s['oracle']['step_time_ms']:.3f}",
                     f"{st / s['probe topk:0.69']['step_time_ms']:.3f}",
                     f"{st / s['probe previous']['step_time_ms']:.3f}"])
        data[path.name] = s
    table = _md_table(["trace", "steps", "tokens/rank", "ep", "IR static", "IR EPLB",
                       "IR PROBE", "IR oracle", "PROBE speed-up vs static",
                       "PROBE vs EPLB", "oracle vs static", "PROBE topk:0.69 vs static",
                       "PROBE previous-step vs static"], rows) \
        if rows else f"(no {RECORDED}/*.trace.safetensors found)"
    return {"table": table, "data": data}


def run_ablation(out: Path, layers: int, log) -> dict:
    """Why decode falls short of the paper's 1.26x over EPLB: PROBE/EPLB under declared
    variations of the two things balancing cannot touch or that our model idealises."""
    import dataclasses

    rows, data = [], {}
    for name in PAPER_MODELS:
        model, hw, att = _setup(name)
        half = AttentionModel(decode=tuple((b, t / 2) for b, t in att.decode),
                              prefill=tuple((c, t / 2) for c, t in att.prefill),
                              kv_len=att.kv_len, source=att.source + " x 0.5")
        slow = dataclasses.replace(hw, intra_node_bw=150e9,
                                   source=hw.source + "; NVLink 150 GB/s effective")
        for workload in ("shift", "repeat"):
            knobs = {"shift_step": 150} if workload == "shift" else {}
            trace = generate(workload, num_steps=300, tokens_per_step=8 * 768,
                             num_layers=layers, num_experts=model.num_experts,
                             top_k=model.top_k, num_ranks=8, seed=SEED, **knobs)
            variants = (("as measured", hw, att), ("attention x 0.5", hw, half),
                        ("NVLink 150 GB/s", slow, att), ("both", slow, half),
                        ("MoE only (no attention)", hw, AttentionModel.zero()))
            for label, hw_v, att_v in variants:
                t0 = time.perf_counter()
                res = simulate(trace, model=model, hardware=hw_v, attention=att_v,
                               progress=False, policies=("static", "eplb", "probe"),
                               eplb_interval=100, eplb_window=100)
                log(f"ablation {name} {workload} {label}: {time.perf_counter() - t0:.1f} s")
                s = {p: res.summary(p) for p in res.policies}
                after = {p: res.summary(p, slice(100, None)) for p in res.policies}
                thr = {p: s[p]["throughput_tok_s"] for p in s}
                thr_after = {p: after[p]["throughput_tok_s"] for p in after}
                rows.append([name, workload, label, f"{thr['probe'] / thr['eplb']:.3f}",
                             f"{thr_after['probe'] / thr_after['eplb']:.3f}",
                             f"{thr['probe'] / thr['static']:.3f}"])
                data[f"{name}/{workload}/{label}"] = {"all": s, "after_warmup": after}
    table = _md_table(["model", "workload (b=768)", "variant", "PROBE/EPLB",
                       "PROBE/EPLB steps>=100", "PROBE/static"], rows)
    return {"table": table, "data": data}


def run_headline(out: Path, log) -> dict:
    """The paper's targets against our numbers, from prefill.json / decode.json / shift.json."""
    rows = []
    path = out / "prefill.json"
    if path.exists():
        data = json.loads(path.read_text())["data"]
        for name in PAPER_MODELS:
            sp = [v["latency_s"]["static"] / v["latency_s"]["probe"]
                  for k, v in data.items() if k.startswith(name + "/")]
            ir = [v["ir"]["probe"] for k, v in data.items() if k.startswith(name + "/")]
            rows.append([name, "prefill: static latency / PROBE latency", ">= 1.32",
                         f"{min(sp):.2f} .. {max(sp):.2f}", "yes" if max(sp) >= 1.32 else "no"])
            rows.append([name, "prefill: IR after PROBE", "<= 1.10",
                         f"{min(ir):.2f} .. {max(ir):.2f}", "yes" if max(ir) <= 1.10 else "no"])
    path = out / "decode.json"
    if path.exists():
        data = json.loads(path.read_text())["data"]
        for name in PAPER_MODELS:
            for workload in ("shift", "repeat", "decode"):
                keys = [k for k in data if k.startswith(f"{name}/{workload}/")]
                if not keys:
                    continue
                thr = [data[k]["all"]["probe"]["throughput_tok_s"]
                       / data[k]["all"]["eplb"]["throughput_tok_s"] for k in keys]
                warm = [data[k]["after_warmup"]["probe"]["throughput_tok_s"]
                        / data[k]["after_warmup"]["eplb"]["throughput_tok_s"] for k in keys]
                moe = [data[k]["all"]["eplb"]["moe_us"] / data[k]["all"]["probe"]["moe_us"]
                       for k in keys]
                ir = [data[k]["all"]["probe"]["ir_mean"] for k in keys]
                target = ">= 1.26" if workload != "decode" else "(no target)"
                met = ("yes" if max(thr) >= 1.26 else "no") if workload != "decode" else "-"
                rows.append([name, f"decode {workload}: PROBE / EPLB throughput (all steps)",
                             target, f"{min(thr):.2f} .. {max(thr):.2f}", met])
                rows.append([name, f"decode {workload}: same, after EPLB's first rebalance",
                             target, f"{min(warm):.2f} .. {max(warm):.2f}",
                             ("yes" if max(warm) >= 1.26 else "no")
                             if workload != "decode" else "-"])
                rows.append([name, f"decode {workload}: EPLB MoE time / PROBE MoE time",
                             "(MoE part only)", f"{min(moe):.2f} .. {max(moe):.2f}", "-"])
                rows.append([name, f"decode {workload}: IR after PROBE (mean)", "<= 1.10",
                             f"{min(ir):.2f} .. {max(ir):.2f}",
                             "yes" if max(ir) <= 1.10 else "no"])
    table = _md_table(["model", "metric", "paper / target", "ours (range over sizes)", "met"],
                      rows)
    return {"table": table, "data": rows}


def run_plots(out: Path, log) -> dict:
    """Figures from the JSON the other experiments wrote (prefill, decode, scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    path = out / "prefill.json"
    if path.exists():
        data = json.loads(path.read_text())["data"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, name in zip(axes, PAPER_MODELS, strict=True):
            for chunk, style in ((8192, "-"), (16384, "--")):
                keys = sorted((int(k.split("/")[2]), k) for k in data
                              if k.startswith(f"{name}/c{chunk}/"))
                xs = [t / 1024 for t, _ in keys]
                for policy in ("static", "probe", "oracle"):
                    ys = [data[k]["latency_s"][policy] * 1e3 for _, k in keys]
                    ax.plot(xs, ys, style, marker="o", label=f"{policy} {chunk // 1024}K/rank")
            ax.set_title(name)
            ax.set_xlabel("total input tokens (K)")
            ax.set_ylabel("prefill latency (ms)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "prefill_latency.png", dpi=110)
        plt.close(fig)
        written.append("prefill_latency.png")
    path = out / "decode.json"
    if path.exists():
        data = json.loads(path.read_text())["data"]
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        for i, name in enumerate(PAPER_MODELS):
            for j, workload in enumerate(("decode", "shift", "repeat")):
                ax = axes[i, j]
                batches = sorted(int(k.split("/")[2]) for k in data
                                 if k.startswith(f"{name}/{workload}/"))
                for policy in ("static", "eplb", "probe", "oracle"):
                    ys = [data[f"{name}/{workload}/{b}"]["all"][policy]["throughput_tok_s"] / 1e3
                          for b in batches]
                    ax.plot(batches, ys, marker="o", label=policy)
                ax.set_title(f"{name}, {workload}", fontsize=9)
                ax.set_xlabel("per-rank batch")
                ax.set_ylabel("k tok/s")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "decode_throughput.png", dpi=110)
        plt.close(fig)
        written.append("decode_throughput.png")
    path = out / "scale.json"
    if path.exists():
        data = json.loads(path.read_text())["data"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in ("gpt-oss-120b", "deepseek-v3"):
            eps = sorted(int(k.split("/")[1]) for k in data if k.startswith(f"{name}/"))
            if not eps:
                continue
            for policy, style in (("probe", "-"), ("probe k_max=inf", ":"),
                                  ("probe-unbounded", "--")):
                gain = [data[f"{name}/{ep}"][policy]["throughput_tok_s"]
                        / data[f"{name}/{ep}"]["static"]["throughput_tok_s"] for ep in eps]
                axes[0].plot(eps, gain, style, marker="o", label=f"{name} {policy}")
            for key, style in (("k_max=16", "-"), ("k_max=inf", ":")):
                axes[1].plot(eps, [data[f"{name}/{ep}"]["kernel_ms"][key] for ep in eps], style,
                             marker="o", label=f"{name} {key}")
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("ep")
        axes[0].set_ylabel("throughput / static")
        axes[0].legend(fontsize=7)
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("ep")
        axes[1].set_ylabel("greedy kernel ms per layer (1 CPU core, Numba)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=110)
        plt.close(fig)
        written.append("scale.png")
    log(f"plots: {written}")
    return {"table": "\n".join(f"![{w}]({w})" for w in written), "data": written}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/sim")
    parser.add_argument("--only",
                        default="prefill,decode,shift,predictor,scale,smallmodel,plots,"
                                "headline")
    parser.add_argument("--layers", type=int, default=8, help="MoE layers per trace")
    parser.add_argument("--decode-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    run = Manifest.start("experiments.sim.study", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    layers = 2 if args.quick else args.layers
    decode_steps = 12 if args.quick else args.decode_steps

    def log(msg: str) -> None:
        print(msg, flush=True)

    runners = {
        "prefill": lambda: run_prefill(out, layers, log),
        "decode": lambda: run_decode(out, layers, decode_steps, log),
        "shift": lambda: run_shift(out, layers, log),
        "predictor": lambda: run_predictor(out, layers, log),
        "scale": lambda: run_scale(out, log, args.quick),
        "smallmodel": lambda: run_smallmodel(out, log),
        "plots": lambda: run_plots(out, log),
        "headline": lambda: run_headline(out, log),
        "ablation": lambda: run_ablation(out, layers, log),
    }
    for name in only:
        if name not in runners:
            raise SystemExit(f"unknown experiment {name!r}; choose from {sorted(runners)}")
        t0 = time.perf_counter()
        before = _stamps(out)
        result = runners[name]()
        cmd = f"python -m experiments.sim.study --out {args.out} --only {name}"
        if args.layers != 8:
            cmd += f" --layers {args.layers}"
        if args.decode_steps != 300 and name == "decode":
            cmd += f" --decode-steps {args.decode_steps}"
        if args.quick:
            cmd += " --quick"
        header = (f"<!-- generated by: {cmd} ({time.perf_counter() - t0:.0f} s, "
                  f"2-core CPU machine) -->\n")
        (out / f"{name}.md").write_text(header + result["table"] + "\n")
        (out / f"{name}.json").write_text(json.dumps(
            {"command": cmd, **{k: v for k, v in result.items() if k != "table"}},
            indent=1, default=_jsonable) + "\n")
        written = [out / f for f, stamp in _stamps(out).items()
                   if before.get(f) != stamp and not f.endswith(".manifest.json")]
        run.write(out, written, name=f"{name}.manifest.json")
        log(result["table"])
    return 0


def _stamps(folder: Path) -> dict[str, int]:
    """File name -> modification time (ns) of the files in `folder`."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if p.is_file()}


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
