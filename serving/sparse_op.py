"""One sparse linear op for serving: ``torch.ops.apt_sparse.linear24``, and the module that holds its weights.

The op is a ``torch.library`` custom op, so CUDA graphs, ``torch.compile`` and vLLM's compiled path see one
opaque call (its fake implementation gives the output's shape). Each call looks up the number of tokens M
in the layer's *dispatch* (bands of M, each with a path and its launch) and runs that path:

=============  ==========================================================================================
``dense``      cuBLAS on the dense weight (``F.linear``)
``apt-decode`` our decode kernel (``serving.decode24``, tensor cores, one launch), M ≤ 64; only in a
               dispatch the GPU suite measured (it checked the kernel against the reference there)
``apt-gemv``   our CUDA-core decode kernel (``serving.triton24``), M ≤ 8
``apt-mma``    our tensor-core kernel over the same compressed layout, any M ≥ 1
``cusparselt`` cuSPARSELt on its own compressed copy, with the algorithm chosen at load, through our
               plan cache (``serving.cslt_plans``: eager calls do not rebuild the plan, as
               ``torch._cslt_sparse_mm`` does at ~0.45 ms a call on PyTorch ≤ 2.11)
``apt-unpack`` our layout decompressed on the device into a transient buffer, then cuBLAS
=============  ==========================================================================================

Two memory modes:

- ``speed-first`` keeps the dense weight for the bands where dense wins (and cuSPARSELt's copy where a band
  uses it): about 1.56× (or 2.1×) the dense bytes, never slower than dense where the dispatch was measured.
- ``memory-first`` keeps only our layout (0.5625× the dense bytes in fp16/bf16): ``apt-*`` paths only.

Where nothing was measured, ``speed-first`` is dense everywhere and ``memory-first`` takes ``apt-gemv`` up to
8 tokens (its launch sized by M: 1, 2, 4 or 8), ``apt-mma`` up to 255 and ``apt-unpack`` from 256 (an
unmeasured default, said as such);
``runtime_bench.gpu_suite`` measures the bands per shape (graphed) and writes them to a dispatch file.
Where a path cannot run (a CPU), the ``apt-*`` paths compute the same product through the dense weight
unpacked by PyTorch, and a ``cusparselt`` band falls back to the dense weight. An FP8 layer on a GPU without
FP8 (before sm89: no FP8 tensor cores, no Triton float8, no ``torch._scaled_mm``) is served W8A16, as vLLM
serves FP8 checkpoints on Ampere: its weight dequantised (``q · scale``) and multiplied with the unquantised
inputs, whatever the band says (``fp8_fallback`` gives the line reports print).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apt.solver.fp8 import FP8, FP8_MAX, MIN_TOKEN_SCALE, dequantize_weight, quantize_activations
from serving import cslt_plans, triton24
from serving.kernels import cusparselt
from serving.layout import Packed24, check_24, pack_24, unpack_24
from serving.triton24 import KernelConfig

PATHS = ("dense", "apt-gemv", "apt-mma", "cusparselt", "apt-unpack", "apt-decode")
SPEED_FIRST, MEMORY_FIRST = "speed-first", "memory-first"
MODES = (SPEED_FIRST, MEMORY_FIRST)
MEMORY_FIRST_PATHS = ("apt-gemv", "apt-mma", "apt-unpack", "apt-decode")
KERNEL_PATHS = {"apt-gemv": "gemv", "apt-mma": "mma", "apt-decode": "decode"}
_WORDS = 9  # per band in the op's plan: start, path, and 7 launch integers
CSLT_PAD = 16  # cuSPARSELt wants the token count padded to this


@dataclass(frozen=True)
class Band:
    """Token counts from ``start`` on (until the next band) run ``path``: a ``gemv``/``mma`` launch
    ``config`` for the ``apt-gemv``/``apt-mma`` paths, cuSPARSELt's ``alg_id`` for ``cusparselt``."""

    start: int
    path: str
    config: KernelConfig | None = None
    alg_id: int = 0

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path {self.path!r}: one of {', '.join(PATHS)}")
        if self.start < 1:
            raise ValueError(f"a band starts at 1 token or more, not {self.start}")
        kernel = KERNEL_PATHS.get(self.path)
        if kernel and (self.config is None or self.config.kernel != kernel):
            raise ValueError(f"a {self.path} band needs a {kernel} KernelConfig")
        if self.path == "apt-gemv" and self.start > self.config.block_m:
            raise ValueError(f"an apt-gemv band from {self.start} tokens needs block_m >= the tokens it serves")

    def as_dict(self) -> dict:
        out = {"start": self.start, "path": self.path}
        if self.config is not None:
            out["config"] = self.config.as_dict()
        if self.path == "cusparselt":
            out["alg_id"] = self.alg_id
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Band:
        config = KernelConfig(**data["config"]) if data.get("config") else None
        return cls(int(data["start"]), data["path"], config, int(data.get("alg_id", 0)))


