"""Atomic outputs: a folder is built under a temporary name and renamed into place only when complete,
so an interrupted run never leaves a folder that looks finished. Shared by the pruning run and the
exporters."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from apt.errors import InvalidInputError


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by rename, on error it is
    removed. An existing non-empty ``out`` is refused unless ``overwrite``; it is only replaced once the
    new folder is complete."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder: choose another output path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidInputError(f"{out} already exists and is not empty: pass --overwrite or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON through a temporary file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_listing(folder: str | Path) -> list[dict]:
    """Every file under ``folder`` with its size in bytes and sha256, in a fixed order."""
    folder = Path(folder)
    return [
        {"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
