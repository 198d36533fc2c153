"""Balancing metrics: run_metrics from engine records, Prometheus text format, HTTP endpoint."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from probe.runtime.engine import StepRecord
from probe.runtime.metrics import prometheus_text, run_metrics, serve_metrics

# One sample line of the text exposition format: name, optional {labels}, value.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"'
                     r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*")*)?\})? '
                     r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')
_META = re.compile(r"^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                   r"(counter|gauge))$")


def _records(num_layers: int, num_steps: int = 3) -> list[StepRecord]:
    rng = np.random.default_rng(0)
    out = []
    for step in range(num_steps):
        planned = rng.integers(0, 4, num_layers)
        arrived = np.minimum(planned, rng.integers(0, 4, num_layers))
        used = np.minimum(arrived, rng.integers(0, 4, num_layers))
        ep = {"layer_ir": rng.uniform(1, 2, num_layers).tolist(), "mean_ir": 1.5,
              "replicas_planned": planned.tolist(), "replicas_arrived": arrived.tolist(),
              "replicas_late": (planned - arrived).tolist(), "replicas_used": used.tolist(),
              "exposed_transfer_s": 0.0, "layer_exposed_s": [0.0] * num_layers,
              "plan_seconds": 0.01 * num_layers, "layer_plan_s": [0.01] * num_layers,
              "predict_seconds": 0.002 * num_layers, "layer_predict_s": [0.002] * num_layers}
        out.append(StepRecord(step, tokens=10 + step, prefill_tokens=0, decode_tokens=10 + step,
                              seconds=0.5, running=2, ep=ep))
    return out


def _parse(text: str) -> dict[tuple[str, str], float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert _META.match(line), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        samples[(m.group(1), m.group(3) or "")] = float(m.group(5))
    return samples


def test_run_metrics_per_layer_and_step():
    recs = _records(4)
    m = run_metrics(recs)
    assert m["num_layers"] == 4 and len(m["steps"]) == 3
    assert m["steps"][1]["tokens_per_s"] == pytest.approx(11 / 0.5)
    planned = sum(np.array(r.ep["replicas_planned"]) for r in recs)
    assert m["layers"]["replicas_planned"] == planned.tolist()
    assert m["totals"]["replicas_late"] == (m["totals"]["replicas_planned"]
                                            - m["totals"]["replicas_arrived"])
    assert m["layers"]["plan_s"] == pytest.approx([0.03] * 4)
    assert m["totals"]["tokens_per_s"] == pytest.approx(33 / 1.5)


def test_prometheus_text_parses_and_series_are_bounded():
    m = run_metrics(_records(40))
    text = prometheus_text(m, max_layer_series=8, labels={"rank": "0"})
    samples = _parse(text)
    layers = {re.search(r'layer="(\w+)"', k[1]).group(1) for k in samples if "layer=" in k[1]}
    assert layers == {str(i) for i in range(8)} | {"rest"}
    assert len(samples) <= 8 * (8 + 1) + 6
    assert all('rank="0"' in labels for _, labels in samples)
    # "rest" folds layers 8..39: counters summed, IR averaged
    rest_planned = sum(m["layers"]["replicas_planned"][8:])
    assert samples[("probe_layer_replicas_total", 'layer="rest",state="planned",rank="0"')] \
        == rest_planned
    assert samples[("probe_layer_imbalance_ratio", 'layer="rest",rank="0"')] == pytest.approx(
        np.mean(m["layers"]["ir_mean"][8:]))
    assert samples[("probe_tokens_total", 'rank="0"')] == 33
    with pytest.raises(ValueError, match="max_layer_series must be >= 1"):
        prometheus_text(m, max_layer_series=0)


def test_metrics_served_over_http():
    text = prometheus_text(run_metrics(_records(2)))
    server = serve_metrics(0, lambda: text)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert resp.read().decode() == text
    finally:
        server.shutdown()
        server.server_close()
