"""The manifest every producer writes next to its outputs: what ran, where, on which code.

A manifest is one JSON file:

    command      the command line, as ``python -m experiments.<topic>.<name> ARGS`` (or the
                 shell script's command for device scripts)
    git          revision (``git rev-parse HEAD``; PROBE_GIT_COMMIT overrides it where the
                 copy's .git cannot be trusted, e.g. on the device machine) and whether tracked
                 files differed from it when the run started (dirty)
    machine      hostname, platform, CPU count, GPU name (where torch sees one)
    versions     python, torch, numpy (None where not installed)
    started_utc, finished_utc
    outputs      the files written, relative to the manifest's folder, with size and sha256

Producers whose outputs fill a folder write ``DIR/manifest.json``; producers that write named
files into a shared folder write ``<name>.manifest.json`` beside them. Python producers call

    run = Manifest.start("experiments.planner.planner_speed", argv)   # before the work
    ...
    run.write(out_dir, [files...])                                    # after it

and shell scripts call the command line at the end:

    python3 -m experiments.manifest DIR --command "bash experiments/runtime/device.sh" --fold

(--fold moves the manifests that the script's Python producers wrote into DIR into this one,
under "parts", so that one file comes back from the device machine instead of several).
Files over HASH_LIMIT bytes are listed with their size and no sha256.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HASH_LIMIT = 1 << 30


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(exclude: Path | str | None = None) -> dict:
    """{"revision": str | None, "dirty": bool | None, "source": str}. exclude: a folder whose
    tracked files do not count as changes (a run's own output folder, which re-running the
    producer rewrites)."""
    named = os.environ.get("PROBE_GIT_COMMIT")
    if named:
        return {"revision": named, "dirty": None, "source": "PROBE_GIT_COMMIT"}
    revision = _git("rev-parse", "HEAD")
    args = ["status", "--porcelain", "--untracked-files=no"]
    if exclude is not None:
        args += ["--", ".", f":(exclude){Path(exclude).resolve()}"]
    status = _git(*args)
    return {"revision": revision, "dirty": None if status is None else bool(status),
            "source": "git"}


def machine() -> dict:
    gpu = None
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "gpu": gpu}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy"):
        try:
            module = __import__(name)
        except ImportError:
            out[name] = None
        else:
            out[name] = module.__version__
    return out


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _describe(path: Path, base: Path) -> dict:
    size = path.stat().st_size
    sha = None
    if size <= HASH_LIMIT:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
    try:
        name = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        name = str(path)
    return {"path": name, "bytes": size, "sha256": sha}


@dataclass
class Manifest:
    """A run in progress: the command, git state and start time, taken before the work."""

    command: str
    git: dict
    started_utc: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def start(cls, module: str, argv: Sequence[str] | None = None, *,
              out: Path | str | None = None) -> Manifest:
        """`module`: the producer's dotted name; `argv`: its arguments (default sys.argv[1:]);
        `out`: the run's output folder, left out of the dirty check (see git_state)."""
        if not isinstance(module, str) or not module:
            raise TypeError(f"module must be a non-empty dotted name, got {module!r}")
        args = list(sys.argv[1:] if argv is None else argv)
        return cls(command=shlex.join(["python", "-m", module, *map(str, args)]),
                   git=git_state(out), started_utc=_utc())

    def write(self, where: Path | str, outputs: Iterable[Path | str], *,
              name: str = "manifest.json") -> Path:
        """Write `name` into folder `where` listing `outputs` (files; folders are walked);
        return its path. Outputs that do not exist raise FileNotFoundError."""
        folder = Path(where)
        if not folder.is_dir():
            raise ValueError(f"where must be an existing folder, got {str(folder)!r}")
        files: list[Path] = []
        for item in outputs:
            path = Path(item)
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file())
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"output {str(path)!r} was not written")
        target = folder / name
        record = {"command": self.command, "git": self.git, "machine": machine(),
                  "versions": versions(), "started_utc": self.started_utc,
                  "finished_utc": _utc(), **self.extra,
                  "outputs": [_describe(p, folder) for p in files if p != target]}
        target.write_text(json.dumps(record, indent=1) + "\n")
        return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write DIR/manifest.json for a shell script's outputs (every file in DIR).")
    parser.add_argument("dir", type=Path, help="the folder the script wrote")
    parser.add_argument("--command", required=True, help="the command that ran")
    parser.add_argument("--name", default="manifest.json")
    parser.add_argument("--started", default=None,
                        help="when the script started (UTC, e.g. `date -u +%%FT%%TZ`)")
    parser.add_argument("--fold", action="store_true",
                        help="move DIR's *.manifest.json files into this one (key 'parts')")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"dir {str(args.dir)!r} is not a folder")
    run = Manifest(command=args.command, git=git_state(), started_utc=args.started or "unknown")
    if args.fold:
        parts = sorted(args.dir.rglob("*.manifest.json"))
        run.extra["parts"] = {p.relative_to(args.dir).as_posix(): json.loads(p.read_text())
                              for p in parts}
        for p in parts:
            p.unlink()
    files = [p for p in sorted(args.dir.rglob("*")) if p.is_file() and p.name != args.name]
    print(run.write(args.dir, files, name=args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
