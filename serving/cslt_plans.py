"""cuSPARSELt through its C API, with our own handle and plan cache: an eager 2:4 GEMM that does not rebuild its
descriptors, plan and workspace on every call, as ``torch._cslt_sparse_mm`` does (about 0.45 ms a call on
PyTorch <= 2.11, measured on the H200; the PyTorch PRs that would cache them, #177866 and #179642, were closed
unmerged).

The library is the ``libcusparseLt.so.0`` PyTorch's CUDA build already loaded (asked for without loading it
again), else the one an ``nvidia-cusparselt`` wheel installed; its functions are declared here with ctypes
from ``cusparseLt.h`` (0.6 to 0.10 share them). The operands are described exactly as PyTorch's
``_cslt_sparse_mm(compressed, x.t(), transpose_result=True)`` describes them, so the compressed weight
``torch._cslt_compress`` makes is the one our plans read:

- A, structured 50 %: the weight ``[N, K]``, row-major, leading dimension K;
- B: the inputs ``[M, K]`` row-major, transposed by the GEMM (``opB = TRANSPOSE``);
- D: the output ``[M, N]`` row-major, described as ``[N, M]`` column-major.

A plan depends on the device, the dtypes, N, K, M (padded to 16 as the op pads it), the algorithm, the split
of K and whether alpha is a vector: ``PlanKey`` is exactly that, and ``PlanCache`` keeps the ``capacity`` most
recently used plans, each with its workspace, destroying the one it evicts. Nothing that changes per layer
or per call is in a plan: the weight, inputs, output and the alpha vector are arguments of each
``cusparseLtMatmul``; the bias and FP8's per-token scales are applied in one pass over the output after it.
FP8 (W8A8): the per-output-channel weight scales are cuSPARSELt's alpha vector (its epilogue scales each row
of D), the output is the 16-bit dtype asked for, and the per-token scales multiply it in that one pass —
never a float32 ``[M, N]`` round trip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

OPAQUE_BYTES = 1024  # cusparseLt's opaque structs are 512 bytes in 0.8-0.10, 1024 before: room for either
SONAME = "libcusparseLt.so.0"
# enums of cusparseLt.h and library_types.h
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF, CUDA_R_8F_E4M3 = 0, 2, 14, 28
CUSPARSE_ORDER_COL, CUSPARSE_ORDER_ROW = 1, 2
CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_TRANSPOSE = 0, 1
CUSPARSELT_SPARSITY_50_PERCENT = 0
CUSPARSE_COMPUTE_32F = 2
CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING = 5
CUSPARSELT_MATMUL_ALG_DEFAULT = 0
CUSPARSELT_MATMUL_ALG_CONFIG_ID, CUSPARSELT_MATMUL_SPLIT_K = 0, 3
PAD = 16  # cuSPARSELt wants the token count padded to this (as serving.sparse_op pads it)
DATA_TYPES = {torch.float16: CUDA_R_16F, torch.bfloat16: CUDA_R_16BF, torch.float8_e4m3fn: CUDA_R_8F_E4M3}

# name: argument types (every function returns cusparseStatus_t, an int, but the two error-name ones)
_P, _I64, _U32, _I32, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t
SIGNATURES = {
    "cusparseLtInit": [_P],
    "cusparseLtDestroy": [_P],
    "cusparseLtGetVersion": [_P, ctypes.POINTER(ctypes.c_int)],
    "cusparseLtDenseDescriptorInit": [_P, _P, _I64, _I64, _I64, _U32, _I32, _I32],
    "cusparseLtStructuredDescriptorInit": [_P, _P, _I64, _I64, _I64, _U32, _I32, _I32, _I32],
    "cusparseLtMatDescriptorDestroy": [_P],
    "cusparseLtMatmulDescriptorInit": [_P, _P, _I32, _I32, _P, _P, _P, _P, _I32],
    "cusparseLtMatmulDescSetAttribute": [_P, _P, _I32, _P, _SZ],
    "cusparseLtMatmulAlgSelectionInit": [_P, _P, _P, _I32],
    "cusparseLtMatmulAlgSelectionDestroy": [_P],
    "cusparseLtMatmulAlgSetAttribute": [_P, _P, _I32, _P, _SZ],
    "cusparseLtMatmulGetWorkspace": [_P, _P, ctypes.POINTER(_SZ)],
    "cusparseLtMatmulPlanInit": [_P, _P, _P, _P],
    "cusparseLtMatmulPlanDestroy": [_P],
    "cusparseLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.POINTER(_P), _I32],
}


class CusparseLtError(RuntimeError):
    """A cuSPARSELt call returned an error status (its name and the library's words for it)."""


@dataclass(frozen=True)
class Library:
    """The loaded library: ``path`` it came from, its functions as ctypes callables."""

    path: str
    dll: ctypes.CDLL

    def call(self, name: str, *args) -> None:
        status = getattr(self.dll, name)(*args)
        if status != 0:
            raise CusparseLtError(f"{name} failed: {self.error_name(status)} ({self.error_string(status)})")

    def error_name(self, status: int) -> str:
        return (self.dll.cusparseLtGetErrorName(status) or b"unknown status").decode()

    def error_string(self, status: int) -> str:
        return (self.dll.cusparseLtGetErrorString(status) or b"").decode()


_LOCK = threading.Lock()
_LIBRARY: Library | None = None


def _candidates() -> list[str]:
    """Where the library may be: the copy already in this process, the nvidia wheels' folders, the linker's."""
    found = []
    for entry in map(Path, __import__("sys").path):
        found += sorted(glob.glob(str(entry / "nvidia" / "*" / "lib" / SONAME)))
    system = ctypes.util.find_library("cusparseLt")
    return found + ([system] if system else [])


def library() -> Library:
    """cuSPARSELt's C library, loaded once per process; ``CusparseLtError`` says why where it cannot be."""
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is not None:
            return _LIBRARY
        dll, path, tried = None, None, []
        try:  # the copy PyTorch's CUDA build loaded: the same library, not a second one
            dll, path = ctypes.CDLL(SONAME, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL), f"{SONAME} (already loaded)"
        except OSError as err:
            tried.append(f"{SONAME} not loaded in this process ({err})")
        for candidate in [] if dll is not None else _candidates():
            try:
                dll, path = ctypes.CDLL(candidate), candidate
                break
            except OSError as err:
                tried.append(f"{candidate}: {err}")
        if dll is None:
            why = "; ".join(tried or ["no candidate found"])
            raise CusparseLtError(f"cuSPARSELt is not installed here (PyTorch's CUDA build brings it): {why}")
        for name, argtypes in SIGNATURES.items():
            function = getattr(dll, name)  # AttributeError names a symbol this library lacks
            function.argtypes, function.restype = argtypes, ctypes.c_int
        for name in ("cusparseLtGetErrorName", "cusparseLtGetErrorString"):
            getattr(dll, name).argtypes, getattr(dll, name).restype = [ctypes.c_int], ctypes.c_char_p
        _LIBRARY = Library(path, dll)
        return _LIBRARY


def _opaque():
    return ctypes.create_string_buffer(OPAQUE_BYTES)  # malloc'd: 16-byte aligned, as the structs ask


_HANDLES: dict[tuple[int, int], ctypes.Array] = {}


def handle(device: int):
    """One handle per thread and device, initialised on first use (as PyTorch keeps its own, thread-local)."""
    key = (threading.get_ident(), device)
    if key not in _HANDLES:
        buffer = _opaque()
        with torch.cuda.device(device):
            library().call("cusparseLtInit", buffer)
        _HANDLES[key] = buffer
    return _HANDLES[key]


@dataclass(frozen=True)
class PlanKey:
    """What a cuSPARSELt plan depends on: nothing else goes into one."""

    device: int
    dtype: torch.dtype  # A and B
    out_dtype: torch.dtype  # D
    n: int
    k: int
    m: int  # padded to PAD
    alg_id: int = 0
    split_k: int | None = None
    alpha_vector: bool = False  # FP8: alpha is the per-output-channel scale vector

    def __post_init__(self):
        if self.dtype not in DATA_TYPES or self.out_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"cuSPARSELt plans take fp16/bf16/FP8 inputs and a 16-bit output, not {self}")
        if self.m % PAD or min(self.n, self.k, self.m) <= 0:
            raise ValueError(f"a plan's M is padded to {PAD} and every size positive: {self}")


