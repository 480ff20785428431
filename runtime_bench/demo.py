"""The whole chain on the offline default model: prune (apt and the baselines) → export (every target) →
bench → report. ``apt-sparse demo --out DIR [--quick]``; ``make demo`` runs it.

Layout of DIR: ``pruned/<method>/`` (checkpoints with prune reports), ``export/<target>/`` (artifacts with
manifests), ``results.json`` and ``report.md`` with its plots. Each step is written atomically; an
interrupted demo says which steps were written and which were not.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from apt.measure.accuracy import Accuracy
from apt.models.layered import LayeredModel
from apt.models.loading import load_tokenizer, source_folder
from apt.run import PruneJob, RunConfig, prune_model
from apt.solver import PruneConfig
from apt.text.sources import evaluation_documents
from runtime_bench.bench import BenchConfig, pruning_record
from runtime_bench.folder_bench import bench_folder

# vLLM on a CPU serves the plugin's folder dense, so its batch-64 rows compare dense with dense, and they are
# what made the demo long: on 2 cores a batch-64 request takes ~22 s (11 s prefill, 32 tokens x 64), and n >= 5
# interleaved samples after a warm-up request of each engine took 4.4 of the benchmark's 4.7 minutes
CPU_VLLM_BATCHES = (1, 8)
CPU_VLLM_SKIPPED = (
    "not measured by the demo on a CPU (vLLM's CPU build serves the plugin's folder dense, and the batch-64 rows "
    "took 4.4 of its 4.7 benchmark minutes on 2 cores); apt-sparse bench DIR --backends vllm measures it"
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("apt", "sparsegpt", "wanda", "magnitude")
    windows: int = 16
    seq_len: int = 512
    eval_windows: int = 8
    targets: tuple[str, ...] = ("vllm", "compressed-tensors", "onnx", "tensorrt")
    vllm_check: bool | None = None  # the vllm and bitmask exports loaded in vLLM (None: where it is installed)
    apt_options: dict = field(default_factory=dict)  # apt's solver options beyond its defaults
    bench: BenchConfig = field(
        default_factory=lambda: BenchConfig(
            gemm_ms=(1, 8, 64, 512),
            gemm_repeats=5,
            llama_shapes=True,
            prefill=((1, 512),),
            decode=(1, 64, 32),
            e2e_repeats=5,
            vllm_batches=(1, 8, 64) if torch.cuda.is_available() else CPU_VLLM_BATCHES,
        )
    )

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            methods=("apt", "magnitude"),
            windows=4,
            seq_len=128,
            eval_windows=2,
            # the chain, not the masks' quality: the sweep's masks without the ADMM search, the refit's CG stopped
            # at 1e-2 (a step lowering a row's loss by under 1 %; 1e-4 by default): ~1.3 min on 2 cores, not ~2
            apt_options={"mask_search": "off", "tol": 1e-2},
            targets=("vllm", "compressed-tensors", "tensorrt"),
            bench=BenchConfig(
                gemm_ms=(1, 16),
                gemm_repeats=5,
                gemm_min_seconds=0.1,
                llama_shapes=False,
                prefill=((1, 64),),
                decode=(1, 16, 8),
                e2e_repeats=5,
                # vLLM loads both exports in the quick demo already; its timings belong to the full one
                backends=("torch-dense", "torch-sparse-cusparselt", "torch-sparse-cutlass", "onnxruntime", "tensorrt"),
            ),
        )


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C during the demo, with what was already written and what was not."""

    def __init__(self, written: list[str], pending: list[str]):
        super().__init__()
        self.written, self.pending = written, pending

    def __str__(self) -> str:
        done = ", ".join(self.written) or "nothing"
        return f"written: {done}; not written: {', '.join(self.pending)}"


def run_demo(out: str | Path, config: DemoConfig, progress=print, command: str = "apt-sparse demo") -> Path:
    out = Path(out)
    steps = [f"pruned/{m}" for m in config.methods] + [f"export/{t}" for t in config.targets]
    steps += ["results.json", "report.md"]
    written: list[str] = []
    try:
        return _run(out, config, progress, command, written)
    except KeyboardInterrupt as err:
        raise DemoInterrupted(
            [str(out / s) for s in written], [str(out / s) for s in steps if s not in written]
        ) from err


