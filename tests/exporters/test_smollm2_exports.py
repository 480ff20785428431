"""Every exporter on the real pruned SmolLM2-135M (30 blocks × 7 pruned layers, tied LM head)."""

import json

import pytest
import torch

from exporters import export
from exporters.compressed_tensors import read_bitmask_folder
from exporters.tensorrt import tensorrt_unavailable_reason

pytestmark = pytest.mark.slow


def test_vllm_and_compressed_tensors_on_smollm2(pruned_smollm2, tmp_path):
    src, _ = pruned_smollm2
    vllm = export("vllm", src, tmp_path / "vllm", dtype="bfloat16")
    assert len(vllm["pattern_check"]["layers"]) == 210 and vllm["validation"]["no_sparsity_config"]
    ct = export("compressed-tensors", src, tmp_path / "ct", dtype="bfloat16")
    assert ct["validation"]["round_trip_bit_exact"]
    size = ct["size"]
    # 2:4 halves the values of 210 layers and adds a 1/16 bitmask; embeddings stay dense
    assert 0.5 < size["bytes_on_disk"] / size["dense_bytes_same_dtype"] < 0.8
    decoded = read_bitmask_folder(tmp_path / "ct")
    from safetensors.torch import load_file

    plain = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert decoded.keys() == plain.keys()
    assert all(torch.equal(decoded[k], plain[k]) for k in plain)
    print(json.dumps({"vllm_bytes": sum(f["bytes"] for f in vllm["files"]), "compressed_tensors": size}))


def test_onnx_and_tensorrt_on_smollm2(pruned_smollm2, tmp_path):
    src, _ = pruned_smollm2
    onnx_manifest = export("onnx", src, tmp_path / "onnx", dtype="float32")
    v = onnx_manifest["validation"]
    assert v["pruned_layers_found_2_4"] == 210 and v["eligible_initializers"] == 210
    assert v["polygraphy"]["agrees"]
    assert v["onnxruntime"]["passed"] and v["onnxruntime"]["max_abs_diff"] <= 1e-3
    print(json.dumps({"onnx_bytes": sum(f["bytes"] for f in onnx_manifest["files"]), "parity": v["onnxruntime"]}))
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is present: the gpu test builds the engine")
    trt = export("tensorrt", src, tmp_path / "trt")
    assert trt["validation"]["engine"]["status"].startswith("not built")
    assert trt["validation"]["onnx_eligible_initializers"] == 210
    assert trt["validation"]["onnxruntime"]["passed"]
    print(json.dumps({"tensorrt_onnx_fp16_parity": trt["validation"]["onnxruntime"]}))
