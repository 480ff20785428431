import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from apt.errors import InvalidInputError
from apt.run import PruneJob, RunConfig, prune_model
from apt.solver import PruneConfig
from exporters import export
from exporters.tensorrt import Profile, parse_sparsity_log, tensorrt_unavailable_reason

from ..apt.tiny_models import save_tiny_model

FAST = dict(num_calibration_samples=4, max_seq_length=32, evaluate=False)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    folders = {}
    for family in ("llama", "bert", "mamba", "gpt2"):
        src = save_tiny_model(family, root / f"{family}-src")
        prune_model(PruneJob(model=str(src), out=str(root / family), **FAST))
        folders[family] = root / family
    return folders


def matmul_weights_24_along_axis0(path) -> tuple[int, int]:
    """An independent reading of the file: (2:4-along-K MatMul initializers, all 2-D MatMul initializers); a Gemm
    without transB (x @ B + bias) counts as a MatMul."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    good = total = 0
    for node in model.graph.node:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        plain = node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b)  # Gemm: GPT-2's Conv1D
        if plain and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            b = inits[node.input[1]].astype(np.float32)  # [K, N]
            total += 1
            if b.shape[0] % 4 == 0 and ((b.reshape(-1, 4, b.shape[1]) != 0).sum(axis=1) <= 2).all():
                good += 1
    return good, total


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_onnx_decoder_export(pruned, tmp_path, dtype):
    out = tmp_path / "onnx"
    # polygraphy, the independent reading of the file, once (it is opt-in: minutes on a real model)
    manifest = export("onnx", pruned["llama"], out, dtype=dtype, polygraphy=dtype == "float16")
    v = manifest["validation"]
    assert v["pruned_layers_found_in_pattern"] == 14 and v["eligible_initializers"] == 14
    good, total = matmul_weights_24_along_axis0(out / "model.onnx")
    assert good == 14 and total == 15  # every pruned Linear; the LM head stays dense
    if dtype == "float16":
        assert v["polygraphy"]["status"] == "ok" and v["polygraphy"]["agrees"]
        assert len(v["polygraphy"]["sparse"]) == 14
    else:
        assert v["polygraphy"]["status"].startswith("not requested")
    parity = v["onnxruntime"]
    assert parity["status"] == "ok" and parity["passed"]
    assert parity["max_abs_diff"] <= (1e-3 if dtype == "float32" else 5e-2)
    files = {f["path"] for f in manifest["files"]}
    assert {"model.onnx", "model.onnx.data", "config.json"} <= files
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_onnx_gpt2_conv1d_keeps_2_4_along_k(pruned, tmp_path):
    # Conv1D's [in, out] weight is the MatMul's B [K, N] as stored: the pruned axis is K
    manifest = export("onnx", pruned["gpt2"], tmp_path / "onnx", dtype="float32")
    v = manifest["validation"]
    assert v["pruned_layers_found_in_pattern"] == 8 and v["eligible_initializers"] == 8
    assert matmul_weights_24_along_axis0(tmp_path / "onnx" / "model.onnx")[0] == 8
    assert v["onnxruntime"]["passed"]


def test_onnx_with_past_decodes_like_pytorch(pruned, tmp_path):
    manifest = export("onnx", pruned["llama"], tmp_path / "onnx", with_past=True)
    parity = manifest["validation"]["onnxruntime"]
    assert parity["passed"] and parity["decode_step_max_abs_diff"] <= 1e-3
    assert manifest["inputs"][2] == "past_key_values.0.key" and manifest["outputs"][1] == "present.0.key"


def test_onnx_encoder_export(pruned, tmp_path):
    manifest = export("onnx", pruned["bert"], tmp_path / "onnx")
    assert manifest["outputs"] == ["last_hidden_state"]
    assert manifest["validation"]["pruned_layers_found_in_pattern"] == 12
    assert manifest["validation"]["onnxruntime"]["passed"]


def test_onnx_with_past_refused_for_a_model_without_kv_cache(pruned, tmp_path):
    with pytest.raises(InvalidInputError, match="with_past needs a decoder"):
        export("onnx", pruned["mamba"], tmp_path / "onnx", with_past=True)
    assert not (tmp_path / "onnx").exists()


def test_sparsity_log_parser_reads_tensorrts_lines():
    lines = [
        "[TRT] Total Activation Memory: 7864832",
        "(Sparsity) Layers eligible for sparse math: MatMul_51, MatMul_69, Gemm_725",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: MatMul_69",
    ]
    assert parse_sparsity_log(lines) == {
        "eligible": ["MatMul_51", "MatMul_69", "Gemm_725"],
        "sparse_tactics": ["MatMul_69"],
        "log_found": True,
    }
    assert parse_sparsity_log(["nothing"])["log_found"] is False


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present: see the gpu test")
def test_tensorrt_export_without_tensorrt_is_honest(pruned, tmp_path):
    out = tmp_path / "trt"
    manifest = export("tensorrt", pruned["llama"], out, profile=Profile(min=(1, 1), opt=(1, 64), max=(4, 256)))
    engine = manifest["validation"]["engine"]
    assert engine["status"].startswith("not built: ") and not (out / "model.plan").exists()
    command = manifest["trtexec"]
    assert "--sparsity=enable" in command and "--stronglyTyped" in command
    assert "--maxShapes=input_ids:4x256,attention_mask:4x256" in command
    assert (out / "onnx" / "model.onnx").is_file()
    assert json.loads((out / "onnx" / "manifest.json").read_text())["dtype"] == "float16"


@pytest.mark.gpu
@pytest.mark.skipif(
    tensorrt_unavailable_reason() is not None, reason=f"TensorRT engine build: {tensorrt_unavailable_reason()}"
)
def test_tensorrt_engine_build_reports_sparse_layers(pruned, tmp_path):
    manifest = export("tensorrt", pruned["llama"], tmp_path / "trt")
    engine = manifest["validation"]["engine"]
    assert engine["status"] == "built" and (tmp_path / "trt" / "model.plan").is_file()
    assert engine["log_found"] and engine["eligible"]


def test_profile_must_be_ordered():
    with pytest.raises(InvalidInputError, match="min <= opt <= max"):
        Profile(min=(1, 8), opt=(1, 4), max=(1, 16))


def test_bfloat16_onnx_parity_is_measured_only_where_a_provider_can_run_it(pruned, tmp_path):
    import onnxruntime

    manifest = export("onnx", pruned["llama"], tmp_path / "onnx", dtype="bfloat16")
    assert manifest["validation"]["pruned_layers_found_in_pattern"] == 14
    parity = manifest["validation"]["onnxruntime"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert parity["status"] == "ok" and parity["passed"]
    else:
        assert parity["status"].startswith("not measured: ONNX Runtime's CPU provider has no bfloat16 kernels")
        # and that is true: the CPU provider refuses the graph
        with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
            onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_a_graph_onnx_runtime_cannot_load_fails_the_export(tmp_path):
    from exporters.onnx_export import ort_session

    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(InvalidInputError, match="ONNX Runtime cannot load the exported float32 graph"):
        ort_session(broken, "float32")


def test_a_4_8_model_exports_with_4_8_initializers(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    prune_model(
        PruneJob(model=str(src), out=str(tmp_path / "p48"), run=RunConfig(solver=PruneConfig(pattern="4:8")), **FAST)
    )
    manifest = export("onnx", tmp_path / "p48", tmp_path / "onnx")
    assert manifest["pattern_check"]["pattern"] == "4:8"
    assert manifest["validation"]["pruned_layers_found_in_pattern"] == 14
    good_2_4, _ = matmul_weights_24_along_axis0(tmp_path / "onnx" / "model.onnx")
    assert good_2_4 == 0  # the check above is for 4:8, not 2:4


def test_parity_bounds_are_absolute_in_fp32_and_scale_with_the_output_in_fp16():
    from exporters.onnx_export import parity_verdict

    reference = np.array([[[40.0, 1.0, -3.0], [0.5, 2.0, 1.0]]], dtype=np.float32)
    off = reference + np.array([[[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=np.float32)
    fp16 = parity_verdict(off, reference, "float16", causal=True)
    assert fp16["tolerance"] == pytest.approx(0.8) and fp16["passed"] and fp16["top1_agreement"] == 1.0
    assert not parity_verdict(off, reference, "float32", causal=True)["passed"]  # 0.3 > 1e-3
    flipped = reference.copy()
    flipped[0, 1] = [0.5, 1.6, 1.7]  # within 0.8 everywhere, but the top-1 token changes at one of two positions
    verdict = parity_verdict(flipped, reference, "float16", causal=True)
    assert verdict["max_abs_diff"] <= verdict["tolerance"] and verdict["top1_agreement"] == 0.5
    assert not verdict["passed"]
    # where fp16 itself moves PyTorch's output by more (a deep or damaged model), the bound is twice that
    noisy = parity_verdict(off + 1.0, reference, "float16", causal=True, rounding=0.7)
    assert noisy["tolerance"] == pytest.approx(1.4) and noisy["passed"]
    assert not parity_verdict(off + 1.0, reference, "float16", causal=True, rounding=0.6)["passed"]  # 1.3 > 1.2
    assert parity_verdict(off, reference, "float16", causal=True, rounding=0.1)["tolerance"] == pytest.approx(0.8)


def test_fp16_export_stores_positive_zeros_for_weights_that_underflow(pruned, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tiny-weight"
    folder.mkdir()
    for f in pruned["llama"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    weight = tensors["model.layers.0.mlp.up_proj.weight"]
    row, col = (weight != 0).nonzero()[0].tolist()
    weight[row, col] = -1e-9  # kept, but below fp16's smallest subnormal: casting gives -0.0
    save_file(tensors, str(folder / "model.safetensors"))
    manifest = export("onnx", folder, tmp_path / "onnx", dtype="float16")
    assert manifest["validation"]["pruned_layers_found_in_pattern"] == 14
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    halves = [
        numpy_helper.to_array(i).reshape(-1).view(np.uint16)
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT16
    ]
    assert halves and not any((h == 0x8000).any() for h in halves)  # 0x8000 is fp16's -0.0


def test_float32_reference_leaves_the_fp16_model_as_it_was(pruned):
    import torch
    import transformers

    from exporters.onnx_export import in_float32

    model = transformers.AutoModelForCausalLM.from_pretrained(pruned["llama"], dtype=torch.float16).eval()
    ids = torch.arange(3, 19).reshape(1, -1)
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        before = model(ids).logits
        with in_float32(model):
            exact = model(ids).logits
        after = model(ids).logits
    assert exact.dtype == torch.float32 and before.dtype == torch.float16
    assert torch.equal(before, after) and not torch.equal(before.float(), exact)
    assert dtypes == {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
