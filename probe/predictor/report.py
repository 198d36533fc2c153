"""Write the predictor study (probe.predictor.study.run_study) as JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

__all__ = ["write_report"]

TARGETS = {"topk_acc": 0.90, "half_hit": 0.98, "recall_2k": 0.98, "ir_ratio": 1.05}


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def _mean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _segments(tags: list[str], shift_window: int = 8, longest: int = 64
              ) -> list[tuple[int, int]]:
    """[start, stop) index ranges: a new one at every tag change, the first `shift_window`
    steps after a change on their own, and none longer than `longest`."""
    cuts = {0, len(tags)}
    for i in range(1, len(tags)):
        if tags[i] != tags[i - 1]:
            cuts |= {i, min(len(tags), i + shift_window)}
    bounds = sorted(cuts)
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += [(s, min(b, s + longest)) for s in range(a, b, longest)]
    return out


def write_report(res: dict, out_dir: str | Path, *, command: str = "",
                 title: str = "Lookahead predictor on the small model",
                 summary: str | None = None) -> str:
    """Write results.json, fidelity.csv, plans.csv, online.csv and report.md; return the text.

    summary: replaces the paragraph that describes the samples and the training run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    cfg = res["config"]
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    if summary is not None:
        lines += [summary, ""]
    else:
        lines += [f"Samples: {cfg['num_samples']} tokens from {cfg['num_steps_sampled']} steps; "
                  f"held out {cfg['test_samples']} tokens (whole steps, blocks of {cfg['block']} "
                  f"steps, {cfg['held_out']:.0%} of blocks, seed {cfg['seed']}); trained on "
                  f"{cfg['train_samples']}. Predictor width H = {cfg['hidden']}, top-k K = "
                  f"{cfg['top_k']}, {cfg['epochs']} epochs, lr {cfg['lr']}, "
                  f"{res.get('train_seconds', 0):.0f} s of CPU training.", ""]

    # ---- fidelity
    prior, dist = res["prior"], res["distilled"]
    with (out / "fidelity.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        keys = [k for k in dist[0] if k not in ("layer", "tokens")]
        w.writerow(["layer", "tokens", *[f"prior_{k}" for k in keys],
                    *[f"distilled_{k}" for k in keys]])
        for p, d in zip(prior, dist, strict=True):
            w.writerow([d["layer"], d["tokens"], *[p[k] for k in keys], *[d[k] for k in keys]])
    lines += ["## Held-out fidelity per layer (frozen prior -> distilled)", "",
              "| layer | top-k acc | top-half-k hit | 2k recall | 2k full hit | load err "
              "(rel. L1) |", "|---|---|---|---|---|---|"]
    for p, d in zip(prior, dist, strict=True):
        lines.append(
            f"| {d['layer']} | {_fmt(p['topk_acc'])} -> **{_fmt(d['topk_acc'])}** | "
            f"{_fmt(p['half_hit'])} -> {_fmt(d['half_hit'])} | {_fmt(p['recall_2k'])} -> "
            f"{_fmt(d['recall_2k'])} | {_fmt(p['full_recall_2k'])} -> "
            f"{_fmt(d['full_recall_2k'])} | {_fmt(p.get('expert_load_err'))} -> "
            f"{_fmt(d.get('expert_load_err'))} |")
    means = {k: (_mean(r[k] for r in prior), _mean(r[k] for r in dist))
             for k in ("topk_acc", "half_hit", "recall_2k", "full_recall_2k")}
    lines.append(f"| **mean** | {_fmt(means['topk_acc'][0])} -> "
                 f"**{_fmt(means['topk_acc'][1])}** | {_fmt(means['half_hit'][0])} -> "
                 f"{_fmt(means['half_hit'][1])} | {_fmt(means['recall_2k'][0])} -> "
                 f"{_fmt(means['recall_2k'][1])} | {_fmt(means['full_recall_2k'][0])} -> "
                 f"{_fmt(means['full_recall_2k'][1])} | |")
    lines.append("")
    verdict = []
    for key, label in (("topk_acc", "mean top-k accuracy"), ("half_hit", "top-half-k hit"),
                       ("recall_2k", "2k recall")):
        value = means[key][1]
        ok = value >= TARGETS[key]
        verdict.append(f"- {label}: {value:.3f} vs target {TARGETS[key]:.2f}: "
                       f"{'met' if ok else 'MISSED'}")

    # ---- plans
    plans = res.get("plans")
    if plans:
        names = list(next(iter(plans["layers"].values())))
        with (out / "plans.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", "source", "ir", "ir_truth", "ir_static", "ir_ratio",
                        "within_5pct", "objective_ratio"])
            for layer, by_name in plans["layers"].items():
                for name, r in by_name.items():
                    w.writerow([layer, name, r["ir"], r["ir_truth"], r["ir_static"],
                                r["ir_ratio"], r["within_5pct"], r["objective_ratio"]])
        lines += ["## Plan quality on held-out steps (greedy, scored on the true load)", "",
                  f"{len(plans['steps'])} held-out steps, loads rescaled to "
                  f"{cfg['tokens_per_rank']} tokens per rank x {cfg['num_ranks']} ranks, "
                  f"{plans['slots']} replica slots per rank. Cells: mean IR of the plan made "
                  "from that source / mean of (IR / IR of the plan made from the truth).", "",
                  "| layer | static IR | plan from truth | "
                  + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
        for layer, by_name in plans["layers"].items():
            any_r = by_name[names[0]]
            cells = [f"{by_name[n]['ir']:.3f} / {by_name[n]['ir_ratio']:.3f}" for n in names]
            lines.append(f"| {layer} | {any_r['ir_static']:.3f} | {any_r['ir_truth']:.3f} | "
                         + " | ".join(cells) + " |")
        mean_ratio = {n: _mean(by[n]["ir_ratio"] for by in plans["layers"].values())
                      for n in names}
        within = {n: _mean(by[n]["within_5pct"] for by in plans["layers"].values())
                  for n in names}
        lines.append("| **mean ratio** | | | " + " | ".join(
            f"{mean_ratio[n]:.3f} ({within[n]:.0%} of steps within 5%)" for n in names) + " |")
        lines.append("")
        ok = mean_ratio.get("distilled", np.inf) <= TARGETS["ir_ratio"]
        verdict.append(f"- plans from the distilled prediction: IR {mean_ratio['distilled']:.3f}"
                       f"x the plan from truth (target <= 1.05): {'met' if ok else 'MISSED'}")
        for base in ("last_step", "avg_8"):
            if base in mean_ratio:
                verdict.append(f"- vs history baseline {base}: IR ratio "
                               f"{mean_ratio[base]:.3f} (distilled "
                               f"{mean_ratio['distilled']:.3f})")

    # ---- online
    online = res.get("online")
    if online:
        name = online.get("name", "online")
        steps = online["steps"]
        layers = list(online["acc"])
        with (out / "online.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "tag", "samples", "mean_acc", "mean_prior_acc",
                        "mean_pred_load_err", "mean_last_step_load_err",
                        "mean_same_step_share_load_err", "plan_ratio_online",
                        "plan_ratio_last_step", "plan_ratio_avg_8"])
            ratio = online.get("plan_ratio") or {}
            for i, s in enumerate(steps):
                tag = online["tags"][i] if online["tags"] else ""
                w.writerow([s, tag, online["samples_per_step"][i],
                            _mean(online["acc"][la][i] for la in layers),
                            _mean(online["prior_acc"][la][i] for la in layers),
                            _mean(online["pred_load_err"][la][i] for la in layers),
                            _mean(online["last_step_load_err"][la][i] for la in layers),
                            _mean(online["same_step_share_load_err"][la][i] for la in layers),
                            *[_mean(ratio[n][la][i] for la in layers) if ratio else ""
                              for n in ("online", "last_step", "avg_8")]])
        heading = ("Online (prequential) distillation" if name == "online"
                   else f"The {name} predictors")
        lines += [f"## {heading} across the recording", "",
                  "Each step is predicted before the predictor learns from it ("
                  f"{online.get('note', 'one update per step, from the frozen prior')}). "
                  "Means over layers, per segment of steps with "
                  "the same tag; load error is relative L1 on the sampled tokens' [S, E] load."
                  " `same-step share` is this step's full-batch shares rescaled to the sample: "
                  "the sampling-noise floor of any distribution-level guess.", "",
                  f"| steps | tag | top-k acc ({name}) | top-k acc (prior) | load err ({name}) | "
                  "load err (last step) | load err (same-step share) |",
                  "|---|---|---|---|---|---|---|"]
        tags = online["tags"] or [""] * len(steps)
        segments = _segments(tags)
        ratio = online.get("plan_ratio")
        for a, b in segments:
            def seg(key, a=a, b=b):
                return _mean(_mean(online[key][la][a:b]) for la in layers)
            lines.append(f"| {steps[a]}-{steps[b - 1]} | {tags[a]} | {_fmt(seg('acc'))} | "
                         f"{_fmt(seg('prior_acc'))} | {_fmt(seg('pred_load_err'))} | "
                         f"{_fmt(seg('last_step_load_err'))} | "
                         f"{_fmt(seg('same_step_share_load_err'))} |")
        if ratio:
            lines += ["", f"Plan quality of the {name} predictor vs history, per segment: mean "
                      "over steps and layers of IR(plan from the source) / IR(plan from the "
                      "truth), greedy, same cost model and rescaling as above (1.000 = as good "
                      "as knowing the true load).", "",
                      f"| steps | tag | {name} predictor | last step | avg of 8 steps |",
                      "|---|---|---|---|---|"]
            for a, b in segments:
                cells = [_fmt(_mean(_mean(ratio[n][la][a:b]) for la in layers))
                         for n in ("online", "last_step", "avg_8")]
                lines.append(f"| {steps[a]}-{steps[b - 1]} | {tags[a]} | " + " | ".join(cells)
                             + " |")
            total = {n: _mean(_mean(ratio[n][la]) for la in layers) for n in ratio}
            lines.append("| **all** | | " + " | ".join(
                f"**{_fmt(total[n])}**" for n in ("online", "last_step", "avg_8")) + " |")
            verdict.append(f"- {name}, whole recording (both domains and the shift): plan IR "
                           f"ratio {total['online']:.3f} vs last step {total['last_step']:.3f}, "
                           f"8-step average {total['avg_8']:.3f}")
        lines.append("")

    lines += ["## Targets", "", *verdict, ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text
