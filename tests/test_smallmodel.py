"""Tests of the small-model test bench: corpus helpers, tokenizer, training, recording, analysis.

Everything runs on CPU with a tiny config and a synthetic corpus (a few seconds in all).
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from probe.runtime.smallmodel import (
    BOS_ID,
    EOS_ID,
    TINY_ARCH,
    VOCAB_SIZE,
    decode,
    encode,
    load_corpus,
    pack_documents,
    qwen3_moe_config_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    return importlib.import_module(f"experiments.smallmodel.{name}")


build_corpus = _script("build_corpus")


# ------------------------------------------------------------------------------ tokenizer


def test_encode_decode_round_trip_with_specials():
    text = "def f(x):\n    return x  # 中文 テスト"
    ids = encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids.dtype == np.int64 and ids.max() < VOCAB_SIZE
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert decode(ids) == text


def test_encode_rejects_bytes():
    with pytest.raises(TypeError, match="text"):
        encode(b"abc")


def test_pack_documents_marks_domains():
    docs = [{"domain": "a", "text": "xy"}, {"domain": "b", "text": "z"},
            {"domain": "a", "text": "w"}]
    toks, dom, names = pack_documents(docs)
    assert names == ["a", "b"]
    assert toks.tolist() == [BOS_ID, 120, 121, EOS_ID, BOS_ID, 122, EOS_ID, BOS_ID, 119, EOS_ID]
    assert dom.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="empty"):
        pack_documents([])


def test_config_kwargs_validate_and_fix_specials():
    kw = qwen3_moe_config_kwargs(TINY_ARCH, num_experts=16)
    assert kw["num_experts"] == 16 and kw["vocab_size"] == VOCAB_SIZE
    assert kw["mlp_only_layers"] == [] and kw["decoder_sparse_step"] == 1
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        qwen3_moe_config_kwargs(TINY_ARCH, num_experts_per_tok=99)
    with pytest.raises(ValueError, match="hidden_size"):
        qwen3_moe_config_kwargs(TINY_ARCH, hidden_size=0)


# ------------------------------------------------------------------------------ corpus helpers


def test_strip_troff_keeps_text_and_drops_macros():
    src = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n'
           '.PP\nUse \\fI\\-a\\fP to show \\(aqall\\(aq.\n.sp\n.nf\n')
    out = build_corpus.strip_troff(src)
    assert "comment" not in out and ".TH" not in out and "\\f" not in out
    assert "NAME" in out
    assert "ls - list directory contents" in out
    assert "Use -a to show 'all'." in out


def test_chunk_text_respects_byte_limit_and_keeps_content():
    text = "".join(f"line {i} 中文\n" for i in range(200)) + "x" * 500 + "\n"
    chunks = build_corpus.chunk_text(text, 256)
    assert all(len(c.encode("utf-8")) <= 256 for c in chunks)
    assert "".join(chunks) == text
    with pytest.raises(ValueError, match="max_bytes"):
        build_corpus.chunk_text("a", 0)


def test_build_is_deterministic_and_writes_heldout(tmp_path):
    if not any(Path("/usr/include").rglob("*.h")):
        pytest.skip("no C headers on this machine")
    budget = {"code_c": 0.15}
    s1 = build_corpus.build(tmp_path / "a", budget_mb=budget, heldout_every=4)
    s2 = build_corpus.build(tmp_path / "b", budget_mb=budget, heldout_every=4)
    a = (tmp_path / "a" / "corpus.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "corpus.jsonl").read_bytes()
    assert s1 == s2 and s1["total_bytes"] > 0
    recs = load_corpus(tmp_path / "a" / "corpus.jsonl")
    assert {r["domain"] for r in recs} == {"code_c"}
    held = load_corpus(tmp_path / "a" / "heldout.jsonl")
    assert [r["id"] for r in held] == [r["id"] for r in recs if r["split"] == "heldout"]
    # A file's chunks never straddle the split.
    split_of = {}
    for r in recs:
        assert split_of.setdefault(r["source"], r["split"]) == r["split"]
    with pytest.raises(ValueError, match="unknown domain"):
        build_corpus.build(tmp_path / "c", budget_mb={"klingon": 1.0})


def test_load_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_corpus(bad)
    with pytest.raises(ValueError, match="split"):
        load_corpus(bad, split="test")


# ------------------------------------------------------------------------------ train + record

DOMAIN_TEXT = {
    "code_py": "def add(a, b):\n    return a + b\n\nclass Box:\n    pass\n",
    "code_c": "static int add(int a, int b) { return a + b; }\n#define N 4\n",
    "code_js": "const add = (a, b) => a + b;\nmodule.exports = { add };\n",
    "code_sh": "#!/bin/sh\nset -e\nfor f in *.txt; do echo \"$f\"; done\n",
    "prose_en": "The quick brown fox jumps over the lazy dog. It was a sunny day.\n",
    "cjk": "これは日本語の文章です。中文的句子也在这里。한국어 문장입니다.\n",
}


def _synthetic_corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for dom, text in DOMAIN_TEXT.items():
        for i in range(8):
            body = text * int(rng.integers(6, 12))
            lines.append({"id": f"{dom}/{i}", "domain": dom,
                          "split": "heldout" if i % 4 == 3 else "train", "source": "synthetic",
                          "text": body})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train a tiny model for a few steps and record tiny traces from it."""
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("smallmodel")
    corpus = _synthetic_corpus(base / "corpus.jsonl")
    train = _script("train")
    summary = train.main(["--corpus", str(corpus), "--out", str(base / "ckpt"), "--arch", "tiny",
                          "--steps", "24", "--batch", "4", "--seq", "32", "--warmup", "4",
                          "--log-every", "4", "--eval-every", "12", "--eval-windows", "4",
                          "--device", "cpu", "--experts-impl", "eager"])
    record = _script("record")
    record.main(["--ckpt", str(base / "ckpt"), "--corpus", str(corpus), "--out",
                 str(base / "res"), "--ranks", "2", "--per-rank", "3", "--decode-steps", "8",
                 "--shift-step", "4", "--prefill-steps", "4", "--prefill-tokens-per-rank", "96",
                 "--decode-sample-rate", "0.5", "--prefill-sample-rate", "0.1", "--threads", "1"])
    return base, summary


