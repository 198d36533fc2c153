"""The paper-style evaluation in simulation (probe.sim)."""
