"""Heuristic vs exact balance planners: optimality gaps, solve times, tables and plots.

Modules: instances (seeded instance grid from routing traces), run (solve, cross-check, JSONL),
report (Markdown, CSV, plots), cli (`python -m solvers_bench`, `probe bench solvers`).
See docs/solvers_bench.md.
"""