@dataclass(frozen=True)
class Dispatch:
    """Bands of token counts, the first from 1; ``origin`` says where they came from (measured or not)."""

    bands: tuple[Band, ...]
    origin: str = "unmeasured default"

    def __post_init__(self):
        starts = tuple(b.start for b in self.bands)
        if not starts or starts[0] != 1 or list(starts) != sorted(set(starts)):
            raise ValueError(f"dispatch bands must start at 1 and rise: {starts}")
        for band, nxt in zip(self.bands, self.bands[1:] + (None,)):
            if band.path == "apt-gemv" and (nxt is None or nxt.start - 1 > band.config.block_m):
                raise ValueError(f"the apt-gemv band from {band.start} must end by {band.config.block_m} tokens")

    def band_for(self, tokens: int) -> Band:
        chosen = self.bands[0]
        for band in self.bands:
            if tokens >= band.start:
                chosen = band
        return chosen

    @property
    def paths(self) -> set[str]:
        return {b.path for b in self.bands}

    def check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: {' or '.join(MODES)}")
        if mode == MEMORY_FIRST and not self.paths <= set(MEMORY_FIRST_PATHS):
            raise ValueError(
                f"memory-first keeps only our compressed layout; this dispatch uses {sorted(self.paths)}: "
                f"use {', '.join(MEMORY_FIRST_PATHS)}"
            )

    def encode(self) -> list[int]:
        """The op's ``plan``: nine integers a band (start, path, then the launch or cuSPARSELt's algorithm)."""
        plan = []
        for b in self.bands:
            launch = b.config.as_list() if b.config is not None else [b.alg_id, 0, 0, 0, 0, 0, 0]
            plan += [b.start, PATHS.index(b.path), *launch]
        return plan

    def as_dict(self) -> dict:
        return {"origin": self.origin, "bands": [b.as_dict() for b in self.bands]}

    @classmethod
    def from_dict(cls, data: dict) -> Dispatch:
        return cls(tuple(Band.from_dict(b) for b in data["bands"]), data.get("origin", "a dispatch file"))

    def describe(self) -> str:
        parts = []
        for band, nxt in zip(self.bands, self.bands[1:] + (None,)):
            upto = f"-{nxt.start - 1}" if nxt is not None else "+"
            parts.append(f"M {band.start}{upto}: {band.path}")
        return "; ".join(parts)


@functools.lru_cache(maxsize=4096)
def _decoded(plan: tuple[int, ...]) -> tuple[tuple[int, str, KernelConfig | None, int], ...]:
    bands = []
    for i in range(0, len(plan), _WORDS):
        start, path, *launch = plan[i : i + _WORDS]
        name = PATHS[path]
        config = KernelConfig.from_list(launch) if name in KERNEL_PATHS else None
        bands.append((start, name, config, launch[0]))
    return tuple(bands)


def dense_dispatch() -> Dispatch:
    return Dispatch((Band(1, "dense"),), "dense everywhere (nothing measured: speed-first is never slower)")


