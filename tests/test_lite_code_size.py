"""experiments.planner.lite_code_size's reading of nvdisasm's SASS and its split of the
small-layer kernel's instructions by part of its source (no toolkit needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from experiments.planner.lite_code_size import SMALL_PARTS, find_nvdisasm, sass_lines, small_parts

ROOT = Path(__file__).resolve().parents[1]

SASS = """
        /*0000*/                   MOV R0, RZ ;
	//## File "/src/probe/planner/lite_cuda.py", line 10
        /*0010*/                   LDC R1, c[0x0][0x28] ;
        /*0020*/              @!P0 BRA `(.L_x_1) ;
	//## File "/src/probe/planner/lite.py", line 5
        /*0030*/                   IMAD.MOV.U32 R10, RZ, RZ, RZ ;
        /*0040*/             @!UP1 ULDC.64 UR4, c[0x0][0x558] ;
.L_x_1:
	//## File "/src/probe/planner/lite_cuda.py", line 10
        /*0050*/                   ATOMS.CAST.SPIN.64 R10, [R3], R8, R10 ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
"""


def test_sass_lines_counts_instructions_per_source_line():
    """Each instruction counts at the line marker before it, by the mnemonic before its first
    dot, predicated or not; labels and instructions before the first marker do not count."""
    assert sass_lines(SASS) == {("lite_cuda.py", 10): Counter(LDC=1, BRA=1, ATOMS=1, BAR=1),
                                ("lite.py", 5): Counter(IMAD=1, ULDC=1)}
    assert sass_lines("") == {}


def test_find_nvdisasm_names_the_missing_tool(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr("sys.path", [])
    assert find_nvdisasm("/opt/nvdisasm") == "/opt/nvdisasm"
    with pytest.raises(SystemExit, match="nvidia-cuda-nvdisasm"):
        find_nvdisasm(None)


def test_small_parts_books_each_line_to_the_part_it_lies_in():
    """Each part runs from the line holding its marker to the next part's; lines before the
    first part are the start, the def line and other files' lines are booked apart; every
    marker is in the kernel's source, and a missing one is named."""
    source = ["def f():", "    def _small_kernel(a):", "        x = 1",
              *[f"        {marker}" for _, marker in SMALL_PARTS], "        y = 2"]
    marker_line = {name: 4 + k for k, (name, _) in enumerate(SMALL_PARTS)}
    per_line = {("lite_small.py", 2): Counter(IMAD=5), ("lite_small.py", 3): Counter(LDS=2),
                ("lite.py", 9): Counter(SEL=4), ("lite_small.py", len(source)): Counter(EXIT=1)}
    for line in marker_line.values():
        per_line[("lite_small.py", line)] = Counter(BAR=line)
    parts = small_parts(per_line, source)
    names = [name for name, _ in SMALL_PARTS]
    assert parts[names[0]] == 2 + marker_line[names[0]]
    assert [parts[n] for n in names[1:-1]] == [marker_line[n] for n in names[1:-1]]
    assert parts[names[-1]] == marker_line[names[-1]] + 1
    assert parts["inlined at the def line"] == 5 and parts["lite.py, scalar.py helpers"] == 4
    kernel = (ROOT / "probe" / "planner" / "lite_small.py").read_text().splitlines()
    assert set(small_parts({}, kernel).values()) == {0}
    with pytest.raises(ValueError, match="The outputs"):
        small_parts({}, source[:-2])
