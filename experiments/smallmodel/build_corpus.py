"""Build the mixed-domain text corpus for the small MoE test-bench model.

Everything comes from text that ships on this machine (the OS image and the installed Python
packages); nothing is downloaded. Each document is labelled with a domain:

    code_py   Python sources (stdlib and site-packages)
    code_c    C headers under /usr/include
    code_js   JavaScript under the global node_modules
    code_sh   shell scripts (*.sh and files with a sh/bash shebang)
    prose_en  English prose: man pages (troff stripped), package METADATA descriptions,
              README/NEWS/*.txt/*.md under /usr/share/doc
    cjk       Chinese, Japanese and Korean: translated man pages and the translated strings of
              gettext catalogues (.mo) under /usr/share/locale
    cyrillic  Russian and Ukrainian, from the same two sources

Selection is deterministic and stable: candidate files are ordered by a hash of (seed, domain,
path) and taken in that order until the domain's byte budget is used, so installing or removing
one file changes the selection only around that file (a seeded shuffle of the whole list would
reshuffle everything). Long files are cut into chunks of at most `--chunk-bytes` bytes (at line
boundaries). A file is held out, all its chunks, when the hash of (seed, path) falls in one
`--heldout-every`-th of the range; the record script draws its requests from the held-out part.

Output (data/smallmodel/, git-ignored):
    corpus.jsonl   one JSON object per document: id, domain, split ("train"/"heldout"), source,
                   text
    heldout.jsonl  the held-out records alone (what experiments/smallmodel/record.py reads)
    stats.json     bytes and documents per domain and split, and the arguments used
    manifest.json  the command, code revision, machine and files

The corpus depends on what is installed, so it is reproducible on one machine image, not across
images. Run: python -m experiments.smallmodel.build_corpus
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from experiments.manifest import Manifest

DOMAINS = ("code_py", "code_c", "code_js", "code_sh", "prose_en", "cjk", "cyrillic")

# Default byte budgets per domain (UTF-8 bytes of text); about 24 MB in all.
DEFAULT_BUDGET_MB = {
    "code_py": 5.0,
    "code_c": 4.0,
    "code_js": 3.0,
    "code_sh": 1.0,
    "prose_en": 6.0,
    "cjk": 4.0,
    "cyrillic": 1.5,
}

CJK_LANGS = ("ja", "ko", "zh_CN", "zh_TW", "zh_HK")
CYRILLIC_LANGS = ("ru", "uk")
MAX_FILE_BYTES = 400_000
CJK_RE = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
CYR_RE = re.compile("[\u0400-\u04ff]")


def _hash(key: str) -> int:
    """A stable 64-bit hash of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def _files(roots: Iterable[Path], pattern: str, exclude: Callable[[Path], bool] | None = None
           ) -> list[Path]:
    out = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in root.rglob(pattern):
            try:
                if not p.is_file() or p.is_symlink() or p.stat().st_size > MAX_FILE_BYTES:
                    continue
            except OSError:
                continue
            if exclude is not None and exclude(p):
                continue
            out.append(p)
    return sorted(set(out))


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),   # font changes
    (re.compile(r"\\s[+-]?\d"), ""),                # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),   # strings
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(co"), "(c)"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),        # other named glyphs
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\c$"), ""),
]
_TEXT_MACROS = {".SH", ".SS", ".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".IP",
                ".TP", ".Nm", ".Nd", ".Sh", ".Ss", ".Fl", ".Ar", ".Op", ".It", ".Dl", ".Pa"}


def strip_troff(src: str) -> str:
    """Turn a man page's troff source into plain text (good enough for a language model)."""
    lines = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line.startswith("\\\""):
            continue
        if line.startswith((".", "'")):
            head, _, rest = line.partition(" ")
            if head not in _TEXT_MACROS:
                if head in (".PP", ".LP", ".P", ".sp", ".Pp"):
                    lines.append("")
                continue
            line = rest.replace('"', "")
        for pat, rep in _TROFF_ESCAPES:
            line = pat.sub(rep, line)
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def mo_strings(path: Path) -> str | None:
    """The translated strings (msgstr) of a gettext .mo catalogue, one per paragraph."""
    try:
        with path.open("rb") as fh:
            cat = gettext.GNUTranslations(fh)._catalog  # noqa: SLF001 (no public accessor)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError):
        return None
    keys = sorted((k for k in cat if k), key=lambda k: (str(k[0]) if isinstance(k, tuple)
                                                        else str(k)))
    texts = [cat[k] for k in keys if isinstance(cat[k], str) and cat[k].strip()]
    return "\n\n".join(texts) + "\n" if texts else None