class Plan:
    """A matmul plan with its descriptors and workspace (built by ``PlanCache`` on a miss)."""

    def __init__(self, key: PlanKey):
        lib, self.key = library(), key
        self.handle = handle(key.device)
        self.a, self.b, self.d = _opaque(), _opaque(), _opaque()
        self.matmul, self.selection, self.plan = _opaque(), _opaque(), _opaque()
        self._made = []
        dtype, out = DATA_TYPES[key.dtype], DATA_TYPES[key.out_dtype]
        lib.call("cusparseLtStructuredDescriptorInit", self.handle, self.a, key.n, key.k, key.k, 16, dtype,
                 CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT)  # fmt: skip
        self._made.append(("cusparseLtMatDescriptorDestroy", self.a))
        lib.call("cusparseLtDenseDescriptorInit", self.handle, self.b, key.m, key.k, key.k, 16, dtype,
                 CUSPARSE_ORDER_ROW)  # fmt: skip
        self._made.append(("cusparseLtMatDescriptorDestroy", self.b))
        lib.call("cusparseLtDenseDescriptorInit", self.handle, self.d, key.n, key.m, key.n, 16, out, CUSPARSE_ORDER_COL)
        self._made.append(("cusparseLtMatDescriptorDestroy", self.d))
        lib.call("cusparseLtMatmulDescriptorInit", self.handle, self.matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                 CUSPARSE_OPERATION_TRANSPOSE, self.a, self.b, self.d, self.d, CUSPARSE_COMPUTE_32F)  # fmt: skip
        if key.alpha_vector:
            mode = ctypes.c_int(1)
            lib.call("cusparseLtMatmulDescSetAttribute", self.handle, self.matmul,
                     CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING, ctypes.byref(mode), ctypes.sizeof(mode))  # fmt: skip
        lib.call("cusparseLtMatmulAlgSelectionInit", self.handle, self.selection, self.matmul,
                 CUSPARSELT_MATMUL_ALG_DEFAULT)  # fmt: skip
        self._made.append(("cusparseLtMatmulAlgSelectionDestroy", self.selection))
        for attribute, value in ((CUSPARSELT_MATMUL_ALG_CONFIG_ID, key.alg_id), (CUSPARSELT_MATMUL_SPLIT_K,
                                                                                  key.split_k)):  # fmt: skip
            if value is not None:
                number = ctypes.c_int(value)
                lib.call("cusparseLtMatmulAlgSetAttribute", self.handle, self.selection, attribute,
                         ctypes.byref(number), ctypes.sizeof(number))  # fmt: skip
        lib.call("cusparseLtMatmulPlanInit", self.handle, self.plan, self.matmul, self.selection)
        self._made.append(("cusparseLtMatmulPlanDestroy", self.plan))
        size = ctypes.c_size_t(0)
        lib.call("cusparseLtMatmulGetWorkspace", self.handle, self.plan, ctypes.byref(size))
        self.workspace = torch.empty(max(size.value, 1), dtype=torch.uint8, device=f"cuda:{key.device}")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def run(self, compressed: torch.Tensor, x: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor | None) -> None:
        """``out`` ``[M, N]`` = ``x`` ``[M, K]`` · Aᵀ (times ``alpha`` ``[N]`` where the plan scales by a vector), on
        the current stream."""
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        alpha_ptr = ctypes.c_void_p(alpha.data_ptr()) if self.key.alpha_vector else ctypes.byref(self.alpha)
        library().call("cusparseLtMatmul", self.handle, self.plan, alpha_ptr, compressed.data_ptr(), x.data_ptr(),
                       ctypes.byref(self.beta), out.data_ptr(), out.data_ptr(), self.workspace.data_ptr(),
                       ctypes.byref(stream), 1)  # fmt: skip

    def destroy(self) -> None:
        lib = library()
        while self._made:
            name, buffer = self._made.pop()
            lib.call(name, buffer)


