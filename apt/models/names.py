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
    """How parameter ``name`` is stored. ``keys[e]`` are expert e's tensors in concatenation order; without
    experts (``stacked=False``) ``keys`` has one entry: the parameter's one tensor ``((key,),)``, or the parts
    it is joined from (Kimi Linear's and OLMo hybrid's ``q_conv1d``, ``k_conv1d``, ``v_conv1d`` make one
    ``conv1d``)."""

    keys: tuple[tuple[str, ...], ...]
    stacked: bool = False
    concat_dim: int = 0  # the axis of each expert's slice (or of the parameter) along which its parts are joined

    @property
    def all_keys(self) -> list[str]:
        return [k for parts in self.keys for k in parts]

    def assemble(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if not self.stacked and len(self.keys[0]) == 1:
            return read(self.keys[0][0])
        slices = [torch.cat([read(k) for k in parts], dim=self.concat_dim) for parts in self.keys]
        return torch.stack(slices) if self.stacked else slices[0]

    def split(self, tensor: torch.Tensor, shape_of: Callable[[str], tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for every stored tensor, cut from the parameter ``tensor``."""
        if not self.stacked and len(self.keys[0]) == 1:
            return [(self.keys[0][0], tensor)]
        out = []
        for e, parts in enumerate(self.keys):
            sizes = [shape_of(k)[self.concat_dim] for k in parts]
            whole = tensor[e] if self.stacked else tensor
            out += list(zip(parts, (p.contiguous() for p in whole.split(sizes, dim=self.concat_dim))))
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
    """For each parameter or buffer in ``names``, how the checkpoint stores it; one found nowhere is left out
    (the caller names what is missing).

    The ground truth is transformers' own loading: every checkpoint key is renamed exactly as
    ``from_pretrained`` renames it (``get_model_conversion_mapping`` over the model and its sub-models, then
    ``rename_source_key`` against the skeleton's state dict), so a rename transformers adds in a release
    (GPT-NeoX's ``embed_out`` → ``lm_head`` in 5.25) is followed the day it ships. A transformers without
    that machinery (4.x) stores every parameter under its own name, with or without the base model's prefix.
    """
    wanted = set(names)
    loading = _loading_names(model, checkpoint_keys)
    if loading is None:
        prefix = getattr(model, "base_model_prefix", "") or ""
        available = set(checkpoint_keys)
        layout = {}
        for name in names:
            key = next((k for k in candidates(name, prefix) if k in available), None)
            if key is not None:
                layout[name] = Stored(((key,),))
        return layout
    found: dict[str, dict] = {}
    for key, (target, pattern, converter) in loading.items():
        if target not in wanted:
            continue
        if converter is None:
            found.setdefault(target, {"single": key})
            continue
        joined = _check_streamable(key, target, converter, getattr(model.config, "model_type", type(model).__name__))
        # the expert (or shard) number where the pattern, a regex to transformers, has its "*"
        star = re.search(pattern.replace("*", r"(?P<index>\d+)", 1), key) if "*" in pattern else None
        index = int(star.group("index")) if star else 0
        if joined is not None:  # parts joined into one parameter, in source-pattern order (then shard order)
            entry = found.setdefault(target, {"joined": {}, "dim": joined})
            entry["joined"][(converter.source_patterns.index(pattern), index)] = key
            continue
        entry = found.setdefault(target, {"experts": {}, "parts": len(converter.source_patterns)})
        entry["experts"].setdefault(index, {})[converter.source_patterns.index(pattern)] = key
    layout = {}
    for name, entry in found.items():
        if "single" in entry:
            layout[name] = Stored(((entry["single"],),))
            continue
        if "joined" in entry:
            parts = entry["joined"]
            layout[name] = Stored((tuple(parts[i] for i in sorted(parts)),), concat_dim=entry["dim"])
            continue
        experts = entry["experts"]
        if sorted(experts) != list(range(len(experts))) or any(len(p) != entry["parts"] for p in experts.values()):
            raise UnsupportedModelError(f"the checkpoint's per-expert tensors of {name} are incomplete")
        keys = tuple(tuple(experts[e][p] for p in range(entry["parts"])) for e in range(len(experts)))
        layout[name] = Stored(keys, stacked=True, concat_dim=0)
    return layout


def _loading_names(model, keys: list[str]) -> dict[str, tuple[str, str | None, object]] | None:
    """``{checkpoint key: (the state-dict name transformers loads it into, the converter source pattern it
    matched or None, that converter or None)}``, computed by transformers' own loading functions, the way
    ``convert_and_load_state_dict_in_model`` calls them; ``None`` for a transformers without them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()  # the skeleton's: names and meta tensors, nothing is read
    prefix = model.base_model_prefix
    out = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:  # as transformers: a key it should not have renamed
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        out[key] = (renamed, pattern, by_pattern.get(pattern) if pattern is not None else None)
    return out


def _check_streamable(key: str, target: str, converter, model_type: str) -> int | None:
    """Only converters that stack per-expert tensors (and join gate and up), or that join tensors into one
    parameter, can be read and written back one tensor at a time; any other (Lara's ``Split`` of one stored
    ``in_proj`` into four Linears, Inkling 2's ``Interleave``) is refused, naming the family and what to do.
    Returns the axis a join-only converter concatenates along, ``None`` for an experts converter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = [type(op) for op in converter.operations]
    if ops == [Concatenate]:
        return converter.operations[0].dim
    if ops not in ([MergeModulelist], [MergeModulelist, Concatenate]) or any(
        getattr(op, "dim", 0) != (1 if isinstance(op, Concatenate) else 0) for op in converter.operations
    ):
        used = [type(op).__name__ for op in converter.operations]
        # a folder saved as transformers holds the model (not in the checkpoint's layout) loads without the
        # converter, unless the converter also matches the model's own names
        resaved = converter.rename_source_key(target)[1] is None
        raise UnsupportedModelError(
            f"{model_type}: transformers builds {target} from the checkpoint's {key} with {used}, which apt-sparse "
            "cannot read and write back one tensor at a time"
            + (
                "; save the model with save_pretrained(save_original_format=False) and prune that folder"
                if resaved
                else ""
            )
        )
