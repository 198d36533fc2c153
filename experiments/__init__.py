"""What produces the committed results: one package per topic, one module per producer.

Every producer runs as ``python -m experiments.<topic>.<name> [--out DIR] ...`` from the
repository root and writes a manifest (experiments.manifest) next to its outputs; device shell
scripts sit beside the modules they drive. results/README.md lists each committed result with
the command that makes it. Library code lives in probe/; nothing in probe/ imports this package.
"""
