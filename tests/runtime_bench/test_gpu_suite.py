"""The GPU suite, run here as a smoke test on the CPU (tiny shapes, our kernels under Triton's interpreter,
eager host timing): it writes every file, with the structure the GPU run writes, and its dispatch file is
what the sparse op loads. The speed figures themselves only come from a GPU."""

import json

import pytest
import torch

from runtime_bench.gpu_suite import main
from serving.sparse_op import MEMORY_FIRST, SPEED_FIRST, load_dispatches
from tests.serving.interpreter import interpreter_fixes, needs_kernels  # noqa: F401


@needs_kernels
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite itself runs: this is its CPU smoke run")
def test_the_suite_writes_its_results_dispatch_report_and_headline(tmp_path, capsys, interpreter_fixes):  # noqa: F811
    main(["--cpu-smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["errors"], results["errors"]
    bf16 = {f"tiny {layer} float16" for layer in ("q/o", "k/v", "up", "down")}
    assert set(results["gemm"]) == bf16 | {"tiny up float8_e4m3fn"}
    up = results["gemm"]["tiny up float16"]
    assert [row["m"] for row in up["rows"]] == [1, 3, 16, 80]
    assert all(err < 2e-3 for row in up["rows"] for err in row["error"].values())
    fp8 = results["gemm"]["tiny up float8_e4m3fn"]  # against the W8A8 product, bf16 outputs
    assert all(err < 1e-2 for row in fp8["rows"] for err in row["error"].values())
    assert set(results["dispatch"]["fp8_shapes"]) == {"64x96"}
    for mode in (SPEED_FIRST, MEMORY_FIRST):
        loaded = load_dispatches(tmp_path / "dispatch.json", mode)
        assert set(loaded) == {"64x64", "64x32", "64x96", "96x64"}
    e2e = results["e2e"]["tiny"]
    assert "error" not in e2e
    modes = ("dense", "fp8 dense", SPEED_FIRST, MEMORY_FIRST, f"fp8 {SPEED_FIRST}", f"fp8 {MEMORY_FIRST}")
    assert {(r["mode"], r["kind"]) for r in e2e["rows"]} == {(m, k) for m in modes for k in ("prefill", "decode")}
    assert e2e["logits_error"][SPEED_FIRST] < 1e-2 and e2e["logits_error"][MEMORY_FIRST] < 1e-2
    assert e2e["logits_error"][f"fp8 {SPEED_FIRST}"] < 0.1  # FP8's own rounding, against the bf16 model
    # every mode serves the shapes the run measured with their measured dispatch (FP8 modes: the FP8 one)
    for mode in (SPEED_FIRST, MEMORY_FIRST):
        assert [origin.split()[0] for origin in e2e["dispatch_origins"][mode]] == ["measured"], mode
    for mode in (f"fp8 {SPEED_FIRST}", f"fp8 {MEMORY_FIRST}"):  # only the up projection was measured in FP8
        assert any(origin.startswith("measured") for origin in e2e["dispatch_origins"][mode]), mode
    memory = e2e["weight_bytes"][MEMORY_FIRST]["block_linears"] / e2e["weight_bytes"]["dense"]["block_linears"]
    assert memory == 0.5625
    runs = results["commands"]  # prune and bench as a user runs them (here on the CPU, a random tiny Llama)
    assert runs["prune"]["exit_code"] == 0 and runs["bench"]["exit_code"] == 0, runs
    prune = runs["prune"]["command"]
    assert prune.startswith("apt-sparse prune --model") and "--device cpu" in prune
    assert "random weights" in runs["model"]
    claims = [h["claim"] for h in results["headline"]]
    assert "decode M=1, 8B MLP" in claims and "FP8 2:4 M>=512, 8B MLP, over dense FP8" in claims
    worst_error = next(h for h in results["headline"] if h["claim"].startswith("worst path error"))
    assert worst_error["met"], worst_error
    assert "not measured" in printed  # the 8B targets cannot be measured on tiny CPU shapes, and say so
    assert (tmp_path / "report.md").read_text().startswith("# GPU suite: CPU (Triton interpreter)")
    assert (tmp_path / "gemm.png").is_file() and (tmp_path / "e2e_tiny.png").is_file()
