"""Calibration text the model writes itself (``--calibration-data self`` or ``self:SOURCE``).

The model continues short prefixes of ``SOURCE`` (default ``stdlib``) by sampling, and the continuations with
the highest perplexity under the model itself are dropped ("Beware of Calibration Data for Pruning Large
Language Models", arXiv 2410.17711: self-generated calibration text served Wanda, DSnoT and OWL better than
C4 or WikiText on LLaMA-3). The idea for apt: its refit is fitted to the calibration text's input
correlations, and text drawn from the model's own distribution is nearer to what it was trained on than one
domain's documents are.

It needs the whole model in memory once, as ``transformers`` loads it, and a causal LM. Generation is
seeded, so a rerun or a resume gets the same windows on the same machine; under ``torchrun`` the writer
generates and broadcasts them."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.errors import InvalidInputError
from apt.measure.evaluate import summed_nll

log = logging.getLogger(__name__)

PREFIX_TOKENS = 8  # of the source text each continuation starts from
KEEP = 0.8  # the share of continuations kept: the rest, of highest perplexity, are dropped
TOP_P = 0.95
GENERATE_BATCH = 80  # continuations generated at once (the KV cache of 80 × 512 tokens of SmolLM2: 1.9 GB)
SCORE_BATCH = 4


@dataclass
class Generated:
    windows: torch.Tensor  # [n, seq_len] int64
    seconds: float
    generated: int  # continuations sampled (``n / KEEP``, rounded up)
    perplexity_kept: tuple[float, float]  # the kept continuations' perplexity range under the model
    perplexity_dropped_min: float | None

    def describe(self) -> dict:
        return {
            "generated": self.generated,
            "kept": len(self.windows),
            "prefix_tokens": PREFIX_TOKENS,
            "top_p": TOP_P,
            "seconds_generating": round(self.seconds, 2),
            "perplexity_kept": [round(p, 3) for p in self.perplexity_kept],
            "perplexity_dropped_min": None
            if self.perplexity_dropped_min is None
            else round(self.perplexity_dropped_min, 3),
        }


def generate_windows(
    folder: Path,
    prompts: torch.Tensor,
    count: int,
    seq_len: int,
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    batch_size: int = GENERATE_BATCH,
) -> Generated:
    """``count`` windows of ``seq_len`` tokens: each of ``prompts`` (``[m, PREFIX_TOKENS]``, ``m ≥ count``)
    continued by sampling (top-p, seeded) to ``seq_len`` tokens without stopping early, the ``count`` of lowest
    perplexity under the model kept, in prompt order."""
    import transformers

    if seq_len <= prompts.shape[1]:
        raise InvalidInputError(
            f"--calibration-data self: --max-seq-length {seq_len} leaves nothing to generate after the "
            f"{prompts.shape[1]}-token prefix"
        )
    started = time.perf_counter()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError) as err:
        raise InvalidInputError(
            f"--calibration-data self needs a causal language model that transformers can generate with; "
            f"{folder} is not one ({str(err).splitlines()[0]}): calibrate on text instead (e.g. stdlib)"
        ) from err
    model = model.to(device).eval()
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    new = seq_len - prompts.shape[1]
    torch.manual_seed(seed)
    rows, losses = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size].to(device)
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                top_p=TOP_P,
                top_k=0,
                temperature=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad,
            )
            out = out[:, :seq_len]
            for part in out.split(SCORE_BATCH):  # the logits of 4 × 512 tokens of a 49k vocabulary: 0.4 GB
                logits = model(part).logits
                losses += [summed_nll(logits[i : i + 1], part[i : i + 1]) / (seq_len - 1) for i in range(len(part))]
            rows.append(out.cpu())
            log.info(
                "calibration text generated: %d of %d continuations (%.0f s)",
                min(start + batch_size, len(prompts)),
                len(prompts),
                time.perf_counter() - started,
            )
    del model
    windows, nll = torch.cat(rows), torch.tensor(losses, dtype=torch.float64)
    order = torch.argsort(nll, stable=True)
    kept = order[:count].sort().values
    dropped = order[count:]
    return Generated(
        windows=windows[kept].to(torch.long),
        seconds=time.perf_counter() - started,
        generated=len(prompts),
        perplexity_kept=(math.exp(nll[kept].min().item()), math.exp(nll[kept].max().item())),
        perplexity_dropped_min=math.exp(nll[dropped].min().item()) if len(dropped) else None,
    )


def prompt_count(count: int) -> int:
    """Continuations to sample for ``count`` kept ones."""
    return math.ceil(count / KEEP)
