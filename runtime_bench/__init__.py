"""Benchmarks: what 2:4 pruning buys (speed) and costs (accuracy), measured."""

import sys


def command_line(module: str, argv) -> str:
    """The command that reproduces a benchmark run, recorded in the results it writes."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])
