"""The benchmark run: GEMM sweep, decode-safe check, end to end, accuracy and pruning cost → results.json.

``results.json`` (schema ``apt-sparse/bench-results/1``):

- ``created``, ``machine`` (platform, CPU, threads, GPU name and driver/CUDA where present, library versions)
- ``backends``: ``{name: {available, reason}}`` for every registered backend
- ``gemm``: ``dtype``, ``device``, ``ceiling`` (2.0), ``records`` — per ``shape``/``in``/``out``/``m``:
  ``dense_ms`` {median, min, max, n} and per sparse backend either ``{ms, speedup, max_abs_diff}`` or
  the string ``"not measured: <reason>"``
- ``thresholds``: per ``"{in}x{out}"`` the M from which the decode-safe linear takes the sparse path (null: never)
- ``decode_safe``: the check that the decode-safe model matches dense outputs, and how many layers got a sparse path
- ``e2e``: ``prefill`` and ``decode`` rows ``{model, backend, batch, seq | prompt+new_tokens, result}``;
  ``result`` is a timing summary or ``"not measured: <reason>"``
- ``accuracy``: ``metric``, ``dense`` and ``methods`` (per method the pruned value)
- ``pruning``: per method ``seconds``, ``peak_memory_bytes``, ``sum_relative_loss`` and per-layer ``relative_loss``
- ``not_measured``: every "not measured" line of the run, collected
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime_bench.backends import BACKENDS, availability
from runtime_bench.decode_safe import make_decode_safe
from runtime_bench.e2e import decode_throughput, onnxruntime_prefill, prefill_latency
from runtime_bench.gemm import LLAMA3_8B_SHAPES, GemmConfig, measure_gemm, model_shapes, sparse_thresholds

SCHEMA = "apt-sparse/bench-results/1"


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    gemm_ms: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    gemm_repeats: int = 20
    llama_shapes: bool = True
    prefill: tuple[tuple[int, int], ...] = ((1, 512), (8, 512))
    decode: tuple[int, int, int] = (1, 128, 64)  # batch, prompt, new tokens
    e2e_repeats: int = 5
    sparse_backend: str = "torch-sparse-cusparselt"
    extra_not_measured: tuple[str, ...] = field(default_factory=tuple)


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
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
            import subprocess

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


def _not_measured(reason: str) -> str:
    return f"not measured: {reason}"


def run_bench(
    config: BenchConfig,
    dense_model,
    pruned_model,
    onnx_path: Path | None = None,
    accuracy: dict | None = None,
    pruning: dict | None = None,
) -> dict:
    """Measure everything this machine can measure for ``pruned_model`` against ``dense_model``."""
    device = config.device
    dtype = "float16" if device.startswith("cuda") else "float32"
    shapes = model_shapes(pruned_model) + (LLAMA3_8B_SHAPES if config.llama_shapes else ())
    gemm = measure_gemm(
        GemmConfig(shapes=shapes, ms=config.gemm_ms, dtype=dtype, device=device, repeats=config.gemm_repeats)
    )
    thresholds = sparse_thresholds(gemm, config.sparse_backend)

    torch_dtype = getattr(torch, dtype)
    dense_model = dense_model.to(device=device, dtype=torch_dtype).eval()
    pruned_model = pruned_model.to(device=device, dtype=torch_dtype).eval()
    ids = torch.randint(10, pruned_model.config.vocab_size, (2, 64)).to(device)
    with torch.no_grad():
        before = pruned_model(input_ids=ids, use_cache=False).logits.float()
    counts = make_decode_safe(pruned_model, thresholds, config.sparse_backend)
    with torch.no_grad():
        after = pruned_model(input_ids=ids, use_cache=False).logits.float()
    decode_safe = counts | {
        "max_abs_diff_vs_dense_kernels": float((after - before).abs().max()),
        "backend": config.sparse_backend,
    }
    sparse_status = BACKENDS[config.sparse_backend]()
    sparse_reason = None
    if not counts["with_sparse_path"]:
        sparse_reason = sparse_status.reason if not sparse_status.available else "no measured M where sparse was faster"
        decode_safe["note"] = _not_measured(f"no layer took a sparse path: {sparse_reason}")

    e2e = {"prefill": [], "decode": []}
    for batch, seq in config.prefill:
        e2e["prefill"].append(
            {
                "model": "dense",
                "backend": "torch-dense",
                "batch": batch,
                "seq": seq,
                "result": prefill_latency(dense_model, batch, seq, device, config.e2e_repeats),
            }
        )
        e2e["prefill"].append(
            {
                "model": "pruned",
                "backend": f"decode-safe {config.sparse_backend}",
                "batch": batch,
                "seq": seq,
                "result": prefill_latency(pruned_model, batch, seq, device, config.e2e_repeats)
                if not sparse_reason
                else _not_measured(f"sparse kernels unavailable: {sparse_reason}"),
            }
        )
        if onnx_path is not None:
            e2e["prefill"].append(
                {
                    "model": "pruned",
                    "backend": "onnxruntime",
                    "batch": batch,
                    "seq": seq,
                    "result": onnxruntime_prefill(
                        onnx_path, pruned_model.config.vocab_size, batch, seq, config.e2e_repeats
                    ),
                }
            )
        e2e["prefill"].append(
            {
                "model": "pruned",
                "backend": "tensorrt",
                "batch": batch,
                "seq": seq,
                "result": _not_measured(BACKENDS["tensorrt"]().reason)
                if not BACKENDS["tensorrt"]().available
                else _not_measured("engine timing not wired"),
            }
        )
    batch, prompt, new = config.decode
    e2e["decode"].append(
        {
            "model": "dense",
            "backend": "torch-dense",
            "batch": batch,
            "prompt": prompt,
            "new_tokens": new,
            "result": decode_throughput(dense_model, batch, prompt, new, device, config.e2e_repeats),
        }
    )
    e2e["decode"].append(
        {
            "model": "pruned",
            "backend": f"decode-safe {config.sparse_backend}",
            "batch": batch,
            "prompt": prompt,
            "new_tokens": new,
            "result": decode_throughput(pruned_model, batch, prompt, new, device, config.e2e_repeats)
            if not sparse_reason
            else _not_measured(f"sparse kernels unavailable: {sparse_reason}"),
        }
    )
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backends": availability(),
        "gemm": gemm,
        "thresholds": thresholds,
        "decode_safe": decode_safe,
        "e2e": e2e,
        "accuracy": accuracy or {"metric": None, "dense": None, "methods": {}},
        "pruning": pruning or {},
    }
    results["not_measured"] = sorted(set(_collect_not_measured(results)) | set(config.extra_not_measured))
    return results


def _collect_not_measured(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj] if obj.startswith("not measured") else []
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _collect_not_measured(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _collect_not_measured(v)]
    return []


def validate_results(results: dict) -> None:
    """Raise ``ValueError`` naming the first field that does not follow the schema."""

    def need(cond, what):
        if not cond:
            raise ValueError(f"results.json does not follow {SCHEMA}: {what}")

    need(results.get("schema") == SCHEMA, "schema")
    for key in (
        "created",
        "machine",
        "backends",
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
    for record in results["gemm"]["records"]:
        need({"shape", "in", "out", "m", "dense_ms"} <= set(record), "gemm record keys")
        need(record["dense_ms"]["median"] > 0, "gemm dense_ms.median must be positive")
        for backend in ("torch-sparse-cusparselt", "torch-sparse-cutlass"):
            entry = record.get(backend)
            need(
                isinstance(entry, dict)
                and entry["speedup"] > 0
                or isinstance(entry, str)
                and entry.startswith("not measured: "),
                f"gemm {backend} entry",
            )
    for kind in ("prefill", "decode"):
        for row in results["e2e"][kind]:
            result = row["result"]
            need(
                isinstance(result, dict)
                and result["median"] > 0
                or isinstance(result, str)
                and result.startswith("not measured: "),
                f"e2e {kind} row {row}",
            )
    for value in results["thresholds"].values():
        need(value is None or isinstance(value, int), "thresholds")


def render_report_sections(results: dict) -> list[str]:
    """The report's sections about exported artifacts and the demo run, where present."""
    lines = []
    if results.get("exports"):
        lines += ["", "## Exported artifacts", "", "| target | size (MiB) | validation |", "|---|---|---|"]
        for target, info in results["exports"].items():
            checks = "; ".join(
                f"{k}: {v if not isinstance(v, dict) else v.get('status', v)}"
                for k, v in info["validation"].items()
                if k != "dense_matmul_initializers"
            )
            lines.append(f"| {target} | {info['bytes'] / 2**20:.1f} | {checks} |")
            if info.get("trtexec"):
                lines.append(f"| | | `{info['trtexec']}` |")
    if results.get("demo"):
        d = results["demo"]
        lines += [
            "",
            "## Demo run",
            "",
            f"Model {d['model']}; calibration {d['calibration']}; eval {d['eval']}; "
            f"whole run {d['seconds'] / 60:.1f} min.",
        ]
    return lines
