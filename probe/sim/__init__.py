"""Simulator: replays RoutingTraces through the cost model under balancing policies.

`simulate(trace, model=..., hardware=...)` (engine.py) returns a `SimResult`; attention.py holds
the per-layer attention model, predict.py the declared prediction-error models, policies.py
the plan application and EPLB placement, calibration.py the measured H200 numbers, report.py
tables and plots, cli.py the `probe simulate` command. docs/simulator.md describes the model.
"""

from probe.sim.attention import AttentionModel
from probe.sim.engine import METRICS, POLICIES, SimResult, resplit_load, simulate
from probe.sim.predict import make_predictor

__all__ = ["METRICS", "POLICIES", "AttentionModel", "SimResult", "make_predictor",
           "resplit_load", "simulate"]
