"""Where a profiled lite kernel spends its time, step by step, from Nsight Compute's source page.

    python -m experiments.planner.ncu_regions REPORT.csv[.gz] --revision REV

REPORT is `ncu -i lite.ncu-rep --page source --csv --print-source cuda,sass` (what
experiments/planner/lite_ncu.sh saves, gzipped): per source line of the kernel, the warp-state
samples ("Warp Stall Sampling (All Samples)", with their stall reasons) and the warp
instructions executed. The lines of probe/planner/lite_cuda.py at REV (git show) are split
into the kernel's steps at its profiling marks (`if UPTO == k:`): the start, then each round's
rank order, pair tests, matching, experts, pool entries, pool layout, amounts, admission, new
blocks and apply (since the pairs' warps make their moves without block barriers, experts to
amounts are one step, "pair moves"); the lines of probe/planner/lite.py count to the step
whose device function they are (copy_source apart: the pair tests, the experts and the
admission all call it). Prints, for each profiled launch, each step's share of the samples
and of the instructions, and its four most frequent stall reasons; then the instructions by
SASS opcode (each instruction once, by its address: the page lists an inlined instruction
under every line it serves), and the
share of memory instructions (loads, stores, atomics). A barrier stall is counted where the
waiting warp stands, usually the first line after the barrier: part of a step's share is its
wait for the step before.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A round's steps after the start, one per profiling mark, as the kernel had them: with marks
# 0-9 (up to bb47e48), and with marks 0-6 since each pair's warp makes its move from expert to
# amount without a block barrier (the steps "experts" to "amounts" in one).
STEPS_BY_MARKS = {
    10: ("rank order", "pair tests", "matching", "experts", "pool entries", "pool layout",
         "amounts", "admission", "new blocks"),
    7: ("rank order", "pair tests", "matching", "pair moves", "admission", "new blocks"),
}
# lite.py's device functions (first line of each) and the step that calls them (the pair
# moves' functions count to "pair moves" in a kernel with marks 0-6; eval_move, f(x) in one
# function, is in revisions before move_base and eval_amount took its place).
LITE_FUNCTIONS = {"pool_source": "pool entries", "eval_move": "amounts",
                  "move_base": "amounts", "eval_amount": "amounts",
                  "copy_source": "copy_source", "add_replica": "admission",
                  "can_move": "pair tests", "grid_point": "amounts",
                  "block_value": "pool entries"}
_FUSED = {"pool entries": "pair moves", "amounts": "pair moves"}


def source_at(revision: str, path: str) -> list[str]:
    """The lines of a file of the repository at a git revision."""
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
                          capture_output=True, text=True, check=True).stdout.splitlines()


def kernel_steps(revision: str) -> list[tuple[int, str]]:
    """(first line, step) of the kernel's steps in lite_cuda.py at revision, in line order."""
    source = source_at(revision, "probe/planner/lite_cuda.py")
    marks, start, outputs = {}, None, None
    for number, line in enumerate(source, 1):
        found = re.search(r"if UPTO == (\d+):", line)
        if found:
            marks[int(found.group(1))] = number
        if "def _lite_kernel" in line:
            start = number
        if "# The outputs." in line:
            outputs = number
    steps = STEPS_BY_MARKS.get(len(marks))
    if start is None or outputs is None or steps is None or sorted(marks) != list(
            range(len(marks))):
        raise SystemExit(f"lite_cuda.py at {revision} has neither profiling marks 0-9 nor 0-6")
    last = len(marks) - 1
    bounds = [(start, "start")] + [(marks[k - 1] + 1, steps[k - 1]) for k in range(1, last + 1)]
    return bounds + [(marks[last] + 1, "apply"), (outputs, "outputs")]


def lite_functions(revision: str) -> list[tuple[int, str]]:
    """(first line, step) of lite.py's device functions at revision."""
    source = source_at(revision, "probe/planner/lite.py")
    found = []
    for number, line in enumerate(source, 1):
        name = re.match(r"def (\w+)\(", line)
        if name:
            found.append((number, LITE_FUNCTIONS.get(name.group(1), "lite.py")))
    return found


