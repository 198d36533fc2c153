"""The simulator's error against the runtime: simulated vs measured, per policy, on CPU.

Reads what experiments/runtime/device_multigpu.sh wrote into --measured DIR: the link bench
(DIR/a2a.json, fitted by probe.sim.links) and the runtime's runs (DIR/rt_policies.tar.gz or
DIR/rt/: <policy>.json summaries and their --step-log files, read by probe.sim.measured).
Replays every run's logged routing under its policy (probe.sim.replay) and prices it with the
calibrated simulator's costs (probe.sim.costs.FairCosts) twice: with the measured links
(all-to-all latency and bandwidth, p2p rate) and with the datasheet constants.

Per policy, means over the logged steps (after --skip-steps) and MoE layers:

    MoE        dispatch + expert compute + combine. Measured: the largest over ranks of the
               three phases' sum (CUDA events). Simulated: FairCosts.moe_seconds.
    compute    measured: the largest rank's expert phase; simulated: max-rank table time.
    comm       MoE - compute (measured: the rest of the slowest rank's MoE time).
    IR         pairs per rank, max / mean: the runtime's layer_ir vs the replay's placement.
    layer      attention + route/plan + MoE. Simulated: the MEASURED attention + the replay's
               planner / split / exposed-transfer time + simulated MoE (attention is not
               simulated here: the runtime's attention is not the calibrated model's).
    step       the measured step with every layer's measured time replaced by the simulated.
    err %      100 (simulated / measured - 1) of the means; MoE also gets the median over
               steps and layers of |simulated / measured - 1|.

    python -m experiments.runtime.sim_error --measured out_multigpu --out results/sim_error

Writes sim_error.json, sim_error.md and sim_error.manifest.json into --out; prints the table.
Needs no GPU; ortools is never imported, and highspy only to replay an eplb-lp run (skipped
with a note when it is missing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.manifest import Manifest
from probe.sim.costs import CONSTANTS, FairCosts
from probe.sim.links import fit_links, load_links
from probe.sim.measured import PHASES, MeasuredRun, read_runs
from probe.sim.replay import (ReplayConfig, planning_windows, replay_policy, runtime_cost_model,
                              score)
from probe.specs import ModelSpec, model_preset

__all__ = ["main", "measured_times", "run_error"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_CALIBRATED = ("gpt-oss-120b", "qwen3-235b-a22b")
_ORDER = ("static", "eplb", "eplb-lp", "probe", "probe-on-eplb")


def measured_times(run: MeasuredRun) -> dict[str, np.ndarray]:
    """float64 [N, L] per quantity from the run's step log (module doc)."""
    ph = run.log.phase_s  # [N, L, G, P]
    idx = {name: i for i, name in enumerate(PHASES)}
    moe_rank = ph[..., idx["dispatch"]] + ph[..., idx["experts"]] + ph[..., idx["combine"]]
    moe = moe_rank.max(axis=2)
    compute = ph[..., idx["experts"]].max(axis=2)
    return {"moe": moe, "compute": compute, "comm": moe - compute,
            "overhead": ph[..., idx["route_plan"]].max(axis=2),
            "attention": ph[..., idx["attention"]].max(axis=2),
            "layer": ph.sum(axis=3).max(axis=2), "imbalance": run.log.layer_ir.astype(float)}


def _cost_name(cfg: dict, wanted: str | None) -> tuple[str, bool]:
    """The calibrated model whose measured costs price the run, and whether its expert shape
    is the run's (hidden, expert FFN)."""
    shape = (cfg["hidden_size"], cfg["moe_intermediate_size"])
    if wanted is None:
        for name in _CALIBRATED:
            m = model_preset(name)
            if (m.hidden, m.expert_ffn) == shape:
                return name, True
        wanted = _CALIBRATED[0]
    m = model_preset(wanted)
    return wanted, (m.hidden, m.expert_ffn) == shape


def _routing_spec(cfg: dict, bytes_per_value: int) -> ModelSpec:
    num_layers = len(cfg.get("moe_layers") or ()) or int(cfg["num_layers"])
    return ModelSpec(name=str(cfg.get("model_type", "runtime")), num_layers=num_layers,
                     num_experts=cfg["num_experts"], top_k=cfg["top_k"],
                     hidden=cfg["hidden_size"], expert_ffn=cfg["moe_intermediate_size"],
                     bytes_per_weight=bytes_per_value, bytes_per_activation=bytes_per_value)


def _stats(sim: np.ndarray, meas: np.ndarray) -> dict:
    s, m = float(sim.mean()), float(meas.mean())
    return {"sim": s, "measured": m, "err_pct": 100.0 * (s / m - 1.0) if m > 0 else None}


