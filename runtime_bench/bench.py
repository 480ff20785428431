"""The benchmark run: GEMM sweep, decode-safe check, end to end, accuracy and pruning cost → results.json.

``run_bench`` is given how to obtain the dense and the pruned model (a folder, or a function that
builds one) and loads each itself, one at a time, so it never converts a model its caller holds.

Every timed row is taken as ``serving.timing`` says: warm-up thrown away, at least ``MIN_SAMPLES`` samples, the
median with its quartiles, extremes and count (``{median, q1, q3, min, max, n, spread}``, ``spread`` the
interquartile range over the median), side-by-side runs interleaved and their ratio given with an interval; each
row carries the machine's load while it ran (``serving.machine_load``) and ``noise``, the reasons not to trust it
(a spread above ``max_spread``, cores shared with other processes); a comparison with a reason is not judged.

``results.json`` (schema ``apt-sparse/bench-results/4``):

- ``created``, ``machine`` (platform, CPU, threads, GPU name and driver/CUDA where present, library versions)
- ``timing``: how rows were timed (``min_samples``, ``max_spread``, ``shared_margin``, warm-up) and ``seconds``,
  the benchmark's own duration
- ``load``: ``before`` (the machine's load in the second before timing began) and ``vllm_before`` (the same,
  taken by vLLM's process once its engines were up)
- ``backends``: ``{name: {available, reason}}`` for every registered backend
- ``sparse_kernels``: whether a 2:4 kernel ran here at all (``ran``), and why not
- ``gemm``: ``dtype``, ``device``, ``ceiling`` (2.0), ``sparse_backends`` (those measured), ``records`` —
  per ``shape``/``in``/``out``/``m``: ``dense_ms`` (a summary), per measured sparse backend ``{ms, speedup,
  speedup_interval, max_abs_diff}``, ``load`` and ``noise``
- ``thresholds``: per ``"{in}x{out}"`` the M from which the decode-safe linear takes the sparse path (null: never)
- ``decode_safe``: how many layers got a sparse path and the largest output difference against dense
  kernels (present where a sparse kernel ran)
- ``e2e``: measured ``prefill`` and ``decode`` rows ``{model, backend, batch, seq | prompt+new_tokens, result,
  load, noise}``, and ``comparisons`` of rows timed interleaved ``{kind, batch, seq | prompt+new_tokens,
  baseline, candidate, speedup (a ratio with its interval, above 1 where the candidate is faster), noise,
  verdict}``
- ``accuracy``: ``metric``, ``dense`` and ``methods`` (per method the pruned value)
- ``pruning``: per method ``seconds``, ``peak_memory_bytes``, ``sum_relative_loss`` and per-layer ``relative_loss``
- ``not_measured``: ``{what: reason}``, one entry for each backend or artifact that could not be
  measured, stated once (the tables hold only what was measured)
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apt.errors import InvalidInputError
from apt.folder.targets import PrunedTargets
from apt.models.layered import auto_class
from apt.solver import select_mask
from apt.solver.patterns import Pattern
from runtime_bench.backends import BACKENDS, availability
from runtime_bench.e2e import Sampling, decode_run, onnxruntime_prefill_run, prefill_run, time_rows, vocabulary_size
from runtime_bench.gemm import (
    LLAMA3_8B_SHAPES,
    SPARSE_BACKENDS,
    GemmConfig,
    measure_gemm,
    model_shapes,
    sparse_thresholds,
)
from serving.decode_safe import make_decode_safe
from serving.machine_load import SHARED_MARGIN, probe
from serving.timing import MIN_SAMPLES, NOISY_SPREAD, noise, verdict

SCHEMA = "apt-sparse/bench-results/4"
ModelSpec = "str | Path | Callable[[], torch.nn.Module]"


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    gemm_ms: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    gemm_repeats: int = 20  # samples per GEMM record (never fewer than MIN_SAMPLES)
    gemm_min_seconds: float = 0.25  # per GEMM record
    llama_shapes: bool = True
    prefill: tuple[tuple[int, int], ...] = ((1, 512), (8, 512))
    decode: tuple[int, int, int] = (1, 128, 64)  # batch, prompt, new tokens
    e2e_repeats: int = 5  # samples per end-to-end row (never fewer than MIN_SAMPLES)
    e2e_min_seconds: float = 0.0
    warmup: int = 1  # untimed runs (vLLM: requests per engine and batch size) before each end-to-end row
    max_spread: float = NOISY_SPREAD  # a row whose interquartile range exceeds this share of its median is noisy
    sparse_backend: str = "torch-sparse-cusparselt"
    not_measured: dict = field(default_factory=dict)  # extra {what: reason} from the caller (exports)
    backends: tuple[str, ...] | None = None  # None: every registered backend; torch-dense always runs
    # where no 2:4 kernel runs, the sweep shrinks to this dense reference at the model's own shapes
    dense_reference_ms: tuple[int, ...] = (1, 128, 2048)
    vllm_batches: tuple[int, ...] = (1, 8, 64)
    vllm_prompt: int = 128  # tokens of each vLLM request's prompt
    vllm_new_tokens: int = 32  # tokens each vLLM request generates

    def runs(self, backend: str) -> bool:
        return backend == "torch-dense" or self.backends is None or backend in self.backends

    @property
    def dtype(self) -> str:
        return "float16" if self.device.startswith("cuda") else "float32"

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.e2e_repeats, self.warmup, self.e2e_min_seconds, self.max_spread)


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
        try:
            info["gpu"]["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["gpu"]["driver"] = "unknown"
    for package in ("transformers", "onnxruntime", "onnx"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def pruning_record(report: dict) -> dict:
    """The ``pruning`` entry of one method in results.json, from its ``prune_report.json``."""
    return {
        "seconds": report["totals"]["seconds_pruning"],
        "peak_memory_bytes": report["peak_memory"]["bytes"],
        "sum_relative_loss": report["totals"]["sum_relative_loss"],
        "layer_relative_loss": [r["relative_loss"] for r in report["layers"] if not r["skipped"]],
    }


def load_bench_model(spec, config: BenchConfig) -> torch.nn.Module:
    """A fresh model for the benchmark, in its dtype on its device: from a folder (as the class transformers loads
    it as: a vision-language model as itself, whose language model then runs the text), or built by ``spec()``."""
    import transformers

    if callable(spec):
        model = spec()
    else:
        cls = auto_class(transformers.AutoConfig.from_pretrained(spec))
        model = cls.from_pretrained(spec, dtype=getattr(torch, config.dtype))
    return model.to(device=config.device, dtype=getattr(torch, config.dtype)).eval()


def _release() -> None:
    """Give back the memory of models no longer referenced."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_safe_section(pruned, dispatches: dict, config: BenchConfig, targets) -> tuple[dict | None, str | None]:
    """Serve ``pruned`` (a model this run owns) through the sparse op with each shape's dispatch (speed-first);
    returns the check against its dense kernels, or why no sparse path ran."""
    ids = torch.randint(10, vocabulary_size(pruned), (2, 64)).to(config.device)
    with torch.no_grad():
        before = pruned(input_ids=ids, use_cache=False).logits.float()
    counts = make_decode_safe(pruned, dispatches, targets)
    if not counts["with_sparse_path"]:
        status = BACKENDS[config.sparse_backend]()
        return None, status.reason if not status.available else "no measured M where a sparse path was faster"
    with torch.no_grad():
        after = pruned(input_ids=ids, use_cache=False).logits.float()
    return counts | {
        "max_abs_diff_vs_dense_kernels": float((after - before).abs().max()),
        "backend": "apt_sparse::linear24 (speed-first)",
    }, None


