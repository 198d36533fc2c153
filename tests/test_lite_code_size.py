"""experiments.planner.lite_code_size's reading of nvdisasm's SASS (no toolkit needed)."""

from __future__ import annotations

from collections import Counter

import pytest

from experiments.planner.lite_code_size import find_nvdisasm, sass_lines

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
