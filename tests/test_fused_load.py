"""The Triton predicted-load kernel against its plain twin (`predict_load`), on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported: a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, torch
from probe.predictor.model import LookaheadPredictor
from probe.predictor.fused_load import fused_predict_load
cases = [  # E, D, H, K, T, G, router bias, trained residual
    (64, 32, 128, 4, 200, 4, True, True), (128, 48, 64, 8, 37, 8, False, True),
    (16, 8, 16, 1, 5, 1, True, True), (64, 16, 256, 6, 300, 2, False, True),
    (32, 16, 32, 2, 50, 3, True, False), (64, 8, 16, 4, 0, 2, False, True)]
res = []
for seed, (E, D, H, K, T, G, bias, trained) in enumerate(cases):
    torch.manual_seed(seed)
    pred = LookaheadPredictor(torch.randn(E, D) / D ** 0.5, torch.randn(E) * 0.1 if bias else None,
                              hidden=H, top_k=K)
    if trained:
        with torch.no_grad():
            pred.w2.weight.normal_(0, 0.05)
            pred.w2.bias.normal_(0, 0.05)
    pred.fuse()
    h, src = torch.randn(T, D), torch.randint(0, G, (T,))
    slow = pred.predict_load(h, src, G)
    for residual in ("triton", "cublas"):
        fast = fused_predict_load(pred, h, src, G, block=16, residual=residual)
        res.append({"shape": list(fast.shape), "want_shape": [G, E], "total": int(fast.sum()),
                    "want_total": T * K, "diff": int((fast.long() - slow).abs().sum())})
print(json.dumps(res))
"""


@pytest.mark.slow
def test_triton_kernel_equals_plain_twin():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 12  # 6 cases x 2 residual forms
    for r in rows:
        assert r["shape"] == r["want_shape"]
        assert r["total"] == r["want_total"]  # every token counted K times
        assert r["diff"] == 0  # the same [S, E] load as the plain form (float32)
