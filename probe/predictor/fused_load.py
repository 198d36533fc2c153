"""The predicted [S, E] load in three GPU launches (CUDA + Triton).

`fused_predict_load(pred, h, src_rank, num_ranks)` computes what
`pred.predict_load(h, src_rank, num_ranks)` computes, with one GEMM (router clone and W1 side by
side, from `pred.fuse()`), one memset, and one Triton kernel that applies the SiLU, the W2
product, the top-k selection and the count per (source rank, expert) with atomic adds. The
plain `predict_load` launches about ten kernels for the same work, and at decode batch sizes its
time is launch overhead, not arithmetic (results/predictor/report.md). With
`residual="cublas"` the SiLU and the W2 product run as torch ops (`pred.fused_logits`) and the
kernel only selects and counts: more launches, but no long loop over a wide H inside it.

The plain form is the slow twin: the predictor_cost experiment checks on the GPU that every token
adds exactly K counts and how many token-expert pairs agree with it. Both accumulate in float32
but round differently (the plain form rounds the prior and the residual to the model dtype
before adding them), so a near tie can go the other way.

Limits: CUDA and Triton (or Triton's CPU interpreter, TRITON_INTERPRET=1, which the tests use
to compare the kernel with its twin); plain top-k (no custom `select`); E and H powers of two.
Returns int32 [S, E].
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

__all__ = ["fused_available", "fused_predict_load"]


def fused_available(pred, device: torch.device | str) -> str | None:
    """None if `fused_predict_load` can run `pred` on `device`, else the reason it cannot."""
    if triton is None:
        return "Triton is not installed"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"needs a CUDA device (or TRITON_INTERPRET=1), got {device}"
    if pred.select is not None:
        return "the predictor uses a custom select (only plain top-k is fused)"
    for name, n in (("E", pred.num_experts), ("H", pred.hidden)):
        if n & (n - 1) or n < 16:
            return f"{name} = {n} is not a power of two >= 16"
    return None


if triton is not None:

    # Adds 1 to out[src * E + e] for each of the K largest logits e of every live row.
    @triton.jit
    def _count_top_k(logits, src, live, out_ptr, E: tl.constexpr, K: tl.constexpr,
                     BLOCK: tl.constexpr):
        ce = tl.arange(0, E)
        one = tl.full((BLOCK,), 1, tl.int32)
        for _ in tl.static_range(K):  # K rounds of (argmax, count, knock out)
            best = tl.argmax(logits, axis=1)
            tl.atomic_add(out_ptr + src * E + best, one, mask=live)
            logits = tl.where(ce[None, :] == best[:, None], float("-inf"), logits)

    @triton.jit
    def _residual_topk_count(y_ptr, w2_ptr, src_ptr, out_ptr, num_tokens, stride_y,
                             E: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                             BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = rows < num_tokens
        ce = tl.arange(0, E)
        # y = [prior logits (E) | W1 pre-activation (H)] per token, from one GEMM.
        logits = tl.load(y_ptr + rows[:, None] * stride_y + ce[None, :], mask=live[:, None],
                         other=0.0).to(tl.float32)  # [BLOCK, E]
        for c in tl.static_range(0, H, CHUNK):  # residual W2 silu(.) in CHUNK-wide slices
            ch = c + tl.arange(0, CHUNK)
            act = tl.load(y_ptr + rows[:, None] * stride_y + E + ch[None, :],
                          mask=live[:, None], other=0.0).to(tl.float32)
            z = act * tl.sigmoid(act)
            w2 = tl.load(w2_ptr + ch[:, None] * E + ce[None, :])  # W2^T rows [CHUNK, E]
            logits += tl.dot(z.to(w2.dtype), w2)  # float32 accumulation
        src = tl.load(src_ptr + rows, mask=live, other=0).to(tl.int64)
        _count_top_k(logits, src, live, out_ptr, E, K, BLOCK)

    @triton.jit
    def _topk_count(logits_ptr, src_ptr, out_ptr, num_tokens, stride,
                    E: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = rows < num_tokens
        ce = tl.arange(0, E)
        logits = tl.load(logits_ptr + rows[:, None] * stride + ce[None, :], mask=live[:, None],
                         other=0.0).to(tl.float32)
        src = tl.load(src_ptr + rows, mask=live, other=0).to(tl.int64)
        _count_top_k(logits, src, live, out_ptr, E, K, BLOCK)


@torch.no_grad()
def fused_predict_load(pred, h: torch.Tensor, src_rank: torch.Tensor, num_ranks: int, *,
                       block: int = 16, chunk: int = 64, residual: str = "triton",
                       num_warps: int = 4) -> torch.Tensor:
    """Predicted tokens per (source rank, expert), int32 [S, E]; see the module doc.

    pred: a LookaheadPredictor after `fuse()`; h: [T, D] on CUDA; src_rank: int [T].
    residual: "triton" (SiLU and the W2 product inside the kernel, CHUNK-wide slices of H) or
    "cublas" (`pred.fused_logits`: SiLU and W2 as torch ops, then a Triton top-k/count kernel;
    for wide residuals, where the kernel's loop over H is long).
    block (tokens per program), chunk (H slice per W2 product) and num_warps shape the launch;
    they can change only the order of float32 sums, so at most a near tie
    (experiments.predictor.predictor_profile reports whether the counts match the default shape's).
    """
    if residual not in ("triton", "cublas"):
        raise ValueError(f"residual must be 'triton' or 'cublas', got {residual!r}")
    why = fused_available(pred, h.device)
    if why is not None:
        raise RuntimeError(f"fused_predict_load: {why}; use pred.predict_load")
    fused = getattr(pred, "_fused", None)
    if fused is None:
        raise RuntimeError("fused_predict_load: call pred.fuse() first")
    if src_rank.shape != (h.shape[0],):
        raise ValueError(f"src_rank must be [T] = [{h.shape[0]}], got {tuple(src_rank.shape)}")
    weight_t, bias, w2_t = fused
    num_experts = pred.num_experts
    out = torch.zeros(num_ranks * num_experts, dtype=torch.int32, device=h.device)
    if h.shape[0] == 0:
        return out.view(num_ranks, num_experts)
    grid = (triton.cdiv(h.shape[0], block),)
    if residual == "cublas":
        logits = pred.fused_logits(h)  # [T, E]
        _topk_count[grid](logits, src_rank, out, h.shape[0], logits.stride(0),
                          E=num_experts, K=pred.top_k, BLOCK=block, num_warps=num_warps)
        return out.view(num_ranks, num_experts)
    y = torch.addmm(bias, h.to(weight_t.dtype), weight_t)  # [T, E+H]
    _residual_topk_count[grid](y, w2_t, src_rank, out, h.shape[0], y.stride(0),
                               E=num_experts, H=pred.hidden, K=pred.top_k, BLOCK=block,
                               CHUNK=min(chunk, pred.hidden), num_warps=num_warps)
    return out.view(num_ranks, num_experts)
