"""Planner benchmarks: greedy speed and balance, exact backends, greedy rules, lp gap."""
