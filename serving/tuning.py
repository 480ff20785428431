"""Measuring the sparse op's paths for one weight shape, and choosing its dispatch from what was measured.

``measure_shape`` times every path of ``serving.sparse_op`` at each token count M — dense (cuBLAS),
cuSPARSELt (its algorithm searched), our ``decode``, ``gemv`` and ``mma`` kernels (their launch tuned over
``triton24.candidates``) and ``apt-unpack`` — replayed as CUDA graphs (how servers run decode) and eagerly,
and checks each against the reference product: a path whose error exceeds its dtype's tolerance is recorded
as rejected and never chosen (this is where the decode kernel, which the interpreter cannot run compiled, is
first checked on the device). Method: random inputs, never zeros; every path is timed on
several copies of the weight in turn, enough copies to exceed the L2 cache, so no path is timed from
cache (a real model's next layer is never in L2); warm-up first; CUDA events; the median of the repeats.
On a CPU (the tests) the same code times eagerly with a host clock and says graphs were not measured.

``bands_from`` turns the graphed times into a ``Dispatch`` per memory mode: at each measured M the fastest
path the mode may hold (a sparse path must beat dense by ``MARGIN`` in speed-first), and from one
measured M to the next the choice made at the larger one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from serving import triton24
from serving.kernels import cusparselt
from serving.layout import pack_24
from serving.sparse_op import (
    FP8,
    KERNEL_PATHS,
    MEMORY_FIRST_PATHS,
    SPEED_FIRST,
    Band,
    Dispatch,
    _pad_rows,
    _run,
    quantize_tokens,
)
from serving.timing import summary
from serving.triton24 import GEMV_MAX_M, TOKEN_TILES, KernelConfig

PROBE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
GEMV_TUNE_MS = (1, 2, 4, 8)
DECODE_TUNE_MS = (1, 16, 64)
MMA_TUNE_MS = (16, 64, 256, 1024, 4096)
# A path's relative error against the reference over which it is rejected: several times the output's own
# rounding (fp16 2⁻¹¹, bf16 2⁻⁸), far below what a wrong kernel gives (order 1).
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
CSLT_SEARCH_MS = (16, 256, 4096)
UNPACK_FROM = 64  # apt-unpack writes the whole dense weight: below this M it cannot win, and is not timed
ROTATE_BYTES = 256 << 20  # weights touched per round of timing: several times an H200's 50 MB L2
MARGIN = 1.02  # a sparse path must beat dense by 2 % to count as faster: timing noise is not a win


def time_calls(calls: list[Callable[[], object]], graphed: bool, repeats: int = 10, cuda: bool = True) -> dict:
    """Milliseconds per call of ``calls`` run in turn: captured once as one CUDA graph and replayed
    (``graphed``), or launched eagerly. The median of ``repeats`` rounds, after warm-up. ``cuda``: the calls
    run on a CUDA device (timed with CUDA events), else on the CPU (a host clock)."""
    if graphed and not cuda:
        raise RuntimeError("CUDA graphs need a CUDA device")
    for fn in calls:  # warm-up: compiles, plans, allocator pools
        fn()
    if cuda:
        torch.cuda.synchronize()
    run = lambda: [fn() for fn in calls]  # noqa: E731
    if graphed:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
        run()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / len(calls))
        else:
            began = time.perf_counter()
            run()
            samples.append((time.perf_counter() - began) * 1e3 / len(calls))
    return summary(samples)


def _reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None) -> torch.Tensor:
    """The product every path must give: float64 on the CPU, float32 on a GPU; FP8 as W8A8 (per-token
    quantized inputs, per-channel weight scales)."""
    wide = torch.float32 if weight.is_cuda else torch.float64
    if weight_scale is None:
        return F.linear(x.to(wide), weight.to(wide))
    x_q, scale_x = quantize_tokens(x)
    return F.linear(x_q.to(wide) * scale_x[:, None].to(wide), weight.to(wide) * weight_scale[:, None].to(wide))


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


class _Copies:
    """Several copies of one 2:4 weight in every form the paths read (dense, our layout, cuSPARSELt's), and
    its FP8 scales where it is FP8."""

    def __init__(self, weight, dense, with_cslt: bool, rotate_bytes: int, scale: torch.Tensor | None = None):
        self.count = max(1, min(32, math.ceil(rotate_bytes / max(1, weight.nbytes))))
        self.dense = [dense.clone() for _ in range(self.count)]
        packed = pack_24(weight)
        self.values = [packed.values.clone() for _ in range(self.count)]
        self.codes = [packed.codes.clone() for _ in range(self.count)]
        self.cslt = [torch._cslt_compress(weight) for _ in range(self.count)] if with_cslt else None
        self.scale = scale


def _calls(path: str, copies: _Copies, x: torch.Tensor, config: KernelConfig | None = None, alg_id: int = 0):
    """One call per copy of the op's own code for ``path`` (FP8: the activation quantization included)."""
    band = (1, path, config, alg_id)

    def call(i):
        cslt = copies.cslt[i] if copies.cslt else None
        return _run(band, x, copies.values[i], copies.codes[i], copies.dense[i], cslt, None, copies.scale)

    return [lambda i=i: call(i) for i in range(copies.count)]


def _best_config(kernel: str, copies: _Copies, x: torch.Tensor, graphed: bool) -> tuple[KernelConfig, list[dict]]:
    """The fastest launch of ``kernel`` at this M among ``triton24.candidates`` (a launch that fails to compile
    or run is recorded and skipped)."""
    m, k = x.shape
    n = copies.dense[0].shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else triton24.SMS_HINT
    tried, best = [], None
    for config in triton24.candidates(kernel, m, n, k, sms, dtype=copies.values[0].dtype):
        try:
            ms = time_calls(_calls(f"apt-{kernel}", copies, x, config), graphed, 3, x.is_cuda)["median"]
        except Exception as err:  # a launch the compiler or the device refuses: recorded, not fatal
            tried.append({"config": config.as_dict(), "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            continue
        tried.append({"config": config.as_dict(), "ms": ms})
        if best is None or ms < best[1]:
            best = (config, ms)
    if best is None:
        raise RuntimeError(f"no {kernel} launch ran at M={m}: {tried[:3]}")
    return best[0], tried


def _nearest(tuned: dict[int, object], m: int):
    return tuned[min(tuned, key=lambda t: (abs(math.log2(t) - math.log2(m)), -t))] if tuned else None


def measure_shape(
    weight: torch.Tensor,
    ms=PROBE_MS,
    dense_weight: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    tune: bool = True,
    eager: bool = True,
    repeats: int = 10,
    rotate_bytes: int = ROTATE_BYTES,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every path of the sparse op on the 2:4 ``weight`` ``[N, K]`` at each M of ``ms``. ``dense_weight``: the
    weight the dense path is timed on (the unpruned original, so dense never gains from zeros; its error is
    then not compared), by default ``weight`` itself. FP8: ``weight`` (and ``dense_weight``) in
    float8_e4m3fn with ``weight_scale`` ``[N]``; inputs are bf16 and every path includes the per-token
    quantization, dense FP8 being ``torch._scaled_mm``.

    Returns ``{"in", "out", "dtype", "copies", "rows": [{"m", "graphed": {path: summary}, "eager": {...},
    "error": {path: relative error vs dense}, "config": {kernel: launch}, "alg_id"}], "tuning": {...},
    "not_measured": {what: why}}``."""
    n, k = weight.shape
    device = weight.device
    graphs = weight.is_cuda
    with_cslt = weight.is_cuda and cusparselt().available and weight.dtype in (torch.float16, torch.bfloat16, FP8)
    ours = triton24.available(device, weight.dtype)[0]
    dense = weight if dense_weight is None else dense_weight
    copies = _Copies(weight, dense, with_cslt, rotate_bytes, weight_scale)
    x_dtype = torch.bfloat16 if weight.dtype == FP8 else weight.dtype
    result = {"in": k, "out": n, "dtype": str(weight.dtype).removeprefix("torch."), "copies": copies.count}
    not_measured = {}
    if not graphs:
        not_measured["graphed"] = "CUDA graphs need a CUDA GPU: times are eager, host clock"
    if not with_cslt:
        not_measured["cusparselt"] = cusparselt().reason if not cusparselt().available else "not on this device/dtype"
    if not ours:
        not_measured["apt kernels"] = triton24.available(device, weight.dtype)[1]
    g = torch.Generator(device="cpu").manual_seed(n * 31 + k)
    tuned = {"decode": {}, "gemv": {}, "mma": {}}
    tolerance = TOLERANCE[torch.bfloat16 if weight.dtype == FP8 else weight.dtype]
    tuning, algs = {}, {}
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(x_dtype).to(device)
        reference = _reference(x, weight, weight_scale)
        if progress:
            progress(f"{k}x{n} M={m}")
        launches = {}
        if ours:
            for kernel, tune_ms in (("decode", DECODE_TUNE_MS), ("gemv", GEMV_TUNE_MS), ("mma", MMA_TUNE_MS)):
                if (kernel == "gemv" and m > GEMV_MAX_M) or (kernel == "decode" and m > TOKEN_TILES[-1]):
                    continue
                if tune and m in tune_ms:
                    config, tried = _best_config(kernel, copies, x, graphs)
                    tuned[kernel][m] = config
                    tuning[f"{kernel} M={m}"] = tried
                elif kernel == "gemv":  # gemv's launch is sized by M: the tuned launch of the next tuned M up
                    up = [t for t in tuned["gemv"] if t >= m]
                    config = tuned["gemv"][min(up)] if up else triton24.default_config("gemv", m, n, k)
                elif kernel == "decode":  # the nearest tuned warp count, with this M's token tile
                    default = triton24.default_config("decode", m, n, k)
                    near = _nearest(tuned["decode"], m)
                    config = replace(near, block_m=default.block_m) if near else default
                else:
                    config = _nearest(tuned["mma"], m) or triton24.default_config("mma", m, n, k, dtype=weight.dtype)
                launches[kernel] = config
        if with_cslt and m in CSLT_SEARCH_MS:
            probe = quantize_tokens(x)[0] if weight_scale is not None else x  # FP8 searches on FP8 inputs
            padded = _pad_rows(probe, (-m) % 16)
            try:
                algs[m] = int(torch._cslt_sparse_mm_search(copies.cslt[0], padded.t()))
            except (RuntimeError, AttributeError) as err:
                not_measured["cusparselt algorithm search"] = str(err).splitlines()[0]
        alg_id = _nearest(algs, m) or 0
        paths = {"dense": None}
        if with_cslt:
            paths["cusparselt"] = None
        if ours:
            for kernel in ("decode", "gemv"):
                if kernel in launches:
                    paths[f"apt-{kernel}"] = launches[kernel]
            paths["apt-mma"] = launches["mma"]
            if m >= UNPACK_FROM:
                paths["apt-unpack"] = None
        row = {"m": m, "graphed": {}, "eager": {}, "error": {}, "rejected": {}, "alg_id": alg_id}
        row["config"] = {kernel: config.as_dict() for kernel, config in launches.items()}
        for path, config in paths.items():
            calls = _calls(path, copies, x, config, alg_id)
            if path != "dense" or dense_weight is None:
                row["error"][path] = _relative_error(calls[0](), reference)
                if not row["error"][path] <= tolerance:  # NaN and inf too
                    row["rejected"][path] = f"relative error {row['error'][path]:.3g} over the tolerance {tolerance}"
            if graphs:
                row["graphed"][path] = time_calls(calls, True, repeats, x.is_cuda)
            if eager or not graphs:
                row["eager"][path] = time_calls(calls, False, repeats, x.is_cuda)
        rows.append(row)
    result |= {"rows": rows, "tuning": tuning, "not_measured": not_measured}
    return result


def speedups(row: dict, timing: str = "graphed") -> dict[str, float]:
    """Dense time ÷ each path's time at one measured M."""
    times = row[timing]
    dense = times["dense"]["median"]
    return {path: dense / t["median"] for path, t in times.items() if path != "dense" and t["median"] > 0}


def bands_from(measured: dict, mode: str, timing: str = "graphed", margin: float = MARGIN) -> Dispatch:
    """The dispatch of ``mode`` from ``measure_shape``'s result: at each measured M the fastest path the mode
    holds (speed-first: a sparse path only where it beats dense by ``margin``; a path whose error was not
    finite, or was rejected against its tolerance, never), and between two measured Ms the choice of the
    larger one."""
    choices = []
    for row in measured["rows"]:
        finite = {p for p in row[timing] if p == "dense" or math.isfinite(row["error"].get(p, math.inf))}
        finite -= set(row.get("rejected", {}))
        times = {p: t["median"] for p, t in row[timing].items() if p in finite}
        if mode == SPEED_FIRST:
            dense = times["dense"]
            sparse = {p: t for p, t in times.items() if p not in ("dense", "apt-unpack") and t * margin < dense}
            path = min(sparse, key=sparse.get) if sparse else "dense"
        else:
            allowed = {p: t for p, t in times.items() if p in MEMORY_FIRST_PATHS}
            if not allowed:
                raise ValueError(f"memory-first: none of our paths was measured at M={row['m']}")
            path = min(allowed, key=allowed.get)
        choices.append((row["m"], path, row))
    bands, previous_m = [], 0
    for m, path, row in choices:
        start = previous_m + 1
        if path == "apt-gemv" and start > row["config"]["gemv"]["block_m"]:
            path = "apt-mma"  # cannot happen with the tuned launches; kept so a hand-edited file stays valid
        config = KernelConfig(**row["config"][KERNEL_PATHS[path]]) if path in KERNEL_PATHS else None
        band = Band(start, path, config, row["alg_id"] if path == "cusparselt" else 0)
        if not bands or (band.path, band.config, band.alg_id) != (bands[-1].path, bands[-1].config, bands[-1].alg_id):
            bands.append(band)
        previous_m = m
    origin = f"measured ({timing}) on {measured.get('device', 'this device')}"
    return Dispatch(tuple(bands), origin)
