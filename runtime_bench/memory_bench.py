"""Memory benchmark: prune a ~1B-parameter Llama-shaped checkpoint and compare the prune process's peak
resident memory with the model's size.

    python -m runtime_bench.memory_bench [--windows 16] [--seq-len 512] [--method apt] [--limit-gib 1.5]

1. Writes a random-initialised Llama (hidden 2048, 16 layers, MLP 5632, GQA 32/4 heads, SmolLM2's
   tokenizer and vocabulary: 0.9 B parameters) as bf16 safetensors in 500 MB shards. Random weights
   cost what real ones cost: memory depends on shapes, not values.
2. Runs ``apt-sparse prune`` on it in a child process and reads the child's peak resident set
   (``ru_maxrss`` of the whole process, imports included) and the run's own figure from its report.
3. Checks the output: every pruned weight 2:4, in bf16, and ``from_pretrained`` loads it.
4. With ``--limit-gib``, runs the same prune again inside a cgroup whose ``memory.max`` is smaller than
   the model (where the machine lets this process create one), to show it completes there.

Writes ``runtime_bench/results/memory_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apt.models.checkpoint import CheckpointReader
from apt.models.loading import source_folder
from apt.solver.patterns import is_nm_sparse
from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=False,
)


def write_model(folder: Path) -> dict:
    """The random-init bf16 checkpoint, sharded, with SmolLM2's tokenizer; returns its sizes."""
    import transformers

    _, smollm2 = source_folder("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), **LLAMA_1B)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": parameters, "bytes_bf16": 2 * parameters, "bytes_fp32": 4 * parameters}


