"""The runtime's per-step log (`python -m probe.runtime --step-log PATH`): what a replay through
the simulator needs, one .npz file (numpy only, no pickle).

Shape legend: N steps, L MoE layers, S source ranks (= G), G ranks, E experts, P = 5 phases.

    format          str, "probe-step-log";  version: int, 1
    phases          str [P]: attention, route_plan, dispatch, experts, combine
                    (`probe.runtime.pipeline.PHASES`)
    counts          int32 [N, L, S, E]: every source rank's TRUE token-expert pairs per expert
                    (the routing trace the run served; sum over E = K x the rank's tokens)
    phase_s         float64 [N, L, G, P]: every rank's seconds of each phase at every layer
                    (CUDA events on GPU, perf_counter on CPU)
    step_s          float64 [N]: rank 0's wall seconds of the step (the engine's clock)
    tokens, prefill_tokens, decode_tokens   int64 [N]: rank 0's tokens in the step
    layer_ir        float64 [N, L]: IR of the pairs processed per rank (eq. 1)
    pairs_per_rank  int64 [N, L, G]: pairs processed on every rank
    replicas_planned, replicas_arrived, fallback_pairs   int64 [N, L] (all ranks)
    layer_exposed_s, layer_plan_s, layer_predict_s, layer_split_s   float64 [N, L]
                    (max over ranks)
    replan_s        float64 [N]: EPLB re-plan weight-move seconds at the step's start

`write_step_log` writes it on rank 0 from the engine's step records (their `ep` dicts, from
`StepStats.as_dict()` with `PipelineOptions.record_steps`); `probe.sim.measured` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from probe.runtime.pipeline import PHASES

__all__ = ["FORMAT", "VERSION", "write_step_log"]

FORMAT = "probe-step-log"
VERSION = 1

_PER_LAYER_INT = ("replicas_planned", "replicas_arrived", "fallback_pairs")
_PER_LAYER_FLOAT = ("layer_exposed_s", "layer_plan_s", "layer_predict_s", "layer_split_s")


def write_step_log(path: str | Path, records: Sequence) -> Path:
    """Write the step log of `records` (engine `StepRecord`s whose `ep` holds
    "routing_counts" and "layer_phase_s") to `path` (.npz); returns the path written."""
    recs = [r for r in records if r.ep and r.ep.get("routing_counts") is not None]
    if not recs:
        raise ValueError("no step record holds routing counts: run the EPRunner with "
                         "PipelineOptions(record_steps=True)")
    if len(recs) != len(records):
        raise ValueError(f"{len(records) - len(recs)} of {len(records)} step records lack "
                         "routing counts (record_steps was off for part of the run)")
    arrays = {
        "format": np.array(FORMAT), "version": np.array(VERSION), "phases": np.array(PHASES),
        "counts": np.stack([r.ep["routing_counts"] for r in recs]).astype(np.int32),
        "phase_s": np.stack([r.ep["layer_phase_s"] for r in recs]).astype(np.float64),
        "step_s": np.array([r.seconds for r in recs], dtype=np.float64),
        "tokens": np.array([r.tokens for r in recs], dtype=np.int64),
        "prefill_tokens": np.array([r.prefill_tokens for r in recs], dtype=np.int64),
        "decode_tokens": np.array([r.decode_tokens for r in recs], dtype=np.int64),
        "layer_ir": np.array([r.ep["layer_ir"] for r in recs], dtype=np.float64),
        "pairs_per_rank": np.stack([r.ep["pairs_per_rank"] for r in recs]).astype(np.int64),
        "replan_s": np.array([r.ep["replan_seconds"] for r in recs], dtype=np.float64),
    }
    for key in _PER_LAYER_INT:
        arrays[key] = np.array([r.ep[key] for r in recs], dtype=np.int64)
    for key in _PER_LAYER_FLOAT:
        arrays[key] = np.array([r.ep[key] for r in recs], dtype=np.float64)
    path = Path(path)
    with path.open("wb") as fh:  # np.savez_compressed would append .npz to a str name
        np.savez_compressed(fh, **arrays)
    return path
