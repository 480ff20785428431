"""Weights that current vLLM loads as a plain model: fp16/bf16 safetensors with the zeros in place.

vLLM removed its 2:4 kernels (CompressedTensors24) in v0.19.1 and refuses checkpoints whose
``quantization_config.sparsity_config`` lists targets, so this folder carries no sparsity config at
all. Tensors are read and written one at a time (shards of ``max_shard_size``), so the export needs
memory for one tensor, whatever the model's size.

An FP8 folder (``apt-sparse quantize``) is carried as FP8: its float8 weights and their scales are copied
bit for bit, its ``quantization_config`` kept, every other floating tensor written in the export dtype, and
``apt_sparse_24.json`` says ``format: fp8``; vLLM's greedy tokens are then compared with the FP8 emulation's
(``apt.measure.fp8``) on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apt.atomic import atomic_directory
from apt.errors import InvalidInputError
from apt.models.checkpoint import SCALE_SUFFIX, PlannedTensor, ShardedWriter, parse_size
from apt.models.portable import copy_side_files, write_config
from apt.solver.patterns import as_rows, conforms, positive_zeros
from exporters.common import PrunedSource, check_pattern, check_space, open_pruned, write_manifest
from exporters.consumers import vllm_check, vllm_not_measured
from serving.vllm_plugin import SIDE_FILE
from serving.vllm_run import VllmCannotServe, vllm_python

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


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype and values (float8 compared as bytes: torch compares no float8 values)."""
    if a.dtype != b.dtype:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)


def kept_as_stored(source: PrunedSource, name: str) -> bool:
    """An FP8 weight or its scales: carried bit for bit, never cast."""
    fp8 = source.reader.fp8
    return name in fp8 or (name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) + ".weight" in fp8)


def exported_dtype(source: PrunedSource, name: str, dtype: torch.dtype) -> torch.dtype:
    stored = source.reader.info(name).dtype
    return dtype if stored.is_floating_point and not kept_as_stored(source, name) else stored


def exported(source: PrunedSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``name`` as the export writes it: FP8 weights and scales as stored, the rest cast."""
    if kept_as_stored(source, name):
        return source.reader.read_stored(name)
    return cast_for_export(source.reader.read(name), dtype)


def export_vllm(
    src: str | Path,
    out: str | Path,
    dtype: str = "float16",
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    vllm_check: bool | None = None,
) -> dict:
    """Plain weights for current vLLM, with ``apt_sparse_24.json`` beside them (the plugin's list of pruned
    layers, 2:4 only). ``vllm_check``: load the folder in vLLM through the plugin and compare its greedy
    tokens with transformers' (default: where an environment with vLLM exists, and the manifest says "not
    measured" with the reason where that environment cannot run the architecture; ``True``: both are errors)."""
    from safetensors import safe_open

    if dtype not in DTYPES:
        raise InvalidInputError(f"vllm export dtype must be float16 or bfloat16, got {dtype!r}")
    source = open_pruned(src, "vllm")
    layers = check_pattern(source)
    reader, target_dtype = source.reader, DTYPES[dtype]
    check_space(out, source, target_dtype.itemsize)
    plan = [PlannedTensor(n, exported_dtype(source, n, target_dtype), reader.info(n).shape) for n in reader.names()]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        writer.create()
        for name in reader.names():
            writer.write(name, exported(source, name, target_dtype))
        writer.write_index()
        write_config(plain_config(source.config, dtype), tmp)
        copy_side_files(source.folder, tmp)
        linears = plugin_targets(source)
        if (source.targets.pattern.n, source.targets.pattern.m) == (2, 4):
            side = side_file(linears, "fp8" if reader.fp8 else "dense")
            (tmp / SIDE_FILE).write_text(json.dumps(side, indent=2) + "\n")
        validation = _validate(tmp, source, target_dtype, safe_open)
        validation["vllm_loaded"] = _vllm_loaded(tmp, source, target_dtype, linears, vllm_check, "apt_sparse_24")
        extra = {"dtype": dtype}
        if reader.fp8:
            extra["fp8"] = {
                "weights_in_fp8": len(reader.fp8),
                "carried": "float8_e4m3fn weights and float32 weight_scale copied bit for bit, quantization_config "
                f"(compressed-tensors float-quantized, W8A8) kept; every other floating tensor in {dtype}",
            }
        return write_manifest(tmp, source=source, target="vllm", layers=layers, validation=validation, extra=extra)


def _validate(folder: Path, source: PrunedSource, dtype: torch.dtype, safe_open) -> dict:
    """Read the written shards back with the safetensors library (what transformers and vLLM use),
    one tensor at a time, and compare with the source."""
    import transformers

    targets = set(source.targets.tensors)
    matched = pattern_kept = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                written, expected = f.get_tensor(name), exported(source, name, dtype)
                if not same_bits(written, expected):
                    raise InvalidInputError(f"the written {name} differs from the source: the vLLM export failed")
                matched += 1
                pattern_kept += name in targets and conforms(
                    as_rows(written.float(), source.targets.axis(name)), source.targets.pattern
                )
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
    }


def plugin_targets(source: PrunedSource) -> set[str]:
    """The pruned Linear modules (checkpoint names): what the vLLM plugin serves. MoE experts are vLLM's
    fused-MoE layers, which it serves dense."""
    return {t.removesuffix(".weight") for t in source.targets.tensors if t not in source.targets.experts}


def side_file(linears: set[str], fmt: str = "dense") -> dict:
    """``apt_sparse_24.json``: what the vLLM plugin reads when asked (``--quantization apt_sparse_24``); ``fmt``
    ``fp8`` for FP8 weights."""
    return {"format": fmt, "pattern": "2:4", "targets": sorted(linears), "ignore": ["lm_head"]}


def _vllm_loaded(folder: Path, source: PrunedSource, dtype, linears: set[str], wanted, quantization) -> dict | str:
    if wanted is False:
        return "not measured: not asked (vllm_check off)"
    if vllm_python() is None:
        if wanted:
            raise InvalidInputError(vllm_not_measured().removeprefix("not measured: "))
        return vllm_not_measured()
    if (source.targets.pattern.n, source.targets.pattern.m) != (2, 4):
        quantization = None  # the plugin serves 2:4; any other pattern is checked as vLLM's plain model
        linears = set()
    vision = {t.removesuffix(".weight") for t in source.targets.vision} & linears
    try:
        return vllm_check(folder, source.folder, dtype, linears, quantization, vision)
    except VllmCannotServe as err:  # the environment's limit, not the folder's: an error only when asked for
        if wanted:
            raise
        return f"not measured: {err}"
