"""Atomic outputs: a folder is built under a temporary name and renamed into place only when complete,
so an interrupted run never leaves a folder that looks finished. Shared by the pruning run, the
exporters and the benchmark, with what they need to fail well when the disk does: the free space a
write needs, checked before any work, and the operating system's write failures (no space, a quota,
a read-only file system, no permission, a file size limit) turned into one-line errors naming the
path."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from apt.errors import InvalidInputError, NotEnoughSpaceError, OutputError

# the operating system's refusals of a write, in the words the error message uses
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file would exceed the file size limit",
}
MARGIN = 2**20  # the file system's own bookkeeping, and a report or card beside the counted bytes


def is_write_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) and not isinstance(err, OutputError) and err.errno in WRITE_ERRORS


def write_failure(err: OSError, where: str | Path | None = None) -> OutputError:
    """One line for an OS-level write failure: what could not be written, where, and why."""
    path = err.filename or where or "a file"
    return OutputError(err.errno, f"could not write {path}: {WRITE_ERRORS[err.errno]}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside, an OS-level write failure becomes an ``OutputError`` naming ``path``."""
    try:
        yield
    except OSError as err:
        if is_write_failure(err):
            raise write_failure(err, path) from err
        raise


def existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(needs: list[tuple[str, Path, int]], remedy: str) -> None:
    """Refuse, before any work, when a file system lacks the bytes ``needs`` says will be written to it:
    ``(what, folder, bytes)``, grouped by the file system each folder is on."""
    by_device: dict[int, list[tuple[str, Path, int]]] = {}
    for what, folder, nbytes in needs:
        if nbytes > 0:
            by_device.setdefault(existing_parent(folder).stat().st_dev, []).append((what, folder, nbytes))
    for items in by_device.values():
        folder = existing_parent(items[0][1])
        free = shutil.disk_usage(folder).free
        total = sum(n for _, _, n in items) + MARGIN
        if total > free:
            parts = ", ".join(f"{what} {_size(n)}" for what, _, n in items)
            raise NotEnoughSpaceError(
                errno.ENOSPC,
                f"not enough free space in {folder}: {_size(total)} needed ({parts}), {_size(free)} free; {remedy}",
            )


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:
        if is_write_failure(err):
            raise OutputError(err.errno, f"{write_failure(err, out.parent)}; nothing was written") from err
        raise
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(err):
            raise OutputError(err.errno, f"{write_failure(err, tmp)}; nothing was written to {out}") from err
        if isinstance(err, OutputError):
            raise OutputError(err.errno, f"{err.strerror or err}; nothing was written to {out}") from err
        raise


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON through a temporary file in the same folder, then rename."""
    path = Path(path)
    with writing(path):
        _write_json_atomic(path, data)


def _write_json_atomic(path: Path, data) -> None:
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
