"""probe: PROBE-style predictive expert balancing for MoE inference under expert parallelism."""

__version__ = "0.1.0"
