"""Attention time per MoE layer per rank, from calibrated points or a rough roofline.

Attention runs data-parallel: each rank attends over its own tokens, so the time depends on the
rank's token count and the phase. `AttentionModel.seconds(tokens, phase)` interpolates measured
points linearly (and extrapolates the end segments linearly, never below zero):
  * decode: (per-rank batch b, seconds) at one KV length (`kv_len`), one query token per request;
  * prefill: (chunk c, seconds) for one causal chunk of c tokens (attention to earlier chunks'
    KV is not modelled: an under-estimate for long prompts).
Both include the q/k/v and o projections (experiments/calibration/calibrate_h200.py).

>>> att = AttentionModel(decode=((512, 1e-4), (1024, 2e-4)), prefill=((8192, 1e-3),))
>>> round(att.seconds(768, 1) * 1e6, 1), round(att.seconds(4096, 0) * 1e6, 1)
(150.0, 500.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probe.specs import HardwareSpec, ModelSpec

__all__ = ["AttentionModel"]

PREFILL, DECODE = 0, 1


def _points(points, name: str) -> tuple[tuple[float, float], ...]:
    pts = tuple((float(x), float(t)) for x, t in points)
    if not pts:
        raise ValueError(f"AttentionModel.{name} needs at least one (tokens, seconds) point")
    if any(x <= 0 or t < 0 or not np.isfinite(t) for x, t in pts):
        raise ValueError(f"AttentionModel.{name} points need tokens > 0 and seconds >= 0")
    if any(a[0] >= b[0] for a, b in zip(pts, pts[1:], strict=False)):
        raise ValueError(f"AttentionModel.{name} tokens must be strictly increasing")
    return pts


def _interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    if x <= 0:
        return 0.0
    xs = [p[0] for p in points]
    ts = [p[1] for p in points]
    if len(points) == 1:
        return ts[0] * x / xs[0]  # proportional through the origin
    if x <= xs[0]:
        # Below the first point: proportional to tokens (never above the first point's time).
        slope = (ts[1] - ts[0]) / (xs[1] - xs[0])
        return max(min(ts[0] + slope * (x - xs[0]), ts[0]), ts[0] * x / xs[0], 0.0)
    if x >= xs[-1]:
        slope = (ts[-1] - ts[-2]) / (xs[-1] - xs[-2])
        return max(ts[-1] + slope * (x - xs[-1]), 0.0)
    return float(np.interp(x, xs, ts))


@dataclass(frozen=True)
class AttentionModel:
    """Seconds of one layer's attention on one rank, by phase and token count.

    decode: points (per-rank batch, seconds); prefill: points (chunk tokens, seconds).
    source: where the points come from.
    """

    decode: tuple[tuple[float, float], ...]
    prefill: tuple[tuple[float, float], ...]
    kv_len: int = 2048
    source: str = "given"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decode", _points(self.decode, "decode"))
        object.__setattr__(self, "prefill", _points(self.prefill, "prefill"))

    def seconds(self, tokens: float, phase: int) -> float:
        """Attention seconds for `tokens` tokens on one rank; phase 0 prefill, 1 decode."""
        return _interp(self.decode if phase == DECODE else self.prefill, float(tokens))

    def seconds_per_rank(self, tokens: np.ndarray, phase: int) -> np.ndarray:
        """float64 [G] seconds for int [G] tokens per rank."""
        return np.array([self.seconds(t, phase) for t in np.asarray(tokens)], dtype=np.float64)

    @classmethod
    def zero(cls) -> AttentionModel:
        """No attention time (tests, or to look at the MoE part alone)."""
        return cls(decode=((1, 0.0),), prefill=((1, 0.0),), source="zero")

    @classmethod
    def roofline(cls, model: ModelSpec, hardware: HardwareSpec, *, kv_len: int = 2048,
                 efficiency: float = 0.6) -> AttentionModel:
        """A rough estimate for models without calibration (declared as such in `source`).

        Projections: 2 * tokens * 4 * D^2 FLOPs (q, k, v, o as if full multi-head) at
        `efficiency` of peak. Decode also reads each request's KV cache, taken as
        kv_len * 2 * (D / 8) * 2 bytes (grouped-query attention with 8 query heads per KV head,
        bf16). Prefill adds causal scores: 2 * c^2 * D FLOPs.
        """
        d = model.hidden
        rate = hardware.peak_flops * efficiency

        def dec(b):
            return 8.0 * b * d * d / rate + b * kv_len * 2 * (d / 8) * 2 / hardware.hbm_bw

        def pre(c):
            return 8.0 * c * d * d / rate + 2.0 * c * c * d / rate

        dec_pts = tuple((b, dec(b)) for b in (64, 256, 1024, 4096))
        pre_pts = tuple((c, pre(c)) for c in (1024, 4096, 16384, 65536))
        return cls(decode=dec_pts, prefill=pre_pts, kv_len=kv_len,
                   source=f"roofline estimate (not measured), {efficiency:.0%} of peak")
