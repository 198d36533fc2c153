"""The fair comparison of EPLB, EPLB + LP, PROBE and an oracle (run.py, report.py)."""