def _is_shell(path: Path) -> bool:
    if path.suffix == ".sh":
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    return bool(re.match(rb"#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b", head))


def _metadata_description(path: Path) -> str | None:
    text = _read_text(path)
    if text is None:
        return None
    # The long description is the body after the first blank line.
    _, sep, body = text.partition("\n\n")
    return body if sep and len(body) > 200 else None


def _sources(domain: str) -> Iterator[tuple[str, Callable[[], str | None]]]:
    """Yield (source path, loader) pairs for one domain, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    if domain == "code_py":
        files = _files([stdlib], "*.py")
        for p in files:
            yield str(p), (lambda p=p: _read_text(p))
    elif domain == "code_c":
        for p in _files([Path("/usr/include")], "*.h"):
            yield str(p), (lambda p=p: _read_text(p))
    elif domain == "code_js":
        roots = [Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules"),
                 Path("/usr/share/nodejs")]
        for p in _files(roots, "*.js", exclude=lambda p: p.name.endswith(".min.js")):
            yield str(p), (lambda p=p: _read_text(p))
    elif domain == "code_sh":
        roots = [Path("/usr/bin"), Path("/usr/sbin"), Path("/usr/lib"), Path("/usr/share"),
                 Path("/etc")]
        cand = []
        for root in roots:
            cand += _files([root], "*", exclude=lambda p: p.suffix in (".py", ".pl", ".gz")
                           or "site-packages" in p.parts or "node_modules" in p.parts)
        for p in sorted(set(cand)):
            if _is_shell(p):
                yield str(p), (lambda p=p: _read_text(p))
    elif domain == "prose_en":
        for p in _files([Path("/usr/share/man")], "*.gz"):
            rel = p.relative_to("/usr/share/man").parts
            # Skip the ~16k machine-generated gcloud pages: they would crowd out everything else.
            if rel[0].startswith("man") and not p.name.startswith(("gcloud", "bq", "gsutil")):
                yield str(p), (lambda p=p: _troff_file(p))
        for p in _files([purelib], "METADATA"):
            yield str(p), (lambda p=p: _metadata_description(p))
        for p in _files([Path("/usr/share/doc")], "*"):
            name = p.name.lower()
            wanted = name.startswith(("readme", "news", "faq")) or p.suffix in (".txt", ".md",
                                                                                  ".rst")
            if wanted and "copyright" not in name and "license" not in name:
                yield str(p), (lambda p=p: _read_text(p))
    elif domain in ("cjk", "cyrillic"):
        langs = CJK_LANGS if domain == "cjk" else CYRILLIC_LANGS
        script = CJK_RE if domain == "cjk" else CYR_RE
        for lang in langs:
            for p in _files([Path("/usr/share/man") / lang], "*.gz"):
                yield str(p), (lambda p=p, s=script: _require_script(_troff_file(p), s))
            for p in _files([Path("/usr/share/locale") / lang], "*.mo"):
                yield str(p), (lambda p=p, s=script: _require_script(mo_strings(p), s))
    else:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _troff_file(path: Path) -> str | None:
    text = _read_text(path)
    if text is None or text.startswith(".so "):
        return None
    return strip_troff(text)


def _require_script(text: str | None, script: re.Pattern[str]) -> str | None:
    """Keep text only if at least a fifth of its letters are in the wanted script."""
    if not text:
        return None
    letters = sum(ch.isalpha() for ch in text)
    return text if letters and len(script.findall(text)) >= 0.2 * letters else None


def chunk_text(text: str, max_bytes: int) -> list[str]:
    """Cut text into pieces of at most max_bytes UTF-8 bytes, at line boundaries when possible."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    chunks, cur, cur_bytes = [], [], 0
    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        while b > max_bytes:  # a single over-long line: cut it by characters
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            if cur:
                chunks.append("".join(cur))
                cur, cur_bytes = [], 0
            chunks.append(head)
            line = line[len(head):]
            b = len(line.encode("utf-8"))
        if cur_bytes + b > max_bytes and cur:
            chunks.append("".join(cur))
            cur, cur_bytes = [], 0
        cur.append(line)
        cur_bytes += b
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def build(out_dir: Path, *, seed: int = 0, budget_mb: dict[str, float] | None = None,
          chunk_bytes: int = 16_384, heldout_every: int = 20,
          min_doc_bytes: int = 256) -> dict:
    """Build the corpus; returns the stats dict (also written to out_dir/stats.json)."""
    budgets = dict(DEFAULT_BUDGET_MB if budget_mb is None else budget_mb)
    for name in budgets:
        if name not in DOMAINS:
            raise ValueError(f"budget_mb: unknown domain {name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {"seed": seed, "chunk_bytes": chunk_bytes, "heldout_every": heldout_every,
                   "domains": {}}
    tmp = out_dir / "corpus.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        for domain in DOMAINS:
            budget = int(budgets.get(domain, 0.0) * 1e6)
            if budget <= 0:
                continue
            sources = sorted(_sources(domain), key=lambda s: _hash(f"{seed}:{domain}:{s[0]}"))
            used, n_docs, n_files, n_held, held_bytes = 0, 0, 0, 0, 0
            for src, load in sources:
                if used >= budget:
                    break
                text = load()
                if not text or len(text.encode("utf-8")) < min_doc_bytes:
                    continue
                n_files += 1
                split = "heldout" if _hash(f"{seed}:{src}") % heldout_every == 0 else "train"
                for piece in chunk_text(text, chunk_bytes):
                    nbytes = len(piece.encode("utf-8"))
                    if nbytes < min_doc_bytes:
                        continue
                    rec = {"id": f"{domain}/{n_docs:06d}", "domain": domain, "split": split,
                           "source": src, "text": piece}
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n_docs += 1
                    used += nbytes
                    if split == "heldout":
                        n_held += 1
                        held_bytes += nbytes
            stats["domains"][domain] = {"files": n_files, "docs": n_docs, "bytes": used,
                                        "heldout_docs": n_held, "heldout_bytes": held_bytes,
                                        "candidates": len(sources)}
            print(f"{domain:9s} files={n_files:5d} docs={n_docs:5d} bytes={used / 1e6:6.2f} MB "
                  f"heldout={n_held} (of {len(sources)} candidates)", file=sys.stderr)
    tmp.replace(out_dir / "corpus.jsonl")
    # The held-out part alone, small enough to travel to a device machine for trace recording.
    with (out_dir / "corpus.jsonl").open(encoding="utf-8") as src, \
            (out_dir / "heldout.jsonl").open("w", encoding="utf-8") as dst:
        for line in src:
            if json.loads(line)["split"] == "heldout":
                dst.write(line)
    stats["total_bytes"] = sum(d["bytes"] for d in stats["domains"].values())
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/smallmodel"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every domain's byte budget (e.g. 0.01 for a quick test)")
    ap.add_argument("--chunk-bytes", type=int, default=16_384)
    ap.add_argument("--heldout-every", type=int, default=20)
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.smallmodel.build_corpus", argv)
    if args.scale <= 0:
        raise SystemExit("--scale must be positive")
    budgets = {k: v * args.scale for k, v in DEFAULT_BUDGET_MB.items()}
    stats = build(args.out, seed=args.seed, budget_mb=budgets, chunk_bytes=args.chunk_bytes,
                  heldout_every=args.heldout_every)
    run.write(args.out, [args.out / name for name in ("corpus.jsonl", "heldout.jsonl",
                                                      "stats.json")])
    print(f"total {stats['total_bytes'] / 1e6:.2f} MB -> {args.out / 'corpus.jsonl'}")


if __name__ == "__main__":
    main()
