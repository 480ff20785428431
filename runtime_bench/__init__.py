"""Benchmarks: what 2:4 pruning buys (speed) and costs (accuracy), measured."""

import sys
from pathlib import Path


def save_results(path: Path, results: dict, module: str, argv) -> None:
    """Write a benchmark's results atomically to ``path``, with the command that reproduces them."""
    from apt.atomic import write_json_atomic  # here: importing the package stays free of apt and torch

    results["command"] = " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    print(f"wrote {path}")
