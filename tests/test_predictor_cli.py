"""End to end on a tiny real recording: split by step, CLI train / eval / study."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from probe.predictor.samples import split_steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from probe.predictor.demo import record_tiny

    return record_tiny(tmp_path_factory.mktemp("tiny"), num_steps=10, seqs_per_step=3,
                       seq_len=12, num_ranks=4)


def _app():
    from probe.predictor.cli import register

    app = typer.Typer()
    register(app)
    return app


def test_split_steps_holds_out_whole_steps():
    steps = np.repeat(np.arange(40), 5)
    train, test = split_steps(steps, held_out=0.3, block=4, seed=1)
    assert not np.any(train & test) and np.all(train | test)
    for s in range(40):  # never split inside a step
        assert len(set(test[steps == s])) == 1
    assert np.unique(steps[test]).size == 12  # 3 of 10 blocks of 4 steps
    _, tail = split_steps(steps, held_out=0.25, mode="tail")
    assert np.unique(steps[tail]).tolist() == list(range(30, 40))
    with pytest.raises(ValueError, match="held_out"):
        split_steps(steps, held_out=1.5)


@pytest.mark.slow
def test_cli_train_eval_study(tiny, tmp_path):
    runner = CliRunner()
    app = _app()
    pred = tmp_path / "pred.safetensors"
    res = runner.invoke(app, ["predictor", "train", "--samples", str(tiny["samples"]),
                              "--model", str(tiny["ckpt"]), "--out", str(pred), "--epochs", "2",
                              "--hidden", "16", "--num-ranks", "4", "--block", "2"])
    assert res.exit_code == 0, res.output
    assert pred.is_file() and "held-out fidelity" in res.output
    rows = tmp_path / "rows.json"
    res = runner.invoke(app, ["predictor", "eval", "--samples", str(tiny["samples"]),
                              "--predictors", str(pred), "--num-ranks", "4", "--block", "2",
                              "--json", str(rows)])
    assert res.exit_code == 0, res.output
    data = json.loads(rows.read_text())
    assert [r["layer"] for r in data["distilled"]] == [1, 2]
    assert all(0 <= r["topk_acc"] <= 1 for r in data["prior"] + data["distilled"])

    out = tmp_path / "study"
    res = runner.invoke(app, ["predictor", "study", "--samples", str(tiny["samples"]),
                              "--model", str(tiny["ckpt"]), "--trace", str(tiny["trace"]),
                              "--out", str(out), "--epochs", "1", "--hidden", "16",
                              "--num-ranks", "4", "--max-plan-steps", "2",
                              "--tokens-per-rank", "64"])
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    assert "frozen prior -> distilled" in report and "probe predictor study" in report
    results = json.loads((out / "results.json").read_text())
    plans = results["plans"]["layers"]["1"]
    assert {"distilled", "prior", "last_step", "avg_8", "same_step_share"} <= set(plans)
    # The same-step shares of a fully sampled recording are the truth itself.
    assert plans["same_step_share"]["ir_ratio"] == pytest.approx(1.0)
    assert len(results["online"]["steps"]) == 10


def test_cli_rejects_missing_checkpoint(tiny, tmp_path):
    res = CliRunner().invoke(_app(), ["predictor", "train", "--samples", str(tiny["samples"]),
                                      "--model", str(tmp_path), "--out",
                                      str(tmp_path / "p.safetensors")])
    assert res.exit_code != 0
    assert "config.json" in res.output


def test_from_model_reads_runtime_model(tiny):
    import torch

    from probe.predictor.model import PredictorSet
    from probe.runtime.checkpoint import load_model

    model = load_model(tiny["ckpt"])
    pset = PredictorSet.from_model(model, hidden=8)
    blocks = model.moe_blocks
    assert pset.layers == list(range(1, len(blocks))) and pset.top_k == 2
    h = torch.randn(6, blocks[0].router_weight.shape[1])
    for layer in pset.layers:
        assert torch.equal(pset[layer].router_weight, blocks[layer].router_weight.float())
        # The runtime's own top-k rule picks the same ids as the cloned router.
        ids = pset[layer].predict_topk(h)
        assert torch.equal(ids, blocks[layer].select(blocks[layer].router(h))[0])
