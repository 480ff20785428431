"""Offline text of other kinds than docstrings, found on a Debian machine: calibration material and
out-of-domain evaluation text that never needs a network.

- ``man``: English manual pages (sections 1, 5 and 8), rendered to plain text by groff; a fixed
  ~6 % of the pages, chosen by a hash of their file names, so the same pages are taken on every
  machine that has them. Rendered once into the cache folder.
- ``debian-doc``: the READMEs and Markdown/text documents packages install under /usr/share/doc.
- ``licenses``: the license texts in /usr/share/common-licenses (legal English prose).
- ``info``: the GNU manuals in /usr/share/info (coreutils, find, diff, ...), one document per node.

Each returns documents in a fixed order; a corpus that is absent here raises ``InvalidInputError``
naming what is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from apt.errors import InvalidInputError

MAN_SECTIONS = ("man1", "man5", "man8")
MAN_SHARE = 0.06
MIN_CHARACTERS = 400


def _cache() -> Path:
    return Path(os.environ.get("APT_SPARSE_CACHE", Path.home() / ".cache" / "apt-sparse")) / "corpora"


def _picked(name: str, share: float) -> bool:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64 < share


def _clean(text: str) -> str:
    """Paragraphs of running text: lines joined, runs of spaces collapsed, blank lines kept as breaks."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def _read_maybe_gz(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def man_pages(root: Path = Path("/usr/share/man")) -> tuple[str, ...]:
    files = sorted(p for section in MAN_SECTIONS for p in (root / section).glob("*.gz") if _picked(p.name, MAN_SHARE))
    if not files:
        raise InvalidInputError(f"no English manual pages under {root}/{{{','.join(MAN_SECTIONS)}}} on this machine")
    groff = shutil.which("groff")
    if groff is None:
        raise InvalidInputError("rendering manual pages needs groff (apt-get install groff-base)")
    key = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:16]
    cached = _cache() / f"man-{key}.jsonl"
    if cached.is_file():
        return tuple(json.loads(line) for line in cached.read_text().splitlines())
    docs = []
    for path in files:
        run = subprocess.run(
            [groff, "-man", "-Tutf8", "-rHY=0", "-rLL=2000n", "-P", "-cbou"],
            input=gzip.decompress(path.read_bytes()),
            capture_output=True,
            timeout=60,
        )
        text = _clean(run.stdout.decode("utf-8", errors="replace"))
        if run.returncode == 0 and len(text) >= MIN_CHARACTERS:
            docs.append(text)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(d) for d in docs))
    tmp.replace(cached)
    return tuple(docs)


def debian_docs(root: Path = Path("/usr/share/doc")) -> tuple[str, ...]:
    patterns = ("README", "README.*", "*.md", "*.md.gz", "*.txt", "*.txt.gz")
    files = sorted({p for pattern in patterns for p in root.glob(f"*/{pattern}") if p.is_file()})
    docs = []
    for path in files:
        text = _clean(_read_maybe_gz(path))
        letters = sum(c.isalpha() for c in text)
        if len(text) >= MIN_CHARACTERS and letters > 0.6 * len(text):  # prose, not tables of numbers
            docs.append(text)
    if not docs:
        raise InvalidInputError(f"no package documentation (README, Markdown, text) under {root} on this machine")
    return tuple(dict.fromkeys(docs))


def licenses(root: Path = Path("/usr/share/common-licenses")) -> tuple[str, ...]:
    files = sorted(p for p in root.glob("*") if p.is_file())
    docs = tuple(dict.fromkeys(_clean(p.read_text(errors="replace")) for p in files))
    if not docs:
        raise InvalidInputError(f"no license texts under {root} on this machine")
    return docs


def info_manuals(root: Path = Path("/usr/share/info")) -> tuple[str, ...]:
    files = sorted(p for p in root.glob("*.info*") if p.is_file())
    docs = []
    for path in files:
        for node in _read_maybe_gz(path).split("\x1f"):
            lines = node.strip("\n").splitlines()
            if not lines or not lines[0].startswith("File:"):
                continue  # the tag table and the file's preamble
            text = _clean("\n".join(line for line in lines[1:] if not line.startswith("* Menu:")))
            if len(text) >= MIN_CHARACTERS:
                docs.append(text)
    if not docs:
        raise InvalidInputError(f"no GNU info manuals under {root} on this machine")
    return tuple(dict.fromkeys(docs))


CORPORA = {"man": man_pages, "debian-doc": debian_docs, "licenses": licenses, "info": info_manuals}
