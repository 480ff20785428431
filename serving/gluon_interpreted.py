"""The part of Gluon (``triton.experimental.gluon.language``) our kernels use, over ``triton.language``, for
Triton's interpreter (``TRITON_INTERPRET=1``), which runs ``triton.language`` on the CPU but not Gluon.

A Gluon layout says which thread holds which element; it never changes what a program computes
(``convert_layout`` is the identity on values, ``mma_v2`` is ``acc + a @ b``). So a Gluon kernel run with its
layouts dropped computes exactly what it computes compiled: its indexing, masks, bit arithmetic, K order and
epilogue are checked here on the CPU. What only the compiled kernel shows (registers, load widths, whether a
layout conversion moves data) is read from its cubin by ``serving.aot``.

``serving.decode24`` imports this module as ``gl`` where ``TRITON_INTERPRET=1`` and the real Gluon elsewhere.
"""

from __future__ import annotations

import triton.language as tl

constexpr = tl.constexpr
static_range = tl.static_range
float16, bfloat16, float32, float8e4nv = tl.float16, tl.bfloat16, tl.float32, tl.float8e4nv
int8, int16, int32, int64 = tl.int8, tl.int16, tl.int32, tl.int64
uint8, uint16, uint32, uint64 = tl.uint8, tl.uint16, tl.uint32, tl.uint64


class _Layout:
    """A layout, kept only so the kernel's constexpr definitions evaluate."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


BlockedLayout = SliceLayout = NVMMADistributedLayout = DotOperandLayout = _Layout


def arange(start, end, layout=None):
    return tl.arange(start, end)


def zeros(shape, dtype, layout=None):
    return tl.zeros(shape, dtype)


def full(shape, value, dtype, layout=None):
    return tl.full(shape, value, dtype)


def convert_layout(value, layout, assert_trivial=False):
    return value


def program_id(axis):
    return tl.program_id(axis)


def load(pointer, mask=None, other=None):
    return tl.load(pointer, mask=mask, other=other)


def store(pointer, value, mask=None):
    return tl.store(pointer, value, mask=mask)


def where(condition, x, y):
    return tl.where(condition, x, y)


def join(a, b):
    return tl.join(a, b)


def permute(x, dims):
    return tl.permute(x, dims)


def reshape(x, shape):
    return tl.reshape(x, shape)


def sum(x, axis):  # noqa: A001 - Gluon's name
    return tl.sum(x, axis=axis)


def maximum(x, y):
    return tl.maximum(x, y)


def cdiv(x, y):
    return tl.cdiv(x, y)


def mma_v2(a, b, acc):
    """``acc + a @ b`` over the last two axes, batched over the leading one (the tensor cores' product: every
    half-precision product is exact in float32; only the order of the float32 sums differs)."""
    product = a.to(tl.float32)[:, :, :, None] * b.to(tl.float32)[:, None, :, :]
    return acc + tl.sum(product, axis=2)
