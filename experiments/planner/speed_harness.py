"""What the CPU experiments of the planner share: the command line and the run's manifest
(`start`) and wall-clock samples (`timed`) of assign_speed and planner_speed, and the results
file with its manifest (`save`), also kernel_stats' and kernel_trace's."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from experiments.manifest import Manifest


def start(doc: str, name: str, argv: list[str] | None) -> tuple:
    """(args, run, console) of the script experiments.planner.<name>: its command line
    (--quick, --out default results/<name>.json), its Manifest, a rich Console."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances and repeats")
    parser.add_argument("--out", default=f"results/{name}.json")
    args = parser.parse_args(argv)
    return args, Manifest.start(f"experiments.planner.{name}", argv), Console()


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn() (time.perf_counter)."""
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return samples


def save(run: Manifest, out: str, data: dict, markdown: str | None = None) -> list[Path]:
    """Write data as JSON to out (and markdown to out with .md when given) and the manifest
    beside them (out with .manifest.json); returns the files written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    files = [out]
    if markdown is not None:
        md = out.with_suffix(".md")
        md.write_text(markdown)
        files.append(md)
    run.write(out.parent, files, name=out.with_suffix(".manifest.json").name)
    return files
