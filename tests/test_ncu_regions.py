"""experiments.planner.ncu_regions: a profiler's per-line counts summed into the lite kernel's
steps."""

from __future__ import annotations

import collections
import csv
import gzip
import re
import subprocess

from experiments.planner.ncu_regions import ROOT, kernel_steps, summarise, table


def _head_lines(path: str) -> list[str]:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{path}"], capture_output=True,
                          text=True, check=True).stdout.splitlines()


def test_lines_count_to_their_step(tmp_path):
    source = _head_lines("probe/planner/lite_cuda.py")
    mark = {int(m.group(1)): n for n, line in enumerate(source, 1)
            if (m := re.search(r"if UPTO == (\d+):", line))}
    eval_amount = next(n for n, line in enumerate(_head_lines("probe/planner/lite.py"), 1)
                       if line.startswith("def eval_amount("))
    header = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)",
              "Instructions Executed", "stall_barrier", "stall_long_sb"]
    rows = [["Kernel"], ["File Path", "/x/probe/planner/lite_cuda.py"],
            ["Function Name", "k1"], header,
            [str(mark[0] - 3), "start line", "-", "-", "10", "100", "0", "10"],
            [str(mark[3] + 2), "pair move line", "-", "-", "30", "50", "30", "0"],
            ["", "", "0x0", "IMAD.WIDE R1, R2", "9", "7", "9", "9"],  # SASS rows are not lines
            ["", "", "0x10", "@P0 LDS.64 R4, [R5]", "0", "3", "0", "0"],
            ["File Path", "/x/probe/planner/lite.py"], header,
            [str(eval_amount + 1), "eval_amount line", "-", "-", "60", "50", "0", "60"],
            ["", "", "0x0", "IMAD.WIDE R1, R2", "9", "7", "9", "9"]]  # 0x0 again: counted once
    path = tmp_path / "page.csv.gz"
    with gzip.open(path, "wt", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (steps,) = summarise(path, "HEAD")
    assert steps.pop("opcodes") == {"IMAD": 7, "LDS": 3}
    # the pair moves' lines and lite.py's eval_amount (one of their functions) count together
    assert steps["start"]["samples"] == 10 and steps["pair moves"]["samples"] == 90
    assert steps["pair moves"]["instructions"] == 100
    assert steps["pair moves"]["stall_barrier"] == 30
    assert [name for _, name in kernel_steps("HEAD")][:3] == ["start", "rank order", "pair tests"]
    text = table([steps])
    assert "| pair moves | 90.0% | 100 (50.0%) | long_sb 60, barrier 30 |" in text
    steps["opcodes"] = collections.Counter({"IMAD": 7, "LDS": 3})
    assert "loads, stores and atomics 30.0%" in table([steps])
