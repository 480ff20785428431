"""``apt-sparse bench DIR``: how much faster and how much worse a saved pruned folder is than its dense source.

Any Hugging Face folder whose pruned weights follow an N:M pattern can be benchmarked: ours (the dense
source, the pattern and the accuracy come from its ``prune_report.json``) or one pruned elsewhere
(``--dense`` names the source; the pruned layers are found by the family adapter). The GEMM sweep runs
at the model's own shapes, prefill and decode on every backend that runs here (the decode-safe sparse
path included), and on exported artifacts given with ``--onnx`` / ``--tensorrt``. It writes
``results.json`` and ``report.md`` with plots; each backend that cannot run says why, once. An FP8 folder is
refused with the reason (no backend here runs FP8 GEMMs), a damaged one naming the tensor.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from apt.atomic import check_free_space, write_json_atomic, writing
from apt.errors import InvalidInputError
from apt.folder.fp8 import open_fp8_checked
from apt.folder.report import REPORT_NAME, read_report
from apt.folder.targets import targets_of_folder
from apt.models.loading import source_folder
from runtime_bench.backends import BACKENDS
from runtime_bench.bench import BenchConfig, pruning_record, run_bench, validate_results
from runtime_bench.report import render_report


def _dense_source(folder: Path, dense: str | None, report: dict | None) -> Path:
    if dense is None and report is None:
        raise InvalidInputError(
            f"{folder} has no {REPORT_NAME} naming its dense source: pass --dense with the dense model"
        )
    name = dense or report["model"]["name"]
    _, location = source_folder(name)
    return location


def _onnx_graph(folder: str | None, target: str) -> Path | None:
    if folder is None:
        return None
    for candidate in (Path(folder) / "model.onnx", Path(folder) / "onnx" / "model.onnx"):
        if candidate.is_file():
            return candidate
    raise InvalidInputError(f"--{target} {folder}: no model.onnx there; give an apt-sparse export {target} folder")


def bench_folder(
    folder: str | Path,
    out: str | Path,
    dense: str | None = None,
    backends: tuple[str, ...] | None = None,
    onnx: str | None = None,
    tensorrt: str | None = None,
    config: BenchConfig | None = None,
    accuracy: dict | None = None,
    pruning: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Benchmark ``folder`` against its dense source; returns the path of ``OUT/report.md``."""
    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"{folder} is not a Hugging Face model folder (no config.json)")
    reader = open_fp8_checked(folder)  # a damaged FP8 folder is refused naming the tensor
    report = read_report(folder)
    if reader.fp8:
        source = (report or {}).get("quantization", {}).get("source") or "its unquantized source"
        raise InvalidInputError(
            f"{folder} is FP8 (W8A8, {len(reader.fp8)} float8 weights) and the benchmark has no FP8 GEMM backend: "
            f"timing it would time its weights dequantised to fp16/bf16, not FP8. Bench {source} for what 2:4 "
            f"buys, and measure the FP8 folder's accuracy with apt-sparse eval {folder}"
        )
    dense_folder = _dense_source(folder, dense, report)
    targets = targets_of_folder(folder)
    if not targets.pattern.is_nm:
        raise InvalidInputError(f"{folder} is pruned {targets.pattern}: the benchmark measures N:M kernels only")
    # results.json, report.md and a few plots: refused now rather than after minutes of timing
    check_free_space([("the benchmark report", out, 4 * 2**20)], "free space there or choose another --out")
    with writing(out):  # a folder it may not write to is found now, not after the measurements
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    config = config or BenchConfig()
    unknown = set(backends or ()) - set(BACKENDS)
    if unknown:
        raise InvalidInputError(f"unknown backends {sorted(unknown)}: choose from {', '.join(BACKENDS)}")
    not_measured = dict(config.not_measured)
    if backends is not None:
        not_measured |= {f"{b}": "not selected (--backends)" for b in BACKENDS if b not in backends}
        config = replace(config, backends=tuple(backends))
    if accuracy is None:
        accuracy = _accuracy_from_report(report)
        if accuracy is None:
            not_measured["accuracy"] = "the folder's report holds none: run apt-sparse eval on it"
    if pruning is None and report is not None:
        pruning = {report["config"]["run"]["solver"]["method"]: pruning_record(report)}
    onnx_graph = _onnx_graph(onnx, "onnx") or _onnx_graph(tensorrt, "tensorrt")
    if tensorrt and not BACKENDS["tensorrt"]().available:
        not_measured["tensorrt engine"] = BACKENDS["tensorrt"]().reason
    results = run_bench(
        replace(config, not_measured=not_measured),
        dense_folder,
        folder,
        onnx_path=onnx_graph if config.runs("onnxruntime") else None,
        accuracy=accuracy,
        pruning=pruning,
        targets=targets,
    )
    results["folder"] = {"pruned": str(folder.resolve()), "dense": str(dense_folder), "targets": targets.as_dict()}
    results |= extra or {}
    validate_results(results)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    return render_report(results, out)


def _accuracy_from_report(report: dict | None) -> dict | None:
    if not report or not report.get("accuracy"):
        return None
    acc = report["accuracy"]
    metric = acc["metric"]
    if metric not in acc["dense"]:  # encoders: the dense model is the reference, scored on retrieval
        metric = "retrieval_top1"
    return {
        "metric": metric,
        "dense": acc["dense"][metric],
        "methods": {report["config"]["run"]["solver"]["method"]: acc["pruned"][metric]},
        "data": acc["data"],
    }