class PlanCache:
    """The ``capacity`` most recently used values by key, built on a miss, destroyed on eviction (``destroy``
    where the value has one), with hit, miss and eviction counts."""

    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"a plan cache holds at least one plan, not {capacity}")
        self.capacity, self._plans = capacity, OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            if key in self._plans:
                self.hits += 1
                self._plans.move_to_end(key)
                return self._plans[key]
            self.misses += 1
            value = build(key)
            self._plans[key] = value
            while len(self._plans) > self.capacity:
                _, old = self._plans.popitem(last=False)
                self.evictions += 1
                getattr(old, "destroy", lambda: None)()
            return value

    def keys(self) -> list:
        return list(self._plans)

    def info(self) -> dict:
        return {"plans": len(self._plans), "capacity": self.capacity, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}  # fmt: skip


PLANS = PlanCache(int(os.environ.get("APT_SPARSE_CSLT_PLANS", "256")))


def available() -> tuple[bool, str]:
    """Whether our cached cuSPARSELt path can run here (a CUDA GPU and the library), and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    if os.environ.get("APT_SPARSE_CSLT") == "torch":
        return False, "APT_SPARSE_CSLT=torch: PyTorch's _cslt_sparse_mm asked for"
    try:
        return True, library().path
    except (CusparseLtError, AttributeError) as err:
        return False, str(err)


def sparse_mm(compressed, x, n: int, alg_id: int = 0, split_k=None, bias=None, scale_w=None, scale_x=None,
              out_dtype=None) -> torch.Tensor:  # fmt: skip
    """``x`` ``[M, K]`` times the 2:4 weight ``[N, K]`` that ``torch._cslt_compress`` made ``compressed``: ``[M, N]``
    in ``out_dtype`` (``x``'s for fp16/bf16). FP8: ``x`` float8_e4m3fn with ``scale_x`` ``[M]`` and ``scale_w``
    ``[N]`` float32 — ``scale_w`` as cuSPARSELt's alpha vector, ``scale_x`` and ``bias`` in one output pass."""
    m, k = x.shape
    fp8 = x.dtype == torch.float8_e4m3fn
    if fp8 != (scale_w is not None and scale_x is not None):
        raise ValueError("FP8 inputs need scale_x per token and scale_w per output channel, and only they take them")
    out_dtype = out_dtype or (torch.bfloat16 if fp8 else x.dtype)
    pad = (-m) % PAD
    if pad:  # float8 has no pad kernel everywhere: pad its bits
        x = torch.nn.functional.pad(x.contiguous().view(torch.uint8), (0, 0, 0, pad)).view(x.dtype)
    x = x.contiguous()
    key = PlanKey(x.device.index or 0, x.dtype, out_dtype, n, k, m + pad, alg_id, split_k, fp8)
    plan = PLANS.get(key, Plan)
    out = torch.empty(m + pad, n, dtype=out_dtype, device=x.device)
    plan.run(compressed, x, out, scale_w.float().contiguous() if fp8 else None)
    out = out[:m]
    if fp8:  # the one output pass: per-token scales (and the bias), rounded once
        scale = scale_x.to(out_dtype)[:, None]
        return torch.addcmul(bias.to(out_dtype), out, scale) if bias is not None else out * scale
    return out + bias if bias is not None else out
