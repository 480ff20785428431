"""An FP8 folder exported for vLLM keeps its FP8: the float8 weights and their scales bit for bit, its
compressed-tensors config, the side file saying ``fp8``; vLLM serves the export through the plugin with the
greedy tokens of our FP8 emulation. (The formats that cannot carry FP8 refuse it: tests/apt/folder.)"""

import json

import pytest
import torch

from apt.models.checkpoint import CheckpointReader
from apt.run import PruneJob, prune_model
from apt.run.quantize import QuantizeConfig, quantize_folder
from exporters import export
from serving.vllm_run import vllm_python

from ..apt.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """A tiny pruned llama in FP8 whose attention vLLM's CPU build runs (head_dim 32)."""
    root = tmp_path_factory.mktemp("fp8-export")
    src = save_tiny_model("llama", root / "src", head_dim=32, initializer_range=0.25)
    job = PruneJob(model=str(src), out=str(root / "pruned"), num_calibration_samples=4, max_seq_length=32)
    prune_model(job)
    quantize_folder(root / "pruned", root / "fp8", config=QuantizeConfig(evaluate=False))
    return root / "fp8"


def test_the_vllm_export_of_an_fp8_folder_carries_fp8_bit_for_bit(fp8_folder, tmp_path):
    out = tmp_path / "vllm"
    manifest = export("vllm", fp8_folder, out, dtype="float16", max_shard_size="300KB", vllm_check=False)
    source, written = CheckpointReader(fp8_folder), CheckpointReader(out)
    assert written.fp8 == source.fp8 and len(written.fp8) == 14
    for name in source.names():
        stored = written.read_stored(name)
        if name in source.fp8 or name.endswith(".weight_scale"):  # as stored: float8 weights, float32 scales
            expected = source.read_stored(name)
            assert stored.dtype == expected.dtype and torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))
        else:
            assert stored.dtype == torch.float16 and torch.equal(stored, source.read(name).to(torch.float16))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8_folder / "config.json").read_text())["quantization_config"]
    side = json.loads((out / "apt_sparse_24.json").read_text())
    assert side["format"] == "fp8" and len(side["targets"]) == 14
    assert manifest["fp8"]["weights_in_fp8"] == 14 and "bit for bit" in manifest["fp8"]["carried"]
    assert manifest["validation"]["tensors_match_source"] == len(source.names())
    assert manifest["validation"]["pruned_tensors_in_pattern"] == 14


@pytest.mark.skipif(vllm_python() is None, reason="no environment with vLLM: make install builds .venv-vllm")
def test_vllm_serves_the_fp8_export_with_the_tokens_of_the_emulation(fp8_folder, tmp_path):
    manifest = export("vllm", fp8_folder, tmp_path / "vllm", dtype="float16", vllm_check=True)
    loaded = manifest["validation"]["vllm_loaded"]
    assert loaded["status"] == "ok" and loaded["quantization"] == "apt_sparse_24"
    assert loaded["layers_served_by_plugin"] == 14  # every 2:4 FP8 layer, through vLLM's FP8 method
    assert loaded["greedy_tokens_equal_transformers"].startswith("2 prompts")
