"""Our 2:4 kernels over the layout of ``serving.layout`` (values ``[2, N, K/4]``, 4-bit codes), and how each is
launched.

- ``decode`` (``serving.decode24``, Gluon): M = 1…64 tokens on the tensor cores, one launch at every shape,
  built to stream the compressed weight at the speed cuBLAS streams the dense one (see that module). It
  does not run under Triton's interpreter as compiled code does, so no unmeasured dispatch chooses it: the
  GPU suite checks it against the reference on the device before a dispatch file names it.
- ``gemv``: decode, M = 1…8 tokens, on the CUDA cores. Per group of 4 inputs the kernel loads the 4 input
  values once and, per row, *selects* the two that the row kept (two ``where``s each). Its cross-thread sum
  and layout conversions inside the K loop cost it the speed ``decode`` has (``serving.aot``); it stays as the
  unmeasured default of memory-first mode, the decode kernel the interpreter checks as compiled.
- ``mma``: M ≥ 16, on the tensor cores. A 2:4 tile ``[BLOCK_N, 4·BLOCK_G]`` is never assembled: its four
  column phases ``p`` (columns ``4g + p``) are each a ``[BLOCK_N, BLOCK_G]`` matrix of selects, multiplied
  with the inputs of that phase (``x[:, 4g + p]``), four ``tl.dot`` per step. A sum over K does not care
  in which order it visits the columns.
- ``unpack``: the dense weight, decompressed on the device (memory-first mode's large-M path: unpack into
  a transient buffer, then the dense GEMM).
- ``quantize``: the per-token FP8 quantization of the inputs, in one launch.

``gemv`` and ``mma`` split K over programs on tall-skinny shapes (``split_k``); the partial sums meet in a second
launch, ``reduce``. Each call takes a ``KernelConfig``; ``candidates`` lists what ``runtime_bench.gpu_suite``
times per shape and token count, and ``default_config`` is the choice where nothing was measured.
``launches`` builds every launch of a call exactly as the op makes it: ``serving.aot`` compiles those, with
the launcher's own specialisation of the arguments, for GPUs this machine does not have.

Row strides reach the kernels as ``stride // VEC`` with ``VEC`` a constexpr (the largest power of two up to a
16-byte vector that divides the stride): the compiler then knows every row starts on a vector boundary, so the
weight loads stay 16 bytes wide whatever K is (K = 11008 compiled to scalar loads before).

The kernels are plain functions, compiled with ``triton.jit`` for a CUDA tensor and run by Triton's
interpreter for a CPU tensor where ``TRITON_INTERPRET=1`` (the tests here: same code, numpy underneath).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import asdict, dataclass

import torch

from serving import decode24
from serving.decode24 import ROWS, STEP_GROUPS, TOKEN_TILES

try:  # the kernel bodies need triton.language at definition; the module imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the package is installed by `make install`
    triton = tl = None

# Triton reads TRITON_INTERPRET when it is imported: only then do its language helpers run on the CPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMS_HINT = 132  # streaming multiprocessors to fill when no GPU is there to ask (an H100/H200)
KERNELS = ("gemv", "mma", "decode")
GEMV_MAX_M = 8
# An FP8 wgmma's K: its products are promoted to float32 after every instruction (a constexpr: kernels read it).
FP8_PROMOTE = tl.constexpr(32) if tl is not None else 32


def _group_tile(
    v_ptr,
    c_ptr,
    rn,
    rg,
    n_ok,
    w_ok,
    g0,
    G,
    stride_vp,
    stride_vn,
    stride_cn,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WIDE_CODES: tl.constexpr,
    VEC_P: tl.constexpr,
    VEC_V: tl.constexpr,
    VEC_C: tl.constexpr,
):
    """One tile of the weight: the two kept values ``[BLOCK_N, BLOCK_G]`` (storage dtype) and their positions
    ``i0 < i1`` in each group. ``WIDE_CODES``: load each row's code words once (``BLOCK_G / 8`` of them) and
    spread their nibbles in registers; else each group loads its own word (eight lanes read one address).
    Strides arrive divided by their ``VEC`` (see the module's docstring)."""
    offs = ((rn * stride_vn) * VEC_V)[:, None] + rg[None, :]
    v0 = tl.load(v_ptr + offs, mask=w_ok, other=0.0)
    v1 = tl.load(v_ptr + stride_vp * VEC_P + offs, mask=w_ok, other=0.0)
    rows = ((rn * stride_cn) * VEC_C)[:, None]
    if WIDE_CODES:
        rw = g0 // 8 + tl.arange(0, BLOCK_G // 8)
        word_ok = n_ok[:, None] & (rw < (G + 7) // 8)[None, :]
        words = tl.load(c_ptr + rows + rw[None, :], mask=word_ok, other=0)
        nibbles = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15
        code = tl.reshape(nibbles, (BLOCK_N, BLOCK_G))
    else:
        word = tl.load(c_ptr + rows + (rg // 8)[None, :], mask=w_ok, other=0)
        code = (word >> ((rg % 8) * 4)[None, :]) & 15
    return v0, v1, code & 3, code >> 2


def _split_range(G, SPLIT_K, pid_k, BLOCK_G: tl.constexpr):
    """The groups ``[start, end)`` program ``pid_k`` of a split-K launch sums over (whole steps of BLOCK_G)."""
    span = tl.cdiv(tl.cdiv(G, SPLIT_K), BLOCK_G) * BLOCK_G
    start = pid_k * span
    return start, tl.minimum(start + span, G)


def _phases(v0, v1, i0, i1):
    """The tile's four column phases ``[BLOCK_N, BLOCK_G]``: phase ``p`` holds each group's weight at column
    ``4g + p`` (a kept value, or zero). The left kept weight sits at 0, 1 or 2, the right one at 1, 2 or 3."""
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, zero)
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i1 == 3, v1, zero)
    return w0, w1, w2, w3


def _store_tile(acc, out_ptr, bias_ptr, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok, pid_k, stride_os, stride_om,
                ADD_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr):  # fmt: skip
    """The epilogue of ``gemv`` and ``mma``: FP8 scales, bias, and the store (of a split-K partial too).
    Offsets in int64: ``M · N`` passes 2³¹ at prefill on wide layers (gate/up from M ≈ 74 900)."""
    if HAS_SCALES:  # FP8: the token's and the output channel's scales (exact on each split-K partial: linear)
        acc *= tl.load(sx_ptr + rm, mask=m_ok, other=0.0)[:, None] * tl.load(sw_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if ADD_BIAS:  # split-K partials get the bias in the reduction
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k.to(tl.int64) * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemv24(
    x_ptr,
    v_ptr,
    c_ptr,
    out_ptr,
    bias_ptr,
    sx_ptr,
    sw_ptr,
    M,
    N,
    G,
    stride_xm,
    stride_vp,
    stride_vn,
    stride_cn,
    stride_os,
    stride_om,
    SPLIT_K,
    ADD_BIAS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WIDE_CODES: tl.constexpr,
    VEC_X: tl.constexpr,
    VEC_P: tl.constexpr,
    VEC_V: tl.constexpr,
    VEC_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    start, end = _split_range(G, SPLIT_K, pid_k, BLOCK_G)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(start, end, BLOCK_G):
        rg = g0 + tl.arange(0, BLOCK_G)
        g_ok = rg < end
        w_ok = n_ok[:, None] & g_ok[None, :]
        v0, v1, i0, i1 = _group_tile(
            v_ptr, c_ptr, rn, rg, n_ok, w_ok, g0, G, stride_vp, stride_vn, stride_cn, BLOCK_N, BLOCK_G, WIDE_CODES,
            VEC_P, VEC_V, VEC_C,
        )  # fmt: skip
        v0, v1 = v0.to(tl.float32), v1.to(tl.float32)
        i0, i1 = i0[None, :, :], i1[None, :, :]
        xp = x_ptr + ((rm * stride_xm) * VEC_X)[:, None] + 4 * rg[None, :]
        x_ok = m_ok[:, None] & g_ok[None, :]
        x0 = tl.load(xp, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        x1 = tl.load(xp + 1, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        x2 = tl.load(xp + 2, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        x3 = tl.load(xp + 3, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
        # The left kept weight sits at 0, 1 or 2; the right one at 1, 2 or 3 (i0 < i1).
        s0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
        s1 = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
        acc += tl.sum(v0[None, :, :] * s0 + v1[None, :, :] * s1, axis=2)
    _store_tile(acc, out_ptr, bias_ptr, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok, pid_k, stride_os, stride_om, ADD_BIAS,
                HAS_SCALES)  # fmt: skip


def _mma24(
    x_ptr,
    v_ptr,
    c_ptr,
    out_ptr,
    bias_ptr,
    sx_ptr,
    sw_ptr,
    M,
    N,
    G,
    stride_xm,
    stride_vp,
    stride_vn,
    stride_cn,
    stride_os,
    stride_om,
    SPLIT_K,
    ADD_BIAS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WIDE_CODES: tl.constexpr,
    VEC_X: tl.constexpr,
    VEC_P: tl.constexpr,
    VEC_V: tl.constexpr,
    VEC_C: tl.constexpr,
):
    # Programs that share a weight tile are launched next to each other (M fastest): the tile comes from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    start, end = _split_range(G, SPLIT_K, pid_k, BLOCK_G)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # FP8 on sm90 at BLOCK_M >= 64 compiles to wgmma, whose FP8 products are summed at reduced precision until
    # promoted into float32: Triton's default promotes after 2**30 (the whole K); FP8_PROMOTE = 32 promotes after
    # every wgmma (K = 32). Other dtypes ignore it.
    for g0 in range(start, end, BLOCK_G):
        rg = g0 + tl.arange(0, BLOCK_G)
        g_ok = rg < end
        w_ok = n_ok[:, None] & g_ok[None, :]
        v0, v1, i0, i1 = _group_tile(
            v_ptr, c_ptr, rn, rg, n_ok, w_ok, g0, G, stride_vp, stride_vn, stride_cn, BLOCK_N, BLOCK_G, WIDE_CODES,
            VEC_P, VEC_V, VEC_C,
        )  # fmt: skip
        w0, w1, w2, w3 = _phases(v0, v1, i0, i1)
        xp = x_ptr + ((rm.to(tl.int64) * stride_xm) * VEC_X)[:, None] + 4 * rg[None, :]
        x_ok = m_ok[:, None] & g_ok[None, :]
        acc = tl.dot(tl.load(xp, mask=x_ok, other=0.0), tl.trans(w0), acc, max_num_imprecise_acc=FP8_PROMOTE)
        acc = tl.dot(tl.load(xp + 1, mask=x_ok, other=0.0), tl.trans(w1), acc, max_num_imprecise_acc=FP8_PROMOTE)
        acc = tl.dot(tl.load(xp + 2, mask=x_ok, other=0.0), tl.trans(w2), acc, max_num_imprecise_acc=FP8_PROMOTE)
        acc = tl.dot(tl.load(xp + 3, mask=x_ok, other=0.0), tl.trans(w3), acc, max_num_imprecise_acc=FP8_PROMOTE)
    _store_tile(acc, out_ptr, bias_ptr, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok, pid_k, stride_os, stride_om, ADD_BIAS,
                HAS_SCALES)  # fmt: skip


def _reduce24(
    part_ptr, out_ptr, bias_ptr, total, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _unpack24(
    v_ptr,
    c_ptr,
    out_ptr,
    N,
    G,
    stride_vp,
    stride_vn,
    stride_cn,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    VEC_P: tl.constexpr,
    VEC_V: tl.constexpr,
    VEC_C: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    w_ok = (rn < N)[:, None] & (rg < G)[None, :]
    g0 = tl.program_id(1) * BLOCK_G
    v0, v1, i0, i1 = _group_tile(
        v_ptr, c_ptr, rn, rg, rn < N, w_ok, g0, G, stride_vp, stride_vn, stride_cn, BLOCK_N, BLOCK_G, True, VEC_P,
        VEC_V, VEC_C,
    )  # fmt: skip
    w0, w1, w2, w3 = _phases(v0, v1, i0, i1)
    # join(join(w0, w2), join(w1, w3)) is [BN, BG, 2, 2] with [.., j, i] = phase 2j + i: row-major it is the
    # dense tile's column order, stored with one contiguous write per row.
    tile = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, 4 * BLOCK_G))
    rk = tl.program_id(1) * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    ok = (rn < N)[:, None] & (rk < 4 * G)[None, :]
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * stride_on + rk[None, :], tile, mask=ok)


def _quantize24(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """Dynamic per-token FP8 quantization, one program a token: amax, scale = max(amax / 448, floor), then
    e4m3(x / scale). Both divisions are IEEE (``div_rn``): a plain ``/`` compiles to the approximate
    ``div.full.f32``, and ``apt.solver.fp8.quantize_activations`` divides exactly on every device."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


if triton is not None:  # a helper the kernels call: compiled (or interpreted) with them
    _group_tile = triton.jit(_group_tile)
    _split_range = triton.jit(_split_range)
    _phases = triton.jit(_phases)
    _store_tile = triton.jit(_store_tile)


@dataclass(frozen=True)
class KernelConfig:
    """One launch of ``gemv``, ``mma`` or ``decode``: tile sizes (``block_g`` groups of 4 inputs per step), split-K,
    warps and pipeline stages (``num_stages`` is ignored by the interpreter). ``decode``'s tile is fixed by its
    design (16 rows, 32 groups a warp-step, K split between the program's warps): its ``block_m`` is the
    token tile (8, 16, 32 or 64) and ``num_warps`` how many warps share K."""

    kernel: str
    block_m: int
    block_n: int
    block_g: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    wide_codes: bool = False

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: one of {', '.join(KERNELS)}")
        for name in ("block_m", "block_n", "block_g", "split_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value}: a power of two")
        if self.block_g < 8:
            raise ValueError("block_g is at least 8: a tile reads whole 32-bit code words")
        if self.kernel == "mma" and min(self.block_m, self.block_n, self.block_g) < 16:
            raise ValueError("mma tiles are at least 16 on every side (tensor-core dot)")
        if self.kernel == "decode":
            fixed = (self.block_n, self.block_g, self.split_k, self.wide_codes) == (ROWS, STEP_GROUPS, 1, False)
            if self.block_m not in TOKEN_TILES or not fixed or self.num_warps > 8:
                raise ValueError(
                    f"a decode launch takes block_m in {TOKEN_TILES} tokens, block_n={ROWS}, block_g={STEP_GROUPS}, "
                    f"split_k=1 (its warps split K), 1-8 warps and no wide_codes; got {self}"
                )

    def as_dict(self) -> dict:
        return asdict(self)

    def as_list(self) -> list[int]:
        """``[kernel index, block_m, block_n, block_g, split_k, num_warps, num_stages · 2 + wide_codes]``: the
        op's plan encoding (seven integers)."""
        head = [KERNELS.index(self.kernel), self.block_m, self.block_n, self.block_g, self.split_k]
        return head + [self.num_warps, self.num_stages * 2 + int(self.wide_codes)]

    @classmethod
    def from_list(cls, values) -> KernelConfig:
        kernel, block_m, block_n, block_g, split_k, warps, stages = (int(v) for v in values)
        return cls(KERNELS[kernel], block_m, block_n, block_g, split_k, warps, stages // 2, bool(stages % 2))

    def refuse_for(self, dtype: torch.dtype) -> str | None:
        """Why this launch cannot compile for weights of ``dtype`` (None where it can)."""
        if dtype == FP8 and self.kernel == "mma" and self.block_g < FP8_MIN_BLOCK_G:
            return f"an FP8 mma tile needs block_g >= {FP8_MIN_BLOCK_G} (Triton's FP8 dot takes K >= 32 per tile)"
        if dtype == FP8 and self.kernel == "mma" and self.block_n > FP8_MAX_BLOCK_N:
            return f"an FP8 mma tile {self.block_n} rows wide spills registers on sm90 (serving.aot): at most 64"
        return None


FP8 = torch.float8_e4m3fn
FP8_MIN_BLOCK_G = 32
FP8_MAX_BLOCK_N = 64  # 128-row FP8 mma tiles spill 8-48 bytes on sm90 and sm100, whatever the warps
FP8_FROM = (8, 9)  # Triton compiles float8_e4m3fn (fp8e4nv) from sm89 on


def available(device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether our kernels run on ``device`` for weights of ``dtype``, and why not: a CUDA device with triton
    installed (sm89 or newer for FP8), or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, the tests)."""
    if importlib.util.find_spec("triton") is None or triton is None:
        return False, "triton is not installed (pip install triton)"
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if dtype == FP8 and capability < FP8_FROM:
            return False, (
                f"our FP8 kernels need compute capability {FP8_FROM[0]}.{FP8_FROM[1]} or newer (Triton has no "
                f"float8_e4m3fn before sm89); this GPU is sm{capability[0]}{capability[1]}"
            )
        return True, "triton on CUDA"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and INTERPRETED:
        return True, "triton's interpreter on the CPU (TRITON_INTERPRET=1)"
    return False, f"our Triton kernels run on CUDA GPUs (here: {device.type}; the CPU only under TRITON_INTERPRET=1)"


@functools.cache
def _kernel(name: str):
    """The kernel compiled once per process (an interpreted one where ``TRITON_INTERPRET=1`` was set before
    triton was imported: triton's own language helpers are interpreted only then)."""
    if name == "decode":
        return decode24._decode24
    fn = {"gemv": _gemv24, "mma": _mma24, "reduce": _reduce24, "unpack": _unpack24, "quantize": _quantize24}[name]
    # split-K is a loop bound, not a shape: one compiled kernel serves every split
    return triton.jit(fn, do_not_specialize=["SPLIT_K"] if name in ("gemv", "mma") else None)


@dataclass(frozen=True)
class Launch:
    """One kernel launch exactly as the op makes it: ``serving.aot`` compiles these for GPUs it does not have."""

    kernel: str  # gemv, mma, decode, reduce, unpack, quantize
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    def run(self) -> None:
        compiled = {} if INTERPRETED else dict(num_warps=self.num_warps, num_stages=self.num_stages)
        _kernel(self.kernel)[self.grid](*self.args, **self.constexprs, **compiled)


def _vec(stride: int, element_size: int) -> int:
    """The largest power of two, up to a 16-byte vector of elements, that divides ``stride``."""
    return decode24._vector(stride, max(1, 16 // element_size))


def _split_for(programs: int, groups: int, block_g: int, sms: int, per_sm: int = 4) -> int:
    """The power-of-two split of K that gives at least ``per_sm`` programs per multiprocessor (a memory-bound
    kernel hides DRAM latency with many small programs in flight), each still at least two steps long."""
    split = 1
    while programs * split < per_sm * sms and groups // (split * 2) >= 2 * block_g and split < 16:
        split *= 2
    return split


def _sms(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS_HINT


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


# gemv tiles (block_n, block_g) per block_m: block_m × block_n × block_g select products are live per step, so
# the tile shrinks as M grows (4096 products over 128 threads: 32 registers a live tensor).
GEMV_TILES = {
    1: ((32, 64), (16, 128), (16, 64), (32, 128), (64, 64)),
    2: ((32, 64), (16, 64), (16, 128), (32, 32)),
    4: ((16, 64), (32, 32), (16, 32)),
    8: ((16, 32), (16, 16), (32, 16)),
}
MMA_TILES = ((64, 32), (64, 16), (128, 32), (128, 16))  # (block_n, block_g): BLOCK_K = 4 · block_g dense columns


def _decode_warps(groups: int) -> tuple[int, ...]:
    """The warp counts a decode program may split K into: each warp at least two steps of 32 groups."""
    found = tuple(w for w in (8, 4, 2) if groups // (STEP_GROUPS * w) >= 2)
    return found or (1,)


def _mma_variants(block_m: int, block_n: int) -> tuple[tuple[int, int], ...]:
    """``(num_warps, num_stages)`` of the mma launches tried for one tile. Code words load wide: per-group word
    loads cost registers and instructions everywhere (``serving.aot``); a 128 × 128 tile needs 8 warps (with 4
    it spills on sm80 and sm90)."""
    return ((8, 4),) if block_m * block_n >= 128 * 128 else ((4, 3), (8, 4))


def default_config(kernel: str, m: int, n: int, k: int, sms: int = SMS_HINT, dtype=None) -> KernelConfig:
    """The launch used where none was measured for this shape, token count and weight dtype."""
    groups = k // 4
    if kernel == "decode":
        tile = next((t for t in TOKEN_TILES if t >= m), TOKEN_TILES[-1])
        return KernelConfig("decode", tile, ROWS, STEP_GROUPS, 1, num_warps=_decode_warps(groups)[0], num_stages=1)
    if kernel == "gemv":
        block_m = _pow2_at_least(min(m, GEMV_MAX_M))
        block_n, block_g = GEMV_TILES[block_m][0]
        split = _split_for(-(-n // block_n), groups, block_g, sms)
        return KernelConfig("gemv", block_m, block_n, block_g, split, num_warps=4, num_stages=3, wide_codes=True)
    block_m = min(128, max(16, _pow2_at_least(m)))
    block_n = 64 if block_m <= 64 or dtype == FP8 else 128
    programs = -(-m // block_m) * -(-n // block_n)
    split = _split_for(programs, groups, 32, sms, per_sm=2) if m <= 256 else 1
    warps, stages = _mma_variants(block_m, block_n)[0]
    return KernelConfig("mma", block_m, block_n, 32, split, warps, stages, wide_codes=True)


def candidates(kernel: str, m: int, n: int, k: int, sms: int = SMS_HINT, dtype=None) -> list[KernelConfig]:
    """The launches ``runtime_bench.gpu_suite`` times for one shape and token count (the default first): tiles,
    split-K (the split that fills the GPU, and none), warps and pipeline depth. Only launches that compile for
    ``dtype``'s weights (an FP8 mma tile needs block_g >= 32) and that spill nowhere (``serving.aot``)."""
    groups = k // 4
    found = [default_config(kernel, m, n, k, sms, dtype)]
    if kernel == "decode":
        found += [KernelConfig("decode", found[0].block_m, ROWS, STEP_GROUPS, 1, w, 1) for w in _decode_warps(groups)]
    elif kernel == "gemv":
        block_m = _pow2_at_least(min(m, GEMV_MAX_M))
        for block_n, block_g in GEMV_TILES[block_m]:
            for split in dict.fromkeys((_split_for(-(-n // block_n), groups, block_g, sms), 1)):
                found.append(KernelConfig("gemv", block_m, block_n, block_g, split, 4, 3, True))
    else:
        block_ms = (16,) if m <= 16 else ((32,) if m <= 32 else ((64,) if m <= 64 else (64, 128)))
        for block_m in block_ms:
            for block_n, block_g in MMA_TILES:
                programs = -(-m // block_m) * -(-n // block_n)
                split = _split_for(programs, groups, block_g, sms, per_sm=2) if m <= 256 else 1
                for warps, stages in _mma_variants(block_m, block_n):
                    found.append(KernelConfig("mma", block_m, block_n, block_g, split, warps, stages, True))
    return [c for c in dict.fromkeys(found) if dtype is None or c.refuse_for(dtype) is None]


def _check_layout(x: torch.Tensor, values: torch.Tensor, codes: torch.Tensor) -> None:
    k, groups = x.shape[-1], values.shape[2]
    if k != 4 * groups:
        raise ValueError(f"x has {k} inputs, the 2:4 weight {4 * groups}")
    if values.stride(2) != 1 or codes.stride(1) != 1:
        raise ValueError(
            f"our 2:4 layout needs unit stride along K/4: values strides {tuple(values.stride())}, codes strides "
            f"{tuple(codes.stride())} (pass .contiguous() tensors, as serving.layout.pack_24 makes them)"
        )


def launches(x, values, codes, out, partials, bias, config: KernelConfig, scale_x=None, scale_w=None) -> list[Launch]:
    """Every launch of one ``linear24`` call, in order: the ``gemv``/``mma``/``decode`` launch, then split-K's
    ``reduce`` (``partials``: its ``[split, M, N]`` float32 buffer, ``None`` without split-K). The tensors need
    only ``shape``, ``stride``, ``dtype`` and ``data_ptr``: ``serving.aot`` passes stand-ins."""
    m, n, groups = x.shape[0], values.shape[1], values.shape[2]
    has_bias, scaled = bias is not None, scale_x is not None
    if config.kernel == "decode":
        args, meta, grid = decode24.launch_args(x, values, codes, out, bias, scale_x, scale_w, config.block_m,
                                                config.num_warps)  # fmt: skip
        return [Launch("decode", grid, args, meta, config.num_warps, 1)]
    split = config.split_k
    target = out if split == 1 else partials
    unused = values  # a pointer never read (no bias, no scales)
    vec_x, vec_v = _vec(x.stride(0), x.element_size()), _vec(values.stride(1), values.element_size())
    vec_p, vec_c = _vec(values.stride(0), values.element_size()), _vec(codes.stride(0), codes.element_size())
    args = (x, values, codes, target, bias if has_bias else unused, scale_x if scaled else unused)
    args += (scale_w if scaled else unused, m, n, groups, x.stride(0) // vec_x, values.stride(0) // vec_p)
    args += (values.stride(1) // vec_v, codes.stride(0) // vec_c, m * n if split > 1 else 0, out.stride(0), split)
    meta = dict(ADD_BIAS=has_bias and split == 1, HAS_SCALES=scaled, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    meta |= dict(BLOCK_G=config.block_g, WIDE_CODES=config.wide_codes, VEC_X=vec_x, VEC_P=vec_p, VEC_V=vec_v)
    meta |= dict(VEC_C=vec_c)
    if config.kernel == "gemv":
        grid = (-(-n // config.block_n), split)
    else:
        grid = (-(-m // config.block_m), -(-n // config.block_n), split)
    found = [Launch(config.kernel, grid, args, meta, config.num_warps, config.num_stages)]
    if split > 1:
        block = 1024
        reduce_args = (partials, out, bias if has_bias else unused, m * n, n)
        reduce_meta = dict(HAS_BIAS=has_bias, SPLIT_K=split, BLOCK=block)
        found.append(Launch("reduce", (-(-m * n // block),), reduce_args, reduce_meta, 4, 3))
    return found


def linear24(
    x: torch.Tensor,
    values: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None,
    config: KernelConfig,
    scale_x: torch.Tensor | None = None,
    scale_w: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ Wᵀ (+ bias)`` for ``x`` ``[M, K]`` and the 2:4 ``W`` ``[N, K]`` in our layout (``values``
    ``[2, N, K/4]``, ``codes``, unit stride along K/4): ``[M, N]`` in ``out_dtype`` (default ``x``'s),
    accumulated in float32.

    FP8 (W8A8): ``x`` and ``values`` in ``float8_e4m3fn`` with ``scale_x`` ``[M]`` (per token) and ``scale_w``
    ``[N]`` (per output channel), float32: the product is ``(x_q · W_qᵀ) · scale_x ⊗ scale_w``, as vLLM's."""
    ok, reason = available(x.device, values.dtype)
    if not ok:
        raise RuntimeError(f"our 2:4 kernels cannot run here: {reason}")
    _check_layout(x, values, codes)
    refused = config.refuse_for(values.dtype)
    if refused:
        raise ValueError(f"{config}: {refused}")
    m, n = x.shape[0], values.shape[1]
    if config.kernel == "gemv" and m > config.block_m:
        raise ValueError(f"gemv with block_m={config.block_m} takes at most {config.block_m} tokens, got {m}")
    if (scale_x is None) != (scale_w is None):
        raise ValueError("FP8 needs both scales: scale_x per token and scale_w per output channel")
    if scale_x is not None:
        scale_x, scale_w = scale_x.reshape(-1).float(), scale_w.reshape(-1).float()
    x = x.contiguous()
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    split = config.split_k if config.kernel != "decode" else 1
    partials = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else None
    for launch in launches(x, values, codes, out, partials, bias, config, scale_x, scale_w):
        launch.run()
    return out


def unpack_launch(values, codes, out, block_n: int = 32, block_g: int = 32) -> Launch:
    n, groups = values.shape[1], values.shape[2]
    vec_p, vec_v = _vec(values.stride(0), values.element_size()), _vec(values.stride(1), values.element_size())
    vec_c = _vec(codes.stride(0), codes.element_size())
    args = (values, codes, out, n, groups, values.stride(0) // vec_p, values.stride(1) // vec_v)
    args += (codes.stride(0) // vec_c, out.stride(0))
    meta = dict(BLOCK_N=block_n, BLOCK_G=block_g, VEC_P=vec_p, VEC_V=vec_v, VEC_C=vec_c)
    return Launch("unpack", (-(-n // block_n), -(-groups // block_g)), args, meta)


def unpack24(values: torch.Tensor, codes: torch.Tensor, block_n: int = 32, block_g: int = 32) -> torch.Tensor:
    """The dense weight ``[N, K]`` from our layout, on the device (exact)."""
    ok, reason = available(values.device, values.dtype)
    if not ok:
        raise RuntimeError(f"our 2:4 kernels cannot run here: {reason}")
    n, groups = values.shape[1], values.shape[2]
    out = torch.empty(n, 4 * groups, dtype=values.dtype, device=values.device)
    unpack_launch(values, codes, out, block_n, block_g).run()
    return out


def quantize_launch(x, x_q, scale, fp8_max: float, min_scale: float) -> Launch:
    m, k = x.shape
    block = min(1024, _pow2_at_least(k))
    meta = dict(FP8_MAX=fp8_max, MIN_SCALE=min_scale, BLOCK=block)
    return Launch("quantize", (m,), (x, x_q, scale, k, x.stride(0), x_q.stride(0)), meta)


def quantize_tokens(x: torch.Tensor, fp8_max: float, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, scale)``: ``x`` ``[M, K]`` quantized per token to float8_e4m3fn in one launch (``scale`` ``[M]``
    float32 = max(amax/fp8_max, min_scale)); bit-identical to ``serving.sparse_op.quantize_tokens``'s PyTorch."""
    ok, reason = available(x.device, FP8)
    if not ok:
        raise RuntimeError(f"our 2:4 kernels cannot run here: {reason}")
    m, k = x.shape
    x_q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        quantize_launch(x, x_q, scale, fp8_max, min_scale).run()
    return x_q, scale
