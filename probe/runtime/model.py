"""A decoder-only MoE transformer in plain torch, for the families in `probe.runtime.families`.

Shape legend (used in the `# [..]` comments after tensor statements):
    B  sequences in a batch           T  tokens in the batch (all sequences, flattened)
    t  new tokens of one sequence     s  keys of one sequence (cached + new)
    D  hidden size                    V  vocabulary size
    H  query heads    Hkv  key/value heads    Hd  head dim     G  query heads per kv head
    E  routed experts (E_local: experts held by this model, see `expert_ids`)
    K  experts per token (top-k)      F  expert intermediate size
    n  rows sent to one expert or group of experts

Tokens of all sequences in a batch are flattened into one [T, D] stream: norms, projections and
MoE blocks see every token at once (so a routing step is one batch), while attention keeps each
sequence apart, optionally against that sequence's `KVCache`.

Each MoE block keeps its pieces callable on their own, for the expert-parallel runtime:
`router(h) -> logits [T, E]`, `select(logits) -> (topk_ids [T, K], topk_weights [T, K])`,
`expert_forward(x [n, D], expert_id) -> [n, D]`, `grouped_forward(x [n, D], expert_of_row [n])`,
`combine(y [T, K, D], topk_weights [T, K]) -> [T, D]`. `grouped_forward` runs all experts as one
grouped GEMM per projection (`probe.runtime.experts`) unless `block.grouped` is False (then a
loop of `expert_forward`; `PROBE_GROUPED_EXPERTS=0` sets that default). Expert weights are stacked:
`w_gate_up [E_local, 2F, D]` (gate rows first, then up rows), `w_down [E_local, D, F]`; a model
loaded with `expert_ids` holds only those experts, in that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.experts import GroupedExperts, grouped_default
from probe.runtime.quant import PackedWeight

__all__ = [
    "Attention",
    "DenseMLP",
    "LatentAttention",
    "attend",
    "KVCache",
    "LayerRouting",
    "MoEBlock",
    "MoETransformer",
    "ModelOutput",
    "packed_format",
    "rope_frequencies",
]


# ---------------------------------------------------------------------------------------------
# Small pieces


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp16/bf16 -> fp32; fp32 and fp64 unchanged): the precision of norms,
    softmaxes and the combine, so that an fp64 model computes in fp64 throughout."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm computed in at least fp32; the weight is applied before casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _wide(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(x32.dtype) * x32).to(x.dtype)


def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Hd/2] (fp32, cpu) and the cos/sin scale for `rope`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    base_freq = 1.0 / (rope.theta ** exponents)  # [Hd/2]
    if rope.kind == "default":
        return base_freq, 1.0
    if rope.kind == "linear":
        return base_freq / rope.factor, 1.0
    # yarn: interpolate the low frequencies by `factor`, keep the high ones, ramp in between.
    factor = rope.factor
    if rope.attention_factor is not None:
        scale = rope.attention_factor
    else:
        scale = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def dim_of(rotations: float) -> float:
        return (head_dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # [Hd/2] 1 = extrapolate (keep the original frequency)
    inv_freq = base_freq / factor * (1.0 - keep) + base_freq * keep  # [Hd/2]
    return inv_freq, scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the head dim: x [T, h, Hd], cos/sin [T, Hd/2] -> [T, h, Hd]."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, h, Hd/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, Hd/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, h, Hd]


class KVCache:
    """Keys and values of ONE sequence, per decoder layer.

    `length` counts the tokens already processed; the model advances it after each forward.
    keys[i] / values[i]: [s, Hkv, Hd] for decoder layer i (None before the first token).
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [t, Hkv, Hd] for `layer`; return all keys and values [s, Hkv, Hd]."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=0)  # [s, Hkv, Hd]
            v = torch.cat((self.values[layer], v), dim=0)  # [s, Hkv, Hd]
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass
class _Batch:
    """Per-forward bookkeeping shared by all layers (built once in `MoETransformer.forward`)."""

    seq_lens: list[int]  # new tokens per sequence (B entries)
    past_lens: list[int]  # cached tokens per sequence
    caches: Sequence[KVCache] | None
    cos: torch.Tensor  # [T, Hd/2]
    sin: torch.Tensor  # [T, Hd/2]
    q_index: torch.Tensor  # [T] row of each token in the padded [B * t_max] query layout
    t_max: int
    s_max: int
    masks: dict[bool, torch.Tensor]  # sliding? -> allowed [B, t_max, s_max] bool