@pytest.mark.slow
def test_train_writes_loss_curve_and_a_checkpoint_our_loader_reads(tiny_run):
    import torch
    from transformers import Qwen3MoeForCausalLM

    from probe.runtime.checkpoint import load_model

    base, summary = tiny_run
    rows = list(csv.DictReader((base / "ckpt" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert float(rows[-1]["train_ce"]) < float(rows[0]["train_ce"])  # it learns
    assert not np.isnan(float(rows[-1]["val_ce"]))
    assert summary["steps"] == 24 and set(summary["val_ce_by_domain"]) == set(DOMAIN_TEXT)
    cfg = json.loads((base / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
    ours = load_model(base / "ckpt")
    ref = Qwen3MoeForCausalLM.from_pretrained(base / "ckpt", dtype=torch.float32).eval()
    ids = torch.from_numpy(encode("def add(a, b):", bos=True))[None]
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_lr_schedule_warms_up_then_decays():
    train = _script("train")
    lrs = [train.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.slow
def test_record_writes_traces_with_shift_and_ranks(tiny_run):
    from probe.runtime.record import load_samples
    from probe.traces import RoutingTrace

    base, _ = tiny_run
    res = base / "res"
    dec = RoutingTrace.load(res / "decode.trace.safetensors")
    assert dec.num_steps == 8 and dec.num_ranks == 2 and dec.top_k == TINY_ARCH[
        "num_experts_per_tok"]
    assert dec.step_tags == ["code"] * 4 + ["prose_cjk"] * 4
    assert np.all(dec.phase == 1)
    assert np.all(dec.tokens_per_step == 6)  # 2 ranks x 3 live requests, every step
    assert np.bincount(dec.src_rank, minlength=2).tolist() == [24, 24]
    log = json.loads((res / "decode_requests.json").read_text())
    assert log[4]["joined"] == 6 and log[4]["left"] >= 6  # the whole batch turns over
    assert set(log[3]["domains"]) <= {"code_py", "code_c", "code_js", "code_sh"}
    assert set(log[4]["domains"]) <= {"prose_en", "cjk"}
    pre = RoutingTrace.load(res / "prefill.trace.safetensors")
    assert pre.num_steps == 4 and np.all(pre.phase == 0)
    assert np.all(pre.tokens_per_step == 2 * 96)
    assert pre.step_tags == ["mixed", "code", "prose_en", "cjk"]
    smp = load_samples(res / "decode.samples.safetensors")
    assert smp.hidden.dtype == np.float16 and smp.hidden.shape[1:] == (
        TINY_ARCH["num_hidden_layers"], TINY_ARCH["hidden_size"])
    assert smp.logits.shape[1:] == (TINY_ARCH["num_hidden_layers"], TINY_ARCH["num_experts"])
    assert 0 < smp.hidden.shape[0] < 48


@pytest.mark.slow
def test_analyze_runs_on_recorded_traces(tiny_run, tmp_path):
    import shutil

    base, _ = tiny_run
    res = tmp_path / "res"
    shutil.copytree(base / "res", res)
    shutil.copy(base / "ckpt" / "loss.csv", res / "loss.csv")
    shutil.copy(base / "ckpt" / "train_summary.json", res / "train_summary.json")
    analyze = _script("analyze")
    analyze.main(["--results", str(res), "--recorded", str(res), "--no-plots"])
    out = json.loads((res / "analysis.json").read_text())
    assert out["sizes"]["decode_steps"] == 8 and out["sizes"]["shift_step"] == 4
    ir = out["decode"]["ir_all"]
    assert 1.0 <= ir["min"] <= ir["mean"] <= ir["max"] <= 2.0  # 2 ranks: IR <= G
    assert "## Hot experts across the shift" in (res / "report.md").read_text()


def test_packed_home_balances_and_fills_slots():
    analyze = _script("analyze")
    from probe.placement import imbalance_ratio, rank_load, sharded_home

    load = np.array([100, 90, 80, 70, 5, 4, 3, 2], dtype=float)  # hot experts all on rank 0
    home = analyze.packed_home(load, 2)
    assert home.sum(axis=0).tolist() == [1] * 8 and home.sum(axis=1).tolist() == [4, 4]
    static = imbalance_ratio(rank_load(load, sharded_home(8, 2)))
    packed = imbalance_ratio(rank_load(load, home))
    assert packed < static and packed == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="divide"):
        analyze.packed_home(load[:7], 2)
    assert analyze.hot_set(np.array([1, 5, 5, 0]), top=2) == {1, 2}


def _write_mo(path: Path, pairs: dict[str, str]) -> None:
    """A minimal little-endian gettext .mo file (no hash table)."""
    import struct

    keys = sorted(pairs)
    ids = [k.encode("utf-8") for k in keys]
    strs = [pairs[k].encode("utf-8") for k in keys]
    n = len(keys)
    header = 7 * 4
    orig_tab, trans_tab = header, header + 8 * n
    data_start = trans_tab + 8 * n
    blob, orig, trans = b"", [], []
    for s in ids:
        orig.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    for s in strs:
        trans.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, orig_tab, trans_tab, 0, 0)
    out += b"".join(struct.pack("<2I", ln, off) for ln, off in orig)
    out += b"".join(struct.pack("<2I", ln, off) for ln, off in trans)
    path.write_bytes(out + blob)


def test_mo_strings_returns_translations_and_script_filter(tmp_path):
    mo = tmp_path / "x.mo"
    _write_mo(mo, {"": "Content-Type: text/plain; charset=UTF-8\n",
                   "File not found": "ファイルが見つかりません", "Quit": "終了"})
    text = build_corpus.mo_strings(mo)
    assert "ファイルが見つかりません" in text and "終了" in text
    assert "Content-Type" not in text and "File not found" not in text
    assert build_corpus._require_script(text, build_corpus.CJK_RE) == text
    assert build_corpus._require_script("plain ascii words", build_corpus.CJK_RE) is None
    assert build_corpus.mo_strings(tmp_path / "missing.mo") is None


def test_topk_overlap_counts_shared_experts():
    analyze = _script("analyze")
    pred = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    true = np.array([[4.0, 1.0, 3.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    assert analyze.topk_overlap(pred, true, 2).tolist() == [0.5, 0.0]
    assert analyze.topk_overlap(pred, pred, 3).tolist() == [1.0, 1.0]
