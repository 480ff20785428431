"""FP8 (e4m3) W8A8 quantization of a (pruned) weight: per-output-channel weight scales, dynamic per-token
activation scales — the scheme compressed-tensors calls ``FP8_DYNAMIC`` and vLLM serves.

- Weight: ``scale_r = amax(|w_r|) / 448`` (float32, one per output row; an all-zero row gets
  ``finfo(float32).eps``, as compressed-tensors does), ``q = float8_e4m3fn(clamp(w / scale, ±448))``:
  PyTorch's cast rounds to nearest even. A zero stays ``+0`` (the 2:4 mask never changes).
- Activation (at run time): ``scale_t = max(amax(|x_t|) / 448, 1 / (448·512))`` per token, as vLLM's
  ``scaled_fp8_quant(..., use_per_token_if_dynamic=True)``.
- ``compensated_fp8``: the error-compensating pass of GPTQ / SparseGPT's joint sparsity + quantization
  (Frantar et al. 2023, Alg. 1 with a fixed mask): columns left to right, each kept weight rounded to
  the grid and pruned ones set to 0, the error pushed through the upper Cholesky factor of ``H⁻¹`` onto
  the columns not yet rounded, in lazy blocks.

Imports torch and ``apt.errors`` only.
"""

from __future__ import annotations

import torch

from apt.errors import InvalidInputError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_TOKEN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor for a dynamic per-token scale


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """``[out]`` float32: ``amax(|w_row|) / 448`` per output row of ``weight`` ``[out, in]``."""
    amax = weight.detach().float().abs().amax(dim=1)
    scale = amax / FP8_MAX
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` float8_e4m3fn ``[out, in]`` (round to nearest, zeros ``+0``), ``scale`` float32
    ``[out]`` (``weight_scales`` unless given)."""
    if weight.dim() != 2:
        raise InvalidInputError(f"FP8 quantization takes a 2-D weight [out, in], got shape {list(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise InvalidInputError("the weight holds NaN or Inf: it cannot be quantized")
    scale = weight_scales(weight) if scale is None else scale.float()
    w = weight.float()
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
    q = torch.where(w == 0, torch.zeros_like(q), q)  # -0.0 and 0/scale alike: +0
    return q.to(FP8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` ``[out, in]`` in ``dtype``, computed in float32 (what an FP8 GEMM's epilogue applies)."""
    if q.dtype != FP8:
        raise InvalidInputError(f"expected a float8_e4m3fn weight, got {q.dtype}")
    scale = scale.float().reshape(-1)
    if scale.shape[0] != q.shape[0]:
        raise InvalidInputError(f"{scale.shape[0]} weight scales for {q.shape[0]} output rows")
    return (q.float() * scale[:, None]).to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, scale)``: ``x`` ``[..., K]`` in float8_e4m3fn and its per-token float32 scales ``[..., 1]``.

    Both divisions are exact (IEEE) on every device: dividing by the Python number 448 would, on CUDA, multiply
    by its rounded reciprocal (PyTorch's CPU-scalar shortcut), and the scale would differ in its last bit from
    the CPU's and from our fused kernel's (``serving.triton24``)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(MIN_TOKEN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` through FP8 and back, per token, in ``x``'s dtype: the activations an FP8 GEMM multiplies."""
    q, scale = quantize_activations(x)
    return (q.float() * scale).to(x.dtype)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """The W8A8 product, emulated exactly up to float32 accumulation: ``x`` ``[..., K]`` quantized per token,
    ``q`` ``[N, K]`` float8 with ``scale`` ``[N]``; the result in ``x``'s dtype."""
    xq, sx = quantize_activations(x)
    out = (xq.float() @ q.float().t()) * sx * scale.float().reshape(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def compensated_fp8(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` like ``quantize_weight``, with each column's rounding error compensated by the columns
    to its right (see the module docstring). The zeros of ``weight`` (its mask) stay ``+0``; the scales
    are ``weight_scales(weight)``, fixed before the pass (a compensated value beyond ``±448·scale`` is
    clamped), and each row's largest weight, from which its scale was taken, is stored as ``±448`` whatever
    the errors pushed onto it: so the row's largest ``|q·scale|`` is ``448·scale`` and rounding the FP8 copy
    to nearest again (``quantize_weight(q·scale)``, what ``apt-sparse quantize`` does after a run that
    compensated) gives back the same ``q``. A column no token reaches (``H_jj = 0``) is rounded to nearest.
    ``hessian`` ``[in, in]`` (``Σ x xᵀ``), damped by ``damp·mean(diag H)``; a failed factorisation retries
    with ×10 damping up to 4 times, then raises."""
    out, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise InvalidInputError(f"Hessian {list(hessian.shape)} does not match the weight's {cols} inputs")
    scale = weight_scales(weight)
    keep = weight != 0
    W = weight.detach().float().clone()
    largest = W.abs().argmax(dim=1)  # per row: the weight its scale is amax/448 of
    pinned = torch.sign(W[torch.arange(out, device=W.device), largest]) * FP8_MAX * scale
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # an input no token reaches: no error is pushed from or onto it
    mean = float(H.diagonal().mean())
    U = None
    for attempt in range(5):
        damped = H + torch.eye(cols, dtype=H.dtype, device=H.device) * (damp * 10**attempt * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                break
        U = None
    if U is None:
        raise InvalidInputError("the Hessian could not be factorised even with 10⁴× damping")
    Q = torch.zeros_like(W)
    s = scale[:, None]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W1 = W[:, start:end].clone()
        Err = torch.zeros_like(W1)
        U1 = U[start:end, start:end]
        for j in range(end - start):
            w = W1[:, j]
            q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
            q = torch.where(largest == start + j, pinned, q)
            q = torch.where(keep[:, start + j], q, torch.zeros_like(q))
            Q[:, start + j] = q
            err = (w - q) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            Err[:, j] = err
        W[:, end:] -= Err @ U[start:end, end:]
    q8 = torch.where(keep, (Q / s).clamp(-FP8_MAX, FP8_MAX), torch.zeros_like(Q)).to(FP8)
    return q8, scale