# ---------------------------------------------------------------------------------------------
# Attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: _Batch, *, layer: int,
           sliding: bool, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence of the batch against its own (cached) keys.

    q [T, H, Dq], k [T, Hkv, Dq], v [T, Hkv, Dv] for the new tokens; each sequence's keys and
    values are appended to its KVCache (if any) at `layer`. sinks [H] adds one extra logit per
    head to the softmax. Returns [T, H * Dv].
    """
    n_tok, h, dq = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    # Pad every sequence to [B, ., t_max | s_max, .]; the masks hide the padding.
    n_seq = len(batch.seq_lens)
    q_pad = q.new_zeros(n_seq * batch.t_max, h, dq)  # [B*t_max, H, Dq]
    q_pad[batch.q_index] = q
    q_pad = q_pad.view(n_seq, batch.t_max, hkv, h // hkv, dq).permute(0, 2, 3, 1, 4)
    k_pad = k.new_zeros(n_seq, batch.s_max, hkv, dq)  # [B, s_max, Hkv, Dq]
    v_pad = v.new_zeros(n_seq, batch.s_max, hkv, dv)  # [B, s_max, Hkv, Dv]
    start = 0
    for i, t in enumerate(batch.seq_lens):
        k_i, v_i = k[start:start + t], v[start:start + t]  # [t, Hkv, .]
        if batch.caches is not None:
            k_i, v_i = batch.caches[i].append(layer, k_i, v_i)  # [s, Hkv, .]
        k_pad[i, :k_i.shape[0]] = k_i
        v_pad[i, :v_i.shape[0]] = v_i
        start += t
    k_pad = k_pad.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, s_max, Dq]
    v_pad = v_pad.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, s_max, Dv]

    allowed = batch.masks[sliding][:, None, None]  # [B, 1, 1, t_max, s_max]
    if sinks is None:
        # Fused kernel (memory-efficient on GPU); kv heads expanded to the query heads.
        g = h // hkv
        out = F.scaled_dot_product_attention(
            q_pad.reshape(n_seq, h, batch.t_max, dq),
            k_pad.expand(-1, -1, g, -1, -1).reshape(n_seq, h, batch.s_max, dq),
            v_pad.expand(-1, -1, g, -1, -1).reshape(n_seq, h, batch.s_max, dv),
            attn_mask=allowed[:, 0], scale=scale)  # [B, H, t_max, Dv]
        out = out.permute(0, 2, 1, 3).reshape(n_seq * batch.t_max, h * dv)  # [B*t_max, H*Dv]
        return out[batch.q_index]  # [T, H*Dv]
    scores = (q_pad @ k_pad.transpose(-1, -2)) * scale  # [B, Hkv, G, t_max, s_max]
    scores = _wide(scores).masked_fill(~allowed, float("-inf"))
    # Attention sinks: one learned logit per head joins the softmax, then is dropped.
    sink = sinks.to(scores.dtype).view(1, hkv, h // hkv, 1, 1).expand(*scores.shape[:-1], 1)
    scores = torch.cat((scores, sink), dim=-1)  # [B, Hkv, G, t_max, s_max + 1]
    probs = torch.softmax(scores, dim=-1)[..., :-1]  # [B, Hkv, G, t_max, s_max]
    out = probs.to(v_pad.dtype) @ v_pad  # [B, Hkv, G, t_max, Dv]
    out = out.permute(0, 3, 1, 2, 4).reshape(n_seq * batch.t_max, h * dv)  # [B*t_max, H*Dv]
    return out[batch.q_index]  # [T, H*Dv]


class Attention(nn.Module):
    """Causal grouped-query attention with rotary embedding and the family options of MoEConfig."""

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.sliding = layer in cfg.sliding_layers
        h, hkv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.k_proj = nn.Linear(d, hkv * hd, bias=bias)
        self.v_proj = nn.Linear(d, hkv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(h * hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hkv * hd, cfg.rms_norm_eps)
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(h))
        self.scale = cfg.attention_scale or hd ** -0.5

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        q, k, v = self.project(x, batch.cos, batch.sin)
        out = attend(q, k, v, batch, layer=self.layer, sliding=self.sliding, scale=self.scale,
                     sinks=self.sinks if self.cfg.attention_sinks else None)  # [T, H*Hd]
        return self.o_proj(out)  # [T, D]

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the new tokens, rotated: x [T, D], cos/sin [T, Hd/2] ->
        q [T, H, Hd], k [T, Hkv, Hd], v [T, Hkv, Hd]."""
        cfg = self.cfg
        h, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n_tok = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*Hd], [T, Hkv*Hd] x2
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(n_tok, h, hd)  # [T, H, Hd]
        k = k.view(n_tok, hkv, hd)  # [T, Hkv, Hd]
        v = v.view(n_tok, hkv, hd)  # [T, Hkv, Hd]
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)  # [T, H, Hd]
        k = apply_rope(k, cos, sin)  # [T, Hkv, Hd]
        return q, k, v


