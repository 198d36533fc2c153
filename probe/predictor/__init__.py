"""Lookahead predictor of the next MoE layer's routing, its distillation and fidelity metrics.

See docs/predictor.md. Modules: `model` (LookaheadPredictor, PredictorSet, router_prior),
`distill` (OnlineDistiller, train_offline), `metrics` (top-k accuracy, top-half-k hit, 2k
recall, load errors), `baselines` (history predictions, plan quality), `samples` (recorded
hidden states), `evaluate` (per-layer tables), `cli` (`probe predictor train|eval`).
"""

from probe.predictor.distill import OnlineDistiller, distill_loss, train_offline
from probe.predictor.model import LookaheadPredictor, PredictorSet, load_from_ids, router_prior

__all__ = [
    "LookaheadPredictor",
    "OnlineDistiller",
    "PredictorSet",
    "distill_loss",
    "load_from_ids",
    "router_prior",
    "train_offline",
]
