"""The one adapter table for model families, chosen by ``config.model_type``.

An adapter says where the repeated blocks are and which Linear layers of a block are pruned, in the
order the block uses them. Layers in one group read the same input (q/k/v, gate/up) and share one
Hessian. Embeddings and the LM head are outside the blocks, so they stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from apt.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str
    block_paths: tuple[str, ...]  # candidate dotted paths to the ModuleList of blocks
    groups: tuple[tuple[str, ...], ...]  # linear layers inside a block, grouped by shared input
    causal: bool  # a causal LM (perplexity) rather than an encoder (embedding fidelity)
    # modules applied, in order, to the last block's output to give the model's output (final norm, LM
    # head); a path that is absent or None in a given config is skipped (OPT's project_out)
    final: tuple[str, ...] = ()


_LLAMA = Family(
    name="llama",
    block_paths=("model.layers",),
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    causal=True,
    final=("model.norm", "lm_head"),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "opt": Family(
        name="opt",
        block_paths=("model.decoder.layers",),
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        causal=True,
        final=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    ),
    "bert": Family(
        name="bert",
        block_paths=("encoder.layer", "bert.encoder.layer"),
        groups=(
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",),
            ("intermediate.dense",),
            ("output.dense",),
        ),
        causal=False,
    ),
    # The depthwise conv1d is not a GEMM and stays dense.
    "mamba": Family(
        name="mamba",
        block_paths=("backbone.layers",),
        groups=(("mixer.in_proj",), ("mixer.x_proj",), ("mixer.dt_proj",), ("mixer.out_proj",)),
        causal=True,
        final=("backbone.norm_f", "lm_head"),
    ),
}


def family_for(config) -> Family:
    """The adapter for ``config.model_type``, or an error that lists the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def find_blocks(model: torch.nn.Module, family: Family) -> tuple[str, torch.nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's repeated blocks."""
    for path in family.block_paths:
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList):
            return path, module
    raise UnsupportedModelError(
        f"{family.name} model without blocks at {' or '.join(family.block_paths)}: the checkpoint's layout is not the "
        "one transformers builds for this model_type"
    )


def block_groups(
    block: torch.nn.Module, family: Family, prefix: str, targets: str | None, ignore: str | None
) -> list[list[tuple[str, torch.nn.Linear]]]:
    """The block's prunable layers as groups of ``(full name, Linear)``, filtered by the regexes
    ``targets`` (search, keep matches) and ``ignore`` (search, drop matches)."""
    groups = []
    for group in family.groups:
        members = []
        for name in group:
            module = block.get_submodule(name)
            full = f"{prefix}.{name}"
            if not isinstance(module, torch.nn.Linear):
                continue
            if targets and not re.search(targets, full):
                continue
            if ignore and re.search(ignore, full):
                continue
            members.append((full, module))
        if members:
            groups.append(members)
    return groups