class LatentAttention(nn.Module):
    """DeepSeek multi-head latent attention (MLA). Extra legend: R rotary width (cfg.head_dim),
    P non-rotary query/key width, Dv value width, C kv_lora_rank, Q q_lora_rank.

    The cache holds the expanded per-head keys [s, H, P+R] and values [s, H, Dv]: simple, not
    the compressed latent cache of production engines.
    """

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.sliding = layer in cfg.sliding_layers
        d, h = cfg.hidden_size, cfg.num_heads
        qk, c = cfg.qk_head_dim, cfg.kv_lora_rank
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj = nn.Linear(d, c + cfg.head_dim, bias=bias)
        self.kv_a_norm = RMSNorm(c, 1e-6)
        self.kv_b_proj = nn.Linear(c, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=bias)
        self.scale = cfg.attention_scale or qk ** -0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, h, R] -> [T, h, R]; interleaved pairs come out as halves (like the reference)."""
        if self.cfg.rope_interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)  # [T, h, R]
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        q, k, v = self.project(x, batch.cos, batch.sin)
        out = attend(q, k, v, batch, layer=self.layer, sliding=self.sliding,
                     scale=self.scale)  # [T, H*Dv]
        return self.o_proj(out)  # [T, D]

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values of the new tokens: x [T, D], cos/sin [T, R/2] ->
        q [T, H, P+R], k [T, H, P+R], v [T, H, Dv] (contiguous)."""
        cfg = self.cfg
        n_tok, h = x.shape[0], cfg.num_heads
        nope, rot, dv, c = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)  # [T, H*(P+R)]
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))  # [T, H*(P+R)]
        q = q.view(n_tok, h, nope + rot)  # [T, H, P+R]
        q_nope, q_rot = q.split([nope, rot], dim=-1)  # [T, H, P], [T, H, R]
        latent, k_rot = self.kv_a_proj(x).split([c, rot], dim=-1)  # [T, C], [T, R]
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(n_tok, h, nope + dv)  # [T, H, P+Dv]
        k_nope, v = kv.split([nope, dv], dim=-1)  # [T, H, P], [T, H, Dv]
        q_rot = self._rope(q_rot, cos, sin)  # [T, H, R]
        k_rot = self._rope(k_rot.view(n_tok, 1, rot), cos, sin)  # [T, 1, R]
        q = torch.cat((q_nope, q_rot), dim=-1)  # [T, H, P+R]
        k = torch.cat((k_nope, k_rot.expand(n_tok, h, rot)), dim=-1)  # [T, H, P+R]
        return q, k, v.contiguous()


# ---------------------------------------------------------------------------------------------
# Feed-forward blocks


