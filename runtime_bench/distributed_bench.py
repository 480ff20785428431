"""Distributed benchmark: the same prune on one process and on two ranks (torchrun, gloo), on this machine.

    python -m runtime_bench.distributed_bench [--model smollm2-135m] [--windows 128] [--seq-len 512]

One process with two threads against two ranks with one thread each (the machine has two cores):
wall time, peak memory per rank, perplexity (dense and pruned), the agreement of the two runs'
2:4 masks (the share of groups of four that keep the same two weights) and the summed relative
layer loss. Whole-model masks are not expected to be equal: sums of partial Hessians differ from one
sequential sum in the last bits, which flips near-ties, and sequential calibration carries that on.
Writes ``runtime_bench/results/distributed_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apt.models.checkpoint import CheckpointReader
from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], threads: int) -> float:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def mask_agreement(a: Path, b: Path, tensors: list[str]) -> float:
    first, second = CheckpointReader(a), CheckpointReader(b)
    same = total = 0
    for name in tensors:
        x, y = (first.read(name) != 0).reshape(-1, 4), (second.read(name) != 0).reshape(-1, 4)
        same += int((x == y).all(dim=1).sum())
        total += x.shape[0]
    return same / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed_bench.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="apt-distributed-bench-"))
    common = [
        "prune",
        "--model",
        args.model,
        "--num-calibration-samples",
        str(args.windows),
        "--max-seq-length",
        str(args.seq_len),
        "--num-eval-windows",
        str(args.eval_windows),
    ]
    runs = {}
    for label, ranks in (("1 process, 2 threads", 1), ("2 ranks, 1 thread each", 2)):
        out = work / f"ranks{ranks}"
        if ranks == 1:
            command = [sys.executable, "-m", "apt_sparse", *common, "--out", str(out)]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(ranks),
                "-m",
                "apt_sparse",
                *common,
                "--out",
                str(out),
            ]
        seconds = run(command, threads=2 if ranks == 1 else 1)
        report = json.loads((out / "prune_report.json").read_text())
        ranks_info = report.get("distributed", {}).get("ranks") or [{"rank": 0, "peak_memory": report["peak_memory"]}]
        runs[label] = {
            "ranks": ranks,
            "command": " ".join(command).replace(sys.executable, "python"),
            "wall_seconds": seconds,
            "seconds_pruning": report["totals"]["seconds_pruning"],
            "peak_memory_bytes_per_rank": [r["peak_memory"]["bytes"] for r in ranks_info],
            "seconds_in_collectives_per_rank": [r.get("seconds_in_collectives", 0.0) for r in ranks_info],
            "bytes_sent_per_rank": [r.get("bytes_sent", 0) for r in ranks_info],
            "sum_relative_loss": report["totals"]["sum_relative_loss"],
            "perplexity_dense": report["accuracy"]["dense"]["perplexity"],
            "perplexity_pruned": report["accuracy"]["pruned"]["perplexity"],
            "folder": str(out),
            "targets": [r["tensor"] for r in report["layers"] if not r["skipped"]],
        }
        print(
            f"{label}: {seconds:.0f} s, perplexity {runs[label]['perplexity_pruned']:.3f}, peak "
            f"{[round(b / 2**30, 2) for b in runs[label]['peak_memory_bytes_per_rank']]} GiB",
            flush=True,
        )
    one, two = runs["1 process, 2 threads"], runs["2 ranks, 1 thread each"]
    summary = {
        "schema": "apt-sparse/distributed-bench/1",
        "model": args.model,
        "calibration": {"windows": args.windows, "seq_len": args.seq_len},
        "runs": {k: {key: v for key, v in r.items() if key not in ("folder", "targets")} for k, r in runs.items()},
        "mask_agreement": mask_agreement(Path(one["folder"]), Path(two["folder"]), one["targets"]),
        "perplexity_ratio": two["perplexity_pruned"] / one["perplexity_pruned"],
        "speedup": one["wall_seconds"] / two["wall_seconds"],
    }
    print(
        f"mask agreement {summary['mask_agreement']:.4f}, perplexity ratio {summary['perplexity_ratio']:.4f}, "
        f"speedup {summary['speedup']:.2f}×"
    )
    save_results(args.out, summary, "runtime_bench.distributed_bench", argv)


if __name__ == "__main__":
    main()
