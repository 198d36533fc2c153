"""The `probe` command: sub-commands of other packages arrive through entry points."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_registers_solvers_bench_as_a_probe_command():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["probe.commands"] == {"bench": "solvers_bench.cli:register"}
    assert meta["scripts"]["probe-solvers-bench"] == "solvers_bench.__main__:main"


def test_probe_cli_loads_commands_from_the_entry_point_group(tmp_path, monkeypatch):
    # A stand-in installed package on sys.path: its dist-info declares one register(app).
    (tmp_path / "probe_plugin_check.py").write_text(
        "def register(app):\n"
        "    @app.command('plugin-check')\n"
        "    def plugin_check():\n"
        "        print('plugin command ran')\n")
    dist = tmp_path / "probe_plugin_check-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: probe-plugin-check\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[probe.commands]\nplugin = probe_plugin_check:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    import probe.cli

    app = typer.Typer()
    monkeypatch.setattr(probe.cli, "app", app)
    probe.cli._register_all()
    res = CliRunner().invoke(app, ["plugin-check"])
    assert res.exit_code == 0, res.output
    assert "plugin command ran" in res.output
    res = CliRunner().invoke(app, ["--help"])
    assert "plan" in res.output and "plugin-check" in res.output
