"""Byte-level tokenizer, corpus reader and architecture of the small MoE test-bench model.

The small model (experiments/smallmodel/, docs/smallmodel.md) is a Qwen3-MoE checkpoint trained on a
mixed-domain corpus built from text that ships on the machine. This module holds the parts that
the training, recording and predictor code share; it needs only numpy (no torch, no transformers).

Token ids: bytes 0..255 are themselves; BOS_ID, EOS_ID and PAD_ID follow; the vocabulary is padded
to VOCAB_SIZE (a multiple of 16) and the ids past PAD_ID are never produced.

>>> encode("hé", bos=True).tolist()
[256, 104, 195, 169]
>>> decode(encode("hé", bos=True, eos=True))
'hé'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SMALL_ARCH",
    "TINY_ARCH",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "load_corpus",
    "pack_documents",
    "qwen3_moe_config_kwargs",
]

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 272

# The trained model: 8 MoE layers, 64 experts, top-4 (docs/smallmodel.md says why these sizes).
SMALL_ARCH: dict = {
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 64,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "intermediate_size": 512,   # unused: every layer is an MoE layer
    "max_position_embeddings": 2048,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": True,
}

# A tiny variant for CPU tests.
TINY_ARCH: dict = {
    **SMALL_ARCH,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
}


def qwen3_moe_config_kwargs(arch: dict | None = None, **overrides) -> dict:
    """Keyword arguments for transformers' Qwen3MoeConfig (plain fields only).

    arch: one of SMALL_ARCH / TINY_ARCH or a dict of the same keys (default SMALL_ARCH);
    overrides replace single fields. Every layer is sparse (decoder_sparse_step=1, no
    mlp_only_layers), embeddings are untied, and the special ids are set.
    """
    kwargs = dict(SMALL_ARCH if arch is None else arch)
    kwargs.update(overrides)
    kwargs.update({
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    })
    for key in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size"):
        if not isinstance(kwargs[key], int) or kwargs[key] <= 0:
            raise ValueError(f"arch[{key!r}] must be a positive int, got {kwargs[key]!r}")
    if kwargs["num_experts_per_tok"] > kwargs["num_experts"]:
        raise ValueError("arch['num_experts_per_tok'] exceeds arch['num_experts']")
    return kwargs


def encode(text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """UTF-8 bytes of text as token ids, int64 [T], optionally framed by BOS/EOS."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    parts = ([np.array([BOS_ID])] if bos else []) + [body] + ([np.array([EOS_ID])] if eos else [])
    return np.concatenate(parts)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Token ids back to text: special ids are dropped, invalid UTF-8 is replaced."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    return bytes(int(i) for i in arr if 0 <= i < 256).decode("utf-8", errors="replace")


def load_corpus(path: str | Path, *, split: str | None = None,
                domains: Iterable[str] | None = None) -> list[dict]:
    """Read corpus.jsonl (written by experiments/smallmodel/build_corpus.py).

    split: "train", "heldout" or None for both; domains: keep only these (None: all).
    Returns the records (dicts with id, domain, split, source, text) in file order.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"corpus file {path} does not exist; run "
                         "python -m experiments.smallmodel.build_corpus first")
    wanted = None if domains is None else set(domains)
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc
            if split is not None and rec.get("split") != split:
                continue
            if wanted is not None and rec.get("domain") not in wanted:
                continue
            out.append(rec)
    return out


def pack_documents(docs: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Concatenate documents as BOS text EOS into one stream.

    Returns (tokens uint16 [N], domain_index uint8 [N], domain names): domain_index gives, for
    every token, the index into the names list of the document it came from.
    """
    names: list[str] = []
    toks, dom = [], []
    for rec in docs:
        ids = encode(rec["text"], bos=True, eos=True)
        if rec["domain"] not in names:
            names.append(rec["domain"])
        toks.append(ids.astype(np.uint16))
        dom.append(np.full(ids.shape[0], names.index(rec["domain"]), dtype=np.uint8))
    if not toks:
        raise ValueError("docs is empty")
    return np.concatenate(toks), np.concatenate(dom), names
