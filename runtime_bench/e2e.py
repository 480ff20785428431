"""End to end: prefill latency (batch × sequence) and decode tokens/s of whole models.

Inputs are random token ids (never padding); warm-up first; CUDA-synchronised on a GPU; median, min
and max over repeats.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import torch

from serving.timing import summary


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def vocabulary_size(model) -> int:
    """The token ids the model reads (a vision-language model's config keeps it in its text config)."""
    return model.get_input_embeddings().num_embeddings


def _ids(model, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocabulary_size(model), (batch, seq), generator=g)


@torch.no_grad()
def prefill_latency(model, batch: int, seq: int, device: str, repeats: int = 5, warmup: int = 1) -> dict:
    """Milliseconds for one forward pass over ``batch × seq`` tokens, without a KV cache."""
    ids = _ids(model, batch, seq).to(device)
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False)
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return summary(samples)


@torch.no_grad()
def decode_throughput(model, batch: int, prompt: int, new_tokens: int, device: str, repeats: int = 3) -> dict:
    """Generated tokens per second (greedy, KV cache) after a ``batch × prompt`` prefill."""
    ids = _ids(model, batch, prompt).to(device)
    # transformers 5 calls the KV cache `cache` (`past_key_values` is deprecated); 4.x `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    samples = []
    for r in range(repeats + 1):  # the first run warms up
        out = model(input_ids=ids, use_cache=True)
        past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: past})
            past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        if r:
            samples.append(batch * new_tokens / (time.perf_counter() - start))
    return summary(samples)


def onnxruntime_prefill(onnx_path: Path, vocab: int, batch: int, seq: int, repeats: int = 5) -> dict:
    """Milliseconds for one ONNX Runtime run of the exported graph over ``batch × seq`` tokens."""
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    ids = np.random.default_rng(0).integers(10, vocab, size=(batch, seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    session.run(None, feed)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1e3)
    return summary(samples) | {"provider": session.get_providers()[0]}
