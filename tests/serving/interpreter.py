"""Running our Triton kernels on the CPU: Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` where there is no GPU), with one fix to it for bf16 ``tl.dot``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt.solver import select_mask
from apt.solver.patterns import Pattern
from serving import triton24

RUNS, WHY = triton24.available("cpu") if not torch.cuda.is_available() else triton24.available("cuda")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not RUNS, reason=f"our Triton kernels: {WHY}")


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton 3.6's interpreter multiplies bf16 ``tl.dot`` operands as their raw uint16 storage (bf16 is kept
    as uint16 in numpy). The tensor cores multiply the bf16 values exactly into float32: so does this
    patched ``create_dot``. Only the interpreter changes; the kernel is the one that compiles on a GPU."""
    if DEVICE == "cuda":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle.data
        return (handle.data.astype(np.uint32) << 16).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(widen(a), widen(b), dtype=d.data.dtype)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def sparse_weight(n: int, k: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """A random 2:4 weight ``[n, k]`` (magnitude mask), never all zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return (w * select_mask(w.abs(), Pattern(2, 4))).to(dtype)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference.double()).norm() / reference.double().norm())
