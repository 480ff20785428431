"""Injects real faults into real runs of the ``apt-sparse`` command and reports what a user would see.

Run by ``tests/test_faults.py`` inside a user and mount namespace of its own (``unshare --user
--map-root-user --mount``), where it may mount small file systems and read-only bind mounts without
touching the machine: a write that fails here really fails, in the kernel. Every scenario runs the
command's ``main`` in this process and records its exit code, what it printed on stderr and what it
left on disk. Prints one JSON object: scenario name → record.

    python -m tests.faults_driver ROOT SOURCE_MODEL REFERENCE_OUTPUT GGUF_FILE
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from apt_sparse.cli import main

FAST = [
    "--num-calibration-samples",
    "4",
    "--max-seq-length",
    "32",
    "--num-eval-windows",
    "2",
    "--max-shard-size",
    "8MB",
]


def mount_tmpfs(folder: Path, size: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    return folder


def mount_read_only(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    return folder


def run(*argv: str) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip() and "it/s]" not in line]
    return {
        "code": code,
        "stderr": lines[-3:],
        "lines": len([ln for ln in lines if ln.startswith(("error", "stopped"))]),
    }


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def same_files(a: Path, b: Path) -> bool:
    names = [n for n in listing(a) if n not in ("prune_report.json", "README.md")]
    return names == [n for n in listing(b) if n not in ("prune_report.json", "README.md")] and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).is_file()
    )


def at_block(block: int, action) -> None:
    """Run ``action`` when the run starts pruning block ``block`` (after the blocks before it are written)."""
    import apt.run.sequential as sequential

    real = sequential.prune_group

    def prune_group(group, stat, layered, config, bar, index, *rest):
        if index == block and not getattr(prune_group, "fired", False):
            prune_group.fired = True
            action()
        return real(group, stat, layered, config, bar, index, *rest)

    sequential.prune_group = prune_group
    return lambda: setattr(sequential, "prune_group", real)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full: what another program does to a shared disk."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (2**20, 4096):  # megabytes while they fit, then the last pages
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def scenarios(root: Path, source: Path, reference: Path, gguf: Path) -> dict:
    results = {}
    prune = ["prune", "--model", str(source), *FAST]

    # the output's file system is too small before anything starts
    small = mount_tmpfs(root / "small", "4m")
    results["disk full at start"] = run(*prune, "--out", str(small / "out")) | {"left": listing(small)}

    # the disk fills in the middle of the run: another program takes the space while block 2 is pruned
    middle = mount_tmpfs(root / "middle", "40m")
    restore = at_block(2, lambda: fill(middle))
    record = run(*prune, "--out", str(middle / "out"))
    restore()
    record["left"] = listing(middle)
    state = json.loads((middle / ".out.partial" / "resume.json").read_text())
    record["blocks_saved"] = state["blocks_done"]
    (middle / "filler.bin").unlink()
    record["resume"] = run(*prune, "--out", str(middle / "out"), "--resume")
    record["resume_identical"] = same_files(middle / "out", reference)
    results["disk full in the middle"] = record

    # activations spilled to a small disk
    tiny = mount_tmpfs(root / "tiny-activations", "1m")
    out = root / "activations-out"
    results["activation disk full"] = run(
        *prune, "--out", str(out), "--offload-activations", "disk", "--activation-dir", str(tiny)
    ) | {"left": listing(tiny) + listing(out)}

    # the GGUF conversion cache is too small for the dequantised model
    cache = mount_tmpfs(root / "cache", "16m")
    os.environ["APT_SPARSE_CACHE"] = str(cache)
    results["gguf cache full"] = run("prune", "--model", str(gguf), "--out", str(root / "gguf-out")) | {
        "left": listing(cache)
    }
    del os.environ["APT_SPARSE_CACHE"]

    # a read-only output file system, and a folder the user may not write to
    read_only = mount_read_only(root / "read-only")
    results["read-only output"] = run(*prune, "--out", str(read_only / "out")) | {"left": listing(read_only)}
    locked = root / "locked"  # owned by another user, read and execute only: made outside the namespace
    results["permission denied"] = run(*prune, "--out", str(locked / "out")) | {"left": listing(locked)}

    # a file size limit (ulimit -f): the shards are larger than it allows
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        results["file size limit"] = run(*prune, "--out", str(root / "limited")) | {"left": listing(root)}
        results["export past the file size limit"] = run(
            "export", "vllm", str(reference), str(root / "limited-export"), "--no-vllm-check"
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    results["export past the file size limit"]["left"] = [n for n in listing(root) if "limited-export" in n]

    # SIGTERM in a single process, then --resume
    term = root / "term"
    restore = at_block(2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    record = run(*prune, "--out", str(term / "out"))
    restore()
    record["blocks_saved"] = json.loads((term / ".out.partial" / "resume.json").read_text())["blocks_done"]
    record["resume"] = run(*prune, "--out", str(term / "out"), "--resume")
    record["resume_identical"] = same_files(term / "out", reference)
    results["SIGTERM"] = record

    # damaged state files of an interrupted run: refused with the way out, and left as they are
    for fault, damage in {
        "resume.json corrupted": lambda p: p.write_text(p.read_text()[:40]),
        "resume.json of another version": lambda p: p.write_text(
            json.dumps(json.loads(p.read_text()) | {"schema": "apt-sparse/resume/0"})
        ),
        "resume.json missing a field": lambda p: p.write_text(
            json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "blocks_done"})
        ),
        "a shard of the partial run removed": lambda p: (p.parent / "model-00002-of-00003.safetensors").unlink(),
    }.items():
        folder = root / fault.replace(" ", "-")
        restore = at_block(2, lambda: os.kill(os.getpid(), signal.SIGTERM))
        run(*prune, "--out", str(folder / "out"))
        restore()
        state = folder / ".out.partial" / "resume.json"
        damage(state)
        before = {n: (folder / n).read_bytes() for n in listing(folder) if (folder / n).is_file()}
        record = run(*prune, "--out", str(folder / "out"), "--resume")
        record["unchanged"] = before == {
            n: (folder / n).read_bytes() for n in listing(folder) if (folder / n).is_file()
        }
        record["overwrite"] = run(*prune, "--out", str(folder / "out"), "--overwrite")
        results[fault] = record

    # exports and the benchmark on a full or read-only disk: one line, nothing half-written
    full = mount_tmpfs(root / "full-export", "2m")
    results["export to a full disk"] = run("export", "vllm", str(reference), str(full / "x"), "--no-vllm-check") | {
        "left": listing(full)
    }
    results["export to a read-only disk"] = run(
        "export", "compressed-tensors", str(reference), str(read_only / "x"), "--no-vllm-check"
    ) | {"left": listing(read_only)}
    results["bench to a read-only disk"] = run("bench", str(reference), "--out", str(read_only / "bench")) | {
        "left": listing(read_only)
    }
    return results


if __name__ == "__main__":
    root, source, reference, gguf = (Path(a) for a in sys.argv[1:5])
    print(json.dumps(scenarios(root, source, reference, gguf)))
    shutil.rmtree(root / "activations-out", ignore_errors=True)