class DenseMLP(nn.Module):
    """Gated SiLU MLP of the dense (non-MoE) layers."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class LayerRouting:
    """What one MoE layer saw and chose in one forward pass.

    Attributes:
        layer: decoder layer index.
        hidden: router input (post-norm hidden state) [T, D], model dtype.
        logits: router logits [T, E], model dtype.
        topk_ids: chosen experts [T, K] int64.
        topk_weights: combine weights [T, K] fp32.
    """

    layer: int
    hidden: torch.Tensor
    logits: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


class MoEBlock(nn.Module):
    """Router + stacked experts of one MoE layer.

    Parameters (E_local = len(expert_ids)):
        router_weight [E, D], router_bias [E] (if cfg.router_bias),
        router_correction_bias [E] (if cfg.score_correction_bias), shared (a DenseMLP, if
        cfg.num_shared_experts: its output adds to every token's routed output),
        w_gate_up [E_local, 2F, D], w_down [E_local, D, F],
        b_gate_up [E_local, 2F], b_down [E_local, D] (if cfg.expert_bias).
    """

    def __init__(self, cfg: MoEConfig, layer: int, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.grouped = grouped_default()  # experts as grouped GEMMs (False: a loop per expert)
        ids = tuple(range(cfg.num_experts)) if expert_ids is None else tuple(expert_ids)
        self.expert_ids = ids
        self._slot_of = {e: i for i, e in enumerate(ids)}
        self._slot_lut: dict[torch.device, torch.Tensor] = {}
        e_all, e_local = cfg.num_experts, len(ids)
        d, f = cfg.hidden_size, cfg.moe_intermediate_size
        self.router_weight = nn.Parameter(torch.empty(e_all, d))
        if cfg.router_bias:
            self.router_bias = nn.Parameter(torch.empty(e_all))
        if cfg.score_correction_bias:
            self.router_correction_bias = nn.Parameter(torch.empty(e_all))
        if cfg.num_shared_experts:
            self.shared = DenseMLP(d, f * cfg.num_shared_experts)
        # (w_gate_up, w_down) kept in a storage format (probe.runtime.quant.PackedWeight) when
        # loaded with keep_format; the dense parameters are then meta tensors.
        self.packed: tuple | None = None
        self.w_gate_up = nn.Parameter(torch.empty(e_local, 2 * f, d))
        self.w_down = nn.Parameter(torch.empty(e_local, d, f))
        if cfg.expert_bias:
            self.b_gate_up = nn.Parameter(torch.empty(e_local, 2 * f))
            self.b_down = nn.Parameter(torch.empty(e_local, d))

    # -- routing -----------------------------------------------------------------------------

    def router(self, h: torch.Tensor) -> torch.Tensor:
        """Router logits: h [T, D] -> [T, E] in h's dtype (fp32 for sigmoid_group routers)."""
        bias = self.router_bias if self.cfg.router_bias else None
        if self.cfg.router_scoring == "sigmoid_group":
            return F.linear(_wide(h), self.router_weight.to(_wide(h).dtype))  # [T, E]
        return F.linear(h, self.router_weight, bias)  # [T, E]

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k choice: logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] in at
        least fp32)."""
        k = self.cfg.top_k
        if self.cfg.router_scoring == "sigmoid_group":
            return self._select_groups(logits)
        if self.cfg.router_scoring == "topk_softmax":
            top_logits, topk_ids = torch.topk(logits, k, dim=-1)  # [T, K]
            topk_weights = torch.softmax(_wide(top_logits), dim=-1)  # [T, K]
        else:
            probs = torch.softmax(_wide(logits), dim=-1)  # [T, E]
            topk_weights, topk_ids = torch.topk(probs, k, dim=-1)  # [T, K]
            if self.cfg.norm_topk_prob:
                topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_ids, topk_weights

    def _select_groups(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3 choice: best `topk_group` groups (by the sum of their top-2 biased
        scores), then the top-k biased scores inside them; weights are the unbiased scores."""
        cfg = self.cfg
        n_tok = logits.shape[0]
        scores = torch.sigmoid(_wide(logits))  # [T, E]
        choice = scores
        if cfg.score_correction_bias:
            choice = scores + self.router_correction_bias.to(scores.dtype)  # [T, E]
        if cfg.n_group > 1:
            per_group = cfg.num_experts // cfg.n_group
            grouped = choice.view(n_tok, cfg.n_group, per_group)  # [T, groups, E/groups]
            group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [T, groups]
            best = group_score.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            keep = keep[:, :, None].expand(-1, -1, per_group).reshape(n_tok, -1)  # [T, E]
            choice = choice.masked_fill(~keep, float("-inf"))
        topk_ids = choice.topk(cfg.top_k, dim=-1).indices  # [T, K]
        topk_weights = scores.gather(1, topk_ids)  # [T, K]
        if cfg.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, topk_weights * cfg.routed_scaling_factor

    # -- experts -----------------------------------------------------------------------------

    def slot(self, expert_id: int) -> int:
        """Local slot of global expert `expert_id` in the stacked weights."""
        try:
            return self._slot_of[int(expert_id)]
        except KeyError:
            raise ValueError(f"expert {expert_id} is not held by layer {self.layer} "
                             f"(held: {len(self.expert_ids)} experts)") from None

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The expert nonlinearity: gate_up [n, 2F] (gate half first) -> [n, F]."""
        gate, up = gate_up.chunk(2, dim=-1)  # [n, F] each
        if self.cfg.expert_act == "clamped_swiglu":
            limit, alpha = self.cfg.swiglu_limit, self.cfg.swiglu_alpha
            gate = gate.clamp(max=limit)
            up = up.clamp(-limit, limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))
        return F.silu(gate) * up

    _activate = activate  # older name, kept for callers

    def shared_forward(self, h: torch.Tensor) -> torch.Tensor | None:
        """Shared experts' output h [T, D] -> [T, D] (None when the family has none); it adds
        to the routed output of every token."""
        return self.shared(h) if self.cfg.num_shared_experts else None

    def expert_forward(self, x: torch.Tensor, expert_id: int) -> torch.Tensor:
        """One expert, unweighted: x [n, D] -> [n, D]."""
        i = self.slot(expert_id)
        bias = self.cfg.expert_bias
        if self.packed is not None:
            return self._experts_grouped(x, torch.full((x.shape[0],), expert_id,
                                                       dtype=torch.int64, device=x.device))
        gate_up = F.linear(x, self.w_gate_up[i], self.b_gate_up[i] if bias else None)  # [n, 2F]
        return F.linear(self.activate(gate_up), self.w_down[i],
                        self.b_down[i] if bias else None)  # [n, D]

    def grouped_forward(self, x: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """Each row through its own expert, unweighted: x [n, D], expert_of_row [n] -> [n, D].

        expert_of_row holds global expert ids, all of them held by this block.
        """
        if self.grouped or self.packed is not None:
            return self._experts_grouped(x, expert_of_row)
        out = torch.empty_like(x)  # [n, D]
        if x.shape[0] == 0:
            return out
        order = torch.argsort(expert_of_row, stable=True)  # [n]
        sorted_ids = expert_of_row[order]  # [n]
        experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
            rows = order[start:start + c]  # [c]
            out[rows] = self.expert_forward(x[rows], e).to(out.dtype)
            start += c
        return out

    def _experts_grouped(self, x: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """grouped_forward as one grouped GEMM per projection (`probe.runtime.experts`)."""
        ids = torch.as_tensor(self.expert_ids, dtype=torch.int64)
        if x.device.type == "cpu":
            held = torch.isin(expert_of_row, ids)
            if not bool(held.all()):
                self.slot(int(expert_of_row[~held][0]))  # raises ValueError naming the expert
        lut = self._slot_lut.get(x.device)  # global id -> local slot, cached per device
        if lut is None:
            lut = torch.full((self.cfg.num_experts,), -1, dtype=torch.int64)
            lut[ids] = torch.arange(len(ids))
            lut = self._slot_lut[x.device] = lut.to(x.device)
        slot = lut.index_select(0, expert_of_row.to(x.device, torch.int64))
        return GroupedExperts.from_block(self)(x, slot)

    @staticmethod
    def combine(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over the K expert outputs: y [T, K, D], topk_weights [T, K] -> [T, D]."""
        y32 = _wide(y)
        return (y32 * topk_weights.to(y32.dtype)[..., None]).sum(dim=1).to(y.dtype)  # [T, D]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        """h [T, D] (router input) -> (output [T, D], routing). Needs every routed expert held."""
        logits = self.router(h)  # [T, E]
        topk_ids, topk_weights = self.select(logits)  # [T, K] x2
        n_tok, k = topk_ids.shape
        rows = h.repeat_interleave(k, dim=0)  # [T*K, D]
        y = self.grouped_forward(rows, topk_ids.reshape(-1)).view(n_tok, k, -1)  # [T, K, D]
        out = self.combine(y, topk_weights)  # [T, D]
        shared = self.shared_forward(h)
        if shared is not None:
            out = out + shared  # [T, D]
        return out, LayerRouting(self.layer, h, logits, topk_ids, topk_weights)


