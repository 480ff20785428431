"""`apt-sparse demo --quick` on the real SmolLM2-135M: prune → every exporter → ONNX Runtime parity → bench →
report, run once; each test checks one of its artifacts with that artifact's real consumer."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from apt.measure.evaluate import perplexity
from apt.models.checkpoint import CheckpointReader
from apt.models.loading import load_tokenizer, source_folder
from apt.solver.patterns import is_nm_sparse
from apt.text.sources import evaluation_documents, token_windows
from runtime_bench.bench import validate_results

from ..exporters.test_exporters import LEGACY_COMPRESSED_TENSORS

pytestmark = pytest.mark.slow


def test_quick_demo_runs_the_whole_chain(smollm2_demo):
    out, printed = smollm2_demo
    assert "report:" in printed and "apt" in printed
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    acc = results["accuracy"]
    assert set(acc["methods"]) == {"apt", "magnitude"}
    assert acc["dense"] < acc["methods"]["apt"] < acc["methods"]["magnitude"]
    assert set(results["exports"]) == {"vllm", "compressed-tensors", "tensorrt"}
    assert all(p["peak_memory_bytes"] > 0 for p in results["pruning"].values())
    assert results["demo"]["command"].startswith("apt-sparse demo")
    report = (out / "report.md").read_text()
    assert "## Not measured" in report and "trtexec" in report
    for png in ("gemm_speedup.png", "e2e_prefill.png", "accuracy.png", "layer_loss.png"):
        assert (out / png).stat().st_size > 5000
    for method in ("apt", "magnitude"):
        report = json.loads((out / "pruned" / method / "prune_report.json").read_text())
        assert report["totals"]["all_nm_valid"] and report["totals"]["layers_pruned"] == 30 * 7


def test_smollm2_streamed_perplexities_equal_the_in_memory_models(smollm2_demo):
    out, _ = smollm2_demo
    results = json.loads((out / "results.json").read_text())
    _, dense_folder = source_folder("smollm2-135m")
    documents, _ = evaluation_documents("stdlib", "stdlib")
    windows = token_windows(documents, load_tokenizer(dense_folder), 2, 128)  # the demo's --quick eval windows
    for folder, value in (
        (dense_folder, results["accuracy"]["dense"]),
        (out / "pruned" / "apt", results["accuracy"]["methods"]["apt"]),
    ):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert perplexity(model, windows)["perplexity"] == pytest.approx(value, rel=1e-5), folder


def test_smollm2_vllm_export_loads_in_transformers_and_keeps_every_target_2_4(smollm2_demo):
    out, _ = smollm2_demo
    manifest = json.loads((out / "export" / "vllm" / "manifest.json").read_text())
    assert manifest["pattern_check"]["all_valid"] and len(manifest["pattern_check"]["layers"]) == 210
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "export" / "vllm", dtype=torch.float16).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out / "pruned" / "apt").eval()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_nm_sparse(module.weight.data), name
    # what transformers loads is the pruned model in fp16, tensor for tensor (the tied head included)
    loaded, pruned = model.state_dict(), reference.state_dict()
    assert loaded.keys() == pruned.keys()
    for name, tensor in pruned.items():
        expected = tensor.to(torch.float16)
        expected = torch.where(expected == 0, torch.zeros((), dtype=torch.float16), expected)
        assert torch.equal(loaded[name].view(torch.int16), expected.view(torch.int16)), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_smollm2_bitmask_export_is_decoded_by_compressed_tensors_014(smollm2_demo):
    out, _ = smollm2_demo
    assert LEGACY_COMPRESSED_TENSORS.is_dir(), "make install puts compressed-tensors 0.14.0.1 in .venv/ct014"
    manifest = json.loads((out / "export" / "compressed-tensors" / "manifest.json").read_text())
    loaded = manifest["validation"]["compressed_tensors_loader"]  # the library's own loader, run by the export
    assert loaded["status"] == "ok" and "compressed-tensors 0.14.0.1" in loaded["loader"], loaded
    assert loaded["tensors_bit_exact"] == len(CheckpointReader(out / "pruned" / "apt").names())
    assert loaded["compressed_as_the_library_does"] + loaded["with_ties"] == 210
    size = json.loads((out / "export" / "compressed-tensors" / "manifest.json").read_text())["size"]
    # 2:4 halves the values of 210 layers and adds a 1/16 bitmask; embeddings stay dense
    assert 0.5 < size["bytes_on_disk"] / size["dense_bytes_same_dtype"] < 0.8


def test_smollm2_tensorrt_export_passes_onnx_runtime_and_says_the_engine_was_not_built(smollm2_demo):
    out, _ = smollm2_demo
    manifest = json.loads((out / "export" / "tensorrt" / "manifest.json").read_text())
    validation = manifest["validation"]
    assert validation["onnx_eligible_initializers"] == 210
    parity = validation["onnxruntime"]
    assert parity["status"] == "ok" and parity["passed"] and parity["top1_agreement"] >= 0.95
    from exporters.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        assert validation["engine"]["status"].startswith(f"not built: {reason}")
        assert not (out / "export" / "tensorrt" / "model.plan").exists()
    assert "--sparsity=enable" in manifest["trtexec"]
    onnx = Path(out / "export" / "tensorrt" / "onnx" / "manifest.json")
    assert json.loads(onnx.read_text())["dtype"] == "float16"


def test_bench_command_measures_the_smollm2_folder_against_its_dense_source(smollm2_demo, tmp_path, capsys):
    from apt_sparse.cli import main

    out, _ = smollm2_demo
    folder = out / "pruned" / "apt"
    argv = ["bench", str(folder), "--quick", "--backends", "torch-dense", "--out", str(tmp_path / "bench")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    measured = {(r["model"], r["backend"]) for r in results["e2e"]["prefill"] if isinstance(r["result"], dict)}
    assert ("dense", "torch-dense") in measured  # the dense source named by the folder's report, loaded and timed
    assert results["not_measured"]["torch-sparse-cusparselt"] == "not selected (--backends)"
    assert "no CUDA GPU" in results["not_measured"]["torch-sparse-cusparselt GEMM"]
    shapes = {r["shape"] for r in results["gemm"]["records"]}
    assert {"model q_proj 576x576", "model down_proj 1536x576"} <= shapes  # SmolLM2's own shapes
    # the demo prunes without evaluating (it evaluates every method itself): the folder's report holds no accuracy
    assert json.loads((folder / "prune_report.json").read_text())["accuracy"] is None
    assert "run apt-sparse eval on it" in results["not_measured"]["accuracy"]
    assert (tmp_path / "bench" / "report.md").is_file() and f"report: {tmp_path / 'bench' / 'report.md'}" in printed


def test_bench_refuses_what_it_cannot_measure(tmp_path, capsys):
    from apt_sparse.cli import main

    from ..apt.tiny_models import save_tiny_model

    src = save_tiny_model("llama", tmp_path / "src")
    assert main(["bench", str(src), "--quick"]) == 2  # a dense folder without a report
    assert "pass --dense with the dense model" in capsys.readouterr().err
    assert main(["bench", str(src), "--dense", str(src), "--backends", "no-such-kernel"]) == 2
    assert "unknown backends ['no-such-kernel']" in capsys.readouterr().err
