"""Calibrated costs for the fair comparison (probe.sim.fair): one place for every constant.

Shape legend: S source ranks (= G), E experts, G ranks.

What a layer costs here, and where each number comes from (`CONSTANTS` holds the figures with
their sources; `FairCosts.constants_table()` prints them for reports):

* Expert compute: the MEASURED grouped-GEMM table of probe/sim/h200_calibration.json
  (`models[m].experts[*]`: tokens per expert -> seconds per expert, bf16, torch._grouped_mm,
  16 local experts, one H200), linearly interpolated between measured points, proportional to
  the first point below it and extrapolated along the last segment above it. A copy with no
  token costs nothing (its GEMM group is empty). A rank's compute is the sum over its physical
  copies of table(tokens of the copy). This replaces the planner's alpha + beta n line, which
  over-states small batches' slope: decode sits on the flat part of the table (about 20 us per
  expert up to ~200 tokens for gpt-oss-120b).
* Dispatch / combine (all-to-all): per collective, `a2a_latency_s` + (largest per-rank
  max(in, out) bytes) / `a2a_bandwidth`. The bandwidth is DeepEP V1's published intranode EP8
  normal-kernel bottleneck bandwidth (README, "Normal kernels with NVLink and RDMA
  forwarding" table: dispatch 153 GB/s, combine 158 GB/s on H800, ~160 GB/s NVLink), i.e. ~96%
  of the link, scaled here to the H200's 450 GB/s per direction (0.96 x 450 = 430 GB/s). The
  latency term is NOT a published intranode figure: DeepEP V1's low-latency table (EP8, 128
  tokens, hidden 7168, top-8, pure RDMA) gives 77 us dispatch and 114 us combine, nearly all of
  it bandwidth (98 / 127 GB/s); we take 10 us per collective as an assumption for the fixed
  part of one NVLink all-to-all (kernel launch + barrier), and say so in the report. Ranks
  synchronise at both collectives, so a layer's MoE time is dispatch + max-rank compute +
  combine. Token-expert pairs are counted (no deduplication), like probe's cost model.
* Attention: the measured per-layer decode points of the calibration (KV length 2048, full
  attention). GPT-OSS alternates sliding-window (128 tokens) and full-attention layers
  (probe.specs has no layer-type field; the model card's layout is half and half). A sliding
  layer is approximated as the measured time minus the KV read that the window saves:
  b x (2048 - 128) x kv_bytes_per_token / HBM bandwidth (kv bytes = 2 x kv_heads x head_dim x 2).
  The model's mean attention per layer is then the mean of the two layer types. Chunked
  prefill uses the measured (chunk, seconds) points (attention within the chunk only); a
  sliding layer there is taken as linear in the chunk at the 1024-token point's rate.
* Across nodes (ep > 8, nodes of 8 ranks, `for_model(..., num_ranks=32 or 64)`): a rank's
  dispatch / combine bytes are split into intra-node (NVLink, as above) and inter-node (RDMA)
  bytes; one collective costs `inter_a2a_latency_s` + max over ranks of max(intra bytes /
  `a2a_bandwidth`, inter bytes / `inter_a2a_bandwidth`) (the two networks run in parallel).
  The RDMA rate is the h200x8-nN presets' 50 GB/s per GPU per direction (one 400 Gb/s NIC);
  DeepEP V1's README reports 43-58 GB/s RDMA bottleneck bandwidth for its internode normal
  kernels at EP16-EP64 on such NICs, i.e. about the link. The 25 us latency is ASSUMED (twice
  the intranode figure). Token-expert pairs are counted: DeepEP's per-node deduplication is
  not modelled (every policy pays the same way for it). Weight movement (EPLB re-plans) then
  runs at the RDMA rate: most copies come from another node.
* Weight movement: one expert's bytes over the NVLink rate of probe's hardware preset (450 GB/s
  per direction, datasheet).
* DeepSeek-V3 has no measured table: `for_model("deepseek-v3", ...)` costs it with
  qwen3-235b-a22b's measurements (`FairCosts.scaled_from`): attention and predictor as
  measured for qwen3 (MLA is not modelled), the expert table's flat part (weight read and
  launch) scaled by the ratio of expert bytes (FP8: 1.17x) and the rest (the GEMM) by the
  ratio of expert FLOPs (2.33x, at bf16 rate: FP8 GEMMs are not measured).
* Predictor (per layer, on the H200): results/predictor/report.md "Cost per layer", triton
  form at H = 256: gpt-oss-120b 18.8 / 22.5 / 46.6 us at T = 512 / 1024 / 8192 tokens per
  rank, qwen3-235b-a22b 23.9 / 28.1 / 60.2 us; interpolated linearly in T.
* Planner: the greedy kernel, 19.7 us per layer at ep = 8 (results/planner_speed.md, CPU, one
  core), 113.3 / 270.1 us at ep = 32 / 64 with 256 experts (results/scale.json, the same
  kernel; `planner_kernel_time(G, E)`, other shapes the ep = 8 figure). A host plan costs the
  runtime's lean host path without the gap bound (`LeanGreedy(bound=False)`, what
  probe.runtime.device_plan runs: inputs in, plan out), MEASURED against the kernel in one run
  (results/lean_speed.md, the dev box): 0.77x the kernel at ep = 8 / 128 experts, 0.94x at
  ep = 32 and 64 / 256 (the kernel's own call passes its ~20 arrays through Numba's
  dispatcher, the lean path makes one compiled call; `planner_host_factor_at(G, E)`, other
  shapes the largest measured factor), in series in host mode.
  Side-stream mode (`FairCosts.side_planner_seconds`) charges the latency of planning ONE
  layer, the faster of two real paths: the host path above plus a host round trip
  (`host_round_trip_s`, MEASURED 16 us on an H100), or the numba.cuda greedy MEASURED on one H200
  (results/h200/gpu_greedy: CUDA-graph replay of a 32-layer launch, 3 slots per rank, 23.4 us
  per layer at ep = 8 / 128 experts, 231.9 us at ep = 64 / 256; `planner_gpu_time(G, E)`
  interpolates linearly in G x E, holds the first point below it and extends the line above
  the last). That kernel runs one block per layer, so the 32 layers of a launch run side by
  side and one layer alone is ESTIMATED to take the whole launch (32 x the per-layer figure).
  `planner_side="gpu"` charges the per-layer figure itself (an optimistic bound), and
  `planner_gpu_s` a fixed time.
* Dispatch-time assignment (water-filling): host mode charges the Numba kernel's measured wall
  time on this machine (probe.sim.fair.waterfill_split). Side-stream mode
  (`FairCosts.assign_side_seconds`, `assign_time="latency"`, the default) charges the faster
  of that time plus the host round trip and the repository's assignment kernel
  (probe.planner.assign_cuda) MEASURED on one H200 for one layer alone
  (results/h200/run2/gpu_assign,
  replayed graph of a one-layer launch: 350.5 / 570.4 us at ep = 8 / 128 experts with 1 / 3
  extra slots, 5721 / 11133 us at ep = 64 / 256). `assign_time="gpu"` charges the per-layer
  time of its 24-layer launch (16.3 / 36.7 us, 249.3 / 506.6 us; `assign_gpu_time(G, E, k)`
  is linear in k through the 1- and 3-slot points and linear in G x E as the planner's), an
  optimistic bound; `assign_time="host"` the host time without the round trip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from probe.sim.calibration import calibrated_hardware, load_calibration
from probe.specs import ModelSpec, model_preset

__all__ = ["CONSTANTS", "ExpertTimeTable", "FairCosts", "assign_gpu_time", "planner_gpu_time",
           "planner_host_factor_at", "planner_kernel_time", "predictor_seconds"]

# Every constant the fair comparison charges, with its source.
CONSTANTS: dict[str, dict] = {
    "a2a_bandwidth": {"value": 0.96 * 450e9, "unit": "B/s",
                      "source": "DeepEP V1 README, intranode EP8 normal kernels: 153/158 GB/s "
                                "dispatch/combine on H800 (~160 GB/s NVLink), i.e. ~96% of "
                                "the link; scaled to H200's 450 GB/s per direction"},
    "a2a_latency_s": {"value": 10e-6, "unit": "s",
                      "source": "ASSUMED fixed part of one intranode all-to-all (launch + "
                                "barrier); DeepEP V1 low-latency EP8 figures (77 us dispatch, "
                                "114 us combine at 128 tokens, RDMA) are bandwidth-dominated"},
    "inter_a2a_bandwidth": {"value": 50e9, "unit": "B/s",
                            "source": "probe.specs h200x8-nN presets: one 400 Gb/s NIC per GPU; "
                                      "DeepEP V1 README internode normal kernels: 43-58 GB/s "
                                      "RDMA at EP16-EP64 (ep > 8 only)"},
    "inter_a2a_latency_s": {"value": 25e-6, "unit": "s",
                            "source": "ASSUMED fixed part of one all-to-all across nodes (twice "
                                      "the intranode figure; ep > 8 only)"},
    "link_bandwidth": {"value": 450e9, "unit": "B/s",
                       "source": "probe.specs h200x8 preset (NVLink 4, 900 GB/s bidirectional)"},
    "planner_kernel_s": {"value": 19.7e-6, "unit": "s",
                         "source": "results/planner_speed.md: greedy kernel median, ep=8, "
                                   "E=128, 3 slots (CPU, one core)"},
    "planner_kernel_s_scale": {"value": "113.3 us (ep=32, E=256), 270.1 us (ep=64, E=256)",
                               "unit": "s",
                               "source": "results/scale.json: greedy k_max=16 kernel median "
                                         "(CPU, one core, 3 slots, the harness that gives "
                                         "19.9 us at ep=8, E=128); planner_kernel_s at these "
                                         "shapes (FairCosts.for_model)"},
    "planner_host_factor": {"value": 0.769, "unit": "x",
                            "source": "MEASURED (results/lean_speed.md, dev box): the lean host "
                                      "path without the bound (LeanGreedy(bound=False), the "
                                      "runtime's host planner) over the greedy kernel's call, "
                                      "one run, ep=8, E=128"},
    "planner_host_factor_scale": {"value": "0.943x (ep=32, E=256), 0.942x (ep=64, E=256)",
                                  "unit": "x",
                                  "source": "MEASURED in the same run (results/lean_speed.md); "
                                            "planner_host_factor at these shapes "
                                            "(FairCosts.for_model)"},
    "planner_gpu_s": {"value": "23.4 us (ep=8, E=128), 231.9 us (ep=64, E=256)",
                      "unit": "s per layer",
                      "source": "results/h200/gpu_greedy: numba.cuda greedy on one H200, "
                                "CUDA-graph replay of a 32-layer launch / 32, 3 slots per "
                                "rank; linear in G x E between the two shapes, the first "
                                "point held below it (side-stream mode)"},
    "assign_gpu_s": {"value": "16.3 / 36.7 us (ep=8, E=128, +1 / +3 slots), 249.3 / 506.6 us "
                              "(ep=64, E=256)", "unit": "s per layer",
                     "source": "results/h200/run2/gpu_assign: dispatch-time assignment "
                               "kernel on one H200, CUDA-graph replay of a 24-layer launch / "
                               "24; linear in slots through 1 and 3, linear in G x E as "
                               "planner_gpu_s (side-stream mode default; a one-layer launch "
                               "took 350-570 us "
                               "at ep=8, not charged)"},
    "host_round_trip_s": {"value": 16e-6, "unit": "s",
                          "source": "MEASURED on one H100 (results/round_trip, "
                                    "experiments.planner.round_trip): a layer's load copied to "
                                    "pinned host memory, the host waiting for it, a plan copied "
                                    "back and a kernel reading it, above the two kernels alone: "
                                    "15.1-16.1 us (medians, two runs, 8-128 KB), the host doing "
                                    "nothing else meanwhile (a lower bound for a host that also "
                                    "launches the step's work); paid by a host planner or host "
                                    "assignment fed from and feeding the GPU (side mode)"},
    "planner_gpu_launch_layers": {"value": 32, "unit": "layers",
                                  "source": "results/h200/gpu_greedy: layers per measured "
                                            "launch; one block per layer, blocks run side by "
                                            "side, so one layer alone is ESTIMATED to take the "
                                            "whole launch (32 x the per-layer figure)"},
    "assign_gpu_one_layer_s": {"value": "350.5 / 570.4 us (ep=8, E=128, +1 / +3 slots), "
                                        "5721.0 / 11133.0 us (ep=64, E=256)",
                               "unit": "s per layer",
                               "source": "results/h200/run2/gpu_assign: replayed CUDA graph of "
                                         "a launch for one layer alone; interpolated as "
                                         "assign_gpu_s"},
    "sliding_window": {"value": 128, "unit": "tokens",
                       "source": "gpt-oss model card: alternating 128-token sliding-window "
                                 "and full-attention layers"},
}

# results/predictor/report.md, "Cost per layer", triton form, H = 256 (tokens per rank, us).
_PREDICTOR_US = {
    "gpt-oss-120b": ((512, 18.8), (1024, 22.5), (8192, 46.6)),
    "qwen3-235b-a22b": ((512, 23.9), (1024, 28.1), (8192, 60.2)),
}


# results/h200/gpu_greedy/gpu_greedy.json rows[*].graph_replay_us: (G, E) -> us per layer.
_PLANNER_GPU_US = {(8, 128): 23.4025, (64, 256): 231.894}
# results/scale.json, "greedy k_max=16" kernel_us: (G, E) -> us of one layer's host kernel.
_PLANNER_KERNEL_US = {(32, 256): 113.3, (64, 256): 270.1}
# results/lean_speed.json rows[*].lean_nb_over_kernel: (G, E) -> lean path / kernel.
_PLANNER_HOST_FACTOR = {(8, 128): 0.769, (32, 256): 0.943, (64, 256): 0.942}
# results/h200/run2/gpu_assign/gpu_assign.json speed[*].device_graph_us: (G, E, extra slots) -> us.
_ASSIGN_GPU_US = {(8, 128, 1): 16.3147, (8, 128, 3): 36.6573,
                  (64, 256, 1): 249.3427, (64, 256, 3): 506.6153}


# results/h200/run2/gpu_assign/gpu_assign.json speed[*]: one-layer graph replay, us.
_ASSIGN_GPU_ONE_LAYER_US = {(8, 128, 1): 350.5, (8, 128, 3): 570.4,
                            (64, 256, 1): 5721.0, (64, 256, 3): 11133.0}


def _check_ints(*named) -> None:
    """ValueError naming the first (name, value, low) whose value is not an int >= low."""
    for name, v, low in named:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def _along_size(num_ranks: int, num_experts: int, small: float, large: float) -> float:
    """Linear in G x E through the two measured shapes (8 x 128, 64 x 256); the small shape's
    value held below it, the line extended above the large one."""
    x0, x1 = 8 * 128, 64 * 256
    x = max(float(num_ranks * num_experts), x0)
    return small + (large - small) * (x - x0) / (x1 - x0)


def planner_gpu_time(num_ranks: int, num_experts: int) -> float:
    """Seconds per layer of the greedy as a GPU kernel at G ranks and E experts, from the two
    H200 measurements (CONSTANTS["planner_gpu_s"]); exact at the measured shapes."""
    _check_ints(("num_ranks", num_ranks, 1), ("num_experts", num_experts, 1))
    if (num_ranks, num_experts) in _PLANNER_GPU_US:
        return 1e-6 * _PLANNER_GPU_US[(num_ranks, num_experts)]
    return 1e-6 * _along_size(num_ranks, num_experts, _PLANNER_GPU_US[(8, 128)],
                              _PLANNER_GPU_US[(64, 256)])


def planner_kernel_time(num_ranks: int, num_experts: int) -> float:
    """Seconds of the greedy's host kernel for one layer at G ranks and E experts: measured at
    ep = 32 and 64 with 256 experts (CONSTANTS["planner_kernel_s_scale"]), else
    CONSTANTS["planner_kernel_s"] (ep = 8, 128 experts)."""
    _check_ints(("num_ranks", num_ranks, 1), ("num_experts", num_experts, 1))
    if (num_ranks, num_experts) in _PLANNER_KERNEL_US:
        return 1e-6 * _PLANNER_KERNEL_US[(num_ranks, num_experts)]
    return CONSTANTS["planner_kernel_s"]["value"]


def planner_host_factor_at(num_ranks: int, num_experts: int) -> float:
    """The lean host path's time over the greedy kernel's at G ranks and E experts: measured
    at ep = 8 / 128 experts and ep = 32, 64 / 256 (CONSTANTS["planner_host_factor"] and
    ["planner_host_factor_scale"]), other shapes the largest measured factor."""
    _check_ints(("num_ranks", num_ranks, 1), ("num_experts", num_experts, 1))
    return _PLANNER_HOST_FACTOR.get((num_ranks, num_experts),
                                    max(_PLANNER_HOST_FACTOR.values()))


def assign_gpu_time(num_ranks: int, num_experts: int, slots: int, *,
                    one_layer: bool = False) -> float:
    """Seconds per layer of the dispatch-time assignment as a GPU kernel at G ranks, E experts
    and `slots` extra slots per rank, from the four H200 measurements
    (CONSTANTS["assign_gpu_s"], per layer of a multi-layer launch; with one_layer, the
    latency of a launch for one layer alone, CONSTANTS["assign_gpu_one_layer_s"]); exact at
    the measured points."""
    table = _ASSIGN_GPU_ONE_LAYER_US if one_layer else _ASSIGN_GPU_US
    _check_ints(("num_ranks", num_ranks, 1), ("num_experts", num_experts, 1),
                ("slots", slots, 0))
    if (num_ranks, num_experts, slots) in table:
        return 1e-6 * table[(num_ranks, num_experts, slots)]
    s = max(int(slots), 1)

    def at(g, e):  # linear in slots through the 1- and 3-slot points
        one, three = table[(g, e, 1)], table[(g, e, 3)]
        return one + (three - one) * (s - 1) / 2

    return 1e-6 * _along_size(num_ranks, num_experts, at(8, 128), at(64, 256))


def predictor_seconds(model: str, tokens_per_rank: float) -> float:
    """Seconds of the predictor per layer on the H200 (linear in tokens between measured T;
    proportional below the first point would be optimistic, so the first point is a floor)."""
    if model not in _PREDICTOR_US:
        raise ValueError(f"no measured predictor cost for model {model!r}; known: "
                         f"{sorted(_PREDICTOR_US)}")
    pts = _PREDICTOR_US[model]
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    if tokens_per_rank >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return 1e-6 * (ys[-1] + slope * (tokens_per_rank - xs[-1]))
    return 1e-6 * float(np.interp(tokens_per_rank, xs, ys))


def _interp(points, x: float) -> float:
    """Piecewise linear through (x, t) points; proportional below the first, the last
    segment extended above the last."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if x < xs[0]:
        return ys[0] * x / xs[0]
    if x > xs[-1]:
        return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1])
    return float(np.interp(x, xs, ys))


