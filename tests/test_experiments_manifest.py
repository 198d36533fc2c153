"""experiments.manifest: what every producer writes next to its outputs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.manifest import Manifest, main

ROOT = Path(__file__).resolve().parents[1]


def test_write_records_command_git_machine_versions_and_outputs(tmp_path):
    run = Manifest.start("experiments.planner.planner_speed", ["--out", "a b.json", "--quick"])
    (tmp_path / "a.json").write_text('{"x": 1}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv").write_text("x\n1\n")
    path = run.write(tmp_path, [tmp_path / "a.json", tmp_path / "sub"], name="a.manifest.json")
    assert path == tmp_path / "a.manifest.json"
    m = json.loads(path.read_text())
    assert m["command"] == ("python -m experiments.planner.planner_speed --out 'a b.json' "
                            "--quick")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    if head:  # a git checkout (CI and the dev box)
        assert m["git"]["revision"] == head and isinstance(m["git"]["dirty"], bool)
    assert m["machine"]["cpus"] >= 1 and m["machine"]["hostname"]
    assert m["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert m["versions"]["numpy"] is not None
    assert m["started_utc"] <= m["finished_utc"]
    assert [o["path"] for o in m["outputs"]] == ["a.json", "sub/b.csv"]
    assert m["outputs"][0]["bytes"] == 9
    assert m["outputs"][0]["sha256"] == hashlib.sha256(b'{"x": 1}\n').hexdigest()


def test_producer_commit_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_GIT_COMMIT", "abc1234")
    run = Manifest.start("experiments.x", [])
    assert run.git == {"revision": "abc1234", "dirty": None, "source": "PROBE_GIT_COMMIT"}
    assert run.command == "python -m experiments.x"


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="module"):
        Manifest.start("", [])
    run = Manifest.start("experiments.x", [])
    with pytest.raises(ValueError, match="where"):
        run.write(tmp_path / "missing", [])
    with pytest.raises(FileNotFoundError, match="not written"):
        run.write(tmp_path, [tmp_path / "never.json"])


def test_command_line_folds_the_producers_manifests(tmp_path, capsys):
    (tmp_path / "log.txt").write_text("log\n")
    (tmp_path / "a2a.json").write_text("{}\n")
    part = Manifest.start("experiments.comm.a2a_bench", ["--out", str(tmp_path)])
    part.write(tmp_path, [tmp_path / "a2a.json"], name="a2a.manifest.json")
    assert main([str(tmp_path), "--command", "bash experiments/runtime/device_multigpu.sh",
                 "--started", "2026-01-01T00:00:00Z", "--fold"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a2a.json", "log.txt", "manifest.json"]
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["command"] == "bash experiments/runtime/device_multigpu.sh"
    assert m["started_utc"] == "2026-01-01T00:00:00Z"
    assert [o["path"] for o in m["outputs"]] == ["a2a.json", "log.txt"]
    assert m["parts"]["a2a.manifest.json"]["command"].startswith(
        "python -m experiments.comm.a2a_bench")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), "--command", "x"])
    assert "is not a folder" in capsys.readouterr().err


def test_library_code_never_imports_experiments():
    """Imports point one way: probe/ and solvers_bench/ are libraries that experiments use."""
    offenders = []
    for package in ("probe", "solvers_bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if re.search(r"^\s*(from|import)\s+experiments\b", text, flags=re.M):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
