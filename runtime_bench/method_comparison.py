"""Accuracy of every pruning method on one model, in one run, on the same calibration and eval data.

    python -m runtime_bench.method_comparison [--model smollm2-135m] [--windows 32] [--seq-len 512]

Prints a table (perplexity for causal LMs, embedding cosine for encoders, summed relative layer loss,
pruning seconds) and writes it as JSON; ``--keep DIR`` keeps the pruned folders.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from apt.job import PruneJob, prune_model, versions
from apt.sequential import RunConfig
from apt.solver import METHODS, PruneConfig
from runtime_bench import save_results

RESULTS = Path(__file__).resolve().parent / "results"


def compare_methods(model: str, methods, windows: int, seq_len: int, eval_windows: int, out_root: Path) -> dict:
    rows = {}
    dense = None
    for method in methods:
        job = PruneJob(
            model=model,
            out=str(out_root / method.replace(" ", "_")),
            run=RunConfig(solver=PruneConfig(method=method)),
            num_calibration_samples=windows,
            max_seq_length=seq_len,
            num_eval_windows=eval_windows,
            overwrite=True,
        )
        report = prune_model(job)
        accuracy = report["accuracy"]
        metric = accuracy["metric"]
        dense = accuracy["dense"].get(metric)
        rows[method] = {
            metric: accuracy["pruned"][metric],
            "sum_relative_loss": report["totals"]["sum_relative_loss"],
            "seconds_pruning": report["totals"]["seconds_pruning"],
            "peak_memory_bytes": report["peak_memory"]["bytes"],
            "all_nm_valid": report["totals"]["all_nm_valid"],
        }
        print(
            f"{method:10s} {metric} {rows[method][metric]:10.3f}   "
            f"sum rel. loss {rows[method]['sum_relative_loss']:8.3f}   {rows[method]['seconds_pruning']:6.0f} s",
            flush=True,
        )
    print(f"{'dense':10s} {metric} {dense:10.3f}")
    return {
        "schema": "apt-sparse/method-comparison/1",
        "model": model,
        "pattern": "2:4",
        "calibration": {"source": "stdlib", "windows": windows, "seq_len": seq_len},
        "eval": {"source": "stdlib", "windows": eval_windows, "seq_len": seq_len},
        "metric": metric,
        "dense": dense,
        "methods": rows,
        "versions": versions(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="keep the pruned folders here")
    parser.add_argument("--out", type=Path, default=RESULTS / "method_comparison.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        summary = compare_methods(args.model, args.methods, args.windows, args.seq_len, args.eval_windows, root)
    save_results(args.out, summary, "runtime_bench.method_comparison", argv)


if __name__ == "__main__":
    main()