@dataclass(frozen=True)
class ExpertTimeTable:
    """Seconds of one expert's grouped GEMM vs its tokens, from measured points.

    tokens: float64 [P] strictly increasing (> 0); seconds: float64 [P] (>= 0).

    >>> t = ExpertTimeTable(np.array([1.0, 2.0, 4.0]), np.array([1e-5, 1e-5, 2e-5]))
    >>> t(np.array([0, 1, 3, 4, 6])).round(8).tolist()
    [0.0, 1e-05, 1.5e-05, 2e-05, 3e-05]
    """

    tokens: np.ndarray
    seconds: np.ndarray

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens, dtype=np.float64)
        seconds = np.asarray(self.seconds, dtype=np.float64)
        if tokens.ndim != 1 or tokens.shape != seconds.shape or tokens.size < 2:
            raise ValueError("tokens and seconds must be 1-D arrays of the same length >= 2")
        if np.any(tokens <= 0) or np.any(np.diff(tokens) <= 0):
            raise ValueError("tokens must be positive and strictly increasing")
        if np.any(seconds < 0) or not np.all(np.isfinite(seconds)):
            raise ValueError("seconds must be finite and >= 0")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "seconds", seconds)

    def __call__(self, n: np.ndarray) -> np.ndarray:
        """float64 like `n`: seconds for n tokens (0 for n <= 0)."""
        n = np.asarray(n, dtype=np.float64)
        xs, ys = self.tokens, self.seconds
        out = np.interp(n, xs, ys)
        below = n < xs[0]
        out = np.where(below, ys[0] * n / xs[0], out)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        out = np.where(n > xs[-1], ys[-1] + slope * (n - xs[-1]), out)
        return np.where(n > 0, out, 0.0)

    @classmethod
    def from_calibration(cls, model: str, path=None) -> ExpertTimeTable:
        data = load_calibration(path)
        entry = data["models"].get(model)
        if not entry or "experts" not in entry:
            raise ValueError(f"no measured expert table for model {model!r}")
        rows = sorted(entry["experts"], key=lambda r: r["tokens_per_expert"])
        return cls(np.array([r["tokens_per_expert"] for r in rows], dtype=np.float64),
                   np.array([r["seconds_per_expert"] for r in rows], dtype=np.float64))


