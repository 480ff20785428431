"""Accuracy on held-out text: perplexity for causal LMs, sentence-embedding fidelity for encoders."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu") -> dict:
    """Token-weighted perplexity over non-overlapping windows ``[n, seq]``: ``exp(Σ NLL / Σ tokens)``,
    each window predicting its tokens 2..seq from the ones before."""
    model.to(device)
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=None):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    model.to("cpu")
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": len(windows)}


@torch.no_grad()
def sentence_embeddings(
    model, tokenizer, texts, max_length: int = 128, batch_size: int = 16, device: str = "cpu"
) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states ``[len(texts), hidden]`` (the all-MiniLM recipe)."""
    model.to(device)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1).cpu())
    model.to("cpu")
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> dict:
    """Mean and minimum cosine between matching rows of two ``[n, hidden]`` normalised embedding sets."""
    cos = (reference * embeddings).sum(-1)
    return {"embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()), "texts": len(cos)}
