"""GEMM microbenchmark: dense vs 2:4 ``linear`` at a model's own shapes and at Llama-3-8B's, over M.

Method: random inputs (never zeros) and a random 2:4 weight; warm-up; dense and each sparse backend
interleaved (dense, sparse, dense, sparse …: ``serving.timing``) so a burst of load hits both; device-synchronised
timing (CUDA events on a GPU); each sample times enough back-to-back calls to last about a millisecond; at least
``MIN_SAMPLES`` samples and ``min_seconds`` per record; the median with its spread, each speedup the median of
the paired ratios with its interval, and the machine's load while the record ran (``serving.machine_load``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apt.folder.targets import PrunedTargets, target_linears
from apt.solver import select_mask
from apt.solver.patterns import Pattern
from runtime_bench.backends import BACKENDS
from serving.decode_safe import MARGIN, threshold_from
from serving.kernels import to_sparse
from serving.machine_load import load_between, snapshot
from serving.timing import MIN_SAMPLES, NOISY_SPREAD, noise, ratio, sample_interleaved, summary

# (label, in = K, out = N)
LLAMA3_8B_SHAPES = (
    ("llama3-8b attn q/o 4096x4096", 4096, 4096),
    ("llama3-8b mlp gate/up 4096x14336", 4096, 14336),
    ("llama3-8b mlp down 14336x4096", 14336, 4096),
    ("llama3-8b attn k/v 4096x1024", 4096, 1024),
)
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SPARSE_BACKENDS = ("torch-sparse-cusparselt", "torch-sparse-cutlass")


@dataclass(frozen=True)
class GemmConfig:
    shapes: tuple[tuple[str, int, int], ...] = LLAMA3_8B_SHAPES
    ms: tuple[int, ...] = DEFAULT_MS
    dtype: str = "float16"
    device: str = "cuda"
    repeats: int = 20  # samples per record, never fewer than serving.timing.MIN_SAMPLES
    warmup: int = 3
    sample_seconds: float = 1e-3
    min_seconds: float = 0.25  # per record: cheap records take more samples, and the load record a window
    max_spread: float = NOISY_SPREAD
    sparse_backends: tuple[str, ...] = ("torch-sparse-cusparselt", "torch-sparse-cutlass")


def model_shapes(model, targets: PrunedTargets | None = None) -> tuple[tuple[str, int, int], ...]:
    """The distinct ``(label, in, out)`` of the model's pruned Linear layers (``apt.folder.targets``); a
    transformers ``Conv1D`` (GPT-2: weight stored ``[in, out]``) counts by its GEMM's shape."""
    seen = {}
    for name, module in target_linears(model, targets):
        k, n = (module.in_features, module.out_features) if hasattr(module, "in_features") else module.weight.shape
        seen.setdefault((int(k), int(n)), name.split(".")[-1])
    return tuple((f"model {label} {k}x{n}", k, n) for (k, n), label in seen.items())


def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    if device.startswith("cuda"):

        def timed(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / inner

    else:

        def timed(fn, inner):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - start) * 1e3 / inner

    return timed


