"""Model and hardware descriptions, with named presets.

Glossary used across probe (docstrings, comments and names alike):
    L  MoE layers          E  routed experts per layer     K  experts per token (top-k)
    G  GPUs (EP ranks)     S  source ranks (= G)           T  tokens
    R  extra replica slots per rank
    W  bytes of one expert's weights      F  FLOPs per token per expert

Both specs are frozen dataclasses; derived values are properties. Presets live in two
registries, `MODEL_PRESETS` and `HARDWARE_PRESETS`, looked up with `model_preset(name)` and
`hardware_preset(name)`. Figures are the models' published configs and the GPUs' datasheets;
measured calibration (probe.sim.calibration) replaces the datasheet efficiency curve when present.

>>> m = model_preset("gpt-oss-120b")
>>> (m.num_experts, m.top_k, m.num_layers, m.expert_bytes)
(128, 4, 36, 49766400)
>>> hardware_preset("h200x8-n4").num_ranks
32
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "HARDWARE_PRESETS",
    "MODEL_PRESETS",
    "HardwareSpec",
    "ModelSpec",
    "hardware_preset",
    "load_spec",
    "model_preset",
    "save_spec",
]


# Storage formats of expert weights (probe.runtime.quant keeps tensors in them).
WEIGHT_FORMATS = ("fp32", "bf16", "fp8_block", "mxfp4")
MXFP4_BLOCK = 32  # weights sharing one MXFP4 scale, along a row
FP8_BLOCK = 128  # side of the square tile sharing one block-scaled FP8 scale


def check_weight_format(fmt: str) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}")


def weight_bytes(fmt: str, rows: int, cols: int) -> int:
    """Bytes of one [rows, cols] weight matrix stored in `fmt`, scales included: fp32 4 and
    bf16 2 per weight; fp8_block 1 per weight plus one fp32 scale per 128 x 128 tile; mxfp4
    half a byte per weight plus one uint8 exponent per 32 weights of a row (17/32 bytes)."""
    check_weight_format(fmt)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"matrix shape must be positive, got [{rows}, {cols}]")
    if fmt == "fp32":
        return 4 * rows * cols
    if fmt == "bf16":
        return 2 * rows * cols
    if fmt == "fp8_block":
        return rows * cols + 4 * math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)
    if cols % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 needs cols divisible by {MXFP4_BLOCK}, got {cols}")
    return rows * cols // 2 + rows * (cols // MXFP4_BLOCK)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of an MoE model, as far as expert placement cares.

    Attributes:
        name: preset or user name.
        num_layers: number of MoE layers (dense layers are not counted).
        num_experts: routed experts per MoE layer (E).
        top_k: experts per token (K).
        hidden: model width D.
        expert_ffn: intermediate width of one expert.
        bytes_per_weight: 2 for BF16, 1 for FP8.
        bytes_per_activation: bytes per hidden element sent in dispatch and combine.
        num_matrices: weight matrices per expert (3 for gated SwiGLU: gate, up, down).
        num_shared_experts: always-active experts (not balanced, reported only).
        weight_format: storage format of the expert weights (one of WEIGHT_FORMATS), when it
            is not plain bytes_per_weight per weight: "mxfp4" (GPT-OSS as released) or
            "fp8_block" (DeepSeek-V3) count their scales too. None: bytes_per_weight.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    bytes_per_weight: int = 2
    bytes_per_activation: int = 2
    num_matrices: int = 3
    num_shared_experts: int = 0
    weight_format: str | None = None

    def __post_init__(self) -> None:
        if self.weight_format is not None:
            check_weight_format(self.weight_format)
        for name in ("num_layers", "num_experts", "top_k", "hidden", "expert_ffn",
                     "bytes_per_weight", "bytes_per_activation", "num_matrices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"ModelSpec.top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")

    @property
    def expert_params(self) -> int:
        """Weights of one expert (num_matrices x hidden x expert_ffn)."""
        return self.num_matrices * self.hidden * self.expert_ffn

    @property
    def expert_bytes(self) -> int:
        """W: bytes moved to replicate one expert."""
        if self.weight_format is None:
            return self.expert_params * self.bytes_per_weight
        return self.num_matrices * weight_bytes(self.weight_format, self.expert_ffn, self.hidden)

    @property
    def flops_per_token(self) -> int:
        """F: FLOPs one token costs in one expert (multiply-add counted as 2)."""
        return 2 * self.expert_params

    @property
    def token_bytes(self) -> int:
        """Bytes one token's hidden state occupies in dispatch or combine."""
        return self.hidden * self.bytes_per_activation