def packed_format(blocks: Sequence[MoEBlock]) -> str | None:
    """The storage format all of `blocks` keep their experts in: "mxfp4" / "fp8_block" (loaded
    with keep_format, `MoEBlock.packed`), or None for plain parameters.

    Expert parallelism moves packed experts as they are stored, through one replica slot layout
    for every layer, and memory accounting prices a slot by one format, so the blocks must
    agree: all packed in one format (gate/up and down alike) or none packed; otherwise a
    ValueError (TypeError for a `packed` that is not a pair of PackedWeight) names the layer."""
    formats = []
    for block in blocks:
        packed = block.packed
        if packed is None:
            formats.append(None)
            continue
        if (not isinstance(packed, tuple) or len(packed) != 2
                or not all(isinstance(w, PackedWeight) for w in packed)):
            raise TypeError(f"MoE layer {block.layer}: packed experts must be a pair of "
                            f"PackedWeight (w_gate_up, w_down), got {packed!r:.80}")
        if packed[0].fmt != packed[1].fmt:
            raise ValueError(f"MoE layer {block.layer}: w_gate_up is {packed[0].fmt} and w_down "
                             f"{packed[1].fmt}; packed experts need one format")
        formats.append(packed[0].fmt)
    if len(set(formats)) > 1:
        raise ValueError(f"packed experts need one format in every MoE layer (one replica slot "
                         f"layout); the layers hold {formats}")
    return formats[0] if formats else None


