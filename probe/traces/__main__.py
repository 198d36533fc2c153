"""`python -m probe.traces trace ...`: the trace commands without the main `probe` CLI."""

from probe.traces.cli import main

main()
