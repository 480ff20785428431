"""Our Triton 2:4 kernels against the dense product of the decompressed weight: on odd shapes, both half
dtypes, with and without split-K and bias. Here they run under Triton's interpreter; on a GPU, compiled."""

import pytest
import torch

from serving.layout import pack_24, unpack_24
from serving.triton24 import KernelConfig, candidates, default_config, linear24, unpack24

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


def test_a_launch_round_trips_through_the_ops_plan():
    for config in (KernelConfig("gemv", 4, 32, 64, 8, 4, 4, True), KernelConfig("mma", 64, 128, 32, 1, 8, 3, False)):
        assert KernelConfig.from_list(config.as_list()) == config and len(config.as_list()) == 7


def test_a_bad_launch_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig("gemv", 3, 16, 16)
    with pytest.raises(ValueError, match="at least 16"):
        KernelConfig("mma", 8, 16, 16)
    with pytest.raises(ValueError, match="one of gemv, mma"):
        KernelConfig("wmma", 16, 16, 16)
