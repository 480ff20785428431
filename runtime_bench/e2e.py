"""End to end: prefill latency (batch × sequence) and decode tokens/s of whole models.

Inputs are random token ids (never padding). Each ``*_run`` function returns a callable that takes one sample
(CUDA-synchronised on a GPU); ``time_rows`` takes them as ``serving.timing`` does everywhere: warm-up thrown
away, at least ``MIN_SAMPLES`` samples, side-by-side runs interleaved (A, B, A, B …), the median with its
spread, and the machine's load while they ran (``serving.machine_load``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serving.machine_load import load_between, snapshot
from serving.timing import MIN_SAMPLES, NOISY_SPREAD, noise, ratio, sample_interleaved, summary


@dataclass(frozen=True)
class Sampling:
    """How a row is timed: ``warmup`` untimed rounds, then at least ``samples`` (never fewer than
    ``MIN_SAMPLES``) and at least ``min_seconds``; a row whose spread exceeds ``max_spread`` is marked noisy."""

    samples: int = MIN_SAMPLES
    warmup: int = 1
    min_seconds: float = 0.0
    max_spread: float = NOISY_SPREAD


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def vocabulary_size(model) -> int:
    """The token ids the model reads (a vision-language model's config keeps it in its text config)."""
    return model.get_input_embeddings().num_embeddings


def _ids(model, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocabulary_size(model), (batch, seq), generator=g)


def prefill_run(model, batch: int, seq: int, device: str) -> Callable[[], float]:
    """One sample: milliseconds for one forward pass over ``batch × seq`` tokens, without a KV cache."""
    ids = _ids(model, batch, seq).to(device)

    @torch.no_grad()
    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    return run


def decode_run(model, batch: int, prompt: int, new_tokens: int, device: str) -> Callable[[], float]:
    """One sample: generated tokens per second (greedy, KV cache) after an untimed ``batch × prompt`` prefill."""
    ids = _ids(model, batch, prompt).to(device)
    # transformers 5 calls the KV cache `cache` (`past_key_values` is deprecated); 4.x `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def run() -> float:
        out = model(input_ids=ids, use_cache=True)
        past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: past})
            past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        return batch * new_tokens / (time.perf_counter() - start)

    return run


def onnxruntime_prefill_run(onnx_path: Path, vocab: int, batch: int, seq: int) -> tuple[Callable[[], float], str]:
    """One sample: milliseconds for one ONNX Runtime run of the exported graph over ``batch × seq`` tokens;
    and the execution provider it runs on."""
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    ids = np.random.default_rng(0).integers(10, vocab, size=(batch, seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def run() -> float:
        start = time.perf_counter()
        session.run(None, feed)
        return (time.perf_counter() - start) * 1e3

    return run, session.get_providers()[0]


def time_rows(runs: dict[str, Callable[[], float]], sampling: Sampling, threads: int, throughput: bool = False) -> dict:
    """Time ``runs`` interleaved (one row each, the first the baseline). Returns ``{"results": {name: summary},
    "noise": {name: [reasons]}, "load": record, "speedups": {name: ratio}}``: each other run's speedup over the
    baseline, paired by round (baseline time over its time; its throughput over the baseline's where
    ``throughput``), above 1 where it is faster."""
    start = snapshot()
    samples = sample_interleaved(
        runs, warmup=sampling.warmup, min_samples=max(sampling.samples, MIN_SAMPLES), min_seconds=sampling.min_seconds
    )
    load = load_between(start, snapshot(), threads)
    results = {name: summary(taken) for name, taken in samples.items()}
    baseline = next(iter(samples))
    return {
        "results": results,
        "noise": {name: noise(result, load, sampling.max_spread) for name, result in results.items()},
        "load": load,
        "speedups": {
            name: ratio(taken, samples[baseline]) if throughput else ratio(samples[baseline], taken)
            for name, taken in samples.items()
            if name != baseline
        },
    }
