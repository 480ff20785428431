"""The accuracy study's arithmetic: each row is compared with SparseGPT calibrated on the same text."""

from runtime_bench.method_comparison import increase_ratios, table


def _row(method, figures, windows=32, run=None):
    calibration = {"source": "stdlib", "windows": windows, "seq_len": 512}
    return {
        "solver": {"method": method},
        "run": run or {},
        "calibration": calibration,
        "figures": figures,
        "seconds_pruning": 1.0,
        "sum_relative_loss": 1.0,
    }


def test_ratios_use_the_sparsegpt_row_with_the_same_calibration():
    section = {
        "dense": {"test": 20.0, "man": 10.0},
        "rows": {
            "sparsegpt": _row("sparsegpt", {"test": 40.0, "man": 30.0}),
            "apt": _row("apt", {"test": 30.0, "man": 25.0}),
            "sparsegpt, 4×": _row("sparsegpt", {"test": 36.0, "man": 26.0}, windows=128),
            "apt, 4×": _row("apt", {"test": 28.0, "man": 18.0}, windows=128),
            "apt, corrected": _row("apt", {"test": 25.0, "man": 50.0}, run={"correction": 0.5}),
            "apt, other text": _row("apt", {"test": 25.0, "man": 12.0}, windows=64),
        },
    }
    increase_ratios(section)
    rows = section["rows"]
    assert rows["apt"]["vs_sparsegpt"] == {"test": 0.5, "man": 0.75}
    assert rows["apt, 4×"]["vs_sparsegpt"] == {"test": 0.5, "man": 0.5}  # against SparseGPT at 4×
    assert rows["apt, corrected"]["vs_sparsegpt"] == {"test": 0.25, "man": 2.0}  # a run option is not a reference
    assert rows["apt, other text"]["vs_sparsegpt"] == {"test": None, "man": None}  # no SparseGPT row to compare
    lines = table(section).splitlines()
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| apt | 30 (0.50×) | 25 (0.75×) |" in table(section)
    assert "| sparsegpt | 40 | 30 |" in table(section)
