"""Seeded benchmark instances: one BalanceProblem per (trace, step, layer, size, budget) choice.

An `InstanceSpec` is a small, JSON-able recipe; `build_problem(spec)` turns it into the
BalanceProblem plus the EPLB history (the previous steps' loads of the same layer) every time
the same way, so a results file names its instances by recipe and anyone can rebuild them.

Grid (`sample_grid`): two tiers.
  * "proof": sizes where the exact solvers can plausibly prove the optimum within seconds
    (ep 4-8, E 64-128); these carry the gap statistics.
  * "scale": larger instances (ep 16-32, E 128-256, multi-node) for the solve-time table.
Each instance picks a workload family (decode, prefill, shift, repeat, and "real-decode" /
"real-prefill" when data/recorded/smallmodel/*.trace.safetensors exist), top-k, replica slots, a
window, a model cost (gpt-oss-120b, qwen3-235b-a22b), and one (step, layer) of the trace.
Token counts are the workloads' real per-rank batch sizes (decode 1024 tokens per rank,
prefill 8192).

Windows: "tight" is half the cheapest expert copy (no transfer fits anywhere); "1copy" fits one
intra-node copy; "xF" is F times `default_window` (the static plan's per-rank compute time).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probe.placement import sharded_home
from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem
from probe.planner.window import default_window
from probe.specs import hardware_preset, model_preset
from probe.traces import RoutingTrace, synthetic

__all__ = ["FAMILIES", "InstanceSpec", "MODELS", "WINDOWS", "build_problem", "hardware_for",
           "real_trace_paths", "sample_grid"]

SYNTHETIC_FAMILIES = ("decode", "prefill", "shift", "repeat")
FAMILIES = (*SYNTHETIC_FAMILIES, "real-decode", "real-prefill")
MODELS = ("gpt-oss-120b", "qwen3-235b-a22b")
WINDOWS = ("tight", "1copy", "x0.5", "x1", "x2", "x4")
# Real per-rank batch sizes (the synthetic workloads' defaults at ep=8).
TOKENS_PER_RANK = {"decode": 1024, "shift": 1024, "repeat": 1024, "prefill": 8192}
# Steps and layers generated per synthetic trace (small: one (step, layer) is used at a time).
TRACE_STEPS = 6
TRACE_LAYERS = 2
# Steps of history EPLB sees (the steps before the planned one).
HISTORY_STEPS = 4
REAL_TRACE_DIR = Path("data/recorded/smallmodel")


@dataclass(frozen=True)
class InstanceSpec:
    """Recipe of one benchmark instance (all fields JSON-able).

    family: workload (FAMILIES). ep: ranks G. num_experts: E. top_k: K. slots: R extra replica
    slots per rank. window: one of WINDOWS. hardware: preset name ("h200x8", "h200x8-n2", ...,
    or "h200x4-n2": 2 nodes of 4 GPUs). model: cost-model preset. step, layer: which load of
    the trace. seed: trace seed. tier: "proof" or "scale".
    """

    family: str
    ep: int
    num_experts: int
    top_k: int
    slots: int
    window: str
    hardware: str
    model: str
    step: int
    layer: int
    seed: int
    tier: str

    @property
    def id(self) -> str:
        return (f"{self.tier}-{self.family}-g{self.ep}-e{self.num_experts}-k{self.top_k}"
                f"-r{self.slots}-w{self.window}-{self.hardware}-{self.model}"
                f"-s{self.step}l{self.layer}-seed{self.seed}")

    @property
    def size(self) -> str:
        """Size label used in the tables: 'G x E'."""
        return f"{self.ep}x{self.num_experts}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InstanceSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def hardware_for(name: str, ep: int):
    """HardwareSpec of preset `name` with `ep` ranks. "h200x4-n2" is 2 nodes of 4 H200s each
    (a multi-node topology small enough for exact proofs)."""
    if name == "h200x4-n2":
        base = hardware_preset("h200x8")
        return dataclasses.replace(base, name=name, num_ranks=ep, ranks_per_node=ep // 2)
    hw = hardware_preset(name)
    if hw.num_ranks != ep:
        hw = hw.with_ranks(ep)
        if hw.name != name and "-n" in name:
            raise ValueError(f"hardware {name!r} does not have {ep} ranks")
    return hw


def real_trace_paths(root: Path = REAL_TRACE_DIR) -> dict[str, Path]:
    """{"real-decode": path, "real-prefill": path} for the small-model traces that exist."""
    found = {}
    for phase in ("decode", "prefill"):
        path = Path(root) / f"{phase}.trace.safetensors"
        if path.is_file():
            found[f"real-{phase}"] = path
    return found


@functools.lru_cache(maxsize=8)
def _real_trace_info(path: str) -> tuple[int, int, int, int, int]:
    """(ranks, experts, top_k, layers, steps) of a stored trace."""
    trace = RoutingTrace.load(path)
    return (trace.num_ranks, trace.num_experts, trace.top_k, trace.num_layers, trace.num_steps)


@functools.lru_cache(maxsize=4)
def _real_trace(path: str) -> RoutingTrace:
    return RoutingTrace.load(path)


@functools.lru_cache(maxsize=16)
def _synthetic_loads(family: str, ep: int, num_experts: int, top_k: int, seed: int
                     ) -> np.ndarray:
    """int64 [TRACE_STEPS, TRACE_LAYERS, S, E]: every load of one small synthetic trace."""
    trace = synthetic.generate(family, num_steps=TRACE_STEPS, num_layers=TRACE_LAYERS,
                               tokens_per_step=TOKENS_PER_RANK[family] * ep,
                               num_experts=num_experts, top_k=top_k, num_ranks=ep, seed=seed)
    return trace.load_counts().astype(np.int64)


def _loads(family: str, ep: int, num_experts: int, top_k: int, seed: int,
           step: int, real_root: str) -> np.ndarray:
    """int64 [H+1, L, S, E]: loads of steps step-H .. step of the trace (H <= HISTORY_STEPS)."""
    first = max(0, step - HISTORY_STEPS)
    if family.startswith("real-"):
        trace = _real_trace(str(real_trace_paths(Path(real_root))[family]))
        return trace.load_counts(list(range(first, step + 1))).astype(np.int64)
    return _synthetic_loads(family, ep, num_experts, top_k, seed)[first:step + 1]


def build_problem(spec: InstanceSpec, *, real_root: Path = REAL_TRACE_DIR
                  ) -> tuple[BalanceProblem, np.ndarray | None]:
    """(problem, eplb_history) of `spec`; history is int64 [H, S, E] or None at step 0."""
    loads = _loads(spec.family, spec.ep, spec.num_experts, spec.top_k, spec.seed, spec.step,
                   str(real_root))
    load = loads[-1, spec.layer]  # [S, E]
    history = loads[:-1, spec.layer] if loads.shape[0] > 1 else None
    hardware = hardware_for(spec.hardware, spec.ep)
    cost = CostModel.from_specs(model_preset(spec.model), hardware)
    home = sharded_home(spec.num_experts, spec.ep)
    off = ~np.eye(spec.ep, dtype=bool)
    cheapest = float(cost.transfer_time[off].min())
    if spec.window == "tight":
        window = np.full(spec.ep, 0.5 * cheapest)
    elif spec.window == "1copy":
        window = np.full(spec.ep, 1.5 * cheapest)
    elif spec.window.startswith("x"):
        window = float(spec.window[1:]) * default_window(load, home, cost)
    else:
        raise ValueError(f"unknown window kind {spec.window!r}; choose one of {WINDOWS}")
    return BalanceProblem.from_load(load, cost, spec.slots, window, home), history


def _trace_step(family: str, rng: np.random.Generator, num_steps: int) -> int:
    """A step with a full EPLB history where possible; for shift, the steps around the shift."""
    if family == "shift":
        return int(rng.integers(num_steps // 2, num_steps // 2 + 2))
    return int(rng.integers(min(HISTORY_STEPS, num_steps - 1), num_steps))


def sample_grid(*, num_proof: int, num_scale: int, seed: int = 0,
                real_root: Path = REAL_TRACE_DIR, proof_sizes=((4, 64), (8, 64), (8, 128)),
                scale_sizes=((16, 128), (16, 256), (32, 256)),
                windows: tuple[str, ...] = WINDOWS) -> list[InstanceSpec]:
    """A seeded sample: `num_proof` instances in the proof tier, `num_scale` in the scale tier.

    Families are cycled (synthetic ones twice as often as real ones); the other knobs are
    drawn uniformly.
    Real-model traces (when present) keep their own ep, E and top-k. windows: the window
    kinds the proof tier draws from.
    """
    if not windows or set(windows) - set(WINDOWS):
        raise ValueError(f"windows must be a non-empty subset of {WINDOWS}, got {windows!r}")
    for name, value in (("num_proof", num_proof), ("num_scale", num_scale)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    rng = np.random.default_rng(seed)
    real = real_trace_paths(real_root)
    # Synthetic families twice per cycle, each real trace once (they have one size only).
    families = [*SYNTHETIC_FAMILIES, *SYNTHETIC_FAMILIES, *sorted(real)]
    specs: list[InstanceSpec] = []
    seen: set[str] = set()
    cycle = itertools.cycle(families)
    attempts = 0
    while len(specs) < num_proof and attempts < 50 * (num_proof + 1):
        attempts += 1
        family = next(cycle)
        if family in real:
            ep, num_experts, top_k, num_layers, num_steps = _real_trace_info(str(real[family]))
        else:
            ep, num_experts = proof_sizes[rng.integers(len(proof_sizes))]
            top_k = int(rng.choice([2, 4, 8]))
            num_layers, num_steps = TRACE_LAYERS, TRACE_STEPS
        multi = ep == 8 and rng.random() < 0.25
        spec = InstanceSpec(
            family=family, ep=int(ep), num_experts=int(num_experts), top_k=int(top_k),
            slots=int(rng.integers(1, 4)), window=str(rng.choice(list(windows))),
            hardware="h200x4-n2" if multi else "h200x8", model=str(rng.choice(MODELS)),
            step=_trace_step(family, rng, num_steps), layer=int(rng.integers(num_layers)),
            seed=int(rng.integers(4)), tier="proof")
        if spec.id not in seen:
            seen.add(spec.id)
            specs.append(spec)
    scale_families = itertools.cycle(SYNTHETIC_FAMILIES)
    count = 0
    while count < num_scale:
        family = next(scale_families)
        ep, num_experts = scale_sizes[count % len(scale_sizes)]
        spec = InstanceSpec(
            family=family, ep=int(ep), num_experts=int(num_experts),
            top_k=int(rng.choice([4, 8])), slots=int(rng.integers(1, 4)),
            window=str(rng.choice(["1copy", "x1", "x2"])),
            hardware=f"h200x8-n{ep // 8}", model=str(rng.choice(MODELS)),
            step=_trace_step(family, rng, TRACE_STEPS), layer=int(rng.integers(TRACE_LAYERS)),
            seed=int(rng.integers(4)), tier="scale")
        count += 1
        if spec.id not in seen:
            seen.add(spec.id)
            specs.append(spec)
    # Interleave the tiers, so an interrupted run still has some of each.
    return [specs[i] for i in rng.permutation(len(specs))]


def specs_to_json(specs: list[InstanceSpec]) -> str:
    return json.dumps([s.as_dict() for s in specs], indent=1)