def prune_in_child(src: Path, out: Path, args, cgroup: Path | None = None) -> dict:
    """Run the prune command in a child process (inside ``cgroup`` when given); returns its peak RSS."""
    command = [
        sys.executable, "-m", "apt_sparse", "prune", "--model", str(src), "--out", str(out), "--overwrite",
        "--method", args.method, "--num-calibration-samples", str(args.windows), "--max-seq-length",
        str(args.seq_len), "--num-eval-windows", str(args.eval_windows), "--max-shard-size", "500MB",
        *args.extra,
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    preexec = None
    if cgroup is not None:

        def preexec():  # join the cgroup before exec, so the limit covers the whole child
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    run = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if run.returncode != 0:
        raise SystemExit(f"prune failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    report = json.loads((out / "prune_report.json").read_text())
    return {
        "command": " ".join(command[1:]).replace(sys.executable, "python"),
        "seconds": seconds,
        # ru_maxrss of all children so far: the larger of this run and the earlier ones
        "child_peak_rss_bytes": peak if peak > before * 1024 else None,
        "report_peak_memory": report["peak_memory"],
        "seconds_pruning": report["totals"]["seconds_pruning"],
        "accuracy": report["accuracy"],
        "stdout": run.stdout.strip().splitlines()[-6:],
        # per layer: the solver's seconds at these shapes (runtime_bench.scaling_model fits on them)
        "per_layer": [
            {"name": r["name"], "shape": r["shape"], "seconds": r["seconds"]}
            for r in report["layers"]
            if not r["skipped"]
        ],
    }


def check_output(out: Path) -> dict:
    import transformers

    reader = CheckpointReader(out)
    report = json.loads((out / "prune_report.json").read_text())
    targets = [r["tensor"] for r in report["layers"] if not r["skipped"]]
    valid = sum(is_nm_sparse(reader.read(name)) for name in targets)
    dtypes = sorted({str(reader.info(n).dtype) for n in reader.names()})
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    loaded = str(model.dtype)
    del model
    return {
        "targets": len(targets),
        "targets_2_4": valid,
        "stored_dtypes": dtypes,
        "from_pretrained_dtype": loaded,
        "shards": len(list(out.glob("*.safetensors"))),
    }


def make_cgroup(limit_bytes: int) -> tuple[Path | None, str, dict]:
    """A memory-limited cgroup this process may put a child in (v2, or v1's memory controller); returns
    ``(folder, status, file names)``."""
    name = f"apt-sparse-memory-bench-{os.getpid()}"
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    try:
        if (v2 / "cgroup.controllers").is_file():
            if "memory" not in (v2 / "cgroup.subtree_control").read_text():
                (v2 / "cgroup.subtree_control").write_text("+memory")
            group = v2 / name
            group.mkdir()
            (group / "memory.max").write_text(str(limit_bytes))
            (group / "memory.swap.max").write_text("0")
            return group, "ok", {"peak": "memory.peak", "limit": "memory.max"}
        if (v1 / "memory.limit_in_bytes").is_file():
            group = v1 / name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if (group / "memory.memsw.limit_in_bytes").is_file():  # no swapping around the limit either
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
            return group, "ok", {"peak": "memory.max_usage_in_bytes", "limit": "memory.limit_in_bytes"}
    except OSError as err:
        return None, f"cannot create a memory-limited cgroup here ({err.strerror})", {}
    return None, "no cgroup memory controller is mounted", {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--method", default="apt")
    parser.add_argument("--limit-gib", type=float, default=None, help="also run inside a cgroup with this memory limit")
    parser.add_argument(
        "--limited-only", action="store_true", help="only the run inside the limit (its peak is measured all the same)"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for the model and outputs (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_bench.json")
    parser.add_argument("extra", nargs="*", help="more prune options, after --")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="apt-memory-bench-"))
    src, out = work / "llama-1b-bf16", work / "pruned"
    if not (src / "config.json").is_file():
        print("writing the random-init model ...", flush=True)
        sizes = write_model(src)
    else:
        reader = CheckpointReader(src)
        parameters = sum(reader.info(n).nbytes // 2 for n in reader.names())
        sizes = {"parameters": parameters, "bytes_bf16": 2 * parameters, "bytes_fp32": 4 * parameters}
    print(
        f"model: {sizes['parameters'] / 1e9:.2f} B parameters, {sizes['bytes_bf16'] / 2**30:.2f} GiB in bf16",
        flush=True,
    )
    result = {"schema": "apt-sparse/memory-bench/1", "model": LLAMA_1B | sizes, "runs": {}}
    if args.limited_only and not args.limit_gib:
        raise SystemExit("--limited-only needs --limit-gib")
    if not args.limited_only:
        run = prune_in_child(src, out, args)
        run["output"] = check_output(out)
        run["peak_over_bf16_size"] = run["child_peak_rss_bytes"] / sizes["bytes_bf16"]
        result["runs"]["unlimited"] = run
        print(json.dumps({k: v for k, v in run.items() if k not in ("stdout", "per_layer")}, indent=2), flush=True)
    if args.limit_gib:
        limit = int(args.limit_gib * 2**30)
        group, status, files = make_cgroup(limit)
        if group is None:
            result["runs"]["limited"] = {"memory_max_bytes": limit, "status": f"not measured: {status}"}
        else:
            try:
                limited = prune_in_child(src, work / "pruned-limited", args, cgroup=group)
                limited["memory_limit_bytes"] = int((group / files["limit"]).read_text())
                # the cgroup's figure counts the page cache of the files read too (reclaimable)
                limited["cgroup_memory_peak_bytes"] = int((group / files["peak"]).read_text())
                limited["output"] = check_output(work / "pruned-limited")
                limited["peak_over_bf16_size"] = limited["child_peak_rss_bytes"] / sizes["bytes_bf16"]
                if not args.limited_only:
                    limited["output"]["same_shards_as_unlimited"] = all(
                        (out / p.name).read_bytes() == p.read_bytes()
                        for p in (work / "pruned-limited").glob("*.safetensors")
                    )
                result["runs"]["limited"] = limited
            finally:
                group.rmdir()
        shown = {k: v for k, v in result["runs"]["limited"].items() if k not in ("stdout", "per_layer")}
        print(json.dumps(shown, indent=2), flush=True)
    save_results(args.out, result, "runtime_bench.memory_bench", argv)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
