"""Shared fixtures. Plain helpers and hypothesis strategies are in tests/helpers.py.

Mark tests that take more than a few seconds with `@pytest.mark.slow`: `python -m pytest -m
"not slow"` is the quick development run, `python -m pytest` (CI) runs everything.
"""

from __future__ import annotations

import numpy as np
import pytest

from probe.placement import sharded_home
from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem
from probe.specs import hardware_preset, model_preset


def _ep8_problem(seed: int = 0) -> BalanceProblem:
    """ep=8, 128 experts, top-4 Zipf-skewed decode step of 768 tokens per rank (gpt-oss)."""
    rng = np.random.default_rng(seed)
    pop = (np.arange(128) + 1.0) ** -1.0
    pop = pop[rng.permutation(128)]
    load = np.zeros((8, 128), np.int64)
    for s in range(8):
        keys = np.log(pop)[None, :] + rng.gumbel(size=(768, 128))
        top = np.argpartition(-keys, 4, axis=1)[:, :4]
        load[s] = np.bincount(top.ravel(), minlength=128)
    cost = CostModel.from_specs(model_preset("gpt-oss-120b"), hardware_preset("h200x8"))
    return BalanceProblem(load, sharded_home(128, 8), 3, 3 * cost.transfer_time[0, 1], cost)


@pytest.fixture
def ep8_problem():
    """`ep8_problem(seed)`: a realistic ep=8 decode step (gpt-oss-120b on h200x8, 3 slots,
    a window of three expert copies), the same problem for the same seed."""
    return _ep8_problem


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    """`tiny_qwen3_moe(vocab_size, num_layers, top_k, max_positions, mlp_only_layers=())`:
    save a tiny random Qwen3-MoE checkpoint with transformers (hidden 32, 4 heads of 8, 8
    experts of width 8, weights N(0, 0.3) so that routing matters, seed 0) and return
    (checkpoint dir, the transformers model). Skips the test without transformers."""
    transformers = pytest.importorskip("transformers")
    import torch

    def build(vocab_size: int, num_layers: int, top_k: int, max_positions: int,
              mlp_only_layers: tuple[int, ...] = ()):
        kw = {"mlp_only_layers": list(mlp_only_layers)} if mlp_only_layers else {}
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=24, moe_intermediate_size=8,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_experts=8, num_experts_per_tok=top_k,
            max_position_embeddings=max_positions, **kw)
        torch.manual_seed(0)
        ref = transformers.Qwen3MoeForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0.0, 0.3)
        path = tmp_path_factory.mktemp("qwen3_moe")
        ref.save_pretrained(path)
        return path, ref

    return build