def run_error(run: MeasuredRun, links, *, cost_model: str | None = None,
              skip_steps: int = 0) -> dict:
    """The replay of one run and its error table row (module doc)."""
    summary = run.summary
    cfg, args = summary["config"], summary["args"]
    num_ranks = int(summary["world_size"])
    bytes_per_value = _DTYPE_BYTES.get(str(summary["dtype"]).removeprefix("torch."))
    if bytes_per_value is None:
        raise ValueError(f"{run.name}: dtype {summary['dtype']!r} is not one of "
                         f"{sorted(_DTYPE_BYTES)}")
    num_steps = run.log.shape[0]
    if not 0 <= skip_steps < num_steps:
        raise ValueError(f"skip_steps must be in [0, {num_steps}) for {run.name}, got "
                         f"{skip_steps}")
    config = ReplayConfig(policy=run.policy, resident_slots=int(summary["resident_slots"]),
                          per_step_slots=int(summary["per_step_slots"]),
                          replan_interval=int(args["replan_interval"]),
                          replan_window=int(args["replan_window"]), method=str(args["method"]),
                          step_offset=int(summary.get("step_offset", 0)))
    planner_cost = runtime_cost_model(cfg, bytes_per_value=bytes_per_value,
                                      hardware=str(args["hardware"]), num_ranks=num_ranks)
    placements = replay_policy(run.log.counts, config, planner_cost,
                               windows=planning_windows(run.log.phase_s,
                                                        config.default_window_s))
    name, same_shape = _cost_name(cfg, cost_model)
    routing = _routing_spec(cfg, bytes_per_value)
    variants = {"datasheet": {}}
    if links is not None:
        if links.num_ranks != num_ranks:
            raise ValueError(f"links were measured at {links.num_ranks} ranks, {run.name} ran "
                             f"at {num_ranks}")
        variants = {"measured_links": links.fair_overrides(), **variants}
    meas = {k: v[skip_steps:] for k, v in measured_times(run).items()}
    step_meas = run.log.step_s[skip_steps:]
    row = {"policy": run.policy, "file": run.name, "steps": int(num_steps - skip_steps),
           "layers": int(run.log.shape[1]), "ranks": num_ranks,
           "cost_model": name, "cost_model_shape_matches": same_shape,
           "replicas_measured_per_layer": float(run.log.replicas_planned[skip_steps:].mean()),
           "replicas_late_measured_per_layer": float(
               (run.log.replicas_planned - run.log.replicas_arrived)[skip_steps:].mean())}
    for label, overrides in variants.items():
        costs = FairCosts.for_model(name, num_ranks, routing=routing, **overrides)
        sim = {k: v[skip_steps:] for k, v in score(
            placements, costs,
            planner_s=costs.planner_kernel_s * costs.planner_host_factor).items()}
        layer_sim = meas["attention"] + sim["overhead"] + sim["moe"]
        step_sim = step_meas + (layer_sim - meas["layer"]).sum(axis=1)
        ratio = sim["moe"] / np.where(meas["moe"] > 0, meas["moe"], np.nan)
        row[label] = {
            "moe": {**_stats(sim["moe"], meas["moe"]),
                    "median_abs_err_pct": float(100 * np.nanmedian(np.abs(ratio - 1)))},
            "compute": _stats(sim["compute"], meas["compute"]),
            "comm": _stats(sim["comm"], meas["comm"]),
            "overhead": _stats(sim["overhead"], meas["overhead"]),
            "layer": _stats(layer_sim, meas["layer"]),
            "step": _stats(step_sim, step_meas),
            "ir": _stats(sim["imbalance"], meas["imbalance"]),
            "replicas_per_layer": float(sim["replicas"].mean()),
            "per_layer_moe_sim_s": sim["moe"].mean(axis=0).tolist(),
        }
    row["per_layer_moe_measured_s"] = meas["moe"].mean(axis=0).tolist()
    return row


def _fmt(x, scale=1e3, spec=".3f") -> str:
    return "-" if x is None else format(x * scale, spec)