def sparse_op_dispatches(model, targets, config: BenchConfig) -> tuple[dict, dict]:
    """On a GPU where our kernels run: every path of the sparse op timed at each of the model's pruned shapes
    (graphed, ``serving.tuning``), and the speed-first dispatch it gives. ``({shape: measured}, {shape:
    Dispatch})``; empty where they cannot run."""
    from serving import triton24
    from serving.sparse_op import SPEED_FIRST
    from serving.tuning import bands_from, measure_shape

    if not (config.device.startswith("cuda") and triton24.available(config.device)[0]):
        return {}, {}
    measured, dispatches = {}, {}
    dtype = getattr(torch, config.dtype)
    for _, k, n in model_shapes(model, targets):
        weight = torch.randn(n, k, device=config.device).to(dtype)
        weight = weight * select_mask(weight.abs().float(), Pattern(2, 4)).to(dtype)
        measured[f"{k}x{n}"] = measure_shape(weight, ms=config.gemm_ms, eager=False)
        dispatches[f"{k}x{n}"] = bands_from(measured[f"{k}x{n}"], SPEED_FIRST)
    return measured, dispatches


def e2e_rows(models: dict[str, tuple[torch.nn.Module, str, str]], config: BenchConfig) -> dict:
    """Prefill and decode rows of each model (``{name: (model, label, backend)}``), the models timed interleaved,
    and a comparison of each against the first. ``{"prefill": rows, "decode": rows, "comparisons": [...]}``."""
    threads = torch.get_num_threads()
    rows = {"prefill": [], "decode": [], "comparisons": []}
    for batch, seq in config.prefill:
        runs = {name: prefill_run(model, batch, seq, config.device) for name, (model, _, _) in models.items()}
        _add_timed(rows, "prefill", {"batch": batch, "seq": seq}, models, time_rows(runs, config.sampling, threads))
    batch, prompt, new = config.decode
    runs = {name: decode_run(model, batch, prompt, new, config.device) for name, (model, _, _) in models.items()}
    timed = time_rows(runs, config.sampling, threads, throughput=True)
    _add_timed(rows, "decode", {"batch": batch, "prompt": prompt, "new_tokens": new}, models, timed)
    return rows


