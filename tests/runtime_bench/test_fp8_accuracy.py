"""The FP8 study's arithmetic: FP8's cost over each row's unquantized figure, that cost over the dense model's
FP8 cost with the same rounding (the bar: ≤ 1), apt's lead over SparseGPT with FP8 rows against dense FP8 and
SparseGPT FP8."""

import pytest

from runtime_bench.fp8_accuracy import DEFAULT_ROWS, ROWS, derived, table


def test_fp8_cost_the_bar_and_the_lead_over_sparsegpt_compare_like_with_like():
    section = {
        "metric": "perplexity",
        "dense": {"test": 20.0, "man": 10.0},
        "rows": {
            "dense FP8, nearest": {"fp8": "nearest", "unquantized": None, "figures": {"test": 21.0, "man": 11.0}},
            "dense FP8": {"fp8": "compensate", "unquantized": None, "figures": {"test": 20.4, "man": 10.5}},
            "apt": {"fp8": None, "unquantized": None, "figures": {"test": 30.0, "man": 20.0}, "seconds_pruning": 5.0},
            "apt FP8, nearest": {"fp8": "nearest", "unquantized": "apt", "figures": {"test": 30.9, "man": 21.0}},
            "apt FP8": {"fp8": "compensate", "unquantized": "apt", "figures": {"test": 30.3, "man": 20.4}},
            "apt FP8 in the run": {"fp8": "run", "unquantized": "apt", "figures": {"test": 30.6, "man": 21.2}},
            "sparsegpt": {"fp8": None, "unquantized": None, "figures": {"test": 40.0, "man": 30.0}},
            "sparsegpt FP8": {"fp8": "compensate", "unquantized": "sparsegpt", "figures": {"test": 41.0, "man": 31.0}},
        },
    }
    derived(section)
    rows = section["rows"]
    assert rows["dense FP8, nearest"]["fp8_cost"] == {"test": 21.0 / 20.0, "man": 1.1}
    assert rows["apt FP8"]["fp8_cost"] == pytest.approx({"test": 1.01, "man": 1.02})
    # held against the dense model rounded the same way; a run's rounding against apt-sparse quantize's default
    assert rows["apt FP8"]["vs_dense_fp8_cost"] == pytest.approx({"test": 1.01 / 1.02, "man": 1.02 / 1.05})
    assert rows["apt FP8, nearest"]["vs_dense_fp8_cost"] == pytest.approx({"test": 1.03 / 1.05, "man": 1.05 / 1.1})
    assert rows["apt FP8 in the run"]["vs_dense_fp8_cost"] == pytest.approx({"test": 1.02 / 1.02, "man": 1.06 / 1.05})
    assert rows["apt"]["vs_sparsegpt"] == {"test": 0.5, "man": 0.5}  # against dense and SparseGPT
    assert rows["apt FP8"]["vs_sparsegpt"] == pytest.approx({"test": 9.9 / 20.6, "man": 9.9 / 20.5})  # all FP8
    assert "fp8_cost" not in rows["sparsegpt"] and "vs_sparsegpt" not in rows["sparsegpt FP8"]
    assert "vs_dense_fp8_cost" not in rows["dense FP8"] and "vs_dense_fp8_cost" not in rows["apt"]
    text = table(section)
    assert "| apt FP8 | 30.3 (1.010×; 0.990 of dense's; 0.48 of SparseGPT's increase) |" in text
    assert all(line.count("|") == text.splitlines()[0].count("|") for line in text.splitlines())
    assert "dense FP8 weights only" not in DEFAULT_ROWS and ROWS["apt FP8"].fp8 == "compensate"
