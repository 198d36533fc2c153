"""Measured link figures (experiments/comm/a2a_bench.py's a2a.json) turned into simulator inputs.

The bench writes one JSON object (read here exactly as it writes it):

    meta: {device: str, world: int (G), torch: str, comm: str, args: {...}, out: str}
    rows: [{kind: "all_to_all", model, G, T, K, D, bytes_out_per_rank, measured_us, GBps_out,
            cost_model_us}, ...,
           {kind: "p2p", G, MB, measured_us, GBps, preset_GBps}, ...]

`fit_links(data)` fits time = latency + bytes / bandwidth by least squares, separately to
the all-to-all rows (bytes: `bytes_out_per_rank`, the largest per-rank bytes of a uniform
dispatch, the quantity the simulator's all-to-all term divides by its bandwidth) and to the
point-to-point rows (bytes: MB x 2^20, one expert-replica-sized copy). A negative intercept
is refitted through the origin (latency 0); a fit needs two distinct sizes and a positive
slope. The result, `LinkCalibration`, gives

    fair_overrides()  {a2a_bandwidth, a2a_latency_s, link_bandwidth} for
                      `probe.sim.costs.FairCosts.for_model(..., **overrides)` (the all-to-all
                      term and the weight-move rate of the calibrated simulator)
    hardware(base)    the HardwareSpec preset `base` at G ranks with intra_node_bw = the p2p
                      bandwidth (the planner's link rate), source naming the file

`probe calibrate-links A2A_JSON --out DIR` writes both: DIR/links.json (`load_links`) and
DIR/hardware.json (a `probe.specs.save_spec` file that every --hardware option takes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probe.specs import HardwareSpec, hardware_preset

__all__ = ["LINKS_FORMAT", "LinkCalibration", "fit_links", "load_links", "read_a2a"]

LINKS_FORMAT = "probe-links"

_A2A_FIELDS = ("G", "T", "K", "D", "bytes_out_per_rank", "measured_us")
_P2P_FIELDS = ("G", "MB", "measured_us")


def _number(value, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{where} must be > 0, got {value!r}")
    return value


def read_a2a(source: str | Path | dict) -> dict:
    """The bench's JSON (a path or the parsed object), validated: {"meta": {...}, "a2a":
    float64 [A, 2] (bytes, seconds), "p2p": float64 [P, 2] (bytes, seconds)}. Errors name the
    file, the row and the field (missing, not a number, NaN, <= 0, G unlike meta.world)."""
    name = "a2a JSON"
    if not isinstance(source, dict):
        path = Path(source)
        name = str(path)
        try:
            source = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"a2a results not found: {path} (written by "
                                    "experiments/comm/a2a_bench.py --out)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(source, dict) or not isinstance(source.get("meta"), dict) \
            or not isinstance(source.get("rows"), list):
        raise ValueError(f"{name}: expected an object with 'meta' (object) and 'rows' (list)")
    meta = source["meta"]
    world = meta.get("world")
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"{name}: meta.world must be an int >= 2, got {world!r}")
    a2a, p2p = [], []
    for i, row in enumerate(source["rows"]):
        where = f"{name}: rows[{i}]"
        if not isinstance(row, dict) or row.get("kind") not in ("all_to_all", "p2p"):
            raise ValueError(f"{where}: kind must be 'all_to_all' or 'p2p'")
        fields = _A2A_FIELDS if row["kind"] == "all_to_all" else _P2P_FIELDS
        for key in fields:
            if key not in row:
                raise ValueError(f"{where} ({row['kind']}) lacks field {key!r}")
            _number(row[key], f"{where}.{key}")
        if row["G"] != world:
            raise ValueError(f"{where}.G is {row['G']} but meta.world is {world}: rows from "
                             "runs at different rank counts cannot be fitted together")
        seconds = float(row["measured_us"]) * 1e-6
        if row["kind"] == "all_to_all":
            a2a.append((float(row["bytes_out_per_rank"]), seconds))
        else:
            p2p.append((float(row["MB"]) * 2**20, seconds))
    return {"meta": meta, "name": name, "a2a": np.array(a2a, dtype=np.float64).reshape(-1, 2),
            "p2p": np.array(p2p, dtype=np.float64).reshape(-1, 2)}


def _fit(points: np.ndarray, what: str) -> tuple[float, float, float]:
    """(latency s, bandwidth B/s, max relative residual) of t = lat + bytes / bw."""
    if points.shape[0] == 0:
        raise ValueError(f"no {what} rows to fit")
    x, t = points[:, 0], points[:, 1]
    if np.unique(x).size < 2:
        raise ValueError(f"{what}: need at least two distinct sizes to fit latency and "
                         f"bandwidth, got {np.unique(x).size}")
    slope, intercept = np.polyfit(x, t, 1)
    if intercept < 0:  # through the origin: latency 0
        intercept, slope = 0.0, float(x @ t / (x @ x))
    if not slope > 0:
        raise ValueError(f"{what}: time does not grow with bytes (slope {slope:.3g} s/B): no "
                         "bandwidth can be fitted; measure larger sizes")
    fitted = intercept + slope * x
    return float(intercept), float(1.0 / slope), float(np.max(np.abs(fitted / t - 1.0)))


@dataclass(frozen=True)
class LinkCalibration:
    """Link figures of one G-GPU host, fitted to a2a_bench's measurements.

    a2a_latency_s, a2a_bandwidth: one all-to-all takes a2a_latency_s + (largest per-rank
        bytes sent) / a2a_bandwidth (B/s). p2p_latency_s, p2p_bandwidth: one point-to-point
        copy of b bytes takes p2p_latency_s + b / p2p_bandwidth. *_points: rows fitted;
        *_max_rel_residual: the fit's worst relative error on them.
    """

    num_ranks: int
    device: str
    comm: str
    a2a_latency_s: float
    a2a_bandwidth: float
    p2p_latency_s: float
    p2p_bandwidth: float
    a2a_points: int
    p2p_points: int
    a2a_max_rel_residual: float
    p2p_max_rel_residual: float
    source: str

    def fair_overrides(self) -> dict[str, float]:
        """Keyword overrides for `FairCosts.for_model` (all-to-all term, weight-move rate)."""
        return {"a2a_bandwidth": self.a2a_bandwidth, "a2a_latency_s": self.a2a_latency_s,
                "link_bandwidth": self.p2p_bandwidth}

    def hardware(self, base: str | HardwareSpec = "h200x8") -> HardwareSpec:
        """`base` at this host's G ranks, its link rate (intra_node_bw) the p2p bandwidth."""
        spec = hardware_preset(base) if isinstance(base, str) else base
        spec = spec.with_ranks(self.num_ranks)
        return dataclasses.replace(
            spec, name=f"{spec.name}-measured-g{self.num_ranks}", intra_node_bw=self.p2p_bandwidth,
            source=f"links measured: {self.source} on {self.device} ({self.comm}); the rest "
                   f"{spec.source}")

    def to_json(self) -> dict:
        return {"kind": LINKS_FORMAT, "version": 1, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def fit_links(source: str | Path | dict) -> LinkCalibration:
    """Fit `LinkCalibration` to a2a_bench's JSON (a path or the parsed object)."""
    data = read_a2a(source)
    meta = data["meta"]
    a2a_lat, a2a_bw, a2a_res = _fit(data["a2a"], f"{data['name']}: all_to_all")
    if data["p2p"].shape[0] == 1:  # one size: its rate, no latency term
        (size, seconds), = data["p2p"]
        p2p_lat, p2p_bw, p2p_res = 0.0, size / seconds, 0.0
    else:
        p2p_lat, p2p_bw, p2p_res = _fit(data["p2p"], f"{data['name']}: p2p")
    return LinkCalibration(
        num_ranks=int(meta["world"]), device=str(meta.get("device", "?")),
        comm=str(meta.get("comm", "?")), a2a_latency_s=a2a_lat, a2a_bandwidth=a2a_bw,
        p2p_latency_s=p2p_lat, p2p_bandwidth=p2p_bw, a2a_points=int(data["a2a"].shape[0]),
        p2p_points=int(data["p2p"].shape[0]), a2a_max_rel_residual=a2a_res,
        p2p_max_rel_residual=p2p_res, source=f"experiments/comm/a2a_bench.py ({data['name']})")


def load_links(path: str | Path) -> LinkCalibration:
    """Read a file written by `LinkCalibration.save` (errors name the file and the field)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"links file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(payload, dict) or payload.get("kind") != LINKS_FORMAT:
        raise ValueError(f"{path}: field 'kind' must be {LINKS_FORMAT!r} (a file written by "
                         "`probe calibrate-links`)")
    payload = {k: v for k, v in payload.items() if k not in ("kind", "version")}
    names = {f.name for f in dataclasses.fields(LinkCalibration)}
    missing, unknown = names - set(payload), set(payload) - names
    if missing or unknown:
        raise ValueError(f"{path}: missing field(s) {sorted(missing)}, unknown {sorted(unknown)}")
    for key in ("a2a_bandwidth", "p2p_bandwidth"):
        _number(payload[key], f"{path}: {key}")
    for key in ("a2a_latency_s", "p2p_latency_s"):
        _number(payload[key], f"{path}: {key}", positive=False)
        if payload[key] < 0:
            raise ValueError(f"{path}: {key} must be >= 0, got {payload[key]!r}")
    return LinkCalibration(**payload)
