"""Serving metrics of the balancing path: per MoE layer and per step.

`step_metrics` reads one engine `StepRecord` (its `ep` dict is `StepStats.as_dict()`), and
`run_metrics` aggregates a run's records into the dict that goes into the summary JSON
(`python -m probe.runtime --out`) under "metrics":

    steps: one entry per step: tokens, seconds, tokens_per_s, mean_ir, replicas planned /
        arrived / used / late, exposed transfer, predictor and planner seconds
    layers: per MoE layer over the run: mean IR, replicas planned / arrived / used / late,
        exposed transfer, predictor and planner seconds, dispatch-split seconds (sums), and
        resident EPLB copies (the last step's)
    totals: the same summed over layers and steps, tokens and tokens/s, and the EPLB
        re-plans' weight-move seconds and bytes

IR, replicas, exposed, predictor and planner times are group-wide (identical on every rank);
tokens are the calling rank's.

`prometheus_text` writes the same numbers in the Prometheus text exposition format (version
0.0.4), without the prometheus_client package. The number of series is bounded: per-layer
families carry a `layer` label only for the first `max_layer_series` MoE layers (default 32);
all later layers are folded into one series labelled layer="rest" (counters summed, the IR
gauge averaged). So a model with L MoE layers exports at most 8 x (min(L, max_layer_series) + 1)
per-layer series (IR; replicas by state: planned, arrived, used, late; exposed transfer;
predictor; planner), plus 6 run-level series, whatever the number of steps. `serve_metrics`
serves the text over HTTP (/metrics) from a daemon thread, with the standard library only.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["prometheus_text", "run_metrics", "serve_metrics", "step_metrics"]

_STATES = ("planned", "arrived", "used", "late")


def _layer_array(ep: dict, key: str, num_layers: int) -> np.ndarray:
    values = ep.get(key)
    if values is None or len(values) != num_layers:
        return np.zeros(num_layers)
    return np.asarray(values, dtype=np.float64)


def step_metrics(record) -> dict:
    """One step's metrics from an engine `StepRecord` (step, tokens, seconds, ep)."""
    ep = record.ep or {}
    num_layers = len(ep.get("layer_ir", []))
    out = {"step": int(record.step), "tokens": int(record.tokens),
           "seconds": float(record.seconds),
           "tokens_per_s": record.tokens / record.seconds if record.seconds > 0 else None,
           "mean_ir": ep.get("mean_ir")}
    for state in _STATES:
        out[f"replicas_{state}"] = int(_layer_array(ep, f"replicas_{state}", num_layers).sum())
    out["exposed_transfer_s"] = float(ep.get("exposed_transfer_s", 0.0))
    out["predict_s"] = float(ep.get("predict_seconds", 0.0))
    out["plan_s"] = float(ep.get("plan_seconds", 0.0))
    out["split_s"] = float(ep.get("split_seconds", 0.0))
    out["replan_s"] = float(ep.get("replan_seconds", 0.0))
    out["replan_bytes"] = float(ep.get("replan_bytes", 0.0))
    return out


def run_metrics(records: Sequence) -> dict:
    """A run's metrics (see the module doc) from its engine `StepRecord`s."""
    steps = [step_metrics(r) for r in records]
    eps = [r.ep for r in records if r.ep]
    num_layers = len(eps[0]["layer_ir"]) if eps else 0
    layers: dict[str, list] = {}
    if eps:
        ir = np.array([_layer_array(ep, "layer_ir", num_layers) for ep in eps])  # [steps, L]
        layers["ir_mean"] = ir.mean(axis=0).round(4).tolist()
        for state in _STATES:
            layers[f"replicas_{state}"] = [int(x) for x in sum(
                _layer_array(ep, f"replicas_{state}", num_layers) for ep in eps)]
        for key, src in (("exposed_transfer_s", "layer_exposed_s"),
                         ("predict_s", "layer_predict_s"), ("plan_s", "layer_plan_s"),
                ("split_s", "layer_split_s")):
            layers[key] = sum(_layer_array(ep, src, num_layers) for ep in eps).tolist()
        layers["replicas_resident"] = [int(x) for x in _layer_array(
            eps[-1], "replicas_resident", num_layers)]
    tokens = sum(s["tokens"] for s in steps)
    seconds = sum(s["seconds"] for s in steps)
    totals = {"steps": len(steps), "tokens": tokens, "seconds": seconds,
              "tokens_per_s": tokens / seconds if seconds > 0 else None,
              "mean_ir": float(np.mean(layers["ir_mean"])) if layers.get("ir_mean") else None}
    for key in [f"replicas_{s}" for s in _STATES] + ["exposed_transfer_s", "predict_s",
                                                      "plan_s", "split_s", "replan_s",
                                                      "replan_bytes"]:
        totals[key] = sum(s[key] for s in steps)
    return {"num_layers": num_layers, "steps": steps, "layers": layers, "totals": totals}