def _default_efficiency() -> tuple[tuple[int, float], ...]:
    # Grouped-GEMM efficiency eta(n) vs tokens per expert: a datasheet-style guess (small n is
    # memory bound and padded to tiles), replaced by measured points when calibrated.
    return ((1, 0.004), (8, 0.03), (32, 0.12), (64, 0.22), (128, 0.38), (256, 0.55),
            (512, 0.68), (1024, 0.75), (4096, 0.8))


@dataclass(frozen=True)
class HardwareSpec:
    """A cluster of GPUs used as one expert-parallel group.

    Bandwidths are bytes per second per GPU, one direction. `source` says where the numbers
    come from ("datasheet" or the command that measured them).

    Attributes:
        name: preset or user name.
        num_ranks: GPUs in the EP group (G).
        ranks_per_node: GPUs per node; ranks on one node talk over intra_node_bw.
        intra_node_bw: NVLink/NVSwitch bandwidth per GPU per direction.
        inter_node_bw: network bandwidth per GPU per direction.
        peak_flops: dense BF16 FLOP/s of one GPU.
        hbm_bw: HBM bandwidth of one GPU.
        launch_overhead_s: fixed cost per active expert beyond its weight read (tile setup).
        gemm_efficiency: points (tokens per expert, eta) of the grouped-GEMM efficiency curve.
        source: provenance of the figures.
    """

    name: str
    num_ranks: int
    ranks_per_node: int
    intra_node_bw: float
    inter_node_bw: float
    peak_flops: float
    hbm_bw: float
    launch_overhead_s: float = 2e-6
    gemm_efficiency: tuple[tuple[int, float], ...] = field(default_factory=_default_efficiency)
    source: str = "datasheet"

    def __post_init__(self) -> None:
        for name in ("num_ranks", "ranks_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"HardwareSpec.{name} must be a positive int, got {value!r}")
        if self.num_ranks % self.ranks_per_node and self.num_ranks > self.ranks_per_node:
            raise ValueError(
                f"HardwareSpec.num_ranks ({self.num_ranks}) is not a multiple of "
                f"ranks_per_node ({self.ranks_per_node})")
        for name in ("intra_node_bw", "inter_node_bw", "peak_flops", "hbm_bw"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwareSpec.{name} must be a positive number, got {value!r}")
        points = tuple((int(n), float(e)) for n, e in self.gemm_efficiency)
        if not points or any(n <= 0 or not 0 < e <= 1 for n, e in points):
            raise ValueError("HardwareSpec.gemm_efficiency needs points (tokens > 0, 0 < eta <= 1)")
        if any(a[0] >= b[0] for a, b in itertools.pairwise(points)):
            raise ValueError("HardwareSpec.gemm_efficiency tokens must be strictly increasing")
        object.__setattr__(self, "gemm_efficiency", points)

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_ranks // self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def link_bw(self, src: int, dst: int) -> float:
        """Bandwidth of the path from rank src to rank dst (bytes/s, one direction)."""
        if self.node_of(src) == self.node_of(dst):
            return self.intra_node_bw
        return self.inter_node_bw

    def eta(self, tokens: float) -> float:
        """Grouped-GEMM efficiency at `tokens` tokens per expert (log-linear interpolation)."""
        points = self.gemm_efficiency
        if tokens <= points[0][0]:
            return points[0][1] * max(tokens, 0.0) / points[0][0] if tokens > 0 else points[0][1]
        if tokens >= points[-1][0]:
            return points[-1][1]
        for (n0, e0), (n1, e1) in itertools.pairwise(points):
            if n0 <= tokens <= n1:
                t = (math.log(tokens) - math.log(n0)) / (math.log(n1) - math.log(n0))
                return e0 + t * (e1 - e0)
        raise AssertionError("unreachable")

    def with_ranks(self, num_ranks: int) -> HardwareSpec:
        """The same GPUs and links, `num_ranks` of them (nodes of ranks_per_node)."""
        nodes = max(1, num_ranks // self.ranks_per_node)
        base = self.name.split("-n")[0]
        name = base if nodes == 1 else f"{base}-n{nodes}"
        return dataclasses.replace(self, name=name, num_ranks=num_ranks)


MODEL_PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("gpt-oss-120b", num_layers=36, num_experts=128, top_k=4, hidden=2880,
                  expert_ffn=2880),
        # The same with its experts as released: MXFP4, 17/32 bytes per weight with scales.
        ModelSpec("gpt-oss-120b-mxfp4", num_layers=36, num_experts=128, top_k=4, hidden=2880,
                  expert_ffn=2880, weight_format="mxfp4"),
        ModelSpec("qwen3-235b-a22b", num_layers=94, num_experts=128, top_k=8, hidden=4096,
                  expert_ffn=1536),
        # 61 layers, the first 3 dense; FP8 expert weights; one shared expert.
        ModelSpec("deepseek-v3", num_layers=58, num_experts=256, top_k=8, hidden=7168,
                  expert_ffn=2048, bytes_per_weight=1, num_shared_experts=1),
        ModelSpec("mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, hidden=4096,
                  expert_ffn=14336),
        ModelSpec("olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden=2048,
                  expert_ffn=1024),
    )
}


def _gpu_cluster(name: str, nodes: int, *, peak_flops: float, hbm_bw: float) -> HardwareSpec:
    full = name if nodes == 1 else f"{name}-n{nodes}"
    # NVLink 4 via NVSwitch: 900 GB/s bidirectional per GPU, 450 GB/s each way.
    # Network: one 400 Gb/s NIC per GPU, 50 GB/s each way.
    return HardwareSpec(full, num_ranks=8 * nodes, ranks_per_node=8, intra_node_bw=450e9,
                        inter_node_bw=50e9, peak_flops=peak_flops, hbm_bw=hbm_bw)


HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    spec.name: spec
    for nodes in (1, 2, 4, 8, 16, 32)
    for spec in (
        # H200 SXM: 989 TFLOP/s dense BF16, 4.8 TB/s HBM3e. H100 SXM: same compute, 3.35 TB/s.
        _gpu_cluster("h200x8", nodes, peak_flops=989e12, hbm_bw=4.8e12),
        _gpu_cluster("h100x8", nodes, peak_flops=989e12, hbm_bw=3.35e12),
    )
}


