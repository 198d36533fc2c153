"""Experiments that sit on top of probe (imports point one way: probe -> experiments)."""
