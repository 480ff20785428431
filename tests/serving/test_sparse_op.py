"""``apt_sparse::linear24``: every path computes the layer's product, the dispatch picks the path by token count,
the memory modes keep what they promise, and torch.compile / CUDA graphs see one op."""

import json

import pytest
import torch
import torch.nn.functional as F

from serving import sparse_op, triton24
from serving.sparse_op import (
    MEMORY_FIRST,
    SPEED_FIRST,
    Band,
    Dispatch,
    Sparse24Linear,
    from_threshold,
    load_dispatches,
    memory_first_default,
    quantize_tokens,
)
from serving.triton24 import KernelConfig

from .interpreter import DEVICE, interpreter_fixes, needs_kernels, relative_error, sparse_weight  # noqa: F401

GEMV = KernelConfig("gemv", 4, 16, 16, split_k=2)
MMA = KernelConfig("mma", 16, 32, 32)
DECODE = KernelConfig("decode", 64, 16, 32, num_warps=2)
EVERY_PATH = Dispatch(
    (Band(1, "apt-gemv", GEMV), Band(5, "apt-mma", MMA), Band(40, "dense"), Band(50, "apt-decode", DECODE),
     Band(90, "apt-unpack"))
)  # fmt: skip


def _layer(mode, dispatch=None, dtype=torch.float16, n=48, k=160):
    weight = sparse_weight(n, k, dtype).to(DEVICE)
    bias = torch.randn(n).to(dtype).to(DEVICE)
    return weight, bias, Sparse24Linear(weight, bias, mode, dispatch).to(DEVICE)


def test_dispatch_picks_the_band_of_the_token_count():
    assert [EVERY_PATH.band_for(m).path for m in (1, 4, 5, 39, 40, 49, 50, 89, 90, 10**6)] == [
        "apt-gemv",
        "apt-gemv",
        "apt-mma",
        "apt-mma",
        "dense",
        "dense",
        "apt-decode",
        "apt-decode",
        "apt-unpack",
        "apt-unpack",
    ]
    assert EVERY_PATH.describe() == (
        "M 1-4: apt-gemv; M 5-39: apt-mma; M 40-49: dense; M 50-89: apt-decode; M 90+: apt-unpack"
    )


def test_dispatch_round_trips_through_the_plan_and_json():
    assert sparse_op._decoded(tuple(EVERY_PATH.encode()))[1][1:3] == ("apt-mma", MMA)
    assert Dispatch.from_dict(json.loads(json.dumps(EVERY_PATH.as_dict()))) == EVERY_PATH
    assert from_threshold(256).describe() == "M 1-255: dense; M 256+: cusparselt"
    assert from_threshold(None).describe() == "M 1+: dense"


def test_bad_dispatches_are_refused():
    with pytest.raises(ValueError, match="start at 1 and rise"):
        Dispatch((Band(2, "dense"),))
    with pytest.raises(ValueError, match="must end by 4 tokens"):
        Dispatch((Band(1, "apt-gemv", GEMV), Band(9, "dense")))
    with pytest.raises(ValueError, match="needs a gemv KernelConfig"):
        Band(1, "apt-gemv", MMA)
    with pytest.raises(ValueError, match="memory-first keeps only our compressed layout"):
        from_threshold(64).check_mode(MEMORY_FIRST)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_path_gives_the_layers_product(dtype, interpreter_fixes):  # noqa: F811
    weight, bias, layer = _layer(SPEED_FIRST, EVERY_PATH, dtype)
    for tokens, path in ((1, "apt-gemv"), (3, "apt-gemv"), (17, "apt-mma"), (45, "dense"), (61, "apt-decode"),
                         (96, "apt-unpack")):  # fmt: skip
        assert layer.path_for(tokens) == path
        x = torch.randn(1, tokens, weight.shape[1]).to(dtype).to(DEVICE)
        out = layer(x)
        assert out.shape == (1, tokens, weight.shape[0]) and out.dtype == dtype
        reference = F.linear(x.double(), weight.double(), bias.double())
        assert relative_error(out, reference) < (2e-3 if dtype == torch.float16 else 1e-2), path


@needs_kernels
def test_memory_first_keeps_only_our_layout_and_still_computes_the_product():
    weight, bias, layer = _layer(MEMORY_FIRST)
    assert layer.dense is None and layer.compressed is None
    assert layer.weight_bytes() / weight.nbytes == 0.5625  # the bound is 0.57
    for tokens in (1, 8, 9, 300):
        x = torch.randn(tokens, weight.shape[1]).half().to(DEVICE)
        assert relative_error(layer(x), F.linear(x.double(), weight.double(), bias.double())) < 2e-3