def _fold(values: Sequence[float], cap: int, how: str) -> list[tuple[str, float]]:
    """(label, value) per layer: layers < cap by index, the rest folded into "rest"."""
    out = [(str(i), float(v)) for i, v in enumerate(values[:cap])]
    rest = list(values[cap:])
    if rest:
        out.append(("rest", float(np.mean(rest) if how == "mean" else np.sum(rest))))
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(metrics: dict, *, max_layer_series: int = 32,
                    labels: dict[str, str] | None = None) -> str:
    """`run_metrics`'s dict in the Prometheus text exposition format (module doc: series).

    labels: constant labels added to every series (e.g. {"rank": "0"}).
    """
    if max_layer_series < 1:
        raise ValueError(f"max_layer_series must be >= 1, got {max_layer_series}")
    const = "".join(f',{k}="{_escape(str(v))}"' for k, v in sorted((labels or {}).items()))
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP probe_{name} {help_text}")
        lines.append(f"# TYPE probe_{name} {kind}")
        for label_text, value in samples:
            body = (label_text + const).lstrip(",")
            lines.append(f"probe_{name}{{{body}}} {_number(value)}" if body
                         else f"probe_{name} {_number(value)}")

    totals = metrics["totals"]
    steps = metrics["steps"]
    family("steps_total", "counter", "Engine steps run.", [("", totals["steps"])])
    family("tokens_total", "counter", "Tokens processed by this rank.",
           [("", totals["tokens"])])
    family("step_seconds_total", "counter", "Wall seconds of all steps.",
           [("", totals["seconds"])])
    family("tokens_per_second", "gauge", "Tokens per second over the run (this rank).",
           [("", totals["tokens_per_s"] or 0.0)])
    last = steps[-1]["tokens_per_s"] if steps and steps[-1]["tokens_per_s"] else 0.0
    family("last_step_tokens_per_second", "gauge", "Tokens per second of the last step.",
           [("", last)])
    family("mean_imbalance_ratio", "gauge", "Mean IR over layers and steps (eq. 1).",
           [("", totals["mean_ir"] if totals["mean_ir"] is not None else 1.0)])
    layers = metrics["layers"]
    if not layers:
        return "\n".join(lines) + "\n"
    cap = max_layer_series
    family("layer_imbalance_ratio", "gauge", "Mean IR of a MoE layer over steps.",
           [(f'layer="{lab}"', v) for lab, v in _fold(layers["ir_mean"], cap, "mean")])
    samples = []
    for state in _STATES:
        samples += [(f'layer="{lab}",state="{state}"', v)
                    for lab, v in _fold(layers[f"replicas_{state}"], cap, "sum")]
    family("layer_replicas_total", "counter",
           "Replicas of a MoE layer by state (planned, arrived in time, used, late).", samples)
    for key, name, text in (
            ("exposed_transfer_s", "layer_exposed_transfer_seconds_total",
             "Seconds the main thread waited for a layer's replicas."),
            ("predict_s", "layer_predictor_seconds_total",
             "Predictor seconds spent on a layer's plan."),
            ("plan_s", "layer_planner_seconds_total", "Planner seconds of a layer's plan.")):
        family(name, "counter", text,
               [(f'layer="{lab}"', v) for lab, v in _fold(layers[key], cap, "sum")])
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def serve_metrics(port: int, text: Callable[[], str], *,
                  host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """Serve `text()` at http://host:port/metrics from a daemon thread; returns the server
    (call `.shutdown()` to stop). Port 0 picks a free port (`server.server_address`)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="probe-metrics").start()
    return server
