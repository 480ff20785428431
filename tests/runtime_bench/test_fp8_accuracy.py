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


def test_several_seeds_give_the_geometric_mean_and_the_bar_seed_by_seed():
    from runtime_bench.fp8_accuracy import geometric_mean

    dense_by_seed = {"0": {"test": 20.2, "man": 10.4}, "1": {"test": 20.8, "man": 10.1}}
    apt_by_seed = {"0": {"test": 30.6, "man": 20.2}, "1": {"test": 30.0, "man": 20.6}}
    section = {
        "metric": "perplexity",
        "dense": {"test": 20.0, "man": 10.0},
        "rows": {
            "dense FP8": {
                "fp8": "compensate",
                "unquantized": None,
                "figures_by_seed": dense_by_seed,
                "figures": geometric_mean(dense_by_seed.values()),
            },
            "apt": {"fp8": None, "unquantized": None, "figures": {"test": 30.0, "man": 20.0}},
            "apt FP8": {
                "fp8": "compensate",
                "unquantized": "apt",
                "figures_by_seed": apt_by_seed,
                "figures": geometric_mean(apt_by_seed.values()),
            },
        },
    }
    assert section["rows"]["apt FP8"]["figures"]["test"] == pytest.approx((30.6 * 30.0) ** 0.5)
    derived(section)
    row = section["rows"]["apt FP8"]
    # seed 0: apt 1.02 against dense 1.01; seed 1: 1.00 against 1.04 — each seed against the same windows
    assert row["vs_dense_fp8_cost_by_seed"]["0"] == pytest.approx({"test": 1.02 / 1.01, "man": 1.01 / 1.04})
    assert row["vs_dense_fp8_cost_by_seed"]["1"] == pytest.approx({"test": 1.00 / 1.04, "man": 1.03 / 1.01})
    mean_apt = (1.02 * 1.00) ** 0.5
    mean_dense = (1.01 * 1.04) ** 0.5
    assert row["vs_dense_fp8_cost"]["test"] == pytest.approx(mean_apt / mean_dense)
    text = table(section)
    low, high = sorted([1.00 / 1.04, 1.02 / 1.01])
    assert f"of dense's, {low:.3f}–{high:.3f} by seed" in text