# ---------------------------------------------------------------------------------------------
# Decoder


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int, expert_ids: Sequence[int] | None) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = LatentAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer in cfg.moe_layers
        if self.is_moe:
            self.moe = MoEBlock(cfg, layer, expert_ids)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x: torch.Tensor, batch: _Batch
                ) -> tuple[torch.Tensor, LayerRouting | None]:
        """x [T, D] -> ([T, D], routing of this layer or None for a dense layer)."""
        x = x + self.attn(self.attn_norm(x), batch)  # [T, D]
        h = self.mlp_norm(x)  # [T, D]
        if self.is_moe:
            y, routing = self.moe(h)  # [T, D]
            return x + y, routing
        return x + self.mlp(h), None


@dataclass
class ModelOutput:
    """logits [B, t, V] for [B, t] input, [T, V] for flat input, or [B, V] with last_only;
    routing: one LayerRouting per MoE layer (in layer order) when requested."""

    logits: torch.Tensor
    routing: list[LayerRouting] | None = None


class MoETransformer(nn.Module):
    """Decoder-only MoE transformer; build on the meta device and load with `load_model`."""

    def __init__(self, cfg: MoEConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i, expert_ids) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_cache: tuple[torch.device, torch.Tensor, float] | None = None

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks, in layer order (L of them)."""
        return [layer.moe for layer in self.layers if layer.is_moe]

    @property
    def expert_format(self) -> str | None:
        """"mxfp4" / "fp8_block" when the experts are kept packed, None for plain parameters
        (`packed_format` of the MoE blocks)."""
        return packed_format(self.moe_blocks)

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""
        return KVCache(self.cfg.num_layers)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, Hd/2] in `dtype`."""
        if self._rope_cache is None or self._rope_cache[0] != positions.device:
            inv_freq, scale = rope_frequencies(self.cfg.rope, self.cfg.head_dim)
            self._rope_cache = (positions.device, inv_freq.to(positions.device), scale)
        _, inv_freq, scale = self._rope_cache
        angles = positions.float()[:, None] * inv_freq[None, :]  # [T, Hd/2]
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)

    def _batch(self, seq_lens: list[int], caches: Sequence[KVCache] | None,
               device: torch.device, dtype: torch.dtype) -> _Batch:
        past = [c.length for c in caches] if caches is not None else [0] * len(seq_lens)
        positions = torch.cat([torch.arange(p, p + t) for p, t in zip(past, seq_lens, strict=True)])
        cos, sin = self._rope(positions.to(device), dtype)
        t_max = max(seq_lens)
        s_max = max(p + t for p, t in zip(past, seq_lens, strict=True))
        q_index = torch.cat([i * t_max + torch.arange(t) for i, t in enumerate(seq_lens)])
        # Query row r of sequence i sits at absolute position past_i + r; key column c at c.
        q_pos = torch.tensor(past)[:, None] + torch.arange(t_max)[None, :]  # [B, t_max]
        k_pos = torch.arange(s_max)  # [s_max]
        causal = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, t_max, s_max]
        real_q = torch.arange(t_max)[None, :] < torch.tensor(seq_lens)[:, None]  # [B, t_max]
        masks = {False: causal}
        if self.cfg.sliding_layers:
            window = self.cfg.sliding_window
            masks[True] = causal & (k_pos[None, None, :] > q_pos[:, :, None] - window)
        # Padded query rows attend to key 0 only, so their softmax stays finite (then dropped).
        masks = {key: (m | (~real_q[:, :, None] & (k_pos == 0)[None, None, :])).to(device)
                 for key, m in masks.items()}
        return _Batch(seq_lens, past, caches, cos, sin, q_index.to(device), t_max, s_max, masks)

    def forward(self, input_ids: torch.Tensor, *, seq_lens: Sequence[int] | None = None,
                caches: Sequence[KVCache] | None = None, return_routing: bool = False,
                last_only: bool = False) -> ModelOutput:
        """Run a batch of sequences.

        Args:
            input_ids: [B, t] int64 (B sequences of t new tokens each), or [T] int64 flat, with
                `seq_lens` giving the new tokens of each sequence (default: one sequence).
            seq_lens: new tokens per sequence, summing to T (flat input only).
            caches: one KVCache per sequence, or None for a stateless pass from position 0.
                Each cache grows by its sequence's new tokens.
            return_routing: also return each MoE layer's router input, logits and choices.
            last_only: return only the last token's logits of each sequence ([B, V]).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64 or int32 tensor")
        batched = input_ids.dim() == 2
        if batched:
            if seq_lens is not None:
                raise ValueError("seq_lens is only for flat [T] input_ids")
            n_seq, t = input_ids.shape
            seq_lens = [t] * n_seq
            flat = input_ids.reshape(-1)
        elif input_ids.dim() == 1:
            flat = input_ids
            seq_lens = [int(flat.shape[0])] if seq_lens is None else [int(s) for s in seq_lens]
            if sum(seq_lens) != flat.shape[0] or min(seq_lens, default=0) <= 0:
                raise ValueError(f"seq_lens must be positive and sum to {flat.shape[0]} tokens, "
                                 f"got {list(seq_lens)}")
        else:
            raise ValueError(f"input_ids must be [B, t] or [T], got shape {tuple(input_ids.shape)}")
        if flat.numel() == 0:
            raise ValueError("input_ids is empty")
        if caches is not None and len(caches) != len(seq_lens):
            raise ValueError(f"caches: got {len(caches)} caches for {len(seq_lens)} sequences")
        if int(flat.min()) < 0 or int(flat.max()) >= self.cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size})")

        x = self.embed(flat)  # [T, D]
        batch = self._batch(seq_lens, caches, x.device, x.dtype)
        routing: list[LayerRouting] = []
        for layer in self.layers:
            x, r = layer(x, batch)  # [T, D]
            if r is not None and return_routing:
                routing.append(r)
        if caches is not None:
            for cache, t in zip(caches, seq_lens, strict=True):
                cache.length += t
        if last_only:
            ends = torch.tensor(seq_lens, device=x.device).cumsum(0) - 1  # [B]
            x = x[ends]  # [B, D]
        x = self.norm(x)
        head = self.embed.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(x, head)  # [T, V] or [B, V]
        if batched and not last_only:
            logits = logits.view(len(seq_lens), -1, logits.shape[-1])  # [B, t, V]
        return ModelOutput(logits, routing if return_routing else None)