def test_memory_first_default_sizes_the_gemv_by_tokens_and_never_names_the_unchecked_decode_kernel():
    """A one-token call gets the one-token launch (not the eight-token one's select work); ``apt-decode`` is for
    dispatches the GPU suite measured, after checking it against the reference on the device."""
    default = memory_first_default(4096, 4096)
    assert [(b.start, b.path, b.config.block_m if b.config else None) for b in default.bands] == [
        (1, "apt-gemv", 1), (2, "apt-gemv", 2), (3, "apt-gemv", 4), (5, "apt-gemv", 8), (9, "apt-mma", 64),
        (256, "apt-unpack", None),
    ]  # fmt: skip
    assert "apt-decode" not in default.paths


def test_speed_first_without_a_measurement_is_dense_everywhere_and_keeps_both_copies():
    weight, bias, layer = _layer(SPEED_FIRST)
    assert [layer.path_for(m) for m in (1, 64, 4096)] == ["dense"] * 3
    assert layer.weight_bytes() / weight.nbytes == 1.5625
    x = torch.randn(2, 3, weight.shape[1]).half().to(DEVICE)
    assert torch.equal(layer(x), F.linear(x, weight, bias))


def test_without_our_kernels_the_apt_paths_compute_through_the_unpacked_weight(monkeypatch):
    """vLLM's CPU build and plain CPUs: no Triton, the same product through PyTorch."""
    monkeypatch.setattr(triton24, "available", lambda device, dtype=None: (False, "no triton in this test"))
    weight, bias, layer = _layer(MEMORY_FIRST, memory_first_default(48, 160))
    x = torch.randn(5, weight.shape[1]).half().to(DEVICE)
    assert torch.equal(layer(x), F.linear(x, weight, bias))


def test_a_cusparselt_band_falls_back_to_dense_where_cusparselt_cannot_run():
    if DEVICE == "cuda":
        pytest.skip("on a GPU the cuSPARSELt band runs (test_graphs_and_cusparselt_on_gpu)")
    weight, bias, layer = _layer(SPEED_FIRST, from_threshold(1))
    assert layer.compressed is None and layer.path_for(100) == "dense"
    x = torch.randn(100, weight.shape[1]).half()
    assert torch.equal(layer(x), F.linear(x, weight, bias))


