"""FP8 (e4m3) W8A8 quantization, against hand-computed values and torch's own cast."""

import pytest
import torch

from apt.errors import InvalidInputError
from apt.solver import layer_loss
from apt.solver.fp8 import (
    FP8,
    MIN_TOKEN_SCALE,
    compensated_fp8,
    dequantize_weight,
    fake_quantize_activations,
    fp8_linear,
    quantize_activations,
    quantize_weight,
    weight_scales,
)
from apt.solver.patterns import Pattern, conforms, select_mask


def pruned_weight(out=16, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    return W * select_mask(W.abs(), Pattern.parse("2:4"))


def test_the_scale_is_the_row_amax_over_448_in_float32():
    W = torch.tensor([[1.0, -896.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.25, -0.125, 0.0]])
    scale = weight_scales(W)
    assert scale.dtype == torch.float32
    expected = torch.tensor([2.0, torch.finfo(torch.float32).eps, 0.5 / 448], dtype=torch.float32)
    assert torch.equal(scale, expected)  # an all-zero row: eps, not 0


def test_rounding_is_torchs_own_cast_and_zeros_stay_positive():
    W = pruned_weight()
    W[0, W[0] == 0] = -0.0  # a stored -0.0 must come out +0
    q, scale = quantize_weight(W)
    assert q.dtype == FP8 and q.shape == W.shape
    expected = (W / weight_scales(W)[:, None]).clamp(-448, 448).to(FP8)
    nonzero = W != 0
    assert torch.equal(q.view(torch.uint8)[nonzero], expected.view(torch.uint8)[nonzero])
    assert bool((q.view(torch.uint8)[~nonzero] == 0).all())  # +0: bits 0x00, never 0x80
    # every row's largest weight lands exactly on ±448
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((W.shape[0],), 448.0))


def test_the_mask_never_changes():
    W = pruned_weight(64, 128)
    for q, _ in (quantize_weight(W), compensated_fp8(W, torch.eye(128) + 0.5)):
        assert conforms(q.float(), Pattern.parse("2:4"))
        assert bool((q.float()[W == 0] == 0).all())


def test_dequantize_is_q_times_scale():
    W = pruned_weight()
    q, scale = quantize_weight(W)
    assert torch.equal(dequantize_weight(q, scale), q.float() * scale[:, None])
    rel = ((dequantize_weight(q, scale) - W).abs() / W.abs().clamp_min(1e-30))[W.abs() > scale[:, None] * 2**-6]
    assert float(rel.max()) <= 2**-4  # 3 mantissa bits: half an ulp in the normal range
    with pytest.raises(InvalidInputError, match="scales for"):
        dequantize_weight(q, scale[:-1])


def test_nan_weights_are_refused():
    W = pruned_weight()
    W[1, 1] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        quantize_weight(W)


def test_activations_are_quantized_per_token_as_vllm_does():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [448.0, 1.0, 0.0, 0.0]])
    q, scale = quantize_activations(x)
    assert scale.dtype == torch.float32 and scale.shape == (3, 1)
    assert torch.equal(scale[:, 0], torch.tensor([4.0 / 448, MIN_TOKEN_SCALE, 1.0], dtype=torch.float32))
    assert torch.equal(q, (x / scale).to(FP8))
    assert torch.equal(fake_quantize_activations(x), (q.float() * scale).to(x.dtype))


def test_fp8_linear_is_the_product_of_the_two_quantized_operands():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g)
    q, scale = quantize_weight(pruned_weight())
    xq, sx = quantize_activations(x)
    expected = (xq.float() * sx) @ (q.float() * scale[:, None]).t()
    torch.testing.assert_close(fp8_linear(x, q, scale), expected, rtol=1e-6, atol=1e-6)


def test_compensation_with_an_identity_hessian_is_round_to_nearest():
    W = pruned_weight()
    q_rtn, s_rtn = quantize_weight(W)
    q_comp, s_comp = compensated_fp8(W, torch.eye(W.shape[1]))
    assert torch.equal(s_rtn, s_comp)
    assert torch.equal(q_rtn.view(torch.uint8), q_comp.view(torch.uint8))


def test_compensation_lowers_the_layer_loss_on_correlated_inputs(correlated_layer):
    W, H, _ = correlated_layer(32, 64, tokens=256, dtype=torch.float32)
    W = W * select_mask(W.abs(), Pattern.parse("2:4"))
    rtn = dequantize_weight(*quantize_weight(W))
    comp = dequantize_weight(*compensated_fp8(W, H))
    assert layer_loss(comp, W, H) < 0.9 * layer_loss(rtn, W, H)  # 0.80x here


def test_a_compensated_weight_is_a_fixed_point_of_rounding_to_nearest(correlated_layer):
    # apt-sparse quantize rounds the FP8 copy a run compensated to nearest again: it must give back the same q
    for seed in range(4):  # seed 2: one row's largest weight is pushed down to 416 unless it is pinned
        W, H, _ = correlated_layer(64, 128, tokens=256, seed=seed, dtype=torch.float32)
        W = W * select_mask(W.abs(), Pattern.parse("2:4"))
        q, scale = compensated_fp8(W, H)
        assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))  # each row's largest pinned
        again, scale_again = quantize_weight(dequantize_weight(q, scale))
        assert torch.equal(again.view(torch.uint8), q.view(torch.uint8))
        torch.testing.assert_close(scale_again, scale, rtol=2e-7, atol=0)  # amax·448/448: one ulp at most


def test_an_input_no_token_reaches_is_rounded_to_nearest_not_zeroed():
    W = pruned_weight(8, 16)
    H = torch.eye(16) * 4.0
    H[3, 3] = 0.0  # column 3 never sees a token
    q, scale = compensated_fp8(W, H)
    rtn, _ = quantize_weight(W)
    assert torch.equal(q.view(torch.uint8)[:, 3], rtn.view(torch.uint8)[:, 3])
    assert bool((q.float()[:, 3] != 0).any())
