"""CLI tables read whole when output is piped or 80 columns wide: no cell cut to "…"."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from probe.cli import _register_all, app
from probe.tables import fit_table

_register_all()

NARROW = {"COLUMNS": "80"}


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], env=NARROW)
    assert result.exit_code == 0, result.output
    return result.output


def assert_whole(output: str, *words: str) -> None:
    assert "…" not in output, output
    assert max(len(line) for line in output.splitlines()) <= 80, output
    for word in words:
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", output), (word, output)


def _render(renderable, width: int) -> str:
    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def _table(num_rows: int = 3) -> Table:
    table = Table("method", "status", "layer us", "IR", "replicas", "moved MB", "gap",
                  "solve time", "ok", title="one layer")
    for i in range(num_rows):
        table.add_row(f"greedy_ref{i}", "time_limit", "943.4", "2.134", "10", "498", "39.0%",
                      "41.2 ms", "yes")
    return table


def test_fit_table_keeps_the_table_when_it_fits():
    text = _render(fit_table(_table()), 200)
    assert "┃ method" in text and "greedy_ref2 │ time_limit" in text


def test_fit_table_transposes_then_stacks_when_narrow():
    text = _render(fit_table(_table()), 80)
    assert_whole(text, "greedy_ref0", "greedy_ref2", "time_limit", "solve time", "41.2 ms")
    assert re.search(r"method +greedy_ref0 +greedy_ref1 +greedy_ref2", text)
    text = _render(fit_table(_table(8)), 50)  # 8 rows transposed do not fit either
    assert_whole(text, "greedy_ref7", "time_limit", "solve time")
    assert text.count("time_limit") == 8 and "one layer" in text
    with pytest.raises(TypeError, match="rich.table.Table"):
        fit_table("not a table")


@pytest.mark.slow
def test_demo_table_at_80_columns():
    out = invoke("demo", "--quick")
    assert_whole(out, "method", "static", "greedy", "lp", "cpsat", "feasible", "repl")
    assert re.search(r"(time_limit|timeout|optimal)", out)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "decode.trace"
    CliRunner().invoke(app, ["trace", "gen", "decode", "--out", str(path), "--steps", "3",
                             "--layers", "3"])
    return path


def test_plan_tables_at_80_columns(trace):
    out = invoke("plan", trace, "--method", "greedy_ref", "--step", "0")
    assert_whole(out, "greedy_ref", "feasible", "status", "IR plan", "obj plan")
    out = invoke("plan", trace, "--method", "greedy", "--step", "0", "--layer", "1")
    assert_whole(out, "greedy", "static", "objective (eq. 8)", "copied from", "from sources")


def test_trace_stats_and_simulate_at_80_columns(trace):
    assert_whole(invoke("trace", "stats", trace), "hot-8 Jaccard", "median")
    out = invoke("simulate", trace, "--policies", "static,eplb,probe,oracle", "--no-progress")
    assert_whole(out, "static", "eplb", "probe", "oracle", "GB moved/step", "planner ms")