@needs_kernels
def test_torch_compile_and_opcheck_see_one_op():
    weight, bias, layer = _layer(SPEED_FIRST, EVERY_PATH)
    x = torch.randn(2, 3, weight.shape[1]).half().to(DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
    args = (x, layer.values, layer.codes, layer.dense, layer.compressed, layer.bias, layer.weight_scale, layer.plan)
    torch.library.opcheck(torch.ops.apt_sparse.linear24.default, args, test_utils=("test_schema", "test_faketensor"))


def _fp8_layer(mode, dispatch, n=48, k=160):
    """A 2:4 weight quantized per output channel to e4m3 (the scale and rounding of ``issue 26``)."""
    weight = sparse_weight(n, k, torch.float32)
    scale = weight.abs().amax(1) / 448
    quantized = (weight / scale[:, None]).to(torch.float8_e4m3fn)
    bias = torch.randn(n).to(torch.bfloat16)
    return quantized, scale, bias, Sparse24Linear(quantized, bias, mode, dispatch, weight_scale=scale).to(DEVICE)


def test_tokens_are_quantized_per_token_as_vllm_does():
    x = torch.tensor([[1.0, -896.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    x_q, scale = quantize_tokens(x)
    floor = torch.tensor(1.0 / (448 * 512), dtype=torch.float32)  # vLLM's floor, for an all-zero token
    assert torch.equal(scale, torch.stack([torch.tensor(2.0), floor]))  # amax / 448
    assert x_q.float().tolist() == [[0.5, -448.0, 1.5, 0.25], [0.0, 0.0, 0.0, 0.0]]


@needs_kernels
@pytest.mark.parametrize("mode", [SPEED_FIRST, MEMORY_FIRST])
def test_fp8_every_path_gives_the_w8a8_product(mode, interpreter_fixes):  # noqa: F811
    bands = EVERY_PATH if mode == SPEED_FIRST else memory_first_default(48, 160)
    weight, scale, bias, layer = _fp8_layer(mode, bands)
    for tokens in (1, 3, 17, 45, 300):
        x = torch.randn(tokens, 160).to(torch.bfloat16).to(DEVICE)
        x_q, scale_x = quantize_tokens(x)
        reference = (x_q.double() * scale_x[:, None].double()) @ (weight.double() * scale[:, None].double()).T
        out = layer(x)
        assert out.dtype == torch.bfloat16 and out.shape == (tokens, 48)
        assert relative_error(out, reference + bias.double()) < 1e-2, layer.path_for(tokens)


def test_an_fp8_layer_refuses_a_dispatch_whose_mma_tile_cannot_compile_for_fp8():
    """A dispatch file naming an FP8 mma launch with block_g 16 (Triton's FP8 dot needs K >= 32) is refused when
    the layer is built, not when serving crashes on its first call."""
    bad = Dispatch((Band(1, "apt-mma", KernelConfig("mma", 16, 32, 16)),))
    with pytest.raises(ValueError, match="band from 1 tokens cannot serve this torch.float8_e4m3fn layer"):
        _fp8_layer(MEMORY_FIRST, bad)
    _layer(MEMORY_FIRST, bad)  # a bf16/fp16 layer compiles it


def test_fp8_on_a_gpu_before_sm89_is_served_w8a16(monkeypatch):
    """No FP8 tensor cores, Triton float8 or ``torch._scaled_mm`` before sm89: every band of an FP8 layer then
    multiplies the dequantised weight with the unquantised inputs (what vLLM does on Ampere), and says so."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "served W8A16" in sparse_op.fp8_fallback("cuda") and sparse_op.fp8_fallback("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert sparse_op.fp8_fallback("cuda") is None
    weight, scale, bias, layer = _fp8_layer(MEMORY_FIRST, None)
    monkeypatch.setattr(sparse_op, "fp8_fallback", lambda device: "sm80 in this test")
    x = torch.randn(3, 160).to(torch.bfloat16).to(DEVICE)
    dequantised = (weight.float() * scale[:, None]).to(torch.bfloat16)
    assert layer.path_for(1) == "fp8-w8a16"
    assert torch.equal(layer(x), F.linear(x, dequantised.to(DEVICE), bias.to(DEVICE)))


def test_fp8_layers_keep_what_they_promise_and_refuse_a_missing_scale():
    weight, scale, bias, layer = _fp8_layer(MEMORY_FIRST, None)
    # half the values (1 byte each) and a 1-bit code per weight: 0.625 of the FP8 weight, plus its scales
    assert layer.weight_bytes() - layer.weight_scale.nbytes == 0.625 * weight.nbytes
    with pytest.raises(ValueError, match="needs its per-output-channel weight_scale"):
        Sparse24Linear(weight, None, MEMORY_FIRST)
    with pytest.raises(ValueError, match="only it takes one"):
        Sparse24Linear(weight.float(), None, MEMORY_FIRST, weight_scale=scale)


def test_dispatch_files_load_per_shape_and_damaged_ones_are_refused(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"shapes": {"160x48": {SPEED_FIRST: EVERY_PATH.as_dict()}}}))
    assert load_dispatches(path, SPEED_FIRST) == {"160x48": EVERY_PATH}
    assert load_dispatches(path, MEMORY_FIRST) == {}
    path.write_text(json.dumps({"shapes": {"160x48": {SPEED_FIRST: {"bands": [{"start": 3, "path": "dense"}]}}}}))
    with pytest.raises(ValueError, match="is not a dispatch file .*run runtime_bench.gpu_suite again"):
        load_dispatches(path, SPEED_FIRST)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_and_cusparselt_on_gpu():
    """Replayed CUDA graphs give the eager outputs on a new input, on every path, cuSPARSELt included."""
    from serving.kernels import cusparselt

    bands = EVERY_PATH.bands[:3] + ((Band(64, "cusparselt"),) if cusparselt().available else EVERY_PATH.bands[3:])
    weight, bias, layer = _layer(SPEED_FIRST, Dispatch(bands), torch.float16, n=256, k=512)
    for tokens in (1, 3, 17, 45, 128):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        static = x.clone()
        layer(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static)
        fresh = torch.randn_like(x)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        reference = F.linear(fresh.double(), weight.double(), bias.double())
        assert relative_error(out, reference) < 2e-3, layer.path_for(tokens)
        torch.testing.assert_close(out, layer(fresh), atol=1e-2, rtol=1e-2)  # replay = eager


@needs_kernels
def test_the_fused_quantization_kernel_is_bit_identical_to_pytorch(interpreter_fixes):  # noqa: F811
    from serving.sparse_op import FP8_MAX, FP8_MIN_SCALE
    from serving.triton24 import quantize_tokens as fused

    x = (torch.randn(7, 1500) * torch.logspace(-3, 3, 7)[:, None]).to(torch.bfloat16).to(DEVICE)
    x[3] = 0.0
    q, scale = fused(x, FP8_MAX, FP8_MIN_SCALE)
    q_ref, scale_ref = quantize_tokens(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