def step_of(bounds: list[tuple[int, str]], line: int) -> str:
    step = "?"
    for first, name in bounds:
        if line >= first:
            step = name
    return step


def _cell(row: list[str], columns: dict, name: str) -> int:
    cell = row[columns[name]]
    return int(cell) if cell not in ("", "-") else 0


# SASS opcodes that move data to or from memory.
MEMORY_OPCODES = ("LD", "ST", "ATOM", "RED")


def summarise(path: Path, revision: str) -> list[dict]:
    """One dict per profiled launch: {step: Counter(samples, instructions, stall_*)}, with the
    launch's SASS instructions by opcode under the key "opcodes" (a Counter)."""
    kernel_bounds, lite_bounds = kernel_steps(revision), lite_functions(revision)
    if any(name == "pair moves" for _, name in kernel_bounds):
        lite_bounds = [(first, _FUSED.get(step, step)) for first, step in lite_bounds]
    opener = gzip.open if path.suffix == ".gz" else open
    launches: list[dict] = []
    seen: set = set()
    kernel = source_file = columns = None
    with opener(path, "rt") as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            if row[0] == "File Path":
                source_file = Path(row[1]).name
            elif row[0] == "Function Name":
                if row[1] != kernel:
                    kernel = row[1]
                    launches.append(collections.defaultdict(collections.Counter))
                    seen = set()
            elif row[0] == "Line No":
                columns = {name: i for i, name in enumerate(row)}
            elif not row[0] and columns and launches and len(row) > 3:
                address, sass = row[2], row[3].split()
                if address in ("", "-", "...") or address in seen or not sass:
                    continue
                seen.add(address)
                opcode = (sass[1] if sass[0].startswith("@") and len(sass) > 1 else sass[0])
                launches[-1]["opcodes"][opcode.split(".")[0]] += _cell(
                    row, columns, "Instructions Executed")
            elif row[0] and columns and launches:
                line = int(row[0])
                if source_file == "lite_cuda.py":
                    step = step_of(kernel_bounds, line)
                elif source_file == "lite.py":
                    step = step_of(lite_bounds, line)
                else:
                    step = source_file
                counts = launches[-1][step]
                counts["samples"] += _cell(row, columns, "Warp Stall Sampling (All Samples)")
                counts["instructions"] += _cell(row, columns, "Instructions Executed")
                for name in columns:
                    if name.startswith("stall_") and "(" not in name:
                        counts[name] += _cell(row, columns, name)
    return launches


def table(launches: list[dict]) -> str:
    out = []
    for index, launch in enumerate(launches):
        steps = {k: v for k, v in launch.items() if k != "opcodes"}
        samples = sum(c["samples"] for c in steps.values()) or 1
        instructions = sum(c["instructions"] for c in steps.values()) or 1
        out.append(f"launch {index}: {samples} samples, {instructions} warp instructions")
        out.append("| step | samples | instructions | top stall reasons (samples) |")
        out.append("|---|---:|---:|---|")
        for step, c in sorted(steps.items(), key=lambda item: -item[1]["samples"]):
            stalls = sorted(((v, k[6:]) for k, v in c.items() if k.startswith("stall_") and v),
                            reverse=True)[:4]
            out.append(f"| {step} | {100 * c['samples'] / samples:.1f}% | "
                       f"{c['instructions']} ({100 * c['instructions'] / instructions:.1f}%) | "
                       + ", ".join(f"{k} {v}" for v, k in stalls) + " |")
        opcodes = launch.get("opcodes", collections.Counter())
        total = sum(opcodes.values())
        if total:
            memory = sum(v for k, v in opcodes.items() if k.startswith(MEMORY_OPCODES))
            top = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in opcodes.most_common(8))
            out.append("")
            out.append(f"SASS instructions executed: {total}; by opcode: {top}; loads, stores "
                       f"and atomics {100 * memory / total:.1f}%")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the source page as CSV (.gz or not)")
    parser.add_argument("--revision", required=True,
                        help="the git revision whose lite_cuda.py and lite.py were profiled")
    args = parser.parse_args(argv)
    print(table(summarise(args.report, args.revision)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
