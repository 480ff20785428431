"""Compute-dtype benchmark: the same prune of a bf16 checkpoint under ``--dtype auto``, ``float32`` and
``bfloat16``, one after the other in one run, with each run's seconds and peak resident memory.

    python -m runtime_bench.dtype_bench [--hidden 1024] [--ffn 2816] [--layers 2] [--repeats 1]

1. Writes a random-initialised Llama (by default 2 blocks, hidden 1024, MLP 2816, heads of 64, GQA 4:1,
   SmolLM2's tokenizer and vocabulary) as bf16 safetensors. Random weights cost what real ones cost:
   time and memory depend on shapes, not values.
2. Prunes it with ``apt-sparse prune`` in a child process per row (SparseGPT, 8 × 256 calibration
   tokens, ``--no-evaluate``), the rows interleaved when repeated, and reads each child's own peak
   resident set (``VmHWM`` at its exit, imports included) and the compute dtype its report chose, with
   the reason.
3. Records this machine's bfloat16 facts (``apt.run.dtype.DeviceFacts``) and auto's time over float32's.

Writes ``runtime_bench/results/dtype_bench.json``. Run it with nothing else on the machine: the rows
are compared with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apt.models.loading import source_folder
from apt.run.dtype import DeviceFacts
from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"


def write_model(folder: Path, hidden: int, ffn: int, layers: int) -> dict:
    """The random-init bf16 Llama with SmolLM2's tokenizer; returns its shape and parameter count."""
    import transformers

    _, smollm2 = source_folder("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    heads = max(hidden // 64, 1)
    shape = dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=len(tokenizer), **shape))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return shape | {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}


# The prune command, recording its own resident peak (``VmHWM``) at exit into the file named first. Not
# ``wait4``'s ``ru_maxrss``: a child inherits its parent's peak through fork and exec, and the parent here
# held the whole model while writing it.
WITH_PEAK = """
import atexit, sys
peak_file = sys.argv.pop(1)
def record_peak():
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(record_peak)
from apt_sparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def prune_in_child(src: Path, out: Path, dtype: str, args) -> dict:
    """One row: the prune command with ``--dtype dtype`` in a child process; its seconds, its own peak
    resident set, and what its report says."""
    options = [
        "prune", "--model", str(src), "--out", str(out), "--overwrite", "--method", args.method,
        "--num-calibration-samples", str(args.windows), "--max-seq-length", str(args.seq_len), "--no-evaluate",
        "--device", args.device, "--dtype", dtype,
    ]  # fmt: skip
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    log, peak = out.parent / f"{out.name}.log", out.parent / f"{out.name}.peak"
    started = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.run(
            [sys.executable, "-c", WITH_PEAK, str(peak), *options], stdout=output, stderr=subprocess.STDOUT, env=env
        )
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"prune --dtype {dtype} failed (exit {child.returncode}):\n{log.read_text()[-3000:]}")
    report = json.loads((out / "prune_report.json").read_text())
    return {
        "dtype": dtype,
        "command": " ".join(["python -m apt_sparse", *options]),
        "seconds": seconds,
        "peak_rss_bytes": int(peak.read_text()) * 1024,
        "compute_dtype": report["model"]["compute_dtype"],
        "compute_dtype_reason": report["model"]["compute_dtype_reason"],
        "seconds_pruning": report["totals"]["seconds_pruning"],
        "report_peak_memory": report["peak_memory"],
        "all_nm_valid": report["totals"]["all_nm_valid"],
    }


def run(args, work: Path) -> dict:
    src = work / "llama-bf16"
    print(f"writing the random-init bf16 Llama (hidden {args.hidden}, MLP {args.ffn}, {args.layers} blocks) ...")
    model = write_model(src, args.hidden, args.ffn, args.layers)
    runs = []
    for repeat in range(args.repeats):
        for dtype in args.dtypes:
            row = prune_in_child(src, work / f"pruned-{dtype}", dtype, args) | {"repeat": repeat}
            runs.append(row)
            print(
                f"--dtype {dtype:8s} → {row['compute_dtype']:8s} {row['seconds']:7.1f} s   "
                f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB   ({row['compute_dtype_reason']})",
                flush=True,
            )
    rows = {}  # per --dtype: its fastest run's seconds, its largest peak
    for dtype in args.dtypes:
        mine = [r for r in runs if r["dtype"] == dtype]
        rows[dtype] = {
            "compute_dtype": mine[0]["compute_dtype"],
            "compute_dtype_reason": mine[0]["compute_dtype_reason"],
            "seconds": min(r["seconds"] for r in mine),
            "seconds_pruning": min(r["seconds_pruning"] for r in mine),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
        }
    summary = {
        "schema": "apt-sparse/dtype-bench/1",
        "model": model | {"stored_dtype": "bfloat16"},
        "calibration": {"method": args.method, "windows": args.windows, "seq_len": args.seq_len, "evaluate": False},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": args.threads or os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__,
            "device": args.device,
            "bfloat16_facts": dataclasses.asdict(DeviceFacts.of(args.device)),
        },
        "rows": rows,
        "runs": runs,
    }
    if "auto" in rows and "float32" in rows:
        summary["auto_over_float32"] = rows["auto"]["seconds"] / rows["float32"]["seconds"]
        print(f"auto / float32: ×{summary['auto_over_float32']:.2f} the time")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["auto", "float32", "bfloat16"],
        choices=["auto", "float32", "float16", "bfloat16"],
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every row, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the prunes (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the model and outputs (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "dtype_bench.json")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="apt-dtype-bench-"))
    try:
        summary = run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    save_results(args.out, summary, "runtime_bench.dtype_bench", argv)


if __name__ == "__main__":
    main()
