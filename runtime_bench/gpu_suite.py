"""Every GPU measurement in one run (a single Ampere-or-newer GPU; about 5 minutes on an H200).

    PYTHONPATH=. python3 -m runtime_bench.gpu_suite            # writes runtime_bench/results/gpu-<gpu>/

1. The GPU tests (``pytest -m gpu``): decode-safe linear on both paths, TensorRT where installed.
2. GEMM sweep dense vs 2:4 (cuSPARSELt and CUTLASS, fp16) at SmolLM2-135M's and Llama-3-8B's shapes,
   M from 1 to 8192; per-shape thresholds for the decode-safe linear.
3. End to end: prefill latency and decode tokens/s, dense vs 2:4 (decode-safe; and vLLM dense vs the
   apt_sparse_24 plugin where the machine has vLLM), on random-init models
   with SmolLM2-135M's config and with Llama-3-8B's layer shapes (4 layers). Kernel speed depends on
   shapes and on the 2:4 pattern, not on the weight values, so these need no checkpoint (the GPU
   machine cannot fetch one); accuracy is measured on CPU by the demo and the method comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apt.atomic import write_json_atomic
from apt.solver import select_mask
from apt.solver.patterns import Pattern
from runtime_bench.backends import BACKENDS
from runtime_bench.bench import BenchConfig, run_bench, validate_results, vllm_rows
from runtime_bench.report import render_report

RESULTS = Path(__file__).resolve().parent / "results"

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
LLAMA3_8B_4_LAYERS = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)


def random_model(config: dict, pruned: bool):
    """A random-init Llama of the given shape (seed 0, fp16, CUDA); with ``pruned`` every block Linear is
    pruned 2:4 by magnitude. Kernel speed depends on shapes and the 2:4 pattern, not on the values."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.float16).eval()
    if pruned:
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(select_mask(module.weight.abs().float(), Pattern(2, 4)))
    return model


def _with_vllm(results: dict, shape: dict, config: BenchConfig) -> None:
    """vLLM, dense and through the apt_sparse_24 plugin, on the same random models saved as folders, where
    the GPU machine has vLLM (its rows join the end-to-end table); said once where it has not."""
    status = BACKENDS["vllm"]()
    if not status.available:
        results["not_measured"]["vllm end to end"] = status.reason
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, pruned in (("dense", False), ("pruned", True)):
            random_model(shape, pruned).save_pretrained(Path(tmp) / name)
        rows = vllm_rows(Path(tmp) / "dense", Path(tmp) / "pruned", config, tokenizer=False)
    for kind in ("prefill", "decode"):
        results["e2e"][kind] += rows[kind]
    results["not_measured"].pop("vllm end to end", None)


def gpu_tests() -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests"], capture_output=True, text=True, timeout=300
    )
    tail = run.stdout.strip().splitlines()[-15:]
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped)", line)), "")
    return {"exit_code": run.returncode, "summary": summary, "tail": tail}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_suite needs a CUDA GPU; on CPU run `apt-sparse demo` instead")
    started = time.perf_counter()
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = args.out or RESULTS / f"gpu-{name}"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": torch.cuda.get_device_name(), "runs": {}}
    if not args.skip_tests:
        summary["gpu_tests"] = gpu_tests()
        print("gpu tests:", summary["gpu_tests"]["summary"], flush=True)
    runs = {
        "smollm2-135m-shape": (
            SMOLLM2_135M,
            BenchConfig(
                device="cuda",
                llama_shapes=False,
                prefill=((1, 512), (8, 512), (8, 2048)),
                decode=(1, 128, 128),
                e2e_repeats=10,
            ),
        ),
        "llama3-8b-4-layers": (
            LLAMA3_8B_4_LAYERS,
            BenchConfig(
                device="cuda",
                llama_shapes=False,
                prefill=((1, 512), (8, 512), (8, 2048), (1, 8192)),
                decode=(1, 128, 128),
                e2e_repeats=10,
            ),
        ),
    }
    said: set[str] = set()
    for label, (shape, config) in runs.items():
        results = run_bench(
            config, lambda shape=shape: random_model(shape, False), lambda shape=shape: random_model(shape, True)
        )
        results["model_note"] = f"random-init {label}, block Linears pruned 2:4 by magnitude: speed only"
        _with_vllm(results, shape, config)
        validate_results(results)
        folder = out / label
        folder.mkdir(exist_ok=True)
        write_json_atomic(folder / "results.json", results)
        render_report(results, folder)
        summary["runs"][label] = {
            "thresholds": results["thresholds"],
            "decode_safe": results["decode_safe"],
            "e2e": results["e2e"],
            "not_measured": results["not_measured"],
        }
        print(f"{label}: thresholds {results['thresholds']}", flush=True)
        for row in results["e2e"]["prefill"] + results["e2e"]["decode"]:
            print(
                f"  {row['model']:6s} {row['backend']:36s} "
                f"{row.get('batch')}×{row.get('seq', row.get('prompt'))}: {row['result']['median']:.3f}",
                flush=True,
            )
        for what, reason in results["not_measured"].items():
            if what not in said:  # a reason shared by every run is printed once
                print(f"  not measured: {what}: {reason}", flush=True)
                said.add(what)
        torch.cuda.empty_cache()
    summary["seconds"] = time.perf_counter() - started
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps({"seconds": summary["seconds"], "out": str(out)}))


if __name__ == "__main__":
    main()
