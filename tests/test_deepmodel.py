"""End-to-end CPU smoke test of experiments/deepmodel/run.py on the tiny arch, on a tiny
generated corpus (the real one, data/smallmodel/, is built per machine and not tracked)."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.deepmodel import plans, run
from experiments.smallmodel.record import AFTER_SHIFT_DOMAINS, CODE_DOMAINS

pytest.importorskip("transformers")

# One line of text per domain; documents repeat it with numbered variations.
DOMAIN_LINES = {
    "code_py": "def f{i}(a, b):\n    return a * {i} + b  # py\n",
    "code_c": "static int f{i}(int a) {{ return a << {i}; }}\n",
    "code_js": "const f{i} = (a) => a.map((x) => x + {i});\n",
    "code_sh": "for f in *.{i}; do echo \"$f\" | wc -c; done\n",
    "prose_en": "The {i}th river ran quietly past the old mill at dawn.\n",
    "cjk": "第{i}章：これは日本語の文章です。中文句子。한국어 {i}.\n",
}


def _tiny_corpus(folder: Path) -> tuple[Path, Path]:
    """corpus.jsonl (6 train + 2 held-out documents of ~1 KB per domain) and heldout.jsonl, in
    build_corpus's format: one JSON object per document (id, domain, split, source, text)."""
    assert set(CODE_DOMAINS) | set(AFTER_SHIFT_DOMAINS) <= set(DOMAIN_LINES)
    records = []
    for dom, line in DOMAIN_LINES.items():
        for doc in range(8):
            text = "".join(line.format(i=doc * 100 + k) for k in range(20))
            records.append({"id": f"{dom}/{doc}", "domain": dom,
                            "split": "heldout" if doc >= 6 else "train",
                            "source": "generated", "text": text})
    folder.mkdir(parents=True, exist_ok=True)
    corpus, heldout = folder / "corpus.jsonl", folder / "heldout.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    heldout.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records
                               if r["split"] == "heldout"))
    return corpus, heldout


@pytest.mark.slow
def test_run_tiny(tmp_path):
    corpus, heldout = _tiny_corpus(tmp_path / "corpus")
    s = run.main(["--arch", "tiny", "--steps", "2", "--device", "cpu", "--train-tokens", "3000",
                  "--eval-tokens", "1500", "--window", "128", "--min-pos", "16", "--micro", "4",
                  "--batch-size", "256", "--out", str(tmp_path / "out"),
                  "--ckpt", str(tmp_path / "ckpt"), "--corpus", str(corpus),
                  "--heldout", str(heldout), "--decode-steps", "6", "--decode-pre", "16",
                  "--per-rank", "3", "--hidden", "16,8",
                  "--train-args", "--batch 2 --seq 64 --eval-windows 2 --experts-impl eager"])
    assert s["pairs_train"] == 3000 and s["pairs_heldout"] == 1500
    assert len(s["consecutive_cosine"]) == s["layers"] - 1
    assert s["distill"]["hidden"] == 16 and s["distill_other_widths"]["distilled_h8"]["hidden"] == 8
    for which in ("frozen", "distilled", "distilled_h8"):
        m = s["mean"][which]
        assert 0.0 <= m["topk_acc"] <= m["recall_2k"] <= 1.0
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert saved["heldout_ce"] == s["heldout_ce"]
    rows = (tmp_path / "out/layers.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * (s["layers"] - 1)
    # decode-like loads: 2 phases x 6 steps, every token of 8 ranks x 3 requests counted
    loads = np.load(tmp_path / "out/decode_loads.npz")
    k = int(loads["top_k"])
    assert int(loads["shift_step"]) == 6
    for name in ("truth", "distilled", "distilled_h8", "prior"):
        x = loads[name]
        assert x.shape == (12, s["layers"] - 1, 8, x.shape[3])
        assert (x.sum(axis=3) == 3 * k).all()  # per step, layer and source rank
    assert s["decode_like"]["tokens"] == 12 * 8 * 3
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["command"].startswith("python -m experiments.deepmodel.run --arch tiny")
    assert {o["path"] for o in manifest["outputs"]} == {
        "train_summary.json", "summary.json", "layers.csv", "decode_loads.npz"}

    # plan quality from those loads: every predictor and baseline scored, ratios >= ~1
    res = plans.main([str(tmp_path / "out/decode_loads.npz"), "--out", str(tmp_path / "p.json"),
                      "--processes", "1"])
    assert set(res["ir_ratio"]) == {"distilled", "distilled_h8", "prior", "last_step", "avg_8"}
    for row in res["ir_ratio"].values():
        assert row["all"] > 0.9 and 0.0 <= row["within_5pct"] <= 1.0
    manifest = json.loads((tmp_path / "p.manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == ["p.json"]
