"""The cost model of one MoE layer under expert parallelism (the paper's section 3, linearised).

Per rank g, with n[e, g] tokens of expert e processed on g (summed over source ranks):
    T_comp(g) = sum over experts active on g (n[e, g] > 0) of (alpha + beta * n[e, g])
    T_in(g)   = sum over s != g of tokens sent s -> g * token_time[s, g]     (dispatch in)
    T_out(g)  = sum over d != g of tokens sent g -> d * token_time[g, d]     (dispatch out)
    T_comm(g) = 2 * max(T_in(g), T_out(g))       (combine mirrors dispatch)
    objective = max_g T_comp(g) + T_comm(g)      (eq. 8)
Expert transfer for a replica of e copied h -> g costs transfer_time[h, g] on both the sending
rank h and the receiving rank g; each rank's sent total and received total must each fit its
window (eq. 6).

alpha is the fixed cost of an active expert (its weight read from HBM plus launch and tile
overhead), beta the per-token cost at the grouped GEMM's large-batch efficiency: the
hardware-aware linear reading of T(n) = n F / (eta(n) F_peak). Token deduplication (lambda) is
taken as 1: counts are token-expert pairs, so traffic is an upper bound. docs/planner.md
sets these costs in the whole planning problem.

>>> from probe.specs import hardware_preset, model_preset
>>> cost = CostModel.from_specs(model_preset("gpt-oss-120b"), hardware_preset("h200x8"))
>>> cost.num_ranks, round(cost.alpha * 1e6, 1), round(cost.beta * 1e9, 1)
(8, 12.4, 62.9)
>>> round(float(cost.transfer_time[0, 1]) * 1e6, 1)   # one expert over NVLink, microseconds
110.6
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import networkx as nx
import numpy as np

from probe.specs import HardwareSpec, ModelSpec

__all__ = ["CostModel", "topology_graph"]


def topology_graph(hardware: HardwareSpec) -> nx.Graph:
    """Ranks and node switches as a graph; edge attribute `bw` in bytes/s (one direction).

    Rank r connects to its node's switch at the intra-node bandwidth; with several nodes each
    rank also has its own NIC into a network core at the inter-node bandwidth.
    """
    graph = nx.Graph()
    for rank in range(hardware.num_ranks):
        node = hardware.node_of(rank)
        graph.add_node(("rank", rank))
        graph.add_edge(("rank", rank), ("switch", node), bw=hardware.intra_node_bw)
        if hardware.num_nodes > 1:
            graph.add_edge(("rank", rank), ("nic", rank), bw=hardware.inter_node_bw)
            graph.add_edge(("nic", rank), "core", bw=hardware.inter_node_bw)
    return graph


def _path_bandwidth(graph: nx.Graph, num_ranks: int) -> np.ndarray:
    """[G, G] bottleneck bandwidth of the fewest-hop path between ranks (inf on the diagonal)."""
    bw = np.full((num_ranks, num_ranks), np.inf)
    for src in range(num_ranks):
        paths = nx.single_source_shortest_path(graph, ("rank", src))
        for dst in range(num_ranks):
            if dst == src:
                continue
            path = paths[("rank", dst)]
            bw[src, dst] = min(graph.edges[a, b]["bw"] for a, b in itertools.pairwise(path))
    return bw


@dataclass(frozen=True, eq=False)
class CostModel:
    """Costs the planner needs, in seconds. Arrays are float64.

    Attributes:
        alpha: fixed seconds per active expert on a rank.
        beta: seconds per token per expert.
        token_time: [G, G] seconds to move one token's hidden state from rank s to rank g
            (0 on the diagonal).
        transfer_time: [G, G] seconds to copy one expert's weights from rank h to rank g
            (0 on the diagonal).
        expert_bytes: W, bytes of one expert (for reporting bytes moved).
        token_bytes: bytes of one token's hidden state (for reporting traffic).
    """

    alpha: float
    beta: float
    token_time: np.ndarray
    transfer_time: np.ndarray
    expert_bytes: int = 0
    token_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"CostModel.{name} must be finite and >= 0, got {value!r}")
        for name in ("token_time", "transfer_time"):
            arr = np.array(getattr(self, name), dtype=np.float64)
            if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
                raise ValueError(f"CostModel.{name} must be a square [G, G] array, got shape "
                                 f"{arr.shape}")
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"CostModel.{name} must be finite and >= 0")
            np.fill_diagonal(arr, 0.0)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if self.token_time.shape != self.transfer_time.shape:
            raise ValueError("CostModel.token_time and transfer_time must have the same shape")

    @property
    def num_ranks(self) -> int:
        return self.token_time.shape[0]

    def compute_time(self, tokens: np.ndarray) -> np.ndarray:
        """float64 [G]: expert-compute seconds of each rank, the sum over experts active on
        rank g (tokens[g, e] > 0) of alpha + beta * tokens[g, e].

        tokens: [G, E] tokens of expert e processed on rank g, int (a plan) or float (an even
        split's fractional shares). The greedy kernels keep this formula as inline loops (they
        must stay compiled); everything else calls this method.
        """
        tokens = np.asarray(tokens, dtype=np.float64)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be a [G, E] array, got shape {tokens.shape}")
        return ((tokens > 0) * (self.alpha + self.beta * tokens)).sum(axis=1)

    @classmethod
    def from_specs(cls, model: ModelSpec, hardware: HardwareSpec,
                   num_ranks: int | None = None) -> CostModel:
        """Cost model of `model` on `hardware` (optionally resized to `num_ranks` GPUs)."""
        if num_ranks is not None and num_ranks != hardware.num_ranks:
            hardware = hardware.with_ranks(num_ranks)
        eta_max = hardware.gemm_efficiency[-1][1]
        alpha = model.expert_bytes / hardware.hbm_bw + hardware.launch_overhead_s
        beta = model.flops_per_token / (hardware.peak_flops * eta_max)
        bw = _path_bandwidth(topology_graph(hardware), hardware.num_ranks)
        with np.errstate(divide="ignore"):
            token_time = np.where(np.isinf(bw), 0.0, model.token_bytes / bw)
            transfer_time = np.where(np.isinf(bw), 0.0, model.expert_bytes / bw)
        return cls(alpha=alpha, beta=beta, token_time=token_time, transfer_time=transfer_time,
                   expert_bytes=model.expert_bytes, token_bytes=model.token_bytes)

    @classmethod
    def uniform(cls, num_ranks: int, *, alpha: float, beta: float, token_time: float,
                transfer_time: float, expert_bytes: int = 0, token_bytes: int = 0) -> CostModel:
        """All links equal: handy for tests and hand-computed examples."""
        off = 1.0 - np.eye(num_ranks)
        return cls(alpha=alpha, beta=beta, token_time=off * token_time,
                   transfer_time=off * transfer_time, expert_bytes=expert_bytes,
                   token_bytes=token_bytes)
