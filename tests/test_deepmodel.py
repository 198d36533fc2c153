"""End-to-end CPU smoke test of scripts/deepmodel/run.py on the tiny arch."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data/smallmodel/corpus.jsonl"
HELDOUT = ROOT / "data/smallmodel/heldout.jsonl"


@pytest.mark.skipif(not (CORPUS.is_file() and HELDOUT.is_file()), reason="no corpus")
def test_run_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("deep_run", ROOT / "scripts/deepmodel/run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s = mod.main(["--arch", "tiny", "--steps", "2", "--device", "cpu", "--train-tokens", "3000",
                  "--eval-tokens", "1500", "--window", "128", "--min-pos", "16", "--micro", "4",
                  "--batch-size", "256", "--out", str(tmp_path / "out"),
                  "--ckpt", str(tmp_path / "ckpt"), "--corpus", str(CORPUS),
                  "--heldout", str(HELDOUT), "--decode-steps", "6", "--decode-pre", "16",
                  "--per-rank", "3", "--hidden", "16,8",
                  "--train-args", "--batch 2 --seq 64 --eval-windows 2"])
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

    # plan quality from those loads: every predictor and baseline scored, ratios >= ~1
    spec = importlib.util.spec_from_file_location("deep_plans", ROOT / "scripts/deepmodel/plans.py")
    plans = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plans)
    res = plans.main([str(tmp_path / "out/decode_loads.npz"), "--out", str(tmp_path / "p.json"),
                      "--processes", "1"])
    assert set(res["ir_ratio"]) == {"distilled", "distilled_h8", "prior", "last_step", "avg_8"}
    for row in res["ir_ratio"].values():
        assert row["all"] > 0.9 and 0.0 <= row["within_5pct"] <= 1.0
