"""The lite planner kernel's machine code size for an H100 / H200 (sm_90), step by step, no GPU.

    python -m experiments.planner.lite_code_size --out results/lite_code_size

Compiles probe.planner.lite_cuda's kernel to PTX with Numba (NVVM; the GPU is stood in for, as
the sm_90 tests do) and assembles it with `ptxas -arch=sm_90 -O3`, at ep=8 / 128 experts (the
start inside the planner's block and the layer's state in shared memory, as such layers run)
and at ep=64 / 256 (separate start kernels); prints and saves the .text bytes of each, their
registers, and per step the bytes that the profiling variants (`kernel(upto=k)`: rounds that
end after step k, later steps compiled out) add one after the other. A round of the kernel runs
most of its code once or twice per warp, so its size is about the instructions a round issues.
Needs NVVM, ptxas and readelf (a CUDA toolkit), not a GPU.

`--lines N` also lists the N source lines with the most machine instructions in each full
kernel (compiled with line information; an inlined function's instructions count at its call
site), from nvdisasm's SASS: `pip install nvidia-cuda-nvdisasm` provides it, or name one with
`--nvdisasm PATH`. With it the small-layer kernel (probe.planner.lite_small, which CudaLite
runs at ep=8 / 128 experts) is measured too: its bytes, registers and instructions per part
of its source (the start, the round's rank steps and matching, the pair moves, rule 5, the
write-back; the device functions that Numba inlines at the IR level, lite_device's pair move
among them, and the shuffles' out-of-line fallbacks count at the kernel's def line). Its code
runs once (the start, the write-back) or once a round, and in run 15 (results/h100/run15) the
working warps waited on instruction fetch more than on anything else, so its size is a
figure to watch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

STEPS = ("start and outputs", "rank order", "pair tests", "matching", "pair moves",
         "admission", "new blocks", "apply")
CONFIGS = (("ep=8, E=128", 8, 128, True), ("ep=64, E=256", 64, 256, False))


def _stand_in_gpu() -> None:
    """Numba asks the current device for its compute capability while compiling device
    functions: answer sm_90 without a GPU."""
    import numba.cuda.dispatcher as dispatcher

    class H200:
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: H200()


def text_bytes(cubin: Path) -> int:
    """The bytes of the kernel's .text section in a cubin (readelf)."""
    sections = subprocess.run(["readelf", "-S", "-W", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    sizes = [int(line.split()[line.split().index("PROGBITS") + 3], 16)
             for line in sections.splitlines() if ".text." in line and "PROGBITS" in line]
    if len(sizes) != 1:
        raise RuntimeError(f"{cubin}: expected one .text section, found {len(sizes)}")
    return sizes[0]


def assemble(ptx: str, work: Path, name: str) -> dict:
    """ptxas -O3 for sm_90: the .text bytes and the registers a thread."""
    src, cubin = work / f"{name}.ptx", work / f"{name}.cubin"
    src.write_text(ptx)
    done = subprocess.run(["ptxas", "-arch=sm_90", "-O3", "-v", str(src), "-o", str(cubin)],
                          capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    return {"bytes": text_bytes(cubin), "registers": int(regs.group(1)) if regs else None}


_SASS_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_SASS_INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_lines(sass: str) -> dict[tuple[str, int], Counter]:
    """Machine instructions per source line of `nvdisasm -g` output: {(file name, line):
    Counter of opcodes (the mnemonic before its first dot)}. Instructions before the first
    line marker are left out."""
    per_line: dict[tuple[str, int], Counter] = {}
    where = None
    for text in sass.splitlines():
        marker = _SASS_LINE.search(text)
        if marker:
            where = (Path(marker.group(1)).name, int(marker.group(2)))
            continue
        op = _SASS_INSTRUCTION.match(text)
        if op and where is not None:
            per_line.setdefault(where, Counter())[op.group(1)] += 1
    return per_line


def find_nvdisasm(path: str | None) -> str:
    """nvdisasm: `path`, else on PATH, else the one the nvidia-cuda-nvdisasm wheel installs."""
    if path:
        return path
    found = shutil.which("nvdisasm")
    if found:
        return found
    for entry in sys.path:
        for wheel in sorted(Path(entry).glob("nvidia/cu*/bin/nvdisasm")) if entry else ():
            return str(wheel)
    raise SystemExit("--lines needs nvdisasm: pip install nvidia-cuda-nvdisasm, or --nvdisasm")


def line_sass(ptx: str, work: Path, name: str, nvdisasm: str) -> dict[tuple[str, int], Counter]:
    """`sass_lines` of the kernel's PTX (compiled with line information) assembled for sm_90."""
    src, cubin = work / f"{name}.ptx", work / f"{name}.cubin"
    src.write_text(ptx)
    subprocess.run(["ptxas", "-arch=sm_90", "-O3", "-lineinfo", str(src), "-o", str(cubin)],
                   capture_output=True, text=True, check=True)
    return sass_lines(subprocess.run([nvdisasm, "-c", "-g", str(cubin)], capture_output=True,
                                     text=True, check=True).stdout)


def top_lines(per_line: dict[tuple[str, int], Counter], count: int) -> list[dict]:
    """The `count` source lines of `line_sass`'s split with the most machine instructions."""
    ranked = sorted(per_line.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    root = Path(__file__).resolve().parents[2] / "probe" / "planner"
    rows = []
    for (file, line), ops in ranked[:count]:
        source = root / file
        text = (source.read_text().splitlines()[line - 1].strip()
                if source.is_file() else "")
        rows.append({"file": file, "line": line, "instructions": sum(ops.values()),
                     "top_ops": dict(ops.most_common(3)), "source": text})
    return rows


def launch_types(ranks: int, experts: int) -> tuple:
    """Numba types of a one-layer launch's arguments (`lite_cuda.launch_args`) for a sharded
    layer of this shape with 3 slots a rank."""
    import numba

    from probe.planner.cost import CostModel
    from probe.planner.lite import LiteRules
    from probe.planner.lite_cuda import host_arrays, launch_args

    home = np.zeros((1, ranks, experts), bool)
    home[0, np.arange(experts) % ranks, np.arange(experts)] = True
    cost = CostModel.uniform(ranks, alpha=1e-5, beta=1e-8, token_time=1e-8,
                             transfer_time=1e-4)
    host = host_arrays(home, np.full(ranks, 3), cost, LiteRules())
    args = launch_args(np.zeros((1, ranks, experts), np.int64), home, np.zeros((1, ranks)),
                       host.consts, [np.zeros(s, d) for s, d in host.scratch],
                       [np.zeros(s, d) for s, d in host.outputs])
    return tuple(numba.typeof(a) for a in args)


def config_sizes(ranks: int, experts: int, inline: bool, work: Path, lines: int = 0,
                 nvdisasm: str = "") -> dict:
    from probe.planner.lite_cuda import FULL, kernel, kernel_ranks, shared_state
    from probe.planner.numba_cuda import cuda

    types = launch_types(ranks, experts)
    variants = []
    for upto in range(FULL + 1):
        fn = kernel(kernel_ranks(ranks), upto=upto, inline_start=inline,
                    state=shared_state(ranks, experts) if inline else None).py_func
        ptx = cuda.compile_ptx(fn, types, cc=(9, 0))[0]
        variants.append(assemble(ptx, work, f"g{ranks}_u{upto}"))
    sizes = [v["bytes"] for v in variants]
    added = [sizes[0]] + [b - a for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    report = {"bytes": sizes[-1], "registers": variants[-1]["registers"],
              "steps": dict(zip(STEPS, added, strict=True))}
    if lines:
        ptx = cuda.compile_ptx(fn, types, cc=(9, 0), lineinfo=True)[0]
        report["lines"] = top_lines(line_sass(ptx, work, f"g{ranks}_lines", nvdisasm), lines)
    return report


# The small kernel's parts: (name, a line of probe/planner/lite_small.py that starts it).
SMALL_PARTS = (("start", "# The start, 1"), ("round: rank steps, reach, matching", "rounds = 0"),
               ("pair moves (the call)", "# Rules 2-4, a warp per pair"),
               ("rule 5", "# Rule 5."), ("write-back", "# The outputs."))


def small_parts(per_line: dict[tuple[str, int], Counter], source: list[str]) -> dict[str, int]:
    """Instructions per part of the small kernel (SMALL_PARTS, each from the line holding its
    marker to the next part's; lines before the first part count as the start), from
    `sass_lines` and lite_small.py's lines; its def line's and other files' apart."""
    def first(marker: str) -> int:
        found = [i for i, text in enumerate(source, 1) if marker in text]
        if not found:
            raise ValueError(f"lite_small.py has no line holding {marker!r}")
        return found[0]

    starts = [(name, first(marker)) for name, marker in SMALL_PARTS]
    def_line = first("def _small_kernel(")
    parts = {name: 0 for name, _ in SMALL_PARTS}
    parts["inlined at the def line"] = parts["lite.py, scalar.py helpers"] = 0
    for (file, line), ops in per_line.items():
        n = sum(ops.values())
        if file != "lite_small.py":
            parts["lite.py, scalar.py helpers"] += n
        elif line == def_line:
            parts["inlined at the def line"] += n
        else:
            before = [name for name, start in starts if start <= line]
            parts[before[-1] if before else "start"] += n
    return parts


def small_sizes(work: Path, nvdisasm: str, lines: int) -> dict:
    """The small-layer kernel at ep=8 / 128 experts: .text bytes, registers, instructions per
    part (SMALL_PARTS; 'inlined at the def line' and 'lite.py, scalar.py helpers' apart) and
    the `lines` source lines with the most instructions."""
    from probe.planner.lite_small import small_kernel, small_shape
    from probe.planner.numba_cuda import cuda

    ranks, experts = 8, 128
    types = launch_types(ranks, experts)
    fn = small_kernel(*small_shape(ranks, experts)).py_func
    report = assemble(cuda.compile_ptx(fn, types, cc=(9, 0))[0], work, "small")
    per_line = line_sass(cuda.compile_ptx(fn, types, cc=(9, 0), lineinfo=True)[0], work,
                         "small_lines", nvdisasm)
    source = (Path(__file__).resolve().parents[2] / "probe" / "planner" /
              "lite_small.py").read_text().splitlines()
    report["parts"] = small_parts(per_line, source)
    report["instructions"] = sum(report["parts"].values())
    if lines:
        report["lines"] = top_lines(per_line, lines)
    return report


def markdown(report: dict) -> str:
    names = list(report["configs"])
    lines = ["# The lite kernel's machine code for sm_90, step by step", "",
             f"Made by `{report['command']}` ({report['utc']}, revision {report['revision']}; "
             f"no GPU: Numba's NVVM and ptxas -O3, {report['ptxas']}). Bytes of the kernel's "
             ".text (16 bytes an instruction); per step the bytes its profiling variant adds.", "",
             "| step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for step in STEPS:
        lines.append(f"| {step} | " + " | ".join(
            f"{report['configs'][n]['steps'][step]:,}" for n in names) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{report['configs'][n]['bytes']:,}**" for n in names) + " |")
    lines.append("| registers a thread | " + " | ".join(
        str(report["configs"][n]["registers"]) for n in names) + " |")
    small = report.get("small")
    if small:
        lines += ["", "## The small-layer kernel (probe.planner.lite_small), ep=8 / 128 experts",
                  "", f"{small['bytes']:,} bytes of .text, {small['registers']} registers a "
                  f"thread; {small['instructions']:,} instructions with line information, per "
                  "part of its source (a part from its first line to the next part's):", "",
                  "| part | instructions |", "|---|---:|"]
        lines += [f"| {part} | {n:,} |" for part, n in small["parts"].items()]
    for name in [*names, "small"] if small else names:
        config = small if name == "small" else report["configs"][name]
        rows = config.get("lines")
        if not rows:
            continue
        title = "the small-layer kernel" if name == "small" else name
        lines += ["", f"## {title}: the source lines with the most instructions", "",
                  "Compiled with line information; an inlined function counts at its call site.",
                  "", "| instructions | line | most frequent | source |", "|---:|---|---|---|"]
        for row in rows:
            ops = ", ".join(f"{op} {n}" for op, n in row["top_ops"].items())
            source = row["source"].replace("|", "\\|")
            lines.append(f"| {row['instructions']} | {row['file']}:{row['line']} | {ops} | "
                         f"`{source}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for lite_code_size.{json,md}")
    parser.add_argument("--lines", type=int, default=0, metavar="N",
                        help="also list the N source lines with the most instructions")
    parser.add_argument("--nvdisasm", default=None, help="nvdisasm for --lines")
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        parser.error("run without NUMBA_ENABLE_CUDASIM: the simulator compiles no PTX")
    nvdisasm = find_nvdisasm(args.nvdisasm) if args.lines else ""
    _stand_in_gpu()
    import datetime

    from experiments.manifest import Manifest

    run = Manifest.start("experiments.planner.lite_code_size", argv, out=args.out)
    revision = (run.git.get("revision") or "?")[:7]
    report = {"command": "python -m experiments.planner.lite_code_size" +
              (f" --out {args.out}" if args.out else "") +
              (f" --lines {args.lines}" if args.lines else ""), "revision": revision,
              "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "ptxas": subprocess.run(["ptxas", "--version"], capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1],
              "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, experts, inline in CONFIGS:
            report["configs"][name] = config_sizes(ranks, experts, inline, Path(tmp),
                                                   args.lines, nvdisasm)
        if args.lines:
            report["small"] = small_sizes(Path(tmp), nvdisasm, args.lines)
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "lite_code_size.json", out / "lite_code_size.md"]
        files[0].write_text(json.dumps(report, indent=1) + "\n")
        files[1].write_text(text)
        run.write(out, files, name="lite_code_size.manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
