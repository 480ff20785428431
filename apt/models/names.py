"""Which checkpoint tensors hold each model parameter, and how one is read from them and written back.

Most parameters are stored under their own name (with or without the base model's prefix). Fused MoE
experts are often stored per expert: transformers fuses ``mlp.experts.{e}.gate_proj.weight`` and
``…up_proj.weight`` of every expert into one ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` when it loads
them (its conversion mapping: ``MergeModulelist`` stacks the experts, ``Concatenate`` joins gate and
up), and Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2`` are renamed first. A reader that streams
tensors by name applies the same mapping (read from transformers, never copied), and the pruned
parameters are written back under the checkpoint's own names, so every consumer loads the output as
it loads the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from apt.errors import UnsupportedModelError


@dataclass(frozen=True)
class Stored:
    """How parameter ``name`` is stored. ``keys[e]`` are expert e's tensors in concatenation order (one
    tensor and no experts for an ordinary parameter: ``((key,),)`` with ``stacked=False``)."""

    keys: tuple[tuple[str, ...], ...]
    stacked: bool = False
    concat_dim: int = 0  # the axis of each expert's slice along which its parts are joined

    @property
    def all_keys(self) -> list[str]:
        return [k for parts in self.keys for k in parts]

    def assemble(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if not self.stacked:
            return read(self.keys[0][0])
        slices = [torch.cat([read(k) for k in parts], dim=self.concat_dim) for parts in self.keys]
        return torch.stack(slices)

    def split(self, tensor: torch.Tensor, shape_of: Callable[[str], tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for every stored tensor, cut from the parameter ``tensor``."""
        if not self.stacked:
            return [(self.keys[0][0], tensor)]
        out = []
        for e, parts in enumerate(self.keys):
            sizes = [shape_of(k)[self.concat_dim] for k in parts]
            out += list(zip(parts, (p.contiguous() for p in tensor[e].split(sizes, dim=self.concat_dim))))
        return out


def candidates(name: str, prefix: str) -> list[str]:
    """The names a checkpoint may use for ``name``: as is, or without/with the base model's prefix."""
    names = [name]
    if prefix and name.startswith(prefix + "."):
        names.append(name[len(prefix) + 1 :])
    elif prefix:
        names.append(f"{prefix}.{name}")
    return names


def stored_layout(model: torch.nn.Module, checkpoint_keys: list[str], names: list[str]) -> dict[str, Stored]:
    """For each parameter in ``names``, how the checkpoint stores it; a parameter found nowhere is left out
    (the caller names what is missing)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    available = set(checkpoint_keys)
    layout: dict[str, Stored] = {}
    for name in names:
        key = next((k for k in candidates(name, prefix) if k in available), None)
        if key is not None:
            layout[name] = Stored(((key,),))
    missing = set(names) - set(layout)
    if missing:
        layout |= _converted(model, [k for k in checkpoint_keys if k not in _direct(layout)], missing, prefix)
    return layout


def _direct(layout: dict[str, Stored]) -> set[str]:
    return {k for stored in layout.values() for k in stored.all_keys}


def _converted(model, keys: list[str], missing: set[str], prefix: str) -> dict[str, Stored]:
    """The parameters transformers builds from renamed or merged checkpoint tensors (its conversion
    mapping for this model type)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # a transformers without conversion mappings stores parameters under their names
        return {}
    mapping = get_checkpoint_conversion_mapping(model.config.model_type) or []
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    if not mapping:
        return {}
    found: dict[str, dict] = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters)
        target = next((n for n in candidates(renamed, prefix) if n in missing), None)
        if target is None:
            continue
        if pattern is None:
            found[target] = {"single": key}
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = [type(op) for op in converter.operations]
        if ops not in ([MergeModulelist], [MergeModulelist, Concatenate]) or any(
            getattr(op, "dim", 0) != (1 if isinstance(op, Concatenate) else 0) for op in converter.operations
        ):
            used = [type(op).__name__ for op in converter.operations]
            raise UnsupportedModelError(
                f"{key}: transformers builds {target} from it with {used}, which apt-sparse cannot stream; "
                "save the model with save_pretrained(save_original_format=False) and prune that folder"
            )
        expert = int(re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key).group(1))
        entry = found.setdefault(target, {"experts": {}, "parts": len(converter.source_patterns)})
        entry["experts"].setdefault(expert, {})[converter.source_patterns.index(pattern)] = key
    layout = {}
    for name, entry in found.items():
        if "single" in entry:
            layout[name] = Stored(((entry["single"],),))
            continue
        experts = entry["experts"]
        if sorted(experts) != list(range(len(experts))) or any(len(p) != entry["parts"] for p in experts.values()):
            raise UnsupportedModelError(f"the checkpoint's per-expert tensors of {name} are incomplete")
        keys = tuple(tuple(experts[e][p] for p in range(entry["parts"])) for e in range(len(experts)))
        layout[name] = Stored(keys, stacked=True, concat_dim=0)
    return layout
