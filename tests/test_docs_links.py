"""Every relative link and named path in README.md, docs/*.md and results/README.md exists, and
results/README.md indexes every top-level entry of results/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]

LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"-m (experiments(?:\.\w+)+)")
SCRIPT = re.compile(r"(?:^|\s)bash (experiments/\S+\.sh)")
NAMED = ("experiments/", "results/", "data/recorded/")


def _prose(text: str) -> str:
    """The text without fenced code blocks (their contents are shell sessions, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _expand(path: str) -> list[str]:
    """Brace alternatives, as the docs write file sets: a/{b,c}.json -> a/b.json, a/c.json."""
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    return [out for alt in match[1].split(",")
            for out in _expand(path[:match.start()] + alt + path[match.end():])]


def _exists(path: str) -> bool:
    """Whether the repository path exists; `*` must match something, and a component holding
    a placeholder (<name>) only needs its folder to exist."""
    if "<" in path:
        path = path[:path.index("<")].rsplit("/", 1)[0]
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def _links(doc: Path) -> list[tuple[str, bool]]:
    """(link target, whether it exists) for every relative markdown link of `doc`."""
    out = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        out.append((target, path.exists() and ROOT in (path, *path.parents)))
    return out


def _named(doc: Path) -> list[tuple[str, bool]]:
    """(path, whether it exists) for backticked repository paths of `doc`: a whole span that is
    an experiments/, results/ or data/recorded/ path, the module of `python -m experiments...`
    and the script of `bash experiments/....sh`."""
    out = []
    for span in CODE.findall(_prose(doc.read_text())):
        span = span.strip()
        if span.startswith(NAMED) and not re.search(r"\s", span):
            out += [(p, _exists(p)) for p in _expand(span.rstrip(".,;:"))]
        for module in MODULE.findall(span):
            base = ROOT / module.replace(".", "/")
            out.append((module, base.with_suffix(".py").is_file() or base.is_dir()))
        out += [(script, _exists(script)) for script in SCRIPT.findall(span)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = [target for target, ok in _links(doc) if not ok]
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing paths {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(doc):
    missing = [path for path, ok in _named(doc) if not ok]
    assert not missing, f"{doc.relative_to(ROOT)}: names missing paths {missing}"


def test_results_index_has_a_row_for_every_top_level_entry():
    index = ROOT / "results" / "README.md"
    rows = [line for line in index.read_text().splitlines() if line.startswith("| [")]
    listed = set()
    for row in rows:
        first_cell = row.split("|")[1]
        listed |= {target.split("/", 1)[0] for target in LINK.findall(first_cell)}
    entries = {p.name for p in (ROOT / "results").iterdir()
               if p.name != "README.md" and not p.name.startswith(".")}
    assert entries - listed == set(), f"results/README.md has no row for {sorted(entries - listed)}"
    assert listed - entries == set(), f"results/README.md lists missing {sorted(listed - entries)}"


def test_the_checks_catch_broken_links_and_paths(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[gone](nowhere.md) ![img](../../etc/passwd) [web](https://example.org) "
                   "`results/nope.json` `python -m experiments.planner.nope --out x`\n"
                   "`bash experiments/nope.sh` `results/sim/report.md` `results/*.md`\n"
                   "```\n[in code](skipped.md) `results/also_skipped.json`\n```\n")
    # links resolve against the document's folder and must stay inside the repository
    assert dict(_links(doc)) == {"nowhere.md": False, "../../etc/passwd": False}
    assert dict(_named(doc)) == {"results/nope.json": False, "experiments.planner.nope": False,
                                 "experiments/nope.sh": False, "results/sim/report.md": True,
                                 "results/*.md": True}
    assert ("experiments.planner.planner_speed", True) in _named(ROOT / "README.md")
    assert _expand("results/smallmodel/{report.md,analysis.json}") == [
        "results/smallmodel/report.md", "results/smallmodel/analysis.json"]
    assert _exists("results/sim/<name>.md") and not _exists("results/nope/<name>.md")