def _add_timed(rows: dict, kind: str, shape: dict, models: dict, timed: dict) -> None:
    """``time_rows``' answer as e2e rows of ``kind`` and comparisons against the first model."""
    for name, (_, label, backend) in models.items():
        row = {"model": label, "backend": backend, **shape, "result": timed["results"][name]}
        rows[kind].append(row | {"load": timed["load"], "noise": timed["noise"][name]})
    baseline = next(iter(models))
    for name, speedup in timed["speedups"].items():
        reasons = list(dict.fromkeys(timed["noise"][baseline] + timed["noise"][name]))
        rows["comparisons"].append(comparison(kind, shape, baseline, name, speedup, reasons))


def comparison(kind: str, shape: dict, baseline: str, candidate: str, speedup: dict, reasons: list[str]) -> dict:
    """One side-by-side comparison of two rows timed interleaved: ``speedup`` (a ``serving.timing.ratio``, above
    1 where ``candidate`` is faster), the reasons not to trust it (either row's), and what it says."""
    return {"kind": kind, **shape, "baseline": baseline, "candidate": candidate, "speedup": speedup} | {
        "noise": reasons,
        "verdict": verdict(speedup, reasons),
    }


def run_bench(
    config: BenchConfig,
    dense: ModelSpec,
    pruned: ModelSpec,
    onnx_path: Path | None = None,
    accuracy: dict | None = None,
    pruning: dict | None = None,
    targets: PrunedTargets | None = None,
) -> dict:
    """Measure everything this machine can measure for the pruned model against the dense one. Where no
    2:4 kernel runs (a CPU, an older GPU) that is said once (``sparse_kernels``) and the GEMM sweep
    shrinks to a dense reference at the model's own shapes: timing dense kernels at Llama-3-8B's
    shapes tells nothing about 2:4. Where the pruned model is served through a sparse path, it is timed end to
    end interleaved with the dense model, both loaded at once."""
    started = time.perf_counter()
    load = {"before": probe(torch.get_num_threads())}
    not_measured = dict(config.not_measured)
    kernel = BACKENDS[config.sparse_backend]()
    if not (kernel.available and config.device.startswith("cuda")):
        why = (
            f"{config.sparse_backend} cannot run here (see Backends)"
            if not kernel.available
            else "the device is the CPU"
        )
        config = replace(config, gemm_ms=config.dense_reference_ms, gemm_repeats=min(config.gemm_repeats, 5))
        config = replace(config, llama_shapes=False)
        not_measured["2:4 kernels"] = f"{why}: every table below is dense kernels; the GEMM sweep is a dense reference"
    e2e = {"prefill": [], "decode": [], "comparisons": []}
    phases = tqdm(total=4, desc="bench", unit="phase", disable=None)
    try:
        phases.set_description("bench · pruned model: GEMM at its shapes, its sparse path")
        gemm, thresholds, decode_safe, vocab, served = _pruned_section(pruned, config, targets, not_measured)
        phases.update()
        phases.set_description("bench · end to end in PyTorch" + (", dense and pruned interleaved" if served else ""))
        models = {"dense · torch-dense": (load_bench_model(dense, config), "dense", "torch-dense")}
        if served is not None:
            models["pruned · sparse op"] = (served, "pruned", "sparse op, speed-first")
        for kind, rows in e2e_rows(models, config).items():
            e2e[kind] += rows
        served = None
        models.clear()
        _release()
        phases.update()
        phases.set_description("bench · exported artifacts")
        _artifact_section(onnx_path, vocab, config, e2e, not_measured)
        phases.update()
        phases.set_description("bench · vLLM, dense and through the plugin, interleaved")
        _vllm_section(dense, pruned, config, e2e, not_measured, load)
        phases.update()
    finally:
        phases.close()
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "timing": {
            "min_samples": MIN_SAMPLES,
            "max_spread": config.max_spread,
            "shared_margin_cores": SHARED_MARGIN,
            "warmup": config.warmup,
            "seconds": time.perf_counter() - started,
        },
        "load": load,
        "backends": availability(),
        "sparse_kernels": kernel.as_dict() | ({"ran": "2:4 kernels" not in not_measured}),
        "gemm": gemm,
        "thresholds": thresholds,
        "decode_safe": decode_safe,
        "e2e": e2e,
        "accuracy": accuracy or {"metric": None, "dense": None, "methods": {}},
        "pruning": pruning or {},
        "not_measured": not_measured,
    }


