"""What the vLLM plugin hands an FP8 2:4 layer to (``Sparse24Linear`` with the folder's weight and scales)
computes what our emulation computes — and so what transformers and vLLM's own FP8 path compute
(``tests/test_fp8_compat.py``, ``tests/serving/test_vllm_plugin_fp8.py``)."""

import torch

from apt.solver.fp8 import fp8_linear, quantize_weight
from apt.solver.patterns import Pattern, select_mask
from serving import triton24
from serving.sparse_op import Sparse24Linear


def test_the_sparse_op_on_an_fp8_folder_weight_is_our_fp8_emulation(monkeypatch):
    # the op's PyTorch path (its Triton kernels are the sparse op's own tests' business)
    monkeypatch.setattr(triton24, "available", lambda device, dtype=None: (False, "PyTorch path under test"))
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    q, scale = quantize_weight(W * select_mask(W.abs(), Pattern.parse("2:4")))
    op = Sparse24Linear(q, weight_scale=scale)  # as the plugin builds it from weight and weight_scale
    for tokens in (1, 5, 33):
        x = torch.randn(tokens, 128, generator=g)
        out = op(x)
        assert out.dtype == x.dtype
        torch.testing.assert_close(out, fp8_linear(x, q, scale), rtol=1e-5, atol=1e-5)
