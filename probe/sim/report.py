"""Tables, CSV and plots of a SimResult."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from probe.sim.engine import METRICS, SimResult

__all__ = ["plot_result", "result_table", "write_csv", "write_summary"]


def result_table(result: SimResult, title: str | None = None):
    """A rich Table: one row per policy with the headline numbers."""
    from rich.table import Table

    decode = bool(np.all(result.phase == 1))
    table = Table(title=title or f"{result.meta['model']} on {result.meta['hardware']} "
                  f"(ep={result.meta['ep']}, {result.num_steps} steps)")
    cols = ["policy", "layer us", "attn us", "MoE us",
            "tok/s" if decode else "step ms", "IR mean", "IR p95", "GB moved/step",
            "exposed us", "planner ms"]
    for c in cols:
        if c == "policy":
            table.add_column(c, justify="left", no_wrap=True)
        else:
            table.add_column(c, justify="right", no_wrap=True)
    base = None
    for policy in result.policies:
        s = result.summary(policy)
        if base is None:
            base = s
        headline = (f"{s['throughput_tok_s']:,.0f}" if decode else f"{s['step_time_ms']:.2f}")
        table.add_row(policy, f"{s['layer_time_us']:.1f}", f"{s['attention_us']:.1f}",
                      f"{s['moe_us']:.1f}", headline, f"{s['ir_mean']:.3f}",
                      f"{s['ir_p95']:.3f}", f"{s['bytes_moved_gb_per_step']:.2f}",
                      f"{s['exposed_us']:.1f}", f"{s['planner_ms']:.2f}")
    return table


def write_csv(result: SimResult, path: str | Path) -> None:
    """Long format: one row per (policy, step) with layer means and the step time."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["policy", "step", "phase", "tag", "tokens", "step_time_s",
                         "throughput_tok_s", *[f"{m}_mean" for m in METRICS]])
        for policy in result.policies:
            step_time = result.step_time(policy)
            for n in range(result.num_steps):
                row = [policy, n, int(result.phase[n]), result.step_tags[n],
                       int(result.tokens[n]), f"{step_time[n]:.6e}",
                       f"{result.tokens[n] / step_time[n]:.1f}"]
                row += [f"{result.metrics[policy][m][n].mean():.6e}" for m in METRICS]
                writer.writerow(row)


def write_summary(result: SimResult, path: str | Path) -> dict:
    """JSON: meta plus one summary per policy; returns it."""
    payload = {"meta": result.meta, "steps": result.num_steps,
               "summary": [result.summary(p) for p in result.policies]}
    Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return payload


def plot_result(result: SimResult, out_dir: str | Path, prefix: str = "sim") -> list[Path]:
    """IR over steps and throughput (or step time) over steps, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = np.arange(result.num_steps)
    decode = bool(np.all(result.phase == 1))
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for policy in result.policies:
        axes[0].plot(steps, result.metrics[policy]["imbalance"].mean(axis=1), label=policy,
                     lw=1)
        if decode:
            axes[1].plot(steps, result.throughput(policy) / 1e3, label=policy, lw=1)
        else:
            axes[1].plot(steps, result.step_time(policy) * 1e3, label=policy, lw=1)
    axes[0].set_ylabel("IR (mean over layers)")
    axes[1].set_ylabel("throughput (k tok/s)" if decode else "step time (ms)")
    axes[1].set_xlabel("step")
    axes[0].legend(loc="upper right", fontsize=8)
    m = result.meta
    fig.suptitle(f"{m['model']} on {m['hardware']}, ep={m['ep']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{prefix}_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