def _vllm_section(
    dense: ModelSpec, pruned: ModelSpec, config: BenchConfig, e2e: dict, not_measured: dict, load: dict
) -> None:
    """The dense folder in vLLM, and the pruned folder served through the apt_sparse_24 plugin, interleaved."""
    status = BACKENDS["vllm"]()
    if not config.runs("vllm"):
        not_measured["vllm end to end"] = "not selected (--backends)"
    elif not status.available:
        not_measured["vllm end to end"] = status.reason
    elif callable(dense) or callable(pruned):
        not_measured["vllm end to end"] = "vLLM loads folders: these models were built in memory"
    else:
        try:
            rows = vllm_rows(Path(dense), Path(pruned), config)
        except InvalidInputError as err:  # a model this vLLM cannot run (e.g. a head size its CPU build lacks)
            not_measured["vllm end to end"] = str(err)
            return
        load["vllm_before"] = rows.pop("load_before")
        for kind in ("prefill", "decode", "comparisons"):
            e2e[kind] += rows[kind]


VLLM_BACKENDS = {"dense": "vllm", "pruned": "vllm + apt_sparse_24 plugin"}


def vllm_rows(dense: Path, pruned: Path, config: BenchConfig, tokenizer: bool = True) -> dict:
    """e2e rows of the dense folder in vLLM and of the pruned folder served through the apt_sparse_24 plugin,
    both engines in one process and timed interleaved after warm-up requests (``serving.vllm_run bench``):
    prefill latency (ms) and decode throughput (tokens/s) at ``config.vllm_batches``, a comparison per batch
    size, and vLLM's process's load record before timing (``load_before``)."""
    from serving.vllm_run import run_vllm

    command = ["bench", str(dense), "--label", "dense", "--versus", str(pruned), "--versus-label", "pruned"]
    command += ["--versus-quantization", "apt_sparse_24", "--batches", ",".join(map(str, config.vllm_batches))]
    command += ["--samples", str(max(config.e2e_repeats, MIN_SAMPLES)), "--warmup", str(config.warmup)]
    command += ["--min-seconds", str(config.e2e_min_seconds)] + ([] if tokenizer else ["--no-tokenizer"])
    command += ["--prompt", str(config.vllm_prompt), "--new", str(config.vllm_new_tokens)]
    answer = run_vllm(command, timeout=4 * 3600)  # on shared cores it runs many times slower: let it finish
    rows = {"prefill": [], "decode": [], "comparisons": [], "load_before": answer["load_before"]}
    for row in answer["rows"]:
        per_kind = {}
        for kind, key, shape in (
            ("prefill", "prefill_ms", {"batch": row["batch"], "seq": row["prompt"]}),
            (
                "decode",
                "decode_tokens_per_s",
                {"batch": row["batch"], "prompt": row["prompt"], "new_tokens": row["new_tokens"]},
            ),
        ):
            per_kind[kind] = {}
            for label, engine in row["engines"].items():
                reasons = noise(engine[key], row["load"], config.max_spread)
                if engine["preemptions"]:
                    reasons.append(f"vLLM preempted {engine['preemptions']} requests: its KV cache did not hold them")
                per_kind[kind][label] = reasons
                result = {"model": label, "backend": VLLM_BACKENDS[label], **shape, "result": engine[key]}
                rows[kind].append(result | {"load": row["load"], "noise": reasons})
            reasons = list(dict.fromkeys(per_kind[kind]["dense"] + per_kind[kind]["pruned"]))
            names = [f"{label} · {VLLM_BACKENDS[label]}" for label in ("dense", "pruned")]
            compared = comparison(kind, shape, *names, row["ratios"][kind], reasons)
            rows["comparisons"].append(compared | {"order": row["order"]})  # the engines' requests as they ran
    return rows


