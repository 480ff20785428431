"""Weights that current vLLM loads as a plain model: fp16/bf16 safetensors with the zeros in place.

vLLM removed its 2:4 kernels (CompressedTensors24) in v0.19.1 and refuses checkpoints whose
``quantization_config.sparsity_config`` lists targets, so this folder carries no sparsity config at
all. Tensors are read and written one at a time (shards of ``max_shard_size``), so the export needs
memory for one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apt.atomic import atomic_directory
from apt.errors import InvalidInputError
from apt.models.checkpoint import PlannedTensor, ShardedWriter, parse_size
from apt.models.portable import copy_side_files, write_config
from apt.solver.patterns import conforms, positive_zeros
from exporters.common import PrunedSource, check_pattern, open_pruned, write_manifest

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def plain_config(config: dict, dtype: str) -> dict:
    config = dict(config)
    quant = dict(config.pop("quantization_config", None) or {})
    quant.pop("sparsity_config", None)
    if quant:
        config["quantization_config"] = quant
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    return config


def cast_for_export(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the export dtype with ``+0.0`` zeros; integer tensors unchanged."""
    return positive_zeros(tensor.to(dtype)) if tensor.is_floating_point() else tensor


def export_vllm(
    src: str | Path, out: str | Path, dtype: str = "float16", overwrite: bool = False, max_shard_size: str = "5GB"
) -> dict:
    from safetensors import safe_open

    if dtype not in DTYPES:
        raise InvalidInputError(f"vllm export dtype must be float16 or bfloat16, got {dtype!r}")
    source = open_pruned(src, "vllm")
    layers = check_pattern(source)
    reader, target_dtype = source.reader, DTYPES[dtype]
    plan = [
        PlannedTensor(
            n, target_dtype if reader.info(n).dtype.is_floating_point else reader.info(n).dtype, reader.info(n).shape
        )
        for n in reader.names()
    ]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        writer.create()
        for name in reader.names():
            writer.write(name, cast_for_export(reader.read(name), target_dtype))
        writer.write_index()
        write_config(plain_config(source.config, dtype), tmp)
        copy_side_files(source.folder, tmp)
        validation = _validate(tmp, source, target_dtype, safe_open)
        return write_manifest(
            tmp, source=source, target="vllm", layers=layers, validation=validation, extra={"dtype": dtype}
        )


def _validate(folder: Path, source: PrunedSource, dtype: torch.dtype, safe_open) -> dict:
    """Read the written shards back with the safetensors library (what transformers and vLLM use),
    one tensor at a time, and compare with the source."""
    import transformers

    targets = set(source.targets.tensors)
    matched = pattern_kept = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                written = f.get_tensor(name)
                if not torch.equal(written, cast_for_export(source.reader.read(name), dtype)):
                    raise InvalidInputError(f"the written {name} differs from the source: the vLLM export failed")
                matched += 1
                pattern_kept += name in targets and conforms(written, source.targets.pattern)
    if matched != len(source.reader.names()) or pattern_kept != len(targets):
        raise InvalidInputError(
            f"the vLLM folder holds {matched} of {len(source.reader.names())} tensors, "
            f"{pattern_kept} of {len(targets)} pruned ones in pattern"
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) and "sparsity_config" in json.dumps(config.quantization_config):
        raise InvalidInputError("the vLLM folder's config still carries a sparsity_config, which vLLM ≥ 0.19.1 refuses")
    return {
        "tensors_match_source": matched,
        "pruned_tensors_in_pattern": pattern_kept,
        "config_loads_without_sparsity_config": True,
        "vllm_loaded": "not measured: vLLM is not installed here (it needs a GPU)",
    }
