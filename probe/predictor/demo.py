"""A tiny real recording for tests and demos: random-weight Qwen3-MoE, two token domains.

`record_tiny` writes a transformers Qwen3-MoE checkpoint with random weights, loads it with
probe.runtime's loader (the same path a real checkpoint takes), and records `num_steps` batches
through `probe.runtime.record.Recorder`: the first half draws token ids from domain "A" (low
ids), the second half from domain "B" (high ids), so there is a domain shift in the middle.
Every token is sampled into the side file. The routing of a random model is not a trained
model's routing: use this for plumbing and tests, not for accuracy claims.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["record_tiny"]


def record_tiny(out_dir: str | Path, *, num_steps: int = 12, seqs_per_step: int = 4,
                seq_len: int = 16, num_ranks: int = 4, hidden: int = 32, num_layers: int = 3,
                num_experts: int = 8, top_k: int = 2, vocab: int = 64,
                seed: int = 0) -> dict[str, Path]:
    """Write ckpt/, trace.safetensors and samples.safetensors under out_dir; return the paths."""
    import transformers

    from probe.runtime.checkpoint import load_model
    from probe.runtime.record import Recorder, record_step, token_ranks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=hidden // 2, num_experts=num_experts,
        num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4 * seq_len, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = transformers.Qwen3MoeForCausalLM(cfg)
    ckpt = out / "ckpt"
    hf.save_pretrained(ckpt)
    model = load_model(ckpt).eval()
    rec = Recorder(model.cfg, num_ranks=num_ranks, sample_rate=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    half = vocab // 2
    for step in range(num_steps):
        domain = "A" if step < num_steps // 2 else "B"
        lo = 0 if domain == "A" else half
        ids = torch.from_numpy(rng.integers(lo, lo + half, (seqs_per_step, seq_len)))
        ranks = [(step * seqs_per_step + i) % num_ranks for i in range(seqs_per_step)]
        src = token_ranks([seq_len] * seqs_per_step, ranks)
        record_step(model, rec, ids, src_rank=src, phase="prefill", tag=domain)
    paths = {"ckpt": ckpt, "trace": out / "trace.safetensors",
             "samples": out / "samples.safetensors"}
    rec.trace().save(paths["trace"])
    rec.save_samples(paths["samples"])
    return paths