def _pruned_section(pruned: ModelSpec, config: BenchConfig, targets, not_measured: dict):
    """The GEMM sweep at the pruned model's shapes, the thresholds it gives, and the pruned model served through
    the decode-safe sparse path where a sparse kernel runs. Returns ``(gemm, thresholds, decode_safe, vocabulary
    size, served)``: ``served`` is that model (for the end-to-end rows), ``None`` where no sparse path ran (the
    model is released then); adds its reasons to ``not_measured``."""
    model = load_bench_model(pruned, config)
    shapes = model_shapes(model, targets) + (LLAMA3_8B_SHAPES if config.llama_shapes else ())
    gemm, unmeasured = measure_gemm(
        GemmConfig(
            shapes=shapes,
            ms=config.gemm_ms,
            dtype=config.dtype,
            device=config.device,
            repeats=config.gemm_repeats,
            min_seconds=config.gemm_min_seconds,
            max_spread=config.max_spread,
        )
    )
    not_measured |= {f"{b} GEMM": reason for b, reason in unmeasured.items()}
    thresholds = sparse_thresholds(gemm, config.sparse_backend)
    measured, dispatches = sparse_op_dispatches(model, targets, config)
    if measured:
        gemm["sparse_op"] = {shape: m | {"dispatch": dispatches[shape].as_dict()} for shape, m in measured.items()}
    else:
        not_measured["sparse op (our kernels)"] = "our Triton kernels and CUDA graphs need a CUDA GPU"
    if config.runs(config.sparse_backend):
        decode_safe, reason = decode_safe_section(model, dispatches or thresholds, config, targets)
    else:
        decode_safe, reason = None, "not selected (--backends)"
    vocab = vocabulary_size(model)
    if decode_safe is None:
        not_measured[f"decode-safe {config.sparse_backend} end to end"] = reason
        model = None
        _release()
    return gemm, thresholds, decode_safe, vocab, model