def measure_gemm(config: GemmConfig) -> tuple[dict, dict[str, str]]:
    """Every shape × M: dense time, and per available sparse backend its time, speedup and max |Δ|.

    Returns ``(gemm, unmeasured)``: ``gemm["records"]`` hold only what ran; ``unmeasured`` says once
    why a sparse backend did not run at all. A backend that fails at one shape (a conversion or a kernel
    that refuses it) records the reason in that record's ``not_measured``."""
    dtype = getattr(torch, config.dtype)
    device = config.device
    timed = _timer(device)
    unmeasured = {}
    for backend in SPARSE_BACKENDS:
        status = BACKENDS[backend]()
        if backend not in config.sparse_backends:
            unmeasured[backend] = "not selected (--backends)"
        elif not status.available:
            unmeasured[backend] = status.reason
        elif not device.startswith("cuda"):
            unmeasured[backend] = "the benchmark device is the CPU"
    runnable = [b for b in SPARSE_BACKENDS if b not in unmeasured]
    g = torch.Generator(device="cpu").manual_seed(0)
    records = []
    for label, k, n in config.shapes:
        weight = torch.randn(n, k, generator=g).to(dtype)
        weight = (weight * select_mask(weight.abs().float(), Pattern(2, 4))).to(device)
        sparse_weights, failed = {}, {}
        for backend in runnable:
            try:
                sparse_weights[backend] = to_sparse(weight, backend)
            except (RuntimeError, NotImplementedError) as err:
                failed[backend] = f"conversion failed: {str(err).splitlines()[0]}"
        for m in config.ms:
            x = torch.randn(m, k, generator=g).to(dtype).to(device)
            record = {"shape": label, "in": k, "out": n, "m": m}
            records.append(record | _time_linear(x, weight, sparse_weights, dict(failed), config, timed))
    gemm = {
        "dtype": config.dtype,
        "device": device,
        "min_samples": max(config.repeats, MIN_SAMPLES),
        "min_seconds": config.min_seconds,
        "ceiling": 2.0,
        "sparse_backends": runnable,
        "records": records,
    }
    return gemm, unmeasured


def _time_linear(x, weight, sparse_weights: dict, skipped: dict, config: GemmConfig, timed) -> dict:
    """``x @ weightᵀ`` dense and through each sparse weight, interleaved: the dense time, per sparse backend its
    time, speedup (with its interval) and max |Δ| against dense (or why it did not run), the machine's load
    while they ran and the reasons the record is not to be trusted (``noise``, empty where it is)."""
    runs = {"dense": lambda: F.linear(x, weight)}
    for backend, w_sparse in sparse_weights.items():
        runs[backend] = lambda w=w_sparse: F.linear(x, w)
    reference = runs["dense"]()
    errors = {}
    for name, fn in list(runs.items())[1:]:
        try:
            errors[name] = float((fn().float() - reference.float()).abs().max())
        except (RuntimeError, NotImplementedError) as err:
            skipped[name] = str(err).splitlines()[0]
            del runs[name]
    for fn in runs.values():  # the size of one sample (the interleaved warm-up follows)
        fn()
    single = max(timed(runs["dense"], 1), 1e-4)
    inner = max(1, min(1000, int(config.sample_seconds * 1e3 / single)))
    start = snapshot()
    samples = sample_interleaved(
        {name: (lambda fn=fn: timed(fn, inner)) for name, fn in runs.items()},
        warmup=config.warmup,
        min_samples=max(config.repeats, MIN_SAMPLES),
        min_seconds=config.min_seconds,
    )
    load = load_between(start, snapshot(), torch.get_num_threads())
    record = {"dense_ms": summary(samples["dense"])}
    reasons = noise(record["dense_ms"], load, config.max_spread)
    for name in runs:
        if name != "dense":
            speedup = ratio(samples["dense"], samples[name])
            record[name] = {
                "ms": summary(samples[name]),
                "max_abs_diff": errors[name],
                "speedup": speedup["median"],
                "speedup_interval": speedup,
            }
            reasons += [f"{name}: {r}" for r in noise(record[name]["ms"], None, config.max_spread)]
    record["load"], record["noise"] = load, reasons
    if skipped:
        record["not_measured"] = skipped
    m, k, n = x.shape[0], x.shape[1], weight.shape[0]
    record["tflops_dense"] = 2 * m * k * n / (record["dense_ms"]["median"] * 1e-3) / 1e12
    return record


def sparse_thresholds(gemm: dict, backend: str, margin: float = MARGIN) -> dict[str, int | None]:
    """Per ``"{in}x{out}"`` shape, the decode-safe threshold of ``backend`` (``serving.decode_safe.threshold_from``).
    A record marked noisy counts as not measured: a speedup timed on shared cores is not a win."""
    by_shape: dict[str, list[tuple[int, float | None]]] = {}
    for r in gemm["records"]:
        entry = r.get(backend)
        speedup = entry["speedup"] if isinstance(entry, dict) and not r.get("noise") else None
        by_shape.setdefault(f"{r['in']}x{r['out']}", []).append((r["m"], speedup))
    return {shape: threshold_from(points, margin) for shape, points in by_shape.items()}
