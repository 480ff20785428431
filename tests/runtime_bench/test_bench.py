import json

import pytest
import torch
import transformers

from apt.patterns import Pattern
from apt.run import PruneJob, prune_model
from apt.solver import select_mask
from runtime_bench.backends import BACKENDS, availability
from runtime_bench.bench import BenchConfig, pruning_record, run_bench, validate_results
from runtime_bench.decode_safe import DecodeSafeLinear, make_decode_safe
from runtime_bench.gemm import sparse_thresholds
from runtime_bench.report import render_report

from ..apt.tiny_models import save_tiny_model

HAS_SPARSE_GPU = BACKENDS["torch-sparse-cusparselt"]().available


def test_every_backend_reports_availability_with_a_reason():
    report = availability()
    assert set(report) == {"torch-dense", "torch-sparse-cusparselt", "torch-sparse-cutlass", "onnxruntime", "tensorrt"}
    for name, status in report.items():
        assert isinstance(status["available"], bool) and status["reason"], name
    assert report["torch-dense"]["available"]
    if not torch.cuda.is_available():
        assert not report["torch-sparse-cusparselt"]["available"]
        assert "CUDA" in report["torch-sparse-cusparselt"]["reason"]


def test_thresholds_take_the_sparse_path_only_where_it_always_won():
    def rec(m, speedup):
        return {"in": 64, "out": 32, "m": m, "b": {"speedup": speedup} if speedup else "not measured: x"}

    gemm = {"records": [rec(1, 0.6), rec(16, 1.3), rec(64, 0.99), rec(256, 1.4), rec(1024, 1.6)]}
    assert sparse_thresholds(gemm, "b") == {"64x32": 256}
    gemm = {"records": [rec(1, 0.5), rec(16, 0.9)]}
    assert sparse_thresholds(gemm, "b") == {"64x32": None}
    gemm = {"records": [rec(1, None), rec(16, None)]}
    assert sparse_thresholds(gemm, "b") == {"64x32": None}


def _sparse_linear(k=128, n=64, dtype=torch.float32, device="cpu"):
    linear = torch.nn.Linear(k, n, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(select_mask(linear.weight.abs().float(), Pattern(2, 4)))
    return linear.to(device)


def test_decode_safe_linear_dense_path_is_exactly_dense():
    linear = _sparse_linear()
    safe = DecodeSafeLinear(linear, threshold=32)
    x = torch.randn(3, 5, 128)
    assert not safe.uses_sparse  # no sparse kernels on CPU: the dense path serves every M
    assert torch.equal(safe(x), linear(x))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SPARSE_GPU, reason=f"2:4 kernels: {BACKENDS['torch-sparse-cusparselt']().reason}")
def test_decode_safe_linear_both_paths_match_dense_on_gpu():
    linear = _sparse_linear(k=256, n=128, dtype=torch.float16, device="cuda")
    safe = DecodeSafeLinear(linear, threshold=64)
    assert safe.uses_sparse
    small, large = (
        torch.randn(1, 4, 256, device="cuda", dtype=torch.float16),
        torch.randn(2, 64, 256, device="cuda", dtype=torch.float16),
    )
    torch.testing.assert_close(safe(small), linear(small), atol=1e-2, rtol=1e-2)  # dense path
    torch.testing.assert_close(safe(large), linear(large), atol=1e-2, rtol=1e-2)  # sparse path


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = save_tiny_model("llama", root / "src")
    report = prune_model(
        PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False)
    )
    dense = transformers.AutoModelForCausalLM.from_pretrained(src)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(root / "pruned")
    config = BenchConfig(
        device="cpu",
        gemm_ms=(1, 8),
        gemm_repeats=2,
        llama_shapes=False,
        prefill=((1, 16),),
        decode=(1, 8, 4),
        e2e_repeats=2,
    )
    pruning = {"apt": pruning_record(report)}
    accuracy = {"metric": "perplexity", "dense": 10.0, "methods": {"apt": 12.0}}
    return run_bench(config, dense, pruned, accuracy=accuracy, pruning=pruning), root


def test_bench_on_cpu_writes_results_that_validate(tiny_results):
    results, root = tiny_results
    validate_results(json.loads(json.dumps(results)))
    shapes = {(r["in"], r["out"]) for r in results["gemm"]["records"]}
    assert shapes == {(64, 64), (64, 32), (64, 128), (128, 64)}
    assert all(r["dense_ms"]["median"] > 0 for r in results["gemm"]["records"])
    if not torch.cuda.is_available():
        assert any("not measured: " in s for s in results["not_measured"])
        sparse_rows = [r for r in results["e2e"]["prefill"] if r["model"] == "pruned" and "decode-safe" in r["backend"]]
        assert all(r["result"].startswith("not measured: ") for r in sparse_rows)
    assert results["decode_safe"]["replaced"] == 14
    assert results["decode_safe"]["max_abs_diff_vs_dense_kernels"] == 0.0 or torch.cuda.is_available()


def test_validation_rejects_placeholder_numbers(tiny_results):
    results, _ = tiny_results
    broken = json.loads(json.dumps(results))
    broken["gemm"]["records"][0]["torch-sparse-cutlass"] = 0
    with pytest.raises(ValueError, match="gemm torch-sparse-cutlass"):
        validate_results(broken)
    broken = json.loads(json.dumps(results))
    broken["e2e"]["decode"][0]["result"] = "n/a"
    with pytest.raises(ValueError, match="e2e decode"):
        validate_results(broken)


def test_report_renders_with_plots(tiny_results, tmp_path):
    results, _ = tiny_results
    path = render_report(results, tmp_path)
    text = path.read_text()
    assert "## Not measured" in text and "| apt | 12.000 |" in text
    for name in ("gemm_speedup.png", "e2e_prefill.png", "accuracy.png", "layer_loss.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_make_decode_safe_replaces_only_2_4_linears():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].sparse = _sparse_linear()
    model.layers[0].dense = torch.nn.Linear(128, 64)
    counts = make_decode_safe(model, {"128x64": 16})
    assert counts["replaced"] == 1 and isinstance(model.layers[0].sparse, DecodeSafeLinear)
    assert isinstance(model.layers[0].dense, torch.nn.Linear)