def memory_first_default(n: int, k: int) -> Dispatch:
    """Our layout only, by rule of thumb: gemv to 8 tokens (its launch sized by M: a one-token call never pays
    the select work of eight), mma to 255, unpack + cuBLAS from 256. Never ``apt-decode``: only a dispatch the
    GPU suite measured, having checked that kernel against the reference on the device, names it."""
    gemv = [Band(start, "apt-gemv", triton24.default_config("gemv", start, n, k)) for start in (1, 2, 3, 5)]
    return Dispatch(
        (*gemv, Band(9, "apt-mma", triton24.default_config("mma", 64, n, k)), Band(256, "apt-unpack")),
        "unmeasured default (gemv ≤ 8 sized by M, mma ≤ 255, unpack from 256)",
    )


def from_threshold(threshold: int | None) -> Dispatch:
    """A measured threshold of the older decode-safe rule: dense below it, cuSPARSELt from it (``None``: dense)."""
    if threshold is None:
        return dense_dispatch()
    bands = (Band(threshold, "cusparselt"),) if threshold <= 1 else (Band(1, "dense"), Band(threshold, "cusparselt"))
    return Dispatch(bands, f"cuSPARSELt from {threshold} tokens (measured threshold)")


FP8_MIN_SCALE = MIN_TOKEN_SCALE  # vLLM's floor for a dynamic per-token scale (apt.solver.fp8)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 quantization of ``x`` ``[M, K]`` as vLLM's FP8 path does it
    (``apt.solver.fp8.quantize_activations``): ``(x_q, scale)`` with ``scale`` ``[M]`` float32."""
    x_q, scale = quantize_activations(x)
    return x_q, scale.reshape(-1)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if not rows:
        return x
    if x.dtype == FP8:  # F.pad has no float8 kernel everywhere: pad the bits
        return F.pad(x.view(torch.uint8), (0, 0, 0, rows)).view(FP8)
    return F.pad(x, (0, 0, 0, rows)) if x.dim() == 2 else F.pad(x, (0, rows), value=1.0)


def fp8_linear(x_q, scale_x, weight, weight_scale, bias, out_dtype) -> torch.Tensor:
    """Dense FP8: ``torch._scaled_mm`` with per-token and per-channel scales (rows padded to 16)."""
    m = x_q.shape[0]
    pad = (-m) % CSLT_PAD
    x_q, scale_x = _pad_rows(x_q, pad), _pad_rows(scale_x, pad)
    out = torch._scaled_mm(
        x_q, weight.t(), scale_a=scale_x[:, None], scale_b=weight_scale[None, :], bias=bias, out_dtype=out_dtype
    )
    return out[:m] if pad else out


def _cslt_linear(x: torch.Tensor, compressed: torch.Tensor, n: int, bias, alg_id: int, scales=None, out_dtype=None):
    """cuSPARSELt on ``x`` ``[M, K]``: through our plan cache (``serving.cslt_plans``: no per-call plan rebuild,
    FP8's scales in the epilogue and one output pass) where its library loads, else PyTorch's
    ``_cslt_sparse_mm`` (which rebuilds its plan every eager call and, for FP8, makes a float32 product)."""
    if cslt_plans.available()[0]:
        scale_x, scale_w = scales if scales is not None else (None, None)
        return cslt_plans.sparse_mm(compressed, x, n, alg_id, None, bias, scale_w, scale_x, out_dtype)
    m = x.shape[0]
    pad = (-m) % CSLT_PAD
    padded = _pad_rows(x, pad)
    if scales is None:
        out = torch._cslt_sparse_mm(compressed, padded.t(), bias=bias, transpose_result=True, alg_id=alg_id)
        return out[:m] if pad else out
    out = torch._cslt_sparse_mm(compressed, padded.t(), out_dtype=torch.float32, transpose_result=True, alg_id=alg_id)
    out = out[:m] * scales[0][:, None] * scales[1][None, :]
    return (out + bias if bias is not None else out).to(out_dtype)


def _unpacked(values: torch.Tensor, codes: torch.Tensor, ours: bool) -> torch.Tensor:
    """The dense weight from our layout: our unpack kernel where it runs, else PyTorch (exact either way)."""
    if ours:
        return triton24.unpack24(values, codes)
    return unpack_24(Packed24(values, codes, 4 * values.shape[2]))


def fp8_fallback(device: torch.device | str) -> str | None:
    """Why FP8 layers on ``device`` are served W8A16 (the weight dequantised, the inputs not quantised), or
    ``None`` where they are served W8A8 as vLLM serves them on Hopper (emulated exactly on a CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= triton24.FP8_FROM:
        return None
    return (
        f"FP8 layers on sm{major}{minor} are served W8A16 (weights dequantised to the inputs' dtype, inputs not "
        "quantised), as vLLM serves FP8 checkpoints on Ampere: FP8 tensor cores, Triton's float8 and "
        "torch._scaled_mm start at sm89"
    )


def _run(band, x, values, codes, dense, compressed, bias, weight_scale) -> torch.Tensor:
    """One band's path on ``x`` ``[M, K]``. FP8 (``weight_scale`` given): ``x`` is quantized per token once and
    every path computes the same W8A8 product. Where a path cannot run here, the same product another way:
    cuSPARSELt falls back to dense (or unpack), our kernels to PyTorch on the unpacked weight; FP8 on a GPU
    without FP8 is W8A16 on every band (``fp8_fallback``)."""
    _, path, config, alg_id = band
    if weight_scale is not None and fp8_fallback(x.device):
        weight = dense if dense is not None else _unpacked(values, codes, ours=False)
        return F.linear(x, dequantize_weight(weight, weight_scale, x.dtype), bias)
    ours = triton24.available(x.device, values.dtype)[0]
    out_dtype, scale_x = x.dtype, None
    if weight_scale is not None:
        # one fused launch where our kernels run: decode pays it in every layer
        x, scale_x = triton24.quantize_tokens(x, FP8_MAX, FP8_MIN_SCALE) if ours else quantize_tokens(x)

    def dense_product(weight):
        if weight_scale is None:
            return F.linear(x, weight, bias)
        return fp8_linear(x, scale_x, weight, weight_scale, bias, out_dtype)

    if path == "cusparselt":
        if compressed is not None and x.is_cuda:
            scales = (scale_x, weight_scale) if weight_scale is not None else None
            return _cslt_linear(x, compressed, values.shape[1], bias, alg_id, scales, out_dtype)
        path = "dense" if dense is not None else "apt-unpack"
    if path == "dense":
        if dense is None:
            raise RuntimeError("apt_sparse::linear24: a dense band, but the layer keeps no dense weight (memory-first)")
        return dense_product(dense)
    if path == "apt-unpack" or not ours:
        return dense_product(_unpacked(values, codes, ours))
    return triton24.linear24(x, values, codes, bias, config, scale_x, weight_scale, out_dtype)


@torch.library.custom_op("apt_sparse::linear24", mutates_args=())
def linear24(
    x: torch.Tensor,
    values: torch.Tensor,
    codes: torch.Tensor,
    dense: torch.Tensor | None,
    compressed: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    plan: list[int],
) -> torch.Tensor:
    """``x @ Wᵀ (+ bias)`` for a 2:4 ``W`` ``[N, K]``: ``x`` ``[..., K]`` → ``[..., N]`` in ``x``'s dtype.

    ``values``/``codes``: ``W`` in our layout; ``dense``: ``W`` itself or ``None`` (memory-first);
    ``compressed``: cuSPARSELt's copy or ``None``; ``weight_scale``: ``None``, or for an FP8 ``W``
    (``float8_e4m3fn``) its per-output-channel scales ``[N]`` (float32), the activations then quantized per
    token as vLLM does (``quantize_tokens``); ``plan``: ``Dispatch.encode()``."""
    n, k = values.shape[1], x.shape[-1]
    flat = x.reshape(-1, k)
    if flat.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    chosen = None
    for band in _decoded(tuple(plan)):
        if flat.shape[0] >= band[0]:
            chosen = band
    out = _run(chosen, flat, values, codes, dense, compressed, bias, weight_scale)
    return out.reshape(*x.shape[:-1], n)


@linear24.register_fake
def _linear24_shape(x, values, codes, dense, compressed, bias, weight_scale, plan):
    return x.new_empty(*x.shape[:-1], values.shape[1])


class Sparse24Linear(torch.nn.Module):
    """A pruned Linear served by ``apt_sparse::linear24``: our layout always, the dense weight in
    ``speed-first`` mode, cuSPARSELt's copy where a band uses it and this machine runs it."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        mode: str = SPEED_FIRST,
        dispatch: Dispatch | None = None,
        weight_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        weight = weight.detach()
        check_24(weight)
        if (weight.dtype == FP8) != (weight_scale is not None):
            raise ValueError(
                f"an FP8 (float8_e4m3fn) weight needs its per-output-channel weight_scale, and only it takes one; "
                f"got a {weight.dtype} weight with{'out' if weight_scale is None else ''} a scale"
            )
        self.out_features, self.in_features = weight.shape
        dispatch = dispatch or (dense_dispatch() if mode == SPEED_FIRST else memory_first_default(*weight.shape))
        dispatch.check_mode(mode)
        for band in dispatch.bands:
            refused = band.config.refuse_for(weight.dtype) if band.config is not None else None
            if refused:
                raise ValueError(
                    f"the dispatch's band from {band.start} tokens cannot serve this {weight.dtype} layer: {refused}; "
                    "measure the shape again (runtime_bench.gpu_suite)"
                )
        self.mode, self.dispatch = mode, dispatch
        packed = pack_24(weight)
        self.register_buffer("values", packed.values)
        self.register_buffer("codes", packed.codes)
        self.register_buffer("dense", weight if mode == SPEED_FIRST else None)
        self.register_buffer("bias", bias.detach() if bias is not None else None)
        scale = weight_scale.detach().float().reshape(-1) if weight_scale is not None else None
        self.register_buffer("weight_scale", scale)
        self.compressed = None
        if "cusparselt" in dispatch.paths and weight.is_cuda and cusparselt().available:
            self.register_buffer("compressed", torch._cslt_compress(weight))
        self.plan = dispatch.encode()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: str = SPEED_FIRST, dispatch: Dispatch | None = None):
        return cls(linear.weight.data, linear.bias.data if linear.bias is not None else None, mode, dispatch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The op on ``x`` with ``bias`` (the vLLM plugin passes the layer's own bias; ``nn.Module.apply`` is
        another thing, hence the name)."""
        op = torch.ops.apt_sparse.linear24
        return op(x, self.values, self.codes, self.dense, self.compressed, bias, self.weight_scale, self.plan)

    def unpacked(self) -> torch.Tensor:
        """The dense weight ``[out, in]``, from our layout (exact)."""
        return _unpacked(self.values, self.codes, ours=False)

    def path_for(self, tokens: int) -> str:
        """The path a call with ``tokens`` tokens takes on this layer's device."""
        if self.weight_scale is not None and fp8_fallback(self.values.device):
            return "fp8-w8a16"
        path = self.dispatch.band_for(tokens).path
        if path == "cusparselt" and self.compressed is None:
            return "dense" if self.dense is not None else "apt-unpack"
        return path

    def weight_bytes(self) -> int:
        """Bytes the layer keeps between calls (not the bias): our layout, the copies its mode keeps, FP8 scales."""
        kept = (self.values, self.codes, self.dense, self.compressed, self.weight_scale)
        return sum(t.numel() * t.element_size() for t in kept if t is not None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}, {self.dispatch.describe()}"


def shape_key(in_features: int, out_features: int) -> str:
    return f"{in_features}x{out_features}"


def load_dispatches(path: Path | str, mode: str) -> dict[str, Dispatch]:
    """Per ``"{in}x{out}"`` shape, the dispatch of ``mode`` in a file ``runtime_bench.gpu_suite`` wrote
    (``{"shapes": {shape: {mode: {"bands": [...]}}}}``)."""
    data = json.loads(Path(path).read_text())
    try:
        return {shape: Dispatch.from_dict(modes[mode]) for shape, modes in data["shapes"].items() if mode in modes}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a dispatch file ({err}); run runtime_bench.gpu_suite again") from err
