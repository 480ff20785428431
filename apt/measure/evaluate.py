"""Accuracy on held-out text: perplexity for causal LMs; for encoders, sentence-embedding fidelity to the
dense model and a retrieval task both models are scored on.

The ``streaming_*`` functions run a ``LayeredModel`` block by block over the evaluation batches, so
no evaluation ever holds the whole model; ``perplexity`` and ``sentence_embeddings`` run a model
that is already in memory and are the reference the streaming ones are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apt.collective import Collective
from apt.models.activations import ActivationStore
from apt.models.checkpoint import CheckpointReader
from apt.models.layered import LayeredModel, token_batches
from apt.text.sources import SENTENCE_TOKENS

EVAL_BATCH = 4
FINAL_CHUNK = 64


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood: positions 0..seq-2 predict tokens 1..seq-1."""
    logits = logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def _perplexity_record(nll: float, windows: torch.Tensor) -> dict:
    count = windows[:, 1:].numel()
    return {
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "windows": len(windows),
        "seq_len": int(windows.shape[1]),
    }


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = EVAL_BATCH, device: str = "cpu") -> dict:
    """Token-weighted perplexity ``exp(Σ NLL / Σ tokens)`` of an in-memory model over non-overlapping
    windows ``[n, seq]``, each window predicting its tokens 2..seq from the ones before."""
    model.to(device)
    nll = 0.0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=None):
        ids = windows[start : start + batch_size].to(device)
        nll += summed_nll(model(input_ids=ids, use_cache=False).logits, ids)
    model.to("cpu")
    return _perplexity_record(nll, windows)


@torch.no_grad()
def streaming_perplexity(
    layered: LayeredModel,
    windows: torch.Tensor,
    reader: CheckpointReader | None = None,
    batch_size: int = EVAL_BATCH,
    coll: Collective | None = None,
) -> dict:
    """The same perplexity, computed block by block from ``reader`` (default: the model's own checkpoint).
    Under several ranks (``coll``) each takes its share of the batches and the sums are added."""
    coll = coll or Collective()
    batches = coll.share(token_batches(windows, batch_size))
    store = layered.block_inputs(batches, ActivationStore(layered.dtype), reader)
    layered.run_blocks(store, range(len(layered.blocks)), reader)
    nll = 0.0
    with layered.loaded(layered.final_names(), reader):
        for i, batch in enumerate(batches):
            hidden, ids = store.hidden(i).to(layered.device), batch["input_ids"].to(layered.device)
            # the final norm and head act on each position alone: run them on slices of positions, so
            # the logits held at once are [batch, FINAL_CHUNK, vocab] (a 49k vocabulary × 512 positions
            # × 4 windows in fp32 is 400 MB, more than the rest of the run)
            for start in range(0, ids.shape[1] - 1, FINAL_CHUNK):
                stop = min(start + FINAL_CHUNK, ids.shape[1] - 1)
                logits = layered.run_final(hidden[:, start:stop]).float()
                targets = ids[:, start + 1 : stop + 1]
                flat = logits.reshape(-1, logits.shape[-1])
                nll += float(F.cross_entropy(flat, targets.reshape(-1), reduction="sum"))
    if coll.world > 1:
        nll = float(coll.sum_(torch.tensor([nll], dtype=torch.float64))[0])
    return _perplexity_record(nll, windows)


def text_batches(
    tokenizer, texts, max_length: int = SENTENCE_TOKENS, batch_size: int = 16
) -> list[dict[str, torch.Tensor]]:
    """Padded, truncated tokenizer batches (``input_ids``, ``attention_mask``, ...) of ``texts``."""
    return [
        dict(
            tokenizer(
                list(texts[s : s + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for s in range(0, len(texts), batch_size)
    ]


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, L2-normalised (the all-MiniLM recipe)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict], device: str = "cpu") -> torch.Tensor:
    """Embeddings ``[texts, hidden]`` of an in-memory encoder over ``text_batches``."""
    model.to(device)
    out = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(_mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).cpu())
    model.to("cpu")
    return torch.cat(out)


@torch.no_grad()
def streaming_sentence_embeddings(
    layered: LayeredModel, batches: list[dict], reader: CheckpointReader | None = None
) -> torch.Tensor:
    """The same embeddings, computed block by block."""
    store = layered.block_inputs(batches, ActivationStore(layered.dtype), reader)
    layered.run_blocks(store, range(len(layered.blocks)), reader)
    out = []
    with layered.loaded(layered.final_names(), reader):
        for i, batch in enumerate(batches):
            hidden = layered.run_final(store.hidden(i).to(layered.device))
            out.append(_mean_pool(hidden, batch["attention_mask"].to(layered.device)).cpu())
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> dict:
    """Mean and minimum cosine between matching rows of two ``[n, hidden]`` normalised embedding sets."""
    cos = (reference * embeddings).sum(-1)
    return {"embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()), "texts": len(cos)}


def split_halves(documents, min_words: int = 16) -> tuple[list[str], list[str]]:
    """Each document of at least ``min_words`` words cut in two halves by words: the retrieval task's
    queries (first halves) and its corpus (second halves)."""
    first, second = [], []
    for doc in documents:
        words = doc.split()
        if len(words) >= min_words:
            first.append(" ".join(words[: len(words) // 2]))
            second.append(" ".join(words[len(words) // 2 :]))
    return first, second


def retrieval_accuracy(queries: torch.Tensor, corpus: torch.Tensor) -> dict:
    """Top-1 accuracy of finding each document's second half from its first half among all second halves
    (``[n, hidden]`` normalised embeddings each): a task dense and pruned encoders are both scored on."""
    hits = (queries @ corpus.T).argmax(dim=1) == torch.arange(len(queries))
    return {"retrieval_top1": float(hits.float().mean()), "documents": len(queries)}