def _artifact_section(onnx_path: Path | None, vocab: int, config: BenchConfig, e2e: dict, not_measured: dict):
    """Exported artifacts end to end: the ONNX graph in ONNX Runtime; TensorRT says why it was not timed."""
    if onnx_path is not None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for batch, seq in config.prefill:
            run, provider = onnxruntime_prefill_run(onnx_path, vocab, batch, seq)
            timed = time_rows({"pruned · onnxruntime": run}, config.sampling, threads)  # its threads: every core
            row = {"model": "pruned", "backend": "onnxruntime", "batch": batch, "seq": seq, "provider": provider}
            row |= {"result": timed["results"]["pruned · onnxruntime"], "load": timed["load"]}
            e2e["prefill"].append(row | {"noise": timed["noise"]["pruned · onnxruntime"]})
    else:
        not_measured["onnxruntime end to end"] = "no exported ONNX graph was given"
    trt = BACKENDS["tensorrt"]()
    if not config.runs("tensorrt"):
        not_measured["tensorrt end to end"] = "not selected (--backends)"
    else:
        not_measured["tensorrt end to end"] = (
            trt.reason if not trt.available else "timing TensorRT engines is not implemented: use trtexec --loadEngine"
        )


def validate_results(results: dict) -> None:
    """Raise ``ValueError`` naming the first field that does not follow the schema."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"results.json does not follow {SCHEMA}: {what}")

    def timed(result, what):
        need(isinstance(result, dict) and result.get("median", 0) > 0, f"{what}: a positive median")
        need(result.get("n", 0) >= MIN_SAMPLES, f"{what}: at least {MIN_SAMPLES} samples")
        need(result["min"] <= result["q1"] <= result["median"] <= result["q3"] <= result["max"], f"{what}: spread")

    need(results.get("schema") == SCHEMA, "schema")
    for key in (
        "created",
        "machine",
        "timing",
        "load",
        "backends",
        "sparse_kernels",
        "gemm",
        "thresholds",
        "decode_safe",
        "e2e",
        "accuracy",
        "pruning",
        "not_measured",
    ):
        need(key in results, f"missing {key}")
    for name, status in results["backends"].items():
        need(set(status) == {"available", "reason"} and isinstance(status["available"], bool), f"backend {name}")
    need(results["gemm"]["records"], "gemm.records is empty")
    measured = set(results["gemm"]["sparse_backends"])
    for backend in SPARSE_BACKENDS:
        need(
            backend in measured or f"{backend} GEMM" in results["not_measured"],
            f"gemm {backend}: neither measured nor listed as not measured",
        )
    for record in results["gemm"]["records"]:
        need({"shape", "in", "out", "m", "dense_ms", "load", "noise"} <= set(record), "gemm record keys")
        timed(record["dense_ms"], f"gemm dense_ms at {record['shape']} M={record['m']}")
        for backend in measured:
            entry = record.get(backend)
            if entry is None:
                need(backend in record.get("not_measured", {}), f"gemm {backend} at {record['shape']} M={record['m']}")
                continue
            need(
                isinstance(entry, dict) and entry["speedup"] > 0 and "speedup_interval" in entry,
                f"gemm {backend} entry at {record['shape']} M={record['m']}",
            )
            timed(entry["ms"], f"gemm {backend} at {record['shape']} M={record['m']}")
    for kind in ("prefill", "decode"):
        for row in results["e2e"][kind]:
            timed(row["result"], f"e2e {kind} row {row['model']} {row['backend']} batch {row['batch']}")
            need(isinstance(row.get("noise"), list) and isinstance(row.get("load"), dict), f"e2e {kind} noise, load")
    for c in results["e2e"]["comparisons"]:
        speedup = c["speedup"]
        need(speedup["low"] <= speedup["median"] <= speedup["high"], f"comparison {c['candidate']}: interval")
        need(c["verdict"] == verdict(speedup, c["noise"]), f"comparison {c['candidate']}: verdict")
    for what, reason in results["not_measured"].items():
        need(isinstance(reason, str) and reason, f"not_measured {what} needs a reason")
    for value in results["thresholds"].values():
        need(value is None or isinstance(value, int), "thresholds")
