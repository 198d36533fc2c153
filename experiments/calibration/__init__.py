"""Calibration of the simulator's cost model on one H200."""
