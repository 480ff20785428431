"""Our 2:4 kernels against the dense product of the decompressed weight: on odd shapes, both half dtypes and
FP8, with and without split-K and bias. Here they run under Triton's interpreter (the Gluon decode kernel
through ``serving.gluon_interpreted``: the same source, layouts dropped); on a GPU, compiled."""

import pytest
import torch

from serving.layout import pack_24, unpack_24
from serving.sparse_op import quantize_tokens
from serving.triton24 import KernelConfig, candidates, default_config, launches, linear24, unpack24

from .interpreter import DEVICE, interpreter_fixes, needs_kernels, relative_error, sparse_weight  # noqa: F401

# Accumulated in float32 from half-precision operands: the output's own rounding dominates.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}

CASES = [
    # (M, N, K, launch): odd N and K, K not a multiple of a tile, M below and across the tile
    (1, 40, 100, KernelConfig("gemv", 1, 16, 16)),
    (1, 40, 100, KernelConfig("gemv", 1, 16, 16, wide_codes=True)),
    (3, 70, 264, KernelConfig("gemv", 4, 32, 16, split_k=2)),
    (8, 33, 516, KernelConfig("gemv", 8, 16, 32, split_k=4, wide_codes=True)),
    (5, 96, 4100, KernelConfig("gemv", 8, 64, 64, split_k=8)),
    (1, 24, 40, KernelConfig("mma", 16, 16, 16)),
    (20, 50, 200, KernelConfig("mma", 16, 32, 16, wide_codes=True)),
    (37, 64, 520, KernelConfig("mma", 32, 32, 16, split_k=4)),
    (130, 72, 136, KernelConfig("mma", 64, 64, 32, split_k=2, wide_codes=True)),
    # decode: a K tail inside a warp's step, warps with no step at all, token tiles partly and wholly used
    (1, 40, 100, KernelConfig("decode", 8, 16, 32, num_warps=2)),
    (3, 70, 264, KernelConfig("decode", 8, 16, 32, num_warps=4)),
    (9, 33, 516, KernelConfig("decode", 16, 16, 32, num_warps=1)),
    (40, 96, 1040, KernelConfig("decode", 64, 16, 32, num_warps=8)),
    (70, 24, 4100, KernelConfig("decode", 32, 16, 32, num_warps=8)),  # 70 tokens: three token tiles
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[3].kernel}-M{c[0]}-N{c[1]}-K{c[2]}-s{c[3].split_k}-w{int(c[3].wide_codes)}"
)
def test_kernel_matches_the_dense_product_of_the_decompressed_weight(case, dtype, interpreter_fixes):  # noqa: F811
    m, n, k, config = case
    w = sparse_weight(n, k, dtype, seed=m + n + k).to(DEVICE)
    packed = pack_24(w)
    assert torch.equal(unpack_24(packed), w)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    reference = x.double() @ w.double().T + bias.double()
    out = linear24(x, packed.values, packed.codes, bias, config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert bool(torch.isfinite(out).all())
    assert relative_error(out, reference) < TOLERANCE[dtype]
    no_bias = linear24(x, packed.values, packed.codes, None, config)
    assert relative_error(no_bias, reference - bias.double()) < TOLERANCE[dtype]


@needs_kernels
def test_float32_is_exact_to_float32_rounding():
    w = sparse_weight(48, 200, torch.float32).to(DEVICE)
    x = torch.randn(3, 200).to(DEVICE)
    packed = pack_24(w)
    for config in (KernelConfig("gemv", 4, 16, 16, split_k=2), KernelConfig("mma", 16, 16, 16)):
        out = linear24(x, packed.values, packed.codes, None, config)
        assert relative_error(out, x.double() @ w.double().T) < TOLERANCE[torch.float32]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpack_kernel_gives_back_the_exact_weight(dtype):
    w = sparse_weight(45, 292, dtype).to(DEVICE)
    packed = pack_24(w)
    assert torch.equal(unpack24(packed.values, packed.codes, block_n=16, block_g=16), w)


@needs_kernels
def test_every_output_is_written():
    """The output is poisoned first: a tile the grid missed would leave NaN."""
    w = sparse_weight(100, 128).to(DEVICE)
    packed = pack_24(w)
    x = torch.randn(6, 128).half().to(DEVICE)
    for config in (KernelConfig("gemv", 8, 32, 16, split_k=4), KernelConfig("mma", 16, 64, 16, split_k=2)):
        torch.cuda.empty_cache() if DEVICE == "cuda" else None
        out = linear24(x, packed.values, packed.codes, None, config)
        assert bool(torch.isfinite(out).all())
        assert relative_error(out, x.double() @ w.double().T) < TOLERANCE[torch.float16]


@needs_kernels
@pytest.mark.parametrize("kernel", ["decode", "gemv", "mma"])
def test_fp8_kernels_give_the_w8a8_product(kernel, interpreter_fixes):  # noqa: F811
    """FP8 weights and per-token FP8 inputs: ``(x_q · W_qᵀ) · scale_x ⊗ scale_w + bias``, as vLLM computes it."""
    n, k = 40, 264
    w = sparse_weight(n, k, torch.float32, seed=3)
    scale_w = w.abs().amax(1) / 448
    w_q = (w / scale_w[:, None]).to(torch.float8_e4m3fn)
    packed = pack_24(w_q)
    for m in (1, 5, 20):
        x = torch.randn(m, k).to(torch.bfloat16)
        x_q, scale_x = quantize_tokens(x)
        bias = torch.randn(n).to(torch.bfloat16)
        config = default_config(kernel, m, n, k) if kernel != "gemv" or m <= 8 else None
        if config is None:
            continue
        out = linear24(x_q.to(DEVICE), packed.values.to(DEVICE), packed.codes.to(DEVICE), bias.to(DEVICE), config,
                       scale_x.to(DEVICE), scale_w.to(DEVICE), torch.bfloat16)  # fmt: skip
        reference = (x_q.double() @ w_q.double().T) * scale_x.double()[:, None] * scale_w.double()[None, :]
        assert out.dtype == torch.bfloat16 and relative_error(out, reference + bias.double()) < 1e-2


def test_decode_is_one_launch_at_every_shape_and_split_k_adds_a_reduction():
    """q/o at M = 1 (4096 × 4096) in one launch; a split-K gemv needs its second, ``reduce``."""
    x, w = torch.empty(1, 4096, dtype=torch.float16), sparse_weight(64, 4096)
    packed, out = pack_24(w), torch.empty(1, 64, dtype=torch.float16)
    decode = default_config("decode", 1, 4096, 4096)
    assert [launch.kernel for launch in launches(x, packed.values, packed.codes, out, None, None, decode)] == ["decode"]
    gemv = default_config("gemv", 1, 4096, 4096)
    partials = torch.empty(gemv.split_k, 1, 64)
    found = [launch.kernel for launch in launches(x, packed.values, packed.codes, out, partials, None, gemv)]
    assert gemv.split_k > 1 and found == ["gemv", "reduce"]


def test_row_strides_reach_the_kernels_as_whole_vectors():
    """K = 11008 (a 344-word code row): each stride is passed divided by the largest vector that divides it, and
    that vector as a constexpr, so the compiler keeps 16-byte loads (it compiled scalar loads before)."""
    x, w = torch.empty(1, 11008, dtype=torch.float16), sparse_weight(8, 11008)
    packed, out = pack_24(w), torch.empty(1, 8, dtype=torch.float16)
    (launch,) = launches(x, packed.values, packed.codes, out, None, None, KernelConfig("gemv", 1, 32, 64))
    meta = launch.constexprs
    assert (meta["VEC_X"], meta["VEC_V"], meta["VEC_P"], meta["VEC_C"]) == (8, 8, 8, 4)  # 344 = 4 · 86
    assert launch.args[10:14] == (11008 // 8, 8 * 2752 // 8, 2752 // 8, 344 // 4)


def test_fp8_refuses_the_mma_tiles_triton_cannot_compile():
    """Triton's FP8 dot needs K >= 32 a tile: such launches are never candidates, and refused when asked for."""
    fp8 = candidates("mma", 256, 4096, 4096, dtype=torch.float8_e4m3fn)
    assert fp8 and all(c.block_g >= 32 and c.block_n <= 64 for c in fp8)  # 128-row FP8 tiles spill on sm90
    assert any(c.block_g == 16 for c in candidates("mma", 64, 4096, 4096, dtype=torch.float16))
    w_q = sparse_weight(16, 64, torch.float32).to(torch.float8_e4m3fn)
    packed = pack_24(w_q)
    x_q, scale_x = quantize_tokens(torch.randn(16, 64))
    with pytest.raises(ValueError, match="FP8 mma tile needs block_g >= 32"):
        config = KernelConfig("mma", 16, 16, 16)
        linear24(x_q.to(DEVICE), packed.values.to(DEVICE), packed.codes.to(DEVICE), None, config, scale_x.to(DEVICE),
                 torch.ones(16).to(DEVICE), torch.bfloat16)  # fmt: skip


def test_a_layout_without_unit_stride_along_k_is_refused():
    w = sparse_weight(16, 128)
    packed = pack_24(w)
    strided = packed.values.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="unit stride along K/4"):
        linear24(torch.randn(1, 128).half().to(DEVICE), strided.to(DEVICE), packed.codes.to(DEVICE), None,
                 KernelConfig("gemv", 1, 16, 16))  # fmt: skip


def test_launch_choices_are_valid_for_the_shapes_that_matter():
    """The default and every candidate launch of each kernel is well formed at the Llama shapes and every M
    the suite measures (a bad one would only show on the GPU)."""
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (28672, 8192), (8192, 28672)):
        for m in (1, 2, 3, 4, 8):
            gemv = candidates("gemv", m, n, k)
            assert gemv[0] == default_config("gemv", m, n, k) and all(c.block_m >= m for c in gemv)
            assert all(c.block_m * c.block_n * c.block_g <= 8192 for c in gemv)
        for m in (16, 64, 256, 4096, 16384):
            mma = candidates("mma", m, n, k)
            assert all(c.kernel == "mma" and k // 4 // c.split_k >= c.block_g for c in mma)
            # what spilled in the sm80/sm90 compiles (serving.aot): per-group code loads, 128 × 128 on 4 warps
            assert all(c.wide_codes and (c.block_m * c.block_n < 128 * 128 or c.num_warps == 8) for c in mma)
        for m in (1, 8, 9, 33, 64):
            decode = candidates("decode", m, n, k)
            assert decode[0] == default_config("decode", m, n, k) and all(c.block_m >= m for c in decode)
            assert all(k // 4 // (32 * c.num_warps) >= 2 for c in decode)  # every warp at least two steps


def test_a_launch_round_trips_through_the_ops_plan():
    for config in (KernelConfig("gemv", 4, 32, 64, 8, 4, 4, True), KernelConfig("mma", 64, 128, 32, 1, 8, 3, False)):
        assert KernelConfig.from_list(config.as_list()) == config and len(config.as_list()) == 7


def test_a_bad_launch_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig("gemv", 3, 16, 16)
    with pytest.raises(ValueError, match="at least 16"):
        KernelConfig("mma", 8, 16, 16)
    with pytest.raises(ValueError, match="one of gemv, mma, decode"):
        KernelConfig("wmma", 16, 16, 16)
    with pytest.raises(ValueError, match="a decode launch takes block_m in"):
        KernelConfig("decode", 8, 32, 32)  # its rows are one mma tile: 16
