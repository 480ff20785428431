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
def interpreter_fixes(monkeypatch):
    """Two fixes to Triton 3.6's interpreter (only the interpreter changes; the kernels are the ones that
    compile on a GPU, where the hardware does both right):

    - ``tl.dot`` on bf16 operands multiplies their raw uint16 storage (bf16 is kept as uint16 in numpy);
      the tensor cores multiply the bf16 values exactly into float32, and so does the patched ``create_dot``.
    - float32 → float8_e4m3fn rounds wrongly where rounding carries into the exponent (31.6 becomes 16, not
      32); the GPU's ``cvt.rn.satfinite`` rounds to nearest even, as PyTorch's cast, which the patch uses."""
    if DEVICE == "cuda":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original_dot = interpreter.InterpreterBuilder.create_dot
    original_convert = interpreter._convert_float

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle.data
        return (handle.data.astype(np.uint32) << 16).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(widen(a), widen(b), dtype=d.data.dtype)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return original_convert(data, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(interpreter, "_convert_float", convert_float)


def sparse_weight(n: int, k: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """A random 2:4 weight ``[n, k]`` (magnitude mask), never all zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return (w * select_mask(w.abs(), Pattern(2, 4))).to(dtype)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference.double()).norm() / reference.double().norm())
