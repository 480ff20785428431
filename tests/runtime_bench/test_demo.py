"""`apt-sparse demo --quick`, the CI-sized whole chain on the real SmolLM2-135M."""

import json

import pytest

from apt_sparse.cli import main
from runtime_bench.bench import validate_results

pytestmark = pytest.mark.slow


def test_quick_demo_runs_the_whole_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "apt" in printed
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    acc = results["accuracy"]
    assert set(acc["methods"]) == {"apt", "magnitude"}
    assert acc["dense"] < acc["methods"]["apt"] < acc["methods"]["magnitude"]
    assert set(results["exports"]) == {"vllm", "compressed-tensors", "tensorrt"}
    assert results["exports"]["compressed-tensors"]["validation"]["round_trip_bit_exact"]
    assert all(p["peak_memory_bytes"] > 0 for p in results["pruning"].values())
    report = (out / "report.md").read_text()
    assert "## Not measured" in report and "trtexec" in report
    for png in ("gemm_speedup.png", "e2e_prefill.png", "accuracy.png", "layer_loss.png"):
        assert (out / png).stat().st_size > 5000
    for method in ("apt", "magnitude"):
        assert json.loads((out / "pruned" / method / "prune_report.json").read_text())["totals"]["all_nm_valid"]
