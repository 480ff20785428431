"""Our 2:4 decode kernel, in Gluon, on the tensor cores: ``x @ Wᵀ`` for M = 1 … 64 tokens over the layout of
``serving.layout`` (values ``[2, N, K/4]``, one 4-bit code per group of 4 inputs).

At decode a layer is one pass over its weight: the kernel must stream our 0.5625× bytes as fast as cuBLAS
streams the dense ones, with few enough instructions per byte to keep the memory busy. How (each point read
from the compiled code by ``serving.aot``):

- **One mma tile of rows per program, K split between its warps.** A program owns 16 output rows (the A tile
  of ``mma.m16n8k16``) and up to ``BLOCK_T`` tokens (the B tile, 8 a column block). Its ``WARPS`` warps
  take alternate steps of 32 groups (128 inputs) and add their partial sums once, after the loop: one
  launch at every shape, no split-K reduction kernel, no reduction inside the loop.
- **A K order chosen for the registers.** A dot product visits K in any order. The mma gives thread
  ``(g, t)`` of a warp the columns ``{2t, 2t+1, 2t+8, 2t+9}`` of each 16-column block of A (rows ``g`` and
  ``g + 8``) and the same rows of B; we give those four columns the four inputs of one group. So a thread
  owns whole groups: per step, rows ``g`` and ``g + 8`` of 8 consecutive groups — one 16-byte load per
  value plane and row and the one code word covering them — and it rebuilds the four weights of each
  group in registers with two shifts (the kept value shifted to its position, ``i · 16`` bits), then loads
  its 32 inputs of x contiguously. No shared memory, no shuffle, no select chain in the loop.
- **FP8 (W8A8).** ``float8_e4m3fn`` weights and inputs are widened to fp16 in registers (exact: every e4m3
  value is an fp16 value), multiplied on the fp16 tensor cores into float32 (exact products) and scaled by
  ``scale_x ⊗ scale_w`` in the epilogue: vLLM's W8A8 product. It compiles where Triton has float8
  (sm89 and newer); ``serving.sparse_op`` never sends FP8 here on an older GPU.

Compiled with ``gluon.jit`` on a GPU; under ``TRITON_INTERPRET=1`` the same source runs on the CPU through
``serving.gluon_interpreted`` (layouts dropped; they never change a result).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl  # parameters are annotated tl.constexpr: the one spelling the interpreter reads
except ImportError:  # pragma: no cover - the package is installed by `make install`
    triton = tl = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if triton is None:  # pragma: no cover
    gl = mma_v2 = jit = None
elif INTERPRETED:
    from serving import gluon_interpreted as gl

    mma_v2, jit = gl.mma_v2, triton.jit
else:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    jit = gluon.jit

ROWS = 16  # output rows a program owns: one mma A tile
GROUPS_PER_THREAD = 8  # groups of 4 inputs a thread owns per step: one 32-bit code word
STEP_GROUPS = 4 * GROUPS_PER_THREAD  # a warp's step: 4 threads along K × 8 groups = 128 inputs
TOKEN_TILES = (8, 16, 32, 64)  # BLOCK_T: tokens per program (B tile columns, 8 per mma)
MAX_TOKENS = TOKEN_TILES[-1]


def _decode24(
    x_ptr,
    v0_ptr,
    v1_ptr,
    c_ptr,
    out_ptr,
    bias_ptr,
    sx_ptr,
    sw_ptr,
    M,
    N,
    G,
    stride_xm,
    stride_vn,
    stride_cn,
    stride_om,
    ADD_BIAS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WARPS: tl.constexpr,
    VEC_V: tl.constexpr,
    VEC_X: tl.constexpr,
):
    # [warp, row, t, group]: thread (g, t) holds rows g and g + 8 (the layout wraps at 8 rows), groups 8t … 8t + 7
    # (a slice of [.., 4 positions]: FP8 expands each group into its four weights in one thread's registers)
    V5: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8, 4], [1, 8, 4, 1, 1], [WARPS, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    V4: gl.constexpr = gl.SliceLayout(4, V5)
    C3: gl.constexpr = gl.SliceLayout(3, V4)  # [warp, row, t]: one code word per thread and row
    # [warp, token, t, input]: thread (g, t) holds tokens g (+ 8 …), the 32 inputs of its 8 groups
    X4: gl.constexpr = gl.BlockedLayout([1, 1, 1, 32], [1, 8, 4, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1, 1], instr_shape=[1, 16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)  # [row, token] after the warps' sum

    pid_n = gl.program_id(0)
    pid_t = gl.program_id(1)
    # weights: offsets of the first step, [warp, row, t, group]
    w_v = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, V4))))
    r_v = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, V4))))
    t_v = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, V4))))
    b_v = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, V4))))
    rows = pid_n * 16 + r_v
    # (row · stride / VEC) · VEC: the compiler then knows each row starts on a VEC boundary (16-byte loads)
    row_off = ((rows * (stride_vn // VEC_V)) * VEC_V)[None, :, None, None]
    row_ok = (rows < N)[None, :, None, None]
    group = (w_v[:, None, None, None] * 32 + t_v[None, None, :, None] * 8) + b_v[None, None, None, :]
    shift = (4 * b_v)[None, None, None, :]  # group b's nibble in its word
    # code words, [warp, row, t]
    w_c = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, C3)))
    r_c = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, C3)))
    t_c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, C3)))
    word = w_c[:, None, None] * 4 + t_c[None, None, :]
    c_off = (pid_n * 16 + r_c)[None, :, None] * stride_cn
    c_ok = (pid_n * 16 + r_c < N)[None, :, None]
    words = (G + 7) // 8
    # inputs, [warp, token, t, input]
    w_x = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    m_x = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    t_x = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, X4))))
    k_x = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X4))))
    tokens = pid_t * BLOCK_T + m_x
    x_off = ((tokens * (stride_xm // VEC_X)) * VEC_X)[None, :, None, None]
    x_ok = (tokens < M)[None, :, None, None]
    col = (w_x[:, None, None, None] * 128 + t_x[None, None, :, None] * 32) + k_x[None, None, None, :]

    acc = gl.zeros([WARPS, 16, BLOCK_T], gl.float32, MMA)
    for g0 in range(0, G, 32 * WARPS):
        g = g0 + group
        ok = row_ok & (g < G)
        v0 = gl.load(v0_ptr + row_off + g, mask=ok, other=0.0)
        v1 = gl.load(v1_ptr + row_off + g, mask=ok, other=0.0)
        w = g0 // 8 + word
        code = gl.load(c_ptr + c_off + w, mask=c_ok & (w < words), other=0)[:, :, :, None] >> shift
        a = _dense_tile(v0, v1, code, WARPS, A_OP, V5)
        k = 4 * g0 + col
        xv = gl.load(x_ptr + x_off + k, mask=x_ok & (k < 4 * G), other=0.0)
        acc = mma_v2(a, _input_tile(xv, WARPS, BLOCK_T, B_OP), acc)
    out = gl.sum(acc, axis=0)  # the warps' K parts meet once
    r_o = pid_n * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, OUT))
    m_o = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, OUT))
    r_ok = r_o < N
    m_ok = m_o < M
    if HAS_SCALES:  # FP8: the token's and the output channel's scales
        sw = gl.load(sw_ptr + r_o, mask=r_ok, other=0.0)
        sx = gl.load(sx_ptr + m_o, mask=m_ok, other=0.0)
        out = out * sw[:, None] * sx[None, :]
    if ADD_BIAS:
        out = out + gl.load(bias_ptr + r_o, mask=r_ok, other=0.0).to(gl.float32)[:, None]
    # int64: M · N passes 2³¹ on wide layers long before a decode kernel's M does, but the op never knows
    o_off = m_o.to(gl.int64)[None, :] * stride_om + r_o[:, None]
    gl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & m_ok[None, :])


def _dense_tile(v0, v1, code, WARPS: tl.constexpr, A_OP: tl.constexpr, V5: tl.constexpr):
    """The A operand ``[warp, 16, 128]`` (fp16, or bf16, as bits) of one step from the kept values ``v0``, ``v1``
    ``[warp, 16, 4, 8]`` and each group's code (in its low 4 bits): the group's four weights as one 64-bit word,
    each kept value shifted to its position (``16 · i`` bits), then the four 16-bit lanes laid out in the K
    order the mma gives the thread. FP8 values are widened to fp16 first (exact)."""
    if v0.dtype == gl.float8e4nv:  # four bytes: one 32-bit word, each kept value at 8 · i bits, then widened
        position = gl.arange(
            0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, V5))))
        )
        dense = _expand_fp8(
            v0.to(gl.uint8, bitcast=True).to(gl.int32)[:, :, :, :, None],
            v1.to(gl.uint8, bitcast=True).to(gl.int32)[:, :, :, :, None],
            code[:, :, :, :, None] + 0 * position[None, None, None, None, :],
        )  # [warp, row, t, b, position] fp16, position 2·ph + pl → [warp, row, b, ph, t, pl]
        tile = gl.permute(gl.reshape(dense, [WARPS, 16, 4, 8, 2, 2]), [0, 1, 3, 4, 2, 5])
    else:
        bits = gl.uint16
        s0 = ((code & 3) * 16).to(gl.uint64)
        s1 = (((code >> 2) & 3) * 16).to(gl.uint64)
        dense = (v0.to(bits, bitcast=True).to(gl.uint64) << s0) | (v1.to(bits, bitcast=True).to(gl.uint64) << s1)
        half = v0.dtype
        p0 = (dense & 0xFFFF).to(bits).to(half, bitcast=True)
        p1 = ((dense >> 16) & 0xFFFF).to(bits).to(half, bitcast=True)
        p2 = ((dense >> 32) & 0xFFFF).to(bits).to(half, bitcast=True)
        p3 = (dense >> 48).to(bits).to(half, bitcast=True)
        # [warp, row, t, b, pl, ph] with position 2·ph + pl → [warp, row, b, ph, t, pl]
        tile = gl.permute(gl.join(gl.join(p0, p1), gl.join(p2, p3)), [0, 1, 3, 5, 2, 4])
    # column 16b + 8ph + 2t + pl: the mma's place for thread t's group b, position 2·ph + pl
    return gl.convert_layout(gl.reshape(tile, [WARPS, 16, 128]), A_OP, assert_trivial=True)


# One group's four FP8 weights from its two kept bytes a0, a1 and its code c (i0 | i1 << 2 in the low 4 bits):
# the word (a0 << 8·i0) | (a1 << 8·i1), widened to two f16x2 (sm89+). Four elements (the group's positions) an
# instance: $0, $1 the outputs, $2-$5 a0, $6-$9 a1, $10-$13 c (each input repeated across the four positions).
_EXPAND_FP8 = """{
.reg .b32 s0, s1, d, e;
.reg .b16 lo, hi;
and.b32 s0, $10, 3;
shl.b32 s0, s0, 3;
shr.u32 s1, $10, 2;
and.b32 s1, s1, 3;
shl.b32 s1, s1, 3;
shl.b32 d, $2, s0;
shl.b32 e, $6, s1;
or.b32 d, d, e;
mov.b32 {lo, hi}, d;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}"""
_EXPAND_FP8_OPERANDS = "=r,=r," + ",".join(["r"] * 12)
if tl is not None:  # globals the compiled kernel reads
    _EXPAND_FP8, _EXPAND_FP8_OPERANDS = tl.constexpr(_EXPAND_FP8), tl.constexpr(_EXPAND_FP8_OPERANDS)


def _expand_fp8_asm(a0, a1, c):
    """``[..., 4]`` fp16: position ``p`` of each group holds the kept byte at ``p`` (``a0`` at ``i0``, ``a1`` at
    ``i1``, both zero-extended int32) widened from e4m3, else zero: one PTX block per group."""
    return gl.inline_asm_elementwise(_EXPAND_FP8, _EXPAND_FP8_OPERANDS, [a0, a1, c], gl.float16, True, 4)


def _expand_fp8_plain(a0, a1, c):
    """What ``_expand_fp8_asm`` computes, in Triton: the interpreter runs no PTX."""
    p = gl.arange(0, 4)[None, None, None, None, :]
    byte = gl.where((c & 3) == p, a0, gl.where(((c >> 2) & 3) == p, a1, 0))
    return byte.to(gl.uint8).to(gl.float8e4nv, bitcast=True).to(gl.float16)


def _input_tile(xv, WARPS: tl.constexpr, BLOCK_T: tl.constexpr, B_OP: tl.constexpr):
    """The B operand ``[warp, 128, BLOCK_T]`` of one step from the inputs ``[warp, token, t, 32]`` (group b of
    thread t at inputs 4b … 4b + 3), in the K order of ``_dense_tile``; FP8 inputs widened to fp16 (exact)."""
    if xv.dtype == gl.float8e4nv:
        xv = xv.to(gl.float16)
    # [warp, token, t, b, ph, pl] → [warp, b, ph, t, pl, token]
    tile = gl.permute(gl.reshape(xv, [WARPS, BLOCK_T, 4, 8, 2, 2]), [0, 3, 4, 2, 5, 1])
    return gl.convert_layout(gl.reshape(tile, [WARPS, 128, BLOCK_T]), B_OP, assert_trivial=True)


if jit is not None:
    _expand_fp8 = jit(_expand_fp8_plain if INTERPRETED else _expand_fp8_asm)
    _dense_tile = jit(_dense_tile)
    _input_tile = jit(_input_tile)
    _decode24 = jit(_decode24)


def _vector(stride: int, elements: int) -> int:
    """The largest power of two up to ``elements`` that divides ``stride`` (rows start on that boundary)."""
    vec = 1
    while vec < elements and stride % (2 * vec) == 0:
        vec *= 2
    return vec


def launch_args(x, values, codes, out, bias, scale_x, scale_w, block_t: int, warps: int) -> tuple[tuple, dict, tuple]:
    """``(args, constexprs, grid)`` of one launch (``serving.triton24.launches`` makes every launch of the op from
    this; ``serving.aot`` compiles exactly that)."""
    m, k = x.shape
    n, groups = values.shape[1], values.shape[2]
    has_bias, scaled = bias is not None, scale_x is not None
    args = (x, values[0], values[1], codes, out, bias if has_bias else values, scale_x if scaled else values)
    args += (scale_w if scaled else values, m, n, groups, x.stride(0), values.stride(1), codes.stride(0), out.stride(0))
    meta = dict(ADD_BIAS=has_bias, HAS_SCALES=scaled, BLOCK_T=block_t, WARPS=warps)
    meta |= dict(
        VEC_V=_vector(values.stride(1), 16 // values.element_size()), VEC_X=_vector(x.stride(0), 16 // x.element_size())
    )
    grid = (-(-n // ROWS), -(-m // block_t))
    return args, meta, grid
