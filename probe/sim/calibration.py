"""Measured H200 numbers (experiments/calibration/) turned into specs the simulator uses.

The calibration JSON (written by the device script; the committed copy is
probe/sim/h200_calibration.json, identical to results/calibration/h200.json) holds the copy
bandwidth, the bf16 matmul rate, and per model the grouped-GEMM time per expert vs tokens per
expert with its fit T(n) = alpha + beta n, and attention time points.

`calibrated_hardware(name, model)` returns the preset `name` (an h200x8 family preset) with
    peak_flops        = measured 8192^3 bf16 matmul rate,
    hbm_bw            = measured device copy bandwidth (bytes read + written per second),
    gemm_efficiency   = measured eta(n) = n F / (T(n) peak) of `model`'s expert shape, the last
                        point replaced by the fitted asymptote eta_inf = F / (beta peak), so that
                        CostModel.from_specs gives beta = the fitted slope,
    launch_overhead_s = alpha_fit - W / hbm_bw (>= 0), so that from_specs gives alpha = the
                        fitted intercept (or W / hbm_bw when that is larger),
    source            = "measured: <command> on <device>; links datasheet".
Link bandwidths stay the preset's datasheet values (no multi-GPU machine was measured).
`calibrated_attention(model)` returns the AttentionModel of the measured points.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from probe.sim.attention import AttentionModel
from probe.specs import HardwareSpec, hardware_preset, model_preset

__all__ = ["CALIBRATION_PATH", "calibrated_attention", "calibrated_hardware",
           "has_calibration", "load_calibration"]

CALIBRATION_PATH = Path(__file__).with_name("h200_calibration.json")


@lru_cache(maxsize=8)
def _read(path: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file not found: {p} (run "
                                "experiments/calibration/device.sh on an H200)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
    for key in ("copy", "matmul", "models", "command"):
        if key not in data:
            raise ValueError(f"{p}: calibration lacks field {key!r}")
    return data


def load_calibration(path: str | Path | None = None) -> dict:
    """The calibration JSON as a dict (default: the committed H200 calibration)."""
    return _read(str(CALIBRATION_PATH if path is None else path))


def has_calibration(model_name: str, path: str | Path | None = None) -> bool:
    """Whether the calibration holds usable numbers for `model_name`."""
    try:
        data = load_calibration(path)
    except (FileNotFoundError, ValueError):
        return False
    entry = data["models"].get(model_name, {})
    return "fit" in entry and "experts" in entry


def _model_entry(data: dict, model_name: str, path) -> dict:
    entry = data["models"].get(model_name)
    if not entry or "fit" not in entry:
        known = sorted(k for k, v in data["models"].items() if "fit" in v)
        raise ValueError(f"no calibration for model {model_name!r} in {path or CALIBRATION_PATH}"
                         f"; calibrated: {known}")
    return entry


def calibrated_hardware(name: str = "h200x8", model: str = "gpt-oss-120b",
                        path: str | Path | None = None) -> HardwareSpec:
    """The hardware preset `name` with measured compute, HBM and grouped-GEMM numbers of
    `model`'s expert shape (module docstring). Raises ValueError for non-H200 presets."""
    if not name.startswith("h200"):
        raise ValueError(f"the calibration was measured on an H200; {name!r} is not an h200 "
                         "preset")
    base = hardware_preset(name)
    data = load_calibration(path)
    entry = _model_entry(data, model, path)
    peak = float(data["matmul"]["flops"])
    hbm = float(data["copy"]["bandwidth"])
    fit = entry["fit"]
    points = [(int(r["tokens_per_expert"]), float(r["eta"])) for r in entry["experts"]]
    eta_inf = min(1.0, float(fit["eta_inf"]))
    points[-1] = (points[-1][0], eta_inf)
    points = [(n, min(1.0, max(e, 1e-6))) for n, e in points]
    expert_bytes = model_preset(model).expert_bytes
    launch = max(0.0, float(fit["alpha"]) - expert_bytes / hbm)
    source = (f"measured: {data['command']} on {data.get('device', '?')} "
              f"(torch {data.get('torch', '?')}), expert shape of {model}; link bandwidths: "
              "datasheet")
    return dataclasses.replace(base, peak_flops=peak, hbm_bw=hbm, launch_overhead_s=launch,
                               gemm_efficiency=tuple(points), source=source)


def calibrated_attention(model: str = "gpt-oss-120b",
                         path: str | Path | None = None) -> AttentionModel:
    """Measured per-layer attention time (projections + SDPA) of `model` on one H200."""
    data = load_calibration(path)
    att = _model_entry(data, model, path)["attention"]
    decode = tuple((r["batch"], r["seconds"]) for r in att["decode"])
    prefill = tuple((r["chunk"], r["seconds"]) for r in att["prefill"])
    kv_len = int(att["decode"][0]["kv_len"])
    return AttentionModel(decode=decode, prefill=prefill, kv_len=kv_len,
                          source=f"measured: {data['command']} on {data.get('device', '?')}")