def _lookup(registry: dict, name: str, what: str):
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} preset {name!r}; known: {known}") from None


def model_preset(name: str) -> ModelSpec:
    """The ModelSpec registered as `name` (ValueError listing the known names otherwise)."""
    return _lookup(MODEL_PRESETS, name, "model")


def hardware_preset(name: str) -> HardwareSpec:
    """The HardwareSpec registered as `name` (ValueError listing the known names otherwise)."""
    return _lookup(HARDWARE_PRESETS, name, "hardware")


def save_spec(spec: ModelSpec | HardwareSpec, path: str | Path) -> None:
    """Write a spec as JSON with a `kind` field ("model" or "hardware")."""
    kind = "model" if isinstance(spec, ModelSpec) else "hardware"
    payload = {"kind": kind, **dataclasses.asdict(spec)}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def load_spec(path: str | Path) -> ModelSpec | HardwareSpec:
    """Read a spec written by `save_spec`; errors name the file and the offending field."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"spec file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object")
    kind = payload.pop("kind", None)
    cls = {"model": ModelSpec, "hardware": HardwareSpec}.get(kind)
    if cls is None:
        raise ValueError(f"{path}: field 'kind' must be 'model' or 'hardware', got {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(payload) - names
    if unknown:
        raise ValueError(f"{path}: unknown {kind} field(s) {sorted(unknown)}")
    if "gemm_efficiency" in payload:
        payload["gemm_efficiency"] = tuple(tuple(p) for p in payload["gemm_efficiency"])
    try:
        return cls(**payload)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from None


def resolve_model(spec: str | ModelSpec) -> ModelSpec:
    """A preset name, a JSON path, or a ModelSpec -> ModelSpec (for CLI arguments)."""
    return _resolve(spec, ModelSpec, MODEL_PRESETS, "model")


def resolve_hardware(spec: str | HardwareSpec) -> HardwareSpec:
    """A preset name, a JSON path, or a HardwareSpec -> HardwareSpec (for CLI arguments)."""
    return _resolve(spec, HardwareSpec, HARDWARE_PRESETS, "hardware")


def _resolve(spec, cls, registry, what):
    if isinstance(spec, cls):
        return spec
    if spec in registry:
        return registry[spec]
    if str(spec).endswith(".json") or Path(str(spec)).is_file():
        loaded = load_spec(spec)
        if not isinstance(loaded, cls):
            raise ValueError(f"{spec}: holds a {type(loaded).__name__}, expected {cls.__name__}")
        return loaded
    return _lookup(registry, spec, what)