def markdown(result: dict) -> str:
    """The error table (milliseconds; err % = simulated / measured - 1)."""
    links = result["links"]
    lines = ["# Simulator vs runtime, per policy", ""]
    if links is not None:
        lines.append(f"Links measured on {links['device']} x {links['num_ranks']} "
                     f"({links['comm']}): all-to-all {links['a2a_latency_s'] * 1e6:.1f} us + "
                     f"bytes / {links['a2a_bandwidth'] / 1e9:.1f} GB/s (fit within "
                     f"{100 * links['a2a_max_rel_residual']:.0f}% on {links['a2a_points']} "
                     f"points), p2p {links['p2p_bandwidth'] / 1e9:.1f} GB/s; datasheet "
                     f"constants: all-to-all {CONSTANTS['a2a_latency_s']['value'] * 1e6:.0f} us"
                     f" + bytes / {CONSTANTS['a2a_bandwidth']['value'] / 1e9:.0f} GB/s.")
    else:
        lines.append("No link measurements (a2a.json): datasheet constants only.")
    lines += ["", "Times in ms, means over steps and MoE layers; layer and step take the "
              "measured attention. err % = 100 (sim / measured - 1). late / layer: per-step "
              "replicas the runtime skipped because they had not arrived (the replay assumes "
              "they all do).", ""]
    variant = "measured_links" if links is not None else "datasheet"
    head = ("| policy | steps | MoE meas | MoE sim | err % | median abs err % | MoE sim "
            "datasheet | err % | compute meas | sim | comm meas | sim | IR meas | IR sim | "
            "late / layer | layer err % | step meas | step sim | err % |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['policy']} | skipped: {r['skipped']} |")
            continue
        v, d = r[variant], r["datasheet"]
        lines.append(
            f"| {r['policy']} | {r['steps']} | {_fmt(v['moe']['measured'])} | "
            f"{_fmt(v['moe']['sim'])} | {_fmt(v['moe']['err_pct'], 1, '+.1f')} | "
            f"{v['moe']['median_abs_err_pct']:.1f} | {_fmt(d['moe']['sim'])} | "
            f"{_fmt(d['moe']['err_pct'], 1, '+.1f')} | {_fmt(v['compute']['measured'])} | "
            f"{_fmt(v['compute']['sim'])} | {_fmt(v['comm']['measured'])} | "
            f"{_fmt(v['comm']['sim'])} | {v['ir']['measured']:.3f} | {v['ir']['sim']:.3f} | "
            f"{r['replicas_late_measured_per_layer']:.2f} | "
            f"{_fmt(v['layer']['err_pct'], 1, '+.1f')} | {_fmt(v['step']['measured'])} | "
            f"{_fmt(v['step']['sim'])} | {_fmt(v['step']['err_pct'], 1, '+.1f')} |")
    notes = [r for r in result["rows"] if "skipped" not in r and not r["cost_model_shape_matches"]]
    if notes:
        lines += ["", f"Note: the run's expert shape is not {notes[0]['cost_model']}'s; its "
                  "measured expert table prices it anyway (errors are then not meaningful)."]
    if result["device"] and "H200" not in str(result["device"]):
        lines += ["", f"Note: measured on {result['device']}; the simulator's expert table and "
                  "attention points are an H200's."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", type=Path, required=True,
                    help="device_multigpu.sh's output folder (a2a.json, rt_policies.tar.gz "
                         "or rt/), or a folder / tarball of runtime summaries")
    ap.add_argument("--links", type=Path, default=None,
                    help="a2a.json or a links.json of `probe calibrate-links` (default: "
                         "MEASURED/a2a.json when present)")
    ap.add_argument("--cost-model", default=None, choices=_CALIBRATED,
                    help="calibrated model whose measured costs price the runs (default: the "
                         "one with the run's expert shape, else gpt-oss-120b)")
    ap.add_argument("--skip-steps", type=int, default=0,
                    help="leave the first logged steps out of the means")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.runtime.sim_error", argv)
    links_path = args.links
    if links_path is None and args.measured.is_dir() and (args.measured / "a2a.json").is_file():
        links_path = args.measured / "a2a.json"
    links = None
    if links_path is not None:
        text = json.loads(links_path.read_text()) if links_path.is_file() else None
        links = (load_links(links_path) if isinstance(text, dict) and text.get("kind")
                 == "probe-links" else fit_links(links_path))
    runs = sorted(read_runs(args.measured),
                  key=lambda r: (_ORDER.index(r.policy) if r.policy in _ORDER else 99, r.name))
    rows = []
    for r in runs:
        try:
            rows.append(run_error(r, links, cost_model=args.cost_model,
                                  skip_steps=args.skip_steps))
        except ImportError as err:  # eplb-lp without highspy
            rows.append({"policy": r.policy, "file": r.name, "skipped": f"{err}"})
    device = links.device if links is not None else None
    result = {"measured": str(args.measured), "links": None if links is None else
              {k: v for k, v in links.to_json().items() if k not in ("kind", "version")},
              "device": device, "skip_steps": args.skip_steps, "rows": rows}
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_error.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "sim_error.md").write_text(table)
    run.write(args.out, [args.out / "sim_error.json", args.out / "sim_error.md"],
              name="sim_error.manifest.json")
    return result


if __name__ == "__main__":
    main()
