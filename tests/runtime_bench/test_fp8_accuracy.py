"""The FP8 study's arithmetic: FP8's cost over each row's unquantized figure, apt's lead over SparseGPT with
FP8 rows against dense FP8 and SparseGPT FP8."""

import pytest

from runtime_bench.fp8_accuracy import DEFAULT_ROWS, derived, table


def test_fp8_cost_and_the_lead_over_sparsegpt_compare_like_with_like():
    section = {
        "metric": "perplexity",
        "dense": {"test": 20.0, "man": 10.0},
        "rows": {
            "dense FP8": {"figures": {"test": 21.0, "man": 11.0}},
            "apt": {"figures": {"test": 30.0, "man": 20.0}, "seconds_pruning": 5.0},
            "apt FP8": {"figures": {"test": 30.3, "man": 20.4}},
            "sparsegpt": {"figures": {"test": 40.0, "man": 30.0}},
            "sparsegpt FP8": {"figures": {"test": 41.0, "man": 31.0}},
        },
    }
    derived(section)
    rows = section["rows"]
    assert rows["dense FP8"]["fp8_cost"] == {"test": 21.0 / 20.0, "man": 1.1}
    assert rows["apt FP8"]["fp8_cost"] == pytest.approx({"test": 1.01, "man": 1.02})
    assert rows["apt"]["vs_sparsegpt"] == {"test": 0.5, "man": 0.5}  # against dense and SparseGPT
    assert rows["apt FP8"]["vs_sparsegpt"] == pytest.approx({"test": 9.3 / 20.0, "man": 9.4 / 20.0})  # all FP8
    assert "fp8_cost" not in rows["sparsegpt"] and "vs_sparsegpt" not in rows["sparsegpt FP8"]
    text = table(section)
    assert "| apt FP8 | 30.3 (1.010× unquantized; 0.47× SparseGPT's increase) |" in text
    assert all(line.count("|") == text.splitlines()[0].count("|") for line in text.splitlines())
    assert "dense FP8 weights only" not in DEFAULT_ROWS
