"""Routing traces: the one data type every part of probe reads.

`RoutingTrace` (trace.py) holds per-token expert choices per step and MoE layer and reads/writes
one safetensors file; `generate` (synthetic.py) makes seeded synthetic workloads; readers.py
converts what vLLM/SGLang users already have and engines.py reads the engines' own records
(SGLang, vLLM, Megatron-Core, TensorRT-LLM); `stats` summarises a trace (imbalance under
static placement, expert-load histogram, hot-expert churn).
"""

from probe.traces.readers import (
    from_routed_experts,
    load_from_counts,
    read_routed_experts_npy,
    read_routed_experts_npz,
    read_vllm_eplb_load_history,
    trace_from_counts,
)
from probe.traces.stats import stats
from probe.traces.synthetic import DOMAINS, WORKLOADS, generate
from probe.traces.trace import DECODE, FORMAT_NAME, FORMAT_VERSION, PREFILL, RoutingTrace

__all__ = [
    "DECODE",
    "DOMAINS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PREFILL",
    "WORKLOADS",
    "RoutingTrace",
    "from_routed_experts",
    "generate",
    "load_from_counts",
    "read_routed_experts_npy",
    "read_routed_experts_npz",
    "read_vllm_eplb_load_history",
    "stats",
    "trace_from_counts",
]