@dataclass(frozen=True)
class FairCosts:
    """All costs of one model at ep = G on H200s (module docstring)."""

    model: ModelSpec
    num_ranks: int
    experts: ExpertTimeTable
    attention_points: tuple[tuple[float, float], ...]  # (per-rank batch, seconds), full attn
    prefill_points: tuple[tuple[float, float], ...]  # (chunk tokens, seconds), full attn
    kv_len: int
    sliding_fraction: float  # share of layers with sliding-window attention
    sliding_window: int
    kv_bytes_per_token: int
    hbm_bw: float
    a2a_bandwidth: float = CONSTANTS["a2a_bandwidth"]["value"]
    a2a_latency_s: float = CONSTANTS["a2a_latency_s"]["value"]
    link_bandwidth: float = CONSTANTS["link_bandwidth"]["value"]
    planner_kernel_s: float = CONSTANTS["planner_kernel_s"]["value"]
    planner_host_factor: float = CONSTANTS["planner_host_factor"]["value"]
    planner_gpu_s: float | None = None  # fixed side-mode planner seconds (None: planner_side)
    planner_side: str = "latency"  # side mode's planner charge: "latency" or "gpu" (batched)
    assign_time: str = "latency"  # side mode's assignment charge: "latency", "gpu", "host"
    assign_side_s: float | None = None  # fixed side-mode assignment seconds (None: assign_time)
    host_round_trip_s: float = CONSTANTS["host_round_trip_s"]["value"]
    calibrated_as: str = ""  # the calibrated model whose costs these are ("": model.name)
    ranks_per_node: int = 8
    inter_a2a_bandwidth: float = CONSTANTS["inter_a2a_bandwidth"]["value"]
    inter_a2a_latency_s: float = CONSTANTS["inter_a2a_latency_s"]["value"]

    def __post_init__(self) -> None:
        if self.assign_time not in ("latency", "gpu", "host"):
            raise ValueError("assign_time must be 'latency', 'gpu' or 'host', got "
                             f"{self.assign_time!r}")
        if self.planner_side not in ("latency", "gpu"):
            raise ValueError(f"planner_side must be 'latency' or 'gpu', got "
                             f"{self.planner_side!r}")
        if self.planner_gpu_s is not None and not self.planner_gpu_s >= 0:
            raise ValueError(f"planner_gpu_s must be >= 0 or None, got {self.planner_gpu_s!r}")
        if self.assign_side_s is not None and not self.assign_side_s >= 0:
            raise ValueError(f"assign_side_s must be >= 0 or None, got {self.assign_side_s!r}")

    @classmethod
    def for_model(cls, name: str, num_ranks: int = 8, calibration=None, *,
                  routing: ModelSpec | None = None, **overrides):
        """Costs of preset `name` at `num_ranks` ranks (nodes of 8 above 8: RDMA between them,
        re-plan weights at the RDMA rate). routing: another ModelSpec (e.g. a small recorded
        model's experts and top-k) costed with `name`'s calibrated numbers. "deepseek-v3" (not
        calibrated) is costed from qwen3-235b-a22b's numbers (module docstring)."""
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
        if num_ranks > 8 and num_ranks % 8:
            raise ValueError(f"num_ranks above 8 must be whole nodes of 8, got {num_ranks}")
        if num_ranks > 8:
            overrides.setdefault("link_bandwidth", CONSTANTS["inter_a2a_bandwidth"]["value"])
        if name == "deepseek-v3" and routing is None:
            return cls.scaled_from("qwen3-235b-a22b", model_preset(name), num_ranks,
                                   calibration, **overrides)
        model = model_preset(name) if routing is None else routing
        overrides.setdefault("planner_kernel_s", planner_kernel_time(num_ranks,
                                                                     model.num_experts))
        overrides.setdefault("planner_host_factor", planner_host_factor_at(num_ranks,
                                                                           model.num_experts))
        data = load_calibration(calibration)
        entry = data["models"].get(name)
        if not entry or "attention" not in entry:
            raise ValueError(f"no calibration for model {name!r}")
        shape = entry["shape"]
        att = entry["attention"]["decode"]
        kv_bytes = 2 * int(shape["num_kv_heads"]) * int(shape["head_dim"]) * 2
        sliding = 0.5 if name.startswith("gpt-oss") else 0.0
        return cls(model=model, num_ranks=num_ranks,
                   experts=ExpertTimeTable.from_calibration(name, calibration),
                   attention_points=tuple((float(r["batch"]), float(r["seconds"]))
                                          for r in att),
                   prefill_points=tuple((float(r["chunk"]), float(r["seconds"]))
                                        for r in entry["attention"]["prefill"]),
                   kv_len=int(att[0]["kv_len"]), sliding_fraction=sliding,
                   sliding_window=int(CONSTANTS["sliding_window"]["value"]),
                   kv_bytes_per_token=kv_bytes, hbm_bw=float(data["copy"]["bandwidth"]),
                   calibrated_as=name, **overrides)

    @classmethod
    def scaled_from(cls, calibrated: str, model: ModelSpec, num_ranks: int, calibration=None,
                    **overrides):
        """Costs of `model` (not calibrated) from `calibrated`'s measurements: its attention and
        predictor, its expert table with the flat part (the table's minimum: weight read and
        launch) scaled by the ratio of expert bytes and the rest by the ratio of expert FLOPs.
        """
        base = cls.for_model(calibrated, num_ranks, calibration, routing=model, **overrides)
        ref = model_preset(calibrated)
        r_bytes = model.expert_bytes / ref.expert_bytes
        r_flops = model.expert_params / ref.expert_params
        flat = float(base.experts.seconds.min())
        seconds = r_bytes * flat + r_flops * (base.experts.seconds - flat)
        return dataclasses.replace(base, experts=ExpertTimeTable(base.experts.tokens, seconds))

    @property
    def cost_name(self) -> str:
        return self.calibrated_as or self.model.name

    @cached_property
    def planner_cost(self):
        """The planner's linear CostModel (calibrated alpha, beta; datasheet links)."""
        from probe.planner.cost import CostModel

        hw = calibrated_hardware("h200x8", self.cost_name).with_ranks(self.num_ranks)
        return CostModel.from_specs(self.model, hw)

    def fitted_cost(self, max_tokens: float):
        """The planner's CostModel with alpha, beta refitted to the measured expert table around
        an operating point: least squares over the table's points up to the first point at or
        above `max_tokens` tokens per copy (at least three points), alpha >= 0, beta at least
        1e-3 of the datasheet fit's (water-filling divides by it). Cached per bracket."""
        tokens = self.experts.tokens
        last = max(2, int(np.searchsorted(tokens, max(float(max_tokens), 1.0))))
        last = min(last, tokens.size - 1)
        cache = self.__dict__.setdefault("_fits", {})
        if last not in cache:
            x, y = tokens[:last + 1], self.experts.seconds[:last + 1]
            beta, alpha = np.polyfit(x, y, 1)
            base = self.planner_cost
            beta = max(float(beta), 1e-3 * base.beta)
            alpha = max(float(alpha), 0.0)
            cache[last] = dataclasses.replace(base, alpha=alpha, beta=beta)
        return cache[last]

    def planner_gpu_seconds(self) -> float:
        """The greedy's GPU seconds per layer (side mode): `planner_gpu_s` when given, else
        planner_gpu_time at this G and E."""
        if self.planner_gpu_s is not None:
            return float(self.planner_gpu_s)
        return planner_gpu_time(self.num_ranks, self.model.num_experts)

    def side_planner_seconds(self) -> float:
        """The planner's seconds per layer charged in side mode: `planner_gpu_s` when given;
        planner_side "gpu": the GPU kernel's per-layer time in a multi-layer launch
        (optimistic: a runtime plans one layer at a time); "latency" (default): the faster of
        the two real ways to plan ONE layer: the host path (planner_kernel_s x
        planner_host_factor, as host mode) plus a host round trip, or the GPU kernel's
        one-layer latency (estimated as the whole measured launch, planner_gpu_launch_layers
        x the per-layer figure)."""
        if self.planner_gpu_s is not None:
            return float(self.planner_gpu_s)
        gpu = self.planner_gpu_seconds()
        if self.planner_side == "gpu":
            return gpu
        host = self.planner_kernel_s * self.planner_host_factor + self.host_round_trip_s
        return min(host, CONSTANTS["planner_gpu_launch_layers"]["value"] * gpu)

    def assign_gpu_seconds(self, slots: int) -> float:
        """The dispatch-time assignment's GPU seconds per layer at `slots` extra slots per
        rank in a multi-layer launch (side mode, assign_time "gpu")."""
        return assign_gpu_time(self.num_ranks, self.model.num_experts, slots)

    def assign_side_seconds(self, slots: int, host_s: float) -> float:
        """The dispatch-time assignment's seconds per layer in side mode, given the host
        kernel's measured `host_s`: assign_time "gpu" the multi-layer launch's per-layer time
        (optimistic), "host" host_s, "latency" (default) the faster of host_s plus a host
        round trip and the GPU kernel's one-layer latency; `assign_side_s` when given."""
        if self.assign_side_s is not None:
            return float(self.assign_side_s)
        if self.assign_time == "gpu":
            return self.assign_gpu_seconds(slots)
        if self.assign_time == "host":
            return float(host_s)
        one = assign_gpu_time(self.num_ranks, self.model.num_experts, slots, one_layer=True)
        return min(float(host_s) + self.host_round_trip_s, one)

    @property
    def expert_bytes(self) -> int:
        return self.model.expert_bytes

    @property
    def expert_transfer_s(self) -> float:
        return self.expert_bytes / self.link_bandwidth

    def attention_seconds(self, tokens: float, phase: str = "decode") -> float:
        """Mean attention seconds per layer on a rank: `tokens` decode requests (phase
        "decode") or a prefill chunk of `tokens` tokens (phase "prefill").

        Decode: a sliding layer is the measured full-attention time minus the KV read the
        window saves. Prefill: a sliding layer is taken as linear in the chunk at the smallest
        measured chunk's rate (1024 tokens, where the causal part is small), capped by the
        full-attention time; the measured points attend within the chunk only.
        """
        if phase not in ("decode", "prefill"):
            raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
        points = self.attention_points if phase == "decode" else self.prefill_points
        full = _interp(points, tokens)
        if phase == "decode":
            saved = tokens * max(self.kv_len - self.sliding_window, 0) \
                * self.kv_bytes_per_token / self.hbm_bw
            sliding = max(full - saved, 0.0)
        else:
            x0, t0 = points[0]
            sliding = min(full, t0 * tokens / x0)
        return (1 - self.sliding_fraction) * full + self.sliding_fraction * sliding

    def predictor_s(self, tokens_per_rank: float) -> float:
        return predictor_seconds(self.cost_name, tokens_per_rank)

    def compute_per_rank(self, tokens: np.ndarray, copies: np.ndarray) -> np.ndarray:
        """float64 [G]: expert seconds per rank; tokens int [G, E] per rank and expert, split
        evenly over the rank's `copies` int [G, E] of each expert (>= 1 where tokens > 0)."""
        c = np.maximum(copies, 1)
        per_copy = self.experts(tokens / c) * c
        return np.where(tokens > 0, per_copy, 0.0).sum(axis=1)

    def a2a_seconds(self, assignment: np.ndarray) -> tuple[float, float]:
        """(dispatch, combine) seconds of an assignment int [S, E, G]."""
        flow = assignment.sum(axis=1).astype(np.float64)  # [S, G]
        np.fill_diagonal(flow, 0.0)
        if self.num_ranks <= self.ranks_per_node:
            worst = float(np.maximum(flow.sum(axis=0), flow.sum(axis=1)).max())
            volume = worst * self.model.token_bytes / self.a2a_bandwidth
            return self.a2a_latency_s + volume, self.a2a_latency_s + volume
        node = np.arange(self.num_ranks) // self.ranks_per_node
        same = node[:, None] == node[None, :]
        intra, inter = np.where(same, flow, 0.0), np.where(same, 0.0, flow)
        worst_intra = np.maximum(intra.sum(axis=0), intra.sum(axis=1))  # [G]
        worst_inter = np.maximum(inter.sum(axis=0), inter.sum(axis=1))
        volume = float(np.maximum(worst_intra / self.a2a_bandwidth,
                                  worst_inter / self.inter_a2a_bandwidth).max()) \
            * self.model.token_bytes
        return self.inter_a2a_latency_s + volume, self.inter_a2a_latency_s + volume

    def moe_seconds(self, assignment: np.ndarray, copies: np.ndarray) -> dict:
        """MoE time of a layer: dispatch + max-rank compute + combine, with its parts
        (compute_mean: the mean rank's compute, what the same compute spread evenly over the
        ranks would take)."""
        tokens = assignment.sum(axis=0).T  # [G, E]
        compute = self.compute_per_rank(tokens, copies)
        dispatch, combine = self.a2a_seconds(assignment)
        per_rank = tokens.sum(axis=1).astype(np.float64)  # [G] (the same integers)
        mean = per_rank.mean()
        return {"moe": dispatch + float(compute.max()) + combine,
                "compute": float(compute.max()), "compute_mean": float(compute.mean()),
                "dispatch": dispatch, "combine": combine,
                "imbalance": float(per_rank.max() / mean) if mean > 0 else 1.0}

    def constants_table(self) -> list[dict]:
        rows = [{"name": k, "value": v["value"], "unit": v["unit"], "source": v["source"]}
                for k, v in CONSTANTS.items()]
        rows.append({"name": "expert_time_table", "value": f"{self.experts.tokens.size} points",
                     "unit": "tokens -> s",
                     "source": "probe/sim/h200_calibration.json models[m].experts"})
        rows.append({"name": "predictor_us", "value": str(_PREDICTOR_US.get(self.cost_name)),
                     "unit": "(T, us)",
                     "source": "results/predictor/report.md 'Cost per layer', triton, H=256"})
        return rows
