"""The whole chain on the offline default model: prune (apt and the baselines) → export (every target) →
bench → report. ``apt-sparse demo --out DIR [--quick]``; ``make demo`` runs it.

Layout of DIR: ``pruned/<method>/`` (checkpoints with prune reports), ``export/<target>/`` (artifacts with
manifests), ``results.json`` and ``report.md`` with its plots.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from apt.artifacts import write_json_atomic
from apt.data import load_text
from apt.families import family_for
from apt.models import load_model
from apt.pipeline import RunConfig
from apt.run import Accuracy, PruneJob, prune_model
from apt.solver import PruneConfig
from runtime_bench.bench import BenchConfig, pruning_record, render_report_sections, run_bench, validate_results
from runtime_bench.report import render_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("apt", "sparsegpt", "wanda", "magnitude")
    windows: int = 16
    seq_len: int = 512
    eval_windows: int = 8
    targets: tuple[str, ...] = ("vllm", "compressed-tensors", "onnx", "tensorrt")
    bench: BenchConfig = BenchConfig(
        gemm_ms=(1, 8, 64, 512),
        gemm_repeats=5,
        llama_shapes=True,
        prefill=((1, 512),),
        decode=(1, 64, 32),
        e2e_repeats=3,
    )

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            methods=("apt", "magnitude"),
            windows=4,
            seq_len=128,
            eval_windows=2,
            targets=("vllm", "compressed-tensors", "tensorrt"),
            bench=BenchConfig(
                gemm_ms=(1, 16),
                gemm_repeats=3,
                llama_shapes=False,
                prefill=((1, 64),),
                decode=(1, 16, 8),
                e2e_repeats=2,
            ),
        )


def run_demo(out: str | Path, config: DemoConfig, progress=print) -> Path:
    from exporters import export

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dense, tokenizer, _ = load_model(config.model)
    family = family_for(dense.config)
    text = load_text("stdlib")
    meter = Accuracy(dense, tokenizer, text.evaluation, family.causal, config.eval_windows, config.seq_len)
    dense_value = meter.measure(dense)[meter.metric]
    progress(f"dense {meter.metric}: {dense_value:.3f}")

    accuracy = {"metric": meter.metric, "dense": dense_value, "methods": {}}
    pruning = {}
    for method in config.methods:
        folder = out / "pruned" / method
        report = prune_model(
            PruneJob(
                model=config.model,
                out=str(folder),
                run=RunConfig(solver=PruneConfig(method=method)),
                num_calibration_samples=config.windows,
                max_seq_length=config.seq_len,
                evaluate=False,
                overwrite=True,
            )
        )
        pruned_model, _, _ = load_model(str(folder))
        value = meter.measure(pruned_model)[meter.metric]
        accuracy["methods"][method] = value
        pruning[method] = pruning_record(report)
        progress(f"{method:10s} {meter.metric} {value:10.3f}  pruned in {pruning[method]['seconds']:.0f} s")

    source = out / "pruned" / config.methods[0]
    exports = {}
    for target in config.targets:
        options = {"dtype": "float32"} if target == "onnx" else {}
        manifest = export(target, source, out / "export" / target, overwrite=True, **options)
        exports[target] = manifest
        progress(f"exported {target}: {sum(f['bytes'] for f in manifest['files']) / 2**20:.1f} MiB")

    pruned_model, _, _ = load_model(str(source))
    onnx_path = out / "export" / "onnx" / "model.onnx"
    not_measured = [f"vLLM serving: {exports['vllm']['validation']['vllm_loaded']}"] if "vllm" in exports else []
    if "tensorrt" in exports:
        not_measured.append(f"TensorRT engine: {exports['tensorrt']['validation']['engine']['status']}")
    results = run_bench(
        BenchConfig(**{**config.bench.__dict__, "extra_not_measured": tuple(not_measured)}),
        dense,
        pruned_model,
        onnx_path=onnx_path if onnx_path.is_file() else None,
        accuracy=accuracy,
        pruning=pruning,
    )
    results["exports"] = {
        t: {"bytes": sum(f["bytes"] for f in m["files"]), "validation": m["validation"], "trtexec": m.get("trtexec")}
        for t, m in exports.items()
    }
    results["demo"] = {
        "model": config.model,
        "calibration": f"{config.windows}x{config.seq_len} stdlib tokens",
        "eval": f"{config.eval_windows}x{config.seq_len} held-out stdlib tokens",
        "seconds": time.perf_counter() - started,
    }
    validate_results(results)
    write_json_atomic(out / "results.json", results)
    report = render_report(results, out, render_report_sections(results))
    progress(f"demo finished in {results['demo']['seconds'] / 60:.1f} min")
    return report


def copy_results_into_repository(out: Path, name: str) -> Path:
    """Keep a run's numbers in the repository (runtime_bench/results/NAME/): results.json, report and plots."""
    dest = Path(__file__).resolve().parent / "results" / name
    dest.mkdir(parents=True, exist_ok=True)
    for file in [out / "results.json", out / "report.md", *out.glob("*.png")]:
        shutil.copy(file, dest / file.name)
    return dest


def summary_line(results_path: Path) -> str:
    results = json.loads(Path(results_path).read_text())
    acc = results["accuracy"]
    return ", ".join(f"{m} {v:.2f}" for m, v in acc["methods"].items()) + f" (dense {acc['dense']:.2f})"