def _run(out: Path, config: DemoConfig, progress, command: str, written: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    accuracy, pruning = _prune_every_method(out, config, progress, written)
    exports = _export_every_target(out / "pruned" / config.methods[0], out / "export", config, progress, written)
    not_measured = {}
    loaded = exports["vllm"]["validation"]["vllm_loaded"] if "vllm" in exports else None
    if isinstance(loaded, str):
        not_measured["vLLM serving"] = loaded.removeprefix("not measured: ")
    if config.bench.runs("vllm") and 64 not in config.bench.vllm_batches:
        not_measured["vLLM at batch 64"] = CPU_VLLM_SKIPPED
    if "tensorrt" in exports:
        not_measured["TensorRT engine"] = exports["tensorrt"]["validation"]["engine"]["status"]
    extra = {
        "exports": {
            target: {
                "bytes": sum(f["bytes"] for f in manifest["files"]),
                "validation": manifest["validation"],
                "trtexec": manifest.get("trtexec"),
            }
            for target, manifest in exports.items()
        },
        "demo": {
            "model": config.model,
            "calibration": f"{config.windows}x{config.seq_len} stdlib tokens",
            "eval": f"{config.eval_windows}x{config.seq_len} held-out stdlib tokens",
            "seconds_before_bench": time.perf_counter() - started,  # the benchmark's own is results' timing.seconds
            "command": command,
        },
    }
    exported = out / "export"
    report = bench_folder(
        out / "pruned" / config.methods[0],
        out,
        dense=config.model,
        onnx=str(exported / "onnx") if "onnx" in exports else None,
        tensorrt=str(exported / "tensorrt") if "tensorrt" in exports else None,
        config=replace(config.bench, not_measured=not_measured),
        accuracy=accuracy,
        pruning=pruning,
        extra=extra,
    )
    written += ["results.json", "report.md"]
    progress(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min")
    return report


def _prune_every_method(out: Path, config: DemoConfig, progress, written: list[str]) -> tuple[dict, dict]:
    """The dense model's accuracy, then each method's pruned folder and its accuracy on the same windows.
    Returns ``(accuracy, pruning)`` as ``results.json`` holds them."""
    _, dense_folder = source_folder(config.model)
    dense = LayeredModel.from_folder(dense_folder)
    documents, chosen = evaluation_documents("stdlib", "stdlib")
    meter = Accuracy(dense, load_tokenizer(dense_folder), documents, config.eval_windows, config.seq_len)
    dense_value = meter.measure(reference=True)[meter.metric]
    progress(f"dense {meter.metric}: {dense_value:.3f}")
    accuracy = {"metric": meter.metric, "dense": dense_value, "methods": {}, "data": chosen}
    pruning = {}
    for method in config.methods:
        folder = out / "pruned" / method
        report = prune_model(
            PruneJob(
                model=config.model,
                out=str(folder),
                run=RunConfig(solver=PruneConfig(method=method, **(config.apt_options if method == "apt" else {}))),
                num_calibration_samples=config.windows,
                max_seq_length=config.seq_len,
                evaluate=False,
                overwrite=True,
            )
        )
        written.append(f"pruned/{method}")
        meter.layered = LayeredModel.from_folder(folder)
        accuracy["methods"][method] = meter.measure()[meter.metric]
        pruning[method] = pruning_record(report)
        progress(
            f"{method:10s} {meter.metric} {accuracy['methods'][method]:10.3f}  "
            f"pruned in {pruning[method]['seconds']:.0f} s"
        )
    return accuracy, pruning


def _export_every_target(source: Path, exported: Path, config: DemoConfig, progress, written: list[str]) -> dict:
    from exporters import export

    exports = {}
    for target in config.targets:
        options = {"dtype": "float32"} if target == "onnx" else {}
        if target in ("vllm", "compressed-tensors"):
            options["vllm_check"] = config.vllm_check
        exports[target] = export(target, source, exported / target, overwrite=True, **options)
        written.append(f"export/{target}")
        progress(f"exported {target}: {sum(f['bytes'] for f in exports[target]['files']) / 2**20:.1f} MiB")
    return exports


def copy_results_into_repository(out: Path, name: str) -> Path:
    """Keep a run's numbers in the repository (runtime_bench/results/NAME/): results.json, report and plots."""
    dest = Path(__file__).resolve().parent / "results" / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for file in [out / "results.json", out / "report.md", *out.glob("*.png")]:
        shutil.copy(file, dest / file.name)
    return dest


def summary_line(results_path: Path) -> str:
    results = json.loads(Path(results_path).read_text())
    acc = results["accuracy"]
    return ", ".join(f"{m} {v:.2f}" for m, v in acc["methods"].items()) + f" (dense {acc['dense']:.2f})"
