"""Weights that current vLLM loads as a plain model: fp16/bf16 safetensors with the zeros in place.

vLLM removed its 2:4 kernels (CompressedTensors24) in v0.19.1 and refuses checkpoints whose
``quantization_config.sparsity_config`` lists targets, so this folder carries no sparsity config at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from apt.artifacts import atomic_directory
from apt.errors import InvalidInputError
from apt.patterns import is_nm_sparse
from exporters.common import positive_zeros, read_checkpoint, verify_nm, write_manifest

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def copy_side_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def plain_config(config: dict, dtype: str) -> dict:
    config = dict(config)
    quant = dict(config.pop("quantization_config", None) or {})
    quant.pop("sparsity_config", None)
    if quant:
        config["quantization_config"] = quant
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    return config


def export_vllm(src: str | Path, out: str | Path, dtype: str = "float16", overwrite: bool = False) -> dict:
    from safetensors.torch import load_file, save_file

    if dtype not in DTYPES:
        raise InvalidInputError(f"vllm export dtype must be float16 or bfloat16, got {dtype!r}")
    src = Path(src)
    checkpoint = read_checkpoint(src)
    layers = verify_nm(checkpoint)
    # safetensors refuses tensors that share memory (tied embeddings): save each once, contiguously
    tensors = {name: positive_zeros(t.to(DTYPES[dtype])).contiguous().clone() for name, t in checkpoint.tensors.items()}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(plain_config(checkpoint.config, dtype), indent=2))
        copy_side_files(src, tmp)
        written = load_file(str(tmp / "model.safetensors"))
        config = json.loads((tmp / "config.json").read_text())
        validation = {
            "tensors_match_source": all(torch.equal(written[k], tensors[k]) for k in tensors),
            "targets_still_2_4": all(is_nm_sparse(written[r["name"]], 2, 4) for r in layers),
            "no_sparsity_config": "sparsity_config" not in json.dumps(config),
            "vllm_loaded": "not measured: vLLM is not installed here (it needs a GPU)",
        }
        if not all(v for k, v in validation.items() if k != "vllm_loaded"):
            raise InvalidInputError(f"the written vLLM folder failed validation: {validation}")
        return write_manifest(
            tmp, source=src, target="vllm", layers=layers, validation=validation, extra={"dtype": dtype}
        )
